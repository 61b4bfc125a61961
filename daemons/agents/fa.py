"""The foreign agent (RFC 5944 §3.7, RFC 3012): advertisements with challenges, the
visitor list, relaying registrations between mobile nodes and their home agents.

Relaying goes through ``forward_request``; the AAA issue replaces its direct path to the HA
with an AMR to the local AAA server without touching the rest.
"""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import asdict, dataclass
from functools import partial
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from daemons.aaa import application
from daemons.agents.advertiser import Advertiser
from daemons.agents.binding import BindingClient, BindingEvents, BindingPeers, Fresh, ReplayWindow, Retransmit
from daemons.agents.challenges import Verdict
from daemons.agents.datagrams import dispatch
from daemons.agents.routing import VisitorRoutes
from daemons.diameter.node import DiameterNode, DiameterTimeout, DiameterUnavailable, wait_for_peers
from daemons.diameter.setup import Dial, diameter_node
from daemons.runtime.config import DiameterPeer, FAConfig, agent_seal_key
from daemons.runtime.control import ControlServer
from daemons.runtime.log import EventLog
from daemons.runtime.net import LinkUdpEndpoint
from daemons.runtime.ratelimit import Limit, RateLimiter
from daemons.runtime.secret import Secret
from daemons.runtime.tasks import KeyedLocks, background
from daemons.store.records import RecordStore
from daemons.store.state import dataclass_record, float_record, ipv4_fields
from daemons.vpn import vpninfo
from daemons.vpn.mavpn import MavpnControl
from daemons.vpn.path import Capability, EndpointType, PathError
from daemons.vpn.seal import Recipient, SealError
from daemons.wire import mip
from daemons.wire.diameter import Message, ResultCode
from daemons.wire.diameter.constants import TerminationCause

log = EventLog("mipvpn.fa")
Code = mip.ReplyCode
_RRQ = bytes([mip.RegistrationRequest.TYPE])  # the first octet of a Registration Request
# What the MN hears when the AAA says no without a registration reply from the HA.
AAA_DENIALS = {
    ResultCode.DIAMETER_AUTHENTICATION_REJECTED: Code.FA_MN_FAILED_AUTHENTICATION,
    ResultCode.DIAMETER_AUTHORIZATION_REJECTED: Code.FA_ADMINISTRATIVELY_PROHIBITED,
    ResultCode.DIAMETER_USER_UNKNOWN: Code.FA_MN_FAILED_AUTHENTICATION,
    ResultCode.DIAMETER_ERROR_HA_NOT_AVAILABLE: Code.FA_HA_UNREACHABLE,
    ResultCode.DIAMETER_UNABLE_TO_DELIVER: Code.FA_REASON_UNSPECIFIED,
    ResultCode.DIAMETER_REALM_NOT_SERVED: Code.FA_ADMINISTRATIVELY_PROHIBITED,
}


@dataclass
class Visitor:
    nai: str | None
    home_address: str
    home_agent: str
    mn_port: int
    lifetime: int
    expires: float
    identification: int
    session_id: str | None = None  # the Diameter session at our AAAF, if AAA authorised it


@dataclass
class Pending:
    rrq: mip.RegistrationRequest
    raw: bytes  # as the MN sent it: authenticators cover these bytes
    nai: str | None
    mn_port: int
    started: float
    timer: asyncio.TimerHandle | None = None
    vpn: list[vpninfo.VpnInfo] | None = None  # paths the local AAA gave us, installed on the HA's yes
    session_id: str | None = None  # the Diameter session of this registration
    handoff: asyncio.Task[vpninfo.VpnInfo | None] | None = None  # F6 with the previous FA, if any
    # Where the request came from, to answer on the link without a route (RFC 5944 §3.7.1,
    # §3.7.2.3): its IP source, the interface it came in on, the link-layer address the kernel
    # holds for that source (for the record: the kernel resolves the reply itself).
    source: str | None = None
    ifindex: int | None = None
    lladdr: str | None = None
    routed: bool = False  # we put a host route toward it before its registration was accepted (F6)


class ForeignAgent:
    def __init__(self, config: FAConfig) -> None:
        self.config = config
        self.visitors: dict[str, Visitor] = {}
        self.forwards: dict[str, float] = {}  # nai -> when its F6 forwarding path goes (wall clock)
        self.lapsed_forwards: set[str] = set()  # restored: forwarding paths that ran out while we were down
        self.handoff_enabled = config.smooth_handoff  # switchable at run time (the handover benchmark)
        self.pending: dict[tuple[str, int], Pending] = {}  # (home address, low 32 bits of id)
        self.advertiser = Advertiser(config.access_interface, config.access_address,
                                     mip.AdvFlag.R | mip.AdvFlag.F, (config.care_of_address,),
                                     config.max_lifetime, config.advertisement_interval, config.challenge,
                                     config.challenge_window,
                                     RateLimiter(config.solicitation_rate, config.solicitation_burst,
                                                 config.rate_limit_sources))
        self.rrq_limit = RateLimiter(config.rrq_rate, config.rrq_burst, config.rate_limit_sources)
        self.ha_keys = {str(ha.address): ha for ha in config.home_agents}
        self.fa_keys = {str(fa.address): fa for fa in config.peer_agents}
        self.fa_peers = BindingPeers(self.fa_keys)
        # Binding Updates from the neighbouring FAs: the last identification per (FA, home address).
        self.bu_seen = ReplayWindow(config.replay_window)
        self.bu_locks = KeyedLocks()
        self.counters: dict[str, int] = {"received": 0, "malformed": 0, "relayed": 0, "accepted": 0,
                                         "denied": 0, "bu_received": 0, "bu_accepted": 0, "bu_rejected": 0,
                                         "bu_replayed": 0, "bu_duplicate": 0, "bu_unauthenticated_extensions": 0,
                                         "rrq_rate_limited": 0, "rrq_not_on_access": 0, "refused_by_policy": 0,
                                         "rrq_duplicate": 0, "seal_open_failed": 0, "keys_in_clear_refused": 0}
        # Our domain's seal key: opens the keys the AAAH sealed for the FAs of our domain (AMAs).
        own_key = agent_seal_key(config.seal, f"{config.node} (fa)", config.aaa is not None,
                                 "an FA with an AAA server opens the keys the AAAH sealed for its domain")
        self.seal = Recipient(*own_key) if own_key else None
        # F6 Binding Updates to the previous FA: log lines name it "to" (sent) and "src" (acknowledged).
        self.binding = BindingClient(self.fa_peers, log, self.counters, BindingEvents(peer="to", ack_peer="src"))
        self.state = RecordStore.in_dir(config.state_dir, "visitors")
        self.routes = VisitorRoutes(config.access_interface)
        self.udp: LinkUdpEndpoint | None = None
        self.access_ifindex: int | None = None  # where RRQs must come in and replies to MNs go out
        self.control = ControlServer(config.control_socket)
        self.mavpn: MavpnControl | None = None
        self.diameter: DiameterNode | None = None

    # ---- lifecycle ---------------------------------------------------------------------
    async def run(self) -> None:
        self.restore()
        await self.start_paths()
        if self.mavpn is not None:
            # VPN-only access, before any host route: nothing of a visitor leaves in clear.
            await self.mavpn.guard_access(self.visitors)
        await self.routes.reconcile(list(self.visitors))
        self.access_ifindex = socket.if_nametoindex(self.config.access_interface)
        self.udp = await LinkUdpEndpoint.open(self.on_datagram, "0.0.0.0", mip.MIP_UDP_PORT)
        if self.config.aaa is not None:
            await self.start_diameter(self.config.aaa)
        self.control.register("visitors", lambda _: self.show_visitors())
        self.control.register("counters", lambda _: {**self.counters, **self.advertiser.counters,
                                                     "send_failed": self.udp.dropped if self.udp else 0,
                                                     **({"diameter": self.diameter.stats()} if self.diameter else {})})
        self.control.register("paths", lambda _: self.mavpn.show() if self.mavpn else [])
        self.control.register("smooth-handoff", self.set_smooth_handoff)
        await self.control.start()
        log.info("fa.ready", coa=self.config.care_of_address, access=self.config.access_address,
                 visitors=len(self.visitors))
        await asyncio.gather(self.advertiser.run(), self.expire_loop())

    def restore(self) -> None:
        """Visitors and F6 forwarding paths from the state store, record by record (one that
        cannot be read is dropped, logged and deleted: ``daemons.store.records``); those that
        ran out while we were down are dropped."""
        now = time.time()
        saved = self.state.load_records({"visitors": lambda _, r: ipv4_fields(dataclass_record(Visitor, r),
                                                                              "home_address", "home_agent"),
                                         "forwards": lambda _, v: float_record(v),
                                         "binding_ids": lambda _, r: ReplayWindow.record(r)},
                                        keys={"binding_ids": lambda r: ReplayWindow.record_key(r[:2])})
        self.bu_seen.load(saved["binding_ids"].values(), now)
        self.visitors = {v.home_address: v for v in saved["visitors"].values() if v.expires > now}
        self.forwards = {nai: t for nai, t in saved["forwards"].items() if t > now}
        # A live visitor's forwarding path that ran out: the path goes, the visitor stays.
        self.lapsed_forwards = {nai for nai in saved["forwards"] if nai not in self.forwards}
        expired = len(saved["visitors"]) - len(self.visitors) + len(self.lapsed_forwards)
        with self.state.batch():  # the store says what we hold
            for hoa in saved["visitors"]:
                if hoa not in self.visitors:
                    self.state.delete("visitors", hoa)
            for nai in self.lapsed_forwards:
                self.state.delete("forwards", nai)
            self.bu_seen.save(self.state, "binding_ids")  # the identifications that ran out
        self.counters["state_dropped"] = self.state.dropped
        if self.visitors or expired or self.state.dropped:
            log.info("fa.restored", visitors=len(self.visitors), forwards=len(self.forwards), expired=expired,
                     dropped=self.state.dropped)

    def live_users(self) -> set[str]:
        """The users whose paths this FA keeps: its visitors and those it forwards for (F6)."""
        return {v.nai for v in self.visitors.values() if v.nai} | set(self.forwards)

    async def start_paths(self) -> asyncio.Task[None] | None:
        """After :meth:`restore`: the path control, its cached paths reconciled against the
        live visitors and forwards (those that ran out while we were down go). Returns the
        backend's reconciliation, which runs in the background."""
        self.mavpn = await MavpnControl.start(self.config, access_interface=self.config.access_interface)
        if self.mavpn is None:
            return None
        self.counters["state_dropped"] = self.counters.get("state_dropped", 0) + self.mavpn.state.dropped
        lapsed = [(nai, vpninfo.FORWARD_PATH_ID) for nai in self.lapsed_forwards]
        self.lapsed_forwards = set()
        return self.mavpn.reconcile(self.live_users(), lapsed)

    def persist_visitor(self, hoa: str) -> None:
        """The visitor record of ``hoa`` as it stands (none: the record goes)."""
        visitor = self.visitors.get(hoa)
        if visitor is not None:
            self.state.put("visitors", hoa, asdict(visitor))
        else:
            self.state.delete("visitors", hoa)

    def persist_forward(self, nai: str) -> None:
        """When the F6 forwarding path of ``nai`` goes, as it stands (none: the record goes)."""
        expires = self.forwards.get(nai)
        if expires is not None:
            self.state.put("forwards", nai, expires)
        else:
            self.state.delete("forwards", nai)

    async def expire_loop(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            now = time.time()
            for hoa, visitor in list(self.visitors.items()):
                if visitor.expires <= now:
                    await self.remove_visitor(hoa, "lifetime expired")
            for nai, expires in list(self.forwards.items()):
                if expires <= now:
                    await self.end_forwarding(nai, "lifetime expired")

    async def end_forwarding(self, nai: str, reason: str) -> None:
        """The F6 forwarding path of ``nai`` goes; the user's other paths stay."""
        if self.forwards.pop(nai, None) is None:
            return
        self.persist_forward(nai)
        if self.mavpn is not None:
            await self.mavpn.apply(nai, [i for i in self.mavpn.infos(nai) if i.path_id != vpninfo.FORWARD_PATH_ID])
        log.info("forwarding.ended", mn=nai, reason=reason)

    async def remove_visitor(self, hoa: str, reason: str, keep_paths: bool = False) -> None:
        visitor = self.visitors.pop(hoa, None)
        if visitor is None:
            return
        self.persist_visitor(hoa)
        await self.unroute_visitor(hoa)
        if self.mavpn is not None and visitor.nai and not keep_paths:
            await self.mavpn.remove_user(visitor.nai)
        log.info("visitor.removed", mn=visitor.nai, hoa=hoa, reason=reason)
        if self.diameter is not None and visitor.session_id and visitor.nai:
            moved = reason.startswith("moved")
            background(self.end_session(visitor, TerminationCause.DIAMETER_USER_MOVED if moved
                                        else TerminationCause.DIAMETER_LOGOUT))

    async def route_visitor(self, hoa: str) -> None:
        """The host route toward a visitor we take in, after its VPN-only guard (the backend's:
        from here on what it sends is forwarded, but only through its paths)."""
        if self.mavpn is not None:
            await self.mavpn.guard_visitor(hoa)
        await self.routes.add(hoa)

    async def unroute_visitor(self, hoa: str) -> None:
        """Undo :meth:`route_visitor`: the route, then the guard."""
        await self.routes.remove(hoa)
        if self.mavpn is not None:
            await self.mavpn.release_visitor(hoa)

    async def end_session(self, visitor: Visitor, cause: TerminationCause) -> None:
        """Tell our AAAF the session is over (STR, RFC 6733 §8.4), so that no stale VPN
        info stays cached for a user who is gone from here."""
        assert self.diameter is not None and visitor.nai and visitor.session_id
        str_ = application.build_str(visitor.session_id, visitor.nai, cause)
        try:
            sta = application.parse_sta(await self.diameter.request(str_, timeout=3.0))
            log.info("session.ended", mn=visitor.nai, sid=visitor.session_id, result=sta.result_code)
        except DiameterUnavailable as exc:
            log.warning("session.end_failed", mn=visitor.nai, sid=visitor.session_id, reason=exc)

    # ---- registration --------------------------------------------------------------------
    def on_datagram(self, data: bytes, addr: tuple[str, int], ifindex: int | None = None) -> None:
        """A UDP 434 datagram from ``addr`` that came in on interface ``ifindex`` (None: the
        endpoint cannot tell, e.g. a test double; taken for the access link)."""
        self.counters["received"] += 1
        if data[:1] == _RRQ:
            if ifindex is not None and self.access_ifindex is not None and ifindex != self.access_ifindex:
                # We relay for mobile nodes on our access link only: not for one on the core. Checked
                # before the rate limit: a flood from the core in a real MN's name (its home address
                # as source) must not empty that MN's bucket. Logged at 1, 2, 4, 8 ... drops: a
                # flood (from ever new sources) cannot flood the log.
                self.counters["rrq_not_on_access"] += 1
                if (n := self.counters["rrq_not_on_access"]) & (n - 1) == 0:
                    log.warning("rrq.not_on_access", src=addr[0], ifindex=ifindex, count=n)
                return
            if (limit := self.rrq_limit.check(addr[0])) is not Limit.PASS:
                # Before decoding: a flood costs a table look-up per datagram, and no reply.
                self.counters["rrq_rate_limited"] += 1
                if limit is Limit.FIRST_DROP:
                    log.warning("rrq.rate_limited", src=addr[0])
                return
        dispatch(data, addr, {mip.RegistrationRequest: partial(self.on_request, ifindex=ifindex),
                              mip.RegistrationReply: self.on_reply, mip.BindingUpdate: self.on_binding_update,
                              mip.BindingAcknowledge: self.binding.on_ack},
                 self.counters, log, partial(self.poorly_formed, ifindex=ifindex))

    def poorly_formed(self, partial_rrq: mip.Message, addr: tuple[str, int], ifindex: int | None = None) -> None:
        """An RRQ with an unknown non-skippable extension: refused with 70 (RFC 5944 §3.7.2.1)."""
        if isinstance(partial_rrq, mip.RegistrationRequest):
            self.refuse(partial_rrq, addr, Code.FA_POORLY_FORMED_REQUEST, None, ifindex)

    async def on_request(self, rrq: mip.RegistrationRequest, raw: bytes, addr: tuple[str, int],
                         ifindex: int | None = None) -> None:
        nai_ext = rrq.find(mip.NAIExtension)
        nai = nai_ext.nai if nai_ext else None
        lladdr = await self.routes.neighbour(addr[0])
        log.info("rrq.received", mn=nai or rrq.home_address, id=hex(rrq.identification), ha=rrq.home_agent,
                 lifetime=rrq.lifetime, src=addr[0], lladdr=lladdr)
        code = self.check_request(rrq)
        if code == Code.ACCEPTED and (why := self.refused_by_policy(rrq, addr[0])) is not None:
            self.counters["refused_by_policy"] += 1
            log.warning("rrq.refused_by_policy", mn=nai or rrq.home_address, hoa=rrq.home_address, src=addr[0],
                        lladdr=lladdr, reason=why)
            code = Code.FA_ADMINISTRATIVELY_PROHIBITED
        if code != Code.ACCEPTED:
            self.refuse(rrq, addr, code, nai, ifindex)
            return
        # No route toward the home address yet: the request has passed our checks, not its
        # home's. Replies reach the MN on the link (``to_mn``); the route comes with the yes.
        hoa = str(rrq.home_address)
        key = (hoa, rrq.identification & 0xFFFFFFFF)
        if key in self.pending:
            # The same registration again (a copy duplicated on the way, or replayed on the link: an
            # MN's retransmission has a new identification). The first one's answer is on its way;
            # a second AMR, in a new session, would only make us refuse the first one's AMA.
            self.counters["rrq_duplicate"] += 1
            log.info("rrq.duplicate", mn=nai or rrq.home_address, id=hex(rrq.identification), src=addr[0])
            return
        pending = Pending(rrq, raw, nai, addr[1], time.monotonic(), source=addr[0], ifindex=ifindex, lladdr=lladdr)
        pending.timer = asyncio.get_running_loop().call_later(
            self.config.registration_timeout, lambda: background(self.timeout(key)))
        self.pending[key] = pending
        await self.forward_request(rrq, raw)

    def refused_by_policy(self, rrq: mip.RegistrationRequest, source: str) -> str | None:
        """FA-side policy on the claimed home address, which would become a host route onto the
        access link once accepted: why not, or None. Never an address of the infrastructure
        (ours, a home agent's, a peer FA's, the AAA server's, a static path's end) nor one no
        host can own; and the request must come from that address (RFC 5944 §3.6.1.1: an MN
        registering through an FA sends from its home address)."""
        hoa = rrq.home_address
        if hoa.is_unspecified or hoa.is_multicast or hoa.is_loopback or hoa.is_link_local or hoa.is_reserved:
            return "not a unicast host address"
        if hoa in self.infrastructure_addresses() or hoa == rrq.home_agent:
            return "an address of the infrastructure"
        if source != str(hoa):
            return "not sent from the home address it claims"
        return None

    def infrastructure_addresses(self) -> set[IPv4Address]:
        c = self.config
        found = {c.care_of_address, c.access_address, *(a.address for a in (*c.home_agents, *c.peer_agents))}
        if c.aaa is not None:
            found.add(c.aaa.address)
        for path in c.static_paths:
            found |= {path.local, path.remote}
        return found

    def check_request(self, rrq: mip.RegistrationRequest) -> Code:
        """The FA's checks (RFC 5944 §3.7.2.1, RFC 3012 §3.2)."""
        if rrq.lifetime > self.config.max_lifetime:
            return Code.FA_LIFETIME_TOO_LONG
        if rrq.care_of_address != self.config.care_of_address:
            return Code.FA_INVALID_CARE_OF_ADDRESS
        if rrq.find(mip.MNHAAuthExtension) is None:
            return Code.FA_POORLY_FORMED_REQUEST
        if self.advertiser.challenges is not None:
            ext = rrq.find(mip.MNFAChallengeExtension)
            if ext is None:
                return Code.FA_MISSING_CHALLENGE
            verdict = self.advertiser.challenges.check(ext.challenge, str(rrq.home_address))
            if verdict is not Verdict.FRESH:
                # STALE: ours but too old; SPENT: a replay of a request it already registered.
                return Code.FA_UNKNOWN_CHALLENGE if verdict is Verdict.UNKNOWN else Code.FA_STALE_CHALLENGE
            if rrq.find(mip.GeneralizedAuthExtension) is None and rrq.find(mip.MNFAAuthExtension) is None:
                return Code.FA_MN_FAILED_AUTHENTICATION  # §3.2: the challenge must be answered
        return Code.ACCEPTED

    async def forward_request(self, rrq: mip.RegistrationRequest, raw: bytes) -> None:
        """With AAA: ask the local AAA server (AMR), which reaches the HA through the home
        AAA server. Without: relay to the HA directly, keeping everything through the MN-HA
        authenticator untouched, dropping what was only for us (the challenge answer), adding
        FA-HA authentication."""
        if self.diameter is not None:
            await self.ask_aaa(rrq, raw)
            return
        self.relay_to_ha(rrq, raw)

    def relay_to_ha(self, rrq: mip.RegistrationRequest, raw: bytes) -> None:
        relayed = mip.strip_after(raw, mip.EXT_MN_HA_AUTH)
        ha = self.ha_keys.get(str(rrq.home_agent))
        if ha is not None:
            relayed = mip.append_authenticator(relayed, mip.EXT_FA_HA_AUTH, ha.spi, ha.key)
        assert self.udp is not None
        self.udp.send(relayed, (str(rrq.home_agent), mip.MIP_UDP_PORT))
        self.counters["relayed"] += 1
        log.info("rrq.relayed", mn=rrq.find(mip.NAIExtension).nai if rrq.find(mip.NAIExtension) else None,
                 id=hex(rrq.identification), ha=rrq.home_agent)

    # ---- AAA (RFC 4004 AMR/AMA through the local AAA server) ------------------------------
    async def start_diameter(self, aaa: DiameterPeer) -> None:
        """We dial our AAAF (FA → AAAF → AAAH → HA) and send every realm its way. Nobody dials
        us, and an answer is only taken on the connection its request went out on (the engine
        matches it to that request there): an AMA reaches us from our AAAF or not at all."""
        self.diameter = diameter_node(self.config, host_ip_addresses=(str(self.config.care_of_address),),
                                      dial=[Dial.of("aaa", aaa)])
        self.diameter.add_default_route(aaa.host)
        await self.diameter.start()
        await wait_for_peers(self.diameter, [aaa.host])

    async def ask_aaa(self, rrq: mip.RegistrationRequest, raw: bytes) -> None:
        assert self.diameter is not None
        key = (str(rrq.home_address), rrq.identification & 0xFFFFFFFF)
        pending = self.pending.get(key)
        if pending is None:
            return
        nai = pending.nai
        if nai is None or "@" not in nai:
            self._fail(key, Code.FA_MISSING_NAI, "no NAI: the AAA cannot route the request")
            return
        amr = application.build_amr(self.diameter.session_id(nai), nai, rrq, raw)
        pending.session_id = amr.session_id
        log.info("amr.sent", mn=nai, sid=amr.session_id, id=hex(rrq.identification))
        self.counters["relayed"] += 1
        try:
            ama = await self.diameter.request(amr, timeout=max(0.5, self.config.registration_timeout - 0.5))
        except DiameterUnavailable as exc:
            self._fail(key, Code.FA_REASON_UNSPECIFIED if not isinstance(exc, DiameterTimeout)
                       else Code.FA_REGISTRATION_TIMEOUT, f"AAA unavailable: {exc}")
            return
        await self.on_ama(key, ama)

    async def on_ama(self, key: tuple[str, int], msg: Message) -> None:
        pending = self.pending.get(key)
        if pending is None:
            return  # timed out meanwhile: the MN was answered already
        log.info("ama.received", mn=pending.nai, sid=msg.session_id, result=msg.result_code,
                 paths=len(msg.find_all("VPN-Info")))
        if msg.session_id != pending.session_id:
            self.counters["ama_refused"] = self.counters.get("ama_refused", 0) + 1
            self._fail(key, Code.FA_POORLY_FORMED_REPLY, f"AMA for session {msg.session_id}, not {pending.session_id}")
            return
        try:
            ama = application.parse_ama(msg, pending.nai or "")
        except application.ApplicationError as exc:
            if isinstance(exc.__cause__, vpninfo.ClearKeysRefused):
                self.counters["keys_in_clear_refused"] += 1
            self._fail(key, Code.FA_POORLY_FORMED_REPLY, f"unusable AMA: {exc}")
            return
        try:
            vpn = self.open_sealed(list(ama.vpn))
        except SealError as exc:  # nothing installed, the RRQ goes nowhere: the MN hears 71
            self.counters["seal_open_failed"] += 1
            self._fail(key, Code.FA_POORLY_FORMED_REPLY, f"sealed keys refused: {exc}")
            return
        if ama.answered_locally:
            # Claim 17 (F2): our local AAA server answered an intra-domain move itself with
            # the rewritten VPN info; the RRQ goes straight to the HA, our paths follow its yes.
            pending.vpn = vpn
            log.info("rrq.direct_to_ha", mn=pending.nai, reason="answered by the local AAA (intra-domain move)")
            self.start_handoff(pending)  # F6 runs while the HA is asked
            self.relay_to_ha(pending.rrq, pending.raw)
            return
        if ama.rrp is None or ama.rrp_raw is None:
            code = AAA_DENIALS.get(int(ama.result_code or 0), Code.FA_REASON_UNSPECIFIED)
            self._fail(key, code, f"AAA answered {ama.result_code} without a registration reply")
            return
        self.pending.pop(key, None)
        if pending.timer:
            pending.timer.cancel()
        pending.vpn = vpn
        await self.complete(pending, ama.rrp, ama.rrp_raw)

    def open_sealed(self, infos: list[vpninfo.VpnInfo]) -> list[vpninfo.VpnInfo]:
        """An AMA's paths opened under our domain's seal key (SealError: not ours, or tampered)."""
        if infos and self.seal is None:
            raise SealError("no seal key configured")
        return self.seal.open(infos) if self.seal is not None else []

    def _fail(self, key: tuple[str, int], code: Code, reason: str) -> None:
        pending = self.pending.pop(key, None)
        if pending is None:
            return
        if pending.timer:
            pending.timer.cancel()
        log.warning("registration.failed", mn=pending.nai, reason=reason)
        self.deny_pending(pending, code)
        if pending.routed and key[0] not in self.visitors:
            background(self.unroute_visitor(key[0]))

    async def timeout(self, key: tuple[str, int]) -> None:
        pending = self.pending.pop(key, None)
        if pending is None:
            return
        log.warning("rrq.timeout", mn=pending.nai, id=hex(pending.rrq.identification))
        self.deny_pending(pending, Code.FA_REGISTRATION_TIMEOUT)
        if pending.routed and key[0] not in self.visitors:
            await self.unroute_visitor(key[0])

    def refuse(self, rrq: mip.RegistrationRequest, addr: tuple[str, int], code: Code, nai: str | None,
               ifindex: int | None = None) -> None:
        """Our own denial of a request we did not relay: back to where it came from, on the
        link it came in on (RFC 5944 §3.7.2.3); no route is touched."""
        self.deny(rrq, addr[1], code, nai, to=addr[0], ifindex=ifindex)

    def deny_pending(self, pending: Pending, code: Code) -> None:
        self.deny(pending.rrq, pending.mn_port, code, pending.nai, to=pending.source, ifindex=pending.ifindex)

    def deny(self, rrq: mip.RegistrationRequest, port: int, code: Code, nai: str | None, to: str | None = None,
             ifindex: int | None = None) -> None:
        """An FA-generated denial (64-127) straight back to the MN: to ``to`` (the request's IP
        source; by default its home address) on the access link, route or no route."""
        rrp = mip.RegistrationReply(code=code, home_address=rrq.home_address, home_agent=rrq.home_agent,
                                    identification=rrq.identification)
        if nai:
            rrp.extensions.append(mip.NAIExtension(nai))
        self.to_mn(rrp.encode(), (to or str(rrq.home_address), port), ifindex)
        self.counters["denied"] += 1
        log.warning("rrp.denied", mn=nai or rrq.home_address, id=hex(rrq.identification),
                    code=f"{int(code)}({code.name})")

    def to_mn(self, data: bytes, addr: tuple[str, int], ifindex: int | None = None) -> None:
        """To a mobile node on the access link: out of that interface whether or not a route
        leads there (an MN whose registration is not accepted yet has none). Without a known
        interface (a test double's endpoint), by the routing table."""
        assert self.udp is not None
        index = ifindex if ifindex is not None else self.access_ifindex
        if index is None:
            self.udp.send(data, addr)
        else:
            self.udp.send_on_link(data, addr, index, str(self.config.access_address))

    async def on_reply(self, rrp: mip.RegistrationReply, raw: bytes, addr: tuple[str, int]) -> None:
        key = (str(rrp.home_address), rrp.identification & 0xFFFFFFFF)
        pending = self.pending.pop(key, None)
        if pending is None:
            self.counters["malformed"] += 1
            log.warning("rrp.unmatched", src=addr[0], hoa=rrp.home_address, id=hex(rrp.identification))
            return
        if pending.timer:
            pending.timer.cancel()
        # The security association is the one with the HA we relayed to, whatever address
        # the reply claims to come from.
        home_agent = str(pending.rrq.home_agent)
        ha = self.ha_keys.get(home_agent)
        if addr[0] != home_agent or (ha is not None and not mip.verify(raw, mip.EXT_FA_HA_AUTH, ha.key, spi=ha.spi)):
            log.warning("rrp.ha_auth_failed", mn=pending.nai, ha=home_agent, src=addr[0])
            self.pending[key] = pending
            self._fail(key, Code.FA_HA_FAILED_AUTHENTICATION, "reply not authenticated by the home agent")
            return
        await self.complete(pending, rrp, raw)

    async def complete(self, pending: Pending, rrp: mip.RegistrationReply, raw: bytes) -> None:
        """The HA has answered: update the visitor list and pass the reply to the MN."""
        hoa = str(rrp.home_address)
        forward: vpninfo.VpnInfo | None = None
        if rrp.accepted and rrp.lifetime > 0:
            # Accepted: now, and only now, the host route toward the visitor (before its paths,
            # whose traffic needs it, and before the MN hears).
            await self.route_visitor(hoa)
            pending.routed = True
        if pending.vpn is not None and rrp.accepted and rrp.lifetime > 0 and self.mavpn is not None and pending.nai:
            self.start_handoff(pending)
            if pending.handoff is not None:
                forward = await pending.handoff
            # Our paths are up before the MN hears. The forwarding path (if any) came up
            # first: user-space ESP picks the newest of two outbound policies with equal
            # selectors, and the MN's uplink must take the path to the HA, not the one to
            # the old FA.
            await self.mavpn.apply(pending.nai, [*([forward] if forward else []), *pending.vpn])
        elif pending.handoff is not None:
            pending.handoff.cancel()
        challenge = pending.rrq.find(mip.MNFAChallengeExtension)
        if rrp.accepted and challenge is not None and self.advertiser.challenges is not None:
            # Spent only once it bought a registration: a retransmission after a lost reply
            # may still use it, a replay of the accepted request may not.
            self.advertiser.challenges.spend(challenge.challenge, str(pending.rrq.home_address))
        if rrp.accepted and rrp.lifetime > 0:
            self.visitors[hoa] = Visitor(pending.nai, hoa, str(pending.rrq.home_agent), pending.mn_port,
                                         rrp.lifetime, time.time() + rrp.lifetime, rrp.identification,
                                         pending.session_id)
            self.persist_visitor(hoa)
            self.counters["accepted"] += 1
            log.info("visitor.added", mn=pending.nai, hoa=hoa, lifetime=rrp.lifetime, id=hex(rrp.identification))
            if forward is None and pending.nai:
                await self.end_forwarding(pending.nai, "registered here")  # back at an FA it had left
            previous = self.previous_agent(pending)
            if previous is not None and pending.handoff is None:  # no VPN paths: only tell it
                background(self.notify_previous_agent(previous, pending))
        elif rrp.accepted:
            await self.remove_visitor(hoa, "deregistered")
        else:
            self.counters["denied"] += 1
            if pending.routed and hoa not in self.visitors:
                await self.unroute_visitor(hoa)
        to_mn = mip.strip_after(raw, mip.EXT_MN_HA_AUTH) if rrp.find(mip.MNHAAuthExtension) else raw
        self.to_mn(to_mn, (hoa, pending.mn_port), pending.ifindex)
        log.info("rrp.relayed", mn=pending.nai, id=hex(rrp.identification), code=int(rrp.code),
                 ms=round((time.monotonic() - pending.started) * 1000, 1))

    # ---- the previous FA (smooth handoff, F6) --------------------------------------------
    def previous_agent(self, pending: Pending) -> str | None:
        """The FA the MN names as its previous one, if that is another FA we share a key with.
        Read only where the MN-HA authenticator covers it (the MN puts it there; the HA
        verifies it): one appended after the authenticators is nobody's word."""
        previous = mip.previous_fa(mip.covered(pending.rrq, mip.EXT_MN_HA_AUTH).extensions)
        if previous is None or previous == self.config.care_of_address:
            return None
        if str(previous) not in self.fa_keys:
            log.warning("bu.no_security_association", mn=pending.nai, previous_fa=previous)
            return None
        return str(previous)

    def start_handoff(self, pending: Pending) -> None:
        """F6 (claims 22, 23), once we hold the MN's VPN info and it names a previous FA."""
        previous = self.previous_agent(pending)
        ha_path = next((i for i in pending.vpn or [] if i.path.remote.type is EndpointType.HA), None)
        if (not self.handoff_enabled or pending.handoff is not None or previous is None or ha_path is None
                or self.mavpn is None):
            return
        if Capability.FORWARDING_PATHS not in self.mavpn.backend.capabilities:
            # e.g. kernel ESP (xfrm): the forwarding path's inbound/forward policies (any -> home
            # address) would shadow the path to the HA's, whose template the kernel checks;
            # that needs per-path priorities and is not done: the old FA only gets told.
            log.info("forwarding.skipped", mn=pending.nai, backend=self.mavpn.backend.name)
            return
        pending.handoff = asyncio.create_task(self.smooth_handoff(previous, pending, ha_path))

    async def smooth_handoff(self, previous: str, pending: Pending, ha_path: vpninfo.VpnInfo) -> vpninfo.VpnInfo | None:
        """Give the previous FA a copy of our VPN info, rewritten to run old FA -> us, in a
        Binding Update; it swaps its path to the HA for that one and acknowledges. Returns
        our end of the forwarding path once both ends hold it, None if the old FA did not
        take it (the registration goes on without)."""
        assert self.mavpn is not None and pending.nai
        # What the old FA forwards to us must reach the MN from the moment its path is up: the
        # host route comes now, after our checks and the local AAA's yes, before the HA's.
        await self.route_visitor(str(pending.rrq.home_address))
        pending.routed = True
        lifetime = self.config.forwarding_lifetime
        copy = vpninfo.forward_copy(ha_path, IPv4Address(previous), lifetime, self.fa_keys[previous].key)
        ours = copy.mirrored()
        # Both ends install at once; whichever comes second brings the CHILD_SA up. A short
        # wait: the MN's registration reply waits for this.
        install = self.mavpn.apply(pending.nai, [ours, *[i for i in self.mavpn.infos(pending.nai)
                                                         if i.path_id != vpninfo.FORWARD_PATH_ID]])
        _, ack = await asyncio.gather(install, self.notify_previous_agent(previous, pending, copy, first_wait=0.2,
                                                                          attempts=2))
        if ack is None or ack.status != mip.BindingStatus.ACCEPTED:
            await self.mavpn.apply(pending.nai, [i for i in self.mavpn.infos(pending.nai)
                                                 if i.path_id != vpninfo.FORWARD_PATH_ID])
            log.warning("forwarding.failed", mn=pending.nai, previous_fa=previous,
                        status=int(ack.status) if ack else None)
            return None
        self.forwards[pending.nai] = time.time() + lifetime
        self.persist_forward(pending.nai)
        log.info("forwarding.up", mn=pending.nai, previous_fa=previous, lifetime=lifetime)
        return ours

    async def notify_previous_agent(self, previous: str, pending: Pending, forward: vpninfo.VpnInfo | None = None,
                                    first_wait: float = 0.5, attempts: int = 3) -> mip.BindingAcknowledge | None:
        """Tell the FA the MN left that it is now here: a Binding Update (authenticated with
        our FA-FA key, acknowledgement requested, with the VPN info copy for F6),
        retransmitted until acknowledged, each try a new update with a new identification
        (waits ``first_wait``, doubling)."""
        assert self.udp is not None
        hoa = str(pending.rrq.home_address)
        extensions: list[mip.Extension] = [mip.NAIExtension(pending.nai)] if pending.nai else []
        if forward is not None:  # no key material: the old FA derives it from our FA-FA key
            extensions.append(mip.vendor_extension(mip.VENDOR_TYPE_VPN_INFO,
                                                   vpninfo.encode_for_mip([forward]),
                                                   critical=True))

        def update(ident: int) -> mip.BindingUpdate:
            return mip.BindingUpdate(home_address=hoa, care_of_address=self.config.care_of_address,
                                     identification=ident, lifetime=self.config.forwarding_lifetime,
                                     flags=mip.BUFlag.A, extensions=list(extensions))

        return await self.binding.update(self.udp, previous, update,
                                         Retransmit.backoff(first_wait, attempts, fresh_identification=True),
                                         mn=pending.nai, vpn_info=forward is not None)

    async def on_binding_update(self, bu: mip.BindingUpdate, raw: bytes, addr: tuple[str, int]) -> None:
        """The MN moved on to the FA that sends this: forget it here (and, with VPN paths,
        forward to the new FA for a short while: F6). Acted on only when a neighbouring FA's
        authenticator covers all of it (else 131, or 134 for extensions after it) and its
        identification is fresh (else 133); a duplicate of the last update accepted from that
        FA for that home address is answered as it was and changes nothing."""
        self.counters["bu_received"] += 1
        src, hoa = addr[0], str(bu.home_address)
        checked = self.fa_peers.authenticate(raw, src)
        lifetime = bu.lifetime
        if checked is None:
            nai_ext = bu.find(mip.NAIExtension)  # not authenticated: for the log line only
            log.warning("bu.auth_failed", src=src, mn=nai_ext.nai if nai_ext else None)
            status: mip.BindingStatus | int = mip.BindingStatus.AUTHENTICATION_FAILED
        elif checked.trailing:
            nai_ext = checked.message.find(mip.NAIExtension)
            self.counters["bu_unauthenticated_extensions"] += 1
            log.warning("bu.unauthenticated_extensions", src=src, mn=nai_ext.nai if nai_ext else None,
                        id=hex(bu.identification or 0), extensions=checked.trailing)
            status = mip.BindingStatus.POORLY_FORMED_UPDATE
        else:
            assert isinstance(checked.message, mip.BindingUpdate)
            async with self.bu_locks.hold(hoa):  # one update per home address at a time: checked, then recorded
                status, lifetime = await self.take_binding_update(checked.message, checked.peer.key, raw, src)
        self.counters["bu_accepted" if status == mip.BindingStatus.ACCEPTED else "bu_rejected"] += 1
        assert self.udp is not None
        self.fa_peers.acknowledge(self.udp, bu, status, addr, lifetime=lifetime)

    async def take_binding_update(self, bu: mip.BindingUpdate, fa_fa_key: Secret, raw: bytes,
                                  src: str) -> tuple[mip.BindingStatus | int, int]:
        """An authenticated Binding Update (only what its authenticator covers) from the FA at
        ``src``: replay check, then act on it. Returns the answer: (status, lifetime)."""
        nai_ext = bu.find(mip.NAIExtension)
        nai = nai_ext.nai if nai_ext else None
        hoa = str(bu.home_address)
        key = (src, hoa)
        fresh, answer = self.bu_seen.check(key, bu.identification, raw, time.time())
        if fresh is Fresh.DUPLICATE:
            assert answer is not None
            self.counters["bu_duplicate"] += 1
            log.info("bu.duplicate", src=src, mn=nai, id=hex(bu.identification or 0), status=answer[0])
            return answer
        if fresh is Fresh.FULL:
            log.warning("bu.refused", src=src, mn=nai, reason="replay window full")
            return mip.BindingStatus.INSUFFICIENT_RESOURCES, bu.lifetime
        if fresh is not Fresh.FRESH or bu.identification is None:
            self.counters["bu_replayed"] += 1
            log.warning("bu.replay_or_clock", src=src, mn=nai, id=hex(bu.identification or 0), reason=fresh.value)
            return mip.BindingStatus.IDENTIFICATION_MISMATCH, bu.lifetime
        # Spent (and persisted) before anything changes.
        self.bu_seen.accept(key, bu.identification, raw)
        self.bu_seen.save(self.state, "binding_ids", key)
        log.info("bu.received", src=src, mn=nai, hoa=bu.home_address, new_coa=bu.care_of_address)
        # A registration of that MN still in flight here (a late retransmission) is void:
        # the MN is gone; its answer must not bring the visitor back.
        for pending_key in [k for k in self.pending if k[0] == hoa]:
            stale = self.pending.pop(pending_key)
            if stale.timer:
                stale.timer.cancel()
            log.info("rrq.abandoned", mn=stale.nai, id=hex(stale.rrq.identification), reason="MN moved on")
        status = await self.forward_for(bu, nai, fa_fa_key, src)
        await self.remove_visitor(hoa, f"moved to {bu.care_of_address}",
                                  keep_paths=status is mip.BindingStatus.ACCEPTED and nai in self.forwards)
        self.bu_seen.answered(key, bu.identification, status, bu.lifetime)
        return status, bu.lifetime

    async def forward_for(self, bu: mip.BindingUpdate, nai: str | None, fa_fa_key: Secret,
                          new_fa: str) -> mip.BindingStatus:
        """The old FA's part of F6 (claims 22, 23): cache the VPN info copy, replace our path
        to the HA by the one to the new FA (one apply: the old one goes, the new one comes),
        and let it expire after the Binding Update's lifetime. A BU without VPN info only
        moves the MN away."""
        data = mip.find_vendor_data(bu.extensions, mip.VENDOR_TYPE_VPN_INFO)
        if data is None or self.mavpn is None:
            return mip.BindingStatus.ACCEPTED
        try:
            infos = vpninfo.decode_from_mip(data, nai or "", vpninfo.forward_security(fa_fa_key))
        except vpninfo.VpnInfoError as exc:
            log.warning("bu.vpn_info_unusable", src=new_fa, mn=nai, reason=exc)
            return mip.BindingStatus.VPN_INFO_UNSUPPORTED
        home = IPv4Network(f"{bu.home_address}/32")
        if (nai is None or len(infos) != 1 or infos[0].path.local.address != self.config.care_of_address
                or str(infos[0].path.remote.address) != new_fa or infos[0].path.remote_ts != (home,)):
            log.warning("bu.vpn_info_unusable", src=new_fa, mn=nai,
                        reason="not a forwarding path from us to the sender for the MN's home address")
            return mip.BindingStatus.VPN_INFO_UNSUPPORTED
        try:
            await self.mavpn.apply(nai, infos)
        except PathError as exc:
            log.warning("forwarding.failed", mn=nai, new_fa=new_fa, reason=exc)
            return mip.BindingStatus.PATH_SETUP_FAILED
        self.forwards[nai] = time.time() + min(bu.lifetime, self.config.forwarding_lifetime)
        self.persist_forward(nai)
        log.info("forwarding.up", mn=nai, new_fa=new_fa, lifetime=bu.lifetime)
        return mip.BindingStatus.ACCEPTED

    def set_smooth_handoff(self, request: dict[str, Any]) -> dict[str, bool]:
        """Control command: {"enabled": true|false} switches F6 for the next moves; without it, reads."""
        if "enabled" in request:
            self.handoff_enabled = bool(request["enabled"])
            log.info("smooth_handoff.set", enabled=self.handoff_enabled)
        return {"enabled": self.handoff_enabled}

    # ---- show --------------------------------------------------------------------------
    def show_visitors(self) -> list[dict[str, Any]]:
        now = time.time()
        return [{"mn": v.nai, "home_address": v.home_address, "home_agent": v.home_agent,
                 "lifetime": v.lifetime, "remaining": max(0, int(v.expires - now))}
                for v in self.visitors.values()]
