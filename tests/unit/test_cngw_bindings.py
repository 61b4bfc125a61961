"""Route optimisation logic (F4, F5, F8) without namespaces: the CN-GW's binding table, its
checks of a Binding Update, and the HA ⇄ CN-GW exchange between the real daemon objects
(real codecs and authenticators) over an in-process datagram wire; no IPsec backend
(``ipsec_backend: none``). The lab test tests/lab/test_route_opt.py does the same with
real sockets, namespaces and ESP."""

from __future__ import annotations

import asyncio
import time
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from daemons.agents.cngw import BindingTable, CnBinding, CorrespondentGateway, check_vpn_info
from daemons.agents.ha import Binding, HomeAgent, by_gateway, split_paths
from daemons.runtime.config import CNGWConfig, HAConfig, PeerAgent
from daemons.runtime.secret import Secret
from daemons.store.records import RecordStore
from daemons.vpn import vpninfo
from daemons.vpn.mavpn import MavpnControl
from daemons.vpn.path import Capability, DirectionKeys, Endpoint, EndpointType, EspSuite, SecurityService, VpnPath
from daemons.vpn.vpninfo import VpnInfo, moved_to
from daemons.wire import mip
from tests.unit.sealkit import key_file, opened, sealed
from tests.unit.test_path_capabilities import Recorder

NAI = "mn1@home.example"
HOA, HA = IPv4Address("198.18.100.10"), IPv4Address("198.18.100.1")
FA1, FA2 = IPv4Address("198.18.0.14"), IPv4Address("198.18.0.18")
GW = IPv4Address("198.18.0.34")
CORP = IPv4Network("198.18.3.0/24")
KEY = Secret(b"ha-cngw2 binding key")
SPI = 0x5000


def cngw_view(fa: IPv4Address = FA1, gw: IPv4Address = GW, path_id: int = 3) -> VpnInfo:
    suite = EspSuite.AES128GCM16
    keys = [DirectionKeys(0x10000 + i, Secret(bytes([i]) * 20)) for i in range(2)]
    return VpnInfo(NAI, path_id, VpnPath(
        id=VpnInfo.path_name(NAI, path_id), local=Endpoint(gw, EndpointType.CNGW_DYNAMIC),
        remote=Endpoint(fa, EndpointType.FA), local_ts=(CORP,), remote_ts=(IPv4Network(f"{HOA}/32"),),
        security=SecurityService(suite, outbound=keys[0], inbound=keys[1], psk=Secret(b"p" * 32))))


def for_cngw(fa: IPv4Address = FA1) -> list[VpnInfo]:
    """The CN-GW's path as the HA gets it in the HAR: sealed by the AAAH for the CN-GW."""
    return sealed("cngw2", [cngw_view(fa)])


def key_material(info: VpnInfo) -> list[bytes]:
    """Every key and the PSK of an open path (to look for in captured bytes)."""
    sec = info.path.security
    keys = [k for d in (sec.inbound, sec.outbound) if d is not None for k in (d.enc_key, d.auth_key) if k is not None]
    return [k.reveal() for k in (*keys, *([sec.psk] if sec.psk is not None else []))]


def ha_view(fa: IPv4Address = FA1) -> VpnInfo:
    return VpnInfo(
        NAI, 1, VpnPath(id=VpnInfo.path_name(NAI, 1), local=Endpoint(HA, EndpointType.HA),
                        remote=Endpoint(fa, EndpointType.FA), local_ts=(IPv4Network("0.0.0.0/0"),),
                        remote_ts=(IPv4Network(f"{HOA}/32"),),
                        security=SecurityService(EspSuite.AES128GCM16, psk=Secret(b"q" * 32))))


# ---- the CN-GW's binding table (F8) -------------------------------------------------------------


def test_binding_requests_start_below_the_threshold_and_are_paced() -> None:
    table = BindingTable(threshold=8, interval=1)
    t0 = 1000.0
    table.update(NAI, str(HOA), str(FA1), str(HA), 20, 1, t0)
    assert table.requests_due(t0) == [] and table.requests_due(t0 + 11.9) == []
    (due,) = table.requests_due(t0 + 12.1)  # 7.9 s left
    assert due.home_agent == str(HA) and due.requests == 1
    assert table.requests_due(t0 + 12.5) == []  # asked within the interval
    assert len(table.requests_due(t0 + 13.2)) == 1
    # The HA answers with what is left (< threshold): the pacing goes on, no burst.
    table.update(NAI, str(HOA), str(FA1), str(HA), 6, 2, t0 + 13.3)
    assert table.requests_due(t0 + 13.4) == []
    assert [b.requests for b in table.requests_due(t0 + 14.3)] == [3]
    # A renewal with a full lifetime starts afresh.
    table.update(NAI, str(HOA), str(FA2), str(HA), 20, 3, t0 + 15)
    assert table.requests_due(t0 + 16) == []
    assert table.bindings[str(HOA)].requests == 0


def test_bindings_expire_and_persist() -> None:
    table = BindingTable(threshold=8, interval=1)
    table.update(NAI, str(HOA), str(FA1), str(HA), 20, 1, 1000.0)
    assert table.expired(1019.9) == []
    copy = BindingTable(8, 1)
    assert copy.load([CnBinding(**r) for r in table.to_json().values()], 1010.0) == 0
    assert copy.bindings == table.bindings
    late = BindingTable(8, 1)
    assert late.load([CnBinding(**r) for r in table.to_json().values()], 1030.0) == 1  # ran out while we were down
    assert late.bindings == {}
    (gone,) = table.expired(1020.0)
    assert gone.nai == NAI and table.bindings == {}
    assert table.requests_due(1021.0) == []


def test_vpn_info_must_be_ours_and_the_updates() -> None:
    bu = mip.BindingUpdate(home_address=HOA, care_of_address=FA1, identification=1, lifetime=20)
    assert check_vpn_info([cngw_view()], GW, bu) is None
    assert "no VPN-Info" in check_vpn_info([], GW, bu)  # type: ignore[operator]
    assert "is not this gateway" in check_vpn_info([cngw_view(gw=IPv4Address("198.18.0.30"))], GW, bu)  # type: ignore[operator]
    assert "is not this gateway" in check_vpn_info([ha_view()], GW, bu)  # type: ignore[operator]
    assert "not the care-of address" in check_vpn_info([cngw_view(fa=FA2)], GW, bu)  # type: ignore[operator]
    other = mip.BindingUpdate(home_address=IPv4Address("198.18.100.11"), care_of_address=FA1, identification=1,
                              lifetime=20)
    assert "do not cover the home address" in check_vpn_info([cngw_view()], GW, other)  # type: ignore[operator]


def test_ha_splits_moves_and_groups_cngw_paths() -> None:
    own, remote = split_paths([ha_view(), cngw_view()])
    assert own == [ha_view()] and remote == [cngw_view()]
    (moved,) = moved_to(remote, FA2)
    assert (moved.path.local.address, moved.path.remote.address) == (GW, FA2)
    assert moved.path.security == cngw_view().path.security  # same keys: only the FA end moves (F2)
    assert moved_to([moved], FA2) == [moved]
    other = cngw_view(gw=IPv4Address("198.18.0.38"), path_id=4)
    assert by_gateway([cngw_view(), other]) == {str(GW): [cngw_view()], "198.18.0.38": [other]}


# ---- HA ⇄ CN-GW over an in-process wire -----------------------------------------------------------


class Wire:
    """Datagrams between two daemon objects: ``send`` delivers to the peer's on_datagram as
    coming from ``me`` on UDP 434, on the next loop iteration; ``drop`` loses everything."""

    def __init__(self, me: IPv4Address) -> None:
        self.me = me
        self.peers: dict[str, Any] = {}
        self.sent: list[bytes] = []
        self.drop = False

    def send(self, data: bytes, addr: tuple[str, int]) -> None:
        self.sent.append(data)
        peer = self.peers.get(addr[0])
        if peer is not None and not self.drop:
            asyncio.get_running_loop().call_soon(peer.on_datagram, data, (str(self.me), mip.MIP_UDP_PORT))


def pair(tmp: Path, threshold: float = 8.0) -> tuple[HomeAgent, CorrespondentGateway, Wire, Wire]:
    ha = HomeAgent(HAConfig(node="ha", role="ha", state_dir=tmp / "ha", control_socket=tmp / "ha.sock",
                            address=HA, home_prefix=IPv4Network("198.18.100.0/24"), binding_ack_timeout=0.05,
                            correspondent_gateways=[PeerAgent(GW, SPI, KEY)], seal=key_file(tmp, "ha.home.example")))
    gw = CorrespondentGateway(CNGWConfig(node="cngw2", role="cngw", state_dir=tmp / "gw",
                                         control_socket=tmp / "gw.sock", address=GW,
                                         home_agents=[PeerAgent(HA, SPI, KEY)], binding_request_threshold=threshold,
                                         binding_request_interval=0.1, seal=key_file(tmp, "cngw2")))
    to_gw, to_ha = Wire(HA), Wire(GW)
    to_gw.peers[str(GW)], to_ha.peers[str(HA)] = gw, ha
    ha.udp, gw.udp = to_gw, to_ha  # type: ignore[assignment]
    return ha, gw, to_gw, to_ha


def decoded(wire: Wire) -> list[Any]:
    return [mip.decode_message(d) for d in wire.sent]


def test_ha_waits_for_the_acknowledge_and_moves_and_removes_the_binding(tmp_path: Path) -> None:
    async def main() -> None:
        ha, gw, to_gw, to_ha = pair(tmp_path)
        backend = Recorder(Capability.NONE)
        gw.mavpn = MavpnControl(backend, RecordStore(tmp_path / "gw" / "vpn.db"))
        await ha.update_correspondents(NAI, HOA, FA1, 20, for_cngw())
        # Returned only after the CN-GW acknowledged: its binding is already there.
        (bu,) = decoded(to_gw)
        (ba,) = decoded(to_ha)
        assert isinstance(bu, mip.BindingUpdate) and bu.ack_requested and bu.lifetime == 20
        assert isinstance(ba, mip.BindingAcknowledge) and ba.accepted and ba.identification == bu.identification
        assert mip.verify(to_gw.sent[0], mip.EXT_BINDING_AUTH, KEY, spi=SPI)
        # Sealed by the AAAH for the CN-GW, passed on by the HA unread: no key in the update.
        carried = vpninfo.decode_from_mip(bu.vendor_data(mip.VENDOR_TYPE_VPN_INFO), NAI)
        assert [i.sealed for i in carried] == [True] and opened("cngw2", carried) == [cngw_view()]
        assert [n for n, k in enumerate(key_material(cngw_view())) if k in to_gw.sent[0]] == []
        # ...and the CN-GW installed the path, opened with its own seal key.
        assert gw.mavpn.infos(NAI) == [cngw_view()] and backend.calls[0] == ("install", cngw_view().path.id)
        assert [(b["care_of_address"], b["home_agent"]) for b in gw.show_bindings()] == [(str(FA1), str(HA))]
        # F2: a move without VPN info: the same paths, FA end moved.
        await ha.update_correspondents(NAI, HOA, FA2, 20, None)
        assert gw.table.bindings[str(HOA)].care_of_address == str(FA2)
        assert ha.cn_paths[str(HOA)][0].path.remote.address == FA2
        # Deregistration: lifetime 0, no VPN info; the CN-GW forgets the binding.
        await ha.update_correspondents(NAI, HOA, HOA, 0, None)
        last = decoded(to_gw)[-1]
        assert last.lifetime == 0 and last.vendor_data(mip.VENDOR_TYPE_VPN_INFO) is None
        assert gw.table.bindings == {} and ha.cn_paths == {}
        assert [m.accepted for m in decoded(to_ha)] == [True, True, True]

    asyncio.run(asyncio.wait_for(main(), 10))


def test_unacknowledged_update_is_retransmitted_then_given_up(tmp_path: Path) -> None:
    async def main() -> None:
        ha, _, to_gw, _ = pair(tmp_path)
        to_gw.drop = True
        await ha.update_correspondents(NAI, HOA, FA1, 20, for_cngw())
        sent = decoded(to_gw)
        assert len(sent) == 3 and len({m.identification for m in sent}) == 1  # same update, three tries
        # kept: a Binding Request or the next update fixes it
        assert opened("cngw2", ha.cn_paths[str(HOA)]) == [cngw_view()]

    asyncio.run(asyncio.wait_for(main(), 10))


def test_cngw_refuses_what_it_cannot_take(tmp_path: Path) -> None:
    async def main() -> None:
        _, gw, _, _ = pair(tmp_path)
        ident = mip.ntp_identification(time.time())

        def bu(lifetime: int = 20, infos: list[VpnInfo] | None = None, key: Secret = KEY, ident: int = ident,
               coa: IPv4Address = FA1, recipient: str = "cngw2", clear: bool = False) -> bytes:
            ext: list[mip.Extension] = [mip.NAIExtension(NAI)]
            if infos is not None:
                data = b"".join(i.record_avp().encode() for i in infos) if clear else \
                    vpninfo.encode_for_mip(sealed(recipient, infos))
                ext.append(mip.vendor_extension(mip.VENDOR_TYPE_VPN_INFO, data, critical=True))
            msg = mip.BindingUpdate(home_address=HOA, care_of_address=coa, identification=ident, lifetime=lifetime,
                                    flags=mip.BUFlag.A, extensions=ext)
            return mip.sign(msg, mip.EXT_BINDING_AUTH, SPI, key).encode()

        async def status(raw: bytes, src: IPv4Address = HA) -> int:
            return int((await gw.process_update(mip.decode_message(raw), raw, str(src)))[0])

        S = mip.BindingStatus
        assert await status(bu(infos=[cngw_view()], key=Secret(b"wrong"))) == S.AUTHENTICATION_FAILED
        assert await status(bu(infos=[cngw_view()]), src=IPv4Address("198.18.0.2")) == S.AUTHENTICATION_FAILED
        assert await status(bu()) == S.VPN_INFO_MISSING
        assert await status(bu(infos=[cngw_view(fa=FA2)])) == S.VPN_INFO_UNSUPPORTED
        assert await status(bu(ident=mip.ntp_identification(time.time() - 60), infos=[cngw_view()])) == \
            S.IDENTIFICATION_MISMATCH
        # Keys sealed for another gateway, or in clear (the old wire form): refused, counted.
        assert await status(bu(infos=[cngw_view()], recipient="cngw9")) == S.VPN_KEYS_REFUSED
        assert gw.counters["seal_open_failed"] == 1
        assert await status(bu(infos=[cngw_view()], clear=True, ident=ident - 1)) == S.VPN_INFO_UNSUPPORTED
        assert gw.counters["keys_in_clear_refused"] == 1
        assert gw.table.bindings == {}
        good = bu(infos=[cngw_view()])
        assert await status(good) == S.ACCEPTED
        assert await status(good) == S.ACCEPTED  # a retransmission: the same answer
        older = bu(ident=ident - (1 << 32), infos=[cngw_view()])  # one second earlier: a replay
        assert await status(older) == S.IDENTIFICATION_MISMATCH
        assert gw.table.bindings[str(HOA)].identification == ident

    asyncio.run(asyncio.wait_for(main(), 10))


@pytest.mark.parametrize("bound", [True, False])
def test_binding_request_is_answered_only_while_bound(tmp_path: Path, bound: bool) -> None:
    async def main() -> None:
        ha, gw, to_gw, to_ha = pair(tmp_path, threshold=30)
        await ha.update_correspondents(NAI, HOA, FA1, 20, for_cngw())
        now = time.time()
        if bound:
            ha.bindings[str(HOA)] = Binding(NAI, str(HOA), str(FA1), 20, now + 15, 1, str(FA1))
        # Below the threshold (30 s > 20 s): the CN-GW asks the HA that posted the binding.
        await gw.tick(time.time())
        await asyncio.sleep(0.3)
        requests = [m for m in decoded(to_ha) if isinstance(m, mip.BindingRequest)]
        assert requests and requests[0].home_address == HOA
        updates = [m for m in decoded(to_gw) if isinstance(m, mip.BindingUpdate)]
        if bound:  # answered with what is left of the registration
            assert len(updates) == 2 and 0 < updates[1].lifetime <= 15
            assert ha.counters["br_received"] == 1 and gw.table.bindings[str(HOA)].lifetime == updates[1].lifetime
        else:  # no binding at the HA: no answer; at expiry the CN-GW drops it
            assert len(updates) == 1 and ha.counters["br_received"] == 1
            await gw.tick(time.time() + 21)
            assert gw.table.bindings == {} and gw.counters["expired"] == 1

    asyncio.run(asyncio.wait_for(main(), 10))


# ---- provisioning the default lab ------------------------------------------------------------------


def test_provisioning_makes_cngw2_dynamic_and_applies_topology_settings(tmp_path: Path) -> None:
    from daemons.provision.configs import SPI_HA_CNGW, Plan
    from daemons.provision.kinds import load_topology
    from daemons.runtime.config import ConfigError
    from daemons.store.vpndb import CngwMode, open_database

    topo = load_topology()
    configs = Plan(topo, tmp_path, "strongswan").configs()
    ha, cngw, cngw2 = configs["ha"], configs["cngw"], configs["cngw2"]
    assert isinstance(cngw2, CNGWConfig) and isinstance(ha, HAConfig) and isinstance(cngw, CNGWConfig)
    # cngw keeps its static tunnel; cngw2 has none, but a binding key shared with the HA.
    assert len(cngw.static_paths) == 1 and cngw.home_agents == []
    assert cngw2.static_paths == [] and cngw2.address == GW
    (ha_side,) = ha.correspondent_gateways
    (gw_side,) = cngw2.home_agents
    assert (ha_side.address, gw_side.address, ha_side.spi, gw_side.spi) == (GW, HA, SPI_HA_CNGW, SPI_HA_CNGW)
    assert ha_side.key == gw_side.key
    with open_database(f"sqlite:///{tmp_path / 'nodes' / 'aaah' / 'vpn.db'}") as db:
        modes = {p.gateway: p.gateway_type for p in db.profiles_for(NAI)}
    assert modes == {"cngw": CngwMode.STATIC, "cngw2": CngwMode.DYNAMIC}

    # A node's topology settings reach its daemon's configuration, checked like a config file.
    node = topo.nodes["cngw2"]
    nodes = {**topo.nodes, "cngw2": type(node)(**{**node.__dict__, "settings": {"binding_request_threshold": 6}})}
    tuned = type(topo)(**{**topo.__dict__, "nodes": nodes})
    assert Plan(tuned, tmp_path / "t", "none").configs()["cngw2"].binding_request_threshold == 6  # type: ignore[attr-defined]
    nodes["cngw2"] = type(node)(**{**node.__dict__, "settings": {"binding_request_treshold": 6}})
    with pytest.raises(ConfigError, match=r"nodes.cngw2.settings: binding_request_treshold: unknown field"):
        Plan(type(topo)(**{**topo.__dict__, "nodes": nodes}), tmp_path / "u", "none").configs()


def test_cngw_answers_an_unknown_critical_extension_with_134(tmp_path: Path) -> None:
    async def main() -> None:
        _, gw, _, to_ha = pair(tmp_path)
        bu = mip.BindingUpdate(home_address=HOA, care_of_address=FA1,
                               identification=mip.ntp_identification(time.time()), lifetime=20, flags=mip.BUFlag.A)
        raw = bu.encode() + bytes([100, 2, 0, 0])  # type 100: unknown and not skippable (RFC 5944 §1.9)
        gw.on_datagram(raw, (str(HA), mip.MIP_UDP_PORT))
        (ack,) = decoded(to_ha)
        assert isinstance(ack, mip.BindingAcknowledge) and ack.status == mip.BindingStatus.POORLY_FORMED_UPDATE
        assert ack.identification == bu.identification and gw.table.bindings == {}
        gw.on_datagram(b"\xff\x01garbage", (str(HA), mip.MIP_UDP_PORT))  # undecodable: dropped, counted
        assert len(to_ha.sent) == 1 and gw.counters["malformed"] == 2

    asyncio.run(asyncio.wait_for(main(), 10))
