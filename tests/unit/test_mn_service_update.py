"""The mobile node's side of F7 without a network: what its RRQs carry while a service update
is pending, and how the control command learns the outcome."""

from __future__ import annotations

import asyncio
import time
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from daemons.agents.mn import Agent, MobileNode
from daemons.runtime.config import MNConfig, SecurityAssociation
from daemons.runtime.secret import Secret
from daemons.wire import mip
from daemons.wire.mip.vendor import ServiceUpdate, service_update

MN_HA, MN_AAA = Secret(b"h" * 16), Secret(b"a" * 16)


def node(tmp_path: Path) -> MobileNode:
    return MobileNode(MNConfig(node="mn1", role="mn", state_dir=tmp_path, control_socket=tmp_path / "mn.sock",
                               nai="mn1@home.example", home_address=IPv4Address("198.18.100.10"),
                               home_prefix=IPv4Network("198.18.100.0/24"), home_agent=IPv4Address("198.18.100.1"),
                               mn_ha=SecurityAssociation(0x1000, MN_HA), mn_aaa=SecurityAssociation(0x3000, MN_AAA)))


def fa(home: bool = False) -> Agent:
    return Agent("198.18.101.1", "198.18.0.14", home, bytes(range(16)), 300, time.monotonic(), 10)


def test_rrq_carries_the_pending_service_update_under_both_authenticators(tmp_path: Path) -> None:
    async def main() -> None:
        mn = node(tmp_path)
        plain = mip.decode_message(mn.request(fa(), 300, "198.18.0.14"))
        assert service_update(plain.extensions) is None and mn.service_update_sent is None
        outcome = asyncio.get_running_loop().create_future()
        mn.service_update = (5, outcome)
        wire = mn.request(fa(), 300, "198.18.0.14")
        rrq = mip.decode_message(wire)
        assert service_update(rrq.extensions) == ServiceUpdate(5) and mn.service_update_sent == 5
        assert mip.verify(wire, mip.EXT_MN_HA_AUTH, MN_HA, spi=0x1000)
        assert mip.verify(wire, mip.EXT_GEN_AUTH, MN_AAA, spi=0x3000)
        types = [type(e).__name__ for e in rrq.extensions]
        assert types.index("NVSEExtension") < types.index("MNHAAuthExtension")  # covered by MN-HA
        # Deregistration and the home link carry no service update.
        assert service_update(mip.decode_message(mn.request(fa(), 0, "198.18.0.14")).extensions) is None
        assert service_update(mip.decode_message(mn.request(fa(home=True), 300, "198.18.100.10")).extensions) is None

        # A reply to a request without it leaves the update pending; one to a request with it ends it.
        mn.request(fa(), 0, "198.18.0.14")
        mn.service_update_answered(mip.RegistrationReply(code=0, home_address="198.18.100.10",
                                                         home_agent="198.18.100.1", identification=1))
        assert mn.service_update is not None and not outcome.done()
        mn.request(fa(), 300, "198.18.0.14")
        mn.service_update_answered(mip.RegistrationReply(code=0, home_address="198.18.100.10",
                                                         home_agent="198.18.100.1", identification=1))
        assert mn.service_update is None and outcome.result() == 0
        assert mn.counters["service_updates"] == 1

    asyncio.run(main())


def test_control_command_needs_a_foreign_agent_and_reports_the_code(tmp_path: Path) -> None:
    async def main() -> None:
        mn = node(tmp_path)
        with pytest.raises(RuntimeError, match="not registered through a foreign agent"):
            await mn.request_service_update({})
        mn.agent, mn.state, mn.registered_coa = fa(), "registered", "198.18.0.14"
        task = asyncio.create_task(mn.request_service_update({}))
        await asyncio.sleep(0)
        assert mn.service_update is not None and mn.kick.is_set()
        seq = mn.service_update[0]
        mn.request(fa(), 300, "198.18.0.14")
        mn.service_update_answered(mip.RegistrationReply(code=mip.ReplyCode.FA_ADMINISTRATIVELY_PROHIBITED,
                                                         home_address="198.18.100.10", home_agent="198.18.100.1",
                                                         identification=1))
        result = await task
        assert result["sequence"] == seq and result["code"] == 65 and not result["accepted"]
        # The next request gets the next sequence number.
        task = asyncio.create_task(mn.request_service_update({}))
        await asyncio.sleep(0)
        assert mn.service_update[0] == seq + 1
        mn.request(fa(), 300, "198.18.0.14")
        mn.service_update_answered(None)  # the agent went away
        assert (await task)["code"] == -1

    asyncio.run(main())
