"""Our Diameter node against a foreign implementation: python-diameter (PyPI ``python-diameter``).

python-diameter (thread based) dials our node on 127.0.0.1: CER/CEA, DWR/DWA in both
directions, an AMR (application 2) that our handler answers and python-diameter decodes,
and DPR/DPA when it stops.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from daemons.diameter.node import DiameterNode
from daemons.diameter.peer import Peer
from daemons.wire.diameter import Message, ResultCode

pd_node = pytest.importorskip("diameter.node", reason="python-diameter (PyPI python-diameter) is not installed")
pd_app = pytest.importorskip("diameter.node.application")
pd_cmd = pytest.importorskip("diameter.message.commands.aa_mobile_node")
pd_avp = pytest.importorskip("diameter.message.avp.grouped")

LO = "127.0.0.1"
HOME = "home.example"
OURS = "aaah.home.example"
THEIRS = "fa.pd.example"


def test_python_diameter_peer(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="daemons.diameter")
    seen: list[tuple[Message, Peer]] = []

    async def amr(req: Message, peer: Peer) -> Message:
        seen.append((req, peer))
        return req.answer(ResultCode.DIAMETER_SUCCESS, [
            ("Auth-Application-Id", 2), ("User-Name", req.get("User-Name")),
            ("MIP-Reg-Reply", b"\x03\x00\x00\x00" + bytes(20)),
            ("MIP-Home-Agent-Address", "198.18.0.10"),
        ])

    async def main() -> dict[str, Any]:
        ours = DiameterNode(OURS, HOME, [LO], listen_address=LO, listen_port=0, watchdog_interval=0.3)
        ours.add_peer(THEIRS, "pd.example", sources=[LO])  # python-diameter dials us: a configured peer
        ours.register_handler(2, 260, amr, required=("User-Name", "MIP-Reg-Request"))
        async with ours:
            theirs = pd_node.Node(THEIRS, "pd.example")
            theirs.idle_timeout = 1  # their DWR after 1 s idle
            theirs.wakeup_interval = 1
            peer = theirs.add_peer(f"aaa://{OURS}:{ours.port};transport=tcp", HOME, ip_addresses=[LO],
                                   is_persistent=True)
            app = pd_app.SimpleThreadingApplication(2, is_auth_application=True)
            theirs.add_application(app, [peer], realms=[HOME])
            theirs.start()
            try:
                await asyncio.to_thread(app.wait_for_ready, 5)
                await ours.wait_open(THEIRS, 5)

                req = pd_cmd.AaMobileNodeRequest()
                req.header.application_id = 2  # python-diameter leaves it at 0
                req.session_id = f"{THEIRS};1;1"
                req.auth_application_id = 2
                req.user_name = "mn1@home.example"
                req.destination_realm = HOME.encode()
                req.origin_host = THEIRS.encode()
                req.origin_realm = b"pd.example"
                req.mip_reg_request = bytes(28)
                req.mip_mn_aaa_auth = pd_avp.MipMnAaaAuth(256, 28, 16, 40)
                ans = await asyncio.to_thread(app.send_request, req, 5)

                # watchdog both ways: ours (Tw 0.3 s) until they answered two DWRs, then Tw 30 s so
                # that their idle timer (1 s) fires and they send DWR to us
                async with asyncio.timeout(10):
                    while peer.counters.dwr < 2:  # noqa: ASYNC110
                        await asyncio.sleep(0.05)
                    ours.watchdog_interval = 30
                    while peer.counters.dwa < 1:  # noqa: ASYNC110
                        await asyncio.sleep(0.05)
                status = ours.peers_status()
            finally:
                await asyncio.to_thread(theirs.stop, 5)
            await asyncio.sleep(0.05)
            return {"ans": ans, "status": status, "after": ours.peers_status(), "counters": peer.counters,
                    "ours": ours.stats()}

    out = asyncio.run(asyncio.wait_for(main(), 40))
    ans = out["ans"]
    # python-diameter decoded our AMA
    assert type(ans).__name__ == "AaMobileNodeAnswer"
    assert ans.result_code == ResultCode.DIAMETER_SUCCESS
    assert ans.origin_host == OURS.encode() and ans.origin_realm == HOME.encode()
    assert ans.session_id == f"{THEIRS};1;1" and ans.user_name == "mn1@home.example"
    assert ans.mip_reg_reply[:1] == b"\x03" and ans.mip_home_agent_address == (1, "198.18.0.10")  # (family, address)
    # our handler got the AMR
    (req, peer), = seen
    assert peer.host == THEIRS and req.get("MIP-MN-AAA-Auth", "MIP-MN-AAA-SPI") == 256
    # capabilities and watchdog: their counters count our CEA and DWAs/DWRs; our side saw theirs
    counters = out["counters"]
    assert counters.cea == 1 and counters.dwa >= 1 and counters.dwr >= 2
    (st,) = out["status"]
    assert st["peer"] == THEIRS and st["state"] == "open" and st["applications"] == [2]
    events = [(r.getMessage(), getattr(r, "fields", {}).get("cmd")) for r in caplog.records]
    assert ("event=msg.rx", "DWA") in events and ("event=msg.rx", "DWR") in events
    # their stop sends DPR; we answered DPA and the peer is closed
    assert ("event=msg.rx", "DPR") in events and ("event=msg.tx", "DPA") in events
    assert out["after"][0]["state"] == "closed"
    assert "malformed" not in out["ours"]
