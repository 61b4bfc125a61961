"""Dispatch of the application messages a node receives (RFC 6733 §6.1): requests to this
node's handlers, registered by (application, command), or to the router to be relayed;
answers to the router.

A request goes to the handlers when it is addressed to this node: Destination-Host is this
node, or there is no Destination-Realm, or it is not proxiable, or its Destination-Realm is
one of :attr:`LocalNode.local_realms` without Destination-Host. Every other request is
relayed. Before either, in this order:

* a peer with ``max_pending_per_peer`` requests in flight gets 3004 DIAMETER_TOO_BUSY (checked
  before a task is made for the request);
* a duplicate of a request of the same peer (T flag or not: same Origin-Host, end-to-end id and
  Session-Id) gets the first one's answer again, once there is one, and runs nothing;
* a request without Origin-Host/Origin-Realm is answered 5005;
* a request from a peer that is not an agent must be its own: Origin-Host its identity,
  Origin-Realm its realm, else 5004 DIAMETER_INVALID_AVP_VALUE naming that AVP (only an agent
  — an AAAF, a relay — forwards requests of others);
* a request with this node in its Route-Record is answered 3005 (loop).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING

from daemons.wire.diameter.constants import APP_COMMON, ResultCode
from daemons.wire.diameter.message import Message

from .connection import Connection
from .errors import DiameterError, require
from .local import LocalNode, hex_id, log
from .routing import Remembered, Router

if TYPE_CHECKING:
    from .peer import Peer

Handler = Callable[[Message, "Peer"], Awaitable[Message]]
"""``handler(request, peer)`` returns the answer (see ``DiameterNode.register_handler``)."""


class Dispatcher:
    """The handlers of one node and the decision, per request, between them and the router."""

    def __init__(self, local: LocalNode, router: Router) -> None:
        self.local = local
        self.router = router
        self.handlers: dict[tuple[int, int], Handler] = {}
        self.required: dict[tuple[int, int], tuple[str, ...]] = {}

    def register(self, application_id: int, command_code: int, handler: Handler, required: Iterable[str] = ()) -> None:
        self.handlers[(application_id, command_code)] = handler
        self.required[(application_id, command_code)] = tuple(required)
        self.local.applications.add(application_id)

    def receive(self, conn: Connection, peer: Peer, msg: Message) -> None:
        """An application message from an open peer (the peer table's ``deliver``)."""
        if not msg.is_request:
            self.router.on_answer(conn, msg)
            return
        if not self.router.admit(peer):
            self.local.counters["too_busy"] += 1
            limit = self.local.settings.max_pending_per_peer
            log.warning("request.too_busy", peer=peer.host, cmd=msg.name, hbh=hex_id(msg.hop_by_hop),
                        e2e=hex_id(msg.end_to_end), in_flight=limit)
            err = DiameterError(ResultCode.DIAMETER_TOO_BUSY, f"{limit} requests of this peer in flight")
            self.local.send(conn, self.local.error_answer(msg, err))
            return
        self.local.spawn(self._on_request(conn, peer, msg))

    async def _on_request(self, conn: Connection, peer: Peer, req: Message) -> None:
        relayed = False
        try:
            relayed = await self._serve(conn, peer, req)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug: answer 5012 rather than leave the peer waiting
            log.error("request.failed", peer=peer.host, cmd=req.name, hbh=hex_id(req.hop_by_hop), error=repr(e))
            err = DiameterError(ResultCode.DIAMETER_UNABLE_TO_COMPLY)
            self.router.answer(conn, req, self.local.error_answer(req, err))
        finally:
            if not relayed:  # a relayed request is released when its answer goes back
                self.router.release(peer.key)

    async def _serve(self, conn: Connection, peer: Peer, req: Message) -> bool:
        """Serve, relay or refuse one request; True when it was relayed (and is still in flight)."""
        local, router = self.local, self.router
        seen = router.begin(peer, req)
        if seen is not None:
            await self._answer_duplicate(conn, peer, req, seen)
            return False
        missing = [n for n in ("Origin-Host", "Origin-Realm") if req.find(n) is None]
        if missing:
            router.answer(conn, req, local.error_answer(req, DiameterError.missing(*missing)))
            return False
        if not peer.agent and not peer.dynamic:
            for name, own in (("Origin-Host", peer.host), ("Origin-Realm", peer.realm)):
                claimed = str(req.get(name))
                if claimed.lower() != own.lower():
                    local.counters["origin_mismatch"] += 1
                    log.warning("request.origin_mismatch", peer=peer.host, cmd=req.name, e2e=hex_id(req.end_to_end),
                                avp=name, claimed=claimed, own=own)
                    err = DiameterError(ResultCode.DIAMETER_INVALID_AVP_VALUE, f"{name} is not the peer's own",
                                        failed_avp=[req.find(name)])
                    router.answer(conn, req, local.error_answer(req, err))
                    return False
        me = local.origin_host.lower()
        if any(str(a.value).lower() == me for a in req.find_all("Route-Record")):
            local.counters["loops"] += 1
            router.answer(conn, req, local.error_answer(
                req, DiameterError(ResultCode.DIAMETER_LOOP_DETECTED, "own identity in Route-Record")))
            return False
        dh = req.get("Destination-Host")
        dr = req.get("Destination-Realm")
        here = (
            (dh is not None and dh.lower() == me)
            or dr is None
            or not req.proxiable
            or (dr.lower() in local.local_realms and dh is None)
        )
        if not here:
            return router.relay(conn, peer, req)
        await self._serve_locally(conn, peer, req)
        return False

    async def _answer_duplicate(self, conn: Connection, peer: Peer, req: Message, seen: Remembered) -> None:
        """The same request again from the same peer: the first one's answer, nothing run again."""
        self.local.counters["duplicates"] += 1
        log.info("request.duplicate", peer=peer.host, cmd=req.name, e2e=hex_id(req.end_to_end), sid=req.session_id,
                 flags="T" if req.retransmit else None, answered=seen.ready.is_set())
        if not seen.ready.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(seen.ready.wait(), self.local.settings.relay_timeout)
        if seen.answer is None:
            log.warning("request.duplicate.unanswered", peer=peer.host, cmd=req.name, e2e=hex_id(req.end_to_end))
            return
        ans = seen.answer.copy()
        ans.hop_by_hop = req.hop_by_hop
        self.local.send(conn, ans)

    async def _serve_locally(self, conn: Connection, peer: Peer, req: Message) -> None:
        key = (req.application_id, req.command_code)
        handler = self.handlers.get(key)
        if handler is None:
            if req.application_id == APP_COMMON or any(a == req.application_id for a, _ in self.handlers):
                err = DiameterError(ResultCode.DIAMETER_COMMAND_UNSUPPORTED, f"command {req.command_code}")
            else:
                err = DiameterError(ResultCode.DIAMETER_APPLICATION_UNSUPPORTED, f"application {req.application_id}")
            self.router.answer(conn, req, self.local.error_answer(req, err))
            return
        unknown = req.unknown_mandatory()
        if unknown:
            err = DiameterError(ResultCode.DIAMETER_AVP_UNSUPPORTED, failed_avp=[unknown[0]])
            self.router.answer(conn, req, self.local.error_answer(req, err))
            return
        try:
            require(req, *self.required.get(key, ()))
            ans = await handler(req, peer)
            if not isinstance(ans, Message) or ans.is_request:
                raise TypeError(f"handler returned {type(ans).__name__}, not an answer")
        except DiameterError as e:
            ans = self.local.error_answer(req, e)
        ans.hop_by_hop, ans.end_to_end = req.hop_by_hop, req.end_to_end
        self.local.fill_answer_origin(ans)
        self.router.answer(conn, req, ans)


__all__ = ["Dispatcher", "Handler"]
