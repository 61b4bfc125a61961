"""Mobile IPv4 registration between the real MN, FA and HA daemons in the lab (RFC 5944)."""

from __future__ import annotations

import json
import os
import secrets
import signal
import sys
import time
from pathlib import Path

import pytest
import yaml
from scapy.all import UDP, rdpcap

from daemons.runtime.config import SecurityAssociation
from daemons.runtime.secret import Secret
from daemons.wire import mip
from lab.topology import default_topology_path
from tests.conftest import LabEnv
from tests.lab.mipkit import binding_via, expert_problems, send_udp, show, tshark, wait_for

pytestmark = pytest.mark.lab


@pytest.fixture
def lab_up(lab_env: LabEnv, tmp_path: Path) -> LabEnv:
    """Plain Mobile IP (RFC 5944): the default topology without AAA servers and without
    IPsec, so FAs relay registrations straight to the HA."""
    lab_env.cli("lab", "up", "-t", str(plain_topology(tmp_path)), "--backend", "none", "--capture")
    return lab_env


def plain_topology(tmp_path: Path, **user_fields: object) -> Path:
    topo = yaml.safe_load(default_topology_path().read_text())
    for domain in topo["domains"].values():
        domain.pop("aaa", None)
    topo["users"][0].update(user_fields)
    path = tmp_path / "plain.yaml"
    path.write_text(yaml.safe_dump(topo))
    return path

HOA = "198.18.100.10"
HA = "198.18.100.1"
COA = {"fa1": "198.18.0.14", "fa2": "198.18.0.18", "fa3": "198.18.0.26"}
FA1_ACCESS = "198.18.101.1"
LUA = Path(__file__).resolve().parents[2] / "docs" / "wireshark" / "mipvpn.lua"


def test_mn_registers_through_fa1_and_the_wire_is_rfc_correct(lab_up: LabEnv) -> None:
    started = time.monotonic()
    binding = wait_for(binding_via(lab_up, COA["fa1"]), what="binding via fa1")
    registered_after = time.monotonic() - started
    assert binding["mn"] == "mn1@home.example"
    assert binding["home_address"] == HOA
    assert 0 < binding["remaining"] <= binding["lifetime"] == 300
    visitors = show(lab_up, "visitors", "fa1")
    assert [v["home_address"] for v in visitors] == [HOA]  # type: ignore[index]
    # The FA's host route toward its visitor.
    assert f"{HOA} dev access" in lab_up.exec("fa1", "ip", "route").stdout
    print(f"registered {registered_after:.2f}s after `lab up` returned")

    time.sleep(1.2)  # at least one more periodic advertisement
    lab_up.cli("lab", "capture", "stop")
    captures = lab_up.run_dir / "captures"
    access = captures / "fa1-access.pcap"
    # Agent Advertisement: ICMP router advertisement with the mobility extension (16) and an
    # RFC 3012 challenge (24).
    adv = tshark(access, "-Y", "icmp.type == 9", "-T", "fields", "-e", "icmp.mip.type", "-e", "icmp.mip.coa",
                 "-e", "ip.ttl").splitlines()
    assert adv, "no agent advertisement on fa1's access link"
    types, coa_adv, ttl = adv[0].split("\t")
    assert {"16", "24"} <= set(types.split(",")) and coa_adv == COA["fa1"] and ttl == "1", adv[0]
    # The MN's RRQ: NAI, MN-HA authentication (32), the challenge answered (132) with MN-AAA (36).
    rrq = tshark(access, "-Y", "mip.type == 1", "-T", "fields", "-e", "mip.nai", "-e", "mip.ext.type",
                 "-e", "mip.homeaddr", "-e", "mip.coa").splitlines()
    assert rrq, "no RRQ from the MN"
    nai, ext_types, hoa, coa = rrq[0].split("\t")
    assert (nai, hoa, coa) == ("mn1@home.example", HOA, COA["fa1"])
    assert ext_types.split(",")[:4] == ["131", "32", "132", "36"]
    # Relayed to the HA with FA-HA authentication (34), answered with code 0.
    core = captures / "core-ha.pcap"
    relayed = tshark(core, "-Y", "mip.type == 1", "-T", "fields", "-e", "mip.ext.type").split()
    assert relayed and relayed[0].split(",") == ["131", "32", "34"]
    codes = tshark(core, "-Y", "mip.type == 3", "-T", "fields", "-e", "mip.code").split()
    assert codes and codes[0] == "0"
    rrp_to_mn = tshark(access, "-Y", "mip.type == 3", "-T", "fields", "-e", "mip.code", "-e", "mip.ext.type").split()
    assert rrp_to_mn[:1] == ["0"] and "34" not in rrp_to_mn[1]  # FA-HA auth stripped toward the MN
    for pcap in (access, core, captures / "core-fa1.pcap"):
        assert expert_problems(pcap) == [], pcap.name


def test_moves_register_through_each_new_agent(lab_up: LabEnv) -> None:
    wait_for(binding_via(lab_up, COA["fa1"]), what="binding via fa1")
    previous = "fa1"
    for fa in ("fa2", "fa3"):
        lab_up.cli("lab", "move", "mn1", fa)
        wait_for(binding_via(lab_up, COA[fa]), what=f"binding via {fa}")
        wait_for(lambda fa=fa: [v["home_address"] for v in show(lab_up, "visitors", fa)] == [HOA],
                 what=f"visitor at {fa}")
        wait_for(lambda: show(lab_up, "registration", "mn1")["state"] == "registered",  # type: ignore[index]
                 what="MN registered")
        # The MN named its previous FA; the new FA told it, and the old visitor entry went.
        wait_for(lambda previous=previous: show(lab_up, "visitors", previous) == [],
                 what=f"visitor gone at {previous}")
        assert HOA not in lab_up.exec(previous, "ip", "route").stdout
        previous = fa
    lab_up.cli("lab", "capture", "stop")
    # On the wire: Binding Update fa2 -> fa1 and its acknowledgement, authenticated (34),
    # decoded by tshark with our dissector for the RFC 4064 experimental message.
    fields = tshark(lab_up.run_dir / "captures" / "core-fa1.pcap", "-X", f"lua_script:{LUA}", "-Y", "mipvpn",
                    "-T", "fields", "-e", "ip.src", "-e", "mipvpn.msg", "-e", "mipvpn.hoa", "-e", "mipvpn.coa",
                    "-e", "mipvpn.ext.type").splitlines()
    rows = [f.split("\t") for f in fields]
    assert [COA["fa2"], "Binding Update", HOA, COA["fa2"], "131,34"] in rows, rows  # NAI, authentication
    assert [COA["fa1"], "Binding Acknowledge", HOA, "", "34"] in rows, rows
    # Home again: the MN deregisters, the HA drops the binding.
    lab_up.cli("lab", "move", "mn1", "ha")
    wait_for(lambda: show(lab_up, "bindings", "ha") == [], what="binding removed at home")
    assert show(lab_up, "registration", "mn1")["state"] == "home"  # type: ignore[index]


def forged_rrq(key: Secret, ident: int | None = None, coa: str = "198.18.2.10") -> bytes:
    return mip.registration_request(home_address=HOA, home_agent=HA, care_of_address=coa,
                                    identification=ident or mip.ntp_identification(time.time()), lifetime=60,
                                    nai="mn1@home.example", mn_ha=SecurityAssociation(0x1000, key)).encode()


def test_wrong_mn_ha_key_is_refused_with_131(lab_up: LabEnv) -> None:
    wait_for(binding_via(lab_up, COA["fa1"]), what="binding via fa1")
    reply = mip.decode_message(send_udp(lab_up, "cn", HA, forged_rrq(Secret(secrets.token_bytes(16)))))
    assert isinstance(reply, mip.RegistrationReply)
    assert reply.code == mip.ReplyCode.HA_MN_FAILED_AUTHENTICATION == 131
    assert [b["care_of_address"] for b in show(lab_up, "bindings", "ha")] == [COA["fa1"]]  # type: ignore[index]


def test_replayed_request_is_refused_with_133(lab_up: LabEnv) -> None:
    wait_for(binding_via(lab_up, COA["fa1"]), what="binding via fa1")
    lab_up.cli("lab", "capture", "stop")
    relayed = [bytes(p[UDP].payload) for p in rdpcap(str(lab_up.run_dir / "captures" / "core-ha.pcap"))
               if UDP in p and p[UDP].dport == 434]
    assert relayed
    # Replayed from the FA's own address, so even the FA-HA authenticator is genuine.
    reply = mip.decode_message(send_udp(lab_up, "fa1", HA, relayed[0]))
    assert isinstance(reply, mip.RegistrationReply)
    assert reply.code == mip.ReplyCode.HA_IDENTIFICATION_MISMATCH == 133
    # RFC 5944 §5.7: low 32 bits echo the request, high 32 bits carry the HA's clock.
    assert mip.reply_matches_request(mip.decode_message(relayed[0]).identification, reply.identification)
    assert [b["care_of_address"] for b in show(lab_up, "bindings", "ha")] == [COA["fa1"]]  # type: ignore[index]


def test_garbage_is_dropped_and_counted_and_the_daemons_keep_serving(lab_up: LabEnv) -> None:
    wait_for(binding_via(lab_up, COA["fa1"]), what="binding via fa1")
    before = {node: show(lab_up, "counters", node)["malformed"] for node in ("ha", "fa1")}  # type: ignore[index]
    valid = forged_rrq(Secret(b"k" * 16))
    # Random bytes behind a type that is no Mobile IP message (a random first byte of 1 would
    # make a "request" with unknown extensions, which agents rightly answer with 70/134).
    junk = [b"\xee" + os.urandom(39), b"\x01", valid[:30], b"\x03" + os.urandom(10), b"", valid[:-5]]
    for payload in junk:
        assert send_udp(lab_up, "mn1", FA1_ACCESS, payload, wait=0.2) == b""  # no answer to garbage
        assert send_udp(lab_up, "cn", HA, payload, wait=0.2) == b""
    after = {node: show(lab_up, "counters", node)["malformed"] for node in ("ha", "fa1")}  # type: ignore[index]
    assert after["ha"] - before["ha"] == len(junk)
    assert after["fa1"] - before["fa1"] == len(junk)
    # Still serving: a move registers through fa2.
    lab_up.cli("lab", "move", "mn1", "fa2")
    wait_for(binding_via(lab_up, COA["fa2"]), what="binding via fa2 after garbage")


def test_unknown_non_skippable_extension_gets_134(lab_up: LabEnv) -> None:
    rrq = mip.RegistrationRequest(home_address=HOA, home_agent=HA, care_of_address="198.18.2.10",
                                  identification=mip.ntp_identification(time.time()), lifetime=60)
    wire = rrq.encode() + bytes([99, 2, 0, 0])  # extension type 99: unknown, below 128
    reply = mip.decode_message(send_udp(lab_up, "cn", HA, wire))
    assert reply.code == mip.ReplyCode.HA_POORLY_FORMED_REQUEST  # type: ignore[union-attr]


@pytest.fixture
def short_lifetime_lab(lab_env: LabEnv, tmp_path: Path) -> LabEnv:
    lab_env.cli("lab", "up", "-t", str(plain_topology(tmp_path, lifetime=4)), "--backend", "none")
    return lab_env


def test_lifetime_expiry_removes_binding_and_visitor(short_lifetime_lab: LabEnv) -> None:
    env = short_lifetime_lab
    binding = wait_for(binding_via(env, COA["fa1"]), what="binding via fa1")
    assert binding["lifetime"] == 4
    # The MN re-registers before expiry while it runs...
    time.sleep(5)
    assert show(env, "bindings", "ha"), "binding lapsed although the MN kept re-registering"
    # ...and once it is gone, the binding and the visitor entry expire on their own.
    from lab.lab import Lab

    Lab.open(env.run_dir).stop_process("daemon:mn1")
    wait_for(lambda: show(env, "bindings", "ha") == [], timeout=8, what="binding expiry")
    wait_for(lambda: show(env, "visitors", "fa1") == [], timeout=3, what="visitor expiry")
    assert HOA not in env.exec("fa1", "ip", "route").stdout


def test_ha_killed_and_restarted_keeps_its_bindings(lab_up: LabEnv) -> None:
    wait_for(binding_via(lab_up, COA["fa1"]), what="binding via fa1")
    status = json.loads(lab_up.cli("lab", "status", "--json").stdout)
    ha_proc = next(p for n in status["nodes"] for p in n["processes"] if p["name"] == "daemon:ha")
    os.kill(ha_proc["pid"], signal.SIGKILL)

    def restarted():
        status = json.loads(lab_up.cli("lab", "status", "--json").stdout)
        proc = next(p for n in status["nodes"] for p in n["processes"] if p["name"] == "daemon:ha")
        return proc if proc["pid"] != ha_proc["pid"] and proc.get("healthy") else None

    proc = wait_for(restarted, what="HA restarted by the supervisor")
    assert proc["restarts"] == 1
    assert [b["care_of_address"] for b in show(lab_up, "bindings", "ha")] == [COA["fa1"]]  # type: ignore[index]


def test_fa_denial_reaches_the_mn(lab_up: LabEnv) -> None:
    """An FA's own refusal (here: a challenge it never advertised, RFC 3012 code 104) goes back
    to the MN on the access link, not toward the core."""
    wait_for(binding_via(lab_up, COA["fa1"]), what="binding via fa1")
    rrq = mip.registration_request(home_address="198.18.100.77", home_agent=HA, care_of_address=COA["fa1"],
                                   identification=mip.ntp_identification(time.time()), lifetime=60,
                                   nai="nobody@home.example", mn_ha=SecurityAssociation(0x1000, Secret(b"k" * 16)),
                                   challenge=b"never advertised", mn_aaa=SecurityAssociation(0x3000, Secret(b"s" * 16)))
    sender = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("198.18.100.77", 0))
s.settimeout(3)
s.sendto(bytes.fromhex(sys.argv[1]), ("198.18.101.1", 434))
print(s.recv(65535).hex())
"""
    lab_up.exec("mn1", "ip", "addr", "add", "198.18.100.77/32", "dev", "eth0")
    out = lab_up.exec("mn1", sys.executable, "-c", sender, rrq.encode().hex()).stdout.strip()
    reply = mip.decode_message(bytes.fromhex(out))
    assert reply.code == mip.ReplyCode.FA_UNKNOWN_CHALLENGE  # type: ignore[union-attr]
    assert "198.18.100.77" not in lab_up.exec("fa1", "ip", "route").stdout


def test_relayed_request_without_fa_ha_authentication_gets_132(lab_up: LabEnv) -> None:
    """RFC 5944 §3.5.4: from an FA the HA shares a key with, FA-HA authentication is required."""
    wait_for(binding_via(lab_up, COA["fa1"]), what="binding via fa1")
    lab_up.cli("lab", "capture", "stop")
    relayed = [bytes(p[UDP].payload) for p in rdpcap(str(lab_up.run_dir / "captures" / "core-ha.pcap"))
               if UDP in p and p[UDP].dport == 434]
    stripped = mip.strip_after(relayed[0], mip.EXT_MN_HA_AUTH)  # the MN's part, still genuine
    reply = mip.decode_message(send_udp(lab_up, "fa1", HA, stripped))
    assert reply.code == mip.ReplyCode.HA_FA_FAILED_AUTHENTICATION  # type: ignore[union-attr]
    assert [b["care_of_address"] for b in show(lab_up, "bindings", "ha")] == [COA["fa1"]]  # type: ignore[index]
