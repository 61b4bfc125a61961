"""A daemon's Diameter node from its configuration (``daemons.runtime.config``): identity, the
transport (TLS by default, ``diameter_tls``; plain TCP only when ``diameter_transport: tcp``), the
peers it dials, the peers that may connect to it (``accept_peers``), and the limits.

The one place where a role's configuration meets the engine, so that every role gets the same
checks: a wrong entry stops the daemon at start with a :class:`ConfigError` naming the field
(``aaah (aaah): accept_peers[1].addresses: ...``). Routes and handlers stay with the role.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from daemons.runtime.config import Common, ConfigError, DiameterPeer, private_file_problem
from daemons.wire.diameter.constants import DIAMETER_PORT, DIAMETER_TLS_PORT
from daemons.wire.diameter.message import MAX_MESSAGE_LENGTH

from .local import Settings, log
from .node import DiameterNode
from .tls import Tls, contexts

TRANSPORTS = ("tls", "tcp")

MIN_MESSAGE = Settings.max_frame_before_cer  # a peer must be allowed at least what a CER may be


@dataclass(frozen=True)
class Dial:
    """A peer the role dials, and the configuration field that names it (for errors)."""

    where: str
    host: str
    realm: str
    address: str
    port: int | None = None  # None: the transport's port
    sources: tuple[str, ...] = ()

    @classmethod
    def of(cls, where: str, peer: DiameterPeer) -> Dial:
        return cls(where, peer.host, peer.realm, str(peer.address), peer.port,
                   tuple(str(a) for a in peer.source_addresses))


def node_tls(config: Common, source: str) -> Tls | None:
    """The node's TLS contexts from ``diameter_transport`` / ``diameter_tls`` (None: plain TCP).

    Every file must be a readable file, the key readable by its owner only, the certificate must
    chain to nothing in particular here (the handshake checks that) but must name this node's
    ``diameter_host`` (subjectAltName DNS): its peers check exactly that."""
    if config.diameter_transport not in TRANSPORTS:
        raise ConfigError(source, "diameter_transport",
                          f"must be one of {', '.join(TRANSPORTS)}, got {config.diameter_transport!r}")
    if config.diameter_transport == "tcp":
        return None  # the engine warns at start (diameter.plaintext)
    tls = config.diameter_tls
    if tls is None:
        raise ConfigError(source, "diameter_tls", "missing: Diameter runs over TLS (ca, cert, key) unless "
                          "diameter_transport is tcp")
    for name in ("ca", "cert", "key"):
        path: Path = getattr(tls, name)
        if not path.is_file() or not os.access(path, os.R_OK):
            raise ConfigError(source, f"diameter_tls.{name}", f"{path}: not a readable file")
    problem = private_file_problem(tls.key)
    if problem is not None:
        raise ConfigError(source, "diameter_tls.key", problem)
    if tls.keylog is not None and not os.access(tls.keylog.parent, os.W_OK):
        raise ConfigError(source, "diameter_tls.keylog", f"{tls.keylog.parent}: not a writable directory")
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        probe.load_verify_locations(cafile=str(tls.ca))
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(source, "diameter_tls.ca", f"{tls.ca}: no PEM CA certificate ({exc})") from None
    try:
        probe.load_cert_chain(str(tls.cert), str(tls.key))
    except ssl.SSLError as exc:
        raise ConfigError(source, "diameter_tls.cert", f"{tls.cert} with key {tls.key}: do not load or do not match "
                          f"({exc.reason or exc})") from None
    cert = x509.load_pem_x509_certificate(tls.cert.read_bytes())
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
            .get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = []
    if config.diameter_host.lower() not in {n.lower() for n in names}:
        raise ConfigError(source, "diameter_tls.cert", f"{tls.cert} names {', '.join(names) or 'no DNS name'}, not "
                          f"this node's diameter_host {config.diameter_host}: its peers would refuse it")
    return contexts(tls.ca, tls.cert, tls.key, tls.keylog)


def default_port(tls: Tls | None) -> int:
    """RFC 6733 §2.1: Diameter over TLS on 5658 ("diameters"), over TCP on 3868."""
    return DIAMETER_PORT if tls is None else DIAMETER_TLS_PORT


def diameter_node(config: Common, *, host_ip_addresses: Iterable[str], listen_address: str | None = None,
                  listen_port: int | None = None, dial: Iterable[Dial] = (), **settings: Any) -> DiameterNode:
    """The node of ``config``'s role: it dials ``dial``, listens on ``listen_address`` (if any) for
    the peers in ``config.accept_peers``, over TLS unless configured for plain TCP; ports left None
    are the transport's. ``settings``: further engine settings (timers)."""
    source = f"{config.node} ({config.role})"
    tls = node_tls(config, source)
    port = default_port(tls)
    limits = config.diameter_limits
    if limits.max_message < MIN_MESSAGE or limits.max_message > MAX_MESSAGE_LENGTH:
        raise ConfigError(source, "diameter_limits.max_message",
                          f"must be between {MIN_MESSAGE} and {MAX_MESSAGE_LENGTH} bytes, got {limits.max_message}")
    for name in ("connections_per_source", "pending_per_peer"):
        if getattr(limits, name) < 1:
            raise ConfigError(source, f"diameter_limits.{name}", f"must be at least 1, got {getattr(limits, name)}")
    if config.accept_peers and listen_address is None:
        raise ConfigError(source, "accept_peers", f"the {config.role} does not listen for Diameter: nobody can connect")
    node = DiameterNode(config.diameter_host, config.diameter_realm, host_ip_addresses, listen_address=listen_address,
                        listen_port=port if listen_port is None else listen_port, tls=tls,
                        max_frame=limits.max_message,
                        max_connections_per_source=limits.connections_per_source,
                        max_pending_per_peer=limits.pending_per_peer, **settings)
    named: dict[str, str] = {}

    def check_name(where: str, host: str) -> None:
        if host.lower() == config.diameter_host.lower():
            raise ConfigError(source, f"{where}.host", f"{host} is this node's own Diameter identity")
        if host.lower() in named:
            raise ConfigError(source, f"{where}.host", f"peer {host} is already configured as {named[host.lower()]}")
        named[host.lower()] = where

    for d in dial:
        check_name(d.where, d.host)
        try:
            node.add_peer(d.host, d.realm, d.address, port if d.port is None else d.port, sources=d.sources)
        except ValueError as exc:
            raise ConfigError(source, d.where, str(exc)) from None
    for i, peer in enumerate(config.accept_peers):
        where = f"accept_peers[{i}]"
        check_name(where, peer.host)
        if not peer.addresses:
            raise ConfigError(source, f"{where}.addresses",
                              "at least one address (or prefix) the peer connects from is needed")
        node.add_peer(peer.host, peer.realm, sources=[str(a) for a in peer.addresses], agent=peer.agent)
    if listen_address is not None and not config.accept_peers:
        log.warning("diameter.nobody_accepted", host=config.diameter_host,
                    why="accept_peers is empty: no peer may connect (RFC 6733 §5.3)")
    return node


__all__ = ["TRANSPORTS", "Dial", "default_port", "diameter_node", "node_tls"]
