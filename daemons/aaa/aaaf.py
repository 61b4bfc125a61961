"""The local (foreign) AAA server (AAAF, claims 10-12, 16, 17): the Diameter agent of a
visited domain.

FAs dial it; it dials the home AAA server of every realm it serves visitors from and relays
their AMRs there by the NAI's realm (RFC 6733 relay: Route-Record, new hop-by-hop id). It is
a proxy in that it reads what it relays: from each successful AMA it caches the FA's VPN info
per user (:class:`daemons.aaa.sessions.Session`: NAI, Diameter session, the FA it belongs to, the
paths) before the AMA goes on, unchanged, to the FA (claim 16). ``show sessions`` lists the
cache without key material.

The cache is keyed by NAI and remembers the FA, so that an intra-domain move (claim 17, a
later step) can answer the new FA itself: ``session.with_fa(new_coa)``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from daemons.aaa.sessions import Session, SessionStore
from daemons.diameter.node import DiameterNode, wait_for_peers
from daemons.runtime.config import AAAFConfig, ConfigError
from daemons.runtime.control import ControlServer
from daemons.runtime.log import EventLog
from daemons.vpn import vpninfo
from daemons.wire import mip
from daemons.wire.diameter import Message, ResultCode
from daemons.wire.mip.vendor import requests_service_update

log = EventLog("mipvpn.aaaf")
MIP_APPLICATION = 2  # RFC 4004
AMR_COMMAND = 260
STR_COMMAND = 275

Observer = Callable[[Message, Message], None]


class ProxyNode(DiameterNode):
    """A Diameter node that lets the application watch the requests it relays and their
    answers (a proxy agent in RFC 6733 terms, §2.8.2), without changing what it forwards.

    ``observe(app, cmd, on_request=..., on_answer=...)``: ``on_request(request)`` runs before
    a request is relayed, ``on_answer(forwarded_request, answer)`` before its answer goes
    back. Observers must not block; their exceptions are logged and ignored.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.request_observers: dict[tuple[int, int], Callable[[Message], None]] = {}
        self.answer_observers: dict[tuple[int, int], Observer] = {}
        self.interceptors: dict[tuple[int, int], Callable[[Message], Message | None]] = {}

    def intercept(self, application_id: int, command_code: int, fn: Callable[[Message], Message | None]) -> None:
        """``fn(request)`` may answer a request that would be relayed, instead of relaying it
        (claim 17: the AAAF answers an intra-domain move itself)."""
        self.interceptors[(application_id, command_code)] = fn

    def observe(self, application_id: int, command_code: int, *, on_request: Callable[[Message], None] | None = None,
                on_answer: Observer | None = None) -> None:
        if on_request is not None:
            self.request_observers[(application_id, command_code)] = on_request
        if on_answer is not None:
            self.answer_observers[(application_id, command_code)] = on_answer

    def _relay(self, conn: Any, peer: Any, req: Message) -> None:
        observer = self.request_observers.get((req.application_id, req.command_code))
        if observer is not None:
            _call(observer, req)
        interceptor = self.interceptors.get((req.application_id, req.command_code))
        answer = _call(interceptor, req) if interceptor is not None else None
        if answer is not None:
            answer.hop_by_hop, answer.end_to_end = req.hop_by_hop, req.end_to_end
            self._fill_answer_origin(answer)
            self._answer(conn, req, answer)
            return
        super()._relay(conn, peer, req)

    def _on_answer(self, conn: Any, ans: Message) -> None:
        pend = conn.pending.get(ans.hop_by_hop)
        if pend is not None and pend.origin is not None and pend.msg.end_to_end == ans.end_to_end:
            observer = self.answer_observers.get((ans.application_id, ans.command_code))
            if observer is not None:
                _call(observer, pend.msg, ans)
        super()._on_answer(conn, ans)


def _call(fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return fn(*args)
    except Exception as exc:  # an observer's bug must not stop the relay
        log.error("observer.failed", observer=getattr(fn, "__qualname__", repr(fn)), error=repr(exc))
        return None


class ForeignAAAServer:
    def __init__(self, config: AAAFConfig) -> None:
        if not config.home_servers:
            raise ConfigError(f"{config.node} (aaaf)", "home_servers", "at least one home AAA server is needed")
        self.config = config
        self.store = SessionStore(config.state_dir / "sessions.json")
        self.counters: dict[str, int] = {"amr_relayed": 0, "ama_success": 0, "ama_failure": 0, "cached": 0,
                                         "answered_locally": 0}
        self.control = ControlServer(config.control_socket)
        self.diameter = ProxyNode(config.diameter_host, config.diameter_realm,
                                  host_ip_addresses=(str(config.address),), listen_address=str(config.address),
                                  listen_port=config.port, relay_timeout=config.relay_timeout)
        for server in config.home_servers:
            self.diameter.add_peer(server.host, server.realm, str(server.address), server.port)
            self.diameter.add_route(server.realm, server.host)
        self.diameter.observe(MIP_APPLICATION, AMR_COMMAND, on_request=self.on_amr, on_answer=self.on_ama)
        self.diameter.intercept(MIP_APPLICATION, AMR_COMMAND, self.answer_intra_domain_move)
        self.diameter.intercept(MIP_APPLICATION, STR_COMMAND, self.end_session)

    # ---- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        self.store.load()
        if self.store.sessions:
            log.info("aaaf.restored", sessions=len(self.store.sessions))
        await self.diameter.start()
        self.control.register("sessions", lambda _: self.store.show())
        self.control.register("counters", lambda _: {**self.counters, **self.diameter.stats()})
        self.control.register("peers", lambda _: self.diameter.peers_status())
        await wait_for_peers(self.diameter, [s.host for s in self.config.home_servers])
        await self.control.start()
        log.info("aaaf.ready", host=self.config.diameter_host, realm=self.config.diameter_realm,
                 port=self.diameter.port, realms=",".join(s.realm for s in self.config.home_servers),
                 sessions=len(self.store.sessions))

    async def stop(self) -> None:
        await self.control.stop()
        await self.diameter.stop()

    async def run(self) -> None:
        await self.start()
        try:
            await asyncio.Event().wait()
        finally:
            await self.stop()

    # ---- what goes through -------------------------------------------------------------------
    def on_amr(self, amr: Message) -> None:
        self.counters["amr_relayed"] += 1
        log.info("amr.received", mn=amr.get("User-Name"), sid=amr.session_id, fa=amr.get("Origin-Host"),
                 realm=amr.get("Destination-Realm"))

    def on_ama(self, amr: Message, ama: Message) -> None:
        """Cache the FA's VPN info of a successful registration before the AMA goes on."""
        nai = amr.get("User-Name")
        sid = amr.session_id or ""
        code = int(ama.result_code or 0)
        if code != ResultCode.DIAMETER_SUCCESS or not nai:
            self.counters["ama_failure"] += 1
            log.info("ama.relayed", mn=nai, sid=sid, result=code, cached=False)
            return
        self.counters["ama_success"] += 1
        try:
            rrq = mip.decode_message(amr.get("MIP-Reg-Request", default=b""))
            infos = vpninfo.from_message(ama, nai)
        except (mip.DecodeError, vpninfo.VpnInfoError) as exc:
            log.warning("ama.relayed", mn=nai, sid=sid, result=code, cached=False, reason=str(exc))
            return
        if not isinstance(rrq, mip.RegistrationRequest):
            return
        if rrq.is_deregistration:
            self.store.drop(nai)
            log.info("ama.relayed", mn=nai, sid=sid, result=code, cached=False, reason="deregistration")
            return
        session = Session(nai, sid, rrq.care_of_address, amr.get("Origin-Host", default=""), rrq.home_agent,
                          rrq.home_address, tuple(infos), time.time())
        previous = self.store.put(session)
        self.counters["cached"] += 1
        log.info("ama.relayed", mn=nai, sid=sid, result=code, cached=True, fa=session.fa, paths=len(infos),
                 previous_fa=previous.fa if previous is not None and previous.fa != session.fa else None)

    def answer_intra_domain_move(self, amr: Message) -> Message | None:
        """Claim 17 (flow F2): the MN moved between two FAs of our domain. Its RRQ names the
        previous FA, whose session we cached: rewrite the cached VPN info to the new FA and
        answer the new FA ourselves (no AMR reaches the home AAA server); the new FA then
        sends the RRQ straight to the HA, which rewrites its side."""
        nai = amr.get("User-Name")
        session = self.store.sessions.get(nai) if nai else None
        if session is None:
            return None
        try:
            rrq = mip.decode_message(amr.get("MIP-Reg-Request", default=b""))
        except mip.DecodeError:
            return None
        if not isinstance(rrq, mip.RegistrationRequest) or rrq.is_deregistration:
            return None
        if requests_service_update(rrq.extensions):
            # F7: the user changed their profile; only the home AAA server can rebuild the VPN
            # info from it, so our cached copy must not answer (relayed like any other AMR).
            log.info("amr.not_answered_locally", mn=nai, sid=amr.session_id, reason="service update")
            return None
        previous = mip.previous_fa(rrq.extensions)
        if previous is None or previous == rrq.care_of_address or rrq.home_agent != session.home_agent \
                or not session.for_fa():
            return None
        # The move we cached is from the named previous FA, or it is this very move again (the
        # MN retransmitted before the first answer reached it): answer both the same way.
        if session.fa not in (previous, rrq.care_of_address):
            return None
        moved = session.with_fa(rrq.care_of_address, amr.session_id, amr.get("Origin-Host", default=""))
        self.store.put(moved)
        self.counters["answered_locally"] += 1
        log.info("amr.answered_locally", mn=nai, sid=amr.session_id, previous_fa=session.fa,
                 fa=moved.fa, paths=len(moved.for_fa()))
        return amr.answer(ResultCode.DIAMETER_SUCCESS,  # RFC 4004 §5.2: AMA carries Auth-Application-Id
                          avps=[("Auth-Application-Id", amr.application_id), ("User-Name", nai),
                                ("MIP-Home-Agent-Address", rrq.home_agent),
                                ("MIP-Mobile-Node-Address", rrq.home_address),
                                *(info.to_avp() for info in moved.for_fa())])

    def end_session(self, str_: Message) -> Message:
        """An FA's STR: the user left it. Drop our cached session if it is that one (after an
        intra-domain move the cache already belongs to the new FA's session: keep it). The
        home AAA server is not bothered: its session follows the user's latest registration."""
        nai = str_.get("User-Name")
        session = self.store.sessions.get(nai) if nai else None
        dropped = session is not None and session.session_id == str_.session_id
        if dropped:
            self.store.drop(nai)
        log.info("session.terminated", mn=nai, sid=str_.session_id, dropped=dropped)
        return str_.answer(ResultCode.DIAMETER_SUCCESS)

    def sessions_at(self, fa_host: str) -> list[Session]:
        """The cached sessions that belong to one FA (by its Diameter identity)."""
        return [s for s in self.store.sessions.values() if s.fa_host.lower() == fa_host.lower()]


__all__ = ["ForeignAAAServer", "ProxyNode"]
