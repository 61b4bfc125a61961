"""The home agent (RFC 5944 §3.8): binding cache, MN-HA authentication, replay protection.

Registrations arrive on UDP 434 (relayed by a foreign agent, or straight from a mobile node
at home) and, with AAA, inside a Diameter HAR: both go through ``process_request``, which
takes the raw RRQ bytes and returns the raw RRP bytes. The binding cache is persisted on
every change, one record per binding (``bindings.db``), before the reply leaves, and reloaded
at start, so a restarted HA carries on with its bindings.

Route optimisation (claims 19-21, 25; flows F4, F5, F8): the HAR may carry FA⇄CN-GW paths in
a dynamic CN-GW's view (Local = the CN-GW). The HA does not install those; it keeps them with
the binding and sends each CN-GW a Binding Update carrying them (VPN-info CVSE, vendor
32473), authenticated with the HA-CN-GW binding key from its configuration, and waits for the
Binding Acknowledge before it answers the registration (HAA / RRP). A move without VPN info
(F2) rewrites their FA end and updates the CN-GW the same way; a deregistration or an expired
binding sends lifetime 0. A CN-GW's Binding Request is answered with a Binding Update while
the binding exists (with what is left of its lifetime), and not at all otherwise.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from ipaddress import IPv4Address
from typing import Any

from daemons.aaa import application
from daemons.agents.advertiser import Advertiser
from daemons.agents.binding import BindingClient, BindingEvents, BindingPeers, Fresh, ReplayWindow, Retransmit
from daemons.agents.routing import HomeLink
from daemons.diameter.node import DiameterError, DiameterNode
from daemons.diameter.peer import Peer
from daemons.diameter.setup import diameter_node
from daemons.runtime.config import HAConfig, MobileNodeEntry, PeerAgent, agent_seal_key
from daemons.runtime.control import ControlServer
from daemons.runtime.log import EventLog
from daemons.runtime.net import UdpEndpoint
from daemons.runtime.tasks import background
from daemons.store.records import RecordStore
from daemons.store.state import dataclass_record, int_record, ipv4_fields
from daemons.vpn import vpninfo
from daemons.vpn.mavpn import MavpnControl
from daemons.vpn.path import EndpointType
from daemons.vpn.seal import Recipient, SealError
from daemons.vpn.vpninfo import VpnInfo, moved_to
from daemons.wire import mip
from daemons.wire.diameter import Message, ResultCode

log = EventLog("mipvpn.ha")
Code = mip.ReplyCode


@dataclass
class Binding:
    nai: str
    home_address: str
    care_of_address: str
    lifetime: int  # granted, seconds
    expires: float  # wall-clock time (survives a restart)
    identification: int
    relayed_by: str | None  # the FA that relayed the request, if any

    def remaining(self, now: float) -> int:
        return max(0, int(self.expires - now))


def split_paths(infos: Iterable[VpnInfo]) -> tuple[list[VpnInfo], list[VpnInfo]]:
    """(the paths the HA installs, the FA⇄dynamic CN-GW paths it passes on in Binding Updates)."""
    own: list[VpnInfo] = []
    remote: list[VpnInfo] = []
    for info in infos:
        (remote if info.path.local.type is EndpointType.CNGW_DYNAMIC else own).append(info)
    return own, remote


def by_gateway(infos: Iterable[VpnInfo]) -> dict[str, list[VpnInfo]]:
    """CN-GW paths grouped by the gateway (their local end)."""
    out: dict[str, list[VpnInfo]] = {}
    for info in infos:
        out.setdefault(str(info.path.local.address), []).append(info)
    return out


class HomeAgent:
    def __init__(self, config: HAConfig) -> None:
        self.config = config
        self.by_hoa: dict[str, MobileNodeEntry] = {str(m.home_address): m for m in config.mobile_nodes}
        self.by_nai: dict[str, MobileNodeEntry] = {m.nai: m for m in config.mobile_nodes}
        self.fa_keys = {str(fa.address): fa for fa in config.foreign_agents}
        self.cngw_keys: dict[str, PeerAgent] = {str(gw.address): gw for gw in config.correspondent_gateways}
        # Route optimisation: per home address, the FA⇄CN-GW paths in the CN-GWs' view (they
        # hold keys: a store of their own in the private state directory, like the MAVPN cache).
        self.cn_paths: dict[str, list[VpnInfo]] = {}
        self.cn_state = RecordStore.in_dir(config.state_dir, "cngw-paths")
        self.cngw_peers = BindingPeers(self.cngw_keys)
        # Binding Requests: the last identification per (CN-GW, home address). Not persisted: a
        # request replayed across our restart only gets the binding as it stands.
        self.br_seen = ReplayWindow(config.replay_window)
        self.bindings: dict[str, Binding] = {}
        self.last_ident: dict[str, int] = {}  # per home address: replay protection
        self.counters: dict[str, int] = {"received": 0, "malformed": 0, "accepted": 0, "denied": 0, "bu_sent": 0,
                                         "ba_received": 0, "br_received": 0, "br_replayed": 0,
                                         "br_unauthenticated_extensions": 0, "seal_open_failed": 0,
                                         "keys_in_clear_refused": 0}
        # Our seal key: the AAAH seals the keys of our paths for us (a HAR carries nothing else).
        own_key = agent_seal_key(config.seal, f"{config.node} (ha)", bool(config.diameter_host),
                                 "a home agent that takes HARs opens the keys the AAAH sealed for it")
        self.seal = Recipient(*own_key) if own_key else None
        # Binding Updates to the dynamic CN-GWs: log lines name the gateway "cngw".
        self.binding = BindingClient(self.cngw_peers, log, self.counters, BindingEvents(
            peer="cngw", ack_peer="cngw", ack_lifetime=True, unacknowledged_id=True, sent_counter="bu_sent",
            ack_counter="ba_received"))
        self.state = RecordStore.in_dir(config.state_dir, "bindings")
        self.home_link = HomeLink(config.home_interface)
        self.udp: UdpEndpoint | None = None
        self.control = ControlServer(config.control_socket)
        self.mavpn: MavpnControl | None = None
        self.diameter: DiameterNode | None = None
        # On the home link the HA advertises itself (H flag), so a returning MN knows it
        # is home. No challenge: registrations there go straight to us.
        self.advertiser = Advertiser(config.home_interface, config.address, mip.AdvFlag.H,
                                     (config.address,), config.max_lifetime, 1.0, challenge=False)

    # ---- lifecycle ---------------------------------------------------------------------
    async def run(self) -> None:
        self.restore()
        await self.home_link.reconcile(list(self.bindings))
        await self.start_paths()
        if self.config.diameter_host:
            await self.start_diameter()
        # Bound to the home agent address: replies then come from the address the FA and
        # the MN know us by (and authenticate us by), whatever interface they leave from.
        self.udp = await UdpEndpoint.open(self.on_datagram, str(self.config.address), mip.MIP_UDP_PORT)
        self.control.register("bindings", lambda _: self.show_bindings())
        self.control.register("counters", lambda _: {**self.counters,
                                                     **({"diameter": self.diameter.stats()} if self.diameter else {})})
        self.control.register("paths", lambda _: self.mavpn.show() if self.mavpn else [])
        await self.control.start()
        log.info("ha.ready", address=self.config.address, bindings=len(self.bindings))
        await asyncio.gather(self.advertiser.run(), self.expire_loop())

    async def expire_loop(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            await self.expire(time.time())

    def restore(self) -> None:
        """Bindings, identifications and CN-GW paths from the state stores, record by record
        (one that cannot be read is dropped, logged and deleted: ``daemons.store.records``); a
        binding that ran out while we were down is dropped, with its CN-GW paths."""
        now = time.time()
        saved = self.state.load_records({"bindings": lambda _, r: ipv4_fields(dataclass_record(Binding, r),
                                                                              "home_address", "care_of_address"),
                                         "last_ident": lambda _, v: int_record(v)})
        live = [b for b in saved["bindings"].values() if b.expires > now]
        self.bindings = {b.home_address: b for b in live}
        self.last_ident = saved["last_ident"]
        expired = len(saved["bindings"]) - len(live)

        def cn_paths(hoa: str, hexes: object) -> list[VpnInfo] | None:
            binding = self.bindings.get(hoa)
            return None if binding is None else vpninfo.from_record(hexes, binding.nai)  # type: ignore[arg-type]

        cn = self.cn_state.load_records({"paths": cn_paths})["paths"]
        self.cn_paths = {hoa: infos for hoa, infos in cn.items() if infos is not None}
        dropped = self.state.dropped + self.cn_state.dropped
        with self.state.batch():  # the stores say what we hold
            for hoa in saved["bindings"]:
                if hoa not in self.bindings:
                    self.state.delete("bindings", hoa)
        with self.cn_state.batch():
            for hoa in cn:
                if hoa not in self.cn_paths:
                    self.cn_state.delete("paths", hoa)
        self.counters["state_dropped"] = dropped
        if self.bindings or expired or dropped:
            log.info("ha.restored", bindings=len(self.bindings), expired=expired, cngw_paths=len(self.cn_paths),
                     dropped=dropped)

    def live_users(self) -> set[str]:
        """The users whose paths this HA keeps: those with a binding."""
        return {b.nai for b in self.bindings.values()}

    async def start_paths(self) -> asyncio.Task[None] | None:
        """After :meth:`restore`: the path control, its cached paths reconciled against the
        live bindings (those of bindings that ran out while we were down go). Returns the
        backend's reconciliation, which runs in the background."""
        self.mavpn = await MavpnControl.start(self.config)
        if self.mavpn is None:
            return None
        self.counters["state_dropped"] = self.counters.get("state_dropped", 0) + self.mavpn.state.dropped
        return self.mavpn.reconcile(self.live_users())

    def persist(self, hoa: str) -> None:
        """The binding of ``hoa`` as it stands (none: its record goes) and its last
        identification, committed together."""
        with self.state.batch():
            binding = self.bindings.get(hoa)
            if binding is not None:
                self.state.put("bindings", hoa, asdict(binding))
            else:
                self.state.delete("bindings", hoa)
            if hoa in self.last_ident:
                self.state.put("last_ident", hoa, self.last_ident[hoa])

    def persist_cn_paths(self, hoa: str) -> None:
        """The CN-GW paths of ``hoa`` as they stand (none: the record goes)."""
        infos = self.cn_paths.get(hoa)
        if infos:
            self.cn_state.put("paths", hoa, vpninfo.to_record(infos))
        else:
            self.cn_state.delete("paths", hoa)

    async def expire(self, now: float) -> None:
        expired = [b for b in self.bindings.values() if b.expires <= now]
        if expired:
            with self.state.batch():
                for binding in expired:
                    del self.bindings[binding.home_address]
                    self.persist(binding.home_address)
        for binding in expired:
            await self.home_link.release(binding.home_address)
            if self.mavpn is not None:
                await self.mavpn.remove_user(binding.nai)
            log.info("binding.expired", mn=binding.nai, hoa=binding.home_address, coa=binding.care_of_address)
            if binding.home_address in self.cn_paths:  # the CN-GWs lose theirs too (lifetime 0)
                background(self.update_correspondents(binding.nai, IPv4Address(binding.home_address),
                                                      IPv4Address(binding.care_of_address), 0, []))

    # ---- Diameter: registrations from the home AAA server (RFC 4004 HAR/HAA) ---------------
    async def start_diameter(self) -> None:
        """The AAAH dials us (FA → AAAF → AAAH → HA): we only listen, for the home AAA servers
        of ``accept_peers`` (nobody else may connect, RFC 6733 §5.3)."""
        self.counters.setdefault("har_refused", 0)
        self.diameter = diameter_node(self.config, host_ip_addresses=(str(self.config.address),),
                                      listen_address=str(self.config.address))
        self.diameter.register_handler(application.APPLICATION_ID, application.HAR_COMMAND, self.on_har,
                                       required=application.HAR_REQUIRED)
        await self.diameter.start()

    def home_aaa(self, peer: Peer | None) -> bool:
        """Whether the connection a request came on is one of our home AAA servers' (the peer
        the Diameter engine identified, not what the request claims)."""
        return peer is not None and not peer.dynamic and \
            peer.key in {p.host.lower() for p in self.config.accept_peers if not p.agent}

    async def on_har(self, msg: Message, peer: Peer | None) -> Message:
        """Claim 16: take the RRQ and the VPN info from the HAR, install our paths, answer
        HAA with the registration reply (the paths are up before the reply leaves). Only from
        our home AAA server(s): from any other peer, 5003 and nothing is touched."""
        if not self.home_aaa(peer):
            self.counters["har_refused"] = self.counters.get("har_refused", 0) + 1
            log.warning("har.refused", mn=msg.get("User-Name"), sid=msg.session_id,
                        peer=peer.host if peer is not None else None, reason="not a home AAA server of this HA")
            raise DiameterError(ResultCode.DIAMETER_AUTHORIZATION_REJECTED, "not a home AAA server of this HA")
        assert peer is not None
        source = f"aaa:{peer.host}"
        try:
            har = application.parse_har(msg)
        except application.BadRegistration as exc:
            # Not a registration request: answered as one on UDP 434 would be (RFC 5944 §3.8.2.1).
            log.info("har.received", mn=msg.get("User-Name"), sid=msg.session_id, paths=len(msg.find_all("VPN-Info")))
            rrp = await self.process_request(exc.raw, source)
        except application.ApplicationError as exc:
            if isinstance(exc.__cause__, vpninfo.ClearKeysRefused):
                self.counters["keys_in_clear_refused"] += 1
                log.warning("har.keys_in_clear", mn=msg.get("User-Name"), sid=msg.session_id, peer=peer.host)
            raise DiameterError(exc.result_code, str(exc), failed_avp=exc.failed_avp) from None
        else:
            log.info("har.received", mn=har.nai, sid=har.session_id, paths=len(har.vpn))
            try:
                vpn = self.open_sealed(list(har.vpn))
            except SealError as exc:  # nothing installed, no binding: the AAAH hears 4007
                self.counters["seal_open_failed"] += 1
                log.warning("har.keys_refused", mn=har.nai, sid=har.session_id, reason=str(exc))
                raise DiameterError(ResultCode.DIAMETER_ERROR_BAD_KEY, "sealed keys refused") from None
            rrp = await self.process_request(har.rrq_raw, source, vpn, har.rrq)
        if rrp is None:
            raise DiameterError(ResultCode.DIAMETER_INVALID_AVP_VALUE, "MIP-Reg-Request is not a valid RRQ",
                                failed_avp=["MIP-Reg-Request"])
        reply = mip.decode_message(rrp)  # our own reply: a RegistrationReply
        return application.build_haa(msg, rrp, accepted=reply.accepted)

    def open_sealed(self, infos: list[VpnInfo]) -> list[VpnInfo]:
        """A HAR's paths with our own opened under our seal key; the dynamic CN-GWs' copies stay
        sealed (for them: we pass them on, unread). SealError if one of ours does not open."""
        own, remote = split_paths(infos)
        if own and self.seal is None:
            raise SealError("no seal key configured")
        return [*(self.seal.open(own) if self.seal is not None else []), *remote]

    # ---- registration ------------------------------------------------------------------
    def on_datagram(self, data: bytes, addr: tuple[str, int]) -> None:
        background(self._serve(data, addr))

    async def _serve(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            msg = mip.decode_message(data)
        except mip.DecodeError:
            msg = None  # process_request says why
        if isinstance(msg, mip.BindingAcknowledge):
            self.binding.on_ack(msg, data, addr)
            return
        if isinstance(msg, mip.BindingRequest):
            await self.on_binding_request(msg, data, addr)
            return
        reply = await self.process_request(data, addr[0])
        if reply is not None and self.udp:
            self.udp.send(reply, addr)

    async def process_request(self, raw: bytes, source: str, vpn: list[VpnInfo] | None = None,
                              decoded: mip.RegistrationRequest | None = None) -> bytes | None:
        """Handle one raw RRQ; the raw RRP to send back, or None to drop silently. ``vpn``:
        the paths the AAAH distributed with it, installed when the registration is accepted;
        ``decoded``: ``raw`` already decoded (a HAR's, by its parser)."""
        self.counters["received"] += 1
        try:
            rrq = decoded if decoded is not None else mip.decode_message(raw)
        except mip.UnknownExtensionError as exc:
            # RFC 5944 §3.8.2.1: an unknown non-skippable extension is a poorly formed
            # request; we can only answer if the fixed part is readable.
            return self._poorly_formed(source, exc)
        except mip.DecodeError as exc:
            self.counters["malformed"] += 1
            log.warning("rrq.malformed", src=source, reason=exc)
            return None
        if not isinstance(rrq, mip.RegistrationRequest):
            self.counters["malformed"] += 1
            log.warning("rrq.unexpected", src=source, type=type(rrq).__name__)
            return None
        # Only what the MN-HA authenticator covers is the MN's word (RFC 5944 §3.6.1.3: what the
        # HA uses precedes it; what follows is the FA's or nobody's): the NAI is read there.
        nai_ext = mip.covered(rrq, mip.EXT_MN_HA_AUTH).find(mip.NAIExtension)
        nai = nai_ext.nai if nai_ext else None
        entry = self.by_nai.get(nai) if nai else None
        entry = entry or self.by_hoa.get(str(rrq.home_address))
        mn = nai or str(rrq.home_address)
        log.info("rrq.received", mn=mn, id=hex(rrq.identification), src=source, coa=rrq.care_of_address,
                 lifetime=rrq.lifetime)
        now = time.time()
        code, lifetime = self._check(raw, rrq, entry, source, now)
        hoa = str(entry.home_address) if entry else str(rrq.home_address)
        if code == Code.ACCEPTED and entry is not None:
            self.last_ident[hoa] = rrq.identification
            await self._apply(rrq, entry, lifetime, source, now)
            leaving = rrq.is_deregistration or rrq.care_of_address == entry.home_address
            own, remote = split_paths(vpn) if vpn is not None else (None, None)
            if self.mavpn is not None:
                if leaving:
                    await self.mavpn.remove_user(entry.nai)
                elif own is not None:
                    await self.mavpn.apply(entry.nai, own)
                else:
                    await self.follow_move(entry.nai, rrq.care_of_address)
            # F4/F5: the dynamic CN-GWs have acknowledged before the registration is answered.
            await self.update_correspondents(entry.nai, entry.home_address, rrq.care_of_address,
                                             0 if leaving else lifetime, remote)
        ident = mip.reply_identification(rrq.identification, now, accepted=code != Code.HA_IDENTIFICATION_MISMATCH)
        rrp = mip.RegistrationReply(code=code, home_address=hoa if entry else rrq.home_address,
                                    home_agent=self.config.address, identification=ident,
                                    lifetime=lifetime if code == Code.ACCEPTED else 0)
        if nai_ext:
            rrp.extensions.append(mip.NAIExtension(nai_ext.nai))
        if entry is not None:
            rrp = mip.sign(rrp, mip.EXT_MN_HA_AUTH, entry.spi, entry.key)
        wire = rrp.encode()
        fa = self.fa_keys.get(source)
        if fa is not None and source != str(rrq.home_address):
            wire = mip.append_authenticator(wire, mip.EXT_FA_HA_AUTH, fa.spi, fa.key)
        self.counters["accepted" if code == Code.ACCEPTED else "denied"] += 1
        log.event("rrp.sent", mn=mn, id=hex(ident), code=f"{int(code)}({Code(code).name})", lifetime=rrp.lifetime,
                  level=20 if code == Code.ACCEPTED else 30)
        return wire

    def _check(self, raw: bytes, rrq: mip.RegistrationRequest, entry: MobileNodeEntry | None, source: str,
               now: float) -> tuple[Code, int]:
        """The HA's validity checks (RFC 5944 §3.8.2), in the RFC's order."""
        if entry is None:
            log.warning("rrq.unknown_mn", hoa=rrq.home_address)
            return Code.HA_MN_FAILED_AUTHENTICATION, 0
        if not mip.verify(raw, mip.EXT_MN_HA_AUTH, entry.key, spi=entry.spi):
            log.warning("rrq.auth_failed", mn=entry.nai, reason="MN-HA authenticator or SPI mismatch")
            return Code.HA_MN_FAILED_AUTHENTICATION, 0
        fa = self.fa_keys.get(source)
        # RFC 5944 §3.5.4: with an FA-HA security association the extension must be there.
        if fa is not None and not mip.verify(raw, mip.EXT_FA_HA_AUTH, fa.key, spi=fa.spi):
            log.warning("rrq.fa_auth_failed", mn=entry.nai, fa=source)
            return Code.HA_FA_FAILED_AUTHENTICATION, 0
        if not mip.identification_acceptable(self.last_ident.get(str(entry.home_address)), rrq.identification, now,
                                             self.config.replay_window):
            log.warning("rrq.replay_or_clock", mn=entry.nai, id=hex(rrq.identification))
            return Code.HA_IDENTIFICATION_MISMATCH, 0
        if rrq.home_agent != self.config.address:
            return Code.HA_UNKNOWN_HA_ADDRESS, 0
        if not rrq.is_deregistration and rrq.care_of_address in self.config.home_prefix \
                and rrq.care_of_address != entry.home_address:
            return Code.HA_POORLY_FORMED_REQUEST, 0
        return Code.ACCEPTED, min(rrq.lifetime, self.config.max_lifetime)

    async def _apply(self, rrq: mip.RegistrationRequest, entry: MobileNodeEntry, lifetime: int, source: str,
                     now: float) -> None:
        hoa = str(entry.home_address)
        coa = str(rrq.care_of_address)
        if rrq.is_deregistration or rrq.care_of_address == entry.home_address:
            old = self.bindings.pop(hoa, None)
            self.persist(hoa)
            await self.home_link.release(hoa)
            log.info("binding.removed", mn=entry.nai, hoa=hoa, was=old.care_of_address if old else None,
                     reason="deregistration")
            return
        previous = self.bindings.get(hoa)
        self.bindings[hoa] = Binding(entry.nai, hoa, coa, lifetime, now + lifetime, rrq.identification,
                                     source if source != hoa else None)
        self.persist(hoa)
        await self.home_link.intercept(hoa)
        log.info("binding.updated" if previous else "binding.created", mn=entry.nai, hoa=hoa, coa=coa,
                 lifetime=lifetime, previous_coa=previous.care_of_address if previous else None)

    async def follow_move(self, nai: str, coa: IPv4Address) -> None:
        """Claim 17 (F2): a registration straight from a new FA of the same domain carries
        no VPN info; rewrite the FA end of our cached paths to the new FA: the path to the
        old FA goes, the one to the new FA is installed."""
        assert self.mavpn is not None
        infos = self.mavpn.infos(nai)
        moved = moved_to(infos, coa)
        if moved != infos:
            log.info("paths.follow_move", mn=nai, coa=coa)
            await self.mavpn.apply(nai, moved)

    # ---- route optimisation: Binding Update / Acknowledge / Request with dynamic CN-GWs ----------
    async def update_correspondents(self, nai: str, hoa: IPv4Address, coa: IPv4Address, lifetime: int,
                                    fresh: list[VpnInfo] | None) -> None:
        """Bring the dynamic CN-GWs in line with a registration: ``fresh`` paths from the AAAH
        (None: keep ours, moved to ``coa``), lifetime 0 to remove. Every CN-GW concerned gets
        a Binding Update (one that has no path any more: lifetime 0); returns once each has
        acknowledged or given up."""
        key = str(hoa)
        old = self.cn_paths.get(key, [])
        if lifetime == 0:
            new: list[VpnInfo] = []
        else:
            new = fresh if fresh is not None else moved_to(old, coa)
        if not old and not new:
            return
        if new:
            self.cn_paths[key] = new
        else:
            self.cn_paths.pop(key, None)
        self.persist_cn_paths(key)
        before, after = by_gateway(old), by_gateway(new)
        sends = [self.send_binding_update(gw, nai, hoa, coa, lifetime, infos) for gw, infos in after.items()]
        sends += [self.send_binding_update(gw, nai, hoa, coa, 0, []) for gw in before if gw not in after]
        await asyncio.gather(*sends)

    async def send_binding_update(self, gateway: str, nai: str, hoa: IPv4Address, coa: IPv4Address, lifetime: int,
                                  infos: list[VpnInfo]) -> mip.BindingAcknowledge | None:
        """One Binding Update to a CN-GW (acknowledgement requested), retransmitted with the
        same identification until acknowledged (3 tries, the wait doubling once)."""
        if gateway not in self.cngw_peers or self.udp is None:
            log.warning("bu.no_security_association", mn=nai, cngw=gateway)
            return None
        extensions: list[mip.Extension] = [mip.NAIExtension(nai)]
        if lifetime:
            extensions.append(mip.vendor_extension(mip.VENDOR_TYPE_VPN_INFO, vpninfo.encode_for_mip(infos),
                                                   critical=True))
        lifetime = min(lifetime, 0xFFFF)  # a 16-bit field; a registration may be granted longer

        def update(ident: int) -> mip.BindingUpdate:
            return mip.BindingUpdate(home_address=hoa, care_of_address=coa, identification=ident, lifetime=lifetime,
                                     flags=mip.BUFlag.A, extensions=extensions)

        timeout = self.config.binding_ack_timeout
        return await self.binding.update(self.udp, gateway, update, Retransmit.backoff(timeout, 3, ceiling=2 * timeout),
                                         mn=nai, coa=coa, lifetime=lifetime, paths=len(infos))

    async def on_binding_request(self, br: mip.BindingRequest, raw: bytes, addr: tuple[str, int]) -> None:
        """F8: a CN-GW's binding is running out. Still bound: a Binding Update with what is left
        of the registration; otherwise no answer (the CN-GW drops the paths at expiry). A
        request is answered only if the CN-GW's authenticator covers all of it and its
        identification is fresh (later than the last one from that CN-GW for that home
        address, within the window): anything else is dropped and counted (no message
        answers a Binding Request's refusal)."""
        gateway = addr[0]
        hoa = str(br.home_address)
        now = time.time()
        checked = self.cngw_peers.authenticate(raw, gateway)
        if checked is None:
            self.counters["malformed"] += 1
            log.warning("br.rejected", src=gateway, hoa=hoa)
            return
        if checked.trailing:
            self.counters["br_unauthenticated_extensions"] += 1
            log.warning("br.unauthenticated_extensions", src=gateway, hoa=hoa, id=hex(br.identification),
                        extensions=checked.trailing)
            return
        key = (gateway, hoa)
        fresh, _ = self.br_seen.check(key, br.identification, raw, now)
        if fresh is not Fresh.FRESH:  # a duplicate too: the CN-GW never sends the same request twice
            self.counters["br_replayed"] += 1
            log.warning("br.replay_or_clock", src=gateway, hoa=hoa, id=hex(br.identification), reason=fresh.value)
            return
        self.br_seen.accept(key, br.identification, raw)
        self.counters["br_received"] += 1
        binding = self.bindings.get(hoa)
        infos = by_gateway(self.cn_paths.get(hoa, [])).get(gateway, [])
        remaining = binding.remaining(now) if binding is not None else 0
        log.info("br.received", cngw=gateway, hoa=hoa, bound=binding is not None and bool(infos),
                 remaining=remaining)
        if binding is None or not infos or remaining <= 0:
            return
        await self.send_binding_update(gateway, binding.nai, br.home_address, IPv4Address(binding.care_of_address),
                                       remaining, infos)

    def _poorly_formed(self, source: str, exc: mip.UnknownExtensionError) -> bytes | None:
        self.counters["malformed"] += 1
        log.warning("rrq.unknown_extension", src=source, reason=exc)
        rrq = exc.partial
        if not isinstance(rrq, mip.RegistrationRequest):
            return None
        return mip.RegistrationReply(code=Code.HA_POORLY_FORMED_REQUEST, home_address=rrq.home_address,
                                     home_agent=self.config.address, identification=rrq.identification).encode()

    # ---- show --------------------------------------------------------------------------
    def show_bindings(self) -> list[dict[str, Any]]:
        now = time.time()
        return [{"mn": b.nai, "home_address": b.home_address, "care_of_address": b.care_of_address,
                 "lifetime": b.lifetime, "remaining": b.remaining(now), "identification": hex(b.identification),
                 "relayed_by": b.relayed_by,
                 "cngws": ",".join(sorted(by_gateway(self.cn_paths.get(b.home_address, []))))}
                for b in self.bindings.values()]
