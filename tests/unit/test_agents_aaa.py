"""The Diameter sides of the FA (AMR out, AMA in, STR) and of the HA (HAR in, HAA out), in
process with fake sockets, routes and Diameter node: what each sends for each kind of answer."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from daemons.aaa import application as app
from daemons.agents.fa import ForeignAgent, Pending, Visitor
from daemons.agents.ha import HomeAgent
from daemons.diameter.node import DiameterError
from daemons.diameter.peer import Peer
from daemons.runtime.config import AcceptedPeer, FAConfig, HAConfig, MobileNodeEntry, PeerAgent, SecurityAssociation
from daemons.runtime.secret import Secret
from daemons.vpn.path import EndpointType
from daemons.wire import mip
from daemons.wire.diameter import Message, ResultCode, TerminationCause
from tests.unit.sealkit import key_file, sealed
from tests.unit.test_vpninfo import NAI, info

HOA, HA, COA = IPv4Address("198.18.100.10"), IPv4Address("198.18.100.1"), IPv4Address("198.18.0.14")
MN_HA, FA_HA = Secret(b"mn-ha-key-of-mn1"), Secret(b"fa-ha-key-123456")
SID = "fa1.visit-a.example;1;1"
FA_REALM = "visit-a.example"  # the recipients the AAAH seals for: the FA's domain, the HA (below)
HA_NAME = "ha.home"


def for_fa(*paths: Any) -> list[Any]:
    """VPN-Info AVPs as the AAAH sends them to the FAs of our domain."""
    return [p.to_avp() for p in sealed(FA_REALM, paths)]


def for_ha(*paths: Any) -> list[Any]:
    return [p.to_avp() for p in sealed(HA_NAME, paths)]
Code = mip.ReplyCode


def rrq_bytes(ha_key: Secret = MN_HA) -> bytes:
    return mip.registration_request(home_address=HOA, home_agent=HA, care_of_address=COA,
                                    identification=mip.ntp_identification(time.time()), lifetime=300, nai=NAI,
                                    mn_ha=SecurityAssociation(0x1000, ha_key), challenge=bytes(range(16)),
                                    mn_aaa=SecurityAssociation(0x3000, Secret(b"mn-aaa-secret-of-mn1!"))).encode()


class Udp:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple[str, int]]] = []

    def send(self, data: bytes, addr: tuple[str, int]) -> None:
        self.sent.append((bytes(data), addr))


class NoRoutes:
    async def add(self, hoa: str) -> None: ...
    async def remove(self, hoa: str) -> None: ...
    async def intercept(self, hoa: str) -> None: ...
    async def release(self, hoa: str) -> None: ...


class Diameter:
    """The FA's node: records requests, answers with ``answer(request)``."""

    def __init__(self, answer: Callable[[Message], Message]) -> None:
        self.answer = answer
        self.requests: list[Message] = []

    def session_id(self, *parts: object) -> str:
        return SID

    async def request(self, msg: Message, timeout: float = 0) -> Message:  # noqa: ASYNC109
        msg.hop_by_hop, msg.end_to_end = 7, 8
        self.requests.append(msg)
        return Message.decode(self.answer(Message.decode(msg.encode())).encode())


def fa_with(tmp: Path, answer: Callable[[Message], Message]) -> ForeignAgent:
    fa = ForeignAgent(FAConfig(node="fa1", role="fa", state_dir=tmp / "fa", control_socket=tmp / "fa.sock",
                               care_of_address=COA, access_address=IPv4Address("198.18.20.1"), challenge=False,
                               home_agents=[PeerAgent(HA, 0x2000, FA_HA)], seal=key_file(tmp, FA_REALM)))
    fa.routes, fa.udp, fa.diameter = NoRoutes(), Udp(), Diameter(answer)  # type: ignore[assignment]
    return fa


async def register_through_aaa(fa: ForeignAgent, raw: bytes) -> Pending | None:
    rrq = mip.decode_message(raw)
    assert isinstance(rrq, mip.RegistrationRequest)
    key = (str(HOA), rrq.identification & 0xFFFFFFFF)
    fa.pending[key] = Pending(rrq, raw, NAI, 434, time.monotonic())
    await fa.ask_aaa(rrq, raw)
    await asyncio.sleep(0)
    return fa.pending.get(key)


def reply_for(raw: bytes, code: int = 0) -> bytes:
    rrq = mip.decode_message(raw)
    rrp = mip.RegistrationReply(code=code, home_address=HOA, home_agent=HA, identification=rrq.identification,
                                lifetime=300 if code == 0 else 0)
    return mip.sign(rrp, mip.EXT_MN_HA_AUTH, 0x1000, MN_HA).encode()


def test_fa_sends_the_amr_and_relays_the_home_answer(tmp_path: Path) -> None:
    raw = rrq_bytes()
    rrp = reply_for(raw)
    fa = fa_with(tmp_path, lambda amr: amr.answer(2001, [("MIP-Reg-Reply", rrp), *for_fa(info())]))
    assert asyncio.run(register_through_aaa(fa, raw)) is None  # answered
    (amr,) = fa.diameter.requests  # type: ignore[attr-defined]
    parsed = app.parse_amr(amr)
    assert parsed.session_id == SID and parsed.rrq_raw == raw and amr.find("MIP-MN-AAA-Auth") is not None
    assert amr.get("Destination-Realm") == "home.example"
    assert fa.udp.sent == [(rrp, (str(HOA), 434))]  # type: ignore[union-attr]  # no MN-HA-covered bytes cut
    assert fa.visitors[str(HOA)].session_id == SID and fa.counters["accepted"] == 1


def test_fa_sends_the_rrq_to_the_ha_when_the_local_aaa_answered(tmp_path: Path) -> None:
    raw = rrq_bytes()
    path = info()
    fa = fa_with(tmp_path, lambda amr: amr.answer(2001, [("Auth-Application-Id", 2), *for_fa(path)]))
    pending = asyncio.run(register_through_aaa(fa, raw))
    assert pending is not None and pending.vpn == [path]
    ((relayed, to),) = fa.udp.sent  # type: ignore[union-attr]
    assert to == (str(HA), 434) and mip.verify(relayed, mip.EXT_FA_HA_AUTH, FA_HA, spi=0x2000)


@pytest.mark.parametrize(("answer", "code"), [
    (lambda amr: amr.answer(4001, [("Error-Message", "MN-AAA authentication failed")]),
     Code.FA_MN_FAILED_AUTHENTICATION),
    (lambda amr: amr.answer(4006), Code.FA_HA_UNREACHABLE),
    (lambda amr: amr.answer(2001), Code.FA_REASON_UNSPECIFIED),  # success without a reply or VPN info
    (lambda amr: amr.answer(2001, [("MIP-Reg-Reply", b"\x03\x00")]), Code.FA_POORLY_FORMED_REPLY),
    (lambda amr: amr.answer(2001, [("MIP-Reg-Reply", amr.get("MIP-Reg-Request"))]), Code.FA_POORLY_FORMED_REPLY),
], ids=["4001", "4006", "2001-empty", "garbage-reply", "not-a-reply"])
def test_fa_denies_what_the_aaa_refused_or_garbled(tmp_path: Path, answer: Callable[[Message], Message],
                                                   code: Code) -> None:
    fa = fa_with(tmp_path, answer)
    assert asyncio.run(register_through_aaa(fa, rrq_bytes())) is None
    ((denial, to),) = fa.udp.sent  # type: ignore[union-attr]
    rrp = mip.decode_message(denial)
    assert to == (str(HOA), 434) and isinstance(rrp, mip.RegistrationReply) and rrp.code == code
    assert fa.visitors == {}


def test_fa_logs_every_ama_it_receives_with_its_vpn_info_count(tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """``ama.received`` comes before the answer is judged, also for one it cannot use."""
    fa = fa_with(tmp_path, lambda amr: amr.answer(2001, [("MIP-Reg-Reply", b"\x03\x00"), *for_fa(info())]))
    with caplog.at_level(logging.INFO, logger="mipvpn.fa"):
        assert asyncio.run(register_through_aaa(fa, rrq_bytes())) is None
    (fields,) = [getattr(r, "fields", {}) for r in caplog.records if r.getMessage() == "event=ama.received"]
    assert fields == {"mn": NAI, "sid": SID, "result": 2001, "paths": 1}
    assert mip.decode_message(fa.udp.sent[0][0]).code == Code.FA_POORLY_FORMED_REPLY  # type: ignore[union-attr]


def test_fa_ends_the_session_with_an_str(tmp_path: Path) -> None:
    fa = fa_with(tmp_path, lambda req: req.answer(2001))
    visitor = Visitor(NAI, str(HOA), str(HA), 434, 300, time.time() + 300, 1, SID)
    asyncio.run(fa.end_session(visitor, TerminationCause.DIAMETER_USER_MOVED))
    (str_,) = fa.diameter.requests  # type: ignore[attr-defined]
    assert app.parse_str(str_) == app.Str(SID, NAI)
    assert str_.get("Termination-Cause") == TerminationCause.DIAMETER_USER_MOVED
    assert str_.application_id == 2 and str_.get("Destination-Realm") == "home.example"


# ---- the HA --------------------------------------------------------------------------------------


AAAH_PEER = Peer("aaah.home", "home")  # the connection's peer, as the Diameter engine identified it


def ha_with(tmp: Path) -> HomeAgent:
    ha = HomeAgent(HAConfig(node="ha", role="ha", state_dir=tmp / "ha", control_socket=tmp / "ha.sock", address=HA,
                            home_prefix=IPv4Network("198.18.100.0/24"),
                            mobile_nodes=[MobileNodeEntry(NAI, HOA, 0x1000, MN_HA)],
                            accept_peers=[AcceptedPeer("aaah.home", "home", [IPv4Network("198.18.0.6/32")])],
                            seal=key_file(tmp, HA_NAME)))
    ha.home_link, ha.udp = NoRoutes(), Udp()  # type: ignore[assignment]
    return ha


def har(raw: bytes, *vpn: Any) -> Message:
    msg = Message.request("HAR", [("Session-Id", "s;1"), ("Auth-Application-Id", 2), ("Origin-Host", "aaah.home"),
                                  ("Origin-Realm", "home"), ("User-Name", NAI), ("MIP-Reg-Request", raw), *vpn],
                          hop_by_hop=1, end_to_end=2)
    return Message.decode(msg.encode())


def on_har(ha: HomeAgent, msg: Message, peer: Peer | None = AAAH_PEER) -> Message:
    return asyncio.run(ha.on_har(msg, peer))


def test_ha_answers_a_har_with_its_reply(tmp_path: Path) -> None:
    ha = ha_with(tmp_path)
    ha_view = info().mirrored()
    assert ha_view.path.local.type is EndpointType.HA
    haa = on_har(ha, har(rrq_bytes(), *for_ha(ha_view)))
    got = app.parse_haa(haa)
    assert got.result_code == ResultCode.DIAMETER_SUCCESS and got.accepted and haa.get("User-Name") == NAI
    assert [a.name for a in haa.avps] == ["Session-Id", "Result-Code", "MIP-Reg-Reply", "User-Name"]
    assert ha.bindings[str(HOA)].relayed_by == "aaa:aaah.home" and ha.counters["accepted"] == 1


def test_ha_refusal_goes_back_in_a_4005(tmp_path: Path) -> None:
    haa = app.parse_haa(on_har(ha_with(tmp_path), har(rrq_bytes(ha_key=Secret(b"not-the-mn-ha-key")))))
    assert haa.result_code == ResultCode.DIAMETER_ERROR_MIP_REPLY_FAILURE and haa.rrp is not None
    assert haa.rrp.code == Code.HA_MN_FAILED_AUTHENTICATION


def test_ha_answers_an_rrq_with_an_unknown_extension_as_poorly_formed(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """RFC 5944 §3.8.2.1, as on UDP 434: the parser refuses the RRQ, the HA still answers it
    (and logs the HAR's arrival, as for any other HAR)."""
    raw = rrq_bytes()
    ha = ha_with(tmp_path)
    with caplog.at_level(logging.INFO, logger="mipvpn.ha"):
        haa = app.parse_haa(on_har(ha, har(raw[:24] + bytes([50, 2, 0, 0]) + raw[24:], *for_ha(info().mirrored()))))
    assert haa.result_code == ResultCode.DIAMETER_ERROR_MIP_REPLY_FAILURE and haa.rrp is not None
    assert haa.rrp.code == Code.HA_POORLY_FORMED_REQUEST and ha.counters["malformed"] == 1
    events = [(r.getMessage(), getattr(r, "fields", {})) for r in caplog.records]
    assert [m for m, _ in events][:2] == ["event=har.received", "event=rrq.unknown_extension"]
    assert events[0][1] == {"mn": NAI, "sid": "s;1", "paths": 1}


@pytest.mark.parametrize(("raw", "vpn", "message"), [
    (b"\x01\x02", False, "MIP-Reg-Request is not a valid RRQ"),
    (mip.RegistrationReply(code=0, home_address=HOA, home_agent=HA, identification=1).encode(), False,
     "MIP-Reg-Request is not a valid RRQ"),
    (b"\x01", True, "VPN-Info: unknown VPN-ESP-Suite None"),  # VPN info is checked first
], ids=["garbage", "a-reply", "bad-vpn-info"])
def test_ha_refuses_an_unusable_har(tmp_path: Path, raw: bytes, vpn: bool, message: str) -> None:
    bad = info().to_avp()
    bad.value = [a for a in bad.value if a.name != "VPN-ESP-Suite"]
    ha = ha_with(tmp_path)
    with pytest.raises(DiameterError) as e:
        on_har(ha, har(raw, *([bad] if vpn else [])))
    assert e.value.result_code == ResultCode.DIAMETER_INVALID_AVP_VALUE and e.value.error_message == message
    assert ha.bindings == {}


# ---- sealed keys (daemons.vpn.seal): refused unless they open under our own key ------------------

def tampered(avp: Any, at: int = -1) -> Any:
    """The VPN-Info AVP with one byte of its VPN-Sealed-Keys envelope flipped."""
    (env,) = [a for a in avp.value if a.name == "VPN-Sealed-Keys"]
    blob = bytearray(env.value)
    blob[at] ^= 0x01
    env.value = bytes(blob)
    return avp


def with_spi_in(avp: Any, spi: int) -> Any:
    (member,) = [a for a in avp.value if a.name == "VPN-SPI-In"]
    member.value = spi
    return avp


@pytest.mark.parametrize("change", ["tag", "key-id", "other-domain", "spi", "local-answer"])
def test_fa_refuses_keys_that_do_not_open_and_counts_them(tmp_path: Path, change: str) -> None:
    """A changed envelope, another domain's envelope, or an SPI changed on the way: the
    registration fails (71 to the MN), nothing is installed, nothing goes to the HA."""
    raw = rrq_bytes()
    if change == "other-domain":
        avps = [p.to_avp() for p in sealed("visit-b.example", [info()])]
    else:
        (avp,) = for_fa(info())
        avps = [tampered(avp) if change in ("tag", "local-answer") else
                tampered(avp, 1) if change == "key-id" else with_spi_in(avp, 0x12345)]
    head = [("Auth-Application-Id", 2)] if change == "local-answer" else [("MIP-Reg-Reply", reply_for(raw))]
    fa = fa_with(tmp_path, lambda amr: amr.answer(2001, [*head, *avps]))
    assert asyncio.run(register_through_aaa(fa, raw)) is None
    ((denial, to),) = fa.udp.sent  # type: ignore[union-attr]  # to the MN only, never to the HA
    assert to == (str(HOA), 434) and mip.decode_message(denial).code == Code.FA_POORLY_FORMED_REPLY
    assert fa.visitors == {} and fa.counters["seal_open_failed"] == 1


def test_fa_refuses_keys_in_clear(tmp_path: Path) -> None:
    """The old wire form (VPN-Key-In/Out, VPN-IKE-PSK in clear) is nobody's any more: refused, counted."""
    raw = rrq_bytes()
    fa = fa_with(tmp_path, lambda amr: amr.answer(2001, [("MIP-Reg-Reply", reply_for(raw)), info().record_avp()]))
    assert asyncio.run(register_through_aaa(fa, raw)) is None
    assert mip.decode_message(fa.udp.sent[0][0]).code == Code.FA_POORLY_FORMED_REPLY  # type: ignore[union-attr]
    assert fa.visitors == {} and fa.counters["keys_in_clear_refused"] == 1


@pytest.mark.parametrize("change", ["tag", "spi", "other-recipient"])
def test_ha_refuses_keys_that_do_not_open_with_4007(tmp_path: Path, change: str) -> None:
    ha = ha_with(tmp_path)
    view = info().mirrored()
    if change == "other-recipient":
        avp = sealed("another-ha.home", [view])[0].to_avp()
    else:
        (avp,) = for_ha(view)
        avp = tampered(avp) if change == "tag" else with_spi_in(avp, 0x12345)
    with pytest.raises(DiameterError) as e:
        on_har(ha, har(rrq_bytes(), avp))
    assert e.value.result_code == ResultCode.DIAMETER_ERROR_BAD_KEY
    assert ha.bindings == {} and ha.counters["seal_open_failed"] == 1 and ha.counters["accepted"] == 0
