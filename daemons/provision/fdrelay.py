"""A third-party Diameter relay in the lab: freeDiameterd (Debian ``freediameterd``) between
the visited domains' AAAFs and a home AAA server.

A topology asks for it per realm, ``domains: {home.example: {aaa: aaah, relay: core}}``: every
AAAF then reaches that realm through the relay in node ``core`` instead of dialling the AAAH
(``daemons.provision.configs``), and the relay forwards AMRs and their answers between them. It serves
no application itself, so it relays every one (RFC 6733 §2.8.1, Relay-Application-Id in its
CER/CEA) and adds a Route-Record naming the peer a request came from; the AAAH sees the FA's
and the AAAF's identities in the Route-Record list.

freeDiameter specifics this module deals with (1.2.1):

* without an ACL extension it takes CERs only from configured peers, so every AAAF and AAAH
  is a ``ConnectPeer``: the relay dials them all, and the AAAFs also dial it (RFC 6733 §5.6.4
  election keeps one connection per pair);
* Diameter over TLS as the daemons speak it (RFC 6733 §2.1, §13): TLS from the first byte on
  ``SecPort`` (5658; freeDiameter's own default is 5868), no plain listener (``Port = 0``), every
  peer dialled on 5658 without ``No_TLS`` nor ``TLS_old_method``, TLS 1.3 only (GnuTLS priority).
  Its certificate is issued by the lab's CA (``daemons.provision.pki``) for its Identity (which
  freeDiameter requires), and it trusts that CA only; it checks the certificate of each peer it
  dials against the peer's Diameter identity, and the daemons check its certificate against its
  Origin-Host;
* GnuTLS writes the TLS secrets where ``SSLKEYLOGFILE`` says (lab only, so that its links
  decode in Wireshark): :func:`command` sets it for the process when given a key log;
* it ships no RFC 4004 dictionary and needs none to relay.

Its identity is ``NODE.relay.example`` (realm ``relay.example``, a realm of its own: the AAAH
never routes its own realm's traffic to it). It has no control socket: the lab calls it healthy
once it listens on its TLS port.
"""

from __future__ import annotations

import ipaddress
import shutil
from dataclasses import dataclass
from pathlib import Path

from daemons.provision import pki

RELAY_REALM = "relay.example"
RELAY_PORT = 5658  # where it listens: Diameter over TLS ("diameters", RFC 6733 §2.1)
DIAMETER_PORT = 5658  # where it dials the daemons (they speak TLS by default)
TLS_PRIORITY = "NORMAL:-VERS-ALL:+VERS-TLS1.3"  # TLS 1.3 only, as the daemons (daemons.diameter.tls)
RECONNECT_S = 3  # TcTimer: how soon the relay re-dials a peer that went away (freeDiameter's default: 30)
EXECUTABLE = "freeDiameterd"


class RelayUnavailable(RuntimeError):
    """freeDiameterd is not installed."""


@dataclass(frozen=True)
class RelayPeer:
    """A peer the relay accepts and dials (over TLS)."""

    host: str  # Diameter identity
    address: ipaddress.IPv4Address
    port: int = DIAMETER_PORT


def identity(node: str) -> str:
    """The relay's Diameter identity."""
    return f"{node}.{RELAY_REALM}"


def command(conf: Path, keylog: Path | None = None) -> list[str]:
    """The relay's command line; with ``keylog``, GnuTLS writes its TLS secrets there (``env``
    sets ``SSLKEYLOGFILE`` for the process only: a path, no secret, on the command line)."""
    exe = shutil.which(EXECUTABLE)
    if exe is None:
        raise RelayUnavailable(f"the topology asks for a Diameter relay but {EXECUTABLE} is not installed "
                               "(Debian package freediameterd)")
    argv = [exe, "-c", str(conf)]
    if keylog is not None:
        argv = [shutil.which("env") or "/usr/bin/env", f"SSLKEYLOGFILE={keylog}", *argv]
    return argv


def write_config(directory: Path, node: str, listen: ipaddress.IPv4Address, peers: list[RelayPeer],
                 ca: pki.Authority, port: int = RELAY_PORT,
                 addresses: list[ipaddress.IPv4Address] | None = None) -> Path:
    """Write ``freeDiameter.conf`` into ``directory``, with the relay's certificate from ``ca``
    (for its identity and ``addresses``; key 0600)."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    me = identity(node)
    issued = pki.issue(ca, me, directory, ips=addresses or [listen])
    lines = [
        "# freeDiameterd as a Diameter relay in the mipvpn lab (written by daemons.provision.fdrelay)",
        f'Identity = "{me}";',
        f'Realm = "{RELAY_REALM}";',
        "Port = 0;  # no plain-TCP listener",
        f"SecPort = {port};  # Diameter over TLS from the first byte (RFC 6733 §2.1)",
        f'ListenOn = "{listen}";',
        "No_SCTP;",
        "No_IPv6;",
        f"TcTimer = {RECONNECT_S};",
        "# issued by the lab's CA for our Identity; peers must show a certificate of the same CA",
        f'TLS_Cred = "{issued.cert}", "{issued.key}";',
        f'TLS_CA = "{ca.cert_path}";',
        f'TLS_Prio = "{TLS_PRIORITY}";',
    ]
    # neither No_TLS nor TLS_old_method: TLS at connect (RFC 6733), to the peer's TLS port
    lines += [f'ConnectPeer = "{p.host}" {{ ConnectTo = "{p.address}"; Port = {p.port}; }};' for p in peers]
    conf = directory / "freeDiameter.conf"
    conf.write_text("\n".join(lines) + "\n")
    return conf

