"""Issue #15 at a real FA: the access side under attack, in the default lab (AAA chain, no IPsec).

An RRQ claiming the HA's or the AAAF's address as its home address, or any request that is
refused, never touches fa1's routing table (watched with ``ip monitor route`` while it
happens), and its denial still reaches the sender on the access link; a solicitation flood
does not invalidate the challenge a real MN heard; an RRQ flood is dropped and counted."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from daemons.runtime.config import SecurityAssociation
from daemons.runtime.secret import Secret
from daemons.wire import mip
from tests.conftest import LabEnv
from tests.lab.mipkit import binding_via, heard_advertisement, show, wait_for

pytestmark = pytest.mark.lab

HOA = "198.18.100.10"
HA = "198.18.100.1"
AAAF1 = "198.18.0.10"
FA1 = "198.18.0.14"
FA1_ACCESS = "198.18.101.1"
STRANGER = "198.18.100.77"  # a home address no user has
Code = mip.ReplyCode

# Runs inside a node's namespace: from SRC send each datagram to DST:434, print every reply (hex)
# that comes within WAIT seconds.
SENDER = """
import socket, sys, time
src, dst, wait = sys.argv[1], sys.argv[2], float(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((src, 0))
for payload in sys.argv[4:]:
    s.sendto(bytes.fromhex(payload), (dst, 434))
end = time.monotonic() + wait
while (left := end - time.monotonic()) > 0:
    s.settimeout(left)
    try:
        print(s.recv(65535).hex(), flush=True)
    except TimeoutError:
        break
"""

# Runs inside mn1's namespace: Agent Solicitations from many (forged) sources on the access link.
SOLICITOR = """
import sys
from scapy.all import ICMP, IP, Ether, sendp
n, sources = int(sys.argv[1]), int(sys.argv[2])
pkts = [Ether(dst="01:00:5e:00:00:02") / IP(src=f"198.18.101.{100 + i % sources}", dst="224.0.0.2", ttl=1)
        / ICMP(type=10, code=0) for i in range(n)]
sendp(pkts, iface="eth0", inter=0.005, verbose=False)
"""


@pytest.fixture
def lab_up(lab_env: LabEnv) -> LabEnv:
    lab_env.cli("lab", "up", "--backend", "none")
    wait_for(binding_via(lab_env, FA1), timeout=20, what="binding via fa1")
    return lab_env


def request(hoa: str, challenge: bytes | None, nai: str = "nobody@home.example") -> bytes:
    return mip.registration_request(home_address=hoa, home_agent=HA, care_of_address=FA1,
                                    identification=mip.ntp_identification(time.time()), lifetime=60, nai=nai,
                                    mn_ha=SecurityAssociation(0x1000, Secret(b"k" * 16)), challenge=challenge,
                                    mn_aaa=SecurityAssociation(0x3000, Secret(b"s" * 16)) if challenge else None
                                    ).encode()


def send_from(env: LabEnv, src: str, payloads: list[bytes], wait: float = 6.0) -> list[mip.Message]:
    """``payloads`` from mn1's link with source ``src`` (put on mn1's eth0 meanwhile): the replies."""
    if src != HOA:
        env.exec("mn1", "ip", "addr", "add", f"{src}/32", "dev", "eth0")
    try:
        out = env.exec("mn1", sys.executable, "-c", SENDER, src, FA1_ACCESS, str(wait), *(p.hex() for p in payloads),
                       timeout=wait + 30).stdout
    finally:
        if src != HOA:
            env.exec("mn1", "ip", "addr", "del", f"{src}/32", "dev", "eth0", check=False)
    return [mip.decode_message(bytes.fromhex(line)) for line in out.split()]


def fa1_routes(env: LabEnv) -> list[str]:
    out = env.exec("fa1", "ip", "route", "show", "table", "all").stdout
    return sorted(line for line in out.splitlines() if not line.startswith(("cache", " ")))


@contextmanager
def route_events(env: LabEnv) -> Iterator[list[str]]:
    """Every route change in fa1 meanwhile (``ip -o monitor route``), one line each."""
    events: list[str] = []
    monitor = subprocess.Popen(["ip", "netns", "exec", env.ns("fa1"), "ip", "-o", "monitor", "route"],
                               stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.3)
        yield events
        time.sleep(0.3)
    finally:
        monitor.terminate()
        events.extend(monitor.communicate(timeout=10)[0].splitlines())


def test_claimed_infrastructure_and_refused_requests_touch_no_route(lab_up: LabEnv) -> None:
    env = lab_up
    before = fa1_routes(env)
    relayed = show(env, "counters", "fa1")["relayed"]  # type: ignore[index]
    with route_events(env) as events:
        # Claiming the HA's and the AAAF's address, sent from it (an on-link attacker can), with a
        # challenge fresh from fa1's own advertisement: refused by fa1 itself, 65.
        for claimed in (HA, AAAF1):
            replies = send_from(env, claimed, [request(claimed, heard_advertisement(env, "mn1").challenge)])
            assert [r.code for r in replies] == [Code.FA_ADMINISTRATIVELY_PROHIBITED], claimed  # type: ignore[union-attr]
        assert show(env, "counters", "fa1")["relayed"] == relayed  # type: ignore[index]  # no AMR for them
        # A plausible home address, passed on to the AAA, which knows no such user: 67 from fa1.
        replies = send_from(env, STRANGER, [request(STRANGER, heard_advertisement(env, "mn1").challenge)])
        assert [r.code for r in replies] == [Code.FA_MN_FAILED_AUTHENTICATION]  # type: ignore[union-attr]
        # And one fa1 refuses at once (a challenge it never advertised): 104.
        replies = send_from(env, STRANGER, [request(STRANGER, b"never advertised")], wait=3.0)
        assert [r.code for r in replies] == [Code.FA_UNKNOWN_CHALLENGE]  # type: ignore[union-attr]
    assert [e for e in events if any(a in e for a in (HA, AAAF1, STRANGER))] == [], events
    assert fa1_routes(env) == before
    counters = show(env, "counters", "fa1")
    assert counters["refused_by_policy"] == 2 and counters["relayed"] == relayed + 1  # type: ignore[index]
    assert [v["home_address"] for v in show(env, "visitors", "fa1")] == [HOA]  # type: ignore[index]
    assert f"{HOA} dev access" in env.exec("fa1", "ip", "route").stdout  # the real visitor's route stays


def test_floods_are_dropped_and_counted_and_a_real_challenge_survives_them(lab_up: LabEnv) -> None:
    env = lab_up
    heard = heard_advertisement(env, "mn1").challenge
    before = show(env, "counters", "fa1")
    # 200 solicitations from 100 forged sources (2 each: within every per-source limit), each
    # asking for an advertisement with a new challenge: far more than the old 8-entry window,
    # sent within the challenge's lifetime (8 advertisement intervals).
    env.exec("mn1", sys.executable, "-c", SOLICITOR, "200", "100", timeout=60)
    after = show(env, "counters", "fa1")
    assert after["advertisements"] - before["advertisements"] >= 9  # type: ignore[index,operator]
    # The challenge heard before the flood is still fa1's: the request goes on to the AAA (which
    # knows no such user: 67), not 104.
    replies = send_from(env, STRANGER, [request(STRANGER, heard)])
    assert [r.code for r in replies] == [Code.FA_MN_FAILED_AUTHENTICATION]  # type: ignore[union-attr]

    # 60 solicitations from one source: beyond its burst (20), dropped and counted.
    env.exec("mn1", sys.executable, "-c", SOLICITOR, "60", "1", timeout=60)
    assert show(env, "counters", "fa1")["solicitations_rate_limited"] > 0  # type: ignore[index]

    # 50 RRQs at once from one source: its burst (10) is answered, the rest dropped and counted.
    limited = show(env, "counters", "fa1")["rrq_rate_limited"]  # type: ignore[index]
    replies = send_from(env, STRANGER, [request(STRANGER, b"never advertised") for _ in range(50)], wait=3.0)
    assert 10 <= len(replies) <= 20 and all(r.code == Code.FA_UNKNOWN_CHALLENGE for r in replies)  # type: ignore[union-attr]
    assert show(env, "counters", "fa1")["rrq_rate_limited"] - limited >= 30  # type: ignore[index,operator]
    # The real MN is still registered through fa1.
    assert binding_via(env, FA1)()
    assert show(env, "registration", "mn1")["state"] == "registered"  # type: ignore[index]
