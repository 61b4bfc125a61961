"""Dispatch of the application messages a node receives (RFC 6733 §6.1): requests to this
node's handlers, registered by (application, command), or to the router to be relayed;
answers to the router.

A request goes to the handlers when it is addressed to this node: Destination-Host is this
node, or there is no Destination-Realm, or it is not proxiable, or its Destination-Realm is
one of :attr:`LocalNode.local_realms` without Destination-Host. Every other request is
relayed. Before either, a request with the T flag that duplicates one this node answered gets
the same answer again, one without Origin-Host/Origin-Realm is answered 5005, and one with
this node in its Route-Record 3005 (loop).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING

from daemons.wire.diameter.constants import APP_COMMON, ResultCode
from daemons.wire.diameter.message import Message

from .connection import Connection
from .errors import DiameterError, require
from .local import LocalNode, hex_id, log
from .routing import Router

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
        if msg.is_request:
            self.local.spawn(self._on_request(conn, peer, msg))
        else:
            self.router.on_answer(conn, msg)

    async def _on_request(self, conn: Connection, peer: Peer, req: Message) -> None:
        try:
            await self._serve(conn, peer, req)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug: answer 5012 rather than leave the peer waiting
            log.error("request.failed", peer=peer.host, cmd=req.name, hbh=hex_id(req.hop_by_hop), error=repr(e))
            err = DiameterError(ResultCode.DIAMETER_UNABLE_TO_COMPLY)
            self.router.answer(conn, req, self.local.error_answer(req, err))

    async def _serve(self, conn: Connection, peer: Peer, req: Message) -> None:
        local, router = self.local, self.router
        if req.retransmit:
            cached = router.cached_answer(req)
            if cached is not None:
                ans = cached.copy()
                ans.hop_by_hop = req.hop_by_hop
                local.counters["duplicates"] += 1
                log.info("request.duplicate", peer=peer.host, cmd=req.name, e2e=hex_id(req.end_to_end))
                local.send(conn, ans)
                return
        missing = [n for n in ("Origin-Host", "Origin-Realm") if req.find(n) is None]
        if missing:
            router.answer(conn, req, local.error_answer(req, DiameterError.missing(*missing)))
            return
        me = local.origin_host.lower()
        if any(str(a.value).lower() == me for a in req.find_all("Route-Record")):
            local.counters["loops"] += 1
            router.answer(conn, req, local.error_answer(
                req, DiameterError(ResultCode.DIAMETER_LOOP_DETECTED, "own identity in Route-Record")))
            return
        dh = req.get("Destination-Host")
        dr = req.get("Destination-Realm")
        here = (
            (dh is not None and dh.lower() == me)
            or dr is None
            or not req.proxiable
            or (dr.lower() in local.local_realms and dh is None)
        )
        if not here:
            router.relay(conn, peer, req)
            return
        await self._serve_locally(conn, peer, req)

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
