"""Home and local AAA servers over loopback: AMR FA → AAAF → AAAH, HAR AAAH → HA (claim 16).

The AAAH and the AAAF are the real daemons' objects (in process, ephemeral ports, a temporary
SQLite VPN database seeded through its API). The HA and the FA are bare Diameter nodes: the HA
answers HARs with a real registration reply built with daemons.wire.mip, the FA sends AMRs built
from a real RRQ signed by the mobile node (MN-HA, MN-FA challenge, MN-AAA). Everything runs in
``asyncio.run``; timings are only bounds, never assertions.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import stat
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from daemons.aaa.aaaf import ForeignAAAServer
from daemons.aaa.aaah import FIRST_DYNAMIC_SPI, HomeAAAServer
from daemons.diameter.node import DiameterNode
from daemons.runtime import control
from daemons.runtime.config import (
    AAAFConfig,
    AAAHConfig,
    AcceptedPeer,
    ConfigError,
    DiameterPeer,
    HomeAgentRef,
    SecurityAssociation,
)
from daemons.runtime.log import EventFormatter
from daemons.runtime.secret import Secret
from daemons.store.records import read_rows
from daemons.store.vpndb import open_database
from daemons.vpn import vpninfo
from daemons.vpn.keys import pair_psk, static_esp_key, static_spi
from daemons.vpn.path import EndpointType, EspSuite, Qos
from daemons.wire import mip
from daemons.wire.diameter import Avp, Message, ResultCode
from tests.unit.sealkit import key_file, key_files, opened
from tests.unit.tlskit import credentials, node_tls

LO = "127.0.0.1"
HOME, VISIT = "home.example", "visit-a.example"
AAAH_HOST, AAAF_HOST, HA_HOST, FA_HOST = "aaah.home.example", "aaaf1.visit-a.example", "ha.home.example", \
    "fa1.visit-a.example"
FA2_HOST = "fa2.visit-a.example"  # the second FA of the visited domain (intra-domain moves, claim 17)
NAI, DISABLED_NAI = "mn1@home.example", "mn2@home.example"
HOA, HA_ADDR, COA = IPv4Address("198.18.1.10"), IPv4Address("198.18.1.1"), IPv4Address("198.18.2.1")
COA2 = IPv4Address("198.18.2.2")  # fa2's care-of address
HOME_PREFIX = IPv4Network("198.18.1.0/24")
CNGW_ADDR, CORP = IPv4Address("198.18.9.1"), IPv4Network("198.18.100.0/24")
CNGW2_ADDR, DYN_CORP = IPv4Address("198.18.9.2"), IPv4Network("198.18.101.0/24")
MASTER = Secret(bytes(range(32)))
MN_AAA = Secret(b"mn-aaa-secret-of-mn1!")
MN_HA = Secret(b"mn-ha-key-of-mn1")
SPI_MN_AAA, SPI_MN_HA = 0x3000, 0x1000


def run(coro: Awaitable[Any], timeout: float = 30.0) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))  # type: ignore[arg-type]


def seed(path: Path) -> str:
    url = f"sqlite:///{path}"
    with open_database(url, create=True) as db:
        db.add_gateway("cngw", CNGW_ADDR, "cngw-static")
        db.add_route("cngw", CORP)
        db.add_gateway("cngw2", "198.18.9.2", "cngw-dynamic")
        db.add_route("cngw2", DYN_CORP)
        db.add_user(NAI, HOA, HA_ADDR, SPI_MN_AAA, MN_AAA)
        db.add_profile(NAI, CORP, "cngw", qos_rate=1_000_000, qos_ceil=2_000_000, qos_priority=2)
        db.add_profile(NAI, DYN_CORP, "cngw2", suite="aes256gcm16", lifetime=900)  # dynamic: route optimisation
        db.add_user(DISABLED_NAI, "198.18.1.11", HA_ADDR, SPI_MN_AAA, MN_AAA, enabled=False)
    return url


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LO, 0))
        return s.getsockname()[1]


def rrq_bytes(nai: str = NAI, key: Secret = MN_AAA, home_address: IPv4Address = HOA, lifetime: int = 300) -> bytes:
    return mip.registration_request(home_address=home_address, home_agent=HA_ADDR, care_of_address=COA,
                                    identification=mip.ntp_identification(time.time()), lifetime=lifetime, nai=nai,
                                    mn_ha=SecurityAssociation(SPI_MN_HA, MN_HA), challenge=bytes(range(16)),
                                    mn_aaa=SecurityAssociation(SPI_MN_AAA, key)).encode()


def amr_for(fa: DiameterNode, raw: bytes, nai: str = NAI) -> Message:
    """The AMR as the FA builds it (the wire contract)."""
    rrq = mip.decode_message(raw)
    auth = rrq.find(mip.GeneralizedAuthExtension)
    covered, offset, length = mip.authenticator_location(raw, mip.EXT_GEN_AUTH)
    return Message.request("AMR", [
        ("Session-Id", fa.session_id(nai)), ("Auth-Application-Id", 2), ("Destination-Realm", nai.split("@")[1]),
        ("User-Name", nai), ("MIP-Reg-Request", raw),
        ("MIP-MN-AAA-Auth", [Avp.new("MIP-MN-AAA-SPI", auth.spi), Avp.new("MIP-Auth-Input-Data-Length", covered),
                             Avp.new("MIP-Authenticator-Length", length),
                             Avp.new("MIP-Authenticator-Offset", offset)]),
        ("MIP-FA-Challenge", rrq.find(mip.MNFAChallengeExtension).challenge),
        ("MIP-Mobile-Node-Address", rrq.home_address), ("MIP-Home-Agent-Address", rrq.home_agent),
        ("MIP-Feature-Vector", 0)])


@dataclass
class FakeHA:
    """A home agent's Diameter side: answers HARs with an RRP (accept, refuse, or stay silent)."""

    mode: str = "accept"  # accept | refuse | silent | bad-key
    hars: list[Message] = field(default_factory=list)

    async def __call__(self, har: Message, peer: Any) -> Message:
        self.hars.append(har)
        if self.mode == "silent":
            await asyncio.sleep(60)
        if self.mode == "bad-key":  # what the HA answers when its sealed keys do not open
            return har.answer(ResultCode.DIAMETER_ERROR_BAD_KEY)
        rrq = mip.decode_message(har.get("MIP-Reg-Request"))
        code = mip.ReplyCode.ACCEPTED if self.mode == "accept" else mip.ReplyCode.HA_IDENTIFICATION_MISMATCH
        rrp = mip.RegistrationReply(code=code, home_address=rrq.home_address, home_agent=rrq.home_agent,
                                    identification=rrq.identification,
                                    lifetime=rrq.lifetime if code == mip.ReplyCode.ACCEPTED else 0)
        rrp = mip.sign(rrp, mip.EXT_MN_HA_AUTH, SPI_MN_HA, MN_HA)
        rc = ResultCode.DIAMETER_SUCCESS if code == mip.ReplyCode.ACCEPTED else \
            ResultCode.DIAMETER_ERROR_MIP_REPLY_FAILURE
        return har.answer(rc, [("Auth-Application-Id", 2), ("MIP-Reg-Reply", rrp.encode()),
                               ("User-Name", har.get("User-Name"))])


@dataclass
class World:
    tmp: Path
    ha: FakeHA
    ha_node: DiameterNode | None
    aaah: HomeAAAServer
    aaaf: ForeignAAAServer
    fa: DiameterNode
    amrs_at_aaah: list[Message]
    fa2: DiameterNode
    amas_from_aaah: list[Message] = field(default_factory=list)

    async def register(self, raw: bytes, nai: str = NAI, via: DiameterNode | None = None) -> tuple[Message, Message]:
        """The AMR of ``raw`` from fa1 (or ``via``), and the AMA it got."""
        fa = via or self.fa
        amr = amr_for(fa, raw, nai)
        return amr, await fa.request(amr, timeout=10)

    def show(self, who: str, what: str = "sessions") -> Any:
        return control.call(self.tmp / f"{who}.sock", what)


LOOPBACK = [IPv4Network(f"{LO}/32")]


def aaah_config(tmp: Path, url: str, ha_port: int, har_timeout: float = 2.0) -> AAAHConfig:
    """The AAAH: it dials the HA, and the AAAF (an agent: it relays the FA's AMRs) dials it, over TLS
    (certificates of one CA in ``tmp``)."""
    return AAAHConfig(node="aaah", role="aaah", state_dir=tmp / "aaah-state", control_socket=tmp / "aaah.sock",
                      diameter_tls=credentials(tmp, AAAH_HOST),
                      diameter_host=AAAH_HOST, diameter_realm=HOME, address=IPv4Address(LO), port=0, db_url=url,
                      master_secret=MASTER, har_timeout=har_timeout,
                      home_agents=[HomeAgentRef(HA_ADDR, HA_HOST, HOME_PREFIX, ha_port, IPv4Address(LO))],
                      accept_peers=[AcceptedPeer(AAAF_HOST, VISIT, LOOPBACK, agent=True)],
                      seal_keys=key_files(tmp, HA_HOST, VISIT, "cngw2", AAAF_HOST))


def fa_paths(ama: Message) -> list[vpninfo.VpnInfo]:
    """The AMA's VPN info as an FA of the visited domain opens it."""
    return opened(VISIT, vpninfo.from_message(ama, NAI))


def ha_paths(har: Message) -> list[vpninfo.VpnInfo]:
    """The HAR's VPN info opened: the HA's own by the HA, the dynamic CN-GW's by that CN-GW."""
    return [opened("cngw2" if i.path.local.type is EndpointType.CNGW_DYNAMIC else HA_HOST, [i])[0]
            for i in vpninfo.from_message(har, NAI)]


@contextlib.asynccontextmanager
async def world(tmp: Path, ha_mode: str = "accept", ha_up: bool = True) -> AsyncIterator[World]:
    url = seed(tmp / "vpn.db")
    ha = FakeHA(ha_mode)
    ha_node = None
    stack = contextlib.AsyncExitStack()
    async with stack:
        if ha_up:
            ha_node = DiameterNode(HA_HOST, HOME, [LO], listen_address=LO, listen_port=0, tls=node_tls(tmp, HA_HOST))
            ha_node.add_peer(AAAH_HOST, HOME, sources=[LO])  # the AAAH dials it
            ha_node.register_handler(2, 262, ha, required=("User-Name", "MIP-Reg-Request"))
            await ha_node.start()
            stack.push_async_callback(ha_node.stop)
        aaah = HomeAAAServer(aaah_config(tmp, url, ha_node.port if ha_node else free_port(),
                                         har_timeout=0.5 if ha_mode == "silent" else 2.0))
        amrs: list[Message] = []

        amas: list[Message] = []

        async def spy(req: Message, peer: Any) -> Message:  # what reaches the AAAH, then the real handler
            amrs.append(req)
            answer = await aaah.on_amr(req, peer)
            amas.append(Message.decode(answer.encode()))  # as it leaves the AAAH
            return answer

        aaah.diameter.register_handler(2, 260, spy, required=("User-Name", "MIP-Reg-Request"))
        await aaah.start()
        stack.push_async_callback(aaah.stop)
        if ha_up:
            await aaah.diameter.wait_open(HA_HOST, 5)
        aaaf = ForeignAAAServer(AAAFConfig(
            node="aaaf1", role="aaaf", state_dir=tmp / "aaaf-state", control_socket=tmp / "aaaf.sock",
            diameter_host=AAAF_HOST, diameter_realm=VISIT, address=IPv4Address(LO), port=0,
            diameter_tls=credentials(tmp, AAAF_HOST), seal=key_file(tmp, AAAF_HOST),
            home_servers=[DiameterPeer(AAAH_HOST, HOME, IPv4Address(LO), aaah.diameter.port)],
            # Each FA connects from loopback and owns its care-of address (claim 17: an FA's AMR
            # is answered from the cache only for a care-of address of its own).
            accept_peers=[AcceptedPeer(FA_HOST, VISIT, [*LOOPBACK, IPv4Network(f"{COA}/32")]),
                          AcceptedPeer(FA2_HOST, VISIT, [*LOOPBACK, IPv4Network(f"{COA2}/32")])]))
        await aaaf.start()
        stack.push_async_callback(aaaf.stop)
        await aaaf.diameter.wait_open(AAAH_HOST, 5)
        fas = []
        for host in (FA_HOST, FA2_HOST):
            fa = DiameterNode(host, VISIT, [LO], tls=node_tls(tmp, host))
            fa.add_peer(AAAF_HOST, VISIT, LO, aaaf.diameter.port)
            fa.add_default_route(AAAF_HOST)
            await fa.start()
            stack.push_async_callback(fa.stop)
            await fa.wait_open(AAAF_HOST, 5)
            fas.append(fa)
        yield World(tmp, ha, ha_node, aaah, aaaf, fas[0], amrs, fas[1], amas)


def key_bytes(keys: Any) -> bytes:
    return keys.enc_key.reveal() + (keys.auth_key.reveal() if keys.auth_key else b"")


@pytest.fixture
def event_log(caplog: pytest.LogCaptureFixture) -> Any:
    caplog.set_level(logging.INFO)
    fmt = EventFormatter()
    return lambda: "\n".join(fmt.format(r) for r in caplog.records)


# ---- F1: the registration goes through ------------------------------------------------------------


def test_registration_distributes_vpn_info(tmp_path: Path, event_log: Any) -> None:
    async def main() -> None:
        async with world(tmp_path) as w:
            raw = rrq_bytes()
            amr, ama = await w.register(raw)
            assert ama.result_code == ResultCode.DIAMETER_SUCCESS
            rrp = mip.decode_message(ama.get("MIP-Reg-Reply"))
            assert isinstance(rrp, mip.RegistrationReply) and rrp.accepted
            assert ama.get("User-Name") == NAI and ama.get("MIP-Home-Agent-Address") == HA_ADDR
            assert ama.get("MIP-Mobile-Node-Address") == HOA and ama.session_id == amr.session_id

            # The FA's VPN info, in the FA's view: path 1 to the HA, path 3 to the dynamic CN-GW.
            fa_infos = {i.path_id: i for i in fa_paths(ama)}
            assert sorted(fa_infos) == [1, 3]
            fa_info = fa_infos[1]
            p = fa_info.path
            assert fa_info.path_id == 1
            assert (p.local.address, p.local.type) == (COA, EndpointType.FA)
            assert (p.remote.address, p.remote.type) == (HA_ADDR, EndpointType.HA)
            assert p.local_ts == (IPv4Network(f"{HOA}/32"),)
            assert p.remote_ts == (IPv4Network("0.0.0.0/0"),)  # all the MN's traffic goes home
            sec = p.security
            assert sec.suite is EspSuite.AES128GCM16
            for keys in (sec.inbound, sec.outbound):
                assert keys is not None and len(keys.enc_key) == 20 and keys.auth_key is None
                assert keys.spi >= FIRST_DYNAMIC_SPI
            assert key_bytes(sec.inbound) != key_bytes(sec.outbound)
            # the path's own IKE PSK (one IKE_SA per user path), not one shared by the gateway pair
            assert sec.psk is not None and len(sec.psk) == 32 and sec.psk != pair_psk(MASTER, COA, HA_ADDR)
            assert p.qos == Qos(1_000_000, 2_000_000, 2)
            # F4 (claim 19): FA⇄CN-GW2 directly, home address ⇄ the gateway's prefixes, its own keys.
            ro = fa_infos[3].path
            assert (ro.local.address, ro.local.type) == (COA, EndpointType.FA)
            assert (ro.remote.address, ro.remote.type) == (CNGW2_ADDR, EndpointType.CNGW_DYNAMIC)
            assert ro.local_ts == (IPv4Network(f"{HOA}/32"),) and ro.remote_ts == (DYN_CORP,)
            rsec = ro.security
            assert rsec.suite is EspSuite.AES256GCM16 and rsec.lifetime == 900
            assert rsec.psk is not None and len(rsec.psk) == 32
            assert rsec.psk not in (sec.psk, pair_psk(MASTER, COA, CNGW2_ADDR))
            assert rsec.inbound.spi >= FIRST_DYNAMIC_SPI and rsec.outbound.spi >= FIRST_DYNAMIC_SPI
            assert len({key_bytes(k) for k in (rsec.inbound, rsec.outbound, sec.inbound, sec.outbound)}) == 4

            # The AMR reached the AAAH through the AAAF (Route-Record), unchanged.
            (seen,) = w.amrs_at_aaah
            assert [str(a.value) for a in seen.find_all("Route-Record")] == [FA_HOST]  # added by the AAAF relay
            assert seen.get("Origin-Host") == FA_HOST and seen.get("MIP-Reg-Request") == raw

            # The HA: the same RRQ, path 1 mirrored (same keys, directions swapped), path 2 static.
            (har,) = w.ha.hars
            assert har.session_id == amr.session_id and har.get("Destination-Host") == HA_HOST
            assert har.get("Destination-Realm") == HOME and har.get("MIP-Reg-Request") == raw
            assert har.get("MIP-Home-Agent-Address") == HA_ADDR and har.get("MIP-Mobile-Node-Address") == HOA
            ha_infos = {i.path_id: i for i in ha_paths(har)}
            assert sorted(ha_infos) == [1, 2, 3]
            # Path 3 in the CN-GW's view: the HA hands it to the CN-GW in a Binding Update.
            h3 = ha_infos[3].path
            assert (h3.local.address, h3.local.type, h3.remote.address, h3.remote.type) == \
                (CNGW2_ADDR, EndpointType.CNGW_DYNAMIC, COA, EndpointType.FA)
            assert h3.local_ts == ro.remote_ts and h3.remote_ts == ro.local_ts
            assert (h3.security.inbound.spi, h3.security.outbound.spi) == (rsec.outbound.spi, rsec.inbound.spi)
            assert key_bytes(h3.security.inbound) == key_bytes(rsec.outbound)
            assert h3.security.psk == rsec.psk  # both ends of a path hold its PSK
            h1 = ha_infos[1].path
            assert (h1.local.address, h1.local.type, h1.remote.address) == (HA_ADDR, EndpointType.HA, COA)
            assert h1.local_ts == p.remote_ts and h1.remote_ts == p.local_ts
            assert h1.security.inbound.spi == sec.outbound.spi and h1.security.outbound.spi == sec.inbound.spi
            assert key_bytes(h1.security.inbound) == key_bytes(sec.outbound)
            assert key_bytes(h1.security.outbound) == key_bytes(sec.inbound)
            assert h1.security.psk == sec.psk
            h2 = ha_infos[2].path
            assert (h2.local.address, h2.local.type) == (HA_ADDR, EndpointType.HA)
            assert (h2.remote.address, h2.remote.type) == (CNGW_ADDR, EndpointType.CNGW_STATIC)
            assert h2.local_ts == (HOME_PREFIX,) and h2.remote_ts == (CORP,)
            out_spi, in_spi = static_spi(HA_ADDR, CNGW_ADDR), static_spi(CNGW_ADDR, HA_ADDR)
            assert (h2.security.outbound.spi, h2.security.inbound.spi) == (out_spi, in_spi)
            suite = h2.security.suite
            assert suite is EspSuite.AES128GCM16  # the configured static_suite, whatever the profile says
            assert key_bytes(h2.security.outbound) == static_esp_key(MASTER, HA_ADDR, CNGW_ADDR, out_spi,
                                                                     suite).reveal()
            assert key_bytes(h2.security.inbound) == static_esp_key(MASTER, CNGW_ADDR, HA_ADDR, in_spi,
                                                                    suite).reveal()
            assert h2.security.psk == pair_psk(MASTER, HA_ADDR, CNGW_ADDR)

            # Both AAA servers cache the session; `show sessions` names it without key material.
            secrets_hex = [key_bytes(sec.inbound).hex(), key_bytes(sec.outbound).hex(), sec.psk.reveal().hex(),
                           key_bytes(rsec.inbound).hex(), key_bytes(rsec.outbound).hex(), rsec.psk.reveal().hex(),
                           key_bytes(h2.security.outbound).hex(), key_bytes(h2.security.inbound).hex(),
                           MASTER.reveal().hex(), MN_AAA.reveal().hex()]
            (row,) = await asyncio.to_thread(w.show, "aaaf")
            assert (row["mn"], row["session"], row["fa"], row["fa_host"]) == (NAI, amr.session_id, str(COA), FA_HOST)
            assert row["paths"] == f"1:{COA}(fa)<->{HA_ADDR}(ha) 3:{COA}(fa)<->{CNGW2_ADDR}(cngw-dynamic)"
            (hrow,) = await asyncio.to_thread(w.show, "aaah")
            assert hrow["mn"] == NAI and hrow["fa"] == str(COA)
            assert hrow["paths"] == f"1:{COA}(fa)<->{HA_ADDR}(ha) 2:{HA_ADDR}(ha)<->{CNGW_ADDR}(cngw-static) " \
                f"3:{COA}(fa)<->{CNGW2_ADDR}(cngw-dynamic)"
            cached = w.aaaf.store.get(NAI)
            assert cached is not None and opened(VISIT, cached.for_fa()) == [fa_info, fa_infos[3]]
            counters = await asyncio.to_thread(w.show, "aaah", "counters")
            assert counters["accepted"] == counters["har"] == counters["amr"] == 1 and "relayed" not in counters
            # Report which secret leaked by its index, never by its value.
            shown = json.dumps([row, hrow, counters])
            assert [i for i, h in enumerate(secrets_hex) if h in shown] == []
            text = event_log()
            assert [i for i, h in enumerate(secrets_hex) if h in text] == []
            for event in ("amr.received", "auth.ok", "har.sent", "haa.received", "ama.sent", "ama.relayed"):
                assert f"event={event}" in text

            # The state stores are private (they hold keys: the database, its -wal and -shm) and hold the sessions.
            for state in (tmp_path / "aaah-state" / "sessions.db", tmp_path / "aaaf-state" / "sessions.db"):
                for f in (state, state.with_name("sessions.db-wal"), state.with_name("sessions.db-shm")):
                    assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
                assert stat.S_IMODE(state.parent.stat().st_mode) == 0o700
                assert list(read_rows(state, "sessions")) == [NAI]

    run(main())


def test_sessions_survive_a_restart_and_spis_stay_unique(tmp_path: Path) -> None:
    async def main() -> None:
        async with world(tmp_path) as w:
            _, ama = await w.register(rrq_bytes())
            first, ro = fa_paths(ama)
            await w.aaah.stop()
            await w.aaaf.stop()
            aaah = HomeAAAServer(w.aaah.config)
            aaaf = ForeignAAAServer(w.aaaf.config)
            aaah.restore()
            aaaf.store.load()
            assert aaah.store.get(NAI) == w.aaah.store.get(NAI)
            assert aaaf.store.get(NAI) == w.aaaf.store.get(NAI)
            # A new registration elsewhere gets SPIs the restored session does not hold.
            at_fa = {first.path.security.inbound.spi, ro.path.security.inbound.spi}  # SPIs are per receiver
            assert aaah.spis.allocate(COA) not in at_fa
            assert aaah.spis.allocate(HA_ADDR) != first.path.security.outbound.spi
            assert aaah.spis.allocate(CNGW2_ADDR) != ro.path.security.outbound.spi
            # An FA change is one step on the cached session (claims 7, 17, 18).
            moved = aaaf.store.get(NAI).with_fa("198.18.3.1", "fa2;1;1", "fa2.visit-a.example")
            info, ro_moved = opened(VISIT, moved.for_fa())
            assert info.path.local.address == IPv4Address("198.18.3.1") and info.path.security == \
                first.path.security
            # The FA⇄CN-GW path moves with the FA end too (F5), the CN-GW end stays.
            assert (ro_moved.path.local.address, ro_moved.path.remote.address) == (IPv4Address("198.18.3.1"),
                                                                                 CNGW2_ADDR)
            ha_view = {i.path_id: i for i in aaah.store.get(NAI).with_fa("198.18.3.1").for_ha()}
            assert ha_view[1].path.remote.address == IPv4Address("198.18.3.1")
            assert ha_view[2].path.remote.address == CNGW_ADDR
            assert (ha_view[3].path.local.address, ha_view[3].path.remote.address) == \
                (CNGW2_ADDR, IPv4Address("198.18.3.1"))

    run(main())


def test_reregistration_renews_keys_and_psks_and_replaces_the_session(tmp_path: Path) -> None:
    async def main() -> None:
        async with world(tmp_path) as w:
            _, ama1 = await w.register(rrq_bytes())
            await asyncio.sleep(0.01)
            amr2, ama2 = await w.register(rrq_bytes())
            assert ama2.result_code == ResultCode.DIAMETER_SUCCESS
            (a, ra), (b, rb) = fa_paths(ama1), fa_paths(ama2)
            assert key_bytes(a.path.security.inbound) != key_bytes(b.path.security.inbound)
            assert key_bytes(ra.path.security.inbound) != key_bytes(rb.path.security.inbound)
            # the paths' IKE PSKs are rotated too (issue 15)
            assert a.path.security.psk != b.path.security.psk and ra.path.security.psk != rb.path.security.psk
            assert len(w.aaah.store.sessions) == 1 and w.aaah.store.get(NAI).session_id == amr2.session_id
            assert w.aaaf.store.get(NAI).session_id == amr2.session_id

    run(main())


# ---- refusals ------------------------------------------------------------------------------------------


def test_bad_mn_aaa_authenticator_is_rejected_without_har(tmp_path: Path) -> None:
    async def main() -> None:
        async with world(tmp_path) as w:
            _, ama = await w.register(rrq_bytes(key=Secret(b"not-the-right-secret")))
            assert ama.result_code == ResultCode.DIAMETER_AUTHENTICATION_REJECTED
            assert ama.find("VPN-Info") is None and ama.find("MIP-Reg-Reply") is None
            assert w.ha.hars == [] and w.aaah.store.sessions == {} and w.aaaf.store.sessions == {}
            # A tampered RRQ (lifetime changed after signing) fails the same way.
            raw = bytearray(rrq_bytes())
            raw[3] ^= 1
            _, ama = await w.register(bytes(raw))
            assert ama.result_code == ResultCode.DIAMETER_AUTHENTICATION_REJECTED and w.ha.hars == []

    run(main())


def test_unknown_and_disabled_users(tmp_path: Path) -> None:
    async def main() -> None:
        async with world(tmp_path) as w:
            _, ama = await w.register(rrq_bytes(nai="nobody@home.example"), "nobody@home.example")
            assert ama.result_code == ResultCode.DIAMETER_USER_UNKNOWN
            _, ama = await w.register(rrq_bytes(nai=DISABLED_NAI, home_address=IPv4Address("198.18.1.11")),
                                      DISABLED_NAI)
            assert ama.result_code == ResultCode.DIAMETER_AUTHORIZATION_REJECTED
            # Someone else's home address: not authorised either.
            _, ama = await w.register(rrq_bytes(home_address=IPv4Address("198.18.1.99")))
            assert ama.result_code == ResultCode.DIAMETER_AUTHORIZATION_REJECTED
            assert w.ha.hars == [] and w.aaah.store.sessions == {}

    run(main())


def test_malformed_rrq_is_invalid_avp_value(tmp_path: Path) -> None:
    async def main() -> None:
        async with world(tmp_path) as w:
            amr = amr_for(w.fa, rrq_bytes())
            amr.remove("MIP-Reg-Request")
            amr.add("MIP-Reg-Request", b"\x01\x00garbage")
            ama = await w.fa.request(amr, timeout=10)
            assert ama.result_code == ResultCode.DIAMETER_INVALID_AVP_VALUE and w.ha.hars == []

    run(main())


def test_ha_down_answers_4006_quickly(tmp_path: Path) -> None:
    async def main() -> None:
        async with world(tmp_path, ha_up=False) as w:
            _, ama = await asyncio.wait_for(w.register(rrq_bytes()), 5)
            assert ama.result_code == ResultCode.DIAMETER_ERROR_HA_NOT_AVAILABLE
            assert ama.find("VPN-Info") is None
            assert w.aaah.store.sessions == {} and w.aaaf.store.sessions == {}

    run(main())


def test_ha_silent_answers_4006_after_the_har_timeout(tmp_path: Path) -> None:
    async def main() -> None:
        async with world(tmp_path, ha_mode="silent") as w:
            _, ama = await asyncio.wait_for(w.register(rrq_bytes()), 5)
            assert ama.result_code == ResultCode.DIAMETER_ERROR_HA_NOT_AVAILABLE
            assert len(w.ha.hars) == 1 and w.aaah.store.sessions == {} and w.aaaf.store.sessions == {}

    run(main())


def test_ha_refusal_passes_the_reply_through(tmp_path: Path) -> None:
    async def main() -> None:
        async with world(tmp_path, ha_mode="refuse") as w:
            _, ama = await w.register(rrq_bytes())
            assert ama.result_code == ResultCode.DIAMETER_ERROR_MIP_REPLY_FAILURE
            rrp = mip.decode_message(ama.get("MIP-Reg-Reply"))
            assert rrp.code == mip.ReplyCode.HA_IDENTIFICATION_MISMATCH
            assert ama.find("VPN-Info") is None
            assert w.aaah.store.sessions == {} and w.aaaf.store.sessions == {}

    run(main())


def test_config_errors_name_the_field(tmp_path: Path) -> None:
    cfg = aaah_config(tmp_path, "sqlite:///x.db", 3868)
    from dataclasses import replace

    with pytest.raises(ConfigError, match="master_secret"):
        HomeAAAServer(replace(cfg, master_secret=Secret(b"short")))
    with pytest.raises(ConfigError, match="static_suite"):
        HomeAAAServer(replace(cfg, static_suite="des"))
    with pytest.raises(ConfigError, match="home_agents"):
        HomeAAAServer(replace(cfg, home_agents=[]))
    bad_db = HomeAAAServer(replace(cfg, db_url="mysql://nope"))
    with pytest.raises(ConfigError, match="db_url"):
        run(bad_db.start())
    from daemons.roles import load_config

    path = tmp_path / "aaah.yaml"
    path.write_text("role: aaah\nnode: aaah\nstate_dir: /tmp/x\ncontrol_socket: /tmp/x.sock\n"
                    "diameter_host: aaah.home.example\ndiameter_realm: home.example\naddress: 127.0.0.1\n"
                    "db_url: sqlite:///x.db\nhome_agents: []\n")
    with pytest.raises(ConfigError, match="master_secret: missing"):
        load_config(path)
    path.write_text(path.read_text() + "master_secret: zz-not-hex\n")
    with pytest.raises(ConfigError, match="master_secret: not a hex string") as err:
        load_config(path)
    assert "zz-not-hex" not in str(err.value)
    path.write_text("role: aaaf\nnode: aaaf1\nstate_dir: /tmp/x\ncontrol_socket: /tmp/x.sock\n"
                    "diameter_host: aaaf1.visit-a.example\ndiameter_realm: visit-a.example\naddress: 127.0.0.1\n"
                    "home_servers: [{host: aaah.home.example, realm: home.example, address: 300.1.1.1}]\n")
    with pytest.raises(ConfigError, match=r"home_servers\[0\]\.address"):
        load_config(path)
