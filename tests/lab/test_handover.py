"""Handover (claims 7, 17, 18): the VPN follows the MN. F2 intra-domain (the AAAF answers,
the RRQ goes to the HA directly), F3 inter-domain (through the new domain's AAAF to the
AAAH), and nothing stale anywhere afterwards."""

from __future__ import annotations

import subprocess
import time

import pytest

from tests.conftest import LabEnv
from tests.lab.mipkit import binding_via, show, tshark, wait_for

pytestmark = pytest.mark.lab

HOA = "198.18.100.10"
HA = "198.18.100.1"
AAAF2 = "198.18.0.22"
COA = {"fa1": "198.18.0.14", "fa2": "198.18.0.18", "fa3": "198.18.0.26"}


def ping_ok(env: LabEnv) -> bool:
    return env.exec("cn", "ping", "-c", "1", "-W", "1", HOA, check=False).returncode == 0


def amr_sessions(pcap) -> list[str]:
    return tshark(pcap, "-Y", "diameter.cmd.code == 260 && diameter.flags.request == 1", "-T", "fields",
                  "-e", "diameter.Session-Id").split()


def test_moves_f2_f3_and_back_leave_nothing_stale(lab_up: LabEnv) -> None:
    wait_for(binding_via(lab_up, COA["fa1"]), timeout=15, what="binding via fa1")
    wait_for(lambda: ping_ok(lab_up), timeout=15, what="ping cn -> mn1 through the VPN")
    # A background ping across all moves; it must resume after each one.
    probe = subprocess.Popen(["ip", "netns", "exec", lab_up.ns("cn"), "ping", "-i", "0.05", "-W", "1", HOA],
                             stdout=subprocess.PIPE, text=True)
    try:
        for fa in ("fa2", "fa3", "fa1"):
            lab_up.cli("lab", "move", "mn1", fa)
            wait_for(binding_via(lab_up, COA[fa]), timeout=15, what=f"binding via {fa}")
            wait_for(lambda: ping_ok(lab_up), timeout=15, what=f"ping resumes at {fa}")
            time.sleep(0.5)
    finally:
        probe.terminate()
        probe.communicate(timeout=5)
    lab_up.cli("lab", "capture", "stop")
    captures = lab_up.run_dir / "captures"

    # F2 (fa1 -> fa2, both in visit-a): aaaf1 answered itself, no AMR from fa2 reached the AAAH,
    # and fa2 sent the RRQ to the HA directly (UDP 434, FA-HA authenticated).
    assert any("fa2.visit-a.example" in s for s in amr_sessions(captures / "core-fa2.pcap"))
    assert not any("fa2.visit-a.example" in s for s in amr_sessions(captures / "core-aaah.pcap"))
    direct = tshark(captures / "core-fa2.pcap", "-Y", f"mip.type == 1 && ip.dst == {HA}", "-T", "fields",
                    "-e", "mip.coa", "-e", "mip.ext.type").splitlines()
    assert direct and direct[0].startswith(COA["fa2"]) and direct[0].endswith(",34")
    # F3 (fa2 -> fa3, into visit-b): the AMR went through aaaf2 to the AAAH.
    assert any("fa3.visit-b.example" in s for s in amr_sessions(captures / "core-aaaf2.pcap"))
    # At the AAAH it arrives from aaaf2's address, with the Route-Record aaaf2 added (RFC 6733
    # §6.1.8: the identity of the peer it came from, fa3).
    reaching = tshark(captures / "core-aaah.pcap", "-Y", "diameter.cmd.code == 260 && diameter.flags.request == 1",
                      "-T", "fields", "-e", "ip.src", "-e", "diameter.Session-Id", "-e", "diameter.Route-Record")
    assert f"{AAAF2}\t" in reaching and "fa3.visit-b.example" in reaching, reaching
    assert any(r.startswith(f"{AAAF2}\tfa3.visit-b.example") and r.endswith("\tfa3.visit-b.example")
               for r in reaching.splitlines()), reaching

    # Nothing stale: only fa1 has the visitor and a path; the HA's FA path points at fa1;
    # only aaaf1 caches a session, at fa1.
    def leftovers() -> dict:
        found = {f"{what}@{fa}": show(lab_up, what, fa) for fa in ("fa2", "fa3") for what in ("visitors", "paths")}
        found["sessions@aaaf2"] = show(lab_up, "sessions", "aaaf2")
        return {k: v for k, v in found.items() if v}

    # An old FA keeps its smooth-handoff forwarding path for the Binding Update's lifetime
    # (forwarding_lifetime, 10 s) after the last move.
    deadline = time.monotonic() + 25
    while (left := leftovers()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left == {}, "stale state after the moves"
    assert [v["home_address"] for v in show(lab_up, "visitors", "fa1")] == [HOA]  # type: ignore[index]
    ha_paths = show(lab_up, "paths", "ha")
    fa_paths = [p for p in ha_paths if p["remote_type"] == "fa"]  # type: ignore[index,union-attr]
    assert [p["remote"] for p in fa_paths] == [COA["fa1"]], ha_paths
    sessions = show(lab_up, "sessions", "aaaf1")
    assert [(s["mn"], s["fa"]) for s in sessions] == [("mn1@home.example", COA["fa1"])]  # type: ignore[index]
    assert [b["care_of_address"] for b in show(lab_up, "bindings", "ha")] == [COA["fa1"]]  # type: ignore[index]
