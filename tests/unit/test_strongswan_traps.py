"""The strongswan backend's on-traffic bookkeeping that needs no charon: which trap a path
gets (charon's, or ours in nftables when an up path shadows it), the NFLOG message parser
and the rule preferences.  With real charons: tests/lab/test_strongswan_path.py."""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import replace
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from daemons.runtime.secret import Secret
from daemons.vpn.path import Endpoint, EndpointType, SecurityService, VpnPath
from daemons.vpn.strongswan.backend import StrongswanBackend
from daemons.vpn.strongswan.routes import rule_pref
from daemons.vpn.strongswan.traps import NFLOG_PREFIX, nflog_tokens

N = ipaddress.IPv4Network


def path(path_id: str, remote_ts: str, on_traffic: bool = False, remote: str = "198.18.2.1") -> VpnPath:
    return VpnPath(path_id, Endpoint(ipaddress.IPv4Address("198.18.1.1"), EndpointType.FA),
                   Endpoint(ipaddress.IPv4Address(remote), EndpointType.CNGW_DYNAMIC),
                   (N("198.18.100.10/32"),), (N(remote_ts),),
                   SecurityService(psk=Secret(b"0123456789abcdef")), on_traffic=on_traffic)


def test_which_trap(tmp_path: Path) -> None:
    backend = StrongswanBackend("a", tmp_path, None)
    ro = path("mn1:3", "198.18.3.0/24", on_traffic=True, remote="198.18.0.34")
    backend._paths = {ro.id: ro}
    assert backend.traps.trapped(ro) and backend.traps.start_detail(ro) == {"start": "on-traffic"}
    anchor = path("mn1:1", "0.0.0.0/0", remote="198.18.100.1")
    backend._paths[anchor.id] = anchor
    assert not backend.traps.trapped(ro) and backend.traps.shadowing(ro) == anchor  # ours in nftables then
    assert backend.traps.start_detail(ro)["shadowed_by"] == anchor.id
    # another on-traffic path does not shadow (both are traps), nor does a disjoint one
    backend._paths[anchor.id] = replace(anchor, on_traffic=True)
    assert backend.traps.trapped(ro)
    backend._paths[anchor.id] = path("mn1:1", "198.18.4.0/24", remote="198.18.100.1")
    assert backend.traps.trapped(ro)
    assert backend.traps.start_detail(path("x", "198.18.5.0/24")) == {}


def nflog_packet(prefix: bytes) -> bytes:
    attrs = b""
    for atype, payload in ((1, b"\x08\x00\x00\x00"), (10, prefix + b"\0")):  # PACKET_HDR, PREFIX
        nla = struct.pack("HH", 4 + len(payload), atype) + payload
        attrs += nla + b"\0" * (-len(nla) % 4)
    body = struct.pack("BBH", 2, 0, 0) + attrs
    return struct.pack("IHHII", 16 + len(body), 4 << 8, 0, 0, 0) + body


def test_nflog_tokens() -> None:
    data = nflog_packet(f"{NFLOG_PREFIX}7 ".encode()) + nflog_packet(b"somebody else 3") + \
        nflog_packet(f"{NFLOG_PREFIX}12 ".encode())
    assert nflog_tokens(data) == [7, 12]
    assert nflog_tokens(nflog_packet(f"{NFLOG_PREFIX}x".encode())) == []


@given(st.binary(max_size=300))
def test_nflog_tokens_never_raise(data: bytes) -> None:
    assert isinstance(nflog_tokens(data), list)


def test_rule_prefs_by_specificity() -> None:
    # the kernel's EXCL check compares only what the new rule sets: never two rules of
    # different specificity at one pref
    assert rule_pref(1000, N("198.18.20.0/24"), N("198.18.100.10/32")) < \
        rule_pref(1000, N("0.0.0.0/0"), N("198.18.100.10/32")) <= 1064
    assert rule_pref(900, N("198.18.100.10/32"), N("198.18.100.11/32")) == 900
