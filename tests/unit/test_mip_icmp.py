"""Agent Advertisement / Solicitation codec (ICMP, RFC 5944 section 2) and IPv4 stripping."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, UDP

from daemons.wire.mip import (
    ADVERTISEMENT_EXTENSIONS,
    AdvChallengeExtension,
    AdvFlag,
    AgentAdvertisement,
    AgentSolicitation,
    DecodeError,
    MobilityAgentAdvExtension,
    NVSEExtension,
    PaddingExtension,
    PrefixLengthsExtension,
    UnknownExtension,
    UnknownExtensionError,
    decode_icmp,
    internet_checksum,
    strip_ipv4_header,
)

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
addrs = st.builds(IPv4Address, u32)

adv_extensions = st.one_of(
    st.builds(
        MobilityAgentAdvExtension,
        sequence=u16,
        registration_lifetime=u16,
        flags=st.builds(AdvFlag, u16),
        care_of_addresses=st.lists(addrs, max_size=8).map(tuple),
    ),
    st.builds(PrefixLengthsExtension, st.lists(st.integers(0, 32), max_size=8).map(tuple)),
    st.builds(AdvChallengeExtension, st.binary(max_size=255)),
    st.just(PaddingExtension()),
    st.builds(NVSEExtension, vendor_type=u16, data=st.binary(max_size=40), vendor_id=u32),
    st.builds(
        UnknownExtension,
        type_code=st.integers(128, 255).filter(lambda t: t not in ADVERTISEMENT_EXTENSIONS),
        data=st.binary(max_size=40),
    ),
)
advertisements = st.builds(
    AgentAdvertisement,
    lifetime=u16,
    addresses=st.lists(st.tuples(addrs, st.integers(-(2**31), 2**31 - 1)), max_size=4),
    extensions=st.lists(adv_extensions, max_size=5),
    code=st.sampled_from([0, 16]),
)


@given(advertisements)
def test_advertisement_round_trip(adv):
    wire = adv.encode()
    assert internet_checksum(wire) == 0
    back = decode_icmp(wire)
    assert back == adv
    assert back.encode() == wire


def test_advertisement_layout_and_accessors():
    adv = AgentAdvertisement(
        lifetime=1800,
        addresses=[("198.18.2.1", 0)],
        extensions=[
            MobilityAgentAdvExtension(7, 600, AdvFlag.R | AdvFlag.F, ["198.18.2.1"]),
            PrefixLengthsExtension([24]),
            AdvChallengeExtension(b"\x01\x02\x03\x04"),
        ],
    )
    wire = adv.encode()
    assert wire[0] == 9 and wire[1] == 0
    assert wire[4:8] == b"\x01\x02\x07\x08"
    assert wire[16:] == bytes.fromhex(
        "100a 0007 0258 9000 c6120201 1301 18 1804 01020304".replace(" ", "")
    )
    back = decode_icmp(wire)
    assert back.mobility.care_of_addresses == (IPv4Address("198.18.2.1"),)
    assert AdvFlag.F in back.mobility.flags and AdvFlag.H not in back.mobility.flags
    assert back.challenge == b"\x01\x02\x03\x04"
    assert back.prefix_lengths == (24,)
    plain = AgentAdvertisement(lifetime=10)
    assert decode_icmp(plain.encode()).mobility is None


def test_solicitation():
    wire = AgentSolicitation().encode()
    assert wire == bytes.fromhex("0a00f5ff00000000")
    assert decode_icmp(wire) == AgentSolicitation()


def test_bad_checksum_rejected():
    wire = bytearray(AgentSolicitation().encode())
    wire[2] ^= 1
    with pytest.raises(DecodeError):
        decode_icmp(bytes(wire))
    adv = bytearray(AgentAdvertisement(1, extensions=[AdvChallengeExtension(b"abcd")]).encode())
    adv[-1] ^= 0x40
    with pytest.raises(DecodeError):
        decode_icmp(bytes(adv))


def _fix_checksum(body: bytes) -> bytes:
    body = body[:2] + b"\x00\x00" + body[4:]
    return body[:2] + struct.pack("!H", internet_checksum(body)) + body[4:]


def test_unknown_advertisement_extension_below_128_rejects():
    wire = _fix_checksum(AgentAdvertisement(1).encode() + b"\x05\x00")
    with pytest.raises(UnknownExtensionError) as info:
        decode_icmp(wire)
    assert info.value.ext_type == 5 and isinstance(info.value.partial, AgentAdvertisement)


@pytest.mark.parametrize(
    "body",
    [
        b"\x09\x00\x00\x00\x01\x02\x00\x00",  # one address announced, none present
        b"\x09\x00\x00\x00\x00\x03\x00\x00",  # entry size 3
        b"\x09\x00\x00\x00\x00\x02\x00\x00\x10\x05" + b"\x00" * 5,  # mobility ext too short
        b"\x09\x00\x00\x00\x00\x02\x00\x00\x10\x07" + b"\x00" * 7,  # 6 + partial address
        b"\x09\x00\x00\x00\x00\x02\x00\x00\x18\x05abc",  # runs past the end
        b"\x08\x00\x00\x00\x00\x00\x00\x00",  # echo request: not agent discovery
        b"\x0a\x00\x00\x00",  # short solicitation
    ],
)
def test_malformed_icmp(body):
    with pytest.raises(DecodeError):
        decode_icmp(_fix_checksum(body) if len(body) >= 4 else body)


@settings(max_examples=400)
@given(st.sampled_from([9, 10, 0]), st.binary(max_size=120))
def test_arbitrary_icmp_bytes(icmp_type, data):
    for blob in (bytes([icmp_type]) + data, _fix_checksum(bytes([icmp_type]) + data)):
        if len(blob) < 4:
            continue
        try:
            msg = decode_icmp(blob)
        except DecodeError:
            continue
        assert isinstance(msg, AgentAdvertisement | AgentSolicitation)


@given(advertisements, st.data())
def test_truncated_and_corrupted_advertisements(adv, data):
    wire = adv.encode()
    cut = data.draw(st.integers(0, len(wire)))
    pos = data.draw(st.integers(0, len(wire) - 1))
    corrupted = bytearray(wire)
    corrupted[pos] = data.draw(st.integers(0, 255))
    for blob in (
        wire[:cut],
        _fix_checksum(wire[:cut]) if cut >= 4 else b"",
        bytes(corrupted),
        _fix_checksum(bytes(corrupted)),
    ):
        try:
            decode_icmp(blob)
        except DecodeError:
            pass


# ------------------------------------------------------------------------ IPv4 header
def test_strip_ipv4_header_with_scapy_packets():
    adv = AgentAdvertisement(1800, extensions=[MobilityAgentAdvExtension(1, 600, AdvFlag.F)])
    pkt = bytes(IP(src="198.18.2.1", dst="224.0.0.1", ttl=1, proto=1) / adv.encode())
    src, dst, ttl, icmp = strip_ipv4_header(pkt)
    assert (src, dst, ttl) == (IPv4Address("198.18.2.1"), IPv4Address("224.0.0.1"), 1)
    assert decode_icmp(icmp) == adv
    # IP options (IHL 6) and trailing link padding beyond total length
    pkt = bytes(IP(src="1.2.3.4", dst="5.6.7.8", options=b"\x94\x04\x00\x00") / ICMP(type=10))
    src, _, _, icmp = strip_ipv4_header(pkt + b"\x00" * 6)
    assert isinstance(decode_icmp(icmp), AgentSolicitation) and len(icmp) == 8


@pytest.mark.parametrize(
    "mutate",
    [
        lambda b: b[:19],
        lambda b: b"\x65" + b[1:],  # version 6
        lambda b: b"\x44" + b[1:],  # IHL 4
        lambda b: b[:10] + bytes([b[10] ^ 1]) + b[11:],  # checksum
        lambda b: b[:-1],  # shorter than total length
    ],
)
def test_strip_ipv4_header_rejects(mutate):
    pkt = bytes(IP(src="1.2.3.4", dst="5.6.7.8") / ICMP(type=10))
    strip_ipv4_header(pkt)
    with pytest.raises(DecodeError):
        strip_ipv4_header(mutate(pkt))


def test_strip_ipv4_header_protocol_and_fragments():
    udp = bytes(IP(src="1.2.3.4", dst="5.6.7.8") / UDP(sport=434, dport=434) / b"x")
    with pytest.raises(DecodeError):
        strip_ipv4_header(udp)
    assert strip_ipv4_header(udp, protocols=(17,))[3][:4] == b"\x01\xb2\x01\xb2"
    frag = bytes(IP(src="1.2.3.4", dst="5.6.7.8", flags="MF") / ICMP(type=10))
    with pytest.raises(DecodeError):
        strip_ipv4_header(frag)


@settings(max_examples=300)
@given(st.binary(max_size=80))
def test_strip_ipv4_header_arbitrary(data):
    for blob in (data, b"\x45" + data):
        try:
            strip_ipv4_header(blob)
        except DecodeError:
            pass
