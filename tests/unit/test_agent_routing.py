"""What the agents own in the kernel, over rtnetlink (daemons.agents.routing), and the FA's UDP
endpoint that answers on a link without a route (daemons.runtime.net.LinkUdpEndpoint).

The endpoint over loopback needs nothing; the rest runs against this machine's kernel in two
scratch namespaces ``mipvpn-t-p3-rt<pid>-{fa,mn}`` (removed whatever happens): an "FA" with an
access link to an "MN" and a default route out of a "core" link."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemons.agents.routing import HomeLink, VisitorRoutes
from daemons.runtime.net import LinkUdpEndpoint

ROOT = Path(__file__).resolve().parents[2]
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")
HOA, HOA2, FA_ACCESS = "198.18.100.10", "198.18.100.11", "198.18.101.1"


def test_the_endpoint_tells_the_ingress_interface_and_sends_out_of_a_given_one() -> None:
    lo = socket.if_nametoindex("lo")

    async def main() -> None:
        got: list[tuple[bytes, tuple[str, int], int | None]] = []
        ep = await LinkUdpEndpoint.open(lambda d, a, i: got.append((d, a, i)), "127.0.0.1", 0)
        port = ep.sock.getsockname()[1]
        peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        peer.bind(("127.0.0.1", 0))
        peer.settimeout(2)
        try:
            peer.sendto(b"rrq", ("127.0.0.1", port))
            for _ in range(100):
                if got:
                    break
                await asyncio.sleep(0.01)
            assert got == [(b"rrq", peer.getsockname(), lo)]
            ep.send_on_link(b"on-link", peer.getsockname(), lo, "127.0.0.1")
            ep.send(b"routed", peer.getsockname())
            assert [peer.recvfrom(100) for _ in range(2)] == [(b"on-link", ("127.0.0.1", port)),
                                                               (b"routed", ("127.0.0.1", port))]
            ep.send_on_link(b"x", ("127.0.0.1", 9), 999_999, "127.0.0.1")  # no such interface: counted, no raise
            assert ep.dropped == 1 and ep.last_error
        finally:
            peer.close()
            ep.close()

    asyncio.run(main())


# ---- against the kernel --------------------------------------------------------------------------


def sh(*cmd: str, check: bool = True) -> str:
    return subprocess.run(cmd, check=check, capture_output=True, text=True).stdout


@pytest.fixture
def nets() -> Iterator[tuple[str, str]]:
    fa, mn = (f"mipvpn-t-p3-rt{os.getpid()}-{n}" for n in ("fa", "mn"))
    try:
        for ns in (fa, mn):
            sh("ip", "netns", "add", ns)
        sh("ip", "-n", fa, "link", "add", "access", "type", "veth", "peer", "name", "eth0", "netns", mn)
        sh("ip", "-n", fa, "link", "add", "core", "type", "veth", "peer", "name", "core-peer")
        sh("ip", "-n", fa, "addr", "add", f"{FA_ACCESS}/24", "dev", "access")
        sh("ip", "-n", fa, "addr", "add", "198.18.0.14/30", "dev", "core")
        for dev in ("lo", "access", "core", "core-peer"):
            sh("ip", "-n", fa, "link", "set", dev, "up")
        sh("ip", "-n", fa, "route", "add", "default", "via", "198.18.0.13")  # toward the MN's home
        sh("ip", "-n", mn, "addr", "add", f"{HOA}/32", "dev", "eth0")
        for dev in ("lo", "eth0"):
            sh("ip", "-n", mn, "link", "set", dev, "up")
        sh("ip", "-n", mn, "route", "add", "default", "via", FA_ACCESS, "dev", "eth0", "onlink")
        yield fa, mn
    finally:
        for ns in (fa, mn):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def routes(ns: str, *args: str) -> list[str]:
    return [line.strip() for line in sh("ip", "-n", ns, "route", "show", *args).splitlines()]


def no_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every change below goes over netlink: forking ``ip`` (as once per datagram) fails the test."""
    async def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"forked {args[:3]}")

    monkeypatch.setattr(asyncio, "create_subprocess_exec", forbidden)


@needs_root
def test_visitor_routes_and_the_neighbour_over_netlink(nets: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    fa, mn = nets
    no_processes(monkeypatch)

    async def main() -> None:
        vr = VisitorRoutes("access", netns=fa)
        try:
            await vr.add(HOA)
            await vr.add(HOA)  # idempotent (replace)
            assert f"{HOA} dev access proto static scope link" in routes(fa)
            assert await vr.present() == [HOA]
            await vr.reconcile([HOA2])  # after a restart: the stray goes, the wanted one comes
            assert await vr.present() == [HOA2] and not any(r.startswith(HOA + " ") for r in routes(fa))
            await vr.remove(HOA2)
            await vr.remove(HOA2)  # gone already: no error
            assert await vr.present() == []
            assert "default via 198.18.0.13 dev core" in routes(fa)  # what is not ours stays
            assert await vr.neighbour(HOA) is None
            sh("ip", "netns", "exec", mn, "ping", "-c", "1", "-W", "2", FA_ACCESS, check=False)  # the MN ARPs for us
            mac = json.loads(sh("ip", "-n", mn, "-j", "link", "show", "eth0"))[0]["address"]
            assert await vr.neighbour(HOA) == mac
        finally:
            vr.nl.close()

    asyncio.run(main())


@needs_root
def test_home_link_over_netlink(nets: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    fa, _ = nets
    no_processes(monkeypatch)

    async def main() -> None:
        home = HomeLink("access", netns=fa)
        try:
            await home.intercept(HOA)
            assert sh("ip", "-n", fa, "neigh", "show", "proxy").split() == [HOA, "dev", "access", "proxy"]
            await home.reconcile([HOA2])
            assert sh("ip", "-n", fa, "neigh", "show", "proxy").split() == [HOA2, "dev", "access", "proxy"]
            await home.release(HOA2)
            await home.release(HOA2)
            assert sh("ip", "-n", fa, "neigh", "show", "proxy").strip() == ""
        finally:
            home.nl.close()

    asyncio.run(main())


# Runs in the FA's namespace: our endpoint sends one datagram on the link, one by the routing table.
SENDER = """
import asyncio, socket, sys
sys.path.insert(0, sys.argv[1])
from daemons.runtime.net import LinkUdpEndpoint
async def main():
    ep = await LinkUdpEndpoint.open(lambda *a: None, "0.0.0.0", 0)
    ep.send(b"routed", (sys.argv[2], 5000))
    ep.send_on_link(b"on-link", (sys.argv[2], 5000), socket.if_nametoindex("access"), sys.argv[3])
    await asyncio.sleep(0.5)
asyncio.run(main())
"""
RECEIVER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 5000))
s.settimeout(3)
try:
    while True:
        print(s.recv(100).decode(), flush=True)
except TimeoutError:
    pass
"""


@needs_root
def test_a_reply_reaches_an_mn_the_fa_holds_no_route_for(nets: tuple[str, str]) -> None:
    """The FA's routing table sends the home address to the core; the reply still goes out on
    the access link (RFC 5944 §3.7.2.3), and no route is added for it."""
    fa, mn = nets
    before = routes(fa)
    receiver = subprocess.Popen(["ip", "netns", "exec", mn, sys.executable, "-c", RECEIVER, HOA],
                                stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.3)
        sh("ip", "netns", "exec", fa, sys.executable, "-c", SENDER, str(ROOT), HOA, FA_ACCESS)
        heard = receiver.communicate(timeout=10)[0].split()
    finally:
        receiver.kill()
    assert heard == ["on-link"]  # the routed one went toward the core
    assert routes(fa) == before
