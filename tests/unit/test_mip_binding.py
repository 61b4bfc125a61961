"""Binding Update / Acknowledge / Request / Warning (RFC 4064 Experimental Message 255,
Vendor-Id 32473): layouts, round trips, hostile input, authentication, and tshark with the
Lua dissector in docs/wireshark/mipvpn.lua as the independent decoder."""

from __future__ import annotations

import hashlib
import hmac
import json
import shutil
import struct
import subprocess
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemons.runtime.secret import Secret
from daemons.wire.mip import (
    BINDING_MESSAGES,
    EXT_BINDING_AUTH,
    EXT_FA_HA_AUTH,
    EXT_MN_HA_AUTH,
    MSG_EXPERIMENTAL,
    REGISTRATION_EXTENSIONS,
    VENDOR_ID,
    VENDOR_TYPE_PREVIOUS_FA,
    VENDOR_TYPE_VPN_INFO,
    BindingAcknowledge,
    BindingMessage,
    BindingRequest,
    BindingStatus,
    BindingUpdate,
    BindingWarning,
    BUFlag,
    CVSEExtension,
    DecodeError,
    FAHAAuthExtension,
    GeneralizedAuthExtension,
    MNHAAuthExtension,
    NAIExtension,
    NVSEExtension,
    RegistrationReply,
    RegistrationRequest,
    ReplyCode,
    UnknownExtension,
    UnknownExtensionError,
    append_authenticator,
    decode_message,
    decode_message_with_offsets,
    ntp_identification,
    sign,
    strip_after,
    vendor_extension,
    verify,
)

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, 2**64 - 1)
addrs = st.builds(IPv4Address, u32)

extensions = st.one_of(
    st.builds(FAHAAuthExtension, spi=u32, authenticator=st.binary(max_size=40)),
    st.builds(MNHAAuthExtension, spi=u32, authenticator=st.binary(max_size=40)),
    st.builds(GeneralizedAuthExtension, spi=u32, authenticator=st.binary(max_size=40), subtype=u8),
    st.builds(NAIExtension, nai=st.text(max_size=40)),
    st.builds(CVSEExtension, vendor_type=u16, data=st.binary(max_size=300), vendor_id=u32, reserved=u8),
    st.builds(NVSEExtension, vendor_type=u16, data=st.binary(max_size=247), vendor_id=u32, reserved=u16),
    st.builds(
        UnknownExtension,
        type_code=st.integers(128, 255).filter(lambda t: t not in REGISTRATION_EXTENSIONS),
        data=st.binary(max_size=60),
    ),
)
ext_lists = st.lists(extensions, max_size=5)
bu_flags = st.builds(BUFlag, st.sampled_from([0x00, 0x80, 0x20, 0x10, 0xB0, 0x30]))
binding_messages = st.one_of(
    st.builds(
        BindingUpdate,
        home_address=addrs,
        care_of_address=addrs,
        identification=st.none() | u64,
        lifetime=u16,
        flags=bu_flags,
        extensions=ext_lists,
    ),
    st.builds(
        BindingAcknowledge, status=u8, home_address=addrs, identification=u64, lifetime=u16, extensions=ext_lists
    ),
    st.builds(BindingRequest, home_address=addrs, identification=u64, extensions=ext_lists),
    st.builds(BindingWarning, home_address=addrs, target_node=addrs, extensions=ext_lists),
)

HOA, HA, FA, FA_OLD, CNGW = "198.18.1.10", "198.18.1.1", "198.18.2.1", "198.18.3.1", "198.18.9.1"
NOW = 1_795_761_042.5  # 2026-11-27 06:30:42.5 UTC
IDENT = ntp_identification(NOW)
KEY = Secret(b"ha-cngw binding key")


def header(subtype: int) -> bytes:
    return struct.pack("!BBHI", 255, subtype, 0, 32473)


def assert_decodes_canonically_or_rejects(data: bytes) -> None:
    try:
        msg = decode_message(data)
    except DecodeError:
        return
    assert msg.encode() == data


# ------------------------------------------------------------------------- layouts
def test_code_points():
    assert MSG_EXPERIMENTAL == 255 and VENDOR_ID == 32473
    assert EXT_BINDING_AUTH == EXT_FA_HA_AUTH == 34
    assert {k: v.__name__ for k, v in BINDING_MESSAGES.items()} == {
        (255, 1): "BindingUpdate",
        (255, 2): "BindingAcknowledge",
        (255, 3): "BindingRequest",
        (255, 4): "BindingWarning",
    }


def test_binding_update_layout():
    bu = BindingUpdate(HOA, FA, identification=0x0102030405060708, lifetime=600, flags=BUFlag.A | BUFlag.G)
    assert bu.flags == BUFlag.A | BUFlag.I | BUFlag.G  # I follows the identification
    expect = header(1) + bytes([0xD0, 0]) + struct.pack("!H", 600)
    expect += IPv4Address(HOA).packed + IPv4Address(FA).packed + bytes.fromhex("0102030405060708")
    assert bu.encode() == expect
    assert decode_message(expect) == bu
    assert bu.name == "Binding Update" and bu.ack_requested and not bu.is_deletion


def test_binding_update_without_identification():
    bu = BindingUpdate(HOA, FA, None, lifetime=0)
    wire = bu.encode()
    assert wire == header(1) + b"\x00\x00\x00\x00" + IPv4Address(HOA).packed + IPv4Address(FA).packed
    assert decode_message(wire) == bu and bu.is_deletion
    with pytest.raises(ValueError):
        BindingUpdate(HOA, FA, None, flags=BUFlag.I)
    with pytest.raises(ValueError):
        BindingUpdate(HOA, FA, 1, flags=BUFlag(0x01))


def test_other_layouts():
    ba = BindingAcknowledge(BindingStatus.VPN_INFO_MISSING, HOA, 7, lifetime=30)
    assert ba.encode() == header(2) + bytes([160, 0]) + struct.pack("!H", 30) + IPv4Address(HOA).packed + (
        7
    ).to_bytes(8, "big")
    assert not ba.accepted and BindingAcknowledge(0, HOA, 7).accepted
    assert isinstance(decode_message(BindingAcknowledge(200, HOA, 1).encode()).status, int)
    br = BindingRequest(HOA, 9)
    assert br.encode() == header(3) + IPv4Address(HOA).packed + (9).to_bytes(8, "big")
    bw = BindingWarning(HOA, CNGW)
    assert bw.encode() == header(4) + IPv4Address(HOA).packed + IPv4Address(CNGW).packed
    for msg in (ba, br, bw):
        assert decode_message(msg.encode()) == msg
        assert BindingMessage.decode(msg.encode()) == msg
        assert type(msg).decode(msg.encode()) == msg


def test_vendor_extensions_travel():
    bu = BindingUpdate(
        HOA,
        FA,
        IDENT,
        600,
        extensions=[
            NAIExtension("alice@example.net"),
            vendor_extension(VENDOR_TYPE_VPN_INFO, b"vpn", critical=True),
            vendor_extension(VENDOR_TYPE_PREVIOUS_FA, IPv4Address(FA_OLD).packed, critical=False),
        ],
    )
    back = decode_message(bu.encode())
    assert back.vendor_data(VENDOR_TYPE_VPN_INFO) == b"vpn"
    assert IPv4Address(back.vendor_data(VENDOR_TYPE_PREVIOUS_FA)) == IPv4Address(FA_OLD)
    assert back.find(NAIExtension).nai == "alice@example.net"


@pytest.mark.parametrize(
    "data",
    [
        b"\xff",  # no subtype
        b"\xff\x01",  # truncated header
        header(1)[:7],
        header(5) + b"\x00" * 20,  # unknown subtype
        header(0) + b"\x00" * 20,
        struct.pack("!BBHI", 255, 1, 0, 9) + b"\x00" * 20,  # another vendor's experiment
        struct.pack("!BBHI", 255, 1, 1, 32473) + b"\x00" * 12,  # reserved header bits
        header(1) + b"\x00" * 11,  # BU one byte short
        header(1) + b"\x40" + b"\x00" * 11,  # I set but no identification
        header(1) + b"\x01" + b"\x00" * 11,  # reserved flag bit
        header(1) + b"\x00\x01" + b"\x00" * 10,  # reserved octet
        header(2) + b"\x00\x01" + b"\x00" * 14,
        header(2) + b"\x00" * 15,
        header(3) + b"\x00" * 11,
        header(4) + b"\x00" * 7,
        header(4) + b"\x00" * 8 + b"\x22\x03abc",  # auth extension shorter than its SPI
        header(4) + b"\x00" * 8 + b"\x83\x05ab",  # extension runs past the end
    ],
)
def test_malformed_rejected(data):
    with pytest.raises(DecodeError):
        decode_message(data)


def test_wrong_class_rejects_other_subtype():
    with pytest.raises(DecodeError):
        BindingUpdate.decode(BindingRequest(HOA, 1).encode())
    with pytest.raises(DecodeError):
        BindingUpdate.decode(RegistrationRequest(HOA, HA, FA, 1).encode())


def test_unknown_non_skippable_extension_gives_partial():
    wire = BindingUpdate(HOA, FA, IDENT, 600).encode() + b"\x7f\x00"
    with pytest.raises(UnknownExtensionError) as err:
        decode_message(wire)
    assert err.value.ext_type == 127 and err.value.offset == 28
    assert err.value.partial == BindingUpdate(HOA, FA, IDENT, 600)


def test_registration_messages_unchanged():
    rrq = RegistrationRequest(HOA, HA, FA, IDENT, 600, extensions=[NAIExtension("a@b")])
    assert decode_message(rrq.encode()) == rrq
    rrp = RegistrationReply(ReplyCode.ACCEPTED, HOA, HA, IDENT, 600)
    assert decode_message(rrp.encode()) == rrp
    with pytest.raises(DecodeError, match="unknown Mobile IP message type 2"):
        decode_message(b"\x02" + b"\x00" * 30)


@settings(max_examples=300)
@given(binding_messages)
def test_round_trip(msg):
    wire = msg.encode()
    back, offsets = decode_message_with_offsets(wire)
    assert back == msg
    assert back.encode() == wire
    assert type(back).decode(wire) == msg
    assert len(offsets) == len(msg.extensions)


@settings(max_examples=400)
@given(st.binary(max_size=120))
def test_arbitrary_bytes(data):
    assert_decodes_canonically_or_rejects(data)


@settings(max_examples=400)
@given(st.integers(0, 6), st.binary(max_size=120))
def test_arbitrary_bytes_with_our_header(subtype, data):
    assert_decodes_canonically_or_rejects(header(subtype) + data)


@settings(max_examples=200)
@given(st.integers(1, 4), st.binary(min_size=8, max_size=16), ext_lists)
def test_arbitrary_fixed_part_with_valid_extensions(subtype, body, exts):
    assert_decodes_canonically_or_rejects(header(subtype) + body + b"".join(e.encode() for e in exts))


# ------------------------------------------------------------------------- authentication
def signed_bu() -> BindingUpdate:
    bu = BindingUpdate(
        HOA,
        FA,
        IDENT,
        600,
        BUFlag.A,
        [NAIExtension("alice@example.net"), vendor_extension(VENDOR_TYPE_VPN_INFO, b"vpn-info", critical=True)],
    )
    return sign(bu, EXT_BINDING_AUTH, 0x1000, KEY)


def test_sign_is_hmac_md5_over_everything_before_the_authenticator():
    wire = signed_bu().encode()
    covered = wire[:-16]
    assert covered.endswith(struct.pack("!BBI", 34, 20, 0x1000))
    assert wire[-16:] == hmac.new(KEY.reveal(), covered, hashlib.md5).digest()
    assert verify(wire, EXT_BINDING_AUTH, KEY, spi=0x1000)
    assert not verify(wire, EXT_BINDING_AUTH, KEY, spi=0x1001)
    assert not verify(wire, EXT_BINDING_AUTH, Secret(b"other"))
    assert not verify(wire, EXT_MN_HA_AUTH, KEY)  # absent


@pytest.mark.parametrize("cls", [BindingAcknowledge, BindingRequest, BindingWarning])
def test_sign_verify_every_message(cls):
    msg = {
        BindingAcknowledge: BindingAcknowledge(0, HOA, IDENT, 600),
        BindingRequest: BindingRequest(HOA, IDENT),
        BindingWarning: BindingWarning(HOA, CNGW),
    }[cls]
    signed = sign(msg, EXT_BINDING_AUTH, 7, KEY)
    assert isinstance(signed, cls)
    assert verify(signed.encode(), EXT_BINDING_AUTH, KEY, spi=7)


def test_flipping_any_byte_breaks_verification():
    wire = signed_bu().encode()
    for pos in range(len(wire)):
        bad = bytearray(wire)
        bad[pos] ^= 0x01
        try:
            ok = verify(bytes(bad), EXT_BINDING_AUTH, KEY)
        except DecodeError:
            ok = False
        assert not ok, pos


def test_append_and_strip_on_raw_bytes():
    raw = BindingUpdate(HOA, FA, IDENT, 600, extensions=[NAIExtension("a@b")]).encode()
    wire = append_authenticator(raw, EXT_BINDING_AUTH, 0x2000, KEY)
    assert verify(wire, EXT_BINDING_AUTH, KEY, spi=0x2000)
    assert strip_after(wire + NAIExtension("tail").encode(), EXT_BINDING_AUTH) == wire


# ------------------------------------------------------------------------- tshark + Lua
TSHARK = shutil.which("tshark")
LUA = Path(__file__).resolve().parents[2] / "docs" / "wireshark" / "mipvpn.lua"
SEVERITY_WARN = 0x00600000
FIELDS = [
    "frame.number",
    "mipvpn.msg",
    "mipvpn.type",
    "mipvpn.subtype",
    "mipvpn.vendor_id",
    "mipvpn.flags",
    "mipvpn.flags.a",
    "mipvpn.flags.i",
    "mipvpn.lifetime",
    "mipvpn.status",
    "mipvpn.hoa",
    "mipvpn.coa",
    "mipvpn.target",
    "mipvpn.ident",
    "mipvpn.ident.time",
    "mipvpn.ext.type",
    "mipvpn.auth.spi",
    "mipvpn.auth.authenticator",
    "mipvpn.nai",
    "mipvpn.vse.vendor_id",
    "mipvpn.vse.vendor_type",
    "mipvpn.vse.value",
    "mipvpn.vse.previous_fa",
    "mip.type",
    "mip.code",
    "mip.life",
    "mip.homeaddr",
    "mip.haaddr",
    "mip.coa",
    "mip.ident",
    "mip.nai",
    "mip.ext.type",
    "mip.auth.spi",
    "mip.ext.cvse.vendor_id",
    "_ws.malformed",
    "_ws.lua.error",
    "_ws.expert",
    "_ws.expert.severity",
]


def run_tshark(path: Path, lua: bool) -> tuple[list[dict[str, list[str]]], str]:
    assert TSHARK is not None
    cmd = [TSHARK, "-r", str(path), "-T", "ek"]
    if lua:
        cmd += ["-X", f"lua_script:{LUA}"]
    for f in FIELDS:
        if lua or not f.startswith("mipvpn"):  # without the script tshark knows no mipvpn.*
            cmd += ["-e", f]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=60)
    frames = [json.loads(line)["layers"] for line in res.stdout.splitlines() if line.startswith('{"timestamp"')]
    return frames, res.stderr


def ek(frame: dict[str, list[str]], field: str) -> list[str]:
    return frame.get(field.replace(".", "_"), [])


@pytest.fixture(scope="module")
def capture(tmp_path_factory):
    if TSHARK is None:
        pytest.skip("tshark is not installed")
    from scapy.layers.inet import IP, UDP
    from scapy.utils import wrpcap

    def udp(src, dst, payload: bytes, sport=434):
        return IP(src=src, dst=dst) / UDP(sport=sport, dport=434) / payload

    bu = signed_bu().with_extensions()
    bu6 = sign(
        BindingUpdate(
            HOA,
            FA,
            IDENT,
            30,
            BUFlag.A,
            [vendor_extension(VENDOR_TYPE_PREVIOUS_FA, IPv4Address(FA_OLD).packed, critical=False)],
        ),
        EXT_BINDING_AUTH,
        0x3000,
        KEY,
    )
    msgs = {
        "bu": bu,
        "ba": sign(BindingAcknowledge(BindingStatus.ACCEPTED, HOA, IDENT, 600), EXT_BINDING_AUTH, 0x1000, KEY),
        "ba_rejected": BindingAcknowledge(BindingStatus.VPN_INFO_UNSUPPORTED, HOA, IDENT, 0),
        "br": BindingRequest(HOA, IDENT + 1),
        "bw": BindingWarning(HOA, CNGW),
        "bu_noid": BindingUpdate(HOA, FA, None, 0),
        "bu_smooth": bu6,
        "rrq": sign(
            RegistrationRequest(HOA, HA, FA, IDENT, 600, extensions=[NAIExtension("alice@example.net")]),
            EXT_MN_HA_AUTH,
            0x100,
            KEY,
        ),
        "rrp": sign(RegistrationReply(ReplyCode.ACCEPTED, HOA, HA, IDENT, 600), EXT_MN_HA_AUTH, 0x100, KEY),
    }
    pkts = [
        udp(HA, CNGW, msgs["bu"].encode()),
        udp(CNGW, HA, msgs["ba"].encode()),
        udp(CNGW, HA, msgs["ba_rejected"].encode()),
        udp(CNGW, HA, msgs["br"].encode(), sport=40000),
        udp(FA_OLD, HA, msgs["bw"].encode()),
        udp(HA, CNGW, msgs["bu_noid"].encode()),
        udp(FA, FA_OLD, msgs["bu_smooth"].encode()),
        udp("198.18.2.10", FA, msgs["rrq"].encode()),
        udp(HA, FA, msgs["rrp"].encode()),
    ]
    path = tmp_path_factory.mktemp("mipvpn") / "binding.pcap"
    wrpcap(str(path), pkts)
    frames, stderr = run_tshark(path, lua=True)
    plain, _ = run_tshark(path, lua=False)
    assert len(frames) == len(plain) == len(pkts)
    return {"msgs": msgs, "frames": frames, "plain": plain, "stderr": stderr}


def test_tshark_lua_loads_cleanly(capture):
    assert "lua" not in capture["stderr"].lower(), capture["stderr"]
    for fr in capture["frames"]:
        assert not ek(fr, "_ws.malformed"), fr
        assert not ek(fr, "_ws.lua.error"), fr
        assert all(int(s) < SEVERITY_WARN for s in ek(fr, "_ws.expert.severity")), fr


def test_tshark_binding_update(capture):
    fr = capture["frames"][0]
    bu = capture["msgs"]["bu"]
    assert ek(fr, "mipvpn.msg") == ["Binding Update"]
    assert ek(fr, "mipvpn.type") == ["255"]
    assert ek(fr, "mipvpn.subtype") == ["1"]
    assert ek(fr, "mipvpn.vendor_id") == ["32473"]
    assert ek(fr, "mipvpn.flags") == ["0xc0"]
    assert ek(fr, "mipvpn.flags.a") == ["1"] and ek(fr, "mipvpn.flags.i") == ["1"]
    assert ek(fr, "mipvpn.lifetime") == ["600"]
    assert ek(fr, "mipvpn.hoa") == [HOA]
    assert ek(fr, "mipvpn.coa") == [FA]
    assert [int(v, 16) for v in ek(fr, "mipvpn.ident")] == [IDENT]
    assert ek(fr, "mipvpn.ident.time") == ["Nov 27, 2026 06:30:42.500000000 UTC"]
    assert ek(fr, "mipvpn.ext.type") == ["131", "38", "34"]
    assert ek(fr, "mipvpn.nai") == ["alice@example.net"]
    assert ek(fr, "mipvpn.vse.vendor_id") == ["32473"]
    assert ek(fr, "mipvpn.vse.vendor_type") == [str(VENDOR_TYPE_VPN_INFO)]
    assert ek(fr, "mipvpn.vse.value") == [b"vpn-info".hex()]
    assert [int(v, 16) for v in ek(fr, "mipvpn.auth.spi")] == [0x1000]
    assert ek(fr, "mipvpn.auth.authenticator") == [bu.extensions[-1].authenticator.hex()]
    assert not ek(fr, "mip.type")  # the built-in dissector did not claim it


def test_tshark_binding_acknowledge(capture):
    fr = capture["frames"][1]
    assert ek(fr, "mipvpn.msg") == ["Binding Acknowledge"]
    assert ek(fr, "mipvpn.subtype") == ["2"]
    assert ek(fr, "mipvpn.status") == ["0"]
    assert ek(fr, "mipvpn.lifetime") == ["600"]
    assert ek(fr, "mipvpn.hoa") == [HOA]
    assert [int(v, 16) for v in ek(fr, "mipvpn.ident")] == [IDENT]
    assert ek(fr, "mipvpn.ext.type") == ["34"]
    fr = capture["frames"][2]
    assert ek(fr, "mipvpn.status") == [str(int(BindingStatus.VPN_INFO_UNSUPPORTED))]
    assert ek(fr, "mipvpn.lifetime") == ["0"]


def test_tshark_binding_request_and_warning(capture):
    fr = capture["frames"][3]
    assert ek(fr, "mipvpn.msg") == ["Binding Request"]
    assert ek(fr, "mipvpn.subtype") == ["3"]
    assert ek(fr, "mipvpn.hoa") == [HOA]
    assert [int(v, 16) for v in ek(fr, "mipvpn.ident")] == [IDENT + 1]
    assert not ek(fr, "mipvpn.ext.type")
    fr = capture["frames"][4]
    assert ek(fr, "mipvpn.msg") == ["Binding Warning"]
    assert ek(fr, "mipvpn.subtype") == ["4"]
    assert ek(fr, "mipvpn.hoa") == [HOA]
    assert ek(fr, "mipvpn.target") == [CNGW]


def test_tshark_binding_update_variants(capture):
    fr = capture["frames"][5]
    assert ek(fr, "mipvpn.flags") == ["0x00"]
    assert ek(fr, "mipvpn.flags.i") == ["0"]
    assert not ek(fr, "mipvpn.ident")
    assert ek(fr, "mipvpn.lifetime") == ["0"]
    fr = capture["frames"][6]
    assert ek(fr, "mipvpn.coa") == [FA]
    assert ek(fr, "mipvpn.ext.type") == ["134", "34"]
    assert ek(fr, "mipvpn.vse.vendor_type") == [str(VENDOR_TYPE_PREVIOUS_FA)]
    assert ek(fr, "mipvpn.vse.previous_fa") == [FA_OLD]


def test_tshark_registration_messages_still_decoded_by_mip(capture):
    """Loading the Lua script must not change how RRQ/RRP decode."""
    for idx in (7, 8):
        with_lua, without = capture["frames"][idx], capture["plain"][idx]
        assert with_lua == without
        assert not any(k.startswith("mipvpn") for k in with_lua)
    rrq, rrp = capture["frames"][7], capture["frames"][8]
    assert ek(rrq, "mip.type") == ["1"]
    assert ek(rrq, "mip.homeaddr") == [HOA] and ek(rrq, "mip.coa") == [FA]
    assert ek(rrq, "mip.nai") == ["alice@example.net"]
    assert ek(rrq, "mip.ext.type") == ["131", "32"]
    assert ek(rrp, "mip.type") == ["3"] and ek(rrp, "mip.code") == ["0"]
    assert ek(rrp, "mip.ident") == ["Nov 27, 2026 06:30:42.500000000 UTC"]
