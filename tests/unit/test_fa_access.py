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
