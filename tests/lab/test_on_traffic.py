"""Claim 5 in the lab: profiles with ``distribution = on_traffic`` — the paths toward the
correspondents are not set up at registration but by the first packet, and then carry the
traffic as ESP: HA⇄cngw (static gateway) by the MN's first packet to cn, FA⇄cngw2 (dynamic
gateway, route optimisation) by cn2's first packet to the MN.

The lab comes up with the default profiles (at registration); the test switches mn1's profiles
to on_traffic in the AAAH's database, sends the MN home (deregistration: the HA removes the
user's paths, the shared HA⇄CN-GW tunnel with its last user, and cngw2's binding) and back to
fa1 (a fresh registration through the AAAH, which builds the VPN info from the changed profiles).
"""

from __future__ import annotations

import json
import time

import pytest

from tests.conftest import LabEnv
from tests.lab.mipkit import binding_via, show, tshark, wait_for

pytestmark = pytest.mark.lab

NAI = "mn1@home.example"
HOA = "198.18.100.10"
CN, CN2 = "198.18.2.10", "198.18.3.10"
FA1 = "198.18.0.14"


def cngw_row(env: LabEnv, node: str = "ha") -> dict | None:
    """The HA⇄CN-GW tunnel as ``show paths`` at NODE (ha or cngw) reports it."""
    return path_row(env, node, "cngw-static" if node == "ha" else "ha")


def path_row(env: LabEnv, node: str, remote_type: str) -> dict | None:
    rows = show(env, "paths", node)
    return next((r for r in rows if r.get("remote_type") == remote_type), None)  # type: ignore[union-attr]


def up_row(env: LabEnv, node: str, remote_type: str):
    def check():
        row = path_row(env, node, remote_type)
        return row if row is not None and row["state"] == "up" else None
    return check


def test_on_traffic_profiles_set_the_correspondent_paths_up_at_the_first_packet(lab_up: LabEnv) -> None:
    env = lab_up
    db = ["--url", f"sqlite:///{env.run_dir / 'nodes' / 'aaah' / 'vpn.db'}"]
    wait_for(binding_via(env, FA1), timeout=15, what="binding via fa1")
    profiles = json.loads(env.cli("db", "profile", "list", NAI, "--json", *db).stdout)
    assert {p.get("gateway") for p in profiles} >= {"cngw", "cngw2"}, profiles
    for p in profiles:
        env.cli("db", "profile", "update", NAI, str(p["id"]), "--distribution", "on_traffic", *db)

    # home (deregistration: the HA drops mn1's paths, the HA⇄CN-GW tunnel with its last user)
    env.cli("lab", "move", "mn1", "ha")
    wait_for(lambda: show(env, "bindings", "ha") == [], timeout=15, what="binding gone")
    wait_for(lambda: cngw_row(env) is None, timeout=15, what="HA's CN-GW path removed")
    wait_for(lambda: path_row(env, "cngw2", "fa") is None, timeout=15, what="cngw2's path removed")
    # back to fa1: a fresh registration through the AAAH, with the on-traffic profile
    env.cli("lab", "move", "mn1", "fa1")
    wait_for(binding_via(env, FA1), timeout=15, what="binding via fa1 again")
    row = wait_for(lambda: cngw_row(env), timeout=15, what="HA's CN-GW path installed")
    time.sleep(1.0)  # let anything that would bring the path up at registration happen
    row = cngw_row(env)
    assert row is not None and row["state"] == "trapped", row
    assert row.get("spi_out") is None and row.get("detail", {}).get("start") == "on-traffic", row
    cngw = cngw_row(env, "cngw")
    assert cngw is not None and cngw["state"] != "up", cngw  # no CHILD_SA at the CN-GW either
    # the FA⇄HA path is the MN's anchor: up at registration as always
    fa_rows = [r for r in show(env, "paths", "fa1") if r["remote_type"] == "ha"]  # type: ignore[index]
    assert [r["state"] for r in fa_rows] == ["up"], fa_rows
    # route optimisation: FA⇄cngw2 trapped at both ends (at fa1 under the FA⇄HA path, which
    # covers it, in nftables: see daemons.vpn.strongswan.traps)
    ro_fa = wait_for(lambda: path_row(env, "fa1", "cngw-dynamic"), timeout=15, what="fa1's cngw2 path")
    ro_gw = wait_for(lambda: path_row(env, "cngw2", "fa"), timeout=15, what="cngw2's path (Binding Update)")
    assert (ro_fa["state"], ro_gw["state"]) == ("trapped", "trapped"), (ro_fa, ro_gw)

    # the correspondent's first packet (claim 5's wording) brings the route-optimised path up
    env.exec("cn2", "ping", "-c", "1", "-W", "1", HOA, check=False)
    wait_for(up_row(env, "cngw2", "fa"), timeout=15, what="cngw2's path up after cn2's first packet")
    wait_for(up_row(env, "fa1", "cngw-dynamic"), timeout=15, what="fa1's cngw2 path up")
    env.exec("cn2", "ping", "-c", "3", "-i", "0.2", "-W", "2", HOA)
    env.exec("mn1", "ping", "-c", "3", "-i", "0.2", "-W", "2", CN2)
    assert cngw_row(env)["state"] == "trapped"  # type: ignore[index]  # the other path: still waiting

    # the first packet for the correspondent brings the path up (that packet is lost) ...
    env.exec("mn1", "ping", "-c", "1", "-W", "1", CN, check=False)
    row = wait_for(up_row(env, "ha", "cngw-static"), timeout=15, what="HA's CN-GW path up after the first packet")
    assert row["detail"]["start"] == "on-traffic"
    # ... and it carries the traffic, both ways
    env.exec("mn1", "ping", "-c", "3", "-i", "0.2", "-W", "2", CN)
    env.exec("cn", "ping", "-c", "3", "-i", "0.2", "-W", "2", HOA)
    assert cngw_row(env, "cngw")["state"] == "up"  # type: ignore[index]
    row = cngw_row(env)
    assert row["packets_out"] >= 6 and row["packets_in"] >= 6, row  # type: ignore[index]

    env.cli("lab", "capture", "stop")
    captures = env.run_dir / "captures"
    # on the CN-GW's core link: ESP (in UDP 4500 with user-space ESP), never the MN's packets in clear
    clear = tshark(captures / "core-cngw.pcap", "-Y", f"icmp && ip.addr == {HOA}", "-T", "fields",
                   "-e", "frame.number").split()
    assert clear == [], "cleartext MN traffic on core-cngw"
    esp = tshark(captures / "core-cngw.pcap", "-Y", "esp", "-T", "fields", "-e", "esp.spi").split()
    assert len(esp) >= 12, esp
    clear = tshark(captures / "core-cngw2.pcap", "-Y", f"icmp && ip.addr == {HOA}", "-T", "fields",
                   "-e", "frame.number").split()
    assert clear == [], "cleartext MN traffic on core-cngw2"
    esp = tshark(captures / "core-cngw2.pcap", "-Y", "esp", "-T", "fields", "-e", "esp.spi").split()
    assert len(esp) >= 12, esp  # 3 + 3 echo requests and their replies
