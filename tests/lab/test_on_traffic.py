"""Claim 5 in the lab: a profile with ``distribution = on_traffic`` — the path toward the
correspondent (HA⇄CN-GW, static gateway) is not set up at registration but by the first packet
for the correspondent, and then carries the traffic as ESP.

The lab comes up with the default profiles (at registration); the test switches mn1's profiles
through the static CN-GW to on_traffic in the AAAH's database, sends the MN home (deregistration:
the HA removes the user's paths, the shared HA⇄CN-GW tunnel with its last user) and back to fa1
(a fresh registration through the AAAH, which builds the VPN info from the changed profile).
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
CN = "198.18.2.10"
FA1 = "198.18.0.14"


def cngw_row(env: LabEnv, node: str = "ha") -> dict | None:
    """The HA⇄CN-GW tunnel as ``show paths`` at NODE (ha or cngw) reports it."""
    far = "cngw-static" if node == "ha" else "ha"
    rows = show(env, "paths", node)
    return next((r for r in rows if r.get("remote_type") == far), None)  # type: ignore[union-attr]


def test_on_traffic_profile_sets_the_cngw_path_up_at_the_first_packet(lab_up: LabEnv) -> None:
    env = lab_up
    db = ["--url", f"sqlite:///{env.run_dir / 'nodes' / 'aaah' / 'vpn.db'}"]
    wait_for(binding_via(env, FA1), timeout=15, what="binding via fa1")
    profiles = json.loads(env.cli("db", "profile", "list", NAI, "--json", *db).stdout)
    static = [p for p in profiles if p.get("gateway") == "cngw"]
    assert static, profiles
    for p in static:
        env.cli("db", "profile", "update", NAI, str(p["id"]), "--distribution", "on_traffic", *db)

    # home (deregistration: the HA drops mn1's paths, the HA⇄CN-GW tunnel with its last user)
    env.cli("lab", "move", "mn1", "ha")
    wait_for(lambda: show(env, "bindings", "ha") == [], timeout=15, what="binding gone")
    wait_for(lambda: cngw_row(env) is None, timeout=15, what="HA's CN-GW path removed")
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

    # the first packet for the correspondent brings the path up (that packet is lost) ...
    env.exec("mn1", "ping", "-c", "1", "-W", "1", CN, check=False)
    row = wait_for(lambda: (r := cngw_row(env)) and r["state"] == "up" and r, timeout=15,
                   what="HA's CN-GW path up after the first packet")
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
