"""Claim 5 plumbing: a profile's ``distribution = on_traffic`` travels AAAH → VPN-Info → the
node's path control → the backend path (``VpnPath.on_traffic``), for the path toward the
correspondent only.  (That a trapped path really comes up at the first packet is shown with
real charons in tests/lab/test_strongswan_path.py and in the VM tier for xfrm.)"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from daemons.aaa.aaah import HomeAAAServer
from daemons.runtime.config import AAAHConfig, HomeAgentRef
from daemons.runtime.secret import Secret
from daemons.store.vpndb import open_database
from daemons.vpn import vpninfo
from daemons.vpn.mavpn import MavpnControl
from daemons.vpn.path import EndpointType
from daemons.wire.diameter.avp import decode_avps
from tests.unit.sealkit import key_files, sealed

NAI, NAI2 = "mn1@home.example", "mn2@home.example"
HOA, HOA2 = IPv4Address("198.18.1.10"), IPv4Address("198.18.1.11")
HA_ADDR, COA = IPv4Address("198.18.1.1"), IPv4Address("198.18.2.1")
HOME_PREFIX = IPv4Network("198.18.1.0/24")
CNGW, CORP = IPv4Address("198.18.9.1"), IPv4Network("198.18.100.0/24")
CNGW2, CORP2 = IPv4Address("198.18.9.2"), IPv4Network("198.18.101.0/24")
HA_REF = HomeAgentRef(HA_ADDR, "ha.home.example", HOME_PREFIX, 3868, IPv4Address("127.0.0.1"))


def build(tmp_path: Path, distribution: str, nai: str = NAI, hoa: IPv4Address = HOA) -> list[vpninfo.VpnInfo]:
    url = f"sqlite:///{tmp_path / 'vpn.db'}"
    db = open_database(url, create=True)
    try:
        if db.gateway("cngw") is None:
            db.add_gateway("cngw", CNGW, "cngw-static")
            db.add_route("cngw", CORP)
            db.add_gateway("cngw2", CNGW2, "cngw-dynamic")
            db.add_route("cngw2", CORP2)
        db.add_user(nai, hoa, HA_ADDR, 0x3000, Secret(b"mn-aaa-secret-of-user"))
        db.add_profile(nai, CORP, "cngw", distribution=distribution)
        db.add_profile(nai, CORP2, "cngw2", distribution=distribution)
        config = AAAHConfig(node="aaah", role="aaah", state_dir=tmp_path / "aaah", control_socket=tmp_path / "s",
                            diameter_host="aaah.home.example", diameter_realm="home.example",
                            address=IPv4Address("127.0.0.1"), port=0, db_url=url, diameter_transport="tcp",
                            master_secret=Secret(bytes(range(32))), home_agents=[HA_REF],
                            seal_keys=key_files(tmp_path, "ha.home.example"))
        aaah = HomeAAAServer(config, db)
        return asyncio.run(aaah.build_paths(nai, hoa, COA, HA_REF, db.profiles_for(nai)))
    finally:
        db.close()


def test_on_traffic_profile_marks_only_the_paths_toward_the_correspondent(tmp_path: Path) -> None:
    infos = {(i.path.local.type, i.path.remote.type): i for i in build(tmp_path, "on_traffic")}
    assert set(infos) == {(EndpointType.FA, EndpointType.HA), (EndpointType.HA, EndpointType.CNGW_STATIC),
                          (EndpointType.FA, EndpointType.CNGW_DYNAMIC)}
    # the FA⇄HA path is the MN's anchor (all its traffic, registration follows it): always now
    assert infos[(EndpointType.FA, EndpointType.HA)].distribution == vpninfo.AT_REGISTRATION
    assert infos[(EndpointType.HA, EndpointType.CNGW_STATIC)].distribution == vpninfo.ON_TRAFFIC
    assert infos[(EndpointType.FA, EndpointType.CNGW_DYNAMIC)].distribution == vpninfo.ON_TRAFFIC
    # on the wire (VPN-Distribution AVP) and in each end's view
    for info in infos.values():
        back = vpninfo.VpnInfo.from_avp(decode_avps(sealed("any", [info])[0].to_avp().encode())[0], NAI)
        assert back.distribution == info.distribution == info.mirrored().distribution


def test_at_registration_profile_is_the_default(tmp_path: Path) -> None:
    assert {i.distribution for i in build(tmp_path, "at_registration")} == {vpninfo.AT_REGISTRATION}


def test_path_control_turns_distribution_into_trapped_backend_paths(tmp_path: Path) -> None:
    trapped = build(tmp_path, "on_traffic")
    now = build(tmp_path, "at_registration", NAI2, HOA2)
    control = MavpnControl.__new__(MavpnControl)  # the mapping only: no backend, no state file
    control.cache = {NAI: {i.path_id: i for i in trapped}}
    paths = control.backend_paths()
    by_type = {(p.local.type, p.remote.type): p for p in paths.values()}
    assert by_type[(EndpointType.FA, EndpointType.HA)].on_traffic is False
    assert by_type[(EndpointType.FA, EndpointType.CNGW_DYNAMIC)].on_traffic is True
    shared = by_type[(EndpointType.HA, EndpointType.CNGW_STATIC)]
    assert shared.id.startswith("net:") and shared.on_traffic is True
    # the shared HA⇄CN-GW tunnel: a second user who wants it at registration brings it up for
    # everybody, whichever order the users come in; without them it is trapped again
    for order in ([NAI, NAI2], [NAI2, NAI]):
        control.cache = {n: {i.path_id: i for i in (trapped if n == NAI else now)} for n in order}
        assert control.backend_paths()[shared.id].on_traffic is False
    control.cache = {NAI: {i.path_id: i for i in trapped}}
    assert control.backend_paths()[shared.id] == shared
    # a VpnInfo's distribution wins over whatever the path object says
    info = trapped[0]
    assert MavpnControl.backend_path(replace(info, path=replace(info.path, on_traffic=True))).on_traffic is False
