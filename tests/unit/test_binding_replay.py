"""Binding messages cannot be replayed or extended, at every receiver (issue 15): the old FA
(F6 Binding Update from the new FA), the dynamic CN-GW (the HA's Binding Updates, F4/F5) and
the HA (the CN-GW's Binding Requests, F8). The daemon objects are the real ones with the real
codec, authenticators and replay windows, talking over real loopback UDP sockets
(127.0.0.1-127.0.0.6); only what lies below them is replaced: routes, the Diameter node (it
records the STR), and the IPsec backend (a recorder). The attacker is a socket of its own
bound to the address of the peer it impersonates, sending bytes captured on the way in.

Honest traffic must go on exactly as before: the HA retransmits the same signed update until
acknowledged (a duplicate of the last accepted update is acknowledged again, changing
nothing), the new FA a fresh one per try."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from daemons.agents.binding import Fresh, ReplayWindow
from daemons.agents.cngw import CorrespondentGateway
from daemons.agents.fa import ForeignAgent, Pending, Visitor
from daemons.agents.ha import Binding, HomeAgent
from daemons.runtime.config import CNGWConfig, FAConfig, HAConfig, PeerAgent, SecurityAssociation
from daemons.runtime.net import UdpEndpoint
from daemons.runtime.secret import Secret
from daemons.store.records import RecordStore
from daemons.vpn import vpninfo
from daemons.vpn.mavpn import MavpnControl
from daemons.vpn.path import Capability, Endpoint, EndpointType, EspSuite, SecurityService, VpnPath
from daemons.vpn.vpninfo import VpnInfo
from daemons.wire import mip
from daemons.wire.diameter import TerminationCause
from tests.unit.sealkit import key_file, sealed
from tests.unit.test_agents_aaa import Diameter, NoRoutes
from tests.unit.test_cngw_bindings import cngw_view
from tests.unit.test_path_capabilities import Recorder

NAI = "mn1@home.example"
HOA = IPv4Address("198.18.100.10")
HA_ADDR = IPv4Address("198.18.100.1")
OLD_FA, NEW_FA = "127.0.0.1", "127.0.0.2"  # F6: the MN moves from OLD_FA to NEW_FA
GW, HA = "127.0.0.4", "127.0.0.5"  # F4/F8: the dynamic CN-GW and the HA
FA_FA_KEY, FA_SPI = Secret(b"fa1-fa2 pair key"), 0x4000
HA_GW_KEY, GW_SPI = Secret(b"ha-cngw2 binding key"), 0x5000
SID = "fa1.visit-a.example;1;1"
S = mip.BindingStatus


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 20))


async def settle(seconds: float = 0.15) -> None:
    """Datagrams in flight and background tasks (acks, STRs) have landed."""
    await asyncio.sleep(seconds)


class Tap:
    """What one daemon's socket receives, recorded before the daemon sees it; ``drop`` loses
    the next datagrams for which it returns True (a lossy link)."""

    def __init__(self, handler: Callable[[bytes, tuple[str, int]], None]) -> None:
        self.handler = handler
        self.got: list[bytes] = []
        self.drop: Callable[[bytes], bool] = lambda _: False

    def __call__(self, data: bytes, addr: tuple[str, int]) -> None:
        self.got.append(data)
        if not self.drop(data):
            self.handler(data, addr)

    def of(self, cls: type[mip.Message]) -> list[bytes]:
        return [d for d in self.got if isinstance(mip.decode_message(d), cls)]


class Attacker:
    """A socket at ``address`` (spoofing a peer's source address): sends captured bytes,
    collects what comes back."""

    def __init__(self) -> None:
        self.answers: list[mip.Message] = []
        self.udp: UdpEndpoint | None = None

    @classmethod
    async def at(cls, address: str) -> Attacker:
        me = cls()
        me.udp = await UdpEndpoint.open(lambda data, _: me.answers.append(mip.decode_message(data)), address, 0)
        return me

    async def send(self, data: bytes, to: tuple[str, int]) -> mip.BindingAcknowledge | None:
        before = len(self.answers)
        assert self.udp is not None
        self.udp.send(data, to)
        await settle()
        new = self.answers[before:]
        assert len(new) <= 1, new
        ack = new[0] if new else None
        assert ack is None or isinstance(ack, mip.BindingAcknowledge)
        return ack


def drop_first() -> Callable[[bytes], bool]:
    """A ``Tap.drop`` that loses the first datagram only."""
    lost: list[bytes] = []

    def drop(data: bytes) -> bool:
        if lost:
            return False
        lost.append(data)
        return True

    return drop


def port(udp: UdpEndpoint) -> int:
    return udp.transport.get_extra_info("sockname")[1]  # type: ignore[union-attr]


# ---- the old FA (F6) -------------------------------------------------------------------------------


def fa_path(fa: str) -> VpnInfo:
    """The FA's path to the HA for mn1 (its view), as the AMA gives it."""
    return VpnInfo(NAI, 1, VpnPath(
        id=VpnInfo.path_name(NAI, 1), local=Endpoint(IPv4Address(fa), EndpointType.FA),
        remote=Endpoint(HA_ADDR, EndpointType.HA), local_ts=(IPv4Network(f"{HOA}/32"),),
        remote_ts=(IPv4Network("0.0.0.0/0"),), security=SecurityService(EspSuite.AES128GCM16, psk=Secret(b"p" * 32))))


def make_fa(tmp: Path, me: str, peer: str) -> ForeignAgent:
    fa = ForeignAgent(FAConfig(node=f"fa-{me}", role="fa", state_dir=tmp / me, control_socket=tmp / f"{me}.sock",
                               care_of_address=IPv4Address(me), access_address=IPv4Address("198.18.20.1"),
                               challenge=False, peer_agents=[PeerAgent(IPv4Address(peer), FA_SPI, FA_FA_KEY)]))
    fa.routes = NoRoutes()  # type: ignore[assignment]
    fa.diameter = Diameter(lambda req: req.answer(2001))  # type: ignore[assignment]  # records the STRs
    fa.mavpn = MavpnControl(Recorder(Capability.FORWARDING_PATHS), RecordStore(tmp / me / "vpn.db"))
    return fa


class Fas:
    """The old FA (a visitor mn1 with its path to the HA and its Diameter session) and the new
    FA the MN moves to, each on its own socket; ``tap`` records what reaches the old FA."""

    def __init__(self, old: ForeignAgent, new: ForeignAgent, tap: Tap) -> None:
        self.old, self.new, self.tap = old, new, tap

    @classmethod
    async def up(cls, tmp: Path) -> Fas:
        old, new = make_fa(tmp, OLD_FA, NEW_FA), make_fa(tmp, NEW_FA, OLD_FA)
        tap = Tap(old.on_datagram)
        old.udp = await UdpEndpoint.open(tap, OLD_FA, 0)
        new.udp = await UdpEndpoint.open(new.on_datagram, NEW_FA, 0)
        new.fa_peers.port, old.fa_peers.port = port(old.udp), port(new.udp)
        world = cls(old, new, tap)
        await world.visit()
        return world

    async def visit(self) -> None:
        """mn1 (re)registers at the old FA: visitor, path to the HA, a Diameter session."""
        self.old.visitors[str(HOA)] = Visitor(NAI, str(HOA), str(HA_ADDR), 434, 300, time.time() + 300, 1, SID)
        assert self.old.mavpn is not None
        await self.old.mavpn.apply(NAI, [fa_path(OLD_FA)])

    def state(self) -> tuple[Any, ...]:
        """What a Binding Update changes at the old FA: visitor, paths, forwarding, sessions ended."""
        assert self.old.mavpn is not None
        return (dict(self.old.visitors), self.old.mavpn.infos(NAI), dict(self.old.forwards),
                len(self.old.diameter.requests))  # type: ignore[union-attr]

    def pending(self) -> Pending:
        """The new FA's registration of mn1 (its RRQ names the old FA)."""
        rrq = mip.RegistrationRequest(HOA, HA_ADDR, NEW_FA, mip.ntp_identification(time.time()), 300,
                                      extensions=[mip.NAIExtension(NAI), mip.previous_fa_extension(OLD_FA)])
        return Pending(rrq, rrq.encode(), NAI, 434, time.monotonic())

    async def move(self, forward: VpnInfo | None = None) -> mip.BindingAcknowledge | None:
        """The new FA tells the old one, as it does after the HA's yes (F6 with ``forward``)."""
        return await self.new.notify_previous_agent(OLD_FA, self.pending(), forward, first_wait=0.5, attempts=2)

    def close(self) -> None:
        for fa in (self.old, self.new):
            if fa.udp is not None:
                fa.udp.close()


def signed_bu(key: Secret = FA_FA_KEY, spi: int = FA_SPI, ident: int | None = None, lifetime: int = 10,
              coa: str = NEW_FA, extensions: list[mip.Extension] | None = None) -> bytes:
    bu = mip.BindingUpdate(home_address=HOA, care_of_address=IPv4Address(coa), lifetime=lifetime, flags=mip.BUFlag.A,
                           identification=mip.ntp_identification(time.time()) if ident is None else ident,
                           extensions=[mip.NAIExtension(NAI)] if extensions is None else extensions)
    return mip.sign(bu, mip.EXT_BINDING_AUTH, spi, key).encode()


def test_replayed_binding_update_at_the_old_fa_changes_nothing(tmp_path: Path) -> None:
    async def main() -> None:
        w = await Fas.up(tmp_path)
        attacker = await Attacker.at(NEW_FA)  # replays from the new FA's own address
        try:
            ack = await w.move()
            assert ack is not None and ack.accepted
            assert str(HOA) not in w.old.visitors and w.old.mavpn.infos(NAI) == []  # type: ignore[union-attr]
            await settle()
            (str_,) = w.old.diameter.requests  # type: ignore[union-attr]
            assert str_.get("Termination-Cause") == TerminationCause.DIAMETER_USER_MOVED
            (first,) = w.tap.of(mip.BindingUpdate)  # as it crossed the wire
            # mn1 comes back to the old FA; the captured update is replayed at it.
            await w.visit()
            before = w.state()
            again = await attacker.send(first, (OLD_FA, port(w.old.udp)))  # type: ignore[arg-type]
            assert w.state() == before  # visitor, path, session: untouched
            # It is the last update accepted from that FA for mn1: answered as then (a lost
            # acknowledgement looks the same to the sender), nothing done.
            assert again is not None and again.status == S.ACCEPTED
            assert again.identification == mip.decode_message(first).identification  # type: ignore[attr-defined]
            # The MN leaves again (a second update), comes back; now the first one is old.
            assert (await w.move()).accepted  # type: ignore[union-attr]
            await w.visit()
            before = w.state()
            stale = await attacker.send(first, (OLD_FA, port(w.old.udp)))  # type: ignore[arg-type]
            assert w.state() == before
            assert stale is not None and stale.status == S.IDENTIFICATION_MISMATCH
            assert w.old.counters["bu_replayed"] == 1 and w.old.counters["bu_duplicate"] == 1
        finally:
            w.close()
            attacker.udp.close()  # type: ignore[union-attr]

    run(main())


def test_old_fa_refuses_extensions_appended_after_the_authenticator(tmp_path: Path) -> None:
    async def main() -> None:
        w = await Fas.up(tmp_path)
        attacker = await Attacker.at(NEW_FA)
        try:
            genuine = signed_bu()  # a plain "mn1 moved on", as the new FA signs it
            # An on-path attacker appends a VPN-Info CVSE after the MAC: a forwarding path old
            # FA -> new FA for mn1, which the old FA would derive keys for and install (F6).
            copy = vpninfo.forward_copy(fa_path(NEW_FA), IPv4Address(OLD_FA), 10, FA_FA_KEY)
            cvse = mip.vendor_extension(mip.VENDOR_TYPE_VPN_INFO, vpninfo.encode_for_mip([copy]),
                                        critical=True)
            before = w.state()
            ack = await attacker.send(genuine + cvse.encode(), (OLD_FA, port(w.old.udp)))  # type: ignore[arg-type]
            assert ack is not None and ack.status == S.POORLY_FORMED_UPDATE
            assert w.state() == before and NAI not in w.old.forwards  # nothing installed, nothing removed
            assert w.old.counters["bu_unauthenticated_extensions"] == 1
            # The refusal spent nothing: the genuine update, arriving after it, does what it says.
            ack = await attacker.send(genuine, (OLD_FA, port(w.old.udp)))  # type: ignore[arg-type]
            assert ack is not None and ack.accepted
            assert str(HOA) not in w.old.visitors and w.old.forwards == {}
        finally:
            w.close()
            attacker.udp.close()  # type: ignore[union-attr]

    run(main())


def test_old_fa_refuses_a_stale_or_missing_identification(tmp_path: Path) -> None:
    async def main() -> None:
        w = await Fas.up(tmp_path)
        attacker = await Attacker.at(NEW_FA)
        try:
            before = w.state()
            to = (OLD_FA, port(w.old.udp))  # type: ignore[arg-type]
            stale = await attacker.send(signed_bu(ident=mip.ntp_identification(time.time() - 60)), to)
            assert stale is not None and stale.status == S.IDENTIFICATION_MISMATCH
            unnumbered = mip.BindingUpdate(home_address=HOA, care_of_address=IPv4Address(NEW_FA), identification=None,
                                           lifetime=10, flags=mip.BUFlag.A, extensions=[mip.NAIExtension(NAI)])
            none = await attacker.send(mip.sign(unnumbered, mip.EXT_BINDING_AUTH, FA_SPI, FA_FA_KEY).encode(), to)
            assert none is not None and none.status == S.IDENTIFICATION_MISMATCH
            assert w.state() == before
            assert w.old.counters["bu_replayed"] == 2
        finally:
            w.close()
            attacker.udp.close()  # type: ignore[union-attr]

    run(main())


def test_smooth_handoff_goes_on_with_a_lost_acknowledgement(tmp_path: Path) -> None:
    """Honest F6: the old FA's first acknowledgement is lost; the new FA's retry (a new
    identification) is taken and acknowledged; both ends hold the forwarding path."""

    async def main() -> None:
        w = await Fas.up(tmp_path)
        to_new = Tap(w.new.on_datagram)
        to_new.drop = drop_first()  # the first datagram back: the first acknowledgement
        w.new.udp.handler = to_new  # type: ignore[union-attr]
        try:
            ours = await w.new.smooth_handoff(OLD_FA, w.pending(), fa_path(NEW_FA))
            assert ours is not None and NAI in w.new.forwards
            tries = w.tap.of(mip.BindingUpdate)
            assert len(tries) == 2 and len({mip.decode_message(t).identification for t in tries}) == 2  # type: ignore[attr-defined]
            assert [mip.decode_message(a).status for a in to_new.of(mip.BindingAcknowledge)] == [S.ACCEPTED] * 2  # type: ignore[attr-defined]
            (forward,) = w.old.mavpn.infos(NAI)  # type: ignore[union-attr]  # the path to the HA is gone
            assert forward.path_id == vpninfo.FORWARD_PATH_ID and str(forward.path.remote.address) == NEW_FA
            assert str(HOA) not in w.old.visitors and NAI in w.old.forwards
        finally:
            w.close()

    run(main())


# ---- the dynamic CN-GW (F4, F5) and the HA (F8) ------------------------------------------------------


class RouteOpt:
    """The HA and the dynamic CN-GW (a recorder backend) on their own sockets; ``to_gw`` and
    ``to_ha`` record what reaches each."""

    def __init__(self, ha: HomeAgent, gw: CorrespondentGateway, to_gw: Tap, to_ha: Tap) -> None:
        self.ha, self.gw, self.to_gw, self.to_ha = ha, gw, to_gw, to_ha

    @classmethod
    async def up(cls, tmp: Path, threshold: float = 8.0) -> RouteOpt:
        ha = HomeAgent(HAConfig(node="ha", role="ha", state_dir=tmp / "ha", control_socket=tmp / "ha.sock",
                                address=IPv4Address(HA), home_prefix=IPv4Network("198.18.100.0/24"),
                                binding_ack_timeout=0.2,
                                correspondent_gateways=[PeerAgent(IPv4Address(GW), GW_SPI, HA_GW_KEY)],
                                seal=key_file(tmp, "ha.home.example")))
        gw = CorrespondentGateway(CNGWConfig(node="cngw2", role="cngw", state_dir=tmp / "gw",
                                             control_socket=tmp / "gw.sock", address=IPv4Address(GW),
                                             home_agents=[PeerAgent(IPv4Address(HA), GW_SPI, HA_GW_KEY)],
                                             binding_request_threshold=threshold, binding_request_interval=0.1,
                                             seal=key_file(tmp, "cngw2")))
        gw.mavpn = MavpnControl(Recorder(Capability.NONE), RecordStore(tmp / "gw" / "vpn.db"))
        ha.home_link = NoRoutes()  # type: ignore[assignment]
        to_gw, to_ha = Tap(gw.on_datagram), Tap(ha.on_datagram)
        gw.udp = await UdpEndpoint.open(to_gw, GW, 0)
        ha.udp = await UdpEndpoint.open(to_ha, HA, 0)
        ha.cngw_peers.port, gw.ha_peers.port = port(gw.udp), port(ha.udp)
        return cls(ha, gw, to_gw, to_ha)

    @property
    def installs(self) -> list[tuple[str, ...]]:
        return self.gw.mavpn.backend.calls  # type: ignore[union-attr,attr-defined]

    def close(self) -> None:
        for udp in (self.ha.udp, self.gw.udp):
            if udp is not None:
                udp.close()


def path_at_gw(fa: str = "198.18.0.14") -> VpnInfo:
    """The CN-GW's path as the HA holds it: sealed by the AAAH for the CN-GW."""
    return sealed("cngw2", [cngw_view(fa=IPv4Address(fa), gw=IPv4Address(GW))])[0]


def test_cngw_refuses_a_replay_after_the_binding_is_deleted(tmp_path: Path) -> None:
    async def main() -> None:
        w = await RouteOpt.up(tmp_path)
        attacker = await Attacker.at(HA)  # from the HA's own address
        fa = IPv4Address("198.18.0.14")
        try:
            await w.ha.update_correspondents(NAI, HOA, fa, 20, [path_at_gw()])
            assert str(HOA) in w.gw.table.bindings
            await w.ha.update_correspondents(NAI, HOA, HOA, 0, None)  # the MN went home: lifetime 0
            assert w.gw.table.bindings == {} and w.gw.mavpn.infos(NAI) == []  # type: ignore[union-attr]
            create, delete = w.to_gw.of(mip.BindingUpdate)
            calls = len(w.installs)
            to = (GW, port(w.gw.udp))  # type: ignore[arg-type]
            # The update that created the binding, replayed within the window: it is older
            # than the deletion, which the CN-GW still remembers though the binding is gone.
            ack = await attacker.send(create, to)
            assert w.gw.table.bindings == {} and w.gw.mavpn.infos(NAI) == [] and len(w.installs) == calls  # type: ignore[union-attr]
            assert ack is not None and ack.status == S.IDENTIFICATION_MISMATCH
            # The deletion again: the last accepted update, answered as then.
            ack = await attacker.send(delete, to)
            assert ack is not None and ack.status == S.ACCEPTED and w.gw.table.bindings == {}
            assert w.gw.counters["bu_replayed"] == 1 and w.gw.counters["bu_duplicate"] == 1
        finally:
            w.close()
            attacker.udp.close()  # type: ignore[union-attr]

    run(main())


def test_cngw_does_not_bring_back_an_expired_binding(tmp_path: Path) -> None:
    async def main() -> None:
        w = await RouteOpt.up(tmp_path, threshold=0)
        attacker = await Attacker.at(HA)
        try:
            await w.ha.update_correspondents(NAI, HOA, IPv4Address("198.18.0.14"), 2, [path_at_gw()])
            (update,) = w.to_gw.of(mip.BindingUpdate)
            await w.gw.tick(time.time() + 3)  # its 2 s are over
            assert w.gw.table.bindings == {} and w.gw.mavpn.infos(NAI) == []  # type: ignore[union-attr]
            calls = len(w.installs)
            ack = await attacker.send(update, (GW, port(w.gw.udp)))  # type: ignore[arg-type]
            assert w.gw.table.bindings == {} and w.gw.mavpn.infos(NAI) == [] and len(w.installs) == calls  # type: ignore[union-attr]
            assert ack is not None and ack.identification == mip.decode_message(update).identification  # type: ignore[attr-defined]
        finally:
            w.close()
            attacker.udp.close()  # type: ignore[union-attr]

    run(main())


def test_cngw_refuses_extensions_appended_after_the_authenticator(tmp_path: Path) -> None:
    async def main() -> None:
        w = await RouteOpt.up(tmp_path)
        attacker = await Attacker.at(HA)
        try:
            # An update signed with the HA's key that carries no VPN info; an on-path attacker
            # appends a CVSE after the MAC with a path (and ESP keys) of its choosing.
            genuine = signed_bu(HA_GW_KEY, GW_SPI, lifetime=20, coa="198.18.0.14")
            cvse = mip.vendor_extension(mip.VENDOR_TYPE_VPN_INFO, vpninfo.encode_for_mip([path_at_gw()]), critical=True)
            to = (GW, port(w.gw.udp))  # type: ignore[arg-type]
            ack = await attacker.send(genuine + cvse.encode(), to)
            assert w.gw.table.bindings == {} and w.installs == []
            assert ack is not None and ack.status == S.POORLY_FORMED_UPDATE
            # Not spent by the refusal: the update as signed is judged on what it says.
            ack = await attacker.send(genuine, to)
            assert ack is not None and ack.status == S.VPN_INFO_MISSING and w.installs == []
            # Appended to an update that has VPN info of its own: refused too, not partly used.
            real = signed_bu(HA_GW_KEY, GW_SPI, lifetime=20, coa="198.18.0.14",
                             extensions=[mip.NAIExtension(NAI), cvse])
            ack = await attacker.send(real + mip.NAIExtension("mallory@home.example").encode(), to)
            assert ack is not None and ack.status == S.POORLY_FORMED_UPDATE and w.installs == []
            assert w.gw.counters["bu_unauthenticated_extensions"] == 2
        finally:
            w.close()
            attacker.udp.close()  # type: ignore[union-attr]

    run(main())


def test_ha_retransmission_is_acknowledged_again_and_installs_once(tmp_path: Path) -> None:
    """Honest F4: the CN-GW's first acknowledgement is lost; the HA sends the same signed
    update again; the CN-GW answers it as the first, without installing anything twice."""

    async def main() -> None:
        w = await RouteOpt.up(tmp_path)
        w.to_ha.drop = drop_first()  # the first acknowledgement
        try:
            ack = await w.ha.send_binding_update(GW, NAI, HOA, IPv4Address("198.18.0.14"), 20, [path_at_gw()])
            assert ack is not None and ack.accepted and ack.lifetime == 20
            first, second = w.to_gw.of(mip.BindingUpdate)
            assert first == second  # the same signed update
            assert [mip.decode_message(a).status for a in w.to_ha.of(mip.BindingAcknowledge)] == [S.ACCEPTED] * 2  # type: ignore[attr-defined]
            assert [c[0] for c in w.installs] == ["install"]
            assert w.gw.table.bindings[str(HOA)].care_of_address == "198.18.0.14"
            assert w.gw.counters["bu_duplicate"] == 1
        finally:
            w.close()

    run(main())


def test_a_tampered_copy_cannot_end_the_has_transaction(tmp_path: Path) -> None:
    """An on-path attacker sends the CN-GW a copy of the HA's update with an extension appended
    (or a broken authenticator) just before the genuine one: the CN-GW refuses the copy (134,
    131) unsigned, so the HA, waiting for that identification, is not told "refused"; the
    genuine update is installed and acknowledged."""

    async def main() -> None:
        w = await RouteOpt.up(tmp_path)

        def tamper_first(data: bytes) -> bool:
            if len(w.to_gw.got) == 1:  # the genuine update, as it crossed the wire
                w.gw.on_datagram(data + mip.NAIExtension("mallory@home.example").encode(), (HA, port(w.ha.udp)))
                w.gw.on_datagram(data[:-1] + bytes([data[-1] ^ 1]), (HA, port(w.ha.udp)))  # type: ignore[arg-type]
            return False

        w.to_gw.drop = tamper_first
        try:
            ack = await w.ha.send_binding_update(GW, NAI, HOA, IPv4Address("198.18.0.14"), 20, [path_at_gw()])
            assert ack is not None and ack.accepted
            assert [c[0] for c in w.installs] == ["install"] and str(HOA) in w.gw.table.bindings
            assert w.gw.counters["bu_unauthenticated_extensions"] == 1
        finally:
            w.close()

    run(main())


def test_ha_answers_a_binding_request_once(tmp_path: Path) -> None:
    async def main() -> None:
        w = await RouteOpt.up(tmp_path, threshold=30)
        attacker = await Attacker.at(GW)  # from the CN-GW's own address
        try:
            await w.ha.update_correspondents(NAI, HOA, IPv4Address("198.18.0.14"), 20, [path_at_gw()])
            w.ha.bindings[str(HOA)] = Binding(NAI, str(HOA), "198.18.0.14", 20, time.time() + 15, 1, None)
            await w.gw.tick(time.time())  # below the threshold: the CN-GW asks
            await settle(0.5)
            (request,) = w.to_ha.of(mip.BindingRequest)
            assert len(w.to_gw.of(mip.BindingUpdate)) == 2  # answered
            to = (HA, port(w.ha.udp))  # type: ignore[arg-type]
            assert await attacker.send(request, to) is None
            await settle(0.5)
            assert len(w.to_gw.of(mip.BindingUpdate)) == 2  # a replayed request gets nothing
            # Nor one with something after the authenticator, nor a stale one.
            br = mip.decode_message(request)
            fresh = mip.BindingRequest(home_address=HOA, identification=mip.ntp_identification(time.time()),
                                       extensions=br.extensions[:1])
            signed = mip.sign(fresh, mip.EXT_BINDING_AUTH, GW_SPI, HA_GW_KEY).encode()
            assert await attacker.send(signed + mip.NAIExtension(NAI).encode(), to) is None
            old = mip.BindingRequest(home_address=HOA, identification=mip.ntp_identification(time.time() - 60),
                                     extensions=br.extensions[:1])
            assert await attacker.send(mip.sign(old, mip.EXT_BINDING_AUTH, GW_SPI, HA_GW_KEY).encode(), to) is None
            await settle(0.5)
            assert len(w.to_gw.of(mip.BindingUpdate)) == 2 and w.ha.counters["br_received"] == 1
            assert w.ha.counters["br_replayed"] == 2 and w.ha.counters["br_unauthenticated_extensions"] == 1
            # The same request unextended (its identification was not spent) is answered.
            assert await attacker.send(signed, to) is None
            await settle(0.5)
            assert len(w.to_gw.of(mip.BindingUpdate)) == 3 and w.ha.counters["br_received"] == 2
        finally:
            w.close()
            attacker.udp.close()  # type: ignore[union-attr]

    run(main())


# ---- registrations: only what the authenticator covers -----------------------------------------------


def test_ha_reads_the_nai_only_where_the_mn_ha_authenticator_covers_it(tmp_path: Path) -> None:
    from daemons.runtime.config import MobileNodeEntry

    mn_ha = SecurityAssociation(0x1000, Secret(b"mn-ha-key-of-mn1"))
    ha = HomeAgent(HAConfig(node="ha", role="ha", state_dir=tmp_path / "ha", control_socket=tmp_path / "ha.sock",
                            address=HA_ADDR, home_prefix=IPv4Network("198.18.100.0/24"),
                            mobile_nodes=[MobileNodeEntry(NAI, HOA, mn_ha.spi, mn_ha.key),
                                          MobileNodeEntry("mn2@home.example", IPv4Address("198.18.100.11"), 0x1001,
                                                          Secret(b"mn-ha-key-of-mn2"))]))
    ha.home_link = NoRoutes()  # type: ignore[assignment]
    rrq = mip.RegistrationRequest(HOA, HA_ADDR, IPv4Address("198.18.0.14"), mip.ntp_identification(time.time()), 300)
    raw = mip.sign(rrq, mip.EXT_MN_HA_AUTH, mn_ha.spi, mn_ha.key).encode()  # an MN that sends no NAI
    # Appended after the MN-HA authenticator: another user's NAI.
    wire = asyncio.run(ha.process_request(raw + mip.NAIExtension("mn2@home.example").encode(), "198.18.0.14"))
    assert wire is not None
    rrp = mip.decode_message(wire)
    assert isinstance(rrp, mip.RegistrationReply) and rrp.code == mip.ReplyCode.ACCEPTED  # judged by home address
    assert rrp.find(mip.NAIExtension) is None  # and nobody's NAI echoed
    assert [b.nai for b in ha.bindings.values()] == [NAI]


def test_fa_names_the_previous_fa_only_where_the_mn_ha_authenticator_covers_it(tmp_path: Path) -> None:
    fa = make_fa(tmp_path, NEW_FA, OLD_FA)
    mn_ha = SecurityAssociation(0x1000, Secret(b"mn-ha-key-of-mn1"))

    def pending(raw: bytes) -> Pending:
        rrq = mip.decode_message(raw)
        assert isinstance(rrq, mip.RegistrationRequest)
        return Pending(rrq, raw, NAI, 434, time.monotonic())

    def rrq(extensions: list[mip.Extension]) -> bytes:
        return mip.registration_request(home_address=HOA, home_agent=HA_ADDR, care_of_address=NEW_FA,
                                        identification=mip.ntp_identification(time.time()), lifetime=300, nai=NAI,
                                        extensions=extensions, mn_ha=mn_ha).encode()

    assert fa.previous_agent(pending(rrq([mip.previous_fa_extension(OLD_FA)]))) == OLD_FA  # the MN's word
    appended = rrq([]) + mip.previous_fa_extension(OLD_FA).encode()  # an attacker's, after the authenticator
    assert fa.previous_agent(pending(appended)) is None


# ---- the replay window itself, and restarts -----------------------------------------------------


def test_replay_window_checks_remembers_and_forgets() -> None:
    now = 1_800_000_000.0
    win = ReplayWindow(7.0, limit=2)
    a, b = ("198.18.0.18", "198.18.100.10"), ("198.18.0.18", "198.18.100.11")
    first = mip.ntp_identification(now)
    assert win.check(a, first, b"bu1", now) == (Fresh.FRESH, None)
    win.accept(a, first, b"bu1")
    assert win.check(a, first, b"bu1", now)[0] is Fresh.REPLAY  # not answered yet: no duplicate
    win.answered(a, first, S.ACCEPTED, 10)
    assert win.check(a, first, b"bu1", now) == (Fresh.DUPLICATE, (0, 10))
    assert win.check(a, first, b"another message, same identification", now)[0] is Fresh.REPLAY
    assert win.check(a, first - (1 << 32), b"bu0", now)[0] is Fresh.REPLAY  # a second earlier
    assert win.check(a, mip.ntp_identification(now - 8), b"old", now)[0] is Fresh.CLOCK
    assert win.check(a, None, b"bu", now)[0] is Fresh.MISSING
    assert win.check(b, mip.ntp_identification(now), b"x", now)[0] is Fresh.FRESH  # per home address
    win.accept(b, mip.ntp_identification(now), b"x")
    c = ("198.18.0.22", "198.18.100.10")  # per peer too; but two live keys fill this table
    assert win.check(c, mip.ntp_identification(now), b"y", now)[0] is Fresh.FULL
    # Bounded by time: once the window alone refuses them, the records go.
    later = now + 7.5
    assert win.check(c, mip.ntp_identification(later), b"y", later)[0] is Fresh.FRESH and len(win) == 0
    # What survives a restart: the identifications (no digests, no answers), still refusing replays.
    win.accept(a, first, b"bu1", (0, 10))
    again = ReplayWindow(7.0)
    again.load(win.to_json(), now + 1)
    assert again.check(a, first, b"bu1", now + 1)[0] is Fresh.REPLAY
    assert again.check(a, first + 1, b"bu2", now + 1)[0] is Fresh.FRESH
    expired = ReplayWindow(7.0)
    expired.load(win.to_json(), now + 8)
    assert len(expired) == 0
    for entry in (["x"], "y", [1, 2, 3], ["p", "h", -1], ["p", "h", "12"], {"p": 1}, ["p", "h", True]):
        with pytest.raises(TypeError):  # RecordStore.load_records drops, counts and logs it
            ReplayWindow.record(entry)
    assert ReplayWindow.record(["p", "h", first]) == ("p", "h", first)


def test_old_fa_remembers_across_a_restart(tmp_path: Path) -> None:
    async def main() -> None:
        w = await Fas.up(tmp_path)
        attacker = await Attacker.at(NEW_FA)
        try:
            assert (await w.move()).accepted  # type: ignore[union-attr]
            (update,) = w.tap.of(mip.BindingUpdate)
            w.old.udp.close()  # type: ignore[union-attr]
            # The old FA restarts (state reloaded), mn1 registers there again, the update is replayed.
            restarted = make_fa(tmp_path, OLD_FA, NEW_FA)
            restarted.restore()
            restarted.udp = await UdpEndpoint.open(restarted.on_datagram, OLD_FA, 0)
            w.old = restarted
            await w.visit()
            before = w.state()
            ack = await attacker.send(update, (OLD_FA, port(restarted.udp)))
            assert w.state() == before and ack is not None and ack.status == S.IDENTIFICATION_MISMATCH
        finally:
            w.close()
            attacker.udp.close()  # type: ignore[union-attr]

    run(main())


def test_cngw_remembers_across_a_restart(tmp_path: Path) -> None:
    async def main() -> None:
        w = await RouteOpt.up(tmp_path)
        attacker = await Attacker.at(HA)
        try:
            await w.ha.update_correspondents(NAI, HOA, IPv4Address("198.18.0.14"), 20, [path_at_gw()])
            await w.ha.update_correspondents(NAI, HOA, HOA, 0, None)
            create, _ = w.to_gw.of(mip.BindingUpdate)
            w.gw.udp.close()  # type: ignore[union-attr]
            gw = CorrespondentGateway(w.gw.config)
            gw.restore()  # as run() does (no IPsec backend here)
            gw.udp = await UdpEndpoint.open(gw.on_datagram, GW, 0)
            w.gw = gw
            ack = await attacker.send(create, (GW, port(gw.udp)))
            assert gw.table.bindings == {} and ack is not None and ack.status == S.IDENTIFICATION_MISMATCH
        finally:
            w.close()
            attacker.udp.close()  # type: ignore[union-attr]

    run(main())
