"""The namespace lab: reachability, moves, captures, supervision and clean teardown."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from daemons.provision.kinds import load_topology
from tests.conftest import LabEnv, leftover_namespaces

pytestmark = pytest.mark.lab

TOPOLOGY = load_topology()
ROUTED = [n.name for n in TOPOLOGY.nodes.values() if n.role != "mn"]


def one_address(node: str) -> str:
    return str(TOPOLOGY.addresses(node)[0][1].ip)


def status(env: LabEnv) -> dict:
    return json.loads(env.cli("lab", "status", "--json").stdout)


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


def test_every_node_reaches_every_other(lab_up: LabEnv) -> None:
    failures = []
    for src in ROUTED:
        for dst in ROUTED:
            if src == dst:
                continue
            proc = lab_up.exec(src, "ping", "-c", "1", "-W", "1", one_address(dst), check=False)
            if proc.returncode != 0:
                failures.append(f"{src} -> {dst} ({one_address(dst)})")
    assert not failures, "unreachable: " + ", ".join(failures)


def test_status_shows_all_nodes_up(lab_up: LabEnv) -> None:
    info = status(lab_up)
    assert info["supervisor"] is True
    assert {n["name"] for n in info["nodes"]} == set(TOPOLOGY.nodes)
    assert all(n["up"] for n in info["nodes"])
    ha = next(n for n in info["nodes"] if n["name"] == "ha")
    assert ha["addresses"]["access"] == ["198.18.100.1/24"]
    assert info["attachments"] == {"mn1": "fa1"}


def carrier_changes(env: LabEnv) -> int:
    return int(env.exec("mn1", "cat", "/sys/class/net/eth0/carrier_changes").stdout)


def bridge_ports(env: LabEnv, owner: str) -> list[str]:
    out = env.exec(owner, "ip", "-j", "link", "show", "master", "access").stdout
    return sorted(link["ifname"] for link in json.loads(out or "[]"))


def test_move_is_a_real_l2_detach_attach(lab_up: LabEnv) -> None:
    assert bridge_ports(lab_up, "fa1") == ["mn1"]
    # Watch the MN's link from inside its namespace: carrier must go down, then up again.
    monitor = subprocess.Popen(["ip", "-n", lab_up.ns("mn1"), "-o", "monitor", "link"],
                               stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.2)
        previous = "fa1"
        for target in ("fa2", "fa3", "fa1"):
            before = carrier_changes(lab_up)
            out = lab_up.cli("lab", "move", "mn1", target).stdout
            assert f"{previous} -> {target}" in out
            assert carrier_changes(lab_up) >= before + 2  # one down, one up
            assert lab_up.exec("mn1", "cat", "/sys/class/net/eth0/carrier").stdout.strip() == "1"
            assert bridge_ports(lab_up, target) == ["mn1"]
            assert bridge_ports(lab_up, previous) == []
            previous = target
    finally:
        monitor.terminate()
        events = monitor.communicate(timeout=5)[0]
    downs = [e for e in events.splitlines() if "eth0" in e and "NO-CARRIER" in e]
    ups = [e for e in events.splitlines() if "eth0" in e and "LOWER_UP" in e]
    assert len(downs) >= 3 and len(ups) >= 3, events
    assert status(lab_up)["attachments"] == {"mn1": "fa1"}


def test_capture_sees_pings_on_the_path(lab_up: LabEnv) -> None:
    lab_up.exec("fa1", "ping", "-c", "3", "-i", "0.2", "198.18.2.10")
    lab_up.cli("lab", "capture", "stop")
    captures = lab_up.run_dir / "captures"
    for link in ("core-fa1", "core-cngw", "cngw-cn"):
        out = subprocess.run(
            ["tshark", "-r", str(captures / f"{link}.pcap"), "-Y",
             "icmp.type == 8 && ip.src == 198.18.0.14 && ip.dst == 198.18.2.10",
             "-T", "fields", "-e", "icmp.seq"],
            capture_output=True, text=True, check=True).stdout.split()
        assert out == ["1", "2", "3"], f"{link}: {out}"


def test_supervisor_restarts_a_dead_process(lab_up: LabEnv) -> None:
    from lab.lab import Lab

    the_lab = Lab.open(lab_up.run_dir)
    pid = the_lab.start_process("probe:sleeper", "cn", ["sleep", "300"])
    os.kill(pid, signal.SIGKILL)

    def restarted():
        procs = {p["name"]: p for p in the_lab.processes()}
        p = procs["probe:sleeper"]
        return p if p["running"] and p["pid"] != pid else None

    proc = wait_for(restarted)
    assert proc["restarts"] == 1
    # The restarted process runs inside the node's namespace.
    assert os.stat(f"/proc/{proc['pid']}/ns/net").st_ino == \
        os.stat(f"/run/netns/{lab_up.ns('cn')}").st_ino


def test_up_twice_is_harmless(lab_up: LabEnv) -> None:
    pids_before = {p["name"]: p["pid"] for n in status(lab_up)["nodes"] for p in n["processes"]}
    out = lab_up.cli("lab", "up").stdout
    assert "already up" in out
    pids_after = {p["name"]: p["pid"] for n in status(lab_up)["nodes"] for p in n["processes"]}
    assert pids_after == pids_before


def test_down_leaves_nothing_even_after_a_crash(lab_env: LabEnv) -> None:
    lab_env.cli("lab", "up", "--capture")
    the_pids = [json.loads(p.read_text()) for p in (lab_env.run_dir / "pids").glob("*.json")]
    assert the_pids
    # Crash the supervisor: its children (tcpdumps) survive it and must still be cleaned up.
    sup = json.loads((lab_env.run_dir / "supervisor.pid").read_text())
    os.kill(sup["pid"], signal.SIGKILL)
    wait_for(lambda: not Path(f"/proc/{sup['pid']}").exists() or
             "Z" in Path(f"/proc/{sup['pid']}/stat").read_text().split(")")[1][:3])
    out = lab_env.cli("lab", "down").stdout
    assert f"removed {len(TOPOLOGY.nodes)} namespaces" in out
    assert leftover_namespaces(lab_env.prefix) == []
    assert not lab_env.run_dir.exists()
    from lab.supervisor import is_same_process

    assert not any(is_same_process(r) for r in the_pids)
    # And once more: idempotent.
    assert "no lab was up" in lab_env.cli("lab", "down").stdout


def test_half_built_lab_is_cleaned_by_down_and_up(lab_env: LabEnv) -> None:
    from lab.lab import Lab

    half = Lab(lab_env.run_dir, TOPOLOGY, lab_env.prefix)
    half.save_state("building")
    subprocess.run(["ip", "netns", "add", lab_env.ns("core")], check=True)
    subprocess.run(["ip", "netns", "add", lab_env.ns("ha")], check=True)
    out = lab_env.cli("lab", "up").stdout
    assert "cleaning up" in out
    info = status(lab_env)
    assert info["supervisor"] is True
    assert {n["name"] for n in info["nodes"]} == set(TOPOLOGY.nodes) and all(n["up"] for n in info["nodes"])
    # Rebuilt, not the stale empty namespaces: core has its links again.
    core = next(n for n in info["nodes"] if n["name"] == "core")
    assert core["addresses"]["ha"] == ["198.18.0.1/30"]


def test_up_beside_another_lab_with_the_same_prefix_touches_nothing(lab_up: LabEnv, tmp_path: Path) -> None:
    other = LabEnv(tmp_path / "other-run", lab_up.prefix)
    proc = other.cli("lab", "up", check=False)
    assert proc.returncode != 0 and "already exists" in proc.stderr, proc.stderr
    assert not other.run_dir.exists()
    # The first lab is untouched.
    assert all(n["up"] for n in status(lab_up)["nodes"])
    assert status(lab_up)["supervisor"] is True


def test_daemon_state_is_private(lab_up: LabEnv) -> None:
    """State directories (keys in vpn.db, visitors, bindings) are 0700, their files 0600 (the
    databases, their -wal and -shm)."""
    visitors = lab_up.run_dir / "nodes" / "fa1" / "state" / "visitors.db"
    deadline = time.monotonic() + 15
    while not visitors.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    states = sorted((lab_up.run_dir / "nodes").glob("*/state"))
    assert states, "no daemon state directories"
    for state in states:
        assert stat.S_IMODE(state.stat().st_mode) == 0o700, state
        for f in state.iterdir():
            assert stat.S_IMODE(f.stat().st_mode) & 0o077 == 0, f
