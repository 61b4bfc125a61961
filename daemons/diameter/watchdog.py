"""The watchdog of every open peer connection and the failover of its pending requests
(RFC 3539, RFC 6733 §5.5).

Every message from an open peer restarts its timer Tw (jittered); when it runs out a DWR is
sent; a second Tw without any message turns the peer SUSPECT (no new requests are routed to
it) and its pending requests are failed over; a third closes the connection. A message in
SUSPECT brings the peer back to OPEN.

Failover (also when a connection closes or the peer sends DPR): each pending request is
re-sent, with the T flag, to another route for its destination that it has not been sent to
yet; without one, a request of this node fails with :class:`DiameterUnavailable` and a relayed
one is answered 3002.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import TYPE_CHECKING

from daemons.wire.diameter.message import Message

from .connection import Connection
from .local import LocalNode, hex_id, log
from .peer import Peer, PeerState

if TYPE_CHECKING:
    from .routing import Router


class Watchdog:
    """DWR/DWA and the OPEN/SUSPECT/down transitions of one node's peers, and failover."""

    def __init__(self, local: LocalNode, router: Router) -> None:
        self.local = local
        self.router = router

    def interval(self, peer: Peer) -> float:
        """Tw for ``peer`` (its own or the node's), with a jitter of ±2 s at most (RFC 3539 §3.4.1)."""
        tw = peer.watchdog_interval or self.local.settings.watchdog_interval
        jitter = min(2.0, tw / 10)
        return max(0.01, tw + random.uniform(-jitter, jitter))

    def arm(self, peer: Peer, conn: Connection) -> None:
        """(Re)start the timer of ``peer``'s connection."""
        conn.watchdog_deadline = time.monotonic() + self.interval(peer)

    def heard(self, peer: Peer, conn: Connection) -> None:
        """Any message from ``peer`` on its connection: restart the timer; SUSPECT -> OPEN."""
        self.arm(peer, conn)
        if peer.state is PeerState.SUSPECT:
            peer.state = PeerState.OPEN
            peer.opened.set()
            log.info("peer.recovered", peer=peer.host)

    def receive(self, conn: Connection, peer: Peer, msg: Message) -> None:
        """A DWR (answered with a DWA) or a DWA from an open peer."""
        if msg.is_request:
            peer.note_origin_state_id(msg)
            peer.last_watchdog = time.time()
            self.local.send(conn, self.local.base_answer(msg, [("Origin-State-Id", self.local.origin_state_id)]))
        else:
            conn.dwr_outstanding = False
            peer.last_watchdog = time.time()
            peer.note_origin_state_id(msg)

    async def watch(self, peer: Peer, conn: Connection) -> bool:
        """Run while ``conn`` is ``peer``'s open connection. True: the peer is down, close it."""
        local = self.local
        while not conn.is_closed and peer.conn is conn:
            wait = conn.watchdog_deadline - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            if peer.state is PeerState.OPEN and not conn.dwr_outstanding:
                self.send_dwr(conn)
            elif peer.state is PeerState.OPEN:
                peer.state = PeerState.SUSPECT
                peer.opened.clear()
                local.counters["watchdog_suspect"] += 1
                log.warning("peer.suspect", peer=peer.host, pending=len(conn.pending))
                self.failover(conn, "watchdog suspect")
            elif peer.state is PeerState.SUSPECT:
                local.counters["watchdog_down"] += 1
                log.warning("peer.down", peer=peer.host, reason="watchdog")
                return True
            else:
                return False
            self.arm(peer, conn)
        return False

    def send_dwr(self, conn: Connection) -> None:
        """Send a DWR on ``conn`` (its DWA, like any message, restarts the peer's timer)."""
        local = self.local
        dwr = Message.request("DWR", [("Origin-Host", local.origin_host), ("Origin-Realm", local.origin_realm),
                                      ("Origin-State-Id", local.origin_state_id)], end_to_end=local.next_end_to_end())
        dwr.hop_by_hop = conn.next_hop_by_hop()
        conn.dwr_outstanding = True
        local.send(conn, dwr)

    def failover(self, conn: Connection, reason: str) -> None:
        """Move every request pending on ``conn`` to an alternate peer, or fail it."""
        router = self.router
        pendings = list(conn.pending.values())
        conn.pending.clear()
        for pend in pendings:
            pend.conn = None
            if pend.future is not None and pend.future.done():
                continue
            peer, _known = router.route(pend.msg, exclude=pend.tried)
            if peer is not None and not self.local.stopping:
                pend.msg.retransmit = True
                self.local.counters["failovers"] += 1
                log.warning("request.failover", cmd=pend.msg.name, e2e=hex_id(pend.msg.end_to_end),
                            sid=pend.msg.session_id, to=peer.host, reason=reason)
                router.send_pending(peer, pend)
                continue
            log.warning("request.undeliverable", cmd=pend.msg.name, e2e=hex_id(pend.msg.end_to_end),
                        sid=pend.msg.session_id, reason=reason)
            router.fail_pending(pend, f"{reason}, no alternate peer")


__all__ = ["Watchdog"]
