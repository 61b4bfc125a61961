"""The whole default lab on the xfrm backend (kernel ESP), daemons included: on a stock
kernel `auto` picks xfrm, so this is what a user's `make lab` runs. F1 (cn <-> mn1 through
fa1 ==ESP== ha ==ESP== cngw), route optimisation (cn2 through fa1 ==ESP== cngw2), and the
paths following the MN across an intra- and an inter-domain move, with the kernel's SAs
counting the traffic. The first move runs under a ping from the MN with the new FA's core
link captured: VPN-only access, nothing of the MN leaves that FA in clear while it registers
(tshark reads the capture)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from daemons.provision.configs import control_socket
from daemons.runtime import control
from lab.lab import Lab
from tests.conftest import LabEnv
from tests.lab.mipkit import wait_for

HOA, CN, CN2 = "198.18.100.10", "198.18.2.10", "198.18.3.10"
COA = {"fa1": "198.18.0.14", "fa2": "198.18.0.18", "fa3": "198.18.0.26"}


def ping(env: LabEnv, src: str, dst: str) -> bool:
    return env.exec(src, "ping", "-c", "1", "-W", "2", dst, check=False, timeout=60).returncode == 0


def esp_packets(env: LabEnv, node: str) -> int:
    """Packets the node's kernel ESP SAs have carried (``ip -s xfrm state``: "N(packets)")."""
    out = env.exec(node, "ip", "-s", "xfrm", "state", timeout=60).stdout
    return sum(int(n) for n in re.findall(r"(\d+)\(packets\)", out))


def bound_via(env: LabEnv, coa: str) -> bool:
    """The HA's binding for mn1 names ``coa`` (asked in-process: every CLI call is a Python
    start, which costs seconds under emulation)."""
    try:
        rows = control.call(control_socket(env.run_dir, "ha"), "bindings")
    except control.ControlUnavailable:
        return False
    return any(b["care_of_address"] == coa for b in rows)


def cngw2_path_to(env: LabEnv, coa: str) -> bool:
    """cngw2 holds exactly one path for mn1, to ``coa``, and it is up."""
    rows = [p for p in control.call(control_socket(env.run_dir, "cngw2"), "paths") if "mn1" in p["users"]]
    return [(p["remote"], p["state"]) for p in rows] == [(coa, "up")]


def tshark_rows(pcap: Path, display_filter: str) -> list[tuple[str, str]]:
    """(ip.src of every IP header, frame.protocols) of the packets ``display_filter`` keeps."""
    proc = subprocess.run(["tshark", "-n", "-r", str(pcap), "-Y", display_filter, "-T", "fields",
                           "-e", "ip.src", "-e", "frame.protocols"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return [(src, protocols) for src, protocols in (line.split("\t") for line in proc.stdout.splitlines())]


# Runs in mn1: a UDP datagram to the discard port every 10 ms whatever happens (each send looks
# the route up again: from the moment the MN takes the new FA as its router, they go there).
SENDER = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sent = 0
print("ready", flush=True)
try:
    while True:
        try:
            s.sendto(b"mipvpn-guard-probe", (sys.argv[1], 9))
            sent += 1
        except OSError:
            pass
        time.sleep(0.01)
except KeyboardInterrupt:
    print(f"{sent} sent")
"""


def move_under_ping(env: LabEnv, lab: Lab, fa: str) -> None:
    """Move mn1 to ``fa`` while it sends to cn every 10 ms from before the move on (its first
    packets reach ``fa`` with its registration request: the MN takes the FA as its router
    first), with ``fa``'s core link captured from before the move until a ping passes: not one
    packet from the MN's home address leaves ``fa`` in clear, its traffic leaves in ESP once
    the path is up."""
    pcap = env.run_dir / f"guard-{fa}-core.pcap"
    # -Q out: what fa sends on the link. An inbound ESP packet, once decrypted, is seen on the
    # interface a second time in clear (xfrm re-injects it there): not on the wire, not sent.
    capture = subprocess.Popen(["ip", "netns", "exec", env.ns(fa), "tcpdump", "-i", "core", "-Q", "out", "-n",
                                "-s", "0", "-U", "--immediate-mode", "-Z", "root", "-w", str(pcap)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pinger: subprocess.Popen[str] | None = None
    out = ""
    try:
        wait_for(lambda: pcap.exists() and pcap.stat().st_size >= 24, timeout=120, interval=0.2,
                 what=f"capture on {fa}'s core link")
        # Not ping: it holds back its next request while earlier ones go unanswered (during
        # the move), which would leave the window before the path untested.
        pinger = subprocess.Popen(["ip", "netns", "exec", env.ns("mn1"), sys.executable, "-S", "-c", SENDER,
                                   CN], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert pinger.stdout is not None and pinger.stdout.readline().strip() == "ready"
        time.sleep(0.5)
        lab.move("mn1", fa)
        wait_for(lambda: bound_via(env, COA[fa]), timeout=300, interval=0.5, what=f"binding via {fa}")
        wait_for(lambda: ping(env, "mn1", CN), timeout=180, interval=1, what=f"ping mn1 -> cn at {fa}")
        time.sleep(2)
    finally:
        if pinger is not None:
            pinger.send_signal(signal.SIGINT)
            out = pinger.communicate(timeout=60)[0]
        capture.send_signal(signal.SIGINT)
        capture.wait(timeout=60)
    rows = tshark_rows(pcap, f"ip.src == {HOA} || (esp && ip.src == {COA[fa]})")
    # The outer source (an ICMP error quoting the MN's datagram names HOA inside, too).
    clear = [row for row in rows if row[0].split(",")[0] == HOA]
    assert not clear, f"{len(clear)} packets of mn1 left {fa} in clear, e.g. {clear[:5]}"
    assert any("esp" in protocols.split(":") for _, protocols in rows), f"no ESP from {fa} on its core link"
    assert re.search(r"[1-9]\d* sent", out), out[-500:]


def test_lab_on_xfrm_carries_and_follows_moves(lab_env: LabEnv) -> None:
    lab_env.env["MIPVPN_HEALTH_TIMEOUT"] = "600"  # Python under TCG emulation starts slowly
    up = lab_env.cli("lab", "up", "--backend", "xfrm", timeout=900)
    assert "backend xfrm" in up.stdout, up.stdout
    wait_for(lambda: bound_via(lab_env, COA["fa1"]), timeout=300, interval=0.5, what="binding via fa1")
    wait_for(lambda: ping(lab_env, "cn", HOA), timeout=180, interval=1, what="ping cn -> mn1 (HA-anchored)")
    wait_for(lambda: ping(lab_env, "mn1", CN2), timeout=180, interval=1, what="ping mn1 -> cn2 (route optimised)")
    for node in ("fa1", "ha", "cngw", "cngw2"):
        assert esp_packets(lab_env, node) > 0, node
    lab = Lab.open(lab_env.run_dir)
    for fa in ("fa2", "fa3", "fa1"):  # intra-domain (F2), inter-domain (F3), back
        if fa == "fa2":
            move_under_ping(lab_env, lab, fa)  # VPN-only access at the FA the MN moves to
        else:
            lab.move("mn1", fa)
        wait_for(lambda coa=COA[fa]: bound_via(lab_env, coa), timeout=300, interval=0.5, what=f"binding via {fa}")
        wait_for(lambda: ping(lab_env, "cn", HOA), timeout=180, interval=1, what=f"ping cn -> mn1 at {fa}")
        # The route-optimised path moved too (a ping to cn2 alone would also pass via the HA).
        wait_for(lambda coa=COA[fa]: cngw2_path_to(lab_env, coa), timeout=180, interval=0.5,
                 what=f"cngw2's path to {fa}")
        wait_for(lambda: ping(lab_env, "cn2", HOA), timeout=180, interval=1, what=f"ping cn2 -> mn1 at {fa}")
        assert esp_packets(lab_env, fa) > 0
