"""A Diameter node on asyncio TCP or TLS (RFC 6733 base protocol, RFC 3539 watchdog): the facade.

Pure protocol: peers, capabilities exchange, watchdog, disconnect, routing, relaying,
failover and dispatch of requests to handlers. No Mobile IP logic.

    node = DiameterNode("aaaf1.visit-a.example", "visit-a.example", ["198.18.1.2"],
                        listen_address="198.18.1.2", listen_port=5658,
                        tls=contexts(ca_pem, cert_pem, key_pem))        # daemons.diameter.tls; None: plain TCP
    node.add_peer("aaah.home.example", "home.example", "198.18.0.2")   # we dial it
    node.add_peer("fa1.visit-a.example", "visit-a.example", sources=["198.18.0.14"])  # it dials us
    node.add_route("home.example", "aaah.home.example")
    node.register_handler(2, 260, handle_amr)                          # async (req, peer) -> answer
    node.observe(2, 260, on_answer=cache_vpn_info)                     # AMAs it relays
    await node.start()
    ama = await node.request(amr, timeout=5)
    ...
    await node.stop()                                                  # DPR/DPA with every peer

:class:`DiameterNode` composes the parts of the engine, each in its module:

* :mod:`.peer` — the peer table and state machine: dialling, CER/CEA, election, DPR/DPA;
* :mod:`.watchdog` — DWR/DWA, SUSPECT/down, failover of pending requests with the T flag;
* :mod:`.routing` — the realm routing table, relaying with Route-Record, answers back to
  where requests came from, duplicate-answer cache, and the forward and answer hooks;
* :mod:`.dispatch` — handlers by (application, command), local or relay per request;
* :mod:`.local` — identity, settings, counters and one-message I/O they all share;
  :mod:`.connection` — framing; :mod:`.tls` — the TLS contexts; :mod:`.errors` — the exceptions.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from daemons.wire.diameter.constants import DIAMETER_PORT, VENDOR_MIPVPN, DisconnectCause
from daemons.wire.diameter.message import Message

from .connection import Connection
from .dispatch import Dispatcher, Handler
from .errors import DiameterError, DiameterNoRoute, DiameterTimeout, DiameterUnavailable, example_avp, require
from .local import BASE_COMMANDS, LocalNode, Settings, log
from .peer import Peer, PeerTable
from .routing import AnswerHook, ForwardHook, Router
from .tls import Tls
from .watchdog import Watchdog


class DiameterNode:
    """A Diameter peer, agent and server on asyncio TCP or TLS. See the module docstring.

    The timers and limits given here are :attr:`settings` (:class:`~daemons.diameter.local.Settings`),
    read when used. Only peers added with :meth:`add_peer` may connect (from their addresses):
    ``accept_unknown_peers`` lets any host in under any name, for tests and tools only.
    """

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
        accept_unknown_peers: bool = False,
        origin_state_id: int | None = None,
        answer_cache_size: int = 1024,
        tls: Tls | None = None,
        **limits: Any,
    ) -> None:
        """``tls``: the node's TLS contexts (:func:`daemons.diameter.tls.contexts`): every connection,
        accepted or dialled, is TLS 1.3 with a certificate checked against the peer's Origin-Host;
        None: plain TCP (a warning at start). ``limits``: any other
        :class:`~daemons.diameter.local.Settings` field by name (``max_frame``,
        ``max_connections_per_source``, ``max_pending_per_peer``, ...)."""
        unknown = sorted(set(limits) - set(Settings.__dataclass_fields__))
        if unknown:
            raise TypeError(f"unknown Diameter setting {unknown[0]!r}")
        settings = Settings(
            watchdog_interval=watchdog_interval, reconnect_min=reconnect_min, reconnect_max=reconnect_max,
            connect_timeout=connect_timeout, cea_timeout=cea_timeout, cer_timeout=cer_timeout,
            dpa_timeout=dpa_timeout, relay_timeout=relay_timeout, accept_unknown_peers=accept_unknown_peers,
            answer_cache_size=answer_cache_size, **limits)
        osi = int(time.time()) & 0xFFFFFFFF if origin_state_id is None else origin_state_id
        self._local = LocalNode(origin_host, origin_realm, host_ip_addresses, applications, product_name,
                                vendor_id, osi, settings)
        peers: dict[str, Peer] = {}  # the peer table, shared by the router and the peer state machine
        self._router = Router(self._local, peers)
        self._dispatcher = Dispatcher(self._local, self._router)
        self._watchdog = Watchdog(self._local, self._router)
        self._table = PeerTable(self._local, peers, self._watchdog, self._dispatcher.receive,
                                listen_address=listen_address, listen_port=listen_port, tls=tls)

    # -- identity and state --------------------------------------------------------------

    @property
    def settings(self) -> Settings:
        """The timers and limits given to the constructor (change them in place)."""
        return self._local.settings

    @property
    def peers(self) -> dict[str, Peer]:
        """The peer table, by lower-case host (configured and dynamic peers)."""
        return self._table.peers

    @property
    def origin_host(self) -> str:
        return self._local.origin_host

    @property
    def origin_realm(self) -> str:
        return self._local.origin_realm

    @property
    def origin_state_id(self) -> int:
        return self._local.origin_state_id

    @property
    def applications(self) -> set[int]:
        """The applications advertised in CER/CEA (those of the handlers are added)."""
        return self._local.applications

    @property
    def local_realms(self) -> set[str]:
        """Realms served here: their requests without Destination-Host go to the handlers."""
        return self._local.local_realms

    @property
    def counters(self) -> Counter[str]:
        return self._local.counters

    @property
    def result_codes_sent(self) -> Counter[int]:
        return self._local.result_codes_sent

    @property
    def result_codes_received(self) -> Counter[int]:
        return self._local.result_codes_received

    @property
    def watchdog_interval(self) -> float:
        """Tw of the peers without their own (seconds); a change applies from their next timer."""
        return self.settings.watchdog_interval

    @watchdog_interval.setter
    def watchdog_interval(self, value: float) -> None:
        self.settings.watchdog_interval = value

    @property
    def port(self) -> int | None:
        """The TCP port actually listened on (useful with ``listen_port=0``)."""
        return self._table.port

    @property
    def connections(self) -> list[Connection]:
        """Every transport connection not yet closed (open or still in CER/CEA)."""
        return list(self._table.conns)

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
        sources: Iterable[str] = (),
        agent: bool = False,
    ) -> Peer:
        """Add a peer; with an ``address`` (and ``connect`` not False) the node dials it.

        It may connect to this node from ``sources`` (addresses or prefixes, e.g. the relay that
        also dials us from another interface) and from ``address``; a peer with neither is
        refused. ``agent``: it forwards requests of others (an AAAF, a relay agent), whose
        Origin-Host is not its own; any other peer's requests must carry its own identity.
        The peer's realm is routed to it implicitly (after explicit :meth:`add_route` entries).
        """
        return self._table.add(host, realm, address, port, connect=connect, watchdog_interval=watchdog_interval,
                               sources=sources, agent=agent)

    def add_route(self, realm: str, peer_host: str) -> None:
        """Route requests for ``realm`` to ``peer_host`` (tried in the order routes were added).

        ``realm="*"`` is the default route (see also :meth:`add_default_route`).
        """
        self._router.add_route(realm, peer_host)

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
        self._dispatcher.register(application_id, command_code, handler, required)

    # -- hooks on relayed requests (contract: daemons.diameter.routing) --------------------

    def add_forward_hook(self, hook: ForwardHook, *, application_id: int | None = None,
                         command_code: int | None = None) -> None:
        """Call ``hook(request, peer)`` for every request this node is about to relay (of that
        application and/or command if given). It may change the request, or return an answer
        to answer it here instead of relaying it."""
        self._router.add_forward_hook(hook, application_id=application_id, command_code=command_code)

    def add_answer_hook(self, hook: AnswerHook, *, application_id: int | None = None,
                        command_code: int | None = None) -> None:
        """Call ``hook(relayed_request, answer)`` for every answer to a request this node
        relayed (of that application and/or command if given), before it goes back."""
        self._router.add_answer_hook(hook, application_id=application_id, command_code=command_code)

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
        if self._local.running:
            return
        self._local.running = True
        self._local.stopping = False
        await self._table.start()

    async def stop(self, cause: DisconnectCause = DisconnectCause.REBOOTING) -> None:
        """DPR/DPA with every open peer, then close everything."""
        if not self._local.running:
            return
        self._local.stopping = True
        await self._table.stop(cause)
        self._local.running = False
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

    async def disconnect_peer(self, peer_host: str, cause: DisconnectCause = DisconnectCause.REBOOTING) -> None:
        """DPR/DPA with one peer (a dialled peer is re-dialled after back-off)."""
        await self._table.disconnect_peer(peer_host, cause)

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
        return self._local.next_end_to_end()

    def session_id(self, *parts: object) -> str:
        """A Session-Id ``<origin-host>;<high>;<low>[;parts]`` (RFC 6733 §8.8)."""
        e2e = self._local.next_end_to_end()
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
        if not self._local.running:
            raise DiameterUnavailable("node not started")
        return await self._router.request(msg, timeout)


async def wait_for_peers(node: DiameterNode, hosts: list[str], within_s: float = 5.0) -> list[str]:
    """Give the peers we dial a bounded moment to open before we call ourselves ready, so
    the first request after start does not find them still connecting. Returns the hosts
    that did not open in time (the node keeps re-dialling them)."""
    results = await asyncio.gather(*(node.wait_open(h, within_s) for h in hosts), return_exceptions=True)
    late = [h for h, r in zip(hosts, results, strict=True) if isinstance(r, BaseException)]
    for host in late:
        log.warning("peer.not_open", peer=host, waited_s=within_s)
    return late


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
    "example_avp",
    "require",
    "wait_for_peers",
]
