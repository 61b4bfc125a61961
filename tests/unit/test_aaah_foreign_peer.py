"""Our home AAA server against a foreign Diameter implementation: python-diameter (PyPI ``python-diameter``).

python-diameter plays the visited side (an FA/AAAF of its own making) and dials the real AAAH
object (in process, ephemeral port on 127.0.0.1, a temporary SQLite VPN database seeded through
its API, a bare Diameter node as the HA answering HARs — the setup of ``tests/unit/test_aaa.py``):
CER/CEA, DWR/DWA in both directions, then AMRs built with python-diameter's own message classes
around a real RRQ built with ``daemons.wire.mip`` (NAI, MN-HA authentication, MN-FA challenge, MN-AAA
authentication). The right MN-AAA secret gets 2001 with a registration reply, a wrong one 4001;
python-diameter decodes both answers. Timings are only bounds, never assertions.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from daemons.aaa.aaah import HomeAAAServer
from daemons.diameter.node import DiameterNode
from daemons.runtime.config import AcceptedPeer
from daemons.runtime.secret import Secret
from daemons.wire import mip
from daemons.wire.diameter import ResultCode
from tests.unit.sealkit import key_files
from tests.unit.test_aaa import (
    HA_ADDR,
    HA_HOST,
    HOA,
    HOME,
    LO,
    LOOPBACK,
    NAI,
    FakeHA,
    aaah_config,
    rrq_bytes,
    seed,
)

pd_node = pytest.importorskip("diameter.node", reason="python-diameter (PyPI python-diameter) is not installed")
pd_app = pytest.importorskip("diameter.node.application")
pd_cmd = pytest.importorskip("diameter.message.commands.aa_mobile_node")
pd_avp = pytest.importorskip("diameter.message.avp.grouped")

THEIRS, THEIR_REALM = "aaaf.pd-visit.example", "pd-visit.example"
AAAH_HOST = "aaah.home.example"


def pd_amr(seq: int, raw: bytes) -> Any:
    """An AMR as python-diameter builds it, around the RRQ ``raw`` (RFC 4004 §3.1)."""
    rrq = mip.decode_message(raw)
    auth = rrq.find(mip.GeneralizedAuthExtension)
    covered, offset, length = mip.authenticator_location(raw, mip.EXT_GEN_AUTH)
    req = pd_cmd.AaMobileNodeRequest()
    req.header.application_id = 2  # python-diameter leaves it at 0
    req.session_id = f"{THEIRS};1;{seq}"
    req.auth_application_id = 2
    req.user_name = NAI
    req.destination_realm = HOME.encode()
    req.origin_host = THEIRS.encode()
    req.origin_realm = THEIR_REALM.encode()
    req.mip_reg_request = raw
    req.mip_mn_aaa_auth = pd_avp.MipMnAaaAuth(auth.spi, covered, length, offset)
    req.mip_fa_challenge = rrq.find(mip.MNFAChallengeExtension).challenge
    req.mip_mobile_node_address = str(rrq.home_address)
    req.mip_home_agent_address = str(rrq.home_agent)
    req.mip_feature_vector = 0
    return req


@contextlib.asynccontextmanager
async def home(tmp: Path) -> AsyncIterator[tuple[HomeAAAServer, FakeHA]]:
    """The AAAH with its HA (a bare Diameter node answering HARs), both on loopback."""
    url = seed(tmp / "vpn.db")
    ha = FakeHA("accept")
    async with contextlib.AsyncExitStack() as stack:
        ha_node = DiameterNode(HA_HOST, HOME, [LO], listen_address=LO, listen_port=0)
        ha_node.add_peer(AAAH_HOST, HOME, sources=[LO])  # the AAAH dials it
        ha_node.register_handler(2, 262, ha, required=("User-Name", "MIP-Reg-Request"))
        await ha_node.start()
        stack.push_async_callback(ha_node.stop)
        # python-diameter's node is the configured peer that dials the AAAH (sending its own AMRs)
        # python-diameter speaks no TLS: this AAAH is configured for plain TCP
        config = dataclasses.replace(aaah_config(tmp, url, ha_node.port), diameter_transport="tcp",
                                     accept_peers=[AcceptedPeer(THEIRS, THEIR_REALM, LOOPBACK)],
                                     seal_keys=key_files(tmp, HA_HOST, THEIR_REALM, "cngw2"))
        aaah = HomeAAAServer(config)
        aaah.diameter.watchdog_interval = 0.3  # our DWRs to python-diameter come quickly
        await aaah.start()
        stack.push_async_callback(aaah.stop)
        await aaah.diameter.wait_open(HA_HOST, 5)
        yield aaah, ha


def test_python_diameter_registers_through_our_aaah(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="daemons.diameter")

    async def main() -> dict[str, Any]:
        async with home(tmp_path) as (aaah, ha):
            theirs = pd_node.Node(THEIRS, THEIR_REALM)
            theirs.idle_timeout = 1  # their DWR after 1 s idle
            theirs.wakeup_interval = 1
            peer = theirs.add_peer(f"aaa://{AAAH_HOST}:{aaah.diameter.port};transport=tcp", HOME,
                                   ip_addresses=[LO], is_persistent=True)
            app = pd_app.SimpleThreadingApplication(2, is_auth_application=True)
            theirs.add_application(app, [peer], realms=[HOME])
            theirs.start()
            try:
                await asyncio.to_thread(app.wait_for_ready, 5)
                await aaah.diameter.wait_open(THEIRS, 5)
                # watchdog both ways: ours (Tw 0.3 s) until they answered two DWRs, then Tw 30 s so
                # that their idle timer (1 s) fires and they send a DWR to us
                async with asyncio.timeout(10):
                    while peer.counters.dwr < 2:  # noqa: ASYNC110
                        await asyncio.sleep(0.05)
                    aaah.diameter.watchdog_interval = 30
                    while peer.counters.dwa < 1:  # noqa: ASYNC110
                        await asyncio.sleep(0.05)
                good_raw = rrq_bytes()
                good = await asyncio.to_thread(app.send_request, pd_amr(1, good_raw), 10)
                hars = list(ha.hars)
                bad = await asyncio.to_thread(app.send_request,
                                              pd_amr(2, rrq_bytes(key=Secret(b"not-the-right-secret"))), 10)
                status = {s["peer"]: s for s in aaah.diameter.peers_status()}
                counters = dict(aaah.counters)
            finally:
                await asyncio.to_thread(theirs.stop, 5)
            return {"good": good, "good_raw": good_raw, "bad": bad, "hars": hars, "after": list(ha.hars),
                    "status": status, "counters": counters, "pd_counters": peer.counters,
                    "sessions": aaah.store.show()}

    out = asyncio.run(asyncio.wait_for(main(), 60))

    # CER/CEA and DWR/DWA both ways, as both ends counted them
    st = out["status"][THEIRS]
    assert st["state"] == "open" and st["applications"] == [2]
    pdc = out["pd_counters"]
    assert pdc.cea == 1 and pdc.dwr >= 2 and pdc.dwa >= 1
    events = [(r.getMessage(), getattr(r, "fields", {}).get("cmd")) for r in caplog.records]
    for event in (("event=msg.rx", "CER"), ("event=msg.tx", "CEA"), ("event=msg.tx", "DWR"), ("event=msg.rx", "DWA"),
                  ("event=msg.rx", "DWR"), ("event=msg.tx", "DWA")):
        assert event in events

    # the right MN-AAA secret: 2001 with the HA's registration reply, decoded by python-diameter
    good = out["good"]
    assert type(good).__name__ == "AaMobileNodeAnswer"
    assert good.result_code == ResultCode.DIAMETER_SUCCESS
    assert good.session_id == f"{THEIRS};1;1" and good.user_name == NAI
    assert good.origin_host == AAAH_HOST.encode() and good.origin_realm == HOME.encode()
    assert good.mip_reg_reply is not None
    rrp = mip.decode_message(good.mip_reg_reply)
    rrq = mip.decode_message(out["good_raw"])
    assert isinstance(rrp, mip.RegistrationReply) and rrp.accepted
    assert rrp.identification == rrq.identification and rrp.home_address == HOA
    assert good.mip_home_agent_address == (1, str(HA_ADDR)) and good.mip_mobile_node_address == (1, str(HOA))
    (har,) = out["hars"]  # the AAAH asked the HA exactly once, with the RRQ unchanged
    assert har.get("MIP-Reg-Request") == out["good_raw"] and har.get("User-Name") == NAI

    # a wrong MN-AAA secret: 4001, no registration reply, the HA never asked
    bad = out["bad"]
    assert type(bad).__name__ == "AaMobileNodeAnswer"
    assert bad.result_code == ResultCode.DIAMETER_AUTHENTICATION_REJECTED
    assert bad.session_id == f"{THEIRS};1;2" and bad.mip_reg_reply is None
    assert len(out["after"]) == 1
    c = out["counters"]
    assert (c["amr"], c["accepted"], c["auth_failed"], c["har"]) == (2, 1, 1, 1)
    (session,) = out["sessions"]  # the accepted registration is cached, from python-diameter's FA
    assert session["mn"] == NAI and session["fa_host"] == THEIRS
