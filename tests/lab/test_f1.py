"""Flow F1 (claim 16): registration through FA → AAAF → AAAH → HA distributes the VPN
information, every apparatus installs real IPsec paths, and MN ⇄ CN traffic is ESP on
every leg."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from daemons.provision.configs import control_socket
from daemons.runtime import control
from daemons.runtime.config import SecurityAssociation
from daemons.runtime.secret import Secret
from daemons.wire import mip
from lab.lab import Lab
from tests.conftest import LabEnv
from tests.lab.mipkit import binding_via, expert_problems, heard_advertisement, send_udp, show, tshark, wait_for

pytestmark = pytest.mark.lab

HOA = "198.18.100.10"
CN = "198.18.2.10"
FA1 = "198.18.0.14"
FA1_ACCESS = "198.18.101.1"


def paths_up(env: LabEnv, node: str, count: int):
    def check():
        rows = show(env, "paths", node)
        up = [r for r in rows if r.get("state") == "up"]  # type: ignore[union-attr]
        return rows if len(up) >= count else None
    return check


def test_f1_registration_installs_esp_paths_and_traffic_flows(lab_up: LabEnv) -> None:
    wait_for(binding_via(lab_up, FA1), timeout=15, what="binding via fa1")
    # Paths: FA⇄HA at the FA; FA⇄HA and HA⇄CN-GW at the HA; the static tunnel at the CN-GW.
    wait_for(paths_up(lab_up, "fa1", 1), timeout=15, what="fa1 path up")
    wait_for(paths_up(lab_up, "ha", 2), timeout=15, what="ha paths up")
    wait_for(paths_up(lab_up, "cngw", 1), timeout=15, what="cngw path up")
    lab_up.exec("mn1", "ping", "-c", "3", "-i", "0.2", "-W", "2", CN)
    lab_up.exec("cn", "ping", "-c", "3", "-i", "0.2", "-W", "2", HOA)
    sessions = show(lab_up, "sessions", "aaah")
    assert [s["mn"] for s in sessions] == ["mn1@home.example"]  # type: ignore[index]
    lab_up.cli("lab", "capture", "stop")
    captures = lab_up.run_dir / "captures"

    # The user's traffic is ESP (in UDP 4500, user-space ESP) on the FA-core, core-HA and
    # core-CN-GW legs: the inner addresses never show in clear there.
    for link in ("core-fa1", "core-ha", "core-cngw"):
        clear = tshark(captures / f"{link}.pcap", "-Y", f"icmp && ip.addr == {HOA}", "-T", "fields",
                       "-e", "frame.number")
        assert clear.split() == [], f"cleartext MN traffic on {link}"
        esp = tshark(captures / f"{link}.pcap", "-Y", "esp", "-T", "fields", "-e", "esp.spi").split()
        assert len(esp) >= 6, f"no ESP on {link}"
    # ...and in clear where it must be: on the access link and the CN's LAN.
    for link in ("fa1-access", "cngw-cn"):
        clear = tshark(captures / f"{link}.pcap", "-Y", f"icmp && ip.addr == {HOA}", "-T", "fields",
                       "-e", "icmp.type").split()
        assert clear.count("8") >= 6 and clear.count("0") >= 6, link

    # Diameter as tshark sees it: AMR/AMA between FA, AAAF and AAAH; HAR/HAA to the HA.
    def commands(link: str) -> set[tuple[str, str]]:
        out = tshark(captures / f"{link}.pcap", "-Y", "diameter", "-T", "fields", "-e", "diameter.cmd.code",
                     "-e", "diameter.flags.request", "-e", "diameter.applicationId")
        return {tuple(line.split("\t")[:2]) for line in out.splitlines() if line.split("\t")[2:3] == ["2"]}

    assert {("260", "1"), ("260", "0")} <= commands("core-fa1")
    assert {("260", "1"), ("260", "0")} <= commands("core-aaaf1")
    assert {("260", "1"), ("260", "0"), ("262", "1"), ("262", "0")} <= commands("core-aaah")
    assert {("262", "1"), ("262", "0")} <= commands("core-ha")
    for link in ("core-fa1", "core-aaaf1", "core-aaah", "core-ha"):
        problems = [p for p in expert_problems(captures / f"{link}.pcap") if "Unknown AVP" not in p
                    and "Undecoded" not in p]
        assert problems == [], (link, problems)
    # The RFC 4004 AVPs are there by name.
    avps = tshark(captures / "core-aaah.pcap", "-Y", "diameter.cmd.code == 260", "-V")
    for name in ("MIP-Reg-Request", "MIP-MN-AAA-Auth", "MIP-FA-Challenge", "User-Name", "MIP-Reg-Reply"):
        assert name in avps, name

    # ...and all of it over TLS 1.3 (RFC 6733 §13), decoded above only with the lab's key logs: as
    # anyone on the wire sees it, TLS records on 5658 and not one Diameter message, nothing on 3868.
    for link in ("core-fa1", "core-aaaf1", "core-aaah", "core-ha"):
        pcap = captures / f"{link}.pcap"
        assert tshark(pcap, "-Y", "diameter || tcp.port == 3868", "-T", "fields", "-e", "frame.number",
                      keys=False).split() == [], link
        hellos = tshark(pcap, "-Y", "tls.handshake.type == 2", "-T", "fields",
                        "-e", "tls.handshake.extensions.supported_version", keys=False).split()
        assert hellos and set(hellos) == {"0x0304"}, (link, hellos)  # ServerHello: TLS 1.3
        records = tshark(pcap, "-Y", "tls.app_data && tcp.port == 5658", "-T", "fields", "-e", "tls.record.version",
                         keys=False).split()
        assert len(records) >= 4, link
    def tls_of_peers(node: str) -> dict[str, str]:
        return {p["peer"]: p["tls"] for p in control.call(control_socket(lab_up.run_dir, node), "peers")}

    assert tls_of_peers("aaah") == {"aaaf1.visit-a.example": "TLSv1.3", "aaaf2.visit-b.example": "TLSv1.3",
                                    "ha.home.example": "TLSv1.3"}
    assert tls_of_peers("aaaf1") == {"aaah.home.example": "TLSv1.3", "fa1.visit-a.example": "TLSv1.3",
                                     "fa2.visit-a.example": "TLSv1.3"}


def test_bad_mn_aaa_secret_is_refused_and_nothing_is_installed(lab_up: LabEnv) -> None:
    wait_for(binding_via(lab_up, FA1), timeout=15, what="binding via fa1")
    before = {node: show(lab_up, "paths", node) for node in ("fa1", "ha")}
    # A request through fa1 as mn1 with a fresh challenge but a wrong MN-AAA secret.
    adv_challenge = heard_advertisement(lab_up, "mn1").challenge
    assert adv_challenge
    rrq = mip.registration_request(home_address=HOA, home_agent="198.18.100.1", care_of_address=FA1,
                                   identification=mip.ntp_identification(time.time()), lifetime=60,
                                   nai="mn1@home.example", mn_ha=SecurityAssociation(0x1000, Secret(b"x" * 16)),
                                   challenge=adv_challenge,
                                   mn_aaa=SecurityAssociation(0x3000, Secret(b"wrong secret 123")))
    reply = mip.decode_message(send_udp(lab_up, "mn1", FA1_ACCESS, rrq.encode(), wait=6))
    assert isinstance(reply, mip.RegistrationReply)
    assert reply.code == mip.ReplyCode.FA_MN_FAILED_AUTHENTICATION
    assert {node: show(lab_up, "paths", node) for node in ("fa1", "ha")} == before
    assert [b["care_of_address"] for b in show(lab_up, "bindings", "ha")] == [FA1]  # type: ignore[index]


def test_aaah_down_gives_the_mn_an_answer_in_bounded_time(lab_up: LabEnv) -> None:
    wait_for(binding_via(lab_up, FA1), timeout=15, what="binding via fa1")
    Lab.open(lab_up.run_dir).stop_process("daemon:aaah")
    started = time.monotonic()
    # Into the other domain (an intra-domain move would be answered by the local AAAF alone).
    lab_up.cli("lab", "move", "mn1", "fa3")
    # The MN hears a denial from fa3 (not silence), and fa3 holds no visitor or path.
    wait_for(lambda: show(lab_up, "registration", "mn1")["last_code"] not in (None, 0),  # type: ignore[index]
             timeout=15, what="MN got a denial")
    code = show(lab_up, "registration", "mn1")["last_code"]  # type: ignore[index]
    print(f"denial {code} after {time.monotonic() - started:.1f}s")
    assert 64 <= code <= 127
    assert show(lab_up, "visitors", "fa3") == []
    assert show(lab_up, "paths", "fa3") == []


def test_agent_restart_reconciles_its_paths(lab_up: LabEnv) -> None:
    wait_for(binding_via(lab_up, FA1), timeout=15, what="binding via fa1")
    wait_for(paths_up(lab_up, "ha", 2), timeout=15, what="ha paths up")
    before = sorted(p["path"] for p in show(lab_up, "paths", "ha"))  # type: ignore[index,union-attr]
    for node in ("ha", "fa1"):
        status = json.loads(lab_up.cli("lab", "status", "--json").stdout)
        old = next(p for n in status["nodes"] for p in n["processes"] if p["name"] == f"daemon:{node}")
        os.kill(old["pid"], signal.SIGKILL)

        def restarted(node=node, old=old):
            status = json.loads(lab_up.cli("lab", "status", "--json").stdout)
            proc = next(p for n in status["nodes"] for p in n["processes"] if p["name"] == f"daemon:{node}")
            return proc["pid"] != old["pid"] and proc.get("healthy")

        wait_for(restarted, what=f"{node} restarted")
    # The same paths, once each, up again; and the VPN still carries traffic.
    rows = wait_for(paths_up(lab_up, "ha", 2), timeout=15, what="ha paths up after restart")
    assert sorted(p["path"] for p in rows) == before  # type: ignore[index,union-attr]
    wait_for(paths_up(lab_up, "fa1", 2), timeout=15, what="fa1 paths up after restart")
    # mn1's two paths at fa1: to the HA, and to the dynamic cngw2 (route optimisation).
    assert len(show(lab_up, "paths", "fa1")) == 2  # type: ignore[arg-type]
    lab_up.exec("cn", "ping", "-c", "2", "-W", "2", HOA)


def test_aaaf_down_gives_the_mn_an_answer_in_bounded_time(lab_up: LabEnv) -> None:
    wait_for(binding_via(lab_up, FA1), timeout=15, what="binding via fa1")
    Lab.open(lab_up.run_dir).stop_process("daemon:aaaf1")
    lab_up.cli("lab", "move", "mn1", "fa2")
    wait_for(lambda: show(lab_up, "registration", "mn1")["last_code"] not in (None, 0),  # type: ignore[index]
             timeout=15, what="MN got a denial")
    assert 64 <= show(lab_up, "registration", "mn1")["last_code"] <= 127  # type: ignore[index,operator]
    assert show(lab_up, "visitors", "fa2") == []
    assert show(lab_up, "paths", "fa2") == []
    # The HA still has the old binding: nothing was torn down on the way.
    assert [b["care_of_address"] for b in show(lab_up, "bindings", "ha")] == [FA1]  # type: ignore[index]
