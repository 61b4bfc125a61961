"""VPN info: the VPN-Info AVP round trip, and every malformed member refused as VpnInfoError."""

from __future__ import annotations

import secrets
from ipaddress import IPv4Address, IPv4Network

import pytest

from daemons.runtime.secret import Secret
from daemons.vpn import seal
from daemons.vpn.path import DirectionKeys, Endpoint, EndpointType, EspSuite, Qos, SecurityService, VpnPath
from daemons.vpn.vpninfo import (
    CLEAR_KEY_AVPS,
    ClearKeysRefused,
    VpnInfo,
    VpnInfoError,
    decode_from_mip,
    encode_for_mip,
    forward_copy,
    forward_security,
    from_record,
    moved_to,
    to_record,
)
from daemons.wire.diameter import Avp

NAI = "mn1@home.example"


def info() -> VpnInfo:
    keys = [DirectionKeys(0x10001 + i, Secret(secrets.token_bytes(20))) for i in range(2)]
    path = VpnPath(VpnInfo.path_name(NAI, 1), Endpoint("198.18.0.14", EndpointType.FA),
                   Endpoint("198.18.100.1", EndpointType.HA), ("198.18.100.10/32",), ("0.0.0.0/0",),
                   SecurityService(EspSuite.AES128GCM16, keys[0], keys[1], Secret(secrets.token_bytes(32))),
                   Qos(1_000_000, 2_000_000, 2))
    return VpnInfo(NAI, 1, path)


def test_round_trip_and_mirror() -> None:
    """A state file's record keeps the keys; the wire form never carries them in clear, and
    a parser refuses them there: they travel sealed (daemons.vpn.seal)."""
    original = info()
    assert VpnInfo.from_avp(original.record_avp(), NAI, clear_keys=True) == original
    assert VpnInfo.from_avp(original.mirrored().record_avp(), NAI, clear_keys=True).mirrored() == original
    wire = original.to_avp()
    assert [a.name for a in wire.value if a.name in CLEAR_KEY_AVPS] == []
    with pytest.raises(ClearKeysRefused):
        VpnInfo.from_avp(original.record_avp(), NAI)
    sealed_copy = seal.seal(Secret(bytes(32)), "visit-a.example", original)
    back = VpnInfo.from_avp(sealed_copy.to_avp(), NAI)
    assert back == sealed_copy and back.sealed and "sealed=" in repr(back)
    assert seal.unseal(Secret(bytes(32)), "visit-a.example", back) == original
    with pytest.raises(ValueError):  # a sealed copy belongs to its recipient's view
        back.mirrored()


@pytest.mark.parametrize(("member", "value"), [("VPN-SPI-In", 5), ("VPN-Key-In", Secret(b"short")),
                                               ("VPN-QoS-Rate", 0), ("VPN-Endpoint-Local-Type", 9),
                                               ("VPN-ESP-Suite", "rot13")])
def test_malformed_member_is_a_vpn_info_error(member: str, value: object) -> None:
    avp = info().record_avp()
    avp.value = [a if a.name != member else Avp.new(member, value) for a in avp.value]
    with pytest.raises(VpnInfoError):
        VpnInfo.from_avp(avp, NAI, clear_keys=True)


def test_forward_copy_crosses_the_wire_without_secrets_and_both_fas_agree() -> None:
    """F6: the new FA's copy (old FA -> new FA, any -> home address) carries SPIs but no
    key material; the old FA derives the same keys and PSK from the FA-FA key."""
    fa_fa_key = Secret(secrets.token_bytes(16))
    ha_path = info()
    copy = forward_copy(ha_path, IPv4Address("198.18.0.18"), 10, fa_fa_key)
    assert (copy.path.local.address, copy.path.remote.address) == (IPv4Address("198.18.0.18"),
                                                                   IPv4Address("198.18.0.14"))
    assert copy.path.local_ts == (IPv4Network("0.0.0.0/0"),)
    assert copy.path.remote_ts == (IPv4Network("198.18.100.10/32"),)
    assert copy.path.security.lifetime == 10 and copy.path.qos == ha_path.path.qos
    wire = encode_for_mip([copy])
    sec = copy.path.security
    for secret in (sec.psk, sec.inbound.enc_key, sec.outbound.enc_key):
        assert secret.reveal() not in wire
    assert sec.outbound.spi.to_bytes(4, "big") in wire
    (received,) = decode_from_mip(wire, NAI, forward_security(fa_fa_key))
    assert received == copy
    with pytest.raises(VpnInfoError):  # without the FA-FA key there is nothing to install
        decode_from_mip(wire, NAI)
    other = decode_from_mip(wire, NAI, forward_security(Secret(secrets.token_bytes(16))))[0]
    assert other.path.security.psk != sec.psk


def test_moved_to_moves_the_fa_end_of_each_view() -> None:
    """One function for the AAA servers' sessions (the FA's view: Local = the FA) and the
    HA's paths (Remote = the FA); a path already there, or without an FA end, is kept."""
    new_fa = IPv4Address("198.18.0.22")
    fa_view = info()
    ha_view = fa_view.mirrored()
    static = VpnInfo(NAI, 2, VpnPath(VpnInfo.path_name(NAI, 2), Endpoint("198.18.100.1", EndpointType.HA),
                                     Endpoint("198.18.9.1", EndpointType.CNGW_STATIC), ("198.18.100.0/24",),
                                     ("198.18.101.0/24",), fa_view.path.security))
    moved_fa, moved_ha, kept = moved_to([fa_view, ha_view, static], str(new_fa))
    assert (moved_fa.path.local.address, moved_fa.path.remote.address) == (new_fa, fa_view.path.remote.address)
    assert (moved_ha.path.local.address, moved_ha.path.remote.address) == (ha_view.path.local.address, new_fa)
    assert moved_fa.path.security == fa_view.path.security and moved_fa.path_id == fa_view.path_id
    assert kept is static
    again = moved_to([moved_fa, moved_ha], new_fa)
    assert again[0] is moved_fa and again[1] is moved_ha


def test_record_round_trip_and_unreadable_records() -> None:
    paths = [info(), info().mirrored()]
    record = to_record(paths)
    assert all(isinstance(h, str) for h in record) and from_record(record, NAI) == paths
    assert from_record([], NAI) == []
    for bad in (["00zz"], [record[0][:-8]], [5], "nothex"):
        with pytest.raises(VpnInfoError):
            from_record(bad, NAI)  # type: ignore[arg-type]
