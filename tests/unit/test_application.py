"""The RFC 4004 application module: every message built, encoded, decoded and parsed back; the
AVP order and header flags the roles have always sent; unusable messages refused with the
Result-Code and Failed-AVP of the error answer."""

from __future__ import annotations

import time
from dataclasses import replace
from ipaddress import IPv4Address

import pytest

from daemons.aaa import application as app
from daemons.runtime.config import SecurityAssociation
from daemons.runtime.secret import Secret
from daemons.vpn.vpninfo import VpnInfo
from daemons.wire import mip
from daemons.wire.diameter import FLAG_ERROR, FLAG_PROXIABLE, FLAG_REQUEST, Avp, Message, ResultCode, TerminationCause
from tests.unit.sealkit import sealed
from tests.unit.test_vpninfo import NAI, info

HOA, HA, COA = IPv4Address("198.18.1.10"), IPv4Address("198.18.1.1"), IPv4Address("198.18.2.1")
SID = "fa1.visit-a.example;1;1"
CHALLENGE = bytes(range(16))


def rrq_bytes(challenge: bool = True) -> bytes:
    """An MN's RRQ; with the FA's challenge, answered and MN-AAA-authenticated."""
    return mip.registration_request(home_address=HOA, home_agent=HA, care_of_address=COA,
                                    identification=mip.ntp_identification(time.time()), lifetime=300, nai=NAI,
                                    mn_ha=SecurityAssociation(0x1000, Secret(b"mn-ha-key-of-mn1")),
                                    challenge=CHALLENGE if challenge else None,
                                    mn_aaa=SecurityAssociation(0x3000, Secret(b"mn-aaa-secret-of-mn1!"))
                                    if challenge else None).encode()


def rrp_bytes(code: int = 0) -> bytes:
    return mip.RegistrationReply(code=code, home_address=HOA, home_agent=HA, identification=7, lifetime=300).encode()


def wire(msg: Message) -> Message:
    """What the peer reads: encoded, decoded."""
    return Message.decode(msg.encode())


def names(msg: Message) -> list[str]:
    return [a.name for a in msg.avps]


def amr(raw: bytes | None = None) -> app.Amr:
    raw = raw or rrq_bytes()
    sent = app.build_amr(SID, NAI, mip.decode_message(raw), raw)  # type: ignore[arg-type]
    return app.parse_amr(wire(sent))


def har_for(request: app.Amr, *vpn: VpnInfo) -> Message:
    return app.build_har(request, origin_host="aaah.home.example", origin_realm="home.example",
                         destination_realm="home.example", destination_host="ha.home.example", home_address=HOA,
                         vpn=vpn)


def test_amr_round_trip_and_wire_order() -> None:
    raw = rrq_bytes()
    rrq = mip.decode_message(raw)
    assert isinstance(rrq, mip.RegistrationRequest)
    sent = app.build_amr(SID, NAI, rrq, raw)
    assert (sent.command_code, sent.application_id, sent.flags) == (260, 2, FLAG_REQUEST | FLAG_PROXIABLE)
    assert names(sent) == ["Session-Id", "Auth-Application-Id", "Destination-Realm", "User-Name", "MIP-Reg-Request",
                           "MIP-Mobile-Node-Address", "MIP-Home-Agent-Address", "MIP-Feature-Vector",
                           "MIP-FA-Challenge", "MIP-MN-AAA-Auth"]
    received = wire(sent)
    assert received.get("Destination-Realm") == "home.example" and received.get("MIP-FA-Challenge") == CHALLENGE
    auth = received.find("MIP-MN-AAA-Auth")
    covered, offset, length = mip.authenticator_location(raw, mip.EXT_GEN_AUTH)  # type: ignore[misc]
    assert [a.value for a in auth.value] == [0x3000, covered, length, offset]  # type: ignore[union-attr]
    got = app.parse_amr(received)
    assert (got.session_id, got.nai) == (SID, NAI)
    assert got.rrq_raw == raw and got.rrq == rrq and got.rrq.care_of_address == COA
    assert got.feature_vector == 0 and got.route_record == ()


def test_amr_without_challenge_or_mn_aaa_leaves_those_avps_out() -> None:
    raw = rrq_bytes(challenge=False)
    sent = app.build_amr(SID, NAI, mip.decode_message(raw), raw)  # type: ignore[arg-type]
    assert "MIP-FA-Challenge" not in names(sent) and "MIP-MN-AAA-Auth" not in names(sent)
    assert app.parse_amr(wire(sent)).rrq_raw == raw


def test_ama_round_trips_home_and_local_answers() -> None:
    request = amr()
    paths = sealed("visit-a.example", [info(), VpnInfo(NAI, 3, replace(info().path, id=VpnInfo.path_name(NAI, 3)))])
    home = app.build_ama(request, ResultCode.DIAMETER_SUCCESS, rrp_raw=rrp_bytes(), vpn=paths,
                         origin_host="aaah.home.example", origin_realm="home.example")
    assert (home.command_code, home.application_id, home.flags) == (260, 2, FLAG_PROXIABLE)
    assert names(home) == ["Session-Id", "Result-Code", "Origin-Host", "Origin-Realm", "Auth-Application-Id",
                           "User-Name", "MIP-Reg-Reply", "MIP-Home-Agent-Address", "MIP-Mobile-Node-Address",
                           "VPN-Info", "VPN-Info"]
    received = wire(home)
    assert (received.get("User-Name"), received.get("MIP-Home-Agent-Address"),
            received.get("MIP-Mobile-Node-Address")) == (NAI, HA, HOA)
    got = app.parse_ama(received, NAI)
    assert got.success and not got.answered_locally and got.rrp_raw == rrp_bytes()
    assert got.rrp == mip.decode_message(rrp_bytes()) and list(got.vpn) == paths and got.session_id == SID

    local = app.build_ama(request, ResultCode.DIAMETER_SUCCESS, vpn=paths[:1])  # claim 17: no RRP
    assert names(local) == ["Session-Id", "Result-Code", "Auth-Application-Id", "User-Name",
                            "MIP-Home-Agent-Address", "MIP-Mobile-Node-Address", "VPN-Info"]
    got = app.parse_ama(wire(local), NAI)
    assert got.answered_locally and got.rrp is None and list(got.vpn) == paths[:1]


def test_ama_refusal_carries_the_error_and_no_vpn_info() -> None:
    refused = app.build_ama(amr(), ResultCode.DIAMETER_AUTHENTICATION_REJECTED, error="MN-AAA authentication failed",
                            origin_host="aaah.home.example", origin_realm="home.example")
    assert names(refused)[4:7] == ["Auth-Application-Id", "User-Name", "Error-Message"]
    assert refused.get("Error-Message") == "MN-AAA authentication failed"
    got = app.parse_ama(wire(refused), NAI)
    assert got.result_code == 4001 and not got.success
    assert got.rrp is None and got.vpn == ()


def test_ama_with_an_unusable_reply_or_vpn_info_is_refused() -> None:
    request = amr()
    for raw in (b"\x03\x00", rrq_bytes()):  # truncated; a request, not a reply
        with pytest.raises(app.InvalidAvp) as e:
            app.parse_ama(wire(app.build_ama(request, 2001, rrp_raw=raw)), NAI)
        assert e.value.result_code == ResultCode.DIAMETER_INVALID_AVP_VALUE and "MIP-Reg-Reply" in str(e.value)
    bad = info().to_avp()
    bad.value = [a for a in bad.value if a.name != "VPN-ESP-Suite"]
    ama = request.request.answer(2001, [("MIP-Reg-Reply", rrp_bytes()), bad])
    with pytest.raises(app.InvalidAvp, match="VPN-ESP-Suite"):
        app.parse_ama(wire(ama), NAI)
    assert app.parse_ama(wire(request.request.answer(4005, [("MIP-Reg-Reply", rrp_bytes(133)), bad])), NAI).vpn == ()


def test_har_round_trip_and_wire_order() -> None:
    request = amr()
    ha_view = sealed("ha.home.example", [info().mirrored()])
    sent = har_for(request, *ha_view)
    assert (sent.command_code, sent.application_id, sent.flags) == (262, 2, FLAG_REQUEST | FLAG_PROXIABLE)
    assert names(sent) == ["Session-Id", "Auth-Application-Id", "Origin-Host", "Origin-Realm", "Destination-Realm",
                           "Destination-Host", "Authorization-Lifetime", "Auth-Session-State", "User-Name",
                           "MIP-Reg-Request", "MIP-Feature-Vector", "MIP-Home-Agent-Address",
                           "MIP-Mobile-Node-Address", "VPN-Info"]
    assert sent.get("Auth-Session-State") == 1  # NO_STATE_MAINTAINED
    received = wire(sent)
    assert [received.get(n) for n in ("Origin-Host", "Authorization-Lifetime", "MIP-Feature-Vector",
                                      "MIP-Home-Agent-Address", "MIP-Mobile-Node-Address")] == \
        ["aaah.home.example", 300, 0, HA, HOA]
    got = app.parse_har(received)
    assert (got.session_id, got.nai) == (SID, NAI)
    assert got.rrq_raw == request.rrq_raw and got.rrq == request.rrq and list(got.vpn) == ha_view


def test_haa_round_trip_and_leniency() -> None:
    har = wire(har_for(amr()))
    ok = app.build_haa(har, rrp_bytes(), accepted=True)
    assert (ok.command_code, ok.flags & FLAG_ERROR) == (262, 0)
    assert names(ok) == ["Session-Id", "Result-Code", "MIP-Reg-Reply", "User-Name"] and ok.get("User-Name") == NAI
    got = app.parse_haa(wire(ok))
    assert got.result_code == 2001 and got.accepted and got.rrp_raw == rrp_bytes()
    refused = app.parse_haa(wire(app.build_haa(har, rrp_bytes(133), accepted=False)))
    assert refused.result_code == 4005 and not refused.accepted and refused.rrp_raw == rrp_bytes(133)
    # whatever the HA says ends in an AMA: nothing raises
    assert app.parse_haa(wire(har.answer(2001, [("MIP-Reg-Reply", b"\x03")]))).rrp_raw is None
    odd = app.parse_haa(wire(har.answer(2001, [("MIP-Reg-Reply", rrq_bytes())])))  # a Mobile IP message, no RRP
    assert odd.rrp is None and odd.rrp_raw is not None and not odd.accepted
    assert app.parse_haa(wire(har.answer(2001))) == app.Haa(SID, 2001, None, None)


def test_str_sta_round_trip() -> None:
    sent = app.build_str(SID, NAI, TerminationCause.DIAMETER_USER_MOVED)
    assert (sent.command_code, sent.application_id, sent.flags) == (275, 2, FLAG_REQUEST | FLAG_PROXIABLE)
    assert names(sent) == ["Session-Id", "Destination-Realm", "Auth-Application-Id", "User-Name", "Termination-Cause"]
    assert sent.get("Termination-Cause") == TerminationCause.DIAMETER_USER_MOVED
    assert app.parse_str(wire(sent)) == app.Str(SID, NAI)
    sta = app.build_sta(wire(sent))
    assert names(sta) == ["Session-Id", "Result-Code"]
    assert app.parse_sta(wire(sta)) == app.Sta(SID, 2001)
    assert app.parse_str(wire(Message.request("STR", application_id=2))) == app.Str(None, None)


@pytest.mark.parametrize("missing", ["User-Name", "MIP-Reg-Request"])
def test_a_request_without_a_mandatory_avp_is_refused(missing: str) -> None:
    request = amr()
    for msg, parse in ((request.request, app.parse_amr), (har_for(request), app.parse_har)):
        msg = wire(msg)
        msg.remove(missing)
        with pytest.raises(app.MissingAvp) as e:
            parse(msg)  # type: ignore[operator]
        assert e.value.result_code == ResultCode.DIAMETER_MISSING_AVP and e.value.failed_avp == [missing]
        assert missing in str(e.value) and msg.name in str(e.value)


@pytest.mark.parametrize("raw", [b"\x01\x00garbage", rrp_bytes()], ids=["truncated", "a reply"])
def test_a_request_whose_rrq_is_none_is_refused_with_the_bytes(raw: bytes) -> None:
    request = amr()
    for msg, parse in ((request.request, app.parse_amr), (har_for(request), app.parse_har)):
        msg = wire(msg)
        msg.avps = [a if a.name != "MIP-Reg-Request" else Avp.new("MIP-Reg-Request", raw) for a in msg.avps]
        with pytest.raises(app.BadRegistration) as e:
            parse(msg)  # type: ignore[operator]
        assert e.value.raw == raw and e.value.result_code == ResultCode.DIAMETER_INVALID_AVP_VALUE
        assert e.value.failed_avp == [("MIP-Reg-Request", raw)]
        assert str(e.value) == "MIP-Reg-Request is not a registration request"


def test_har_with_unusable_vpn_info_is_refused_before_its_rrq() -> None:
    bad = info().to_avp()
    bad.value = [a for a in bad.value if a.name != "VPN-Path-Id"]
    msg = wire(har_for(amr()))
    msg.avps = [a if a.name != "MIP-Reg-Request" else Avp.new("MIP-Reg-Request", b"\x01") for a in msg.avps]
    msg.add(bad)
    with pytest.raises(app.InvalidAvp) as e:
        app.parse_har(msg)
    assert not isinstance(e.value, app.BadRegistration) and str(e.value) == "VPN-Info: missing VPN-Path-Id"
    assert e.value.failed_avp == []


def test_parsers_refuse_another_command() -> None:
    har = har_for(amr())
    with pytest.raises(app.ApplicationError, match="HAR is not a request of command 260"):
        app.parse_amr(har)
    with pytest.raises(app.ApplicationError):
        app.parse_har(amr().request)
    with pytest.raises(app.ApplicationError):
        app.parse_str(har.answer(2001))


def test_code_points_come_from_the_codec() -> None:
    assert (app.APPLICATION_ID, app.AMR_COMMAND, app.HAR_COMMAND, app.STR_COMMAND) == (2, 260, 262, 275)
    assert app.realm_of(NAI) == "home.example"
