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
* it does not start without TLS credentials, even when every peer is ``No_TLS``, and the
  certificate's owner must be its Identity: a throwaway self-signed one is made per lab, next
  to the configuration in the run directory (key file mode 0600; it secures nothing);
* it ships no RFC 4004 dictionary and needs none to relay.

Its identity is ``NODE.relay.example`` (realm ``relay.example``, a realm of its own: the AAAH
never routes its own realm's traffic to it). It has no control socket: the lab calls it healthy
once it listens on its TCP port.
"""

from __future__ import annotations

import datetime
import ipaddress
import shutil
from dataclasses import dataclass
from pathlib import Path

RELAY_REALM = "relay.example"
RELAY_PORT = 3868
DIAMETER_PORT = 3868
RECONNECT_S = 3  # TcTimer: how soon the relay re-dials a peer that went away (freeDiameter's default: 30)
EXECUTABLE = "freeDiameterd"


class RelayUnavailable(RuntimeError):
    """freeDiameterd is not installed."""


@dataclass(frozen=True)
class RelayPeer:
    """A peer the relay accepts and dials (No_TLS)."""

    host: str  # Diameter identity
    address: ipaddress.IPv4Address
    port: int = DIAMETER_PORT


def identity(node: str) -> str:
    """The relay's Diameter identity."""
    return f"{node}.{RELAY_REALM}"


def command(conf: Path) -> list[str]:
    exe = shutil.which(EXECUTABLE)
    if exe is None:
        raise RelayUnavailable(f"the topology asks for a Diameter relay but {EXECUTABLE} is not installed "
                               "(Debian package freediameterd)")
    return [exe, "-c", str(conf)]


def write_config(directory: Path, node: str, listen: ipaddress.IPv4Address, peers: list[RelayPeer],
                 port: int = RELAY_PORT) -> Path:
    """Write ``freeDiameter.conf`` and its throwaway TLS credentials into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    me = identity(node)
    cert, key = write_self_signed(directory, me)
    lines = [
        "# freeDiameterd as a Diameter relay in the mipvpn lab (written by daemons.provision.fdrelay)",
        f'Identity = "{me}";',
        f'Realm = "{RELAY_REALM}";',
        f"Port = {port};",
        "SecPort = 0;  # no TLS listener",
        f'ListenOn = "{listen}";',
        "No_SCTP;",
        "No_IPv6;",
        f"TcTimer = {RECONNECT_S};",
        "# required even with No_TLS everywhere; self-signed, made for this lab only",
        f'TLS_Cred = "{cert}", "{key}";',
        f'TLS_CA = "{cert}";',
    ]
    lines += [f'ConnectPeer = "{p.host}" {{ ConnectTo = "{p.address}"; Port = {p.port}; No_TLS; }};' for p in peers]
    conf = directory / "freeDiameter.conf"
    conf.write_text("\n".join(lines) + "\n")
    return conf


def write_self_signed(directory: Path, common_name: str) -> tuple[Path, Path]:
    """A fresh P-256 key and a self-signed certificate for ``common_name`` (PEM files)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(common_name)]), critical=False)
            .sign(key, hashes.SHA256()))
    key_path, cert_path = directory / "key.pem", directory / "cert.pem"
    key_path.touch(mode=0o600)
    key_path.chmod(0o600)
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path
