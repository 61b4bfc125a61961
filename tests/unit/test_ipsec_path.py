"""The VPN path model and the pure parts of the strongswan backend (no root needed)."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import replace

import pytest

from daemons.runtime.secret import Secret
from daemons.vpn.path import (
    Capability,
    DirectionKeys,
    Endpoint,
    EndpointType,
    EspSuite,
    PathBackend,
    PathState,
    PathStatus,
    Qos,
    SecurityService,
    VpnPath,
)
from daemons.vpn.strongswan.backend import StrongswanBackend
from daemons.vpn.strongswan.charon import charon_command, conn_name, ike_ids, psk_id, strongswan_conf
from daemons.vpn.strongswan.routes import route_mode

PSK = Secret(b"k" * 32)
N = ipaddress.IPv4Network


def path(**kw) -> VpnPath:
    base = dict(
        id="mn1@home.example:ha-fa1",
        local=Endpoint(ipaddress.IPv4Address("198.18.1.1"), EndpointType.FA),
        remote=Endpoint(ipaddress.IPv4Address("198.18.2.1"), EndpointType.HA),
        local_ts=(N("198.18.100.10/32"),),
        remote_ts=(N("0.0.0.0/0"),),
        security=SecurityService(psk=PSK),
    )
    base.update(kw)
    return VpnPath(**base)


def manual(suite: EspSuite) -> SecurityService:
    auth = Secret(b"a" * suite.auth_key_len) if suite.auth_key_len else None
    return SecurityService(
        suite=suite,
        outbound=DirectionKeys(0x1001, Secret(b"e" * suite.enc_key_len), auth),
        inbound=DirectionKeys(0x2002, Secret(b"f" * suite.enc_key_len), auth),
    )


def test_selectors_are_normalised_and_pair() -> None:
    p = path(local_ts=["198.18.100.10/32"], remote_ts=["198.18.20.0/24"])
    assert p.local_ts == (N("198.18.100.10/32"),)
    assert p.pair == (ipaddress.IPv4Address("198.18.1.1"), ipaddress.IPv4Address("198.18.2.1"))
    assert p.user_addresses() == (N("198.18.100.10/32"),)


def test_mirrored_swaps_ends_selectors_and_keys() -> None:
    p = path(security=manual(EspSuite.AES128GCM16))
    m = p.mirrored()
    assert m.local == p.remote and m.remote == p.local
    assert m.local_ts == p.remote_ts and m.remote_ts == p.local_ts
    assert m.security.outbound == p.security.inbound
    assert m.mirrored() == p


@pytest.mark.parametrize("suite", list(EspSuite))
def test_manual_keys_lengths_per_suite(suite: EspSuite) -> None:
    assert manual(suite).manual
    with pytest.raises(ValueError):
        SecurityService(
            suite=suite,
            outbound=DirectionKeys(0x1001, Secret(b"e" * (suite.enc_key_len - 1))),
            inbound=DirectionKeys(0x2002, Secret(b"f" * suite.enc_key_len)),
        )


@pytest.mark.parametrize(
    "kw",
    [
        {"id": "has space"},
        {"id": ""},
        {"local_ts": ()},
        {"remote": Endpoint(ipaddress.IPv4Address("198.18.1.1"), EndpointType.HA)},
    ],
)
def test_invalid_paths_rejected(kw) -> None:
    with pytest.raises(ValueError):
        path(**kw)


def test_security_needs_keys_or_psk_and_sane_values() -> None:
    with pytest.raises(ValueError):
        SecurityService()
    with pytest.raises(ValueError):
        SecurityService(psk=Secret(b"short"))
    with pytest.raises(ValueError):
        SecurityService(psk=PSK, lifetime=0)
    with pytest.raises(ValueError):
        DirectionKeys(1, Secret(b"x" * 20))  # SPIs below 256 are reserved


def test_qos_validation() -> None:
    assert Qos(rate=1000).effective_ceil == 1000
    for bad in ({"rate": 0}, {"rate": 10, "ceil": 5}, {"rate": 10, "priority": 8}):
        with pytest.raises(ValueError):
            Qos(**bad)


def test_secrets_never_in_repr_or_status() -> None:
    p = path(security=replace(manual(EspSuite.AES256GCM16), psk=Secret(b"psk-value-1234567")))
    text = repr(p) + str(p)
    assert "psk-value" not in text and "eeee" not in text
    st = PathStatus(p.id, PathState.UP, spi_in=0x1001, spi_out=0x2002)
    d = st.as_dict()
    assert d["spi_in"] == "00001001" and d["state"] == "up"
    assert not any("key" in k or "psk" in k for k in d)


def test_strongswan_backend_satisfies_protocol() -> None:
    b = StrongswanBackend("n", "/tmp/x", None)
    assert isinstance(b, PathBackend)
    # kernel-libipsec: owns its local selectors, carries F6 forwarding paths
    assert b.capabilities == Capability.FORWARDING_PATHS | Capability.LOCAL_SELECTOR_ADDRESS


def test_strongswan_conf_never_logs_secrets(tmp_path) -> None:
    conf = strongswan_conf(tmp_path, "fa1")
    assert "kdf" in conf and "kernel-libipsec" in conf and "vici" in conf
    assert f"unix://{tmp_path}/fa1/charon.vici" in conf
    assert "install_routes = no" in conf
    levels = [int(v) for v in re.findall(r"^\s*(?:default|ike|cfg|knl|enc|esp|lib|net)"
                                         r"\s*=\s*(-?\d+)", conf, re.M)]
    assert levels and max(levels) <= 1


def test_charon_command_execs_charon(tmp_path) -> None:
    cmd = charon_command(tmp_path, "fa1")
    assert cmd[0] == "unshare" and "-m" in cmd
    script = cmd[cmd.index("-c") + 1]
    assert "exec /usr/lib/ipsec/charon" in script and "mount -t tmpfs" in script
    assert (tmp_path / "fa1" / "strongswan.conf").exists()


def test_conn_message_per_path_with_its_own_identities_without_secrets() -> None:
    b = StrongswanBackend("n", "/tmp/x", None)
    p1 = path(qos=Qos(rate=1000))
    p2 = path(id="mn2@home.example:ha-fa1", local_ts=(N("198.18.100.11/32"),),
              security=SecurityService(suite=EspSuite.AES128_SHA256, psk=PSK))
    # one connection (IKE_SA) per path, the gateway pair in its name
    assert conn_name(p1) == "mipvpn-198.18.1.1-198.18.2.1/mn1@home.example:ha-fa1"
    assert conn_name(p2) == "mipvpn-198.18.1.1-198.18.2.1/mn2@home.example:ha-fa1"
    assert psk_id(conn_name(p1)) == "mipvpn-psk-198.18.1.1-198.18.2.1/mn1@home.example:ha-fa1"
    conn = b._conn_message(p2)[conn_name(p2)]
    assert set(conn["children"]) == {p2.id}
    assert conn["children"][p2.id]["esp_proposals"] == ["aes128-sha256"]
    assert conn["encap"] == "yes" and conn["childless"] == "allow"
    assert "k" * 16 not in repr(conn)
    # user paths: identities that name the path, mirrored at the other end, so the responder
    # finds this path's connection and PSK among the pair's
    assert ike_ids(p1) == ("@198.18.1.1/mn1@home.example:ha-fa1", "@198.18.2.1/mn1@home.example:ha-fa1")
    assert ike_ids(p1.mirrored()) == ike_ids(p1)[::-1]
    assert ike_ids(p1) != ike_ids(p2)
    assert (conn["local"]["id"], conn["remote"]["id"]) == ike_ids(p2)
    # a standing network-to-network tunnel is the pair's: the addresses are its ids
    net = path(id="static:1", local_ts=(N("198.18.30.0/24"),), remote_ts=(N("198.18.100.0/24"),))
    assert ike_ids(net) == ("198.18.1.1", "198.18.2.1")
    # a moved far end is another connection (make-before-break), the same path id
    moved = replace(p1, remote=Endpoint(ipaddress.IPv4Address("198.18.3.1"), EndpointType.HA))
    assert conn_name(moved) != conn_name(p1)


def test_strongswan_conf_hashes_the_ike_sa_table(tmp_path) -> None:
    conf = strongswan_conf(tmp_path, "ha")
    assert "ikesa_table_size = 4096" in conf and "ikesa_table_segments = 16" in conf


def test_route_mode_by_local_endpoint() -> None:
    assert route_mode(path()) == "source"
    assert route_mode(path().mirrored()) == "destination"
