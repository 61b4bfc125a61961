"""Mobile IPv4 registration codec: round trips, canonical decoding, hostile input."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemons.wire.mip import (
    REGISTRATION_EXTENSIONS,
    VENDOR_ID,
    VENDOR_TYPE_PREVIOUS_FA,
    VENDOR_TYPE_VPN_INFO,
    CVSEExtension,
    DecodeError,
    FAHAAuthExtension,
    GeneralizedAuthExtension,
    MNFAAuthExtension,
    MNFAChallengeExtension,
    MNHAAuthExtension,
    NAIExtension,
    NVSEExtension,
    RegistrationReply,
    RegistrationRequest,
    ReplyCode,
    RRQFlag,
    UnknownExtension,
    UnknownExtensionError,
    decode_message,
    decode_message_with_offsets,
    find_vendor_data,
    vendor_extension,
)

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, 2**64 - 1)
addrs = st.builds(IPv4Address, u32)

short_auth = st.one_of(
    *[
        st.builds(cls, spi=u32, authenticator=st.binary(max_size=251))
        for cls in (MNHAAuthExtension, MNFAAuthExtension, FAHAAuthExtension)
    ]
)
extensions = st.one_of(
    short_auth,
    st.builds(GeneralizedAuthExtension, spi=u32, authenticator=st.binary(max_size=300), subtype=u8),
    st.builds(NAIExtension, nai=st.text(max_size=60)),
    st.builds(MNFAChallengeExtension, challenge=st.binary(max_size=255)),
    st.builds(
        CVSEExtension,
        vendor_type=u16,
        data=st.binary(max_size=300),
        vendor_id=u32,
        reserved=u8,
    ),
    st.builds(
        NVSEExtension, vendor_type=u16, data=st.binary(max_size=247), vendor_id=u32, reserved=u16
    ),
    st.builds(
        UnknownExtension,
        type_code=st.integers(128, 255).filter(lambda t: t not in REGISTRATION_EXTENSIONS),
        data=st.binary(max_size=255),
    ),
)
ext_lists = st.lists(extensions, max_size=6)
rrqs = st.builds(
    RegistrationRequest,
    home_address=addrs,
    home_agent=addrs,
    care_of_address=addrs,
    identification=u64,
    lifetime=u16,
    flags=st.builds(RRQFlag, u8),
    extensions=ext_lists,
)
rrps = st.builds(
    RegistrationReply,
    code=u8,
    home_address=addrs,
    home_agent=addrs,
    identification=u64,
    lifetime=u16,
    extensions=ext_lists,
)
messages = st.one_of(rrqs, rrps)


def assert_decodes_canonically_or_rejects(data: bytes) -> None:
    try:
        msg = decode_message(data)
    except DecodeError:
        return
    assert msg.encode() == data  # canonical: what decodes re-encodes identically


# ------------------------------------------------------------------------ round trips
@given(messages)
def test_round_trip(msg):
    wire = msg.encode()
    back = decode_message(wire)
    assert back == msg
    assert type(back) is type(msg)
    assert back.encode() == wire


@given(extensions)
def test_extension_round_trip_alone(ext):
    wire = ext.encode()
    rrq = RegistrationRequest("1.2.3.4", "5.6.7.8", "9.10.11.12", 1, extensions=[ext])
    assert decode_message(rrq.encode()).extensions == [ext]
    assert rrq.encode().endswith(wire)


def test_fixed_layout_rrq():
    rrq = RegistrationRequest(
        home_address="198.18.1.10",
        home_agent="198.18.1.1",
        care_of_address="198.18.2.1",
        identification=0x0102030405060708,
        lifetime=600,
        flags=RRQFlag.S | RRQFlag.T,
    )
    assert rrq.encode() == bytes.fromhex(
        "01 82 0258 c612010a c6120101 c6120201 0102030405060708".replace(" ", "")
    )


def test_fixed_layout_rrp_and_reply_code():
    rrp = RegistrationReply(ReplyCode.HA_IDENTIFICATION_MISMATCH, "198.18.1.10", "198.18.1.1", 7)
    assert rrp.encode() == bytes.fromhex(
        "03 85 0000 c612010a c6120101 0000000000000007".replace(" ", "")
    )
    back = decode_message(rrp.encode())
    assert back.code is ReplyCode.HA_IDENTIFICATION_MISMATCH and not back.accepted
    odd = decode_message(RegistrationReply(200, "0.0.0.0", "0.0.0.0", 0).encode())
    assert odd.code == 200 and not isinstance(odd.code, ReplyCode)


def test_extension_wire_formats():
    assert NAIExtension("a@b").encode() == b"\x83\x03a@b"
    assert (
        MNHAAuthExtension(256, b"\xaa" * 16).encode() == b"\x20\x14\x00\x00\x01\x00" + b"\xaa" * 16
    )
    # RFC 3012: generalized auth has a 16-bit length after the subtype
    assert GeneralizedAuthExtension(2, b"\xbb" * 16).encode() == (
        b"\x24\x01\x00\x14\x00\x00\x00\x02" + b"\xbb" * 16
    )
    # RFC 3115 CVSE: type, reserved, 16-bit length, vendor id, 16-bit vendor type, data
    assert CVSEExtension(VENDOR_TYPE_VPN_INFO, b"xy").encode() == (
        b"\x26\x00\x00\x08" + VENDOR_ID.to_bytes(4, "big") + b"\x00\x01xy"
    )
    # RFC 3115 NVSE: type, length, 16-bit reserved, vendor id, 16-bit vendor type, data
    assert NVSEExtension(VENDOR_TYPE_PREVIOUS_FA, b"\xc6\x12\x02\x01").encode() == (
        b"\x86\x0c\x00\x00" + VENDOR_ID.to_bytes(4, "big") + b"\x00\x02\xc6\x12\x02\x01"
    )
    assert MNFAChallengeExtension(b"1234").encode() == b"\x84\x041234"


def test_find_and_vendor_helpers():
    rrq = RegistrationRequest(
        "198.18.1.10",
        "198.18.1.1",
        "198.18.2.1",
        1,
        extensions=[
            NAIExtension("alice@example.net"),
            vendor_extension(VENDOR_TYPE_VPN_INFO, b"vpn", critical=True),
            vendor_extension(VENDOR_TYPE_PREVIOUS_FA, b"\xc6\x12\x02\x01", critical=False),
            NVSEExtension(VENDOR_TYPE_VPN_INFO, b"other vendor", vendor_id=5535),
        ],
    )
    back = decode_message(rrq.encode())
    nai = back.find(NAIExtension)
    assert nai is not None and nai.nai == "alice@example.net" and nai.realm == "example.net"
    assert back.find(MNHAAuthExtension) is None
    assert back.vendor_data(VENDOR_TYPE_VPN_INFO) == b"vpn"
    assert back.vendor_data(VENDOR_TYPE_PREVIOUS_FA) == b"\xc6\x12\x02\x01"
    assert back.vendor_data(VENDOR_TYPE_VPN_INFO, vendor_id=5535) == b"other vendor"
    assert back.vendor_data(99) is None
    assert find_vendor_data(back.extensions, VENDOR_TYPE_VPN_INFO) == b"vpn"
    assert isinstance(back.find_all(NVSEExtension)[1], NVSEExtension)


def test_offsets():
    rrq = RegistrationRequest(
        "1.1.1.1",
        "2.2.2.2",
        "3.3.3.3",
        0,
        extensions=[NAIExtension("ab"), MNFAChallengeExtension(b"c")],
    )
    _, offsets = decode_message_with_offsets(rrq.encode())
    assert offsets == [24, 28]


# ------------------------------------------------------------------------ RFC 5944 1.9
def test_unknown_skippable_extension_is_kept_verbatim():
    base = RegistrationRequest("1.1.1.1", "2.2.2.2", "3.3.3.3", 5).encode()
    wire = base + b"\xc8\x03abc" + NAIExtension("x@y").encode()
    msg = decode_message(wire)
    assert msg.extensions[0] == UnknownExtension(200, b"abc")
    assert msg.find(NAIExtension) == NAIExtension("x@y")
    assert msg.encode() == wire


def test_unknown_non_skippable_extension_rejects_with_context():
    base = RegistrationRequest("1.1.1.1", "2.2.2.2", "3.3.3.3", 77, lifetime=30)
    wire = base.with_extensions(NAIExtension("x@y")).encode() + b"\x32\x02\x00\x00"
    with pytest.raises(UnknownExtensionError) as info:
        decode_message(wire)
    err = info.value
    assert isinstance(err, DecodeError)
    assert err.ext_type == 50 and err.offset == 24 + 5
    assert isinstance(err.partial, RegistrationRequest)
    assert err.partial.identification == 77 and err.partial.home_address == IPv4Address("1.1.1.1")
    assert err.partial.extensions == [NAIExtension("x@y")]


# ------------------------------------------------------------------------ hostile input
@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x01",
        b"\x02" + b"\x00" * 30,  # unknown message type
        b"\x01" + b"\x00" * 22,  # one byte short
        b"\x03" + b"\x00" * 18,
        b"\x01" + b"\x00" * 23 + b"\x83",  # truncated extension header
        b"\x01" + b"\x00" * 23 + b"\x83\x05ab",  # extension runs past the end
        b"\x01" + b"\x00" * 23 + b"\x20\x03abc",  # auth shorter than its SPI
        b"\x01" + b"\x00" * 23 + b"\x24\x01\x00",  # truncated long header
        b"\x01" + b"\x00" * 23 + b"\x24\x01\x00\x02ab",  # generalized auth without SPI
        b"\x01" + b"\x00" * 23 + b"\x26\x00\x00\x03abc",  # CVSE too short
        b"\x01" + b"\x00" * 23 + b"\x86\x03abc",  # NVSE too short
        b"\x01" + b"\x00" * 23 + b"\x83\x02\xff\xfe",  # NAI not UTF-8
        b"\x01" + b"\x00" * 23 + b"\x00",  # type 0 is not padding in registrations
    ],
)
def test_malformed_rejected(data):
    with pytest.raises(DecodeError):
        decode_message(data)


@settings(max_examples=400)
@given(st.binary(max_size=300))
def test_arbitrary_bytes(data):
    assert_decodes_canonically_or_rejects(data)


@settings(max_examples=300)
@given(st.sampled_from([1, 3]), st.binary(max_size=300))
def test_arbitrary_bytes_with_valid_type(msg_type, data):
    assert_decodes_canonically_or_rejects(bytes([msg_type]) + data)


@given(messages, st.data())
def test_truncations_and_corruptions(msg, data):
    wire = msg.encode()
    cut = data.draw(st.integers(0, len(wire)))
    assert_decodes_canonically_or_rejects(wire[:cut])
    if wire:
        pos = data.draw(st.integers(0, len(wire) - 1))
        val = data.draw(u8)
        assert_decodes_canonically_or_rejects(wire[:pos] + bytes([val]) + wire[pos + 1 :])
        extra = data.draw(st.binary(max_size=8))
        assert_decodes_canonically_or_rejects(wire + extra)


def test_encode_rejects_out_of_range():
    with pytest.raises(ValueError):
        RegistrationRequest("1.1.1.1", "2.2.2.2", "3.3.3.3", 2**64).encode()
    with pytest.raises(ValueError):
        NAIExtension("x" * 256).encode()
    with pytest.raises(ValueError):
        UnknownExtension(5, b"").encode()


def test_reply_code_classes():
    assert ReplyCode.ACCEPTED.accepted and ReplyCode.ACCEPTED_NO_SIMULTANEOUS_BINDINGS.accepted
    assert ReplyCode.FA_MN_FAILED_AUTHENTICATION == 67 and ReplyCode(67).denied_by_fa
    assert ReplyCode.HA_MN_FAILED_AUTHENTICATION == 131 and ReplyCode(131).denied_by_ha
    assert [ReplyCode(c) for c in (104, 105, 106)] == [
        ReplyCode.FA_UNKNOWN_CHALLENGE,
        ReplyCode.FA_MISSING_CHALLENGE,
        ReplyCode.FA_STALE_CHALLENGE,
    ]
    assert ReplyCode(97) is ReplyCode.FA_MISSING_NAI
    for code in (*range(64, 73), 77, 78, 80, 81, 82, 88, *range(128, 137)):
        ReplyCode(code)  # every RFC 5944 code exists
