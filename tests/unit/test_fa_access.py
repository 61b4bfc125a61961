"""The foreign agent's access side (issue #15), in process with fake sockets and routes: the
challenge window a solicitation flood cannot empty, replay protection, per-source rate limits,
and no route for a request before it passed the checks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from daemons.agents.fa import ForeignAgent
from daemons.runtime.config import FAConfig, PeerAgent, SecurityAssociation
from daemons.runtime.secret import Secret
from daemons.wire import mip
from tests.unit.sealkit import key_file

HOA, HOA2 = IPv4Address("198.18.100.10"), IPv4Address("198.18.100.11")
HA, COA, ACCESS = IPv4Address("198.18.100.1"), IPv4Address("198.18.0.14"), IPv4Address("198.18.101.1")
MN_HA, FA_HA, MN_AAA = Secret(b"mn-ha-key-of-mn1"), Secret(b"fa-ha-key-123456"), Secret(b"mn-aaa-secret-of-mn1!")
NAI = "mn1@home.example"
Code = mip.ReplyCode


class Udp:
    """The FA's UDP endpoint: what it sent, and where (``ifindex`` None: by the routing table)."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple[str, int], int | None]] = []

    def send(self, data: bytes, addr: tuple[str, int]) -> None:
        self.sent.append((bytes(data), addr, None))

    def send_on_link(self, data: bytes, addr: tuple[str, int], ifindex: int, source: str) -> None:
        assert source == str(ACCESS)
        self.sent.append((bytes(data), addr, ifindex))

    def to(self, host: IPv4Address) -> list[bytes]:
        return [d for d, (h, _), _ in self.sent if h == str(host)]


class Routes:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    async def add(self, hoa: str) -> None:
        self.calls.append(("add", hoa))

    async def remove(self, hoa: str) -> None:
        self.calls.append(("remove", hoa))

    async def reconcile(self, hoas: list[str]) -> None: ...

    async def neighbour(self, address: str) -> str | None:
        return "02:00:00:00:00:01"


def fa_with(tmp: Path, **fields: Any) -> ForeignAgent:
    fa = ForeignAgent(FAConfig(node="fa1", role="fa", state_dir=tmp / "fa", control_socket=tmp / "fa.sock",
                               care_of_address=COA, access_address=ACCESS, challenge=True,
                               home_agents=[PeerAgent(HA, 0x2000, FA_HA)], **fields))
    fa.routes, fa.udp = Routes(), Udp()  # type: ignore[assignment]
    fa.access_ifindex = 7  # type: ignore[attr-defined]
    return fa


def rrq(challenge: bytes | None, hoa: IPv4Address = HOA, **fields: Any) -> bytes:
    args: dict[str, Any] = {"home_address": hoa, "home_agent": HA, "care_of_address": COA,
                            "identification": mip.ntp_identification(time.time()), "lifetime": 300, "nai": NAI,
                            "mn_ha": SecurityAssociation(0x1000, MN_HA), "challenge": challenge,
                            "mn_aaa": SecurityAssociation(0x3000, MN_AAA) if challenge else None, **fields}
    return mip.registration_request(**args).encode()


def ha_reply(request: bytes, code: int = 0) -> bytes:
    """The HA's answer to ``request`` as it reaches the FA: MN-HA signed, FA-HA authenticated."""
    req = mip.decode_message(request)
    rrp = mip.RegistrationReply(code=code, home_address=req.home_address, home_agent=HA,  # type: ignore[union-attr]
                                identification=req.identification, lifetime=300 if code == 0 else 0)  # type: ignore[union-attr]
    raw = mip.sign(rrp, mip.EXT_MN_HA_AUTH, 0x1000, MN_HA).encode()
    return mip.append_authenticator(raw, mip.EXT_FA_HA_AUTH, 0x2000, FA_HA)


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


async def from_mn(fa: ForeignAgent, raw: bytes, src: IPv4Address = HOA, port: int = 434,
                  ifindex: int | None = None) -> None:
    """``raw`` from ``src`` as the FA's endpoint hands it over (``ifindex``: where it came in; by
    default not said, as by an endpoint that cannot tell, which the FA takes for the access link)."""
    fa.on_datagram(raw, (str(src), port), *([] if ifindex is None else [ifindex]))  # type: ignore[call-arg]
    await settle()


async def from_ha(fa: ForeignAgent, raw: bytes) -> None:
    fa.on_datagram(raw, (str(HA), 434))
    await settle()


def denials(fa: ForeignAgent, hoa: IPv4Address = HOA) -> list[int]:
    codes = []
    for data in fa.udp.to(hoa):  # type: ignore[union-attr]
        msg = mip.decode_message(data)
        if isinstance(msg, mip.RegistrationReply) and 64 <= msg.code <= 127:
            codes.append(int(msg.code))
    return codes


def relayed(fa: ForeignAgent) -> list[bytes]:
    return fa.udp.to(HA)  # type: ignore[union-attr]


def run(coro: Callable[[], Any]) -> Any:
    return asyncio.run(coro())


# ---- the challenge window ------------------------------------------------------------------------


def test_a_solicitation_flood_cannot_push_out_a_real_mns_challenge(tmp_path: Path) -> None:
    async def main() -> None:
        fa = fa_with(tmp_path)
        mine = fa.advertiser.advertisement().challenge  # what the real MN heard
        for _ in range(5000):  # a flood of solicitations, each answered with a new challenge
            fa.advertiser.advertisement()
        request = rrq(mine)
        await from_mn(fa, request)
        assert denials(fa) == [] and len(relayed(fa)) == 1  # not 104: relayed to the HA
        await from_ha(fa, ha_reply(request))
        assert str(HOA) in fa.visitors
        # A replay of the accepted request (or any request of that MN with the spent challenge) is stale,
        # flood or no flood.
        for _ in range(5000):
            fa.advertiser.advertisement()
        await from_mn(fa, request)
        await from_mn(fa, rrq(mine))
        assert denials(fa) == [Code.FA_STALE_CHALLENGE] * 2 and len(relayed(fa)) == 1

    run(main)


def test_challenges_keep_their_rfc3012_codes(tmp_path: Path) -> None:
    async def main() -> None:
        fa = fa_with(tmp_path)
        now = [1000.0]
        fa.advertiser.challenges.clock = lambda: now[0]  # type: ignore[union-attr]
        mine = fa.advertiser.advertisement().challenge
        assert mine is not None and len(mine) == 16
        await from_mn(fa, rrq(None))  # no challenge: 105
        await from_mn(fa, rrq(bytes(16)))  # never advertised: 104
        await from_mn(fa, rrq(mine[:8] + bytes(8)))  # ours in form, tag forged: 104
        assert denials(fa) == [Code.FA_MISSING_CHALLENGE, Code.FA_UNKNOWN_CHALLENGE, Code.FA_UNKNOWN_CHALLENGE]
        # Valid for (window - 1) .. window advertisement intervals (8 x 1 s by default), then stale: 106.
        now[0] += 7.0
        await from_mn(fa, rrq(mine))
        assert len(relayed(fa)) == 1
        now[0] += 1.0
        await from_mn(fa, rrq(mine))
        assert denials(fa)[3:] == [Code.FA_STALE_CHALLENGE] and len(relayed(fa)) == 1

    run(main)


def test_two_mns_that_heard_one_advertisement_may_both_use_it(tmp_path: Path) -> None:
    """Advertisements are multicast: every MN on the link hears the same challenge. Spent per MN."""
    async def main() -> None:
        fa = fa_with(tmp_path)
        shared = fa.advertiser.advertisement().challenge
        first = rrq(shared)
        await from_mn(fa, first)
        await from_ha(fa, ha_reply(first))
        await from_mn(fa, rrq(shared, hoa=HOA2), src=HOA2)
        assert denials(fa, HOA2) == [] and len(relayed(fa)) == 2

    run(main)


@pytest.mark.parametrize("window", [1, 3, 8])
def test_the_window_is_counted_in_advertisement_intervals(tmp_path: Path, window: int) -> None:
    from daemons.agents.challenges import ChallengeWindow, Verdict

    now = [50.0]
    cw = ChallengeWindow(2.0, window, clock=lambda: now[0])
    c = cw.issue()
    assert cw.check(c, "mn") is Verdict.FRESH
    now[0] += 2.0 * (window - 1)
    assert cw.check(c, "mn") is Verdict.FRESH
    cw.spend(c, "mn")
    assert (cw.check(c, "mn"), cw.check(c, "other"), cw.spent) == (Verdict.SPENT, Verdict.FRESH, 1)
    now[0] += 2.0
    assert cw.check(c, "mn") is Verdict.STALE and cw.check(c, "other") is Verdict.STALE
    assert cw.spent == 0  # forgotten once stale: the table holds only the window's registrations
    assert cw.check(c[:15], "mn") is Verdict.UNKNOWN and cw.check(bytes([c[0] ^ 1]) + c[1:], "mn") is Verdict.UNKNOWN
    assert ChallengeWindow(2.0, window).check(c, "mn") is Verdict.UNKNOWN  # another daemon's (or before a restart)


# ---- per-source rate limits ------------------------------------------------------------------------


def test_an_rrq_flood_from_one_source_is_dropped_and_counted_and_others_get_through(tmp_path: Path) -> None:
    async def main() -> None:
        fa = fa_with(tmp_path)
        flooder = IPv4Address("198.18.101.66")
        for _ in range(200):
            fa.on_datagram(rrq(bytes(16), hoa=flooder), (str(flooder), 434))
        await settle()
        # The default burst (10) was handled (each refused: a made-up challenge); the rest dropped unanswered.
        assert len(denials(fa, flooder)) == 10
        assert fa.counters["rrq_rate_limited"] == 190
        await from_mn(fa, rrq(fa.advertiser.advertisement().challenge))  # the real MN, meanwhile
        assert denials(fa) == [] and len(relayed(fa)) == 1

    run(main)


def test_a_real_mns_retransmissions_are_never_limited(tmp_path: Path) -> None:
    """RFC 5944 §3.6.3 back-off (1 s doubling) plus a 133 resynchronisation and a few re-registrations."""
    async def main() -> None:
        fa = fa_with(tmp_path)
        now = [0.0]
        fa.rrq_limit.clock = fa.advertiser.challenges.clock = lambda: now[0]  # type: ignore[union-attr,attr-defined]
        for at in (0.0, 0.0, 1.0, 3.0, 7.0, 15.0, 15.0, 16.0, 17.0, 17.5, 18.0, 18.5, 19.0):
            now[0] = at
            await from_mn(fa, rrq(fa.advertiser.advertisement().challenge))
        assert fa.counters["rrq_rate_limited"] == 0 and len(relayed(fa)) == 13

    run(main)


class Raw:
    """The advertiser's raw ICMP socket: hands out queued IPv4 packets, records advertisements sent."""

    def __init__(self) -> None:
        self.inbox: list[bytes] = []
        self.sent: list[float] = []
        self._pair = __import__("socket").socketpair()

    def fileno(self) -> int:
        return self._pair[0].fileno()

    def recvfrom(self, size: int) -> tuple[bytes, Any]:
        if not self.inbox:
            raise BlockingIOError
        return self.inbox.pop(0), None

    def sendto(self, data: bytes, addr: Any) -> int:
        self.sent.append(time.monotonic())
        return len(data)

    def close(self) -> None:
        for s in self._pair:
            s.close()


def solicitation_from(src: IPv4Address) -> bytes:
    import struct

    icmp = mip.AgentSolicitation().encode()
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 0, 0, 1, 1, 0, src.packed,
                         IPv4Address("224.0.0.2").packed)
    header = header[:10] + struct.pack("!H", mip.internet_checksum(header)) + header[12:]
    return header + icmp


def test_a_solicitation_flood_from_one_source_is_dropped_and_counted(tmp_path: Path) -> None:
    fa = fa_with(tmp_path)
    adv = fa.advertiser
    adv.sock = Raw()  # type: ignore[assignment]
    flooder, mn = IPv4Address("198.18.101.66"), HOA
    try:
        for _ in range(300):
            adv.sock.inbox.append(solicitation_from(flooder))  # type: ignore[attr-defined]
            adv.on_icmp()
        assert (adv.counters["solicitations"], adv.counters["solicitations_rate_limited"]) == (20, 280)
        adv.now.clear()
        adv.sock.inbox.append(solicitation_from(mn))  # type: ignore[attr-defined]
        adv.on_icmp()
        assert adv.counters["solicitations"] == 21 and adv.now.is_set()  # answered at once
    finally:
        adv.sock.close()  # type: ignore[attr-defined]


def test_solicited_advertisements_are_spaced_whatever_the_sources(tmp_path: Path, monkeypatch: Any) -> None:
    """Solicitations from ever new (forged) sources pass every per-source bucket: the agent still
    sends at most one solicited advertisement per MIN_SOLICITED_GAP (an upper bound: a slower
    machine only sends fewer)."""
    from daemons.agents import advertiser as advertiser_module

    raw = Raw()
    monkeypatch.setattr(advertiser_module, "icmp_socket", lambda *a, **k: raw)

    async def main() -> tuple[int, float]:
        adv = fa_with(tmp_path).advertiser
        task = asyncio.create_task(adv.run())
        await asyncio.sleep(0.01)
        started, before = time.monotonic(), len(raw.sent)
        while time.monotonic() - started < 0.3:
            adv.now.set()  # what on_icmp does for each solicitation that passes
            await asyncio.sleep(0)
        elapsed, count = time.monotonic() - started, len(raw.sent) - before
        task.cancel()
        asyncio.get_running_loop().remove_reader(raw.fileno())
        return count, elapsed

    try:
        count, elapsed = asyncio.run(main())
    finally:
        raw.close()
    assert 1 <= count <= elapsed / advertiser_module.MIN_SOLICITED_GAP + 2


def test_rate_limits_are_configured_and_checked(tmp_path: Path) -> None:
    from daemons.roles import load_config
    from daemons.runtime.config import ConfigError

    def load(**fields: Any) -> Any:
        path = tmp_path / "fa.yaml"
        base = {"node": "fa1", "role": "fa", "state_dir": str(tmp_path), "control_socket": str(tmp_path / "s"),
                "access_address": "198.18.101.1", "care_of_address": "198.18.0.14"}
        path.write_text(__import__("yaml").safe_dump({**base, **fields}))
        return load_config(path)

    cfg = load()
    assert (cfg.rrq_rate, cfg.rrq_burst, cfg.solicitation_rate, cfg.solicitation_burst, cfg.rate_limit_sources) \
        == (2.0, 10, 20.0, 20, 4096)
    assert load(rrq_rate=0.5, rrq_burst=3).rrq_burst == 3
    for field, value, problem in (("rrq_rate", 0, "must be greater than 0"), ("solicitation_burst", 0, "at least 1"),
                                  ("rate_limit_sources", 0, "at least 1"), ("challenge_window", 0, "at least 1"),
                                  ("advertisement_interval", 0, "greater than 0")):
        with pytest.raises(ConfigError, match=f"fa.yaml: {field}: .*{problem}"):
            load(**{field: value})


def test_the_limiter_table_stays_bounded_and_forgets_only_into_full_buckets() -> None:
    from daemons.runtime.ratelimit import Limit, RateLimiter

    now = [0.0]
    lim = RateLimiter(rate=1.0, burst=2, max_sources=3, clock=lambda: now[0])
    assert [lim.check("a") for _ in range(3)] == [Limit.PASS, Limit.PASS, Limit.FIRST_DROP]
    assert lim.check("a") is Limit.DROP and lim.dropped == 2
    for src in ("b", "c", "d", "e"):  # "d" and "e" find the table full: they share one bucket
        lim.check(src)
    assert len(lim) == 3 and lim.overflowed == 2
    assert lim.check("f") is Limit.FIRST_DROP  # the shared bucket is empty
    now[0] += 2.0  # every bucket full again: entries go, a returning source starts with a full bucket
    assert [lim.check("a") for _ in range(2)] == [Limit.PASS, Limit.PASS] and len(lim) <= 3


# ---- no route before the checks; replies on the link ----------------------------------------------

AAAF = IPv4Address("198.18.0.10")


def aaa_fa(tmp: Path) -> ForeignAgent:
    """An FA with an AAAF configured (not dialled: without a Diameter node it relays to the HA)."""
    from daemons.runtime.config import DiameterPeer

    return fa_with(tmp, aaa=DiameterPeer("aaaf1.visit-a.example", "visit-a.example", AAAF),
                   seal=key_file(tmp, "visit-a.example"))


@pytest.mark.parametrize("claimed", [HA, AAAF, COA, ACCESS, IPv4Address("224.0.0.1"), IPv4Address("0.0.0.0")],
                         ids=["home-agent", "aaaf", "care-of", "access", "multicast", "unspecified"])
def test_an_rrq_claiming_an_infrastructure_address_adds_no_route(tmp_path: Path, claimed: IPv4Address) -> None:
    """Sent from the claimed address itself (an on-link attacker can), with a genuine challenge."""
    async def main() -> None:
        fa = aaa_fa(tmp_path)
        await from_mn(fa, rrq(fa.advertiser.advertisement().challenge, hoa=claimed), src=claimed)
        assert fa.routes.calls == []  # type: ignore[attr-defined]
        assert not any(isinstance(mip.decode_message(d), mip.RegistrationRequest)  # not relayed
                       for d, _, _ in fa.udp.sent)  # type: ignore[union-attr]
        assert denials(fa, claimed) == [Code.FA_ADMINISTRATIVELY_PROHIBITED]
        ((_, (to, _port), ifindex),) = fa.udp.sent  # type: ignore[union-attr]
        assert (to, ifindex) == (str(claimed), 7)  # on the access link, no route needed
        assert fa.counters["refused_by_policy"] == 1 and fa.pending == {}

    run(main)


def test_an_rrq_must_come_from_the_home_address_it_claims(tmp_path: Path) -> None:
    async def main() -> None:
        fa = fa_with(tmp_path)
        other = IPv4Address("198.18.101.50")
        await from_mn(fa, rrq(fa.advertiser.advertisement().challenge), src=other)
        assert relayed(fa) == [] and fa.routes.calls == []  # type: ignore[attr-defined]
        assert denials(fa, other) == [Code.FA_ADMINISTRATIVELY_PROHIBITED]  # answered where it came from

    run(main)


def test_refused_requests_leave_the_routes_alone_and_their_denials_go_on_the_link(tmp_path: Path) -> None:
    async def main() -> None:
        fa = fa_with(tmp_path, registration_timeout=0.05)
        # Refused by us (a made-up challenge), by the HA (131), and by nobody answering (78).
        await from_mn(fa, rrq(bytes(16)))
        request = rrq(fa.advertiser.advertisement().challenge)
        await from_mn(fa, request)
        assert fa.routes.calls == []  # type: ignore[attr-defined]  # relayed, no route yet
        await from_ha(fa, ha_reply(request, code=Code.HA_MN_FAILED_AUTHENTICATION))
        await from_mn(fa, rrq(fa.advertiser.advertisement().challenge))
        await asyncio.sleep(0.1)
        await settle()
        assert fa.routes.calls == [] and fa.visitors == {}  # type: ignore[attr-defined]
        to_mn = [(mip.decode_message(d).code, ifindex) for d, (h, _), ifindex in fa.udp.sent  # type: ignore[union-attr]
                 if h == str(HOA)]
        assert to_mn == [(Code.FA_UNKNOWN_CHALLENGE, 7), (Code.HA_MN_FAILED_AUTHENTICATION, 7),
                         (Code.FA_REGISTRATION_TIMEOUT, 7)]

    run(main)


def test_the_route_comes_with_the_home_agents_yes(tmp_path: Path) -> None:
    async def main() -> None:
        fa = fa_with(tmp_path)
        request = rrq(fa.advertiser.advertisement().challenge)
        await from_mn(fa, request)
        (pending,) = fa.pending.values()
        assert (pending.source, pending.lladdr) == (str(HOA), "02:00:00:00:00:01")
        assert fa.routes.calls == []  # type: ignore[attr-defined]
        reply = ha_reply(request)
        await from_ha(fa, reply)
        assert fa.routes.calls == [("add", str(HOA))] and str(HOA) in fa.visitors  # type: ignore[attr-defined]
        (data, addr, ifindex) = fa.udp.sent[-1]  # type: ignore[union-attr]
        assert mip.decode_message(data).code == 0 and (addr, ifindex) == ((str(HOA), 434), 7)  # type: ignore[union-attr]

    run(main)


class Guarding:
    """Stands in for the path control's VPN-only access guard (``MavpnControl.guard_*``):
    writes into the routes' record, so the order of guard and route shows."""

    def __init__(self, record: list[tuple[str, str]]) -> None:
        self.record = record

    async def guard_visitor(self, hoa: str) -> None:
        self.record.append(("guard", hoa))

    async def release_visitor(self, hoa: str) -> None:
        self.record.append(("release", hoa))

    async def remove_user(self, nai: str) -> None: ...


def test_the_visitor_is_guarded_before_its_route_and_released_after_it(tmp_path: Path) -> None:
    """VPN-only access: from the moment its host route makes a visitor forwardable, its traffic
    must leave through its paths only (docs/protocol.md, "VPN-only access")."""
    async def main() -> None:
        fa = fa_with(tmp_path, registration_timeout=0.05)
        fa.mavpn = Guarding(fa.routes.calls)  # type: ignore[assignment,attr-defined]
        refused = rrq(fa.advertiser.advertisement().challenge)
        await from_mn(fa, refused)
        await from_ha(fa, ha_reply(refused, code=Code.HA_MN_FAILED_AUTHENTICATION))
        assert fa.routes.calls == []  # type: ignore[attr-defined]  # not taken in: the access blackhole holds it
        request = rrq(fa.advertiser.advertisement().challenge)
        await from_mn(fa, request)
        assert fa.routes.calls == []  # type: ignore[attr-defined]
        await from_ha(fa, ha_reply(request))
        assert fa.routes.calls == [("guard", str(HOA)), ("add", str(HOA))]  # type: ignore[attr-defined]
        await fa.remove_visitor(str(HOA), "lifetime expired")
        assert fa.routes.calls[2:] == [("remove", str(HOA)), ("release", str(HOA))]  # type: ignore[attr-defined]

    run(main)


def test_rrqs_that_come_in_from_the_core_are_dropped_and_counted(tmp_path: Path) -> None:
    async def main() -> None:
        fa = fa_with(tmp_path)
        await from_mn(fa, rrq(fa.advertiser.advertisement().challenge), ifindex=3)  # not the access link (7)
        assert fa.counters["rrq_not_on_access"] == 1
        assert fa.udp.sent == [] and fa.routes.calls == [] and fa.pending == {}  # type: ignore[union-attr,attr-defined]
        await from_mn(fa, rrq(fa.advertiser.advertisement().challenge), ifindex=7)
        assert len(relayed(fa)) == 1

    run(main)


def test_rrqs_from_the_core_in_a_real_mns_name_do_not_use_up_its_rate_limit(tmp_path: Path,
                                                                             caplog: pytest.LogCaptureFixture) -> None:
    """Its home address is a source anyone can put on a datagram sent from the core (before it
    registers here, the FA's own route for it points there too): those are dropped as not from the
    access link before they take a token of the MN's bucket, and logged at 1, 2, 4 ... drops only."""
    import logging

    async def main() -> None:
        fa = fa_with(tmp_path)
        for _ in range(100):
            fa.on_datagram(rrq(bytes(16)), (str(HOA), 434), 3)  # type: ignore[call-arg]
        await settle()
        assert fa.counters["rrq_not_on_access"] == 100 and fa.counters["rrq_rate_limited"] == 0
        await from_mn(fa, rrq(fa.advertiser.advertisement().challenge), ifindex=7)  # the real MN
        assert len(relayed(fa)) == 1

    with caplog.at_level(logging.WARNING, logger="mipvpn.fa"):
        run(main)
    assert [r.fields["count"] for r in caplog.records  # type: ignore[attr-defined]
            if r.getMessage() == "event=rrq.not_on_access"] == [1, 2, 4, 8, 16, 32, 64]


def test_a_nai_cannot_forge_an_fa_log_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from daemons.runtime.log import EventFormatter

    forged = "x@home.example\n2026-01-01T00:00:00.000Z INFO node=fa1 event=visitor.added mn=victim@home.example"

    async def main() -> None:
        fa = fa_with(tmp_path)
        await from_mn(fa, rrq(bytes(16), nai=forged))

    with caplog.at_level(logging.INFO, logger="mipvpn.fa"):
        run(main)
    from daemons.provision.demo import FIELD, LOG_LINE

    lines = "\n".join(EventFormatter().format(r) for r in caplog.records).splitlines()
    events = []
    for line in lines:  # read as `mipvpn lab demo` reads the daemons' logs
        m = LOG_LINE.match(line)
        assert m is not None, line
        fields = dict(FIELD.findall(m.group(4)))
        events.append(fields["event"])
    assert events == ["rrq.received", "rrp.denied"]  # one line each, no visitor.added



def test_a_copy_of_a_pending_request_changes_nothing(tmp_path: Path) -> None:
    """The same RRQ again while it is pending (duplicated on the way, or replayed by someone on
    the link): dropped. It used to replace the pending entry, whose new Diameter session made the
    FA refuse the first request's AMA (71) though the home agent had accepted the registration."""
    from daemons.wire.diameter import Message

    class SlowAaa:
        """The FA's Diameter node: a new session per AMR; answers each with the HA's yes, when told."""

        def __init__(self, reply: bytes) -> None:
            self.reply = reply
            self.requests: list[Message] = []
            self.go = asyncio.Event()

        def session_id(self, *parts: object) -> str:
            return f"fa1.visit-a.example;1;{len(self.requests) + 1}"

        async def request(self, msg: Message, timeout: float = 0) -> Message:  # noqa: ASYNC109
            msg.hop_by_hop, msg.end_to_end = 7, 8 + len(self.requests)
            self.requests.append(msg)
            await self.go.wait()
            return Message.decode(msg.answer(2001, [("MIP-Reg-Reply", self.reply)]).encode())

    async def main() -> None:
        fa = fa_with(tmp_path)
        request = rrq(fa.advertiser.advertisement().challenge)
        req = mip.decode_message(request)
        yes = mip.RegistrationReply(code=0, home_address=HOA, home_agent=HA, lifetime=300,
                                    identification=req.identification)  # type: ignore[union-attr]
        fa.diameter = aaa = SlowAaa(mip.sign(yes, mip.EXT_MN_HA_AUTH, 0x1000, MN_HA).encode())  # type: ignore[assignment]
        await from_mn(fa, request)
        await from_mn(fa, request)
        assert len(aaa.requests) == 1 and fa.counters["rrq_duplicate"] == 1
        aaa.go.set()
        await settle()
        assert [mip.decode_message(d).code for d in fa.udp.to(HOA)] == [Code.ACCEPTED]  # type: ignore[union-attr]
        assert str(HOA) in fa.visitors

    run(main)
