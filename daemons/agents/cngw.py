"""The correspondent's security gateway (CN-GW): the VPN end in front of the hosts a user
talks to.

* **Static mode** (claim 16): a tunnel to the HA configured at start (``static_paths``).
* **Dynamic mode** (claims 19-21, 25; flows F4, F5, F8): the home agents listed in
  ``home_agents`` send Binding Updates (RFC 4064 experimental message, vendor 32473,
  docs/protocol.md) carrying the FA⇄CN-GW VPN info in our own view. We install CN-GW→FA
  through the MAVPN control section and acknowledge; a Binding Update for a new FA replaces
  the path to the old one (F5); lifetime 0 removes it. Each binding lives for the lifetime
  the HA granted; when what is left drops below ``binding_request_threshold`` we send the HA
  that posted it a Binding Request (at most one per ``binding_request_interval``); a Binding
  Update in answer renews it, and without one the binding and its paths go at expiry (F8).

Bindings are persisted (wall-clock expiry); a restarted gateway keeps the paths of the bindings
still live and removes the others (``MavpnControl.reconcile``); the paths themselves are the
MAVPN cache's.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from ipaddress import IPv4Address
from typing import Any

from daemons.agents.binding import BindingPeers, Fresh, ReplayWindow
from daemons.agents.datagrams import dispatch
from daemons.runtime.config import CNGWConfig, PeerAgent, agent_seal_key
from daemons.runtime.control import ControlServer
from daemons.runtime.log import EventLog
from daemons.runtime.net import UdpEndpoint
from daemons.runtime.tasks import KeyedLocks
from daemons.store.records import RecordStore
from daemons.store.state import dataclass_record, ipv4_fields
from daemons.vpn import vpninfo
from daemons.vpn.mavpn import MavpnControl
from daemons.vpn.path import EndpointType
from daemons.vpn.seal import Recipient, SealError
from daemons.vpn.vpninfo import VpnInfo
from daemons.wire import mip

log = EventLog("mipvpn.cngw")
Status = mip.BindingStatus


@dataclass
class CnBinding:
    """One mobile node's binding here: which FA its path goes to, who posted it, until when."""

    nai: str
    home_address: str
    care_of_address: str
    home_agent: str  # the HA that posted it: Binding Requests go there
    lifetime: int
    expires: float  # wall clock
    identification: int  # of the last Binding Update accepted
    last_request: float = 0.0  # wall clock of our last Binding Request for it (0: none yet)
    requests: int = 0  # Binding Requests sent since the last Binding Update

    def remaining(self, now: float) -> float:
        return max(0.0, self.expires - now)


class BindingTable:
    """The CN-GW's bindings and their lifetimes (pure: every decision takes ``now``)."""

    def __init__(self, threshold: float, interval: float) -> None:
        self.threshold = threshold
        self.interval = interval
        self.bindings: dict[str, CnBinding] = {}  # by home address

    def update(self, nai: str, home_address: str, care_of_address: str, home_agent: str, lifetime: int,
               identification: int, now: float) -> CnBinding:
        """Record a Binding Update. One that leaves less than ``threshold`` (e.g. the HA's answer
        to our request, with what is left of the registration) keeps the request pacing, so we
        go on asking once per ``interval``; a longer one starts afresh."""
        binding = CnBinding(nai, home_address, care_of_address, home_agent, lifetime, now + lifetime, identification)
        previous = self.bindings.get(home_address)
        if previous is not None and lifetime < self.threshold:
            binding.last_request, binding.requests = previous.last_request, previous.requests
        self.bindings[home_address] = binding
        return binding

    def remove(self, home_address: str) -> CnBinding | None:
        return self.bindings.pop(home_address, None)

    def requests_due(self, now: float) -> list[CnBinding]:
        """The bindings to send a Binding Request for now: less than ``threshold`` left, not
        expired, and none asked for within the last ``interval``. Marks them asked."""
        due = []
        for b in self.bindings.values():
            left = b.remaining(now)
            if 0 < left < self.threshold and now - b.last_request >= self.interval:
                b.last_request = now
                b.requests += 1
                due.append(b)
        return due

    def expired(self, now: float) -> list[CnBinding]:
        """Remove and return the bindings whose lifetime has run out."""
        gone = [b for b in self.bindings.values() if b.expires <= now]
        for b in gone:
            del self.bindings[b.home_address]
        return gone

    def to_json(self) -> dict[str, Any]:
        return {hoa: asdict(b) for hoa, b in self.bindings.items()}

    def load(self, bindings: Iterable[CnBinding], now: float) -> int:
        """Restored bindings, those that ran out by ``now`` left out; returns how many were."""
        expired = 0
        for binding in bindings:
            if binding.expires > now:
                self.bindings[binding.home_address] = binding
            else:
                expired += 1
        return expired


def check_vpn_info(infos: list[VpnInfo], me: IPv4Address, bu: mip.BindingUpdate) -> str | None:
    """Why the VPN info of a Binding Update cannot be ours (None: it can): every path must
    run from this gateway (dynamic) to the FA the update names, for that home address."""
    if not infos:
        return "no VPN-Info in the vendor extension"
    for info in infos:
        p = info.path
        if p.local.address != me or p.local.type is not EndpointType.CNGW_DYNAMIC:
            return f"path {info.path_id}: local end {p.local.address} ({p.local.type.value}) is not this gateway"
        if p.remote.address != bu.care_of_address:
            return f"path {info.path_id}: remote end {p.remote.address} is not the care-of address"
        if not any(bu.home_address in net for net in p.remote_ts):
            return f"path {info.path_id}: the remote selectors do not cover the home address"
    return None


class CorrespondentGateway:
    def __init__(self, config: CNGWConfig) -> None:
        self.config = config
        self.control = ControlServer(config.control_socket)
        self.mavpn: MavpnControl | None = None
        self.ha_keys: dict[str, PeerAgent] = {str(ha.address): ha for ha in config.home_agents}
        self.ha_peers = BindingPeers(self.ha_keys)
        self.table = BindingTable(config.binding_request_threshold, config.binding_request_interval)
        # The last Binding Update identification accepted per (HA, home address), kept after the binding goes.
        self.bu_seen = ReplayWindow(config.replay_window)
        self.state = RecordStore.in_dir(config.state_dir, "bindings")
        self.locks = KeyedLocks()  # one registration/binding update per user at a time
        self.udp: UdpEndpoint | None = None
        self.counters: dict[str, int] = {"bu_received": 0, "bu_accepted": 0, "bu_rejected": 0, "br_sent": 0,
                                         "expired": 0, "malformed": 0, "bu_replayed": 0, "bu_duplicate": 0,
                                         "bu_unauthenticated_extensions": 0, "seal_open_failed": 0,
                                         "keys_in_clear_refused": 0}
        # Our seal key: the AAAH seals our paths' keys for us; the HA's Binding Update carries them unread.
        own_key = agent_seal_key(config.seal, f"{config.node} (cngw)", bool(config.home_agents),
                                 "a dynamic CN-GW opens the keys the AAAH sealed for it")
        self.seal = Recipient(*own_key) if own_key else None

    async def run(self) -> None:
        self.restore()
        await self.start_paths()
        self.control.register("paths", lambda _: self.show_paths())
        self.control.register("bindings", lambda _: self.show_bindings())
        self.control.register("counters", lambda _: dict(self.counters))
        if self.ha_keys:
            self.udp = await UdpEndpoint.open(self.on_datagram, str(self.config.address), mip.MIP_UDP_PORT)
        await self.control.start()
        log.info("cngw.ready", static_paths=len(self.config.static_paths), backend=self.config.ipsec_backend,
                 dynamic=bool(self.ha_keys), bindings=len(self.table.bindings))
        if self.ha_keys:
            await self.lifetime_loop()
        else:
            await asyncio.Event().wait()

    # ---- persistence -------------------------------------------------------------------------
    def restore(self) -> None:
        """Bindings from the state store, record by record (one that cannot be read is dropped,
        logged and deleted: ``daemons.store.records``); those that ran out while we were down
        are dropped, and their paths with them (:meth:`MavpnControl.reconcile`)."""
        saved = self.state.load_records({"bindings": lambda _, r: ipv4_fields(dataclass_record(CnBinding, r),
                                                                              "home_address", "care_of_address",
                                                                              "home_agent"),
                                         "binding_ids": lambda _, r: ReplayWindow.record(r)},
                                        keys={"binding_ids": lambda r: ReplayWindow.record_key(r[:2])})
        expired = self.table.load(saved["bindings"].values(), time.time())
        self.bu_seen.load(saved["binding_ids"].values(), time.time())
        with self.state.batch():  # the store says what we hold
            for hoa in saved["bindings"]:
                if hoa not in self.table.bindings:
                    self.state.delete("bindings", hoa)
            self.bu_seen.save(self.state, "binding_ids")  # the identifications that ran out
        self.counters["state_dropped"] = self.state.dropped
        if self.table.bindings or expired or self.state.dropped:
            log.info("cngw.restored", bindings=len(self.table.bindings), expired=expired, dropped=self.state.dropped)

    def live_users(self) -> set[str]:
        """The users whose paths this gateway keeps: those with a binding (static paths are
        the configuration's)."""
        return {b.nai for b in self.table.bindings.values()}

    async def start_paths(self) -> asyncio.Task[None] | None:
        """After :meth:`restore`: the path control with the static paths, and the cached ones
        reconciled against the live bindings (those that ran out while we were down go).
        Returns the backend's reconciliation, which runs in the background."""
        self.mavpn = await MavpnControl.start(self.config)
        if self.mavpn is None:
            return None
        self.counters["state_dropped"] = self.counters.get("state_dropped", 0) + self.mavpn.state.dropped
        return self.mavpn.reconcile(self.live_users())

    def persist(self, hoa: str, key: tuple[str, str] | None = None) -> None:
        """The binding of ``hoa`` as it stands (none: its record goes) and, with ``key``, the
        Binding Update identification accepted for it; one commit."""
        with self.state.batch():
            binding = self.table.bindings.get(hoa)
            if binding is not None:
                self.state.put("bindings", hoa, asdict(binding))
            else:
                self.state.delete("bindings", hoa)
            self.bu_seen.save(self.state, "binding_ids", key)

    # ---- binding lifetime (F8) ---------------------------------------------------------------
    async def lifetime_loop(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            await self.tick(time.time())

    async def tick(self, now: float) -> None:
        for binding in self.table.requests_due(now):
            self.send_request(binding, now)
            self.persist(binding.home_address)  # its request pacing survives a restart
        gone = self.table.expired(now)
        if gone:
            with self.state.batch():
                for binding in gone:
                    self.persist(binding.home_address)
        for binding in gone:
            self.counters["expired"] += 1
            # Under the binding's lock: a Binding Update being applied meanwhile renews it,
            # and its fresh path must not be removed after it.
            async with self.locks.hold(binding.home_address):
                if self.mavpn is not None and binding.home_address not in self.table.bindings:
                    await self.mavpn.remove_user(binding.nai)
            log.info("binding.expired", mn=binding.nai, hoa=binding.home_address, coa=binding.care_of_address,
                     ha=binding.home_agent, requests=binding.requests)

    def send_request(self, binding: CnBinding, now: float) -> None:
        if binding.home_agent not in self.ha_peers or self.udp is None:
            return
        br = mip.BindingRequest(home_address=binding.home_address, identification=mip.ntp_identification(now),
                                extensions=[mip.NAIExtension(binding.nai)])
        self.ha_peers.send(self.udp, br, binding.home_agent)
        self.counters["br_sent"] += 1
        log.info("br.sent", mn=binding.nai, hoa=binding.home_address, ha=binding.home_agent,
                 remaining=round(binding.remaining(now), 1), attempt=binding.requests)

    # ---- Binding Updates from home agents (F4, F5) ---------------------------------------------
    def on_datagram(self, data: bytes, addr: tuple[str, int]) -> None:
        dispatch(data, addr, {mip.BindingUpdate: self.on_binding_update}, self.counters, log, self.poorly_formed)

    def poorly_formed(self, partial: mip.Message, addr: tuple[str, int]) -> None:
        """A Binding Update with an unknown non-skippable extension: refused with 134."""
        if isinstance(partial, mip.BindingUpdate):
            self.answer(partial, Status.POORLY_FORMED_UPDATE, addr)

    async def on_binding_update(self, bu: mip.BindingUpdate, raw: bytes, addr: tuple[str, int]) -> None:
        self.counters["bu_received"] += 1
        hoa = str(bu.home_address)
        async with self.locks.hold(hoa):
            status, lifetime = await self.process_update(bu, raw, addr[0])
        self.counters["bu_accepted" if status == Status.ACCEPTED else "bu_rejected"] += 1
        self.answer(bu, status, addr, lifetime)

    async def process_update(self, bu: mip.BindingUpdate, raw: bytes, src: str) -> tuple[Status, int]:
        """Check and apply one Binding Update (``raw`` as received from ``src``); the answer
        (status, lifetime). Only what the HA's authenticator covers is read, and only an
        update that covers all of it (134 otherwise) with a fresh identification (133) is
        applied; a duplicate of the last one accepted from that HA for that home address (a
        retransmission, byte for byte) gets the same answer again and changes nothing."""
        hoa = str(bu.home_address)
        checked = self.ha_peers.authenticate(raw, src)
        if checked is None:
            nai_ext = bu.find(mip.NAIExtension)  # not authenticated: for the log line only
            log.warning("bu.auth_failed", src=src, mn=nai_ext.nai if nai_ext else hoa)
            return Status.AUTHENTICATION_FAILED, 0
        assert isinstance(checked.message, mip.BindingUpdate)
        bu = checked.message  # from here on: nothing the authenticator does not cover
        nai_ext = bu.find(mip.NAIExtension)
        nai = nai_ext.nai if nai_ext else hoa
        if checked.trailing:
            self.counters["bu_unauthenticated_extensions"] += 1
            log.warning("bu.unauthenticated_extensions", src=src, mn=nai, id=hex(bu.identification or 0),
                        extensions=checked.trailing)
            return Status.POORLY_FORMED_UPDATE, 0
        now = time.time()
        key = (src, hoa)
        fresh, answer = self.bu_seen.check(key, bu.identification, raw, now)
        if fresh is Fresh.DUPLICATE:
            assert answer is not None
            self.counters["bu_duplicate"] += 1
            log.info("bu.duplicate", mn=nai, src=src, id=hex(bu.identification or 0), status=answer[0])
            return Status(answer[0]), answer[1]
        if fresh is Fresh.FULL:
            log.warning("bu.refused", mn=nai, src=src, reason="replay window full")
            return Status.INSUFFICIENT_RESOURCES, 0
        if fresh is not Fresh.FRESH or bu.identification is None:
            self.counters["bu_replayed"] += 1
            log.warning("bu.replay_or_clock", mn=nai, src=src, id=hex(bu.identification or 0), reason=fresh.value)
            return Status.IDENTIFICATION_MISMATCH, 0
        if bu.flags & (mip.BUFlag.M | mip.BUFlag.G):
            return Status.ENCAPSULATION_UNAVAILABLE, 0
        log.info("bu.received", mn=nai, src=src, hoa=hoa, coa=bu.care_of_address, lifetime=bu.lifetime,
                 id=hex(bu.identification))
        current = self.table.bindings.get(hoa)
        if bu.is_deletion:
            old = self.table.remove(hoa)
            # Spent, and kept after the binding: the deleted binding's updates cannot come back.
            self.bu_seen.accept(key, bu.identification, raw, (Status.ACCEPTED, 0))
            self.persist(hoa, key)
            if self.mavpn is not None:
                await self.mavpn.remove_user(old.nai if old else nai)
            log.info("binding.removed", mn=nai, hoa=hoa, was=old.care_of_address if old else None, ha=src)
            return Status.ACCEPTED, 0
        data = bu.vendor_data(mip.VENDOR_TYPE_VPN_INFO)
        if data is None:
            log.warning("bu.refused", mn=nai, reason="no VPN info")
            return Status.VPN_INFO_MISSING, 0
        try:
            infos = vpninfo.decode_from_mip(data, nai)
        except vpninfo.VpnInfoError as exc:
            if isinstance(exc, vpninfo.ClearKeysRefused):
                self.counters["keys_in_clear_refused"] += 1
            log.warning("bu.refused", mn=nai, reason=str(exc))
            return Status.VPN_INFO_UNSUPPORTED, 0
        problem = check_vpn_info(infos, self.config.address, bu)
        if problem is not None:
            log.warning("bu.refused", mn=nai, reason=problem)
            return Status.VPN_INFO_UNSUPPORTED, 0
        try:
            if self.seal is None:
                raise SealError("no seal key configured")
            infos = self.seal.open(infos)
        except SealError as exc:
            self.counters["seal_open_failed"] += 1
            log.warning("bu.refused", mn=nai, reason=f"sealed keys refused: {exc}")
            return Status.VPN_KEYS_REFUSED, 0
        if self.mavpn is not None:
            try:
                await self.mavpn.apply(nai, infos)  # a new FA: the path to the old one goes
            except Exception as exc:  # the backend's failure is the HA's answer, not our crash
                log.error("bu.path_failed", mn=nai, reason=type(exc).__name__)
                # Acted on (paths may have changed): spent, its retransmissions get this answer.
                self.bu_seen.accept(key, bu.identification, raw, (Status.PATH_SETUP_FAILED, 0))
                self.persist(hoa, key)
                return Status.PATH_SETUP_FAILED, 0
        previous = current
        binding = self.table.update(nai, hoa, str(bu.care_of_address), src, bu.lifetime, bu.identification, now)
        self.bu_seen.accept(key, bu.identification, raw, (Status.ACCEPTED, bu.lifetime))
        self.persist(hoa, key)
        log.info("binding.updated" if previous else "binding.created", mn=nai, hoa=hoa, coa=binding.care_of_address,
                 lifetime=bu.lifetime, ha=src,
                 previous_coa=previous.care_of_address if previous and previous.care_of_address !=
                 binding.care_of_address else None)
        return Status.ACCEPTED, bu.lifetime

    def answer(self, bu: mip.BindingUpdate, status: Status, addr: tuple[str, int], lifetime: int = 0) -> None:
        if not bu.ack_requested and status == Status.ACCEPTED:
            return
        if self.udp is not None:
            self.ha_peers.acknowledge(self.udp, bu, status, addr, lifetime)
        log.event("ba.sent", to=addr[0], hoa=bu.home_address, status=f"{int(status)}({Status(status).name})",
                  lifetime=lifetime, level=20 if status == Status.ACCEPTED else 30)

    # ---- show ------------------------------------------------------------------------------------
    async def show_paths(self) -> list[dict]:
        return await self.mavpn.show() if self.mavpn else []

    def show_bindings(self) -> list[dict[str, Any]]:
        now = time.time()
        return [{"mn": b.nai, "home_address": b.home_address, "care_of_address": b.care_of_address,
                 "home_agent": b.home_agent, "lifetime": b.lifetime, "remaining": int(b.remaining(now)),
                 "binding_requests": b.requests} for b in self.table.bindings.values()]
