"""The home AAA server (AAAH, claims 1-8 and 16): authenticates the mobile node, builds its
VPN information from the VPN database and distributes it (HAR to the HA, AMA to the FA).

One registration (flow F1, RFC 4004 AMR/HAR)::

    FA --AMR(RRQ)--> AAAF --AMR--> AAAH    user lookup, MN-AAA check (DB secret only)
                                   AAAH    VPN info from the profiles; cached per user
                                   AAAH --HAR(RRQ + VPN-Info, HA view)--> HA
                                   AAAH <--HAA(RRP)-- HA
    FA <--AMA-- AAAF <--AMA(RRP + VPN-Info, FA view)-- AAAH

The paths of one registration (static CN-GW, claim 16):

* path 1, FA⇄HA: per-user selectors (home address ⇄ every static profile destination), fresh
  ESP keys from the CSPRNG, SPIs unique per receiving gateway (>= 0x10000), a fresh IKE PSK;
* path 2.., HA⇄CN-GW per static gateway: the standing network-to-network tunnel (home prefix ⇄
  what the gateway accommodates, ``static_suite``), with the static keys both ends derive from the master secret
  (``daemons.vpn.keys.static_spi/static_esp_key``), so the HA's half matches the CN-GW's;
* then, per dynamic CN-GW (route optimisation, claim 19), FA⇄CN-GW: home address ⇄ what the
  gateway accommodates, fresh keys; the HA passes the CN-GW's copy on in a Binding Update.

Each user's registration is cached as a :class:`daemons.aaa.sessions.Session` (NAI, Diameter
session, FA, paths; the AAAF caches the same class), persisted in the daemon's private state
directory. The AMR/AMA and HAR/HAA are built and parsed by ``daemons.aaa.application``.

Result codes of the AMA (RFC 6733 §7.1, RFC 4004 §4.1, RFC 4006 §9.1):

* 2001 the HA accepted the registration (MIP-Reg-Reply + the FA's VPN-Info);
* 4005 DIAMETER_ERROR_MIP_REPLY_FAILURE the HA refused it (its MIP-Reg-Reply passed through);
* 4006 DIAMETER_ERROR_HA_NOT_AVAILABLE the HA is not configured, not connected or silent;
* 4001 DIAMETER_AUTHENTICATION_REJECTED no or a wrong MN-AAA authenticator, unknown SPI;
* 5030 DIAMETER_USER_UNKNOWN the NAI is not in the database;
* 5003 DIAMETER_AUTHORIZATION_REJECTED the user is disabled, or the RRQ names another home address;
* 5004 DIAMETER_INVALID_AVP_VALUE MIP-Reg-Request is not a registration request.
"""

from __future__ import annotations

import time
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from daemons.aaa import application
from daemons.aaa.sessions import Session, SessionStore, path_text
from daemons.diameter.node import DiameterError, DiameterUnavailable, wait_for_peers
from daemons.diameter.setup import Dial, diameter_node
from daemons.runtime.config import AAAHConfig, ConfigError, HomeAgentRef, read_key_file
from daemons.runtime.control import ControlServer
from daemons.runtime.log import EventLog
from daemons.runtime.secret import Secret
from daemons.runtime.tasks import KeyedLocks, serve
from daemons.store.state import int_record
from daemons.store.vpndb import (
    CngwMode,
    Distribution,
    Gateway,
    User,
    VpnDatabase,
    VpnDbError,
    VpnProfile,
    open_database,
)
from daemons.vpn import vpninfo
from daemons.vpn.keys import new_esp_key, new_psk, pair_psk, static_esp_key, static_spi
from daemons.vpn.path import Endpoint, EndpointType, EspSuite, SecurityService, VpnPath
from daemons.vpn.seal import Keyring, SealError
from daemons.vpn.vpninfo import VpnInfo, direction_keys
from daemons.wire import mip
from daemons.wire.diameter import Message, ResultCode
from daemons.wire.mip.vendor import requests_service_update, service_update

log = EventLog("mipvpn.aaah")
FIRST_DYNAMIC_SPI = 0x10000  # below: the static paths' SPIs (daemons.vpn.keys.static_spi)
FA_PATH_ID = 1
ANY = IPv4Network("0.0.0.0/0")


def _distribution(profiles: list[VpnProfile]) -> int:
    """Claim 5: the path toward a correspondent's gateway is set up on traffic only if every
    profile of the user through that gateway says ``on_traffic`` (one path per gateway)."""
    on_traffic = bool(profiles) and all(p.distribution is Distribution.ON_TRAFFIC for p in profiles)
    return vpninfo.ON_TRAFFIC if on_traffic else vpninfo.AT_REGISTRATION


# ---- SPIs --------------------------------------------------------------------------------------


class SpiAllocator:
    """SPIs for per-registration SAs, unique per receiving gateway, from 0x10000 up."""

    def __init__(self, state: dict[str, int] | None = None) -> None:
        self.next: dict[str, int] = dict(state or {})
        self.used: dict[str, set[int]] = {}
        self.changed: set[str] = set()  # gateways whose counter moved since the owner last persisted it

    def allocate(self, gateway: IPv4Address | str) -> int:
        gw = str(gateway)
        used = self.used.setdefault(gw, set())
        spi = self.next.get(gw, FIRST_DYNAMIC_SPI)
        for _ in range(0x100000000 - FIRST_DYNAMIC_SPI):
            if spi > 0xFFFFFFFF:
                spi = FIRST_DYNAMIC_SPI
            if spi not in used:
                break
            spi += 1
        else:  # pragma: no cover - 4 billion SAs at one gateway
            raise RuntimeError(f"no free SPI for {gw}")
        used.add(spi)
        self.next[gw] = spi + 1
        self.changed.add(gw)
        return spi

    def claim(self, gateway: IPv4Address | str, spi: int) -> None:
        if spi >= FIRST_DYNAMIC_SPI:
            self.used.setdefault(str(gateway), set()).add(spi)

    def release(self, gateway: IPv4Address | str, spi: int) -> None:
        self.used.get(str(gateway), set()).discard(spi)


# ---- the server ----------------------------------------------------------------------------------


class AmrRejected(Exception):
    """An AMR answered without asking the HA (the reason is logged, never a secret)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class HomeAAAServer:
    def __init__(self, config: AAAHConfig, db: VpnDatabase | None = None) -> None:
        source = f"{config.node} (aaah)"
        if config.master_secret is None or len(config.master_secret) < 16:
            raise ConfigError(source, "master_secret", "must be at least 16 bytes (value withheld)")
        if not config.home_agents:
            raise ConfigError(source, "home_agents", "at least one home agent is needed")
        try:
            self.static_suite = EspSuite(config.static_suite)
        except ValueError:
            raise ConfigError(source, "static_suite", f"unknown ESP suite {config.static_suite!r} (one of: "
                              f"{', '.join(s.value for s in EspSuite)})") from None
        self.config = config
        self.master: Secret = config.master_secret
        self.db = db
        self.home_agents: dict[str, HomeAgentRef] = {str(h.address): h for h in config.home_agents}
        self.seal_keys = self.load_seal_keys(config, source)
        self.cngw_names: dict[str, str] = {}  # dynamic CN-GW address -> its name (the recipient of its keys)
        self.store = SessionStore(config.state_dir)
        self.spis = SpiAllocator()
        self.locks = KeyedLocks()  # one registration/binding update per user at a time
        self.counters: dict[str, int] = {"amr": 0, "auth_failed": 0, "unknown_user": 0, "har": 0, "accepted": 0,
                                         "refused": 0, "ha_unavailable": 0, "service_updates": 0, "amr_refused": 0,
                                         "seal_no_key": 0, "ha_bad_key": 0}
        self.control = ControlServer(config.control_socket)
        self.profile_api: Any = None  # daemons.aaa.profileapi.ProfileApi when configured (claim 24)
        # We dial the HAs; the AAAFs (or the relay in front of us) of accept_peers dial us, nobody else.
        self.diameter = diameter_node(
            config, host_ip_addresses=(str(config.address),), listen_address=str(config.address),
            listen_port=config.port,
            dial=[Dial(f"home_agents[{i}]", ha.diameter_host, ha.diameter_realm or config.diameter_realm,
                       str(ha.diameter_address or ha.address), ha.port) for i, ha in enumerate(config.home_agents)])
        self.amr_peers = {p.host.lower() for p in config.accept_peers}
        self.diameter.register_handler(application.APPLICATION_ID, application.AMR_COMMAND, self.on_amr,
                                       required=application.AMR_REQUIRED)

    # ---- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        if self.db is None:
            try:
                self.db = open_database(self.config.db_url)
            except VpnDbError as exc:
                raise ConfigError(f"{self.config.node} (aaah)", "db_url", str(exc)) from None
        self.restore()
        await self.diameter.start()
        self.control.register("sessions", lambda _: self.store.show())
        self.control.register("counters", lambda _: {**self.counters, **self.diameter.stats()})
        self.control.register("peers", lambda _: self.diameter.peers_status())
        await wait_for_peers(self.diameter, [h.diameter_host for h in self.home_agents.values()])
        await self.control.start()
        await self.start_profile_api()
        log.info("aaah.ready", host=self.config.diameter_host, realm=self.config.diameter_realm,
                 port=self.diameter.port, home_agents=len(self.home_agents), sessions=len(self.store.sessions))

    async def stop(self) -> None:
        if self.profile_api is not None:
            await self.profile_api.stop()
        await self.control.stop()
        await self.diameter.stop()

    async def start_profile_api(self) -> None:
        """Claim 24 (F7): users change their own profiles over HTTPS (daemons.aaa.profileapi); the
        change takes effect with their next registration (AMR), e.g. a service-update RRQ."""
        if self.config.profile_api is None:
            return
        from daemons.aaa.profileapi import ProfileApi, TlsFileError, server_context

        assert self.db is not None
        conf, source = self.config.profile_api, f"{self.config.node} (aaah)"
        tls = None
        if conf.tls:
            assert conf.cert_file is not None and conf.key_file is not None  # ProfileApiConfig checks
            try:
                tls = server_context(conf.cert_file, conf.key_file)
            except TlsFileError as exc:
                raise ConfigError(source, f"profile_api.{exc.field}", exc.problem) from None
        api = ProfileApi(self.db, str(conf.address), conf.port, tls=tls, node=self.config.node)
        try:
            await api.start()
        except OSError as exc:
            raise ConfigError(source, "profile_api",
                              f"cannot listen on {conf.address}:{conf.port}: {exc.strerror or exc}") from None
        self.profile_api = api
        self.control.register("profile_api", lambda _: {"port": api.port, **api.counters})

    async def run(self) -> None:
        await serve(self.start, self.stop)

    def restore(self) -> None:
        """Sessions and SPI counters from the state store, record by record (one that cannot be
        read is dropped, logged and deleted: ``daemons.store.records``)."""
        extra = self.store.load({"spi_next": lambda _, v: int_record(v)})
        self.spis = SpiAllocator(extra["spi_next"])
        for session in self.store.sessions.values():
            for gw, spi in session.spis():
                self.spis.claim(gw, spi)
        dropped = self.store.state.dropped
        self.counters["state_dropped"] = dropped
        if self.store.sessions or dropped:
            log.info("aaah.restored", sessions=len(self.store.sessions), dropped=dropped)

    def _save_counters(self) -> None:
        """The SPI counters that moved, one record per gateway."""
        for gw in sorted(self.spis.changed):
            self.store.put_extra("spi_next", gw, self.spis.next[gw])
        self.spis.changed.clear()

    def _put(self, session: Session) -> Session | None:
        with self.store.state.batch():  # the session and the counters its SPIs came from: one commit
            self._save_counters()
            old = self.store.put(session)
        if old is not None:
            self._release(old)
        return old

    def _drop(self, nai: str) -> None:
        old = self.store.drop(nai)
        if old is not None:
            self._release(old)

    def _release(self, session: Session) -> None:
        for gw, spi in session.spis():
            self.spis.release(gw, spi)

    # ---- AMR ---------------------------------------------------------------------------------
    async def on_amr(self, msg: Message, peer: Any) -> Message:
        self.counters["amr"] += 1
        if peer is None or peer.dynamic or peer.key not in self.amr_peers:
            # Only the AAAFs and relays of accept_peers send us AMRs (an HA we dial does not).
            self.counters["amr_refused"] += 1
            log.warning("amr.refused", mn=msg.get("User-Name"), sid=msg.session_id,
                        peer=None if peer is None else peer.host, reason="not a peer that may send AMRs")
            raise DiameterError(ResultCode.DIAMETER_AUTHORIZATION_REJECTED, "not a peer of this AAAH for AMRs")
        try:
            amr = application.parse_amr(msg)
        except application.ApplicationError as exc:
            if isinstance(exc.__cause__, mip.DecodeError):
                log.warning("amr.malformed", mn=msg.get("User-Name"), sid=msg.session_id, reason=exc.__cause__)
            raise DiameterError(exc.result_code, str(exc), failed_avp=exc.failed_avp) from None
        nai, sid, rrq = amr.nai, amr.session_id, amr.rrq
        log.info("amr.received", mn=nai, sid=sid, fa=amr.origin_host, coa=rrq.care_of_address,
                 ha=rrq.home_agent, id=hex(rrq.identification), via=",".join(amr.route_record) or None)
        signed = mip.covered(rrq, mip.EXT_GEN_AUTH).extensions  # what MN-AAA vouches for, once verified
        if requests_service_update(signed):
            # F7: the user changed a profile; register() reads the profiles afresh on every AMR
            # (nothing cached), so the VPN info below is rebuilt from the changed ones.
            update = service_update(signed)
            self.counters["service_updates"] += 1
            log.info("service_update.received", mn=nai, sid=sid, seq=update.sequence if update else "malformed")
        async with self.locks.hold(nai):
            try:
                user, mn_aaa = await self.authenticate(amr)
                return await self.register(amr, user, application.local_aaa(amr, peer.host), mn_aaa)
            except AmrRejected as rej:
                log.warning("ama.sent", mn=nai, sid=sid, result=rej.code, reason=rej.reason)
                return self._ama(amr, rej.code, error=rej.reason)

    async def authenticate(self, amr: application.Amr) -> tuple[User, Secret]:
        """The user's record and the MN-AAA secret it was checked with, once the MN-AAA
        authenticator checks out (secret from the DB only)."""
        assert self.db is not None
        nai, raw, rrq = amr.nai, amr.rrq_raw, amr.rrq
        user = await self.db.aio.user_by_nai(nai)
        if user is None:
            self.counters["unknown_user"] += 1
            log.warning("auth.failed", mn=nai, reason="unknown user")
            raise AmrRejected(ResultCode.DIAMETER_USER_UNKNOWN, "unknown user")
        if not user.enabled:
            log.warning("auth.failed", mn=nai, reason="user disabled")
            raise AmrRejected(ResultCode.DIAMETER_AUTHORIZATION_REJECTED, "user disabled")
        ext = rrq.find(mip.GeneralizedAuthExtension)
        nai_ext = rrq.find(mip.NAIExtension)
        reason = None
        if ext is None:
            reason = "no MN-AAA authentication extension"
        elif nai_ext is None or nai_ext.nai != nai:
            reason = "the RRQ's NAI extension is not the User-Name"
        else:
            secret = await self.db.aio.mn_aaa_secret(nai, ext.spi)
            if secret is None:
                reason = f"unknown MN-AAA SPI {ext.spi:#x}"
            else:
                try:
                    ok = mip.verify(raw, mip.EXT_GEN_AUTH, secret, spi=ext.spi)
                except mip.DecodeError:
                    ok = False
                if not ok:
                    reason = "MN-AAA authenticator mismatch"
        if reason is not None:
            self.counters["auth_failed"] += 1
            log.warning("auth.failed", mn=nai, reason=reason)
            raise AmrRejected(ResultCode.DIAMETER_AUTHENTICATION_REJECTED, "MN-AAA authentication failed")
        if rrq.home_address not in (user.home_address, IPv4Address(0)):
            log.warning("auth.failed", mn=nai, reason=f"home address {rrq.home_address} is not the user's")
            raise AmrRejected(ResultCode.DIAMETER_AUTHORIZATION_REJECTED, "home address not the user's")
        log.info("auth.ok", mn=nai, spi=hex(ext.spi))  # type: ignore[union-attr]
        return user, secret  # type: ignore[return-value]  # secret is set when reason is None

    async def register(self, amr: application.Amr, user: User, local_aaa: str | None = None,
                       mn_aaa: Secret | None = None) -> Message:
        nai, rrq = amr.nai, amr.rrq
        sid = amr.session_id or ""
        ha = self.home_agents.get(str(rrq.home_agent))
        if ha is None:
            self.counters["ha_unavailable"] += 1
            raise AmrRejected(ResultCode.DIAMETER_ERROR_HA_NOT_AVAILABLE,
                              f"home agent {rrq.home_agent} not served here")
        previous = self.store.get(nai)
        if rrq.is_deregistration:
            session = None
            ha_view: list[VpnInfo] = []
        else:
            assert self.db is not None
            profiles = await self.db.aio.profiles_for(nai)
            paths = await self.build_paths(nai, user.home_address, rrq.care_of_address, ha, profiles)
            session = Session(nai, sid, rrq.care_of_address, amr.origin_host or "", rrq.home_agent,
                              user.home_address, tuple(paths), time.time())
            self._put(session)  # claim 16: cached before the HAR goes out
            ha_view = session.for_ha()
            log.info("session.cached", mn=nai, sid=sid, fa=session.fa, paths=len(paths))

        def undo() -> None:
            if session is None:
                return
            self._drop(nai)
            if previous is not None:  # the HA still holds the previous registration
                self._put(previous)
                for gw, spi in previous.spis():
                    self.spis.claim(gw, spi)

        try:  # end to end: only the agent that installs a path can read its keys
            ha_view, fa_sealed = self.sealed_for_ha(ha, ha_view), self.sealed_for_fa(amr, session)
        except SealError as exc:
            undo()
            self.counters["seal_no_key"] += 1
            raise AmrRejected(ResultCode.DIAMETER_ERROR_END_TO_END_MIP_KEY_ENCRYPTION, str(exc)) from None
        peer = self.diameter.peers.get(ha.diameter_host.lower())
        if peer is None or not peer.is_open:
            undo()
            self.counters["ha_unavailable"] += 1
            raise AmrRejected(ResultCode.DIAMETER_ERROR_HA_NOT_AVAILABLE,
                              f"home agent {ha.diameter_host} not connected")
        har = application.build_har(amr, origin_host=self.config.diameter_host,
                                    origin_realm=self.config.diameter_realm,
                                    destination_realm=self.config.diameter_realm,
                                    destination_host=ha.diameter_host, home_address=user.home_address, vpn=ha_view)
        self.counters["har"] += 1
        log.info("har.sent", mn=nai, sid=sid, ha=ha.diameter_host, paths=len(ha_view))
        try:
            haa = application.parse_haa(await self.diameter.request(har, timeout=self.config.har_timeout))
        except DiameterUnavailable as exc:
            undo()
            self.counters["ha_unavailable"] += 1
            raise AmrRejected(ResultCode.DIAMETER_ERROR_HA_NOT_AVAILABLE, f"no HAA: {exc}") from None
        code = int(haa.result_code or 0)
        rrp_raw, accepted = haa.rrp_raw, haa.accepted
        log.info("haa.received", mn=nai, sid=sid, code=code, rrp=None if rrp_raw is None else ("accepted" if accepted
                                                                                               else "refused"))
        if code == ResultCode.DIAMETER_SUCCESS and rrp_raw is not None and accepted:
            if session is None:
                self._drop(nai)  # deregistered
            self.counters["accepted"] += 1
            fa_view = fa_sealed
            local_key = self.local_answer_key(amr, local_aaa, mn_aaa) if session is not None else None
            log.info("ama.sent", mn=nai, sid=sid, result=code, paths=len(fa_view), local_key=local_key is not None)
            return self._ama(amr, ResultCode.DIAMETER_SUCCESS, rrp_raw, fa_view, local_key=local_key)
        undo()
        if rrp_raw is not None:  # the HA refused: its reply goes back to the MN
            self.counters["refused"] += 1
            log.warning("ama.sent", mn=nai, sid=sid, result=int(ResultCode.DIAMETER_ERROR_MIP_REPLY_FAILURE),
                        reason=f"HA answered {code}")
            return self._ama(amr, ResultCode.DIAMETER_ERROR_MIP_REPLY_FAILURE, rrp_raw)
        if code == ResultCode.DIAMETER_ERROR_BAD_KEY:  # the HA could not open the keys we sealed for it
            self.counters["ha_bad_key"] += 1
            raise AmrRejected(ResultCode.DIAMETER_ERROR_BAD_KEY, "the home agent refused its sealed keys")
        self.counters["ha_unavailable"] += 1
        raise AmrRejected(ResultCode.DIAMETER_ERROR_HA_NOT_AVAILABLE, f"HAA {code} without a registration reply")

    def _ama(self, amr: application.Amr, code: int, rrp: bytes | None = None, infos: list[VpnInfo] | None = None,
             error: str | None = None, local_key: bytes | None = None) -> Message:
        return application.build_ama(amr, code, rrp_raw=rrp, vpn=infos or (), error=error,
                                     origin_host=self.config.diameter_host, origin_realm=self.config.diameter_realm,
                                     local_key=local_key)

    # ---- the AAAF's local answer (claim 17, issue #15) ----------------------------------------------
    def local_answer_key(self, amr: application.Amr, local_aaa: str | None, mn_aaa: Secret | None) -> bytes | None:
        """The key the MN proves in its next intra-domain move (``daemons.wire.mip.localanswer``),
        sealed for the local AAA ``local_aaa`` the AMR came through, for the AMA of a
        registration we accepted: derived from ``mn_aaa`` (the key :meth:`authenticate` checked)
        and this request's FA challenge. None without either, or without a seal key for that AAA
        (it then answers no move itself: every move comes to us)."""
        if mn_aaa is None or not local_aaa:
            return None
        if local_aaa not in self.seal_keys:
            log.info("local_key.not_sent", mn=amr.nai, sid=amr.session_id, aaa=local_aaa, reason="no seal key for it")
            return None
        key = mip.registration_local_key(mn_aaa, amr.rrq, amr.nai)
        context = application.local_key_context(amr.nai, amr.session_id or "")
        return self.seal_keys.seal_secret(local_aaa, context, key)

    # ---- VPN information (claims 3, 8, 16) ---------------------------------------------------------
    async def build_paths(self, nai: str, home_address: IPv4Address, coa: IPv4Address, ha: HomeAgentRef,
                          profiles: list[VpnProfile]) -> list[VpnInfo]:
        assert self.db is not None
        static = [p for p in profiles if p.gateway_type is CngwMode.STATIC]
        dynamic = [p for p in profiles if p.gateway_type is CngwMode.DYNAMIC]
        if not profiles:
            log.info("vpn.none", mn=nai, reason="no VPN profile")
            return []
        first = (static or dynamic)[0]
        suite = first.suite
        # Path 1, FA⇄HA, in the FA's view: fresh keys and PSK, SPIs unique at the receiving gateway.
        # It carries everything the MN sends and receives (home address ⇄ any): the HA is the
        # MN's anchor and routes on from there (to the CN-GW's tunnel for the profiles'
        # destinations). This is also what user-space ESP needs: the HA's local selector
        # must contain an address of its own (environment notes on kernel-libipsec).
        spi_at_ha, spi_at_fa = self.spis.allocate(ha.address), self.spis.allocate(coa)
        path1 = VpnPath(
            id=VpnInfo.path_name(nai, FA_PATH_ID),
            local=Endpoint(coa, EndpointType.FA), remote=Endpoint(ha.address, EndpointType.HA),
            local_ts=(IPv4Network(f"{home_address}/32"),),
            remote_ts=(ANY,),
            security=SecurityService(suite, outbound=direction_keys(suite, spi_at_ha, new_esp_key(suite)),
                                     inbound=direction_keys(suite, spi_at_fa, new_esp_key(suite)),
                                     psk=new_psk(), lifetime=first.lifetime),
            qos=first.qos)
        infos = [VpnInfo(nai, FA_PATH_ID, path1)]
        # Paths 2.., HA⇄CN-GW: the static tunnel, as the HA sees it.
        path_id = FA_PATH_ID
        for gw, gw_profiles, remote_ts in await self.gateways(nai, static):
            gsuite = self.static_suite  # the standing tunnel's, not a user's choice
            out_spi, in_spi = static_spi(ha.address, gw.address), static_spi(gw.address, ha.address)
            path_id += 1
            infos.append(VpnInfo(nai, path_id, VpnPath(
                id=VpnInfo.path_name(nai, path_id),
                local=Endpoint(ha.address, EndpointType.HA), remote=Endpoint(gw.address, EndpointType.CNGW_STATIC),
                local_ts=(ha.home_prefix,), remote_ts=remote_ts,
                security=SecurityService(
                    gsuite,
                    outbound=direction_keys(gsuite, out_spi,
                                        static_esp_key(self.master, ha.address, gw.address, out_spi, gsuite)),
                    inbound=direction_keys(gsuite, in_spi,
                                       static_esp_key(self.master, gw.address, ha.address, in_spi, gsuite)),
                    psk=pair_psk(self.master, ha.address, gw.address))), _distribution(gw_profiles)))
        infos += await self.route_optimised_paths(nai, home_address, coa, dynamic, path_id + 1)
        log.info("vpn.built", mn=nai, paths=" ".join(path_text(i) for i in infos), suite=suite.value)
        return infos

    async def gateways(self, nai: str, profiles: list[VpnProfile]
                       ) -> list[tuple[Gateway, list[VpnProfile], tuple[IPv4Network, ...]]]:
        """The profiles grouped by gateway (claim 8), with what each gateway accommodates:
        its prefixes in the correspondence table, else the profiles' destinations. A gateway
        missing from the database is skipped (logged)."""
        assert self.db is not None
        by_gateway: dict[str, list[VpnProfile]] = {}
        for p in profiles:
            by_gateway.setdefault(p.gateway, []).append(p)
        found = []
        for name, gw_profiles in by_gateway.items():
            gw = await self.db.aio.gateway(name)
            if gw is None:
                log.warning("profile.skipped", mn=nai, gateway=name, reason="gateway not in the database")
                continue
            routes = await self.db.aio.run(self.db.routes, name)
            prefixes = tuple(dict.fromkeys(r.prefix for r in routes)) or \
                tuple(dict.fromkeys(p.destination for p in gw_profiles))
            found.append((gw, gw_profiles, prefixes))
        return found

    async def route_optimised_paths(self, nai: str, home_address: IPv4Address, coa: IPv4Address,
                                    profiles: list[VpnProfile], first_id: int) -> list[VpnInfo]:
        """Claim 19 (F4): per dynamic CN-GW one FA⇄CN-GW path, in the FA's view: the MN's home
        address ⇄ what the gateway accommodates (correspondence table), fresh keys, SPIs
        unique at each receiving gateway, a PSK of its own. The HA gets the CN-GW's mirrored
        copy in the HAR (``Session.for_ha``) and hands it to the CN-GW in a Binding Update."""
        infos: list[VpnInfo] = []
        path_id = first_id
        for gw, gw_profiles, remote_ts in await self.gateways(nai, profiles):
            profile = gw_profiles[0]
            suite = profile.suite
            spi_at_gw, spi_at_fa = self.spis.allocate(gw.address), self.spis.allocate(coa)
            self.cngw_names[str(gw.address)] = gw.name
            infos.append(VpnInfo(nai, path_id, VpnPath(
                id=VpnInfo.path_name(nai, path_id),
                local=Endpoint(coa, EndpointType.FA), remote=Endpoint(gw.address, EndpointType.CNGW_DYNAMIC),
                local_ts=(IPv4Network(f"{home_address}/32"),), remote_ts=remote_ts,
                security=SecurityService(suite, outbound=direction_keys(suite, spi_at_gw, new_esp_key(suite)),
                                         inbound=direction_keys(suite, spi_at_fa, new_esp_key(suite)),
                                         psk=new_psk(), lifetime=profile.lifetime),
                qos=profile.qos), _distribution(gw_profiles)))
            path_id += 1
        return infos

    # ---- sealing: every path's keys for the agent that installs it (daemons.vpn.seal) ------------
    @staticmethod
    def load_seal_keys(config: AAAHConfig, source: str) -> Keyring:
        """The seal keys of ``seal_keys`` (files 0600); every home agent must have one."""
        keys = {}
        for i, ref in enumerate(config.seal_keys):
            if ref.name.lower() in (k.lower() for k in keys):
                raise ConfigError(source, f"seal_keys[{i}].name", f"{ref.name} has a seal key already")
            keys[ref.name] = read_key_file(ref, source, f"seal_keys[{i}].key_file")
        ring = Keyring(keys)
        for ha in config.home_agents:
            if ha.diameter_host not in ring:
                raise ConfigError(source, "seal_keys", f"no seal key for home agent {ha.diameter_host}")
        return ring

    def sealed_for_ha(self, ha: HomeAgentRef, infos: list[VpnInfo]) -> list[VpnInfo]:
        """The HAR's paths: the HA's own sealed for the HA, each dynamic CN-GW's copy sealed for
        that CN-GW (the HA passes it on in a Binding Update without reading it)."""
        out = []
        for info in infos:
            if info.path.local.type is EndpointType.CNGW_DYNAMIC:
                address = str(info.path.local.address)
                name = self.cngw_names.get(address)
                if name is None:
                    raise SealError(f"no gateway name for the dynamic CN-GW at {address}")
                out += self.seal_keys.seal(name, [info])
            else:
                out += self.seal_keys.seal(ha.diameter_host, [info])
        return out

    def sealed_for_fa(self, amr: application.Amr, session: Session | None) -> list[VpnInfo]:
        """The AMA's paths, sealed for the FAs of the requesting FA's domain (its realm): any of
        them may open the copy its local AAA caches (claim 17), the local AAA cannot."""
        infos = session.for_fa() if session is not None else []
        if not infos:
            return []
        realm = amr.origin_realm or ""
        if not realm:
            raise SealError("the AMR names no Origin-Realm to seal the FA's keys for")
        return self.seal_keys.seal(realm, infos)


__all__ = ["AmrRejected", "HomeAAAServer", "SpiAllocator"]
