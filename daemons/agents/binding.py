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

What a receiver reads of a binding message is what its authenticator covers
(:meth:`BindingPeers.authenticate`): our messages end with the authenticator, so one with
extensions after it is refused, never partly used. :class:`ReplayWindow` is every receiver's
replay protection: the RFC 5944 §5.7 timestamp check of ``wire/mip/identification.py`` plus
the last identification accepted per peer and home address, kept after the binding itself
is gone, so a captured message can be neither replayed nor re-used; a duplicate of the last
accepted message (a retransmission) is recognised and answered as before, changing nothing.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from daemons.runtime.config import PeerAgent
from daemons.runtime.log import EventLog
from daemons.runtime.net import UdpEndpoint
from daemons.wire import mip

if TYPE_CHECKING:
    from daemons.store.records import RecordStore

__all__ = ["Authentic", "BindingClient", "BindingEvents", "BindingPeers", "Fresh", "ReplayWindow", "Retransmit"]


@dataclass(frozen=True)
class Authentic:
    """A binding message that passed its peer's authenticator. ``message``: what the
    authenticator covers, the only part to read; ``trailing``: how many extensions followed
    the authenticator (not authenticated: an on-path attacker may have appended them)."""

    peer: PeerAgent
    message: mip.BindingMessage
    trailing: int


#: statuses that answer an update whose authenticator did not cover all of it (131: missing or
#: wrong; 134: something after it, or an unknown non-skippable extension): never signed
UNAUTHENTICATED_REFUSALS = frozenset({mip.BindingStatus.AUTHENTICATION_FAILED, mip.BindingStatus.POORLY_FORMED_UPDATE})


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
        checked = self.authenticate(raw, src)
        return checked.peer if checked is not None else None

    def authenticate(self, raw: bytes, src: str) -> Authentic | None:
        """``raw`` (as received from ``src``) checked against our key for that peer: the peer
        and the message as far as the authenticator covers it (see :class:`Authentic`); None
        if ``src`` is no peer of ours or the authenticator or SPI does not match."""
        peer = self.peers.get(src)
        if peer is None:
            return None
        msg = mip.authenticated(raw, mip.EXT_BINDING_AUTH, peer.key, spi=peer.spi)
        if not isinstance(msg, mip.BindingMessage):
            return None
        return Authentic(peer, msg, len(mip.decode_message(raw).extensions) - len(msg.extensions))

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
        address and identification (0 if it had none), sent back to where the update came
        from; authenticated when ``addr`` is a peer of ours and the update was wholly its
        (any status but :data:`UNAUTHENTICATED_REFUSALS`). A refusal of an update that was
        not (wholly) authentic goes unsigned: anyone can send such an update with a genuine
        one's identification, and a signed refusal of it would end the peer's transaction for
        the genuine one (:meth:`BindingClient.on_ack` takes authentic acknowledgements only)."""
        ack = mip.BindingAcknowledge(status=status, home_address=bu.home_address,
                                     identification=bu.identification or 0, lifetime=lifetime)
        peer = self.peers.get(addr[0])
        if peer is not None and int(status) not in UNAUTHENTICATED_REFUSALS:
            ack = mip.sign(ack, mip.EXT_BINDING_AUTH, peer.spi, peer.key)
        udp.send(ack.encode(), addr)
        return ack


class Fresh(enum.Enum):
    """What :meth:`ReplayWindow.check` says of a message's identification."""

    FRESH = "fresh"  # act on it, then :meth:`ReplayWindow.accept` it
    DUPLICATE = "duplicate"  # the last accepted message again, byte for byte: answer as then, change nothing
    MISSING = "missing"  # no identification at all
    CLOCK = "clock"  # its timestamp is outside the window around our clock (too old: a late replay)
    REPLAY = "replay"  # not later than the last one accepted from that peer for that key
    FULL = "full"  # a new key while ``limit`` live keys are remembered: refuse rather than forget one


@dataclass
class _Seen:
    identification: int
    digest: bytes  # of the message as received: a duplicate is the same bytes (memory only)
    answer: tuple[int, int] | None  # (status, lifetime) it was answered with (memory only)


class ReplayWindow:
    """A receiver's replay protection for binding messages, per key (the sending peer and the
    home address): an identification is acceptable when its NTP timestamp lies within
    ``window_s`` of our clock and it is later than the last one accepted for that key
    (``mip.identification_acceptable``, as the HA checks registrations, RFC 5944 §5.7).

    The record of a key outlives the binding it created (a deletion or expiry does not reopen
    the door to the last update) and goes only once the window alone refuses everything up
    to it (``mip.identification_expired``): the table holds what arrived within the last
    ``window_s`` seconds, at most ``limit`` keys. What survives a restart is the
    identifications, one record per key (:meth:`save`, :meth:`record`/:meth:`load`): no
    digests, no answers."""

    def __init__(self, window_s: float, limit: int = 4096) -> None:
        self.window_s = window_s
        self.limit = limit
        self.seen: dict[tuple[str, str], _Seen] = {}  # in order of acceptance (oldest first)
        self.forgotten: set[tuple[str, str]] = set()  # pruned since the last save (their records go)

    @staticmethod
    def digest(raw: bytes) -> bytes:
        return hashlib.sha256(raw).digest()[:16]

    def check(self, key: tuple[str, str], identification: int | None, raw: bytes,
              now: float) -> tuple[Fresh, tuple[int, int] | None]:
        """What to do with a message (``raw``, already authenticated) for ``key``; for a
        DUPLICATE also the (status, lifetime) it was answered with."""
        self.prune(now)
        last = self.seen.get(key)
        if identification is None:
            return Fresh.MISSING, None
        if last is not None and last.identification == identification and last.answer is not None \
                and last.digest == self.digest(raw):
            return Fresh.DUPLICATE, last.answer
        if not mip.identification_acceptable(None, identification, now, self.window_s):
            return Fresh.CLOCK, None
        if last is not None and not mip.identification_acceptable(last.identification, identification, now,
                                                                   self.window_s):
            return Fresh.REPLAY, None
        if last is None and len(self.seen) >= self.limit:
            return Fresh.FULL, None
        return Fresh.FRESH, None

    def accept(self, key: tuple[str, str], identification: int, raw: bytes,
               answer: tuple[int, int] | None = None) -> None:
        """Record ``identification`` as the last accepted for ``key`` (``answer``: how it was
        answered, for its duplicates; None: not answered yet, see :meth:`answered`)."""
        self.seen.pop(key, None)
        self.seen[key] = _Seen(identification, self.digest(raw), answer)

    def answered(self, key: tuple[str, str], identification: int, status: int, lifetime: int) -> None:
        """The message accepted for ``key`` with ``identification`` was answered so."""
        last = self.seen.get(key)
        if last is not None and last.identification == identification:
            last.answer = (int(status), lifetime)

    def prune(self, now: float) -> None:
        """Forget what the time window refuses anyway: from the oldest, while expired; all
        of them when the table is full."""
        for key in list(self.seen):
            if mip.identification_expired(self.seen[key].identification, now, self.window_s):
                del self.seen[key]
                self.forgotten.add(key)
            elif len(self.seen) < self.limit:
                break

    def __len__(self) -> int:
        return len(self.seen)

    def to_json(self) -> list[list[Any]]:
        return [[peer, hoa, seen.identification] for (peer, hoa), seen in self.seen.items()]

    @staticmethod
    def record_key(key: tuple[str, str]) -> str:
        """The key of one entry's record in a state store."""
        return f"{key[0]} {key[1]}"

    def save(self, store: RecordStore, section: str, key: tuple[str, str] | None = None) -> None:
        """Into ``store``: the entry of ``key`` as it stands (a record :meth:`record` reads),
        and the records of the entries pruned since the last save deleted; one commit."""
        with store.batch():
            for gone in self.forgotten:
                if gone not in self.seen:
                    store.delete(section, self.record_key(gone))
            self.forgotten.clear()
            seen = self.seen.get(key) if key is not None else None
            if key is not None and seen is not None:
                store.put(section, self.record_key(key), [key[0], key[1], seen.identification])

    @staticmethod
    def record(item: object) -> tuple[str, str, int]:
        """One entry :meth:`save` (or :meth:`to_json`) saved, checked (a builder for
        ``RecordStore.load_records``: raises TypeError for an entry that is not one)."""
        if isinstance(item, list) and len(item) == 3 and all(isinstance(x, str) for x in item[:2]) \
                and type(item[2]) is int and 0 <= item[2] < 1 << 64:
            return item[0], item[1], item[2]
        raise TypeError("not a [peer, home address, identification] entry")

    def load(self, entries: Iterable[tuple[str, str, int]], now: float) -> None:
        """The identifications :meth:`save` saved (each checked by :meth:`record`); what has
        expired meanwhile is dropped (and its record deleted at the next :meth:`save`)."""
        for peer, hoa, identification in entries:
            self.seen[(peer, hoa)] = _Seen(identification, b"", None)
        self.prune(now)


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
