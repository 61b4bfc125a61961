"""VPN info: the VPN-Info AVP round trip, and every malformed member refused as VpnInfoError."""

from __future__ import annotations

import secrets

import pytest

from daemons.diameter import Avp
from daemons.ipsec.path import DirectionKeys, Endpoint, EndpointType, EspSuite, Qos, SecurityService, VpnPath
from daemons.secret import Secret
from daemons.vpninfo import VpnInfo, VpnInfoError

NAI = "mn1@home.example"


def info() -> VpnInfo:
    keys = [DirectionKeys(0x10001 + i, Secret(secrets.token_bytes(20))) for i in range(2)]
    path = VpnPath(VpnInfo.path_name(NAI, 1), Endpoint("198.18.0.14", EndpointType.FA),
                   Endpoint("198.18.100.1", EndpointType.HA), ("198.18.100.10/32",), ("0.0.0.0/0",),
                   SecurityService(EspSuite.AES128GCM16, keys[0], keys[1], Secret(secrets.token_bytes(32))),
                   Qos(1_000_000, 2_000_000, 2))
    return VpnInfo(NAI, 1, path)


def test_round_trip_and_mirror() -> None:
    original = info()
    assert VpnInfo.from_avp(original.to_avp(), NAI) == original
    assert VpnInfo.from_avp(original.mirrored().to_avp(), NAI).mirrored() == original


@pytest.mark.parametrize(("member", "value"), [("VPN-SPI-In", 5), ("VPN-Key-In", Secret(b"short")),
                                               ("VPN-QoS-Rate", 0), ("VPN-Endpoint-Local-Type", 9),
                                               ("VPN-ESP-Suite", "rot13")])
def test_malformed_member_is_a_vpn_info_error(member: str, value: object) -> None:
    avp = info().to_avp()
    avp.value = [a if a.name != member else Avp.new(member, value) for a in avp.value]
    with pytest.raises(VpnInfoError):
        VpnInfo.from_avp(avp, NAI)
