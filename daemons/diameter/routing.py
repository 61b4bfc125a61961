"""Routing and relaying of Diameter requests (RFC 6733 §6), with public forward hooks.

:class:`Router` holds the realm routing table and sends requests: this node's own
(:meth:`Router.request`) and relayed ones (:meth:`Router.relay`: Route-Record added, a new
hop-by-hop id), tracks them until their answer comes (:class:`Pending`), sends each answer of
a relayed request back where the request came from, and remembers the answers this node
generated for duplicate detection.

* Routing of a request (own or relayed): Destination-Host when it names a peer; else the realm
  table (:meth:`Router.add_route`, in the order added), then peers whose realm is the
  Destination-Realm, else the default route (realm ``"*"``). Only OPEN peers that advertised
  the request's application (or the relay application) are used. No table entry at all: no
  route (3003); entries but none usable: unavailable (3002).
* Duplicate detection (RFC 6733 §3, §6.1): every request a peer sends is remembered by
  (the connection's peer — who :meth:`PeerTable.identify` says it is, not what the request
  claims —, Origin-Host, end-to-end id, Session-Id) with the answer it got, whether this node
  answered it or relayed it; the same request again, T flag or not, gets that answer again
  (waiting for it if the first is still being served) and is neither served nor relayed twice
  (:meth:`Router.begin`). Another peer sending the same ids gets nothing of it. At most
  ``answer_cache_size`` requests for ``answer_cache_ttl`` seconds are remembered.
* In flight: at most ``max_pending_per_peer`` requests of one peer are served or relayed at a
  time (:meth:`Router.admit`); the dispatcher answers 3004 DIAMETER_TOO_BUSY beyond.

Hooks (modelled on freeDiameter's ``fd_rt_fwd_register``), in the order added, each
optionally limited to one application and/or command code:

* A **forward hook** ``hook(request, peer) -> Message | None`` is called for every request
  this node is about to relay (not for requests it serves itself), after the duplicate, Origin
  and loop checks and before anything else: ``request`` is the request as received (hop-by-hop
  id of the incoming connection, no Route-Record for this hop yet), ``peer`` the peer it came
  from. It may change ``request`` in place (the relayed copy is made after the hooks). It
  returns None to let the request go on, or an answer to answer it instead: the node gives
  the answer the request's hop-by-hop and end-to-end ids, adds Origin-Host/Origin-Realm when
  missing, remembers it for duplicate detection and sends it back; the later hooks are not
  called and nothing is relayed.
* An **answer hook** ``hook(request, answer) -> None`` is called for every answer to a request
  this node relayed (matched by hop-by-hop and end-to-end id) before the answer goes back:
  ``request`` is the relayed request as sent (with Route-Record, next hop's hop-by-hop id),
  ``answer`` as received from the next hop. It may change ``answer`` in place. Not called for
  answers to this node's own requests, for unexpected answers, nor for the 3002 the node itself
  answers when a relayed request times out or cannot be failed over.

Hooks run on the event loop and must not block. An exception in a hook (or a forward hook
returning something that is not an answer) is logged (``hook.failed``) and counts as None.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from daemons.wire.diameter.constants import ResultCode
from daemons.wire.diameter.message import Message

from .connection import Connection, Pending
from .errors import DiameterError, DiameterNoRoute, DiameterTimeout, DiameterUnavailable
from .local import LocalNode, dest_text, hex_id, log

if TYPE_CHECKING:
    from .peer import Peer

ForwardHook = Callable[[Message, "Peer"], "Message | None"]
"""``hook(request, peer)``: a request about to be relayed; returns an answer to answer it instead."""
AnswerHook = Callable[[Message, Message], None]
"""``hook(relayed_request, answer)``: the answer to a relayed request, before it goes back."""

H = TypeVar("H", bound=Callable[..., Any])

DuplicateKey = tuple[str, str, int, str]
"""(peer, Origin-Host, end-to-end id, Session-Id) of a request, the peer as identified."""


def duplicate_key(peer: Peer, req: Message) -> DuplicateKey:
    return (peer.key, str(req.get("Origin-Host") or "").lower(), req.end_to_end, req.session_id or "")


@dataclass(eq=False)
class Remembered:
    """A request seen from a peer: its answer once there is one (``ready`` is set then, or when
    the entry is dropped without one)."""

    at: float  # time.monotonic() when the request came
    answer: Message | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    def settle(self, answer: Message | None) -> None:
        if not self.ready.is_set():
            self.answer = None if answer is None else answer.copy()
            self.ready.set()


@dataclass(frozen=True)
class Hook(Generic[H]):
    """A hook and the messages it is for (None: any application / any command)."""

    fn: H
    application_id: int | None = None
    command_code: int | None = None

    def wants(self, msg: Message) -> bool:
        return (self.application_id is None or self.application_id == msg.application_id) and (
            self.command_code is None or self.command_code == msg.command_code)

    @property
    def name(self) -> str:
        return getattr(self.fn, "__qualname__", repr(self.fn))


class Router:
    """The routing table, sending and relaying requests, and forwarding their answers."""

    def __init__(self, local: LocalNode, peers: dict[str, Peer]) -> None:
        self.local = local
        self.peers = peers  # the peer table (by lower-case host)
        self.routes: dict[str, list[str]] = {}  # realm (lower-case, "*" = default) -> peer keys
        self.forward_hooks: list[Hook[ForwardHook]] = []
        self.answer_hooks: list[Hook[AnswerHook]] = []
        self._answer_cache: OrderedDict[DuplicateKey, Remembered] = OrderedDict()
        self.inflight: Counter[str] = Counter()  # requests being served or relayed, by peer key

    # -- configuration ---------------------------------------------------------------------

    def add_route(self, realm: str, peer_host: str) -> None:
        """Route requests for ``realm`` to ``peer_host`` (tried in the order routes were added)."""
        if peer_host.lower() not in self.peers:
            raise ValueError(f"route to unknown peer {peer_host}")
        hosts = self.routes.setdefault(realm.lower(), [])
        if peer_host.lower() not in hosts:
            hosts.append(peer_host.lower())

    def add_forward_hook(self, hook: ForwardHook, *, application_id: int | None = None,
                         command_code: int | None = None) -> None:
        self.forward_hooks.append(Hook(hook, application_id, command_code))

    def add_answer_hook(self, hook: AnswerHook, *, application_id: int | None = None,
                        command_code: int | None = None) -> None:
        self.answer_hooks.append(Hook(hook, application_id, command_code))

    # -- routing and pending requests ------------------------------------------------------

    def route(self, msg: Message, exclude: Iterable[str] = ()) -> tuple[Peer | None, bool]:
        """(the peer to send ``msg`` to, whether any table entry matched its destination)."""
        excluded = set(exclude)
        app = msg.application_id
        candidates: list[Peer] = []
        dh = msg.get("Destination-Host")
        if dh and (p := self.peers.get(dh.lower())) is not None:
            candidates.append(p)
        dr = msg.get("Destination-Realm")
        if dr:
            realm = dr.lower()
            candidates += [self.peers[h] for h in self.routes.get(realm, ()) if h in self.peers]
            candidates += [p for p in self.peers.values() if p.realm.lower() == realm]
        if not candidates:
            candidates = [self.peers[h] for h in self.routes.get("*", ()) if h in self.peers]
        for p in candidates:
            if p.key not in excluded and p.is_open and p.supports(app):
                return p, True
        return None, bool(candidates)

    def send_pending(self, peer: Peer, pend: Pending) -> None:
        """Send a request to ``peer`` with a hop-by-hop id of its connection, and wait for the answer there."""
        conn = peer.conn
        assert conn is not None
        hbh = conn.next_hop_by_hop()
        while hbh in conn.pending:
            hbh = conn.next_hop_by_hop()
        pend.msg.hop_by_hop = hbh
        pend.conn = conn
        pend.tried.add(peer.key)
        conn.pending[hbh] = pend
        self.local.send(conn, pend.msg)

    def drop_pending(self, pend: Pending) -> None:
        """Stop waiting for the answer (a late one is then unexpected)."""
        if pend.timer is not None:
            pend.timer.cancel()
            pend.timer = None
        conn = pend.conn
        if conn is not None and conn.pending.get(pend.msg.hop_by_hop) is pend:
            del conn.pending[pend.msg.hop_by_hop]
        pend.conn = None

    def fail_pending(self, pend: Pending, why: str) -> None:
        """No answer will come: this node's request fails, a relayed one is answered 3002."""
        if pend.timer is not None:
            pend.timer.cancel()
        if pend.future is not None:
            if not pend.future.done():
                pend.future.set_exception(DiameterUnavailable(why))
        elif pend.origin is not None:
            req = pend.msg.copy()
            req.hop_by_hop = pend.origin_hbh
            req.retransmit = False
            ans = self.local.error_answer(req, DiameterError(ResultCode.DIAMETER_UNABLE_TO_DELIVER, why))
            self._relayed_done(pend, ans)
            self.local.send(pend.origin, ans)

    # -- this node's requests --------------------------------------------------------------

    async def request(self, msg: Message, timeout: float) -> Message:  # noqa: ASYNC109 (per-request timer)
        """Send a request of this node and return its answer (see ``DiameterNode.request``)."""
        local = self.local
        local.fill_origin(msg)
        if msg.end_to_end == 0:
            msg.end_to_end = local.next_end_to_end()
        peer, known = self.route(msg)
        if peer is None:
            what = "no usable peer" if known else "no route"
            raise DiameterNoRoute(f"{what} for {msg.name} to {dest_text(msg)}")
        fut: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        pend = Pending(msg, future=fut)
        self.send_pending(peer, pend)
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            self.drop_pending(pend)
            local.counters["timeouts"] += 1
            log.warning("request.timeout", cmd=msg.name, e2e=hex_id(msg.end_to_end), sid=msg.session_id,
                        dest=dest_text(msg))
            raise DiameterTimeout(f"no answer to {msg.name} within {timeout} s") from None
        finally:
            self.drop_pending(pend)

    # -- relaying --------------------------------------------------------------------------

    def relay(self, conn: Connection, peer: Peer, req: Message) -> bool:
        """Relay a request that came from ``peer`` on ``conn`` (after the forward hooks). True
        when it went on (its answer, or its failure, completes it), False when it was answered
        here."""
        for hook in self.forward_hooks:
            if not hook.wants(req):
                continue
            answer = self._call(hook, req, peer)
            if answer is None:
                continue
            if not isinstance(answer, Message) or answer.is_request:
                log.error("hook.failed", hook=hook.name, cmd=req.name, e2e=hex_id(req.end_to_end),
                          error=f"returned {type(answer).__name__}, not an answer")
                continue
            answer.hop_by_hop, answer.end_to_end = req.hop_by_hop, req.end_to_end
            self.local.fill_answer_origin(answer)
            self.answer(conn, req, answer)
            return False
        return self._forward(conn, peer, req)

    def _forward(self, conn: Connection, peer: Peer, req: Message) -> bool:
        fwd = req.copy()
        fwd.add("Route-Record", peer.host)
        target, known = self.route(fwd)
        if target is None:
            rc = ResultCode.DIAMETER_UNABLE_TO_DELIVER if known else ResultCode.DIAMETER_REALM_NOT_SERVED
            log.warning("request.unroutable", peer=peer.host, cmd=req.name, hbh=hex_id(req.hop_by_hop),
                        dest=dest_text(req), rc=int(rc))
            err = DiameterError(rc, f"cannot route to {dest_text(req)}")
            self.answer(conn, req, self.local.error_answer(req, err))
            return False
        pend = Pending(fwd, origin=conn, origin_hbh=req.hop_by_hop, origin_peer=peer.key,
                       remembered=self._answer_cache.get(duplicate_key(peer, req)))
        pend.timer = asyncio.get_running_loop().call_later(self.local.settings.relay_timeout, self._relay_expired, pend)
        self.local.counters["relayed"] += 1
        log.info("request.relay", cmd=req.name, sid=req.session_id, e2e=hex_id(req.end_to_end),
                 src=peer.host, dst=target.host, hbh_in=hex_id(req.hop_by_hop))
        self.send_pending(target, pend)
        return True

    def _relay_expired(self, pend: Pending) -> None:
        pend.timer = None
        self.drop_pending(pend)
        self.local.counters["timeouts"] += 1
        log.warning("relay.timeout", cmd=pend.msg.name, e2e=hex_id(pend.msg.end_to_end), sid=pend.msg.session_id)
        self.fail_pending(pend, "no answer from next hop")

    # -- answers ---------------------------------------------------------------------------

    # -- in flight and duplicates ----------------------------------------------------------

    def admit(self, peer: Peer) -> bool:
        """Take one more request of ``peer`` in (False: it has ``max_pending_per_peer`` already)."""
        if self.inflight[peer.key] >= self.local.settings.max_pending_per_peer:
            return False
        self.inflight[peer.key] += 1
        return True

    def release(self, peer_key: str) -> None:
        """One request of that peer is done (answered here or its relayed answer went back)."""
        self.inflight[peer_key] -= 1
        if self.inflight[peer_key] <= 0:
            del self.inflight[peer_key]

    def begin(self, peer: Peer, req: Message) -> Remembered | None:
        """A request from ``peer``: the earlier one it duplicates (answered, or still being
        served), or None — then it is remembered from now on, and its answer with it."""
        settings = self.local.settings
        key = duplicate_key(peer, req)
        now = time.monotonic()
        seen = self._answer_cache.get(key)
        if seen is not None and now - seen.at <= settings.answer_cache_ttl:
            return seen
        cache = self._answer_cache
        cache.pop(key, None)
        while cache and (len(cache) >= settings.answer_cache_size or now - next(iter(cache.values())).at >
                         settings.answer_cache_ttl):
            _, old = cache.popitem(last=False)
            old.settle(None)  # a duplicate still waiting for it gets nothing
        cache[key] = Remembered(now)
        return None

    def answer(self, conn: Connection, req: Message, ans: Message) -> None:
        """Send an answer this node generated for ``req``, remembering it for duplicate detection."""
        if conn.peer is not None and (seen := self._answer_cache.get(duplicate_key(conn.peer, req))) is not None:
            seen.settle(ans)
        if not self.local.send(conn, ans):
            log.warning("answer.dropped", cmd=ans.name, hbh=hex_id(ans.hop_by_hop), reason="connection closed")

    def _relayed_done(self, pend: Pending, ans: Message) -> None:
        """A relayed request is complete: its answer is remembered, its peer has one less in flight."""
        if pend.remembered is not None:
            pend.remembered.settle(ans)
            pend.remembered = None
        if pend.origin_peer is not None:
            self.release(pend.origin_peer)
            pend.origin_peer = None

    def on_answer(self, conn: Connection, ans: Message) -> None:
        """An answer from a peer: to this node's request waiting for it, or back where a relayed one came from."""
        pend = conn.pending.pop(ans.hop_by_hop, None)
        if pend is None or pend.msg.end_to_end != ans.end_to_end:
            if pend is not None:
                conn.pending[ans.hop_by_hop] = pend
            self.local.counters["unexpected_answers"] += 1
            log.warning("answer.unexpected", peer=conn.peer.host if conn.peer else "-", cmd=ans.name,
                        hbh=hex_id(ans.hop_by_hop), e2e=hex_id(ans.end_to_end))
            return
        if pend.timer is not None:
            pend.timer.cancel()
            pend.timer = None
        pend.conn = None
        if pend.future is not None:
            if not pend.future.done():
                pend.future.set_result(ans)
            return
        if pend.origin is not None:
            for hook in self.answer_hooks:
                if hook.wants(ans):
                    self._call(hook, pend.msg, ans)
            ans.hop_by_hop = pend.origin_hbh
            self._relayed_done(pend, ans)
            self.local.counters["relayed_answers"] += 1
            if not self.local.send(pend.origin, ans):
                log.warning("answer.dropped", cmd=ans.name, hbh=hex_id(ans.hop_by_hop), reason="origin gone")

    @staticmethod
    def _call(hook: Hook[Any], request: Message, arg: Peer | Message) -> Any:
        try:
            return hook.fn(request, arg)
        except Exception as exc:  # a hook's bug must not stop the relay
            log.error("hook.failed", hook=hook.name, cmd=request.name, e2e=hex_id(request.end_to_end), error=repr(exc))
            return None


__all__ = ["AnswerHook", "DuplicateKey", "ForwardHook", "Hook", "Remembered", "Router", "duplicate_key"]
