"""Who the AAA daemons take Diameter requests from, over real loopback TCP.

* The HA (the real ``HomeAgent``, its real Diameter set-up, listening on a loopback address of
  its own): only its configured AAAH gets in, and a HAR from any other peer installs nothing.
* The AAAH (the real ``HomeAAAServer`` with the bare HA node of ``test_aaa``): AMRs only from
  its ``accept_peers``, not from the HA it dials; a duplicate AMR, with or without the T flag,
  is answered once (one HAR, one set of keys), and the same ids from another peer are not.
* The AAAF (the real ``ForeignAAAServer``): AMRs only from its FAs, not from a home server.

Attackers speak raw Diameter through the codec (``RawPeer``). Timings are only bounds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import time
from collections.abc import AsyncIterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from daemons.aaa.aaaf import ForeignAAAServer
from daemons.aaa.aaah import HomeAAAServer
from daemons.aaa.sessions import Session
from daemons.agents.ha import HomeAgent
from daemons.diameter.node import DiameterNode
from daemons.diameter.setup import diameter_node
from daemons.roles import load_config
from daemons.runtime.config import (
    AAAFConfig,
    AcceptedPeer,
    ConfigError,
    DiameterLimits,
    DiameterPeer,
    FAConfig,
    HAConfig,
    MobileNodeEntry,
    SecurityAssociation,
)
from daemons.wire import mip
from daemons.wire.diameter import Message, ResultCode
from tests.unit.sealkit import key_file
from tests.unit.test_aaa import (
    AAAF_HOST,
    AAAH_HOST,
    FA_HOST,
    HA_HOST,
    HOA,
    HOME,
    LO,
    LOOPBACK,
    MN_HA,
    NAI,
    SPI_MN_HA,
    VISIT,
    FakeHA,
    aaah_config,
    amr_for,
    rrq_bytes,
    run,
    seed,
    world,
)
from tests.unit.test_agents_aaa import NoRoutes, Udp
from tests.unit.test_diameter_node import RawPeer, eventually
from tests.unit.test_diameter_peer_auth import closed_soon, raw_from, raw_server

OTHER = "127.0.0.2"


# ---- the HA -------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def home_agent(tmp: Path, **extra: Any) -> AsyncIterator[tuple[HomeAgent, str]]:
    """The HA daemon's Diameter side, listening on port 3868 of a loopback address of its own
    (the HA address of the registrations), its AAAH configured at 127.0.0.1."""
    for _ in range(20):
        address = f"127.{random.randrange(64, 250)}.{random.randrange(1, 250)}.{random.randrange(1, 250)}"
        config = HAConfig(node="ha", role="ha", state_dir=tmp / "ha", control_socket=tmp / "ha.sock",
                          address=IPv4Address(address), home_prefix=IPv4Network("198.18.100.0/24"),
                          diameter_host=HA_HOST, diameter_realm=HOME, diameter_transport="tcp",
                          mobile_nodes=[MobileNodeEntry(NAI, HOA, SPI_MN_HA, MN_HA)],
                          accept_peers=[AcceptedPeer(AAAH_HOST, HOME, LOOPBACK)], seal=key_file(tmp, HA_HOST), **extra)
        ha = HomeAgent(config)
        ha.home_link, ha.udp = NoRoutes(), Udp()  # type: ignore[assignment]
        try:
            await ha.start_diameter()
        except OSError:  # that address:3868 is taken on this machine: another one
            continue
        assert ha.diameter is not None
        try:
            yield ha, address
        finally:
            await ha.diameter.stop()
        return
    raise RuntimeError("no free loopback address for the HA")


def har_for(ha_address: str, origin: str = AAAH_HOST) -> Message:
    """A HAR as the AAAH builds it, around an RRQ the mobile node signed for this HA."""
    rrq = mip.registration_request(home_address=HOA, home_agent=IPv4Address(ha_address),
                                   care_of_address=IPv4Address("198.18.0.14"),
                                   identification=mip.ntp_identification(time.time()), lifetime=300, nai=NAI,
                                   mn_ha=SecurityAssociation(SPI_MN_HA, MN_HA))
    return Message.request("HAR", [("Session-Id", f"{origin};1;7"), ("Auth-Application-Id", 2),
                                   ("Origin-Host", origin), ("Origin-Realm", HOME), ("Destination-Realm", HOME),
                                   ("Destination-Host", HA_HOST), ("User-Name", NAI),
                                   ("MIP-Reg-Request", rrq.encode())], proxiable=True)


def test_ha_lets_in_only_its_aaah_and_keeps_its_connection(tmp_path: Path) -> None:
    async def main() -> None:
        async with home_agent(tmp_path) as (ha, address):
            assert ha.diameter is not None
            port = 3868
            aaah = DiameterNode(AAAH_HOST, HOME, [LO])
            aaah.add_peer(HA_HOST, HOME, address, port)
            async with aaah:
                await aaah.wait_open(HA_HOST, 5)
                # a stranger, and the AAAH's name from another address: 3010, closed
                for source, host in ((LO, "fa9.visit-a.example"), (OTHER, AAAH_HOST)):
                    raw = await raw_from(source, port, to=address)
                    cea = await raw.cer(host, HOME)
                    assert cea.result_code == ResultCode.DIAMETER_UNKNOWN_PEER
                    assert await closed_soon(raw)
                assert ha.diameter.counters["cer_unknown_peer"] == 1
                assert ha.diameter.counters["cer_address_refused"] == 1
                assert ha.bindings == {}
                # the AAAH's connection is untouched and its HAR goes through
                haa = await aaah.request(har_for(address), timeout=5)
                assert haa.result_code == ResultCode.DIAMETER_SUCCESS
                assert ha.bindings[str(HOA)].relayed_by == f"aaa:{AAAH_HOST}"

    run(main())


def test_ha_refuses_a_har_from_a_peer_that_is_not_its_aaah(tmp_path: Path) -> None:
    """Even if the engine let a stranger in (its accept_unknown_peers setting), a HAR from anyone
    but the configured AAAH is refused 5003 and installs nothing — whatever Origin-Host it claims."""
    async def main() -> None:
        async with home_agent(tmp_path) as (ha, address):
            assert ha.diameter is not None
            ha.diameter.settings.accept_unknown_peers = True
            raw = await raw_from(LO, 3868, to=address)
            assert (await raw.cer("intruder.evil.example", "evil.example")).result_code == 2001
            har = har_for(address, origin="intruder.evil.example")
            har.hop_by_hop, har.end_to_end = 0x100, 0x200
            raw.send(har)
            haa = await raw.recv_not(280)
            assert haa.result_code == ResultCode.DIAMETER_AUTHORIZATION_REJECTED
            assert haa.get("MIP-Reg-Reply") is None
            assert ha.bindings == {} and ha.counters["har_refused"] == 1 and ha.counters["received"] == 0

    run(main())


# ---- the AAAH -----------------------------------------------------------------------------------------


def test_aaah_refuses_an_amr_from_its_home_agent(tmp_path: Path) -> None:
    """The HA is a configured peer of the AAAH (the AAAH dials it), but not one that may send AMRs."""
    async def main() -> None:
        async with world(tmp_path) as w:
            assert w.ha_node is not None
            amr = amr_for(w.ha_node, rrq_bytes())
            ama = await w.ha_node.request(amr, timeout=5)
            assert ama.result_code == ResultCode.DIAMETER_AUTHORIZATION_REJECTED
            assert ama.get("MIP-Reg-Reply") is None and ama.find("VPN-Info") is None
            assert w.ha.hars == [] and w.aaah.store.sessions == {}
            assert w.aaah.counters["amr_refused"] == 1

    run(main())


AAAF2_HOST = "aaaf2.visit-b.example"


@contextlib.asynccontextmanager
async def aaah_alone(tmp: Path) -> AsyncIterator[tuple[HomeAAAServer, FakeHA, int]]:
    """The AAAH and its HA; two AAAFs (agents, at 127.0.0.1) may connect: raw peers play them."""
    ha = FakeHA("accept")
    async with contextlib.AsyncExitStack() as stack:
        ha_node = DiameterNode(HA_HOST, HOME, [LO], listen_address=LO, listen_port=0)
        ha_node.add_peer(AAAH_HOST, HOME, sources=[LO])
        ha_node.register_handler(2, 262, ha, required=("User-Name", "MIP-Reg-Request"))
        await ha_node.start()
        stack.push_async_callback(ha_node.stop)
        config = dataclasses.replace(aaah_config(tmp, seed(tmp / "vpn.db"), ha_node.port), diameter_transport="tcp",
                                     accept_peers=[
            AcceptedPeer(AAAF_HOST, VISIT, LOOPBACK, agent=True),
            AcceptedPeer(AAAF2_HOST, "visit-b.example", LOOPBACK, agent=True)])
        aaah = HomeAAAServer(config)
        await aaah.start()
        stack.push_async_callback(aaah.stop)
        await aaah.diameter.wait_open(HA_HOST, 5)
        port = aaah.diameter.port
        assert port is not None
        yield aaah, ha, port


def amr_as(origin: str, realm: str, hop_by_hop: int, end_to_end: int) -> Message:
    """An AMR around a signed RRQ, as sent on the wire by (or on behalf of) ``origin``."""
    amr = amr_for(DiameterNode(origin, realm), rrq_bytes())
    amr.add("Origin-Host", origin)
    amr.add("Origin-Realm", realm)
    amr.hop_by_hop, amr.end_to_end = hop_by_hop, end_to_end
    return amr


def vpn_keys(ama: Message) -> list[bytes]:
    return [a.encode() for a in ama.find_all("VPN-Info")]


def test_duplicate_amr_with_or_without_t_is_answered_once(tmp_path: Path) -> None:
    async def main() -> None:
        async with aaah_alone(tmp_path) as (aaah, ha, port):
            aaaf = await RawPeer.connect(port)
            assert (await aaaf.cer(AAAF_HOST, VISIT)).result_code == 2001
            amr = amr_as(FA_HOST, VISIT, 0x10, 0x4242)
            amr.add("Route-Record", FA_HOST)  # relayed by the AAAF
            aaaf.send(amr)
            first = await aaaf.recv_not(280)
            assert first.result_code == 2001 and len(ha.hars) == 1 and vpn_keys(first)
            for hbh, t_flag in ((0x11, False), (0x12, True)):
                again = Message.decode(amr.encode())
                again.hop_by_hop, again.retransmit = hbh, t_flag
                aaaf.send(again)
                ans = await aaaf.recv_not(280)
                assert ans.hop_by_hop == hbh and ans.result_code == 2001
                assert vpn_keys(ans) == vpn_keys(first)  # the same answer, the same keys
            assert len(ha.hars) == 1 and aaah.counters["amr"] == 1 and aaah.diameter.counters["duplicates"] == 2
            # another AAAF sending the very same request gets a registration of its own, not those keys
            other = await RawPeer.connect(port)
            assert (await other.cer(AAAF2_HOST, "visit-b.example")).result_code == 2001
            stolen = Message.decode(amr.encode())
            stolen.hop_by_hop, stolen.retransmit = 0x13, True
            other.send(stolen)
            ans = await other.recv_not(280)
            assert vpn_keys(ans) != vpn_keys(first)
            assert len(ha.hars) == 2 and aaah.counters["amr"] == 2

    run(main())


# ---- the AAAF -----------------------------------------------------------------------------------------


def test_aaaf_takes_amrs_only_from_its_fas(tmp_path: Path) -> None:
    """An AMR from the home server side (here a raw AAAH the AAAF dials) is answered 5003 and
    neither relayed nor answered from the cache."""
    async def main() -> None:
        listener, handed = await raw_server(AAAH_HOST)
        async with listener:
            home_port = listener.sockets[0].getsockname()[1]
            aaaf = ForeignAAAServer(AAAFConfig(
                node="aaaf1", role="aaaf", state_dir=tmp_path / "aaaf-state", control_socket=tmp_path / "aaaf.sock",
                diameter_host=AAAF_HOST, diameter_realm=VISIT, address=IPv4Address(LO), port=0,
                diameter_transport="tcp", home_servers=[DiameterPeer(AAAH_HOST, HOME, IPv4Address(LO), home_port)],
                accept_peers=[AcceptedPeer(FA_HOST, VISIT, LOOPBACK)]))
            await aaaf.start()
            try:
                home = await handed
                await eventually(lambda: aaaf.diameter.peers[AAAH_HOST].is_open)
                amr = amr_as(AAAH_HOST, HOME, 0x21, 0x4343)
                home.send(amr)
                ans = await home.recv_not(280)
                assert ans.name == "AMA" and ans.result_code == ResultCode.DIAMETER_AUTHORIZATION_REJECTED
                assert ans.hop_by_hop == 0x21 and ans.find("VPN-Info") is None
                assert aaaf.counters["request_refused"] == 1 and aaaf.counters["amr_relayed"] == 0
                assert aaaf.diameter.counters["relayed"] == 0
                # and a stranger cannot connect at all
                stranger = await raw_from(OTHER, aaaf.diameter.port or 0)
                assert (await stranger.cer(FA_HOST, VISIT)).result_code == ResultCode.DIAMETER_UNKNOWN_PEER
            finally:
                await aaaf.stop()

    run(main())


# ---- configuration ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("change", "field", "problem"), [
    ({"accept_peers": [AcceptedPeer(AAAF_HOST, VISIT, [])]}, "accept_peers[0].addresses", "at least one address"),
    ({"accept_peers": [AcceptedPeer(AAAF_HOST, VISIT, LOOPBACK), AcceptedPeer(AAAF_HOST.upper(), VISIT, LOOPBACK)]},
     "accept_peers[1].host", "already configured as accept_peers[0]"),
    ({"accept_peers": [AcceptedPeer(HA_HOST, HOME, LOOPBACK)]}, "accept_peers[0].host",
     "already configured as home_agents[0]"),
    ({"accept_peers": [AcceptedPeer(AAAH_HOST, HOME, LOOPBACK)]}, "accept_peers[0].host", "own Diameter identity"),
    ({"diameter_limits": DiameterLimits(max_message=1000)}, "diameter_limits.max_message", "between 4096"),
    ({"diameter_limits": DiameterLimits(pending_per_peer=0)}, "diameter_limits.pending_per_peer", "at least 1"),
    ({"diameter_limits": DiameterLimits(connections_per_source=0)}, "diameter_limits.connections_per_source",
     "at least 1"),
], ids=["no-address", "twice", "also-dialled", "itself", "tiny-message", "no-pending", "no-connection"])
def test_diameter_peer_configuration_errors_name_the_field(tmp_path: Path, change: dict[str, Any], field: str,
                                                            problem: str) -> None:
    config = dataclasses.replace(aaah_config(tmp_path, "sqlite:///x.db", 3868), **change)
    with pytest.raises(ConfigError) as err:
        HomeAAAServer(config)
    assert str(err.value).startswith(f"aaah (aaah): {field}: "), str(err.value)
    assert problem in str(err.value)


def test_an_fa_accepts_no_diameter_peer_and_files_load_the_new_fields(tmp_path: Path) -> None:
    path = tmp_path / "aaaf.yaml"
    path.write_text("role: aaaf\nnode: aaaf1\nstate_dir: /tmp/x\ncontrol_socket: /tmp/x.sock\n"
                    "diameter_host: aaaf1.visit-a.example\ndiameter_realm: visit-a.example\naddress: 127.0.0.1\n"
                    "home_servers: [{host: core.relay.example, realm: relay.example, address: 198.18.0.1,\n"
                    "                source_addresses: [198.18.0.9], routes: [home.example]}]\n"
                    "accept_peers: [{host: fa1.visit-a.example, realm: visit-a.example,\n"
                    "                addresses: [198.18.0.14, 198.18.101.0/24]}]\n"
                    "diameter_limits: {max_message: 8192}\ndiameter_transport: tcp\n")
    config = load_config(path)
    assert isinstance(config, AAAFConfig)
    (fa,) = config.accept_peers
    assert [str(a) for a in fa.addresses] == ["198.18.0.14/32", "198.18.101.0/24"] and not fa.agent
    assert config.home_servers[0].routes == ["home.example"] and config.diameter_limits.max_message == 8192
    aaaf = ForeignAAAServer(dataclasses.replace(config, state_dir=tmp_path / "s", control_socket=tmp_path / "c"))
    relay = aaaf.diameter.peers["core.relay.example"]
    assert relay.may_connect_from(IPv4Address("198.18.0.9")) and relay.may_connect_from(IPv4Address("198.18.0.1"))
    assert not relay.may_connect_from(IPv4Address("198.18.0.10"))
    assert aaaf.diameter.settings.max_frame == 8192
    path.write_text(path.read_text().replace("addresses: [198.18.0.14, 198.18.101.0/24]", "addresses: [nope]"))
    with pytest.raises(ConfigError, match=r"accept_peers\[0\]\.addresses\[0\]: malformed"):
        load_config(path)
    fa_config = FAConfig(node="fa1", role="fa", state_dir=tmp_path / "fa", control_socket=tmp_path / "fa.sock",
                         diameter_host=FA_HOST, diameter_realm=VISIT, care_of_address=IPv4Address(LO),
                         diameter_transport="tcp",
                         accept_peers=[AcceptedPeer(AAAF_HOST, VISIT, LOOPBACK)])
    with pytest.raises(ConfigError, match=r"fa1 \(fa\): accept_peers: the fa does not listen"):
        diameter_node(fa_config, host_ip_addresses=[LO])


def test_aaaf_ends_a_cached_session_only_for_the_fa_that_holds_it(tmp_path: Path) -> None:
    """An STR naming another FA's session (its Session-Id is no secret) leaves the cache alone."""
    async def main() -> None:
        listener, handed = await raw_server(AAAH_HOST)
        fa2 = "fa2.visit-a.example"
        async with listener:
            aaaf = ForeignAAAServer(AAAFConfig(
                node="aaaf1", role="aaaf", state_dir=tmp_path / "aaaf-state", control_socket=tmp_path / "aaaf.sock",
                diameter_host=AAAF_HOST, diameter_realm=VISIT, address=IPv4Address(LO), port=0,
                diameter_transport="tcp",
                home_servers=[DiameterPeer(AAAH_HOST, HOME, IPv4Address(LO), listener.sockets[0].getsockname()[1])],
                accept_peers=[AcceptedPeer(FA_HOST, VISIT, LOOPBACK), AcceptedPeer(fa2, VISIT, LOOPBACK)]))
            await aaaf.start()
            try:
                await handed
                sid = f"{FA_HOST};1;1"
                aaaf.store.put(Session(NAI, sid, IPv4Address("198.18.0.14"), FA_HOST, IPv4Address("198.18.100.1"),
                                       HOA, ()))

                async def str_from(origin: str) -> Message:
                    raw = await RawPeer.connect(aaaf.diameter.port or 0)
                    assert (await raw.cer(origin, VISIT)).result_code == 2001
                    req = raw.request("STR", [("Session-Id", sid), ("Origin-Host", origin), ("Origin-Realm", VISIT),
                                              ("Destination-Realm", HOME), ("Auth-Application-Id", 2),
                                              ("User-Name", NAI), ("Termination-Cause", 1)],
                                      application_id=2, proxiable=True)
                    raw.send(req)
                    return await raw.recv_not(280)

                assert (await str_from(fa2)).result_code == 2001
                assert NAI in aaaf.store.sessions  # not fa2's to end
                assert (await str_from(FA_HOST)).result_code == 2001
                assert NAI not in aaaf.store.sessions
            finally:
                await aaaf.stop()

    run(main())
