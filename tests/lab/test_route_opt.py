"""Route optimisation through a dynamic CN-GW (claims 19-21, 25; flows F4, F5, F8).

In the default lab, cngw (cn behind it) is static: mn1's traffic to cn is HA-anchored. cngw2
(cn2 behind it) is dynamic: the HA hands it the FA⇄CN-GW path in a Binding Update (RFC 4064
experimental message, vendor 32473, decoded by tshark with docs/wireshark/mipvpn.lua) and
waits for the Binding Acknowledge before it answers the registration; mn1 ⇄ cn2 then goes
FA ⇄ cngw2 directly, never over the HA's link, and the path follows the MN's moves. F8: the
CN-GW asks the HA (Binding Request) when a binding runs low, and drops it at expiry when the
HA no longer has one.

Pings use distinctive sizes so that captures tell the two correspondents' traffic apart
inside ESP: 1300 octets to cn2 (route-optimised), 1000 to cn (through the HA).
"""

from __future__ import annotations

import copy
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from daemons.roles import load_config
from daemons.wire import mip
from tests.conftest import LabEnv
from tests.lab.mipkit import binding_via, installed_secrets, show, tls_options, tshark, wait_for

pytestmark = pytest.mark.lab

LUA = Path(__file__).resolve().parents[2] / "docs" / "wireshark" / "mipvpn.lua"
DEFAULT = Path(__file__).resolve().parents[2] / "lab" / "topologies" / "default.yaml"
HOA = "198.18.100.10"
HA = "198.18.100.1"
CN, CN2 = "198.18.2.10", "198.18.3.10"
CNGW2 = "198.18.0.34"
COA = {"fa1": "198.18.0.14", "fa2": "198.18.0.18", "fa3": "198.18.0.26"}
RO_SIZE, HA_SIZE = 1300, 1000  # ICMP payloads: route-optimised (cn2), HA-anchored (cn)
RO_BIG = "esp && ip.len >= 1300"  # an ESP packet that can only carry a 1300-octet ping


def cngw2_paths_to(env: LabEnv, coa: str):
    """cngw2 holds exactly one path, to ``coa``, and it is up."""
    def check():
        rows = show(env, "paths", "cngw2")
        ok = [(r["remote"], r.get("state")) for r in rows] == [(coa, "up")]  # type: ignore[index,union-attr]
        return rows if ok else None
    return check


def fa_path_to_cngw2_up(env: LabEnv, fa: str):
    def check():
        rows = show(env, "paths", fa)
        return any(r["remote"] == CNGW2 and r.get("state") == "up" for r in rows)  # type: ignore[index,union-attr]
    return check


def ping(env: LabEnv, node: str, dst: str, size: int, count: int = 5) -> None:
    env.exec(node, "ping", "-c", str(count), "-i", "0.1", "-W", "2", "-s", str(size), dst)


def binding_messages(pcap: Path) -> list[dict[str, str]]:
    """Binding messages and HAR/HAA in frame order, as tshark (with our dissector) decodes them."""
    proc = subprocess.run(
        ["tshark", "-r", str(pcap), *tls_options(pcap), "-X", f"lua_script:{LUA}",
         "-Y", "mipvpn || diameter.cmd.code == 262 || mip.type == 3",
         "-T", "fields", "-E", "separator=|", "-e", "frame.number", "-e", "ip.src", "-e", "ip.dst",
         "-e", "mipvpn.msg", "-e", "mipvpn.lifetime", "-e", "mipvpn.ident", "-e", "mipvpn.status",
         "-e", "mipvpn.coa", "-e", "mipvpn.ext.type", "-e", "mipvpn.vse.vendor_type",
         "-e", "diameter.cmd.code", "-e", "diameter.flags.request", "-e", "mip.type"],
        capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    keys = ("frame", "src", "dst", "msg", "lifetime", "ident", "status", "coa", "ext", "vse", "cmd", "request",
            "mip")
    return [dict(zip(keys, line.split("|"), strict=True)) for line in out.splitlines() if line.strip()]


def count(pcap: Path, display_filter: str) -> int:
    return len(tshark(pcap, "-Y", display_filter, "-T", "fields", "-e", "frame.number").split())


def test_f4_f5_route_optimised_path_carries_traffic_and_follows_moves(lab_up: LabEnv) -> None:
    wait_for(binding_via(lab_up, COA["fa1"]), timeout=15, what="binding via fa1")
    wait_for(cngw2_paths_to(lab_up, COA["fa1"]), timeout=15, what="cngw2 path to fa1 up")
    wait_for(fa_path_to_cngw2_up(lab_up, "fa1"), timeout=15, what="fa1 path to cngw2 up")
    # The HA's binding names the CN-GW it updated.
    assert [b["cngws"] for b in show(lab_up, "bindings", "ha")] == [CNGW2]  # type: ignore[index]
    ping(lab_up, "mn1", CN2, RO_SIZE)
    ping(lab_up, "cn2", HOA, RO_SIZE)
    ping(lab_up, "mn1", CN, HA_SIZE)  # the static correspondent stays HA-anchored
    for fa in ("fa2", "fa3"):  # F5: intra-domain (F2), then inter-domain (F3)
        lab_up.cli("lab", "move", "mn1", fa)
        wait_for(binding_via(lab_up, COA[fa]), timeout=15, what=f"binding via {fa}")
        wait_for(cngw2_paths_to(lab_up, COA[fa]), timeout=15, what=f"cngw2 holds only the path to {fa}")
        wait_for(fa_path_to_cngw2_up(lab_up, fa), timeout=15, what=f"{fa} path to cngw2 up")
        ping(lab_up, "mn1", CN2, RO_SIZE, count=3)
    # After the moves the CN-GW's binding and path are the current FA's only.
    rows = show(lab_up, "paths", "cngw2")
    assert [(r["users"], r["remote"], r["remote_type"]) for r in rows] == [  # type: ignore[index,union-attr]
        ("mn1@home.example", COA["fa3"], "fa")]
    assert [(b["home_address"], b["care_of_address"], b["home_agent"])  # type: ignore[index]
            for b in show(lab_up, "bindings", "cngw2")] == [(HOA, COA["fa3"], HA)]
    lab_up.cli("lab", "capture", "stop")
    captures = lab_up.run_dir / "captures"

    # Data: MN ⇄ cn2 is ESP on FA-core and core-cngw2, in clear only on cn2's LAN, and never
    # crosses the HA's link; MN ⇄ cn (static) does cross it.
    assert count(captures / "core-ha.pcap", RO_BIG) == 0, "route-optimised traffic crossed the HA's link"
    assert count(captures / "core-ha.pcap", f"esp && ip.len > {HA_SIZE} && ip.len < {RO_SIZE}") >= 10
    to_cngw2 = f"{RO_BIG} && ip.addr == {CNGW2}"
    assert count(captures / "core-fa1.pcap", f"{to_cngw2} && ip.addr == {COA['fa1']}") >= 10
    for fa in ("fa2", "fa3"):
        assert count(captures / f"core-{fa}.pcap", f"{to_cngw2} && ip.addr == {COA[fa]}") >= 6, fa
    assert count(captures / "core-cngw2.pcap", to_cngw2) >= 22
    for link in ("core-fa1", "core-cngw2"):
        assert count(captures / f"{link}.pcap", f"icmp && ip.addr == {HOA}") == 0, f"cleartext on {link}"
    assert count(captures / "cngw2-cn2.pcap", f"icmp && ip.addr == {HOA} && ip.addr == {CN2} && ip.len > {RO_SIZE}") \
        >= 22

    # Signalling on the HA's link: every HAA (F1 at fa1, F3 at fa3) comes after the Binding
    # Update to cngw2 and its acknowledgement; the F2 registration's reply likewise.
    msgs = binding_messages(captures / "core-ha.pcap")
    bus = [m for m in msgs if m["msg"] == "Binding Update"]
    assert bus and all((m["src"], m["dst"]) == (HA, CNGW2) for m in bus)
    assert all(m["ext"] == "131,38,34" and m["vse"] == "1" for m in bus), bus  # NAI, VPN info CVSE, auth
    assert list(dict.fromkeys(m["coa"] for m in bus)) == [COA["fa1"], COA["fa2"], COA["fa3"]], bus
    answers = [m for m in msgs if (m["cmd"] == "262" and m["request"] == "0") or (m["mip"] == "3" and m["src"] == HA)]
    assert len(answers) >= 3, msgs  # F1 (HAA), F2 (RRP straight to fa2), F3 (HAA)
    for answer in answers:
        bu = [m for m in bus if int(m["frame"]) < int(answer["frame"])][-1]
        ack = next((m for m in msgs if m["msg"] == "Binding Acknowledge" and m["ident"] == bu["ident"]), None)
        assert ack is not None and (ack["src"], ack["status"]) == (CNGW2, "0"), (bu, msgs)
        assert int(bu["frame"]) < int(ack["frame"]) < int(answer["frame"]), (bu, ack, answer)
    # The F2 reply went to fa2 after the update naming fa2 was acknowledged.
    (f2,) = [m for m in answers if m["mip"] == "3"]
    assert f2["dst"] == COA["fa2"]

    # Secrets stay secret: neither the HA-CN-GW binding key nor the keys and PSK of cngw2's path
    # (from the Binding Update) show in any daemon's log or in `show`; named by index if they do.
    secrets = [k.hex() for k in route_opt_secrets(lab_up.run_dir)]
    n_secrets = len(secrets)  # not len(...) in the assert: pytest would print the keys
    assert n_secrets == 4
    shown = "".join(lab_up.cli("show", what, "--node", node, "--json").stdout
                    for node, what in (("cngw2", "paths"), ("cngw2", "bindings"), ("ha", "bindings")))
    logs = "".join(p.read_text(errors="replace") for p in (lab_up.run_dir / "logs").glob("daemon-*.log"))
    assert [i for i, h in enumerate(secrets) if h in shown or h in logs] == []
    # Nor on any link: the AAAH sealed the path's keys for cngw2 (daemons.vpn.seal); the HAR, the
    # AMA and the HA's Binding Update carry them only in that envelope, which the HA cannot open.
    raw = [bytes.fromhex(h) for h in secrets]
    for pcap in sorted(captures.glob("*.pcap")):
        data = pcap.read_bytes()
        assert [i for i, k in enumerate(raw) if k in data or k.hex().encode() in data] == [], pcap.name


# Runs inside a node's namespace: send one datagram from SRC (any port) to DST:434, print the reply.
REPLAYER = """
import socket, sys
src, dst, payload = sys.argv[1], sys.argv[2], bytes.fromhex(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((src, 0))
s.settimeout(3)
s.sendto(payload, (dst, 434))
try:
    print(s.recv(65535).hex())
except TimeoutError:
    print("")
"""


def send_from(env: LabEnv, node: str, src: str, payload: bytes) -> bytes:
    return bytes.fromhex(env.exec(node, sys.executable, "-c", REPLAYER, src, CNGW2, payload.hex()).stdout.strip())


def test_replayed_forged_and_unauthenticated_binding_updates_change_nothing(lab_up: LabEnv) -> None:
    wait_for(cngw2_paths_to(lab_up, COA["fa1"]), timeout=15, what="cngw2 path to fa1 up")
    lab_up.cli("lab", "move", "mn1", "fa2")
    wait_for(cngw2_paths_to(lab_up, COA["fa2"]), timeout=15, what="cngw2 path to fa2 up")
    before = show(lab_up, "bindings", "cngw2")
    # The genuine Binding Update for fa1, as it crossed the HA's link (tcpdump writes per packet).
    rows = tshark(lab_up.run_dir / "captures" / "core-ha.pcap", "-X", f"lua_script:{LUA}", "-Y",
                  f"mipvpn.subtype == 1 && mipvpn.coa == {COA['fa1']}", "-T", "fields", "-e", "udp.payload").split()
    old = bytes.fromhex(rows[0].replace(":", ""))
    assert isinstance(mip.decode_message(old), mip.BindingUpdate)

    def status(reply: bytes) -> int:
        ack = mip.decode_message(reply)
        assert isinstance(ack, mip.BindingAcknowledge)
        return int(ack.status)

    # Replayed from the HA's own address: an identification older than the last one accepted.
    assert status(send_from(lab_up, "ha", HA, old)) == mip.BindingStatus.IDENTIFICATION_MISMATCH
    # Tampered (care-of address rewritten to fa3): the authenticator no longer matches.
    bu = mip.decode_message(old)
    forged = mip.BindingUpdate(home_address=bu.home_address, care_of_address=COA["fa3"],  # type: ignore[union-attr]
                               identification=mip.ntp_identification(time.time()), lifetime=300,
                               flags=bu.flags, extensions=bu.extensions)  # type: ignore[union-attr]
    assert status(send_from(lab_up, "ha", HA, forged.encode())) == mip.BindingStatus.AUTHENTICATION_FAILED
    # From an address that shares no binding key with cngw2, without authentication at all.
    bare = mip.BindingUpdate(home_address=HOA, care_of_address=COA["fa3"],
                             identification=mip.ntp_identification(time.time()), lifetime=300, flags=mip.BUFlag.A)
    assert status(send_from(lab_up, "core", "198.18.0.33", bare.encode())) == \
        mip.BindingStatus.AUTHENTICATION_FAILED
    # Nothing moved: the binding and the one path are still fa2's.
    after = show(lab_up, "bindings", "cngw2")
    assert [(b["care_of_address"], b["lifetime"]) for b in after] == \
        [(b["care_of_address"], b["lifetime"]) for b in before] == [(COA["fa2"], 300)]  # type: ignore[index]
    assert cngw2_paths_to(lab_up, COA["fa2"])()
    assert show(lab_up, "counters", "cngw2")["bu_rejected"] == 3  # type: ignore[index]


def route_opt_secrets(run_dir: Path) -> list[bytes]:
    """The HA-cngw2 binding key (HA configuration) and the ESP keys and PSK of cngw2's path."""
    ha = load_config(run_dir / "nodes" / "ha" / "ha.yaml")
    return [gw.key.reveal() for gw in ha.correspondent_gateways] + installed_secrets(run_dir, "cngw2")  # type: ignore[attr-defined]


def short_lifetime_topology(path: Path, lifetime: int, threshold: int) -> Path:
    data = copy.deepcopy(yaml.safe_load(DEFAULT.read_text()))
    data["users"][0]["lifetime"] = lifetime
    data["nodes"]["cngw2"]["settings"] = {"binding_request_threshold": threshold}
    path.write_text(yaml.safe_dump(data, sort_keys=False))  # link ends in order: the captures' names
    return path


def test_f8_binding_request_before_expiry_and_paths_go_without_binding(lab_env: LabEnv, tmp_path: Path) -> None:
    lifetime, threshold = 20, 8
    topo = short_lifetime_topology(tmp_path / "short.yaml", lifetime, threshold)
    lab_env.cli("lab", "up", "-t", str(topo), "--capture")
    wait_for(cngw2_paths_to(lab_env, COA["fa1"]), timeout=20, what="cngw2 path to fa1 up")
    # While the HA holds the binding, it answers the CN-GW's Binding Requests: wait until it has.
    wait_for(lambda: show(lab_env, "counters", "ha")["br_received"] >= 1,  # type: ignore[index]
             timeout=lifetime + 10, what="a Binding Request at the HA")
    # Right after a renewal (the MN re-registers before its lifetime ends), lose the HA's
    # lifetime-0 update on the way to cngw2 and bring the MN home: the HA drops the binding,
    # the CN-GW is not told.
    wait_for(lambda: [b for b in show(lab_env, "bindings", "cngw2")  # type: ignore[union-attr]
                      if b["remaining"] >= lifetime - 4], timeout=lifetime + 10, what="a fresh binding at cngw2")
    nft = "add table ip mvtest; add chain ip mvtest input { type filter hook input priority -5; }; " \
          f"add rule ip mvtest input ip saddr {HA} udp dport 434 drop"
    lab_env.exec("cngw2", "nft", nft)
    lab_env.cli("lab", "move", "mn1", "ha")
    wait_for(lambda: show(lab_env, "bindings", "ha") == [], timeout=15, what="binding removed at the HA")
    (held,) = show(lab_env, "bindings", "cngw2")  # type: ignore[misc]
    assert held["home_address"] == HOA and show(lab_env, "paths", "cngw2") != []
    # F8: below the threshold the CN-GW asks; nobody answers; at expiry binding and path go.
    wait_for(lambda: show(lab_env, "bindings", "cngw2") == [] and show(lab_env, "paths", "cngw2") == [],
             timeout=lifetime + 10, what="binding and paths gone at cngw2")
    assert show(lab_env, "counters", "cngw2")["expired"] == 1  # type: ignore[index]
    lab_env.cli("lab", "capture", "stop")

    msgs = binding_messages(lab_env.run_dir / "captures" / "core-cngw2.pcap")
    # While bound: a Binding Request answered by a Binding Update with what was left (< threshold).
    requests = [m for m in msgs if m["msg"] == "Binding Request"]
    assert requests and all((m["src"], m["dst"]) == (CNGW2, HA) for m in requests)
    first = int(requests[0]["frame"])
    assert any(m["msg"] == "Binding Update" and int(m["frame"]) > first and 0 < int(m["lifetime"]) <= threshold
               for m in msgs), msgs
    # After the deregistration (its lifetime-0 update was dropped at cngw2): Binding Requests,
    # and no Binding Update from the HA any more.
    (deleted,) = [int(m["frame"]) for m in msgs if m["msg"] == "Binding Update" and m["lifetime"] == "0"][:1]
    after = [m for m in msgs if int(m["frame"]) > deleted]
    assert any(m["msg"] == "Binding Request" for m in after), after
    assert not any(m["msg"] == "Binding Update" and m["lifetime"] != "0" for m in after), after
