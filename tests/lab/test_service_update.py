"""Flow F7 (claim 24): the user changes their own VPN profile through the AAAH's HTTPS API
(`mipvpn profile`, the server verified against the lab's CA, token per user from a 0600 file
written by `mipvpn db token issue --out`; another user's token gets 403; a plain HTTP request
gets no HTTP answer; no token in clear on the core-aaah link), then tells the MN
(`mipvpn mn service-update`): the MN's RRQ carries the service-update NVSE (vendor 32473,
type 3), goes FA -> AAAF -> AAAH inside the AMR, the AAAH rebuilds the VPN info from the
changed profile and the FA's installed paths change accordingly.

Two changes, both asserted at the FA and on the wire:
1. a static-gateway profile gets QoS: the FA's FA⇄HA path gets an HTB class with that rate;
2. route optimisation (F4): the user removes the dynamic-gateway profile (cn2 behind cngw2):
   the FA⇄cngw2 path goes and mn1's traffic to cn2 is anchored at the HA; the user adds the
   profile back: FA⇄cngw2 comes back and mn1 ⇄ cn2 goes FA⇄cngw2 directly (ESP), never over
   the HA's link.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, LabEnv
from tests.lab.mipkit import binding_via, show, tshark, wait_for

pytestmark = pytest.mark.lab

NAI, OTHER = "mn1@home.example", "mn9@home.example"
HOA = "198.18.100.10"
FA1 = "198.18.0.14"
AAAF1, AAAH = "198.18.0.10", "198.18.0.6"
CNGW2, CN2, CN2_NET = "198.18.0.34", "198.18.3.10", "198.18.3.0/24"
API = f"https://{AAAH}:8443"
# The service-update NVSE as it sits in the RRQ: type 134, length 12, reserved, vendor 32473, type 3,
# then version 1, reserved 0 and the 16-bit sequence.
NVSE_HEAD = "860c" + "0000" + "00007ed9" + "0003" + "0100"
# A plain HTTP request to the API with a made-up token: prints what came back (nothing, or a TLS
# alert: never HTTP).
PROBE_TOKEN = b"mvt_cHJvYmU.not-a-real-token"
PLAIN_HTTP = f"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
s.sendall(b"GET /v1/gateways HTTP/1.1\\r\\nHost: x\\r\\nAuthorization: Bearer {PROBE_TOKEN.decode()}\\r\\n\\r\\n")
try:
    print(s.recv(4096).decode("latin-1"), end="")
except OSError:
    pass
"""
# Ping payload sizes that tell the two phases of mn1 -> cn2 apart in the captures (IP length = +28).
HA_ANCHORED, ROUTE_OPTIMISED = 333, 444


def issue_token(env: LabEnv, nai: str, url: str) -> tuple[Path, str]:
    """`mipvpn db token issue NAI --out FILE`: the file (mode 0600) and the token in it."""
    path = env.run_dir / f"{nai.split('@')[0]}.token"
    out = env.cli("db", "token", "issue", nai, "--out", str(path), "--url", url).stdout
    token = path.read_text().strip()
    leaked = token in out
    assert not leaked and path.stat().st_mode & 0o777 == 0o600
    return path, token


def profile(env: LabEnv, token: tuple[Path, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`mipvpn profile ...` as a user would run it, from the core router's namespace (the
    request crosses the core-aaah link), the token from its file, the server verified against
    the lab's CA (the default inside the lab)."""
    path, secret = token
    proc = subprocess.run(["ip", "netns", "exec", env.ns("core"), sys.executable, "-m", "daemons.cli.main",
                           "profile", "--api", API, "--token-file", str(path), *args],
                          cwd=ROOT, env=env.env, capture_output=True, text=True, timeout=60)
    leaked = secret in proc.stdout + proc.stderr  # a bool: pytest would print the token and the output
    assert not leaked, "the API token showed in the CLI's output"
    if check and proc.returncode != 0:
        raise AssertionError(f"mipvpn profile {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n"
                             f"{proc.stderr}")
    return proc


def service_update(env: LabEnv) -> dict:
    out = json.loads(env.cli("mn", "service-update", "--node", "mn1", "--json").stdout)
    assert out["accepted"] and out["code"] == 0 and out["care_of_address"] == FA1, out
    return out


def fa_paths(env: LabEnv) -> list[dict]:
    return show(env, "paths", "fa1")  # type: ignore[return-value]


def dynamic_paths(env: LabEnv) -> list[dict]:
    return [p for p in fa_paths(env) if p["remote_type"] == "cngw-dynamic"]


def htb_rates(env: LabEnv, node: str) -> str:
    """Every tc class in the node's namespace, as text."""
    links = env.exec(node, "ip", "-o", "link", "show").stdout
    names = [line.split(":")[1].strip().split("@")[0] for line in links.splitlines()]
    return "\n".join(env.exec(node, "tc", "class", "show", "dev", name, check=False).stdout for name in names)


def amr_rrqs(pcap: Path, *fields: str) -> list[list[str]]:
    """Per AMR request: the MIP-Reg-Request as hex, then ``fields``."""
    out = tshark(pcap, "-Y", "diameter.cmd.code == 260 && diameter.flags.request == 1", "-T", "fields",
                 "-e", "diameter.MIP-Reg-Request", *(a for f in fields for a in ("-e", f)))
    rows = [line.split("\t") for line in out.splitlines() if line.strip()]
    return [[row[0].replace(":", ""), *row[1:]] for row in rows]


def test_profile_change_plus_service_update_takes_effect(lab_up: LabEnv) -> None:
    env = lab_up
    wait_for(binding_via(env, FA1), timeout=20, what="binding via fa1")
    wait_for(lambda: [p for p in fa_paths(env) if p["remote_type"] == "ha" and p.get("state") == "up"],
             timeout=20, what="fa1's path to the HA up")
    url = f"sqlite:///{env.run_dir / 'nodes' / 'aaah' / 'vpn.db'}"
    token = issue_token(env, NAI, url)
    # A second user of the home domain (no MN running), with a token of their own.
    secret = env.run_dir / "mn9.secret"
    secret.write_text(os.urandom(16).hex())
    env.cli("db", "user", "add", OTHER, "--home-address", "198.18.100.19", "--home-agent", "198.18.100.1",
            "--mn-aaa-secret-file", str(secret), "--url", url)
    other = issue_token(env, OTHER, url)

    profiles = {p["destination"]: p for p in json.loads(profile(env, token, "list", "--json").stdout)}
    static, dynamic = profiles["198.18.2.0/24"], profiles[CN2_NET]
    assert (static["gateway"], static["gateway_type"]) == ("cngw", "static")
    assert (dynamic["gateway"], dynamic["gateway_type"]) == ("cngw2", "dynamic")

    # Another user's token cannot read or change mn1's profiles; nothing changed.
    for args in (("list",), ("set", str(static["id"]), "--qos-rate", "1M"), ("delete", str(dynamic["id"]))):
        refused = profile(env, other, "--user", NAI, *args, check=False)
        assert refused.returncode == 1 and "403 forbidden" in refused.stderr, refused
    assert {p["destination"]: p for p in json.loads(profile(env, token, "list", "--json").stdout)} == profiles
    # Validation errors name the field.
    bad = profile(env, token, "set", str(static["id"]), "--gateway", "nowhere", check=False)
    assert bad.returncode == 1 and "400 invalid: gateway:" in bad.stderr

    # 1. QoS on the static-gateway profile: nothing happens until the service update...
    assert "rate 5Mbit" not in htb_rates(env, "fa1")
    profile(env, token, "set", str(static["id"]), "--qos-rate", "5M", "--qos-ceil", "8M", "--qos-priority", "1")
    assert "rate 5Mbit" not in htb_rates(env, "fa1")
    first = service_update(env)
    # ...then the FA's path to the HA carries the user's new QoS.
    wait_for(lambda: "rate 5Mbit ceil 8Mbit" in htb_rates(env, "fa1"), timeout=15, what="HTB class at fa1")

    # 2. Route optimisation follows the profile: with F4, the dynamic-gateway profile gives
    # FA⇄cngw2; removing it and updating removes the path, adding it back restores it.
    wait_for(lambda: dynamic_paths(env), timeout=20, what="fa1's route-optimised path to cngw2")
    env.exec("mn1", "ping", "-c", "2", "-i", "0.2", "-W", "2", "-s", str(ROUTE_OPTIMISED), CN2)
    profile(env, token, "delete", str(dynamic["id"]))
    second = service_update(env)
    wait_for(lambda: not dynamic_paths(env), timeout=15, what="FA⇄cngw2 gone after the update")
    assert [p["remote_type"] for p in fa_paths(env)] == ["ha"]
    # Without the profile, mn1's traffic to cn2 is anchored at the HA (FA⇄HA carries it all).
    env.exec("mn1", "ping", "-c", "3", "-i", "0.2", "-W", "2", "-s", str(HA_ANCHORED), CN2)
    added = json.loads(profile(env, token, "add", CN2_NET, "--json").stdout)
    assert (added["gateway"], added["gateway_type"]) == ("cngw2", "dynamic")  # from the correspondence table
    third = service_update(env)
    (ro,) = wait_for(lambda: [p for p in dynamic_paths(env) if p.get("state") == "up"], timeout=20,
                     what="FA⇄cngw2 back and up")
    assert ro["remote"] == CNGW2
    env.exec("mn1", "ping", "-c", "3", "-i", "0.2", "-W", "2", "-s", str(ROUTE_OPTIMISED), CN2)
    assert [s["mn"] for s in show(env, "sessions", "aaah")] == [NAI]  # type: ignore[index]
    counters = show(env, "counters", "aaah")
    assert counters["service_updates"] == 3, counters  # type: ignore[index]

    # The API talks TLS only: a plain HTTP request (a made-up token in it) gets no HTTP answer.
    plain = env.exec("core", sys.executable, "-c", PLAIN_HTTP, AAAH, "8443", check=False)
    assert plain.returncode == 0 and not plain.stdout.startswith("HTTP/"), (plain.stdout[:64], plain.stderr[-300:])

    env.cli("lab", "capture", "stop")
    captures = env.run_dir / "captures"
    # Every request crossed core-aaah as TLS: handshakes seen, no token in clear anywhere in the capture.
    hellos = tshark(captures / "core-aaah.pcap", "-d", "tcp.port==8443,tls", "-Y",
                    "tcp.port == 8443 && tls.handshake.type == 1", "-T", "fields", "-e", "frame.number").split()
    assert len(hellos) >= 8, hellos
    wire = (captures / "core-aaah.pcap").read_bytes()
    assert wire.count(PROBE_TOKEN) >= 1  # the plain request above: a token in clear would show
    for secret in (token[1], other[1]):
        leaked = secret.encode() in wire  # a bool: pytest would print the token
        assert not leaked, "an API token crossed core-aaah in clear"
    sequences = [f"{u['sequence']:04x}" for u in (first, second, third)]
    assert len(set(sequences)) == 3

    # On the access link: mn1's RRQs carry the NVSE, as tshark's own mip dissector reads it.
    nvses = tshark(captures / "fa1-access.pcap", "-Y", "mip.type == 1 && mip.ext.nvse.vendor_type == 3",
                   "-T", "fields", "-e", "mip.ext.nvse.vendor_id", "-e", "mip.ext.nvse.vendor_value")
    seen = {line.split("\t")[1].replace(":", "")[-4:] for line in nvses.splitlines()
            if line.startswith("32473\t")}
    assert set(sequences) <= seen, nvses

    # FA -> AAAF (core-fa1), AAAF -> AAAH (core-aaaf1 out, core-aaah in): the AMR carries the RRQ
    # with the NVSE each way; at the AAAH it arrives from the AAAF and is answered 2001.
    for seq in sequences:
        marker = NVSE_HEAD + seq
        assert any(marker in r[0] for r in amr_rrqs(captures / "core-fa1.pcap")), ("fa1", seq)
        hops = amr_rrqs(captures / "core-aaaf1.pcap", "ip.src", "ip.dst")
        assert any(marker in r[0] and r[1:] == [FA1, AAAF1] for r in hops), ("fa1 -> aaaf1", seq)
        assert any(marker in r[0] and r[1:] == [AAAF1, AAAH] for r in hops), ("aaaf1 -> aaah", seq)
        at_aaah = [r for r in amr_rrqs(captures / "core-aaah.pcap", "ip.src", "diameter.endtoendid")
                   if marker in r[0]]
        assert at_aaah and all(r[1] == AAAF1 for r in at_aaah), ("aaah", seq)
        answers = tshark(captures / "core-aaah.pcap", "-Y",
                         f"diameter.cmd.code == 260 && diameter.flags.request == 0 && "
                         f"diameter.endtoendid == {at_aaah[-1][2]}",
                         "-T", "fields", "-e", "ip.src", "-e", "diameter.Result-Code").split()
        assert answers[:2] == [AAAH, "2001"], ("AMA", seq, answers)
        # ...and the AAAH asked the HA with the same RRQ (HAR) before answering.
        hars = tshark(captures / "core-ha.pcap", "-Y", "diameter.cmd.code == 262 && diameter.flags.request == 1",
                      "-T", "fields", "-e", "diameter.MIP-Reg-Request").replace(":", "")
        assert marker in hars, ("HAR", seq)

    # The data path followed the profile: mn1 -> cn2 crossed the HA's link (in clear from the HA
    # on) only while the profile was gone; route-optimised, it never did and was ESP on the core.
    def count(link: str, display_filter: str) -> int:
        return len(tshark(captures / f"{link}.pcap", "-Y", display_filter, "-T", "fields",
                          "-e", "frame.number").split())

    to_cn2 = f"icmp && ip.src == {HOA} && ip.dst == {CN2}"
    assert count("core-ha", f"{to_cn2} && ip.len == {HA_ANCHORED + 28}") >= 3
    assert count("core-ha", f"ip.len == {ROUTE_OPTIMISED + 28}") == 0
    assert count("cngw2-cn2", f"{to_cn2} && ip.len == {ROUTE_OPTIMISED + 28}") >= 5
    for link in ("core-fa1", "core-cngw2"):
        assert count(link, f"{to_cn2} && ip.len == {ROUTE_OPTIMISED + 28}") == 0, f"cleartext on {link}"
    assert count("core-cngw2", f"esp && ip.src == {FA1} && ip.len > {ROUTE_OPTIMISED + 28}") >= 5
