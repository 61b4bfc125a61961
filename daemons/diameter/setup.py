"""A daemon's Diameter node from its configuration (``daemons.runtime.config``): identity, the
peers it dials, the peers that may connect to it (``accept_peers``), and the limits.

The one place where a role's configuration meets the engine, so that every role gets the same
checks: a wrong entry stops the daemon at start with a :class:`ConfigError` naming the field
(``aaah (aaah): accept_peers[1].addresses: ...``). Routes and handlers stay with the role.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from daemons.runtime.config import Common, ConfigError, DiameterPeer
from daemons.wire.diameter.constants import DIAMETER_PORT
from daemons.wire.diameter.message import MAX_MESSAGE_LENGTH

from .local import Settings, log
from .node import DiameterNode

MIN_MESSAGE = Settings.max_frame_before_cer  # a peer must be allowed at least what a CER may be


@dataclass(frozen=True)
class Dial:
    """A peer the role dials, and the configuration field that names it (for errors)."""

    where: str
    host: str
    realm: str
    address: str
    port: int = DIAMETER_PORT
    sources: tuple[str, ...] = ()

    @classmethod
    def of(cls, where: str, peer: DiameterPeer) -> Dial:
        return cls(where, peer.host, peer.realm, str(peer.address), peer.port,
                   tuple(str(a) for a in peer.source_addresses))


def diameter_node(config: Common, *, host_ip_addresses: Iterable[str], listen_address: str | None = None,
                  listen_port: int = DIAMETER_PORT, dial: Iterable[Dial] = (), **settings: Any) -> DiameterNode:
    """The node of ``config``'s role: it dials ``dial``, listens on ``listen_address`` (if any) for
    the peers in ``config.accept_peers``. ``settings``: further engine settings (timers)."""
    source = f"{config.node} ({config.role})"
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
                        listen_port=listen_port, max_frame=limits.max_message,
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
            node.add_peer(d.host, d.realm, d.address, d.port, sources=d.sources)
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


__all__ = ["Dial", "diameter_node"]
