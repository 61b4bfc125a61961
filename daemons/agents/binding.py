"""The Binding Update transaction (route optimisation and smooth handoff, docs/protocol.md),
one piece for the three agents that exchange binding messages:

* the new FA tells the previous FA that the MN moved on (F6), :mod:`daemons.agents.fa`;
* the HA gives a dynamic CN-GW its path to the FA, and answers the CN-GW's Binding Request
  the same way (F4, F5, F8), :mod:`daemons.agents.ha`;
* the CN-GW checks and acknowledges the HA's updates and sends it Binding Requests,
  :mod:`daemons.agents.cngw`.

:class:`BindingPeers` holds an agent's binding security associations (peer address -> SPI +
key; extension 34, HMAC-MD5) and does what every side does with them: sign and send a
message, authenticate one received, answer a Binding Update. :class:`BindingClient` is the
sending side's transaction: a Binding Update with the A flag goes out, is retransmitted on
the :class:`Retransmit` schedule until the Binding Acknowledge with the same identification
arrives from that peer, authenticated, or the last wait runs out. What differs between the
agents (the schedule, a new identification per try or the same update again, counters, the
fields of the log lines) are parameters; the messages are built by the caller.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from daemons.runtime.config import PeerAgent
from daemons.runtime.log import EventLog
from daemons.runtime.net import UdpEndpoint
from daemons.wire import mip

__all__ = ["BindingClient", "BindingEvents", "BindingPeers", "Retransmit"]


class BindingPeers:
    """One agent's binding security associations, by peer address (e.g. the FA's neighbouring
    FAs, the HA's dynamic CN-GWs, the CN-GW's home agents), and the messages sent and checked
    with them. ``port``: where the peers listen (UDP 434)."""

    def __init__(self, peers: Mapping[str, PeerAgent], port: int = mip.MIP_UDP_PORT) -> None:
        self.peers = peers
        self.port = port

    def __contains__(self, address: object) -> bool:
        return address in self.peers

    def authentic(self, raw: bytes, src: str) -> PeerAgent | None:
        """The peer ``raw`` (as received from ``src``) is authenticated by; None if ``src`` is
        no peer of ours or the authenticator or SPI does not match."""
        peer = self.peers.get(src)
        if peer is None or not mip.verify(raw, mip.EXT_BINDING_AUTH, peer.key, spi=peer.spi):
            return None
        return peer

    def sign(self, msg: mip.BindingMessage, address: str) -> bytes:
        """``msg`` with our authenticator for the peer at ``address`` (KeyError: no such peer)."""
        peer = self.peers[address]
        return mip.sign(msg, mip.EXT_BINDING_AUTH, peer.spi, peer.key).encode()

    def send(self, udp: UdpEndpoint, msg: mip.BindingMessage, address: str) -> None:
        """Sign ``msg`` for the peer at ``address`` and send it there (no answer awaited)."""
        udp.send(self.sign(msg, address), (address, self.port))

    def acknowledge(self, udp: UdpEndpoint, bu: mip.BindingUpdate, status: mip.BindingStatus | int,
                    addr: tuple[str, int], lifetime: int) -> mip.BindingAcknowledge:
        """Answer ``bu`` (received from ``addr``) with a Binding Acknowledge echoing its home
        address and identification (0 if it had none); authenticated when ``addr`` is a peer
        of ours (also after a failed check: the sender learns why with a message it can
        trust), sent back to where the update came from."""
        ack = mip.BindingAcknowledge(status=status, home_address=bu.home_address,
                                     identification=bu.identification or 0, lifetime=lifetime)
        peer = self.peers.get(addr[0])
        if peer is not None:
            ack = mip.sign(ack, mip.EXT_BINDING_AUTH, peer.spi, peer.key)
        udp.send(ack.encode(), addr)
        return ack


@dataclass(frozen=True)
class Retransmit:
    """When a Binding Update goes out again: try ``i`` waits ``waits[i]`` seconds for its
    acknowledgement (as many tries as waits). ``fresh_identification``: every try is a new
    update with a new identification, so an acknowledgement of an earlier try no longer
    counts (the FA's F6 update); otherwise the same signed update goes out again and an
    acknowledgement of any try counts (the HA's)."""

    waits: tuple[float, ...]
    fresh_identification: bool = False

    @classmethod
    def backoff(cls, first: float, tries: int, ceiling: float = math.inf,
                fresh_identification: bool = False) -> Retransmit:
        """``first``, doubling with every try up to ``ceiling``."""
        return cls(tuple(min(first * 2**i, ceiling) for i in range(tries)), fresh_identification)


@dataclass(frozen=True)
class BindingEvents:
    """What one agent's transaction log lines and counters say (each agent keeps the lines
    and counters it always had: operators, tests and the benchmarks read them).

    Log lines: ``bu.sent`` (mn, the peer, the caller's fields, id, attempt), ``ba.received``
    (mn, the peer, status[, lifetime]), ``bu.unacknowledged`` (mn, the peer[, id]) and
    ``ba.rejected`` (src, id) for an acknowledgement nobody waits for or that is not
    authentic."""

    peer: str = "to"  # the field naming the peer in bu.sent and bu.unacknowledged
    ack_peer: str = "src"  # ... in ba.received
    ack_lifetime: bool = False  # ba.received names the lifetime granted; a refusal logs at WARNING
    unacknowledged_id: bool = False  # bu.unacknowledged names the identification
    sent_counter: str | None = None  # counted per Binding Update sent (each try)
    ack_counter: str | None = None  # counted per authentic acknowledgement someone waited for


class BindingClient:
    """The Binding Update transaction of one agent: :meth:`update` sends and waits, the
    agent's datagram handler passes every Binding Acknowledge to :meth:`on_ack`."""

    def __init__(self, peers: BindingPeers, log: EventLog, counters: dict[str, int],
                 events: BindingEvents | None = None) -> None:
        self.peers = peers
        self.log = log
        self.counters = counters
        self.events = events or BindingEvents()
        self.waiting: dict[tuple[str, int], asyncio.Future[mip.BindingAcknowledge]] = {}

    async def update(self, udp: UdpEndpoint, peer: str, build: Callable[[int], mip.BindingUpdate],
                     retransmit: Retransmit, mn: str | None, **fields: Any) -> mip.BindingAcknowledge | None:
        """Send ``build(identification)`` (a Binding Update with the A flag, unsigned) to the
        peer at address ``peer``, signed with our key for it, and wait for its acknowledgement,
        retransmitting on ``retransmit``'s schedule. Returns the acknowledgement (whatever
        its status), None after the last wait. ``mn`` and ``fields`` go into ``bu.sent``."""
        ev = self.events
        ident: int | None = None
        wire = b""
        waiter: asyncio.Future[mip.BindingAcknowledge] | None = None
        try:
            for attempt, wait in enumerate(retransmit.waits, 1):
                if ident is None or retransmit.fresh_identification:
                    if ident is not None:  # the previous try's acknowledgement no longer counts
                        self.waiting.pop((peer, ident), None)
                    ident = mip.ntp_identification(time.time())  # RFC 5944 §5.7: the NTP timestamp of now
                    wire = self.peers.sign(build(ident), peer)
                    waiter = asyncio.get_running_loop().create_future()
                    self.waiting[(peer, ident)] = waiter
                assert waiter is not None
                udp.send(wire, (peer, self.peers.port))
                if ev.sent_counter:
                    self.counters[ev.sent_counter] += 1
                self.log.info("bu.sent", mn=mn, **{ev.peer: peer}, **fields, id=hex(ident), attempt=attempt)
                try:
                    ack = await asyncio.wait_for(asyncio.shield(waiter), wait)
                except TimeoutError:
                    continue
                if ev.ack_lifetime:
                    self.log.event("ba.received", mn=mn, **{ev.ack_peer: peer}, status=int(ack.status),
                                   lifetime=ack.lifetime, level=logging.INFO if ack.accepted else logging.WARNING)
                else:
                    self.log.info("ba.received", mn=mn, **{ev.ack_peer: peer}, status=int(ack.status))
                return ack
        finally:
            if ident is not None:
                self.waiting.pop((peer, ident), None)
        self.log.warning("bu.unacknowledged", mn=mn, **{ev.peer: peer},
                         **({"id": hex(ident)} if ev.unacknowledged_id and ident is not None else {}))
        return None

    def on_ack(self, ack: mip.BindingAcknowledge, raw: bytes, addr: tuple[str, int]) -> None:
        """A Binding Acknowledge (``raw`` as received from ``addr``): it ends the transaction
        waiting for its identification with that peer if it is authentic; otherwise it is
        counted (``malformed``, as every agent counts a datagram it cannot use), logged and
        ignored."""
        waiter = self.waiting.get((addr[0], ack.identification))
        if waiter is None or self.peers.authentic(raw, addr[0]) is None:
            self.counters["malformed"] += 1
            self.log.warning("ba.rejected", src=addr[0], id=hex(ack.identification))
            return
        if self.events.ack_counter:
            self.counters[self.events.ack_counter] += 1
        if not waiter.done():
            waiter.set_result(ack)
