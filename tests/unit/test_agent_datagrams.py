"""Small pieces the agents share: ``dispatch`` (UDP 434 datagrams of the FA and the CN-GW:
handler per message type, one way of counting and logging the rest), ``read_icmp`` (the raw
ICMP sockets of the advertiser and the MN; real datagram sockets here, packets built by
scapy) and ``converge`` (the HA's and the FA's reconciliation after a restart)."""

from __future__ import annotations

import asyncio
import socket

import pytest
from scapy.all import ICMP, IP

from daemons.agents.advertiser import read_icmp
from daemons.agents.datagrams import dispatch
from daemons.agents.routing import converge
from daemons.runtime.log import EventLog
from daemons.wire import mip

log = EventLog("mipvpn.test.datagrams")
ADDR = ("198.18.0.14", 434)


def test_dispatch_hands_each_type_to_its_handler_and_counts_the_rest() -> None:
    async def main() -> None:
        counters = {"malformed": 0}
        seen: list[tuple[str, object]] = []
        refused: list[object] = []

        async def on_request(msg: mip.RegistrationRequest, raw: bytes, addr: tuple[str, int]) -> None:
            seen.append(("rrq", msg.identification))

        def on_ack(msg: mip.BindingAcknowledge, raw: bytes, addr: tuple[str, int]) -> None:
            seen.append(("ba", msg.identification))

        handlers = {mip.RegistrationRequest: on_request, mip.BindingAcknowledge: on_ack}
        rrq = mip.RegistrationRequest("198.18.100.10", "198.18.100.1", "198.18.0.14", 7, lifetime=60)

        def run(data: bytes) -> None:
            dispatch(data, ADDR, handlers, counters, log, lambda partial, addr: refused.append(partial))

        run(rrq.encode())  # a coroutine handler: runs in the background
        run(mip.BindingAcknowledge(0, "198.18.100.10", 8).encode())  # a plain one: at once
        assert seen == [("ba", 8)]
        await asyncio.sleep(0)
        assert seen == [("ba", 8), ("rrq", 7)] and counters["malformed"] == 0
        run(b"\x01garbage")  # does not decode
        run(mip.RegistrationReply(0, "198.18.100.10", "198.18.100.1", 9).encode())  # no handler for it
        assert counters["malformed"] == 2 and refused == []
        run(rrq.encode() + bytes([99, 2, 0, 0]))  # unknown non-skippable extension: refused
        assert counters["malformed"] == 3 and refused == [rrq]

    asyncio.run(main())


def test_read_icmp_returns_only_the_type_asked_for() -> None:
    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with ours, kernel:
        ours.setblocking(False)
        assert read_icmp(ours, mip.ICMP_ROUTER_SOLICITATION) is None  # nothing waiting
        kernel.send(bytes(IP(src="198.18.101.10", dst="224.0.0.2", proto=1) / ICMP(type=8)))  # a ping
        assert read_icmp(ours, mip.ICMP_ROUTER_SOLICITATION) is None
        kernel.send(bytes(IP(src="198.18.101.10", dst="224.0.0.2", proto=1) / mip.AgentSolicitation().encode()))
        got = read_icmp(ours, mip.ICMP_ROUTER_SOLICITATION)
        assert got is not None and str(got[0]) == "198.18.101.10"
        assert isinstance(mip.decode_icmp(got[1]), mip.AgentSolicitation)
        kernel.send(b"\x60" + bytes(39))  # not IPv4
        with pytest.raises(mip.DecodeError):
            read_icmp(ours, mip.ICMP_ROUTER_SOLICITATION)


def test_converge_removes_strays_then_adds_what_is_missing() -> None:
    """routing.converge: how the HA's proxy-ARP entries and the FA's visitor routes reconcile."""
    calls: list[tuple[str, str]] = []

    async def add(x: str) -> None:
        calls.append(("add", x))

    async def remove(x: str) -> None:
        calls.append(("remove", x))

    asyncio.run(converge(iter(["a", "b"]), ["b", "c"], add, remove))
    assert calls == [("remove", "a"), ("add", "c")]
