"""A Diameter node on asyncio TCP (RFC 6733 base protocol, RFC 3539 watchdog).

Pure protocol: peers, capabilities exchange, watchdog, disconnect, routing, relaying,
failover and dispatch of requests to handlers. No Mobile IP logic.

    node = DiameterNode("aaaf1.visit-a.example", "visit-a.example", ["198.18.1.2"],
                        listen_address="198.18.1.2")
    node.add_peer("aaah.home.example", "home.example", "198.18.0.2")   # we dial it
    node.add_route("home.example", "aaah.home.example")
    node.register_handler(2, 260, handle_amr)                          # async (req, peer) -> answer
    await node.start()
    ama = await node.request(amr, timeout=5)
    ...
    await node.stop()                                                  # DPR/DPA with every peer

Design notes (see also the report in docs/ when it exists):

* Connection set-up: configure dialling on one side only (FA -> AAAF -> AAAH -> HA); the
  other side adds the peer without an address (or accepts unknown peers). A dialled peer is
  never dialled while it has a connection. If both sides dial anyway, the RFC 6733 §5.6.4
  election keeps one connection: the higher Origin-Host keeps the connection it accepted
  (4003 DIAMETER_ELECTION_LOST for the other CER, or the later-opened duplicate is closed).
  A peer that comes back over a new incoming connection (e.g. after a restart, before our
  watchdog noticed) replaces its old incoming connection.
* Unknown peers (not added with :meth:`DiameterNode.add_peer`) may connect when
  ``accept_unknown_peers`` is true (default); otherwise their CER is answered with 3010.
* Routing of a request (own or relayed): Destination-Host when it names an OPEN peer; else
  the realm table (:meth:`add_route`, in the order added), then peers whose realm is the
  Destination-Realm, else the default route. Only OPEN peers that advertised the request's
  application (or the relay application) are used. No table entry at all: no route (3003);
  entries but none usable: unavailable (3002).
* Requests for one of :attr:`local_realms` without Destination-Host, for Destination-Host =
  us, or without Destination-Realm (non-proxiable) go to the handlers; others are relayed
  with Route-Record added (the peer they came from) and a new hop-by-hop id.
* Failover (RFC 6733 §5.5.4, RFC 3539): when a connection closes or its watchdog turns
  SUSPECT, the requests pending on it are re-sent with the T flag to another route for
  their destination that has not been tried; without one, local requests fail with
  :class:`DiameterUnavailable` and relayed ones are answered 3002.
* Duplicate detection: answers this node generated are cached by (Origin-Host, end-to-end
  id); a request with the T flag that matches one gets the cached answer again.
* Hooks on relayed requests (modelled on freeDiameter's ``fd_rt_fwd_register``), in the
  order added, each optionally limited to one application and/or command code:
  a forward hook ``hook(request, peer) -> Message | None`` (:meth:`add_forward_hook`) is
  called for every request about to be relayed, after the duplicate, Origin and loop checks:
  ``request`` as received (incoming hop-by-hop id, no Route-Record for this hop yet), ``peer``
  the peer it came from. It may change ``request`` in place (the relayed copy is made after
  the hooks) and returns None to let it go on, or an answer to answer it instead (the node
  gives it the request's ids, adds Origin-Host/Origin-Realm when missing, caches it for
  duplicates and sends it back; later hooks are not called, nothing is relayed).
  An answer hook ``hook(relayed_request, answer)`` (:meth:`add_answer_hook`) is called for
  every answer to a relayed request before it goes back (not for answers to this node's own
  requests, unexpected answers, or the 3002 the node makes itself); it may change ``answer``.
  Hooks must not block; an exception in one is logged (``hook.failed``) and counts as None.
  :meth:`observe` and :meth:`intercept` are hooks for one command.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import random
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from daemons.runtime.log import EventLog
from daemons.wire.diameter.avp import Avp
from daemons.wire.diameter.constants import (
    APP_COMMON,
    APP_RELAY,
    DIAMETER_PORT,
    FLAG_ERROR,
    FLAG_PROXIABLE,
    VENDOR_MIPVPN,
    DisconnectCause,
    ResultCode,
    is_protocol_error,
)
from daemons.wire.diameter.datatypes import AvpType
from daemons.wire.diameter.errors import DecodeError
from daemons.wire.diameter.message import Header, Identifiers, Message

from .peer import Connection, FramingError, Peer, PeerState, Pending

log = EventLog("daemons.diameter")

CMD_CER = 257
CMD_DWR = 280
CMD_DPR = 282
BASE_COMMANDS = frozenset({CMD_CER, CMD_DWR, CMD_DPR})

Handler = Callable[[Message, Peer], Awaitable[Message]]
ForwardHook = Callable[[Message, Peer], "Message | None"]
"""``hook(request, peer)``: a request about to be relayed; returns an answer to answer it instead."""
AnswerHook = Callable[[Message, Message], None]
"""``hook(relayed_request, answer)``: the answer to a relayed request, before it goes back."""

H = TypeVar("H", bound=Callable[..., Any])


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


# -- exceptions ----------------------------------------------------------------------------------


class DiameterUnavailable(Exception):
    """A request could not be delivered or answered (no route, peer down, timeout)."""


class DiameterNoRoute(DiameterUnavailable):
    """No peer in the routing table for the request's destination (or none usable)."""


class DiameterTimeout(DiameterUnavailable, TimeoutError):
    """No answer within the request's timeout."""


class DiameterError(Exception):
    """Raised by a handler to answer with an error::

        raise DiameterError(ResultCode.DIAMETER_MISSING_AVP, failed_avp=["User-Name"])
        raise DiameterError.missing("User-Name")

    ``failed_avp`` is a list of AVPs (or ``(name, value)`` pairs, or bare names for which a
    zero-valued example AVP is built, as RFC 6733 §7.5 asks for missing AVPs). The node puts
    them into one Failed-AVP, adds Error-Message if given, and sets the E bit for 3xxx.
    """

    def __init__(
        self,
        result_code: int,
        message: str | None = None,
        *,
        failed_avp: Iterable[Avp | tuple[str, Any] | str] = (),
    ) -> None:
        super().__init__(message or f"Diameter error {int(result_code)}")
        self.result_code = int(result_code)
        self.error_message = message
        self.failed_avp: list[Avp] = [example_avp(a) if isinstance(a, str) else _mk(a) for a in failed_avp]

    @classmethod
    def missing(cls, *names: str) -> DiameterError:
        """5005 DIAMETER_MISSING_AVP with an example of each missing AVP in Failed-AVP."""
        return cls(ResultCode.DIAMETER_MISSING_AVP, f"missing AVP: {', '.join(names)}", failed_avp=names)


def _mk(a: Avp | tuple[str, Any]) -> Avp:
    return a if isinstance(a, Avp) else Avp.new(a[0], a[1])


_ZERO: dict[AvpType, Any] = {
    AvpType.OCTET_STRING: b"",
    AvpType.INTEGER32: 0,
    AvpType.INTEGER64: 0,
    AvpType.UNSIGNED32: 0,
    AvpType.UNSIGNED64: 0,
    AvpType.FLOAT32: 0.0,
    AvpType.FLOAT64: 0.0,
    AvpType.GROUPED: [],
    AvpType.ADDRESS: ipaddress.IPv4Address(0),
    AvpType.UTF8STRING: "",
    AvpType.DIAMETER_IDENTITY: "",
    AvpType.DIAMETER_URI: "",
    AvpType.ENUMERATED: 0,
    AvpType.IP_FILTER_RULE: "",
    AvpType.IP_PREFIX: ipaddress.IPv4Network("0.0.0.0/0"),
}


def example_avp(name: str) -> Avp:
    """An AVP ``name`` with a zero-filled value of its type (for Failed-AVP of 5005)."""
    from daemons.wire.diameter.dictionary import DICTIONARY

    d = DICTIONARY.avp_by_name(name)
    if d.dtype is AvpType.TIME:
        from daemons.wire.diameter.datatypes import TIME_MIN

        return Avp.new(name, TIME_MIN)
    return Avp.new(name, _ZERO[d.dtype])


def require(request: Message, *names: str) -> None:
    """Raise :class:`DiameterError` 5005 (with Failed-AVP) unless every AVP in ``names`` is present."""
    missing = [n for n in names if request.find(n) is None]
    if missing:
        raise DiameterError.missing(*missing)


def _hex(v: int) -> str:
    return f"0x{v:08x}"


# -- the node ------------------------------------------------------------------------------------


class DiameterNode:
    """A Diameter peer, agent and server on asyncio TCP. See the module docstring."""

    def __init__(
        self,
        origin_host: str,
        origin_realm: str,
        host_ip_addresses: Iterable[str] = (),
        applications: Iterable[int] = (2,),
        product_name: str = "mipvpn",
        vendor_id: int = VENDOR_MIPVPN,
        *,
        listen_address: str | None = None,
        listen_port: int = DIAMETER_PORT,
        watchdog_interval: float = 30.0,
        reconnect_min: float = 1.0,
        reconnect_max: float = 30.0,
        connect_timeout: float = 5.0,
        cea_timeout: float = 5.0,
        cer_timeout: float = 5.0,
        dpa_timeout: float = 2.0,
        relay_timeout: float = 30.0,
        accept_unknown_peers: bool = True,
        origin_state_id: int | None = None,
        answer_cache_size: int = 1024,
    ) -> None:
        self.origin_host = origin_host
        self.origin_realm = origin_realm
        self.host_ip_addresses = [ipaddress.ip_address(a) for a in host_ip_addresses]
        self.applications: set[int] = set(applications)
        self.product_name = product_name
        self.vendor_id = vendor_id
        self.listen_address = listen_address
        self.listen_port = listen_port
        self.watchdog_interval = watchdog_interval
        self.reconnect_min = reconnect_min
        self.reconnect_max = reconnect_max
        self.connect_timeout = connect_timeout
        self.cea_timeout = cea_timeout
        self.cer_timeout = cer_timeout
        self.dpa_timeout = dpa_timeout
        self.relay_timeout = relay_timeout
        self.accept_unknown_peers = accept_unknown_peers
        self.origin_state_id = int(time.time()) & 0xFFFFFFFF if origin_state_id is None else origin_state_id
        self.local_realms: set[str] = {origin_realm.lower()}

        self.peers: dict[str, Peer] = {}  # by lower-case host
        self.routes: dict[str, list[str]] = {}  # realm (lower-case, "*" = default) -> peer keys
        self.handlers: dict[tuple[int, int], Handler] = {}
        self.required: dict[tuple[int, int], tuple[str, ...]] = {}
        self.counters: Counter[str] = Counter()
        self.result_codes_sent: Counter[int] = Counter()
        self.result_codes_received: Counter[int] = Counter()
        self.forward_hooks: list[Hook[ForwardHook]] = []
        self.answer_hooks: list[Hook[AnswerHook]] = []

        self._ids = Identifiers()  # end-to-end ids: unique per node
        self._server: asyncio.Server | None = None
        self._conns: set[Connection] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._answer_cache: OrderedDict[tuple[str, int], Message] = OrderedDict()
        self._answer_cache_size = answer_cache_size
        self._running = False
        self._stopping = False

    # -- configuration ---------------------------------------------------------------------

    def add_peer(
        self,
        host: str,
        realm: str,
        address: str | None = None,
        port: int = DIAMETER_PORT,
        *,
        connect: bool | None = None,
        watchdog_interval: float | None = None,
    ) -> Peer:
        """Add a peer; with an ``address`` (and ``connect`` not False) the node dials it.

        The peer's realm is routed to it implicitly (after explicit :meth:`add_route` entries).
        """
        if host.lower() == self.origin_host.lower():
            raise ValueError("a node cannot be its own peer")
        if host.lower() in self.peers:
            raise ValueError(f"peer {host} already configured")
        if connect is None:
            connect = address is not None
        if connect and address is None:
            raise ValueError(f"peer {host}: connect needs an address")
        peer = Peer(host, realm, address, port, connect=connect, watchdog_interval=watchdog_interval)
        self.peers[peer.key] = peer
        if self._running and connect:
            self._start_dialler(peer)
        return peer

    def add_route(self, realm: str, peer_host: str) -> None:
        """Route requests for ``realm`` to ``peer_host`` (tried in the order routes were added).

        ``realm="*"`` is the default route (see also :meth:`add_default_route`).
        """
        if peer_host.lower() not in self.peers:
            raise ValueError(f"route to unknown peer {peer_host}")
        hosts = self.routes.setdefault(realm.lower(), [])
        if peer_host.lower() not in hosts:
            hosts.append(peer_host.lower())

    def add_default_route(self, peer_host: str) -> None:
        self.add_route("*", peer_host)

    def register_handler(
        self,
        application_id: int,
        command_code: int,
        handler: Handler,
        *,
        required: Iterable[str] = (),
    ) -> None:
        """Serve requests ``(application_id, command_code)`` addressed to this node.

        ``handler(request, peer)`` returns the answer (e.g. ``request.answer(2001, [...])``);
        Origin-Host/Origin-Realm are added when missing. Raising :class:`DiameterError`
        answers with its Result-Code and Failed-AVP. ``required`` AVP names are checked
        before the handler runs (5005 with Failed-AVP). Register before :meth:`start`: the
        application is advertised in CER/CEA.
        """
        self.handlers[(application_id, command_code)] = handler
        self.required[(application_id, command_code)] = tuple(required)
        self.applications.add(application_id)

    def add_forward_hook(self, hook: ForwardHook, *, application_id: int | None = None,
                         command_code: int | None = None) -> None:
        """Call ``hook(request, peer)`` for every request this node is about to relay (of that
        application and/or command if given). It may change the request, or return an answer
        to answer it here instead of relaying it. Contract: see the module docstring."""
        self.forward_hooks.append(Hook(hook, application_id, command_code))

    def add_answer_hook(self, hook: AnswerHook, *, application_id: int | None = None,
                        command_code: int | None = None) -> None:
        """Call ``hook(relayed_request, answer)`` for every answer to a request this node
        relayed (of that application and/or command if given), before it goes back."""
        self.answer_hooks.append(Hook(hook, application_id, command_code))

    def observe(self, application_id: int, command_code: int, *, on_request: Callable[[Message], None] | None = None,
                on_answer: AnswerHook | None = None) -> None:
        """Watch the requests of one command this node relays, and their answers (a proxy
        agent, RFC 6733 §2.8.2): ``on_request(request)`` before a request is relayed (or
        answered by an :meth:`intercept` added after it), ``on_answer(relayed_request, answer)``
        before its answer goes back. Hooks in the order added; see :meth:`add_forward_hook`."""
        if on_request is not None:
            watch = on_request

            @functools.wraps(watch)
            def forward(request: Message, _peer: Peer) -> None:
                watch(request)

            self.add_forward_hook(forward, application_id=application_id, command_code=command_code)
        if on_answer is not None:
            self.add_answer_hook(on_answer, application_id=application_id, command_code=command_code)

    def intercept(self, application_id: int, command_code: int, fn: Callable[[Message], Message | None]) -> None:
        """``fn(request)`` may answer a request of one command that would be relayed, instead
        of relaying it (returns the answer, or None to let it go on)."""

        @functools.wraps(fn)
        def forward(request: Message, _peer: Peer) -> Message | None:
            return fn(request)

        self.add_forward_hook(forward, application_id=application_id, command_code=command_code)

    # -- life cycle ------------------------------------------------------------------------

    async def start(self) -> None:
        if self._running:
            return
        self._running = True
        self._stopping = False
        if self.listen_address is not None:
            self._server = await asyncio.start_server(self._accept, self.listen_address, self.listen_port)
            log.info("diameter.listen", host=self.origin_host, address=self.listen_address, port=self.port)
        for peer in self.peers.values():
            if peer.connect:
                self._start_dialler(peer)

    @property
    def port(self) -> int | None:
        """The TCP port actually listened on (useful with ``listen_port=0``)."""
        if self._server is None or not self._server.sockets:
            return None
        return self._server.sockets[0].getsockname()[1]

    async def stop(self, cause: DisconnectCause = DisconnectCause.REBOOTING) -> None:
        """DPR/DPA with every open peer, then close everything."""
        if not self._running:
            return
        self._stopping = True
        if self._server is not None:
            self._server.close()
        for peer in self.peers.values():
            if peer.task is not None:
                peer.task.cancel()
        await asyncio.gather(*(self._disconnect(c, cause) for c in list(self._conns)), return_exceptions=True)
        for c in list(self._conns):
            c.close(abort=True)
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for peer in self.peers.values():
            if peer.task is not None:
                with contextlib.suppress(BaseException):
                    await peer.task
                peer.task = None
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        self._running = False
        log.info("diameter.stopped", host=self.origin_host)

    async def __aenter__(self) -> DiameterNode:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def wait_open(self, peer_host: str, timeout: float = 10.0) -> Peer:  # noqa: ASYNC109 (per-call deadline)
        """Wait until the peer is OPEN; raises :class:`DiameterTimeout`."""
        peer = self.peers.get(peer_host.lower())
        deadline = time.monotonic() + timeout
        while peer is None:  # a dynamic peer that has not connected yet
            if time.monotonic() > deadline:
                raise DiameterTimeout(f"peer {peer_host} unknown")
            await asyncio.sleep(0.02)
            peer = self.peers.get(peer_host.lower())
        try:
            await asyncio.wait_for(peer.opened.wait(), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise DiameterTimeout(f"peer {peer_host} not open ({peer.state.value})") from None
        return peer

    @property
    def connections(self) -> list[Connection]:
        """Every transport connection this node has and has not yet lost (open or in CER/CEA)."""
        return list(self._conns)

    def peers_status(self) -> list[dict[str, Any]]:
        """One dict per peer: peer, state, realm, address, last_watchdog, pending, ..."""
        return [p.status() for p in sorted(self.peers.values(), key=lambda p: p.key)]

    def stats(self) -> dict[str, Any]:
        return {
            **dict(self.counters),
            "result_codes_sent": dict(self.result_codes_sent),
            "result_codes_received": dict(self.result_codes_received),
        }

    # -- sending requests ------------------------------------------------------------------

    def new_end_to_end(self) -> int:
        return self._ids.next_end_to_end()

    def session_id(self, *parts: object) -> str:
        """A Session-Id ``<origin-host>;<high>;<low>[;parts]`` (RFC 6733 §8.8)."""
        e2e = self._ids.next_end_to_end()
        extra = "".join(f";{p}" for p in parts)
        return f"{self.origin_host};{self.origin_state_id};{e2e}{extra}"

    async def request(self, msg: Message, timeout: float = 10.0) -> Message:  # noqa: ASYNC109 (per-request timer)
        """Send a request and return its answer (whatever its Result-Code).

        Adds Origin-Host/Origin-Realm when missing and an end-to-end id when it is 0; the
        hop-by-hop id is chosen per connection. Raises :class:`DiameterNoRoute` when no peer
        can take it and :class:`DiameterTimeout` when no answer comes within ``timeout``
        (failover to an alternate peer happens inside that time).
        """
        if not msg.is_request:
            raise ValueError("request() needs a request")
        if not self._running:
            raise DiameterUnavailable("node not started")
        self._fill_origin(msg)
        if msg.end_to_end == 0:
            msg.end_to_end = self._ids.next_end_to_end()
        peer, known = self._route(msg)
        if peer is None:
            what = "no usable peer" if known else "no route"
            raise DiameterNoRoute(f"{what} for {msg.name} to {self._dest_text(msg)}")
        fut: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        pend = Pending(msg, future=fut)
        self._send_pending(peer, pend)
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            self._drop_pending(pend)
            self.counters["timeouts"] += 1
            log.warning("request.timeout", cmd=msg.name, e2e=_hex(msg.end_to_end), sid=msg.session_id,
                        dest=self._dest_text(msg))
            raise DiameterTimeout(f"no answer to {msg.name} within {timeout} s") from None
        finally:
            self._drop_pending(pend)

    def _fill_origin(self, msg: Message) -> None:
        at = 1 if msg.avps and msg.avps[0].name == "Session-Id" else 0
        if msg.find("Origin-Realm") is None:
            msg.avps.insert(at, Avp.new("Origin-Realm", self.origin_realm))
        if msg.find("Origin-Host") is None:
            msg.avps.insert(at, Avp.new("Origin-Host", self.origin_host))

    @staticmethod
    def _dest_text(msg: Message) -> str:
        return str(msg.get("Destination-Host") or msg.get("Destination-Realm") or "-")

    def _route(self, msg: Message, exclude: Iterable[str] = ()) -> tuple[Peer | None, bool]:
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

    def _send_pending(self, peer: Peer, pend: Pending) -> None:
        conn = peer.conn
        assert conn is not None
        hbh = conn.next_hop_by_hop()
        while hbh in conn.pending:
            hbh = conn.next_hop_by_hop()
        pend.msg.hop_by_hop = hbh
        pend.conn = conn
        pend.tried.add(peer.key)
        conn.pending[hbh] = pend
        self._send(conn, pend.msg)

    def _drop_pending(self, pend: Pending) -> None:
        if pend.timer is not None:
            pend.timer.cancel()
            pend.timer = None
        conn = pend.conn
        if conn is not None and conn.pending.get(pend.msg.hop_by_hop) is pend:
            del conn.pending[pend.msg.hop_by_hop]
        pend.conn = None

    def _send(self, conn: Connection, msg: Message) -> bool:
        ok = conn.send(msg)
        if ok:
            self.counters["sent"] += 1
            if not msg.is_request:
                rc = msg.result_code
                if rc is not None:
                    self.result_codes_sent[int(rc)] += 1
        self._log_msg("tx" if ok else "tx.dropped", conn, msg)
        return ok

    def _log_msg(self, what: str, conn: Connection, msg: Message, **extra: Any) -> None:
        level_debug = msg.command_code == CMD_DWR
        fields = {
            "peer": conn.peer.host if conn.peer else conn.remote_text,
            "cmd": msg.name,
            "hbh": _hex(msg.hop_by_hop),
            "e2e": _hex(msg.end_to_end),
            "sid": msg.session_id,
            "rc": None if msg.is_request else msg.result_code and int(msg.result_code),
            "flags": "T" if msg.retransmit else None,
            **extra,
        }
        if level_debug:
            log.debug(f"msg.{what}", **fields)
        else:
            log.info(f"msg.{what}", **fields)

    # -- connections -----------------------------------------------------------------------

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _start_dialler(self, peer: Peer) -> None:
        if peer.task is None or peer.task.done():
            peer.task = asyncio.ensure_future(self._dial_loop(peer))

    async def _dial_loop(self, peer: Peer) -> None:
        """Keep a connection to a dialled peer, re-dialling with exponential back-off."""
        while not self._stopping:
            if peer.conn is not None:  # connected (maybe through an incoming connection)
                await peer.conn.closed.wait()
                await asyncio.sleep(0)
                continue
            opened = await self._dial_once(peer)
            if self._stopping:
                return
            if opened and peer.conn is not None:
                await peer.conn.closed.wait()
            if self._stopping:
                return
            if opened:
                peer.backoff = self.reconnect_min
            if peer.last_disconnect_cause in (DisconnectCause.BUSY, DisconnectCause.DO_NOT_WANT_TO_TALK_TO_YOU):
                peer.backoff = self.reconnect_max
                peer.last_disconnect_cause = None
            delay = peer.backoff or self.reconnect_min
            delay *= random.uniform(0.8, 1.2)
            log.info("peer.reconnect", peer=peer.host, delay=f"{delay:.2f}")
            await asyncio.sleep(delay)
            peer.backoff = min(self.reconnect_max, max(self.reconnect_min, (peer.backoff or self.reconnect_min) * 2))

    async def _dial_once(self, peer: Peer) -> bool:
        assert peer.address is not None
        self._dial_state(peer, PeerState.CONNECTING)
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(peer.address, peer.port), self.connect_timeout
            )
        except (OSError, TimeoutError) as e:
            self._dial_state(peer, PeerState.CLOSED)
            log.info("peer.connect.failed", peer=peer.host, address=f"{peer.address}:{peer.port}",
                     error=type(e).__name__)
            return False
        conn = Connection(reader, writer, incoming=False)
        self._conns.add(conn)
        log.info("peer.connected", peer=peer.host, address=conn.remote_text, direction="out")
        conn.cea = asyncio.get_running_loop().create_future()
        reader_task = self._spawn(self._read_loop(conn))
        self._dial_state(peer, PeerState.WAIT_CEA)
        self._send(conn, self._cer(conn))
        try:
            cea = await asyncio.wait_for(asyncio.shield(conn.cea), self.cea_timeout)
        except (TimeoutError, ConnectionError):
            log.warning("peer.cea.timeout", peer=peer.host)
            self._dial_state(peer, PeerState.CLOSED)
            conn.close(abort=True)
            await asyncio.gather(reader_task, return_exceptions=True)
            return False
        rc = cea.result_code
        common = self._common_applications(cea)
        theirs = cea.get("Origin-Host")
        if rc != ResultCode.DIAMETER_SUCCESS or not common:
            log.warning("peer.cea.rejected", peer=peer.host, rc=None if rc is None else int(rc),
                        common=",".join(map(str, sorted(common))) or None)
            self._dial_state(peer, PeerState.CLOSED)
            conn.close()
            await asyncio.gather(reader_task, return_exceptions=True)
            return False
        if theirs and theirs.lower() != peer.key:
            log.warning("peer.identity.mismatch", peer=peer.host, origin_host=theirs)
        old = peer.conn
        if old is not None and not old.is_closed:
            # both sides dialled and the peer's connection opened first: election (RFC 6733 §5.6.4)
            if self._keeps_incoming(peer.host):
                log.info("peer.election", peer=peer.host, kept=old.remote_text, closed=conn.remote_text)
                conn.close()
                await asyncio.gather(reader_task, return_exceptions=True)
                return True
            log.info("peer.election", peer=peer.host, kept=conn.remote_text, closed=old.remote_text)
            old.close()
            self._connection_lost(old)
        self._open(peer, conn, cea, common)
        return True

    @staticmethod
    def _dial_state(peer: Peer, state: PeerState) -> None:
        """Dialling progress shows in the peer's state only while it has no connection."""
        if peer.conn is None:
            peer.state = state

    def _cer(self, conn: Connection) -> Message:
        msg = Message.request("CER", self._capabilities(conn), end_to_end=self._ids.next_end_to_end())
        msg.hop_by_hop = conn.next_hop_by_hop()
        return msg

    def _capabilities(self, conn: Connection) -> list[Any]:
        addresses = list(self.host_ip_addresses)
        if not addresses and conn.local is not None:
            addresses = [ipaddress.ip_address(conn.local[0])]
        avps: list[Any] = [("Origin-Host", self.origin_host), ("Origin-Realm", self.origin_realm)]
        avps += [("Host-IP-Address", a) for a in addresses]
        avps += [("Vendor-Id", self.vendor_id), ("Product-Name", self.product_name),
                 ("Origin-State-Id", self.origin_state_id), ("Supported-Vendor-Id", VENDOR_MIPVPN)]
        avps += [("Auth-Application-Id", a) for a in sorted(self.applications)]
        return avps

    def _common_applications(self, msg: Message) -> frozenset[int]:
        theirs = {a.value for a in msg.find_all("Auth-Application-Id")}
        theirs |= {a.value for a in msg.find_all("Acct-Application-Id")}
        for vsa in msg.find_all("Vendor-Specific-Application-Id"):
            theirs |= {a.value for a in vsa.find_all("Auth-Application-Id")}
            theirs |= {a.value for a in vsa.find_all("Acct-Application-Id")}
        if APP_RELAY in theirs:
            return frozenset(self.applications | {APP_RELAY})
        if APP_RELAY in self.applications:
            return frozenset(theirs)
        return frozenset(self.applications & theirs)

    def _open(self, peer: Peer, conn: Connection, cex: Message, common: frozenset[int]) -> None:
        conn.peer = peer
        peer.conn = conn
        peer.applications = common
        peer.product_name = cex.get("Product-Name")
        self._note_state_id(peer, cex)
        peer.state = PeerState.OPEN
        peer.last_watchdog = time.time()
        peer.backoff = self.reconnect_min
        peer.opened.set()
        conn.watchdog_deadline = time.monotonic() + self._tw(peer)
        self._spawn(self._watchdog(peer, conn))
        log.info("peer.open", peer=peer.host, realm=peer.realm, address=conn.remote_text,
                 direction="in" if conn.incoming else "out", apps=",".join(map(str, sorted(common))),
                 product=peer.product_name)

    def _note_state_id(self, peer: Peer, msg: Message) -> None:
        osi = msg.get("Origin-State-Id")
        if osi is None:
            return
        if peer.origin_state_id is not None and osi != peer.origin_state_id:
            log.warning("peer.restarted", peer=peer.host, old=peer.origin_state_id, new=osi)
        peer.origin_state_id = osi

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Connection(reader, writer, incoming=True)
        if self._stopping:
            conn.close(abort=True)
            return
        self._conns.add(conn)
        log.info("peer.accepted", address=conn.remote_text)
        timer = asyncio.get_running_loop().call_later(self.cer_timeout, self._cer_timeout, conn)
        try:
            await self._read_loop(conn)
        finally:
            timer.cancel()

    def _cer_timeout(self, conn: Connection) -> None:
        if conn.peer is None and not conn.is_closed:
            log.warning("peer.cer.timeout", address=conn.remote_text)
            conn.close(abort=True)

    async def _read_loop(self, conn: Connection) -> None:
        try:
            while True:
                try:
                    data = await conn.read_frame()
                except FramingError as e:
                    self._framing_error(conn, e)
                    break
                self.counters["received"] += 1
                try:
                    msg = Message.decode(data)
                except DecodeError as e:
                    self._malformed(conn, e)
                    if conn.peer is None:
                        break
                    continue
                self._dispatch(conn, msg)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            conn.close(abort=True)
            self._connection_lost(conn)
            raise
        conn.close()
        self._connection_lost(conn)

    def _framing_error(self, conn: Connection, e: FramingError) -> None:
        self.counters["malformed"] += 1
        log.warning("msg.malformed", peer=conn.peer.host if conn.peer else conn.remote_text,
                    error=str(e.decode_error), rc=e.decode_error.result_code, action="close")
        if e.header is not None and e.header.is_request and e.decode_error.result_code is not None:
            self._send(conn, self._error_from_header(e.header, e.decode_error))

    def _malformed(self, conn: Connection, e: DecodeError) -> None:
        self.counters["malformed"] += 1
        h = e.header
        log.warning("msg.malformed", peer=conn.peer.host if conn.peer else conn.remote_text, error=str(e),
                    rc=e.result_code, hbh=None if h is None else _hex(h.hop_by_hop),
                    cmd=None if h is None else h.command_code)
        if h is not None and h.is_request:
            self._send(conn, self._error_from_header(h, e))

    def _error_from_header(self, h: Header, e: DecodeError) -> Message:
        rc = e.result_code or ResultCode.DIAMETER_UNABLE_TO_COMPLY
        avps: list[Any] = [("Result-Code", rc), ("Origin-Host", self.origin_host), ("Origin-Realm", self.origin_realm)]
        if e.avp_code is not None:
            from daemons.wire.diameter.dictionary import DICTIONARY

            d = DICTIONARY.avp(e.avp_code, e.avp_vendor_id)
            if d is not None:
                avps.append(("Failed-AVP", [example_avp(d.name)]))
            else:
                avps.append(("Failed-AVP", [Avp(e.avp_code, b"", vendor_id=e.avp_vendor_id)]))
        flags = (h.flags & FLAG_PROXIABLE) | (FLAG_ERROR if is_protocol_error(rc) else 0)
        return Message(h.command_code, flags=flags, application_id=h.application_id,
                       hop_by_hop=h.hop_by_hop, end_to_end=h.end_to_end, avps=avps)

    def _connection_lost(self, conn: Connection) -> None:
        if conn not in self._conns:
            return
        self._conns.discard(conn)
        conn.closed.set()
        if conn.cea is not None and not conn.cea.done():
            conn.cea.set_exception(ConnectionError("connection closed"))
            conn.cea.exception()  # mark retrieved
        if conn.dpa is not None and not conn.dpa.done():
            conn.dpa.set_exception(ConnectionError("connection closed"))
            conn.dpa.exception()
        peer = conn.peer
        if peer is not None and peer.conn is conn:
            peer.conn = None
            peer.state = PeerState.CLOSED
            peer.opened.clear()
            # dynamic peers keep their entry (for `show`); it is reused when they come back
            log.info("peer.closed", peer=peer.host, address=conn.remote_text, pending=len(conn.pending))
        self._failover(conn, "connection closed")

    # -- dispatch ----------------------------------------------------------------------------

    def _dispatch(self, conn: Connection, msg: Message) -> None:
        peer = conn.peer
        if peer is not None and peer.conn is conn:
            conn.watchdog_deadline = time.monotonic() + self._tw(peer)
            if peer.state is PeerState.SUSPECT:
                peer.state = PeerState.OPEN
                peer.opened.set()
                log.info("peer.recovered", peer=peer.host)
        if msg.is_request:
            self.counters["requests_received"] += 1
        else:
            self.counters["answers_received"] += 1
            if msg.result_code is not None:
                self.result_codes_received[int(msg.result_code)] += 1
        self._log_msg("rx", conn, msg)
        code = msg.command_code
        if code == CMD_CER and msg.is_request:
            self._on_cer(conn, msg)
        elif peer is None:
            if code == CMD_CER and conn.cea is not None and not conn.cea.done():
                conn.cea.set_result(msg)
            else:
                log.warning("peer.protocol", address=conn.remote_text, cmd=msg.name, error="message before CER/CEA")
                conn.close()
        elif code == CMD_DWR and msg.is_request:
            self._note_state_id(peer, msg)
            peer.last_watchdog = time.time()
            self._send(conn, self._base_answer(msg, [("Origin-State-Id", self.origin_state_id)]))
        elif code == CMD_DWR:
            conn.dwr_outstanding = False
            peer.last_watchdog = time.time()
            self._note_state_id(peer, msg)
        elif code == CMD_DPR and msg.is_request:
            cause = msg.get("Disconnect-Cause")
            peer.last_disconnect_cause = cause
            peer.state = PeerState.CLOSING
            peer.opened.clear()
            log.info("peer.dpr", peer=peer.host, cause=None if cause is None else getattr(cause, "name", cause))
            self._send(conn, self._base_answer(msg))
            self._failover(conn, "peer disconnecting")
            conn.close()
        elif code == CMD_DPR:
            if conn.dpa is not None and not conn.dpa.done():
                conn.dpa.set_result(msg)
        elif msg.is_request:
            self._spawn(self._on_request(conn, peer, msg))
        else:
            self._on_answer(conn, msg)

    def _base_answer(self, req: Message, extra: list[Any] | None = None,
                     rc: int = ResultCode.DIAMETER_SUCCESS) -> Message:
        return req.answer(rc, [("Origin-Host", self.origin_host), ("Origin-Realm", self.origin_realm), *(extra or [])])

    def _on_cer(self, conn: Connection, cer: Message) -> None:
        if conn.peer is not None or not conn.incoming:
            log.warning("peer.protocol", peer=conn.peer.host if conn.peer else conn.remote_text,
                        error="CER on an open connection")
            self._send(conn, self._base_answer(cer, rc=ResultCode.DIAMETER_UNABLE_TO_COMPLY))
            return
        host = cer.get("Origin-Host")
        realm = cer.get("Origin-Realm")
        missing = [n for n, v in (("Origin-Host", host), ("Origin-Realm", realm)) if not v]
        if missing:
            self._reject_cer(conn, cer, ResultCode.DIAMETER_MISSING_AVP, failed=[example_avp(n) for n in missing])
            return
        peer = self.peers.get(host.lower())
        if peer is None:
            if not self.accept_unknown_peers:
                self._reject_cer(conn, cer, ResultCode.DIAMETER_UNKNOWN_PEER, host=host)
                return
            peer = Peer(host, realm, dynamic=True)
            self.peers[peer.key] = peer
        common = self._common_applications(cer)
        if not common:
            self._reject_cer(conn, cer, ResultCode.DIAMETER_NO_COMMON_APPLICATION, host=host)
            return
        old = peer.conn
        if old is not None and not old.is_closed:
            if not old.incoming and not self._keeps_incoming(host):
                self._reject_cer(conn, cer, ResultCode.DIAMETER_ELECTION_LOST, host=host)
                return
            log.info("peer.replaced", peer=peer.host, old=old.remote_text, new=conn.remote_text)
            old.close()
            self._connection_lost(old)
        if realm.lower() != peer.realm.lower():
            log.warning("peer.realm.mismatch", peer=peer.host, configured=peer.realm, cer=realm)
            if peer.dynamic:
                peer.realm = realm
        self._send(conn, self._base_answer(cer, self._capabilities(conn)[2:]))  # [2:]: Origin-* added there
        self._open(peer, conn, cer, common)

    def _keeps_incoming(self, peer_host: str) -> bool:
        """Election (RFC 6733 §5.6.4): the higher identity keeps the connection it accepted,
        so both ends keep the connection the lower identity dialled."""
        return self.origin_host.lower() > peer_host.lower()

    def _reject_cer(self, conn: Connection, cer: Message, rc: int, host: str | None = None,
                    failed: list[Avp] | None = None) -> None:
        log.warning("peer.cer.rejected", peer=host or conn.remote_text, rc=int(rc))
        extra: list[Any] = self._capabilities(conn)[2:]
        if failed:
            extra.append(("Failed-AVP", failed))
        self._send(conn, self._base_answer(cer, extra, rc=rc))
        conn.close()

    # -- watchdog (RFC 3539) ---------------------------------------------------------------

    def _tw(self, peer: Peer) -> float:
        tw = peer.watchdog_interval or self.watchdog_interval
        jitter = min(2.0, tw / 10)
        return max(0.01, tw + random.uniform(-jitter, jitter))

    async def _watchdog(self, peer: Peer, conn: Connection) -> None:
        while not conn.is_closed and peer.conn is conn:
            wait = conn.watchdog_deadline - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            if peer.state is PeerState.OPEN and not conn.dwr_outstanding:
                dwr = Message.request("DWR", [("Origin-Host", self.origin_host), ("Origin-Realm", self.origin_realm),
                                              ("Origin-State-Id", self.origin_state_id)],
                                      end_to_end=self._ids.next_end_to_end())
                dwr.hop_by_hop = conn.next_hop_by_hop()
                conn.dwr_outstanding = True
                self._send(conn, dwr)
            elif peer.state is PeerState.OPEN:
                peer.state = PeerState.SUSPECT
                peer.opened.clear()
                self.counters["watchdog_suspect"] += 1
                log.warning("peer.suspect", peer=peer.host, pending=len(conn.pending))
                self._failover(conn, "watchdog suspect")
            elif peer.state is PeerState.SUSPECT:
                self.counters["watchdog_down"] += 1
                log.warning("peer.down", peer=peer.host, reason="watchdog")
                conn.close(abort=True)
                self._connection_lost(conn)
                return
            else:
                return
            conn.watchdog_deadline = time.monotonic() + self._tw(peer)

    # -- disconnect ----------------------------------------------------------------------------

    async def _disconnect(self, conn: Connection, cause: DisconnectCause) -> None:
        peer = conn.peer
        if peer is None or conn.is_closed:
            conn.close(abort=True)
            return
        peer.state = PeerState.CLOSING
        peer.opened.clear()
        conn.dpa = asyncio.get_running_loop().create_future()
        dpr = Message.request("DPR", [("Origin-Host", self.origin_host), ("Origin-Realm", self.origin_realm),
                                      ("Disconnect-Cause", cause)], end_to_end=self._ids.next_end_to_end())
        dpr.hop_by_hop = conn.next_hop_by_hop()
        self._send(conn, dpr)
        try:
            await asyncio.wait_for(asyncio.shield(conn.dpa), self.dpa_timeout)
            log.info("peer.dpa", peer=peer.host)
        except (TimeoutError, ConnectionError):
            log.warning("peer.dpa.missing", peer=peer.host)
        conn.close()

    async def disconnect_peer(self, peer_host: str, cause: DisconnectCause = DisconnectCause.REBOOTING) -> None:
        """DPR/DPA with one peer (a dialled peer is re-dialled after back-off)."""
        peer = self.peers[peer_host.lower()]
        if peer.conn is not None:
            peer.last_disconnect_cause = cause
            await self._disconnect(peer.conn, cause)

    # -- failover ------------------------------------------------------------------------------

    def _failover(self, conn: Connection, reason: str) -> None:
        pendings = list(conn.pending.values())
        conn.pending.clear()
        for pend in pendings:
            pend.conn = None
            if pend.future is not None and pend.future.done():
                continue
            peer, _known = self._route(pend.msg, exclude=pend.tried)
            if peer is not None and not self._stopping:
                pend.msg.retransmit = True
                self.counters["failovers"] += 1
                log.warning("request.failover", cmd=pend.msg.name, e2e=_hex(pend.msg.end_to_end),
                            sid=pend.msg.session_id, to=peer.host, reason=reason)
                self._send_pending(peer, pend)
                continue
            log.warning("request.undeliverable", cmd=pend.msg.name, e2e=_hex(pend.msg.end_to_end),
                        sid=pend.msg.session_id, reason=reason)
            self._fail_pending(pend, f"{reason}, no alternate peer")

    def _fail_pending(self, pend: Pending, why: str) -> None:
        if pend.timer is not None:
            pend.timer.cancel()
        if pend.future is not None:
            if not pend.future.done():
                pend.future.set_exception(DiameterUnavailable(why))
        elif pend.origin is not None:
            req = pend.msg.copy()
            req.hop_by_hop = pend.origin_hbh
            req.retransmit = False
            ans = self._error_answer(req, DiameterError(ResultCode.DIAMETER_UNABLE_TO_DELIVER, why))
            self._send(pend.origin, ans)

    # -- serving requests ----------------------------------------------------------------------

    async def _on_request(self, conn: Connection, peer: Peer, req: Message) -> None:
        try:
            await self._serve(conn, peer, req)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug: answer 5012 rather than leave the peer waiting
            log.error("request.failed", peer=peer.host, cmd=req.name, hbh=_hex(req.hop_by_hop), error=repr(e))
            self._answer(conn, req, self._error_answer(req, DiameterError(ResultCode.DIAMETER_UNABLE_TO_COMPLY)))

    async def _serve(self, conn: Connection, peer: Peer, req: Message) -> None:
        origin = req.get("Origin-Host")
        if req.retransmit and origin:
            cached = self._answer_cache.get((origin.lower(), req.end_to_end))
            if cached is not None:
                ans = cached.copy()
                ans.hop_by_hop = req.hop_by_hop
                self.counters["duplicates"] += 1
                log.info("request.duplicate", peer=peer.host, cmd=req.name, e2e=_hex(req.end_to_end))
                self._send(conn, ans)
                return
        missing = [n for n in ("Origin-Host", "Origin-Realm") if req.find(n) is None]
        if missing:
            self._answer(conn, req, self._error_answer(req, DiameterError.missing(*missing)))
            return
        me = self.origin_host.lower()
        if any(str(a.value).lower() == me for a in req.find_all("Route-Record")):
            self.counters["loops"] += 1
            self._answer(conn, req, self._error_answer(
                req, DiameterError(ResultCode.DIAMETER_LOOP_DETECTED, "own identity in Route-Record")))
            return
        dh = req.get("Destination-Host")
        dr = req.get("Destination-Realm")
        local = (
            (dh is not None and dh.lower() == me)
            or dr is None
            or not req.proxiable
            or (dr.lower() in self.local_realms and dh is None)
        )
        if not local:
            self._relay(conn, peer, req)
            return
        await self._serve_locally(conn, peer, req)

    def _relay(self, conn: Connection, peer: Peer, req: Message) -> None:
        for hook in self.forward_hooks:
            if not hook.wants(req):
                continue
            answer = self._call_hook(hook, req, peer)
            if answer is None:
                continue
            if not isinstance(answer, Message) or answer.is_request:
                log.error("hook.failed", hook=hook.name, cmd=req.name, e2e=_hex(req.end_to_end),
                          error=f"returned {type(answer).__name__}, not an answer")
                continue
            answer.hop_by_hop, answer.end_to_end = req.hop_by_hop, req.end_to_end
            self._fill_answer_origin(answer)
            self._answer(conn, req, answer)
            return
        self._forward(conn, peer, req)

    def _forward(self, conn: Connection, peer: Peer, req: Message) -> None:
        fwd = req.copy()
        fwd.add("Route-Record", peer.host)
        target, known = self._route(fwd)
        if target is None:
            rc = ResultCode.DIAMETER_UNABLE_TO_DELIVER if known else ResultCode.DIAMETER_REALM_NOT_SERVED
            log.warning("request.unroutable", peer=peer.host, cmd=req.name, hbh=_hex(req.hop_by_hop),
                        dest=self._dest_text(req), rc=int(rc))
            err = DiameterError(rc, f"cannot route to {self._dest_text(req)}")
            self._answer(conn, req, self._error_answer(req, err))
            return
        pend = Pending(fwd, origin=conn, origin_hbh=req.hop_by_hop)
        pend.timer = asyncio.get_running_loop().call_later(self.relay_timeout, self._relay_expired, pend)
        self.counters["relayed"] += 1
        log.info("request.relay", cmd=req.name, sid=req.session_id, e2e=_hex(req.end_to_end),
                 src=peer.host, dst=target.host, hbh_in=_hex(req.hop_by_hop))
        self._send_pending(target, pend)

    def _relay_expired(self, pend: Pending) -> None:
        pend.timer = None
        self._drop_pending(pend)
        self.counters["timeouts"] += 1
        log.warning("relay.timeout", cmd=pend.msg.name, e2e=_hex(pend.msg.end_to_end), sid=pend.msg.session_id)
        self._fail_pending(pend, "no answer from next hop")

    async def _serve_locally(self, conn: Connection, peer: Peer, req: Message) -> None:
        key = (req.application_id, req.command_code)
        handler = self.handlers.get(key)
        if handler is None:
            if req.application_id == APP_COMMON or any(a == req.application_id for a, _ in self.handlers):
                err = DiameterError(ResultCode.DIAMETER_COMMAND_UNSUPPORTED, f"command {req.command_code}")
            else:
                err = DiameterError(ResultCode.DIAMETER_APPLICATION_UNSUPPORTED, f"application {req.application_id}")
            self._answer(conn, req, self._error_answer(req, err))
            return
        unknown = req.unknown_mandatory()
        if unknown:
            err = DiameterError(ResultCode.DIAMETER_AVP_UNSUPPORTED, failed_avp=[unknown[0]])
            self._answer(conn, req, self._error_answer(req, err))
            return
        try:
            require(req, *self.required.get(key, ()))
            ans = await handler(req, peer)
            if not isinstance(ans, Message) or ans.is_request:
                raise TypeError(f"handler returned {type(ans).__name__}, not an answer")
        except DiameterError as e:
            ans = self._error_answer(req, e)
        ans.hop_by_hop, ans.end_to_end = req.hop_by_hop, req.end_to_end
        self._fill_answer_origin(ans)
        self._answer(conn, req, ans)

    def _fill_answer_origin(self, ans: Message) -> None:
        names = [a.name for a in ans.avps]
        at = names.index("Result-Code") + 1 if "Result-Code" in names else (1 if names[:1] == ["Session-Id"] else 0)
        if ans.find("Origin-Realm") is None:
            ans.avps.insert(at, Avp.new("Origin-Realm", self.origin_realm))
        if ans.find("Origin-Host") is None:
            ans.avps.insert(at, Avp.new("Origin-Host", self.origin_host))

    def _error_answer(self, req: Message, e: DiameterError) -> Message:
        avps: list[Any] = [("Origin-Host", self.origin_host), ("Origin-Realm", self.origin_realm)]
        if e.error_message:
            avps.append(("Error-Message", e.error_message))
        if e.failed_avp:
            avps.append(("Failed-AVP", e.failed_avp))
        return req.answer(e.result_code, avps)

    def _answer(self, conn: Connection, req: Message, ans: Message) -> None:
        origin = req.get("Origin-Host")
        if origin:
            self._answer_cache[(origin.lower(), req.end_to_end)] = ans
            while len(self._answer_cache) > self._answer_cache_size:
                self._answer_cache.popitem(last=False)
        if not self._send(conn, ans):
            log.warning("answer.dropped", cmd=ans.name, hbh=_hex(ans.hop_by_hop), reason="connection closed")

    def _on_answer(self, conn: Connection, ans: Message) -> None:
        pend = conn.pending.pop(ans.hop_by_hop, None)
        if pend is None or pend.msg.end_to_end != ans.end_to_end:
            if pend is not None:
                conn.pending[ans.hop_by_hop] = pend
            self.counters["unexpected_answers"] += 1
            log.warning("answer.unexpected", peer=conn.peer.host if conn.peer else "-", cmd=ans.name,
                        hbh=_hex(ans.hop_by_hop), e2e=_hex(ans.end_to_end))
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
                    self._call_hook(hook, pend.msg, ans)
            ans.hop_by_hop = pend.origin_hbh
            self.counters["relayed_answers"] += 1
            if not self._send(pend.origin, ans):
                log.warning("answer.dropped", cmd=ans.name, hbh=_hex(ans.hop_by_hop), reason="origin gone")

    @staticmethod
    def _call_hook(hook: Hook[Any], request: Message, arg: Peer | Message) -> Any:
        try:
            return hook.fn(request, arg)
        except Exception as exc:  # a hook's bug must not stop the relay
            log.error("hook.failed", hook=hook.name, cmd=request.name, e2e=_hex(request.end_to_end), error=repr(exc))
            return None


__all__ = [
    "BASE_COMMANDS",
    "AnswerHook",
    "DiameterError",
    "DiameterNoRoute",
    "DiameterNode",
    "DiameterTimeout",
    "DiameterUnavailable",
    "ForwardHook",
    "Handler",
    "Hook",
    "example_avp",
    "require",
]


async def wait_for_peers(node: DiameterNode, hosts: list[str], within_s: float = 5.0) -> list[str]:
    """Give the peers we dial a bounded moment to open before we call ourselves ready, so
    the first request after start does not find them still connecting. Returns the hosts
    that did not open in time (the node keeps re-dialling them)."""
    results = await asyncio.gather(*(node.wait_open(h, within_s) for h in hosts), return_exceptions=True)
    late = [h for h, r in zip(hosts, results, strict=True) if isinstance(r, BaseException)]
    for host in late:
        log.warning("peer.not_open", peer=host, waited_s=within_s)
    return late
