"""strongSwan path backend on real namespaces with charon + kernel-libipsec (ESP-in-UDP).

Chain (own namespaces, no lab package)::

    h1 (MN, 198.18.100.10/32) -- a (FA-like gw) -- core -- b (CN-GW-like gw) -- h2 (CN 198.18.20.10)
         198.18.10.0/24                 198.18.1.0/24   198.18.2.0/24      198.18.20.0/24
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from daemons.bench.paths import BenchResult, bench_paths
from daemons.runtime.secret import Secret
from daemons.vpn.path import (
    Endpoint,
    EndpointType,
    EspSuite,
    PathState,
    Qos,
    SecurityService,
    VpnPath,
)
from daemons.vpn.strongswan.addresses import prepare_local_selector, release_local_selector
from daemons.vpn.strongswan.backend import StrongswanBackend
from daemons.vpn.strongswan.charon import charon_command, conn_name, vici_socket_path
from daemons.vpn.strongswan.routes import DEST_TABLE, SRC_TABLE

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(not shutil.which("tshark") or not os.path.exists("/usr/lib/ipsec/charon"),
                       reason="needs tshark and strongswan-charon"),
]

HOA = "198.18.100.10"
HOA2 = "198.18.100.11"
CN = "198.18.20.10"
GW_A = "198.18.1.1"
GW_B = "198.18.2.1"
GW_B2 = "198.18.2.2"
PREFIX = f"mipvpn-t-ss{os.getpid()}-"
PATH_PSK = Secret(os.urandom(32))  # a path's IKE secret (one IKE_SA per path)


def sh(*cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)}: rc={proc.returncode}\n{proc.stdout}{proc.stderr}")
    return proc


def nsx(ns: str, *cmd: str, check: bool = True, timeout: float = 30):
    return sh("ip", "netns", "exec", ns, *cmd, check=check, timeout=timeout)


@dataclass
class Chain:
    ns: dict[str, str]
    run_dir: Path
    procs: list[subprocess.Popen] = field(default_factory=list)
    charons: dict[str, subprocess.Popen] = field(default_factory=dict)  # the running one per node
    a: StrongswanBackend | None = None
    b: StrongswanBackend | None = None
    last_ping: str = ""

    def ping(self, count: int = 3, src_ns: str = "h1", dst: str = CN) -> bool:
        proc = nsx(self.ns[src_ns], "ping", "-c", str(count), "-i", "0.2", "-W", "1", dst,
                   check=False)
        self.last_ping = proc.stdout + proc.stderr
        return proc.returncode == 0


def _build(ns: dict[str, str]) -> None:
    for name in ns.values():
        sh("ip", "netns", "add", name)
        nsx(name, "ip", "link", "set", "lo", "up")

    def veth(n1: str, if1: str, n2: str, if2: str) -> None:
        sh("ip", "link", "add", if1, "netns", ns[n1], "type", "veth", "peer", "name", if2,
           "netns", ns[n2])
        nsx(ns[n1], "ip", "link", "set", "dev", if1, "up")
        nsx(ns[n2], "ip", "link", "set", "dev", if2, "up")

    veth("h1", "eth0", "a", "acc")
    veth("a", "core", "core", "to-a")
    veth("core", "to-b", "b", "core")
    veth("b", "lan", "h2", "eth0")
    # MN: home address only, default route to the FA's access address
    nsx(ns["h1"], "ip", "addr", "add", f"{HOA}/32", "dev", "eth0")
    nsx(ns["h1"], "ip", "addr", "add", f"{HOA2}/32", "dev", "eth0")
    nsx(ns["h1"], "ip", "route", "add", "198.18.10.1/32", "dev", "eth0")
    nsx(ns["h1"], "ip", "route", "add", "default", "via", "198.18.10.1", "dev", "eth0", "src",
        HOA)
    nsx(ns["a"], "ip", "addr", "add", "198.18.10.1/24", "dev", "acc")
    nsx(ns["a"], "ip", "route", "add", f"{HOA}/32", "dev", "acc")  # visitor host route
    nsx(ns["a"], "ip", "addr", "add", f"{GW_A}/24", "dev", "core")
    nsx(ns["a"], "ip", "route", "add", "default", "via", "198.18.1.254")
    nsx(ns["core"], "ip", "addr", "add", "198.18.1.254/24", "dev", "to-a")
    nsx(ns["core"], "ip", "addr", "add", "198.18.2.254/24", "dev", "to-b")
    nsx(ns["b"], "ip", "addr", "add", f"{GW_B}/24", "dev", "core")
    nsx(ns["b"], "ip", "addr", "add", f"{GW_B2}/24", "dev", "core")  # "moved" endpoint
    nsx(ns["b"], "ip", "route", "add", "default", "via", "198.18.2.254")
    nsx(ns["b"], "ip", "addr", "add", "198.18.20.1/24", "dev", "lan")
    nsx(ns["h2"], "ip", "addr", "add", f"{CN}/24", "dev", "eth0")
    nsx(ns["h2"], "ip", "route", "add", "default", "via", "198.18.20.1")
    for n in ("a", "core", "b"):
        nsx(ns[n], "sysctl", "-qw", "net.ipv4.ip_forward=1")


def _kill(proc: subprocess.Popen) -> None:
    """Stop one process we started, by its PID (Popen never signals an already reaped PID)."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def _start_charon(chain: Chain, node: str) -> subprocess.Popen:
    cmd = ["ip", "netns", "exec", chain.ns[node], *charon_command(chain.run_dir, node)]
    out = open(chain.run_dir / f"{node}.stdout", "wb")
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    out.close()
    chain.procs.append(proc)
    chain.charons[node] = proc
    return proc


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def chain() -> Iterator[Chain]:
    ns = {n: f"{PREFIX}{n}" for n in ("h1", "a", "core", "b", "h2")}
    run_dir = Path(tempfile.mkdtemp(prefix="mipvpn-ss-"))
    c = Chain(ns, run_dir)
    try:
        _build(ns)
        for node in ("a", "b"):
            _start_charon(c, node)

        async def ready() -> None:
            c.a = StrongswanBackend("a", run_dir, ns["a"])
            c.b = StrongswanBackend("b", run_dir, ns["b"])
            await c.a.wait_ready()
            await c.b.wait_ready()
            await prepare_local_selector(ns["a"], HOA, "acc")

        run(ready())
        for proc in c.procs:  # the supervised PID is charon itself (exec all the way down)
            assert Path(f"/proc/{proc.pid}/comm").read_text().strip() == "charon"
        yield c
    finally:
        for proc in c.procs:
            _kill(proc)
        for name in ns.values():
            sh("ip", "netns", "del", name, check=False)
        left = [n for n in sh("ip", "netns", "list").stdout.split() if n.startswith(PREFIX)]
        shutil.rmtree(run_dir, ignore_errors=True)
        assert not left, f"namespaces left behind: {left}"


def make_path(
    path_id: str = "mn1@home.example:fa-cngw",
    hoa: str = HOA,
    suite: EspSuite = EspSuite.AES128GCM16,
    qos: Qos | None = None,
    psk: Secret | None = None,
    on_traffic: bool = False,
) -> VpnPath:
    return VpnPath(
        id=path_id,
        local=Endpoint(ipaddress.IPv4Address(GW_A), EndpointType.FA),
        remote=Endpoint(ipaddress.IPv4Address(GW_B), EndpointType.CNGW_DYNAMIC),
        local_ts=(ipaddress.IPv4Network(f"{hoa}/32"),),
        remote_ts=(ipaddress.IPv4Network("198.18.20.0/24"),),
        security=SecurityService(suite=suite, psk=psk or PATH_PSK, lifetime=3600),
        qos=qos,
        on_traffic=on_traffic,
    )


async def install_both(c: Chain, path: VpnPath) -> None:
    assert c.a is not None and c.b is not None
    # B first: it finds A unconfigured and waits; A's install then brings the CHILD_SA up
    st_b = await c.b.install(path.mirrored())
    assert st_b.state in (PathState.WAITING, PathState.UP)
    st_a = await c.a.install(path)
    assert st_a.state is PathState.UP, f"{st_a}\n{charon_logs(c)}"


def charon_logs(c: Chain, lines: int = 40) -> str:
    out = []
    for node in ("a", "b"):
        for name in ("charon.log", f"../{node}.stdout"):
            f = c.run_dir / node / name
            if f.exists():
                text = f.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {node} {name}\n" + "\n".join(text))
    return "\n".join(out)


def sas(c: Chain, node: str) -> list[dict]:
    import socket as s

    import vici

    sock = s.socket(s.AF_UNIX)
    sock.connect(str(vici_socket_path(c.run_dir, node)))
    try:
        out = []
        for entry in vici.Session(sock).list_sas():
            for name, sa in entry.items():
                out.append({"name": name.decode() if isinstance(name, bytes) else name, **sa})
        return out
    finally:
        sock.close()


def terminate(c: Chain, node: str, conn: str) -> None:
    """End a connection's IKE_SA at ``node`` (as a DPD timeout or a peer's restart would)."""
    import socket as s

    import vici

    sock = s.socket(s.AF_UNIX)
    sock.connect(str(vici_socket_path(c.run_dir, node)))
    try:
        for _ in vici.Session(sock).terminate({"ike": conn, "force": "yes", "timeout": "3000"}):
            pass
    finally:
        sock.close()


def child_names(c: Chain, node: str) -> list[str]:
    return [
        ch["name"].decode()
        for sa in sas(c, node)
        for ch in (sa.get("child-sas") or {}).values()
    ]


def routing_leftovers(c: Chain, node: str) -> list[str]:
    left = []
    for table in (SRC_TABLE, DEST_TABLE):
        out = nsx(c.ns[node], "ip", "route", "show", "table", str(table), check=False).stdout
        left += [f"table {table}: {line}" for line in out.splitlines() if line.strip()]
    for line in nsx(c.ns[node], "ip", "rule", "show").stdout.splitlines():
        if f"lookup {SRC_TABLE}" in line or f"lookup {DEST_TABLE}" in line or "lookup 220" in line:
            left.append(f"rule: {line}")
    out = nsx(c.ns[node], "tc", "class", "show", "dev", "ipsec0").stdout
    left += [f"tc: {line}" for line in out.splitlines() if line.strip()]
    return left


def tshark_count(pcap: Path, display_filter: str) -> int:
    proc = sh("tshark", "-r", str(pcap), "-Y", display_filter, "-T", "fields", "-e",
              "frame.number")
    return len([x for x in proc.stdout.split() if x])


def test_install_ping_esp_only_remove_reinstall(chain: Chain) -> None:
    c = chain
    assert c.a is not None and c.b is not None
    path = make_path(qos=Qos(rate=5_000_000, ceil=20_000_000, priority=2))
    pcap = c.run_dir / "core-a.pcap"
    cap = subprocess.Popen(
        ["ip", "netns", "exec", c.ns["core"], "tcpdump", "-q", "-U", "--immediate-mode", "-n",
         "-i", "to-a", "-w", str(pcap)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    c.procs.append(cap)
    try:
        time.sleep(0.5)
        run(install_both(c, path))
        assert c.ping(5), "ping through the ESP path failed"
        assert c.ping(2, src_ns="h2", dst=HOA), "ping CN -> MN failed"
        time.sleep(0.3)
    finally:
        _kill(cap)
    # on the core link: ESP-in-UDP/4500 only, never the inner addresses or ICMP in clear
    assert tshark_count(pcap, "esp && udp.port == 4500") >= 14
    assert tshark_count(pcap, f"ip.addr == {HOA} || ip.addr == {CN} || ip.addr == 198.18.20.0/24"
                              " || icmp") == 0
    assert tshark_count(pcap, "esp && !(udp.port == 4500)") == 0
    assert tshark_count(pcap, "ip && !(udp.port == 4500 || udp.port == 500)") == 0

    # status: counters, SPIs, no keys
    [st] = run(c.a.list())
    assert st.id == path.id and st.state is PathState.UP
    assert st.packets_out >= 7 and st.packets_in >= 7 and st.spi_in and st.spi_out
    assert "Secret" not in repr(st)
    # charon logs at level <= 1: no hex dumps (key material appears only in dumps)
    for node in ("a", "b"):
        log_text = (c.run_dir / node / "charon.log").read_text()
        assert not re.search(r"^\s*\d+: [0-9A-F]{2} [0-9A-F]{2} ", log_text, re.M)
        assert PATH_PSK.reveal().hex() not in log_text.replace(" ", "").lower()
    # QoS class for the user exists on ipsec0 at both ends
    assert "rate 5Mbit ceil 20Mbit" in nsx(c.ns["a"], "tc", "class", "show", "dev",
                                           "ipsec0").stdout
    stats = nsx(c.ns["a"], "tc", "-s", "class", "show", "dev", "ipsec0", "classid",
                "1:10").stdout
    sent = re.search(r"Sent (\d+) bytes (\d+) pkt", stats)
    assert sent and int(sent.group(2)) >= 5, stats  # the user's packets went through the class
    filters = nsx(c.ns["b"], "tc", "filter", "show", "dev", "ipsec0").stdout
    assert "c612640a/ffffffff at 16" in filters  # dst 198.18.100.10 at B

    # installing the same path again is harmless: still exactly one CHILD_SA
    run(c.a.install(path))
    run(c.b.install(path.mirrored()))
    assert child_names(c, "a") == [path.id]
    assert child_names(c, "b") == [path.id]

    run(c.a.remove(path.id))
    run(c.b.remove(path.id))
    assert not c.ping(1), "traffic still flows after remove"
    assert sas(c, "a") == [] and sas(c, "b") == []
    assert routing_leftovers(c, "a") == []
    assert routing_leftovers(c, "b") == []
    run(c.a.remove(path.id))  # removing twice is harmless

    # re-install works (new PSK, other suite)
    path2 = make_path(suite=EspSuite.AES256GCM16, psk=Secret(os.urandom(32)))
    run(install_both(c, path2))
    assert c.ping(3)
    run(c.a.flush())
    run(c.b.flush())
    assert sas(c, "a") == [] and sas(c, "b") == []
    assert routing_leftovers(c, "a") == [] and routing_leftovers(c, "b") == []


def test_update_new_endpoint_and_qos(chain: Chain) -> None:
    c = chain
    assert c.a is not None and c.b is not None
    path = make_path(qos=Qos(rate=1_000_000))
    moved = replace(path, remote=Endpoint(ipaddress.IPv4Address(GW_B2),
                                          EndpointType.CNGW_DYNAMIC))
    try:
        run(install_both(c, path))
        assert c.ping(2)
        # QoS-only change: same SA, new class parameters
        spi = run(c.a.status(path.id)).spi_out
        faster = replace(path, qos=Qos(rate=2_000_000, ceil=8_000_000))
        st = run(c.a.update(faster))
        assert st.state is PathState.UP and st.spi_out == spi
        assert "rate 2Mbit ceil 8Mbit" in nsx(c.ns["a"], "tc", "class", "show", "dev",
                                              "ipsec0").stdout
        # new remote endpoint (e.g. after a move): the pair changes, the path follows
        run(c.b.update(moved.mirrored()))
        st = run(c.a.update(replace(moved, qos=faster.qos)))
        assert st.state is PathState.UP, f"{st}\n{charon_logs(c)}"
        assert str(st.remote) == GW_B2
        assert c.ping(2)
        [ike] = sas(c, "a")  # the old connection's IKE_SA went after the new one was up
        assert ike["name"] == f"mipvpn-{GW_A}-{GW_B2}/{path.id}"
        assert child_names(c, "a") == [path.id] and child_names(c, "b") == [path.id]
    finally:
        run(c.a.flush())
        run(c.b.flush())
    assert sas(c, "a") == [] and sas(c, "b") == []
    assert routing_leftovers(c, "a") == [] and routing_leftovers(c, "b") == []


def test_each_user_path_has_its_own_ike_sa_and_psk(chain: Chain) -> None:
    """Issue 15: two users between the same two gateways, each path with a PSK of its own: two
    IKE_SAs whose identities name the path; a path whose ends hold different PSKs stays down."""
    c = chain
    assert c.a is not None and c.b is not None
    run(prepare_local_selector(c.ns["a"], HOA2, "acc"))
    p1 = make_path(psk=Secret(os.urandom(32)))
    p2 = make_path("mn2@home.example:fa-cngw", hoa=HOA2, suite=EspSuite.AES128_SHA256, psk=Secret(os.urandom(32)))
    try:
        run(install_both(c, p1))
        run(install_both(c, p2))
        ikes = sorted(sas(c, "a"), key=lambda sa: sa["name"])
        assert [sa["name"] for sa in ikes] == [conn_name(p1), conn_name(p2)]
        for sa, p in zip(ikes, (p1, p2), strict=True):
            assert [ch["name"].decode() for ch in sa["child-sas"].values()] == [p.id]
            assert (sa["local-id"].decode(), sa["remote-id"].decode()) == (f"{GW_A}/{p.id}", f"{GW_B}/{p.id}")
        assert c.ping(2)
        # remove one user: the other's IKE_SA and traffic stay
        run(c.a.remove(p2.id))
        run(c.b.remove(p2.id))
        assert [sa["name"] for sa in sas(c, "a")] == [conn_name(p1)] and child_names(c, "a") == [p1.id]
        assert c.ping(2)
        # the PSK is the path's: ends holding different ones authenticate nothing
        run(c.b.install(p2.mirrored()))
        st = run(c.a.install(replace(p2, security=replace(p2.security, psk=Secret(os.urandom(32))))))
        assert st.state is not PathState.UP
        assert child_names(c, "a") == [p1.id]
    finally:
        run(c.a.flush())
        run(c.b.flush())
    assert sas(c, "a") == [] and sas(c, "b") == []


def test_psk_rotated_at_reregistration_keeps_the_sa(chain: Chain) -> None:
    """A re-registration brings the same path with a new PSK: the SAs stay (same SPI, traffic
    flows), the next IKE_SA is authenticated with the new key, and the old one is gone."""
    c = chain
    assert c.a is not None and c.b is not None
    path = make_path(psk=Secret(os.urandom(32)))
    rotated = replace(path, security=replace(path.security, psk=Secret(os.urandom(32))))

    def restart_ike() -> PathState:
        terminate(c, "a", conn_name(path))
        assert sas(c, "a") == []
        return run(c.a.install(rotated)).state  # a known path without an SA: initiated again

    try:
        run(install_both(c, path))
        spi = run(c.a.status(path.id)).spi_out
        run(c.b.update(rotated.mirrored()))
        st = run(c.a.update(rotated))
        assert st.state is PathState.UP and st.spi_out == spi
        assert c.ping(2)
        assert restart_ike() is PathState.UP, charon_logs(c)
        assert c.ping(2)
        # B rotates again, A does not: A's key (the one B had) no longer authenticates
        run(c.b.update(replace(rotated, security=replace(rotated.security, psk=Secret(os.urandom(32)))).mirrored()))
        assert restart_ike() is not PathState.UP
    finally:
        run(c.a.flush())
        run(c.b.flush())
    assert sas(c, "a") == [] and sas(c, "b") == []


def test_restart_reconcile_keeps_wanted_removes_stray(chain: Chain) -> None:
    c = chain
    assert c.a is not None and c.b is not None
    run(prepare_local_selector(c.ns["a"], HOA2, "acc"))
    wanted = make_path()
    stray = make_path("mn2@home.example:fa-cngw", hoa=HOA2)
    try:
        run(install_both(c, wanted))
        run(install_both(c, stray))
        assert sorted(child_names(c, "a")) == sorted([wanted.id, stray.id])

        async def restart() -> None:
            # the daemons restart: new backend objects know nothing of what is installed
            assert c.a is not None and c.b is not None
            await c.a.close()
            await c.b.close()
            c.a = StrongswanBackend("a", c.run_dir, c.ns["a"])
            c.b = StrongswanBackend("b", c.run_dir, c.ns["b"])
            await c.a.wait_ready()
            await c.b.wait_ready()
            st_a = await c.a.reconcile([wanted])
            st_b = await c.b.reconcile([replace(wanted).mirrored()])
            assert [s.state for s in st_a] == [PathState.UP]
            assert [s.state for s in st_b] == [PathState.UP]

        run(restart())
        assert child_names(c, "a") == [wanted.id]
        assert child_names(c, "b") == [wanted.id]
        assert c.ping(2)
        rules = nsx(c.ns["a"], "ip", "rule", "show").stdout
        assert HOA2 not in rules.replace(f"to {HOA2} lookup", "")  # stray's source rule gone
        assert [s.id for s in run(c.a.list())] == [wanted.id]
    finally:
        run(c.a.flush())
        run(c.b.flush())
    assert sas(c, "a") == [] and sas(c, "b") == []
    assert routing_leftovers(c, "a") == [] and routing_leftovers(c, "b") == []


def test_bench_many_users_one_pair(chain: Chain) -> None:
    """Runs the benchmark function (numbers are printed, never asserted)."""
    c = chain
    assert c.a is not None and c.b is not None
    n = int(os.environ.get("MIPVPN_BENCH_PATHS", "20"))
    hoas = [HOA] + [f"198.18.101.{i}" for i in range(1, n)]
    paths = [make_path(f"u{i}@home.example:fa-cngw", hoa=h) for i, h in enumerate(hoas)]

    async def go() -> BenchResult:
        assert c.a is not None and c.b is not None
        for h in hoas[1:]:
            await prepare_local_selector(c.ns["a"], h, "acc")

        async def probe() -> bool:
            return await asyncio.to_thread(c.ping, 2)

        try:
            return await bench_paths(c.a, c.b, paths, probe=probe)
        finally:
            for h in hoas[1:]:
                await release_local_selector(c.ns["a"], h)

    try:
        result = run(go())
    finally:
        run(c.a.flush())
        run(c.b.flush())
    print("\n" + result.format())
    assert result.not_up == []
    assert result.probe_ok
    assert sas(c, "a") == [] and sas(c, "b") == []
    assert routing_leftovers(c, "a") == [] and routing_leftovers(c, "b") == []


def test_charon_restart_reconcile_restores_path(chain: Chain) -> None:
    """A real charon restart: new TUN (routes into ipsec0 gone), no SAs; reconcile restores
    the path and the peer drops its stale IKE_SA (INITIAL_CONTACT)."""
    c = chain
    assert c.a is not None and c.b is not None
    path = make_path()
    try:
        run(install_both(c, path))
        assert c.ping(2)
        _kill(c.charons["a"])
        _start_charon(c, "a")

        async def restart() -> None:
            assert c.a is not None
            await c.a.close()
            c.a = StrongswanBackend("a", c.run_dir, c.ns["a"])
            await c.a.wait_ready()
            [st] = await c.a.reconcile([path])
            assert st.state is PathState.UP, f"{st}\n{charon_logs(c)}"

        run(restart())
        assert c.ping(3)
        assert len(sas(c, "a")) == 1 and child_names(c, "a") == [path.id]
        deadline = time.monotonic() + 5
        while len(sas(c, "b")) > 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(sas(c, "b")) == 1 and child_names(c, "b") == [path.id]
    finally:
        run(c.a.flush())
        run(c.b.flush())
    assert sas(c, "a") == [] and sas(c, "b") == []
    assert routing_leftovers(c, "a") == [] and routing_leftovers(c, "b") == []


def trap_policies(c: Chain, node: str) -> list[str]:
    """Names of the children charon has installed as trap policies."""
    import socket as s

    import vici

    sock = s.socket(s.AF_UNIX)
    sock.connect(str(vici_socket_path(c.run_dir, node)))
    try:
        return [v["child"].decode() for entry in vici.Session(sock).list_policies({"trap": "yes"})
                for v in entry.values()]
    finally:
        sock.close()


def wait_up(c: Chain, backend: StrongswanBackend, path_id: str, within: float = 15) -> PathState:
    """Poll a path's state until UP or ``within`` seconds passed (a bound, not a timing)."""
    deadline = time.monotonic() + within
    while True:
        st = run(backend.status(path_id)).state
        if st is PathState.UP or time.monotonic() > deadline:
            return st
        time.sleep(0.1)


def test_on_traffic_trap_first_packet_brings_path_up(chain: Chain) -> None:
    """Claim 5 with user-space ESP: an on-traffic path is a trap (no CHILD_SA, no IKE_SA)
    until the first packet; that packet makes the backend negotiate the CHILD_SA and the
    following ones are carried as ESP-in-UDP.  Then the other direction triggers too."""
    c = chain
    assert c.a is not None and c.b is not None
    path = make_path(on_traffic=True)
    pcap = c.run_dir / "core-a-trap.pcap"
    cap = subprocess.Popen(
        ["ip", "netns", "exec", c.ns["core"], "tcpdump", "-q", "-U", "--immediate-mode", "-n",
         "-i", "to-a", "-w", str(pcap)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    c.procs.append(cap)
    try:
        time.sleep(0.5)
        st_b = run(c.b.install(path.mirrored()))
        st_a = run(c.a.install(path))
        assert (st_a.state, st_b.state) == (PathState.TRAPPED, PathState.TRAPPED), f"{st_a}\n{st_b}"
        assert st_a.detail.get("start") == "on-traffic"
        # installed as a trap at both ends, nothing negotiated, nothing on the wire
        assert trap_policies(c, "a") == [path.id] and trap_policies(c, "b") == [path.id]
        time.sleep(1.0)
        assert sas(c, "a") == [] and sas(c, "b") == []
        assert c.a.acquires == 0 and c.b.acquires == 0
        # the first packet (from the MN side) brings the path up; the packet itself is lost
        c.ping(1)
        assert wait_up(c, c.a, path.id) is PathState.UP, charon_logs(c)
        assert c.a.acquires >= 1  # our acquire (libipsec's drop message) did it, not a retry
        assert child_names(c, "a") == [path.id] and child_names(c, "b") == [path.id]
        assert c.ping(3), f"ping after the trap fired failed\n{c.last_ping}"
        assert c.ping(2, src_ns="h2", dst=HOA), "ping CN -> MN failed"
        [st] = run(c.a.list())
        assert st.state is PathState.UP and st.packets_out >= 5 and st.packets_in >= 5
        # the CHILD_SA goes (e.g. DPD cleared it): the trap stays, the next packet from the
        # *correspondent's* side brings it up again through the other end's trap
        terminate(c, "a", conn_name(path))
        deadline = time.monotonic() + 5
        while child_names(c, "b") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert child_names(c, "a") == [] and child_names(c, "b") == []
        assert run(c.a.status(path.id)).state is PathState.TRAPPED
        assert trap_policies(c, "a") == [path.id] and trap_policies(c, "b") == [path.id]
        before_b = c.b.acquires
        c.ping(1, src_ns="h2", dst=HOA)
        assert wait_up(c, c.b, path.id) is PathState.UP, charon_logs(c)
        assert c.b.acquires > before_b
        assert c.ping(2, src_ns="h2", dst=HOA)
        assert c.ping(2)
        time.sleep(0.3)
    finally:
        _kill(cap)
        run(c.a.flush())
        run(c.b.flush())
    # on the link between the gateways: the carried traffic is ESP-in-UDP, never cleartext
    assert tshark_count(pcap, "esp && udp.port == 4500") >= 10
    assert tshark_count(pcap, f"ip.addr == {HOA} || ip.addr == {CN} || icmp") == 0
    assert sas(c, "a") == [] and sas(c, "b") == []
    assert trap_policies(c, "a") == [] and trap_policies(c, "b") == []
    assert routing_leftovers(c, "a") == [] and routing_leftovers(c, "b") == []


def nft_trap(c: Chain, node: str) -> str:
    return nsx(c.ns[node], "nft", "list", "table", "ip", "mipvpn-trap", check=False).stdout


def test_on_traffic_path_under_a_covering_sa_is_trapped_in_nftables(chain: Chain) -> None:
    """kernel-libipsec ranks every trap below any established SA (and ignores a child's fixed
    priority): an on-traffic path whose selectors overlap an up path's (an FA's home address ⇄
    any anchor to the HA vs. home address ⇄ correspondent to a dynamic CN-GW) never sees its
    first packet at charon's trap — measured: the ping went through the anchor and the trap
    stayed.  The backend traps such a path in nftables instead (NFLOG + drop on the way into
    ipsec0): the first packet is the acquire, the path comes up, and the correspondent's
    traffic never takes the anchor.  Whichever of the two paths is installed first."""
    c = chain
    assert c.a is not None and c.b is not None
    anchor = replace(make_path("mn1@home.example:1"), remote_ts=(ipaddress.IPv4Network("0.0.0.0/0"),))
    ro = replace(make_path("mn1@home.example:3", on_traffic=True),
                 remote=Endpoint(ipaddress.IPv4Address(GW_B2), EndpointType.CNGW_DYNAMIC))
    try:
        for order in ("trap first", "anchor first"):
            if order == "trap first":
                run(c.b.install(ro.mirrored()))
                assert run(c.a.install(ro)).state is PathState.TRAPPED
                assert trap_policies(c, "a") == [ro.id] and nft_trap(c, "a") == ""  # charon's trap
                run(install_both(c, anchor))
            else:
                run(install_both(c, anchor))
                run(c.b.install(ro.mirrored()))
                run(c.a.install(ro))
            st = run(c.a.status(ro.id))
            assert st.state is PathState.TRAPPED, f"{order}: {st}\n{charon_logs(c)}"
            assert st.detail["shadowed_by"] == anchor.id and st.detail["trap"] == "nftables"
            assert trap_policies(c, "a") == [] and "drop" in nft_trap(c, "a")
            assert child_names(c, "a") == [anchor.id]
            anchor_out = run(c.a.status(anchor.id)).packets_out
            c.ping(1)  # the first packet: logged and dropped, the path comes up
            assert wait_up(c, c.a, ro.id) is PathState.UP, f"{order}\n{charon_logs(c)}"
            assert c.ping(3), c.last_ping
            assert run(c.a.status(ro.id)).packets_out >= 3
            assert run(c.a.status(anchor.id)).packets_out == anchor_out  # nothing went the anchor's way
            assert nft_trap(c, "a") == ""  # the trap is gone with its path up
            run(c.a.flush())
            run(c.b.flush())
    finally:
        run(c.a.flush())
        run(c.b.flush())
    assert sas(c, "a") == [] and sas(c, "b") == [] and nft_trap(c, "a") == ""
    assert routing_leftovers(c, "a") == [] and routing_leftovers(c, "b") == []


def test_on_traffic_path_after_charon_restart(chain: Chain) -> None:
    """A charon restart with a trapped path: reconcile loads the trap again and the acquire
    watcher (which lost its VICI connection) follows the new charon: the first packet still
    brings the path up."""
    c = chain
    assert c.a is not None and c.b is not None
    path = make_path(on_traffic=True)
    try:
        run(c.b.install(path.mirrored()))
        assert run(c.a.install(path)).state is PathState.TRAPPED
        _kill(c.charons["a"])
        _start_charon(c, "a")

        async def restart() -> None:
            assert c.a is not None
            await c.a.wait_ready()  # the same backend object: its watcher reconnects
            [st] = await c.a.reconcile([path])
            assert st.state is PathState.TRAPPED, f"{st}\n{charon_logs(c)}"

        run(restart())
        assert trap_policies(c, "a") == [path.id] and sas(c, "a") == []
        before = c.a.acquires
        c.ping(1)
        assert wait_up(c, c.a, path.id) is PathState.UP, charon_logs(c)
        assert c.a.acquires > before
        assert c.ping(3)
    finally:
        run(c.a.flush())
        run(c.b.flush())
    assert sas(c, "a") == [] and sas(c, "b") == []
    assert routing_leftovers(c, "a") == [] and routing_leftovers(c, "b") == []


def test_on_traffic_switch_keeps_an_established_child_sa(chain: Chain) -> None:
    """The HA's shared tunnel flips between trapped and at-registration as users with other
    profiles come and go: a trapped path switched to at-registration comes up at once; switched
    back while up it keeps its CHILD_SA (same SPIs) and its trap is loaded again."""
    c = chain
    assert c.a is not None and c.b is not None
    trapped = make_path(on_traffic=True)
    now = replace(trapped, on_traffic=False)
    try:
        run(c.b.install(trapped.mirrored()))
        assert run(c.a.install(trapped)).state is PathState.TRAPPED
        acquires = c.a.acquires
        st = run(c.a.update(now))  # a user whose profile says at-registration joins
        assert st.state is PathState.UP, f"{st}\n{charon_logs(c)}"
        assert trap_policies(c, "a") == [] and c.a.acquires == acquires  # initiated, no packet
        spis = (st.spi_in, st.spi_out)
        st = run(c.a.update(trapped))  # ... and leaves again: the tunnel stays up
        assert st.state is PathState.UP and (st.spi_in, st.spi_out) == spis, st
        assert trap_policies(c, "a") == [trapped.id]
        assert child_names(c, "a") == [trapped.id]
        assert c.ping(2)
    finally:
        run(c.a.flush())
        run(c.b.flush())
    assert sas(c, "a") == [] and sas(c, "b") == []
    assert trap_policies(c, "a") == [] and trap_policies(c, "b") == []
    assert routing_leftovers(c, "a") == [] and routing_leftovers(c, "b") == []
