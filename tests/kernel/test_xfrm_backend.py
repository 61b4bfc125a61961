"""The xfrm path backend on a kernel with ESP, and the plain Mobile IP data path (IP-in-IP).

One chain of three namespaces, built once for the module (namespace setup is slow in the VM)::

    h (user 198.18.10.10) --acc-- a (FA-like gw) ==wan== b (CN-GW-like gw, 198.18.20.1 on lo)
                198.18.10.0/24     198.18.0.1    198.18.0.0/24    198.18.0.2 (+ .3 after a "move")

``a`` forwards the user's traffic (its ``fwd`` policy is exercised), ``b`` delivers locally
(``in`` policy).  The wan link is captured and decoded by tshark with the keys the test installed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from daemons.runtime.secret import Secret
from daemons.vpn.path import (
    DirectionKeys,
    Endpoint,
    EndpointType,
    EspSuite,
    PathState,
    Qos,
    SecurityService,
    VpnPath,
)
from daemons.vpn.xfrm.backend import REQID_BASE, REQID_SPAN, XfrmBackend
from daemons.vpn.xfrm.netlink import XfrmSocket
from tests.kernel.conftest import run

PREFIX = f"mipvpn-t-xb-{os.getpid()}-"
USER, USER2, CN = "198.18.10.10", "198.18.10.11", "198.18.20.1"
A_WAN, B_WAN, B_WAN2 = "198.18.0.1", "198.18.0.2", "198.18.0.3"
GCM_NAME = "AES-GCM with 16 octet ICV [RFC4106]"  # exactly as tshark lists it


def batch(ns: str, *lines: str) -> None:
    proc = subprocess.run(["ip", "-n", ns, "-batch", "-"], input="\n".join(lines) + "\n", text=True,
                          capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


@dataclass
class Chain:
    h: str
    a: str
    b: str
    xa: XfrmSocket
    xb: XfrmSocket
    tmp: Path

    def ping(self, dst: str = CN, count: int = 3) -> subprocess.CompletedProcess[str]:
        return run("ip", "netns", "exec", self.h, "ping", "-c", str(count), "-i", "0.2", "-W", "2", dst,
                   check=False, timeout=30)

    def xfrm(self, ns: str, what: str) -> str:
        return run("ip", "-n", ns, what.split()[0], *what.split()[1:]).stdout.strip()


@pytest.fixture(scope="module")
def chain() -> Iterator[Chain]:
    h, a, b = (f"{PREFIX}{n}" for n in ("h", "a", "b"))
    made: list[str] = []
    xs: list[XfrmSocket] = []
    tmp = Path(tempfile.mkdtemp(prefix="mipvpn-t-xb-"))
    try:
        for ns in (h, a, b):
            run("ip", "netns", "add", ns)
            made.append(ns)
        run("ip", "-n", h, "link", "add", "eth0", "type", "veth", "peer", "name", "acc", "netns", a)
        run("ip", "-n", a, "link", "add", "wan", "type", "veth", "peer", "name", "wan", "netns", b)
        batch(h, "link set lo up", "link set eth0 up", f"addr add {USER}/24 dev eth0",
              f"addr add {USER2}/24 dev eth0", "route add default via 198.18.10.1")
        batch(a, "link set lo up", "link set acc up", "link set wan up", "addr add 198.18.10.1/24 dev acc",
              f"addr add {A_WAN}/24 dev wan", f"route add default via {B_WAN}")
        batch(b, "link set lo up", "link set wan up", f"addr add {B_WAN}/24 dev wan",
              f"addr add {B_WAN2}/24 dev wan", f"addr add {CN}/32 dev lo", f"route add default via {A_WAN}")
        run("ip", "netns", "exec", a, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        xs += [XfrmSocket(a), XfrmSocket(b)]
        yield Chain(h, a, b, xs[0], xs[1], tmp)
    finally:
        for x in xs:
            x.close()
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], check=False)
        subprocess.run(["rm", "-rf", str(tmp)], check=False)
        left = [n for n in run("ip", "netns", "list").stdout.split() if n.startswith(PREFIX)]
        assert not left, f"namespaces left behind: {left}"


def make_path(path_id: str = "mn1@home.example:fa-cngw", user: str = USER, spi: int = 0x1000,
              remote: str = B_WAN, qos: Qos | None = None) -> VpnPath:
    def keys(s: int) -> DirectionKeys:
        return DirectionKeys(s, Secret(os.urandom(20)))

    return VpnPath(
        id=path_id,
        local=Endpoint(ipaddress.IPv4Address(A_WAN), EndpointType.FA),
        remote=Endpoint(ipaddress.IPv4Address(remote), EndpointType.CNGW_STATIC),
        local_ts=(ipaddress.IPv4Network(f"{user}/32"),),
        remote_ts=(ipaddress.IPv4Network("198.18.20.0/24"),),
        security=SecurityService(suite=EspSuite.AES128GCM16, outbound=keys(spi), inbound=keys(spi + 1)),
        qos=qos,
    )


def states(ns: str) -> list[tuple[str, str, int, int]]:
    """(src, dst, spi, reqid) of every SA `ip xfrm state` shows."""
    text = run("ip", "-n", ns, "xfrm", "state").stdout
    return sorted((m[1], m[2], int(m[3], 16), int(m[4]))
                  for m in re.finditer(r"src (\S+) dst (\S+)\s+proto esp spi (0x[0-9a-f]+) reqid (\d+)", text))


def policies(ns: str) -> list[tuple[str, str, str]]:
    """(src, dst, dir) of every policy `ip xfrm policy` shows."""
    text = run("ip", "-n", ns, "xfrm", "policy").stdout
    return sorted((m[1], m[2], m[3]) for m in re.finditer(r"src (\S+) dst (\S+)\s*\n\s*dir (\w+)", text))


def arun(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def esp_sa_uat(path: VpnPath) -> list[str]:
    """tshark esp_sa entries (all eight fields) for both SAs of a path."""
    out = []
    for src, dst, keys in ((path.local.address, path.remote.address, path.security.outbound),
                           (path.remote.address, path.local.address, path.security.inbound)):
        assert keys is not None
        out += ["-o", f'uat:esp_sa:"IPv4","{src}","{dst}","0x{keys.spi:08x}","{GCM_NAME}",'
                      f'"0x{keys.enc_key.reveal().hex()}","NULL",""']
    return out


def test_install_ping_capture_list_remove(chain: Chain) -> None:
    path = make_path(qos=Qos(rate=5_000_000, ceil=20_000_000, priority=2))
    pcap = chain.tmp / "wan.pcap"
    cap = subprocess.Popen(["ip", "netns", "exec", chain.a, "tcpdump", "-q", "-U", "-n", "-i", "wan", "-w", str(pcap)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    async def go() -> None:
        ba, bb = XfrmBackend("a", chain.a, xfrm=chain.xa), XfrmBackend("b", chain.b, xfrm=chain.xb)
        assert (await bb.install(path.mirrored())).state is PathState.UP
        st = await ba.install(path)
        assert st.state is PathState.UP and (st.spi_out, st.spi_in) == (0x1000, 0x1001)
        assert (await ba.install(path)).state is PathState.UP  # idempotent
        ping = await asyncio.to_thread(chain.ping)
        assert ping.returncode == 0, ping.stdout + ping.stderr

        # exactly the path's entries: 2 SAs, out/in/fwd for the one selector pair
        reqid = int(st.detail["reqid"], 16)
        assert REQID_BASE <= reqid < REQID_BASE + REQID_SPAN
        assert states(chain.a) == [(A_WAN, B_WAN, 0x1000, reqid), (B_WAN, A_WAN, 0x1001, reqid)]
        assert policies(chain.a) == sorted([(f"{USER}/32", "198.18.20.0/24", "out"),
                                            ("198.18.20.0/24", f"{USER}/32", "in"),
                                            ("198.18.20.0/24", f"{USER}/32", "fwd")])
        [listed] = await ba.list()
        assert listed.id == path.id and listed.packets_out >= 3 and listed.packets_in >= 3
        assert "Secret" not in repr(listed) and path.security.outbound.enc_key.reveal().hex() not in repr(listed)
        # QoS: the user's ESP packets went through its HTB class on the egress device
        tc = run("ip", "netns", "exec", chain.a, "tc", "-s", "class", "show", "dev", "wan").stdout
        assert "rate 5Mbit ceil 20Mbit" in tc
        sent = re.search(r"class htb 1:10 .*?Sent \d+ bytes (\d+) pkt", tc, re.S)
        assert sent and int(sent[1]) >= 3, tc

        await ba.remove(path.id)
        await bb.remove(path.id)
        await ba.remove(path.id)  # twice is harmless
        for ns in (chain.a, chain.b):
            assert chain.xfrm(ns, "xfrm state") == "" and chain.xfrm(ns, "xfrm policy") == ""
        assert "htb" not in run("tc", "-n", chain.a, "qdisc", "show", "dev", "wan").stdout
        await ba.close()
        await bb.close()

    try:
        for _ in range(100):  # tcpdump creates the file once it captures
            if pcap.exists():
                break
            time.sleep(0.1)
        arun(go())
        time.sleep(0.3)
    finally:
        cap.terminate()
        cap.wait(10)
    # one tshark run, decrypting with the keys the test installed; tshark starts slowly under
    # TCG emulation (over a minute when the host is busy), hence the generous bound
    out = run("tshark", "-r", str(pcap), "-o", "esp.enable_encryption_decode:TRUE", *esp_sa_uat(path),
              "-Y", "icmp", "-T", "fields", "-E", "occurrence=a", "-E", "aggregator=,",
              "-e", "esp.spi", "-e", "ip.src", "-e", "ip.dst", "-e", "icmp.type", timeout=400).stdout
    rows = [line.split("\t") for line in out.splitlines() if line.strip()]
    # ESP frames with the inner ICMP decrypted: outer + inner IP header each
    def esp(r: list[str], spi: int, outer: tuple[str, str], inner: tuple[str, str], icmp_type: str) -> bool:
        return bool(r[0]) and int(r[0], 16) == spi and r[1:] == [f"{outer[0]},{inner[0]}", f"{outer[1]},{inner[1]}",
                                                                icmp_type]

    requests = [r for r in rows if esp(r, 0x1000, (A_WAN, B_WAN), (USER, CN), "8")]
    replies = [r for r in rows if esp(r, 0x1001, (B_WAN, A_WAN), (CN, USER), "0")]
    assert len(requests) >= 3 and len(replies) >= 3, rows
    # ICMP outside ESP: only the kernel's decapsulated copies of *received* replies (tunnel-mode input
    # re-injects the inner packet on the receiving device, where the capture sees it); never a request
    clear = [r for r in rows if not r[0]]
    assert all(r[1:] == [CN, USER, "0"] for r in clear), clear


def test_update_to_moved_endpoint(chain: Chain) -> None:
    path = make_path()
    moved = replace(path, remote=Endpoint(ipaddress.IPv4Address(B_WAN2), EndpointType.CNGW_STATIC))

    async def go() -> None:
        ba, bb = XfrmBackend("a", chain.a, xfrm=chain.xa), XfrmBackend("b", chain.b, xfrm=chain.xb)
        try:
            await bb.install(path.mirrored())
            await ba.install(path)
            assert (await asyncio.to_thread(chain.ping, CN, 1)).returncode == 0
            # same SPIs, new remote endpoint: outbound SA make-before-break, inbound SA replaced
            assert (await bb.update(moved.mirrored())).state is PathState.UP
            st = await ba.update(moved)
            assert st.state is PathState.UP and str(st.remote) == B_WAN2
            ping = await asyncio.to_thread(chain.ping, CN, 2)
            assert ping.returncode == 0, ping.stdout + ping.stderr
            assert [s[:3] for s in states(chain.a)] == [(A_WAN, B_WAN2, 0x1000), (B_WAN2, A_WAN, 0x1001)]
            assert len(policies(chain.a)) == 3
        finally:
            await ba.flush()
            await bb.flush()
        for ns in (chain.a, chain.b):
            assert chain.xfrm(ns, "xfrm state") == "" and chain.xfrm(ns, "xfrm policy") == ""

    arun(go())


def test_reconcile_after_restart_keeps_wanted_removes_stray_spares_foreign(chain: Chain) -> None:
    wanted = make_path()
    stray = make_path("mn2@home.example:fa-cngw", user=USER2, spi=0x2000)
    # an SA and a policy somebody else owns (reqid outside our band): never touched
    foreign = ("src 198.18.0.9 dst 198.18.0.8 proto esp spi 0x7777 reqid 7 mode tunnel "
               "aead rfc4106(gcm(aes)) 0x" + "11" * 20 + " 128")
    run("ip", "-n", chain.a, "xfrm", "state", "add", *foreign.split())
    run("ip", "-n", chain.a, "xfrm", "policy", "add", "src", "198.18.99.0/24", "dst", "198.18.98.0/24", "dir",
        "out", "tmpl", "src", "198.18.0.9", "dst", "198.18.0.8", "proto", "esp", "reqid", "7", "mode", "tunnel")

    async def go() -> None:
        ba, bb = XfrmBackend("a", chain.a, xfrm=chain.xa), XfrmBackend("b", chain.b, xfrm=chain.xb)
        for p in (wanted, stray):
            await bb.install(p.mirrored())
            await ba.install(p)
        assert (await asyncio.to_thread(chain.ping, CN, 2)).returncode == 0
        before = {s.id: s for s in await ba.list()}
        # "restart": new backend objects know nothing; reconcile with only the wanted path
        ba2, bb2 = XfrmBackend("a", chain.a, xfrm=chain.xa), XfrmBackend("b", chain.b, xfrm=chain.xb)
        assert [s.state for s in await ba2.list()][:1] == [PathState.STRAY]
        [st_a] = await ba2.reconcile([wanted])
        [st_b] = await bb2.reconcile([wanted.mirrored()])
        assert st_a.state is PathState.UP and st_b.state is PathState.UP
        # kept once (same reqid, counters survived: not re-installed), the stray is gone
        assert st_a.detail["reqid"] == before[wanted.id].detail["reqid"]
        assert st_a.packets_out >= before[wanted.id].packets_out >= 2
        ours_a = [s for s in states(chain.a) if s[3] != 7]
        assert [s[2] for s in ours_a] == [0x1000, 0x1001]
        assert [s[2] for s in states(chain.b)] == [0x1000, 0x1001]
        assert ("198.18.99.0/24", "198.18.98.0/24", "out") in policies(chain.a)
        assert len(policies(chain.a)) == 4 and len(policies(chain.b)) == 3
        assert [s.id for s in await ba2.list()] == [wanted.id]
        assert (await asyncio.to_thread(chain.ping, CN, 2)).returncode == 0
        # reconcile again is a no-op; flush removes ours only
        await ba2.reconcile([wanted])
        assert len(states(chain.a)) == 3
        await ba2.flush()
        await bb2.flush()

    try:
        arun(go())
        assert states(chain.a) == [("198.18.0.9", "198.18.0.8", 0x7777, 7)]
        assert policies(chain.a) == [("198.18.99.0/24", "198.18.98.0/24", "out")]
        assert chain.xfrm(chain.b, "xfrm state") == "" and chain.xfrm(chain.b, "xfrm policy") == ""
    finally:
        run("ip", "-n", chain.a, "xfrm", "state", "flush")
        run("ip", "-n", chain.a, "xfrm", "policy", "flush")
        run("ip", "-n", chain.b, "xfrm", "state", "flush")
        run("ip", "-n", chain.b, "xfrm", "policy", "flush")


def test_ipip_tunnel_carries_ping(chain: Chain) -> None:
    """The plain Mobile IP data path (RFC 2003): IP-in-IP between the two gateways."""
    try:
        batch(chain.a, f"link add mip0 type ipip local {A_WAN} remote {B_WAN}", "link set mip0 up",
              "addr add 198.18.30.1/30 dev mip0")
        batch(chain.b, f"link add mip0 type ipip local {B_WAN} remote {A_WAN}", "link set mip0 up",
              "addr add 198.18.30.2/30 dev mip0")
        ping = run("ip", "netns", "exec", chain.a, "ping", "-c", "3", "-i", "0.2", "-W", "2", "198.18.30.2",
                   check=False)
        assert ping.returncode == 0, ping.stdout + ping.stderr
        stats = run("ip", "-n", chain.b, "-s", "link", "show", "mip0").stdout
        rx = re.search(r"RX:.*\n\s*(\d+)\s+(\d+)", stats)
        assert rx and int(rx[2]) >= 3, stats
    finally:
        for ns in (chain.a, chain.b):
            subprocess.run(["ip", "-n", ns, "link", "del", "mip0"], check=False)


def test_on_traffic_path_waits_for_acquire(chain: Chain) -> None:
    """Claim 5 with kernel xfrm: an on-traffic path has its policies and inbound SA but no
    outbound SA; the first packet makes the kernel send XFRM_MSG_ACQUIRE and the backend
    installs the held SA (keys from the AAAH, no negotiation).  At both ends."""
    path = replace(make_path("mn1@home.example:trap", spi=0x3000), on_traffic=True)

    def ours_states(ns: str) -> list[tuple[str, str, int]]:
        return [s[:3] for s in states(ns) if s[2] != 0]  # not the kernel's larval (acquire) state

    async def wait_up(backend: XfrmBackend) -> PathState:
        for _ in range(200):  # a bound, not a timing (the VM is slow)
            state = (await backend.status(path.id)).state
            if state is PathState.UP:
                break
            await asyncio.sleep(0.1)
        return state

    async def go() -> None:
        ba, bb = XfrmBackend("a", chain.a, xfrm=chain.xa), XfrmBackend("b", chain.b, xfrm=chain.xb)
        try:
            st_b = await bb.install(path.mirrored())
            st_a = await ba.install(path)
            assert (st_a.state, st_b.state) == (PathState.TRAPPED, PathState.TRAPPED)
            assert st_a.detail["start"] == "on-traffic"
            # the policies and the inbound SA only: nothing to send with yet
            assert ours_states(chain.a) == [(B_WAN, A_WAN, 0x3001)]
            assert ours_states(chain.b) == [(A_WAN, B_WAN, 0x3000)]
            assert len(policies(chain.a)) == 3 and len(policies(chain.b)) == 3
            assert (ba.acquires, bb.acquires) == (0, 0)
            # the first request is dropped at a (acquire), the first reply at b (acquire)
            await asyncio.to_thread(chain.ping, CN, 4)
            assert await wait_up(ba) is PathState.UP
            assert await wait_up(bb) is PathState.UP
            assert ba.acquires == 1 and bb.acquires == 1
            assert ours_states(chain.a) == [(A_WAN, B_WAN, 0x3000), (B_WAN, A_WAN, 0x3001)]
            ping = await asyncio.to_thread(chain.ping, CN, 3)
            assert ping.returncode == 0 and " 0% packet loss" in ping.stdout, ping.stdout + ping.stderr
            st = await ba.status(path.id)
            assert st.packets_out >= 3 and st.packets_in >= 3
            # installing the same path again keeps it up (no new trap)
            assert (await ba.install(path)).state is PathState.UP
        finally:
            await ba.flush()
            await bb.flush()
            await ba.close()
            await bb.close()
        for ns in (chain.a, chain.b):
            assert chain.xfrm(ns, "xfrm policy") == ""
            assert [s for s in states(ns) if s[2] != 0] == []

    arun(go())


def test_on_traffic_path_under_a_covering_path(chain: Chain) -> None:
    """An FA's home address ⇄ any path to the HA covers its home address ⇄ correspondent path
    to a dynamic CN-GW.  With kernel xfrm the more specific policy wins (our priorities by
    selector size), so the on-traffic path's policy still sees the first packet: acquire,
    then the correspondent's traffic takes it, none the covering path."""
    anchor = replace(make_path("mn1@home.example:1", spi=0x4000),
                     remote_ts=(ipaddress.IPv4Network("0.0.0.0/0"),))
    ro = replace(make_path("mn1@home.example:3", spi=0x5000, remote=B_WAN2), on_traffic=True)

    async def go() -> None:
        ba, bb = XfrmBackend("a", chain.a, xfrm=chain.xa), XfrmBackend("b", chain.b, xfrm=chain.xb)
        try:
            for p in (anchor, ro):
                await bb.install(p.mirrored())
                await ba.install(p)
            assert (await ba.status(ro.id)).state is PathState.TRAPPED
            assert (await ba.status(anchor.id)).state is PathState.UP
            await asyncio.to_thread(chain.ping, CN, 4)
            for _ in range(200):  # a bound, not a timing
                if (await ba.status(ro.id)).state is PathState.UP and (await bb.status(ro.id)).state is PathState.UP:
                    break
                await asyncio.sleep(0.1)
            assert (await ba.status(ro.id)).state is PathState.UP and ba.acquires == 1
            ping = await asyncio.to_thread(chain.ping, CN, 3)
            assert ping.returncode == 0 and " 0% packet loss" in ping.stdout, ping.stdout + ping.stderr
            assert (await ba.status(ro.id)).packets_out >= 3
            assert (await ba.status(anchor.id)).packets_out == 0  # nothing took the covering path
        finally:
            await ba.flush()
            await bb.flush()
            await ba.close()
            await bb.close()
        for ns in (chain.a, chain.b):
            assert chain.xfrm(ns, "xfrm policy") == ""
            assert [s for s in states(ns) if s[2] != 0] == []

    arun(go())
