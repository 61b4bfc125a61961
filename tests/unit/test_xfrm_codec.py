"""NETLINK_XFRM messages (daemons.wire.xfrm): struct layouts and codec round trips, no kernel.

The same messages against the running kernel (our socket writes, ``ip xfrm`` reads, and vice
versa) are in tests/unit/test_xfrm_netlink.py.
"""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemons.runtime.secret import Secret
from daemons.wire import xfrm as xn
from daemons.wire.xfrm import SA, DecodeError, Encap, Policy, Selector, Tmpl

# --------------------------------------------------------------------------------------------
# layouts


@pytest.mark.parametrize(("cls", "size"), [
    (xn.XfrmSelector, 56), (xn.XfrmId, 24), (xn.XfrmLifetimeCfg, 64), (xn.XfrmLifetimeCur, 32),
    (xn.XfrmStats, 12), (xn.XfrmUsersaInfo, 224), (xn.XfrmUserspiInfo, 232), (xn.XfrmUsersaId, 24),
 (xn.XfrmUserpolicyInfo, 168),
    (xn.XfrmUserpolicyId, 64), (xn.XfrmUserTmpl, 64), (xn.XfrmEncapTmpl, 24), (xn.XfrmMark, 8),
    (xn.XfrmUserAcquire, 280), (xn.XfrmUserExpire, 232), (xn.XfrmUserPolexpire, 176),
])
def test_struct_sizes(cls: type[xn.Struct], size: int) -> None:
    assert cls.size() == size
    assert len(cls.pack({})) == size


def test_field_offsets_match_c() -> None:
    # offsets a C compiler gives on x86-64 (pahole), spot-checked through packed bytes
    raw = xn.XfrmUsersaInfo.pack({"id": {"spi": 0x11223344, "proto": 50}, "saddr": "198.18.0.1",
                                  "reqid": 0xAABBCCDD, "family": 2, "mode": 1, "replay_window": 32, "flags": 0x80})
    assert raw[56 + 16:56 + 20] == bytes.fromhex("11223344")  # id.spi, network order
    assert raw[56 + 20] == 50  # id.proto
    assert raw[80:84] == bytes([198, 18, 0, 1])  # saddr
    assert raw[208:212] == (0xAABBCCDD).to_bytes(4, "little")  # reqid
    assert raw[212:214] == (2).to_bytes(2, "little") and raw[214] == 1 and raw[215] == 32 and raw[216] == 0x80
    tmpl = xn.XfrmUserTmpl.pack({"family": 2, "saddr": "198.18.0.1", "reqid": 7, "mode": 1, "optional": 1,
                                 "ealgos": 0xFFFFFFFF})
    assert tmpl[24:26] == (2).to_bytes(2, "little") and tmpl[28:32] == bytes([198, 18, 0, 1])
    assert tmpl[44:48] == (7).to_bytes(4, "little") and tmpl[48] == 1 and tmpl[50] == 1
    assert tmpl[56:60] == b"\xff" * 4
    pol = xn.XfrmUserpolicyInfo.pack({"priority": 5, "index": 6, "dir": 1, "action": 1, "share": 3})
    assert pol[152:156] == (5).to_bytes(4, "little") and pol[156:160] == (6).to_bytes(4, "little")
    assert pol[160:164] == bytes([1, 1, 0, 3])


# --------------------------------------------------------------------------------------------
# codec round trips (no kernel)

octet = st.integers(0, 255)
v4 = st.builds(lambda a, b: f"198.{18 + (a & 1)}.{b}.{a}", octet, octet)
prefix = st.builds(lambda addr, plen: ipaddress.ip_network(f"{addr}/{plen}", strict=False), v4, st.integers(0, 32))
selectors = st.builds(Selector, prefix, prefix, st.sampled_from([0, 1, 6, 17]), st.integers(0, 65535),
                      st.integers(0, 65535))
spis = st.integers(0x100, 0xFFFFFFFF)
reqids = st.integers(0, 0xFFFFFFFF)


@st.composite
def sas(draw: st.DrawFn) -> SA:
    src, dst, spi, reqid = draw(v4), draw(v4), draw(spis), draw(reqids)
    extra = {
        "selector": draw(st.none() | selectors),
        "encap": draw(st.none() | st.builds(Encap, st.integers(1, 65535), st.integers(1, 65535))),
        "mark": draw(st.none() | st.tuples(reqids, reqids)),
        "replay_window": draw(st.integers(0, 255)),
    }
    if draw(st.booleans()):
        key = Secret(draw(st.binary(min_size=20, max_size=20) | st.binary(min_size=36, max_size=36)))
        return SA.gcm(src, dst, spi, key, reqid, **extra)
    enc = Secret(draw(st.binary(min_size=16, max_size=16) | st.binary(min_size=32, max_size=32)))
    auth = Secret(draw(st.binary(min_size=32, max_size=32)))
    return SA.cbc_sha256(src, dst, spi, enc, auth, reqid, **extra)


@settings(max_examples=200, deadline=None)
@given(sas(), st.sampled_from([xn.XFRM_MSG_NEWSA, xn.XFRM_MSG_UPDSA]))
def test_sa_message_round_trip(sa: SA, msg_type: int) -> None:
    data = xn.encode_message(msg_type, xn.sa_to_msg(sa))
    msg = xn.decode_message(data)
    assert msg["header"]["type"] == msg_type
    assert xn.sa_from_msg(msg) == sa
    # the keys come back as Secrets: nothing in the decoded message prints them
    for algo in (sa.aead, sa.enc, sa.auth):
        if algo is not None:
            assert algo[1].reveal().hex() not in repr(msg)
    assert xn.encode_message(msg_type, xn.sa_to_msg(xn.sa_from_msg(msg))) == data


tmpls = st.builds(Tmpl, v4, v4, reqids, st.sampled_from(["tunnel", "transport"]), st.just(50), spis, st.booleans())
policies = st.builds(Policy, selectors, st.sampled_from(["in", "out", "fwd"]), st.lists(tmpls, max_size=3).map(tuple),
                     st.integers(0, 0xFFFFFFFF), st.sampled_from(["allow", "block"]), st.integers(0, 0xFFFFFFFF),
                     st.none() | st.tuples(reqids, reqids))


@settings(max_examples=200, deadline=None)
@given(policies)
def test_policy_message_round_trip(policy: Policy) -> None:
    data = xn.encode_message(xn.XFRM_MSG_NEWPOLICY, xn.policy_to_msg(policy))
    assert len(data) == 16 + 168 + (4 + 64 * len(policy.tmpls) if policy.tmpls else 0) + (12 if policy.mark else 0)
    assert xn.policy_from_msg(xn.decode_message(data)) == policy


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=600))
def test_decoding_arbitrary_bytes_raises_only_decode_error(data: bytes) -> None:
    try:
        xn.decode_message(data)
    except DecodeError:
        pass


@settings(max_examples=300, deadline=None)
@given(sas(), st.data())
def test_decoding_mutated_sa_messages_raises_only_decode_error(sa: SA, data: st.DataObject) -> None:
    raw = bytearray(xn.encode_message(xn.XFRM_MSG_NEWSA, xn.sa_to_msg(sa)))
    for _ in range(data.draw(st.integers(1, 8))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(octet)
    cut = data.draw(st.integers(0, len(raw)))
    try:
        xn.decode_message(bytes(raw[:cut]))
    except DecodeError:
        pass


def test_secrets_stay_out_of_reprs() -> None:
    key = Secret(bytes.fromhex("00112233445566778899aabbccddeeff01020304"))
    sa = SA.gcm("198.18.0.1", "198.18.0.2", 0x1234, key)
    assert "00112233" not in repr(sa) and "Secret(***)" in repr(sa)


def test_gcm_key_length_checked() -> None:
    with pytest.raises(ValueError):
        SA.gcm("198.18.0.1", "198.18.0.2", 0x100, Secret(bytes(16)))  # salt missing
