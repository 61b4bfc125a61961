"""Independent decoder: messages built by daemons.wire.mip, wrapped in IP/UDP or IP/ICMP by scapy,
written to a pcap and decoded by tshark, which must see the right fields and report no
malformed packets or expert warnings/errors."""

from __future__ import annotations

import json
import shutil
import subprocess
from datetime import UTC, datetime

import pytest
from scapy.layers.inet import IP, UDP
from scapy.utils import wrpcap

from daemons.runtime.secret import Secret
from daemons.wire.mip import (
    CHAP_SPI,
    EXT_FA_HA_AUTH,
    EXT_GEN_AUTH,
    EXT_MN_FA_AUTH,
    EXT_MN_HA_AUTH,
    VENDOR_ID,
    VENDOR_TYPE_PREVIOUS_FA,
    VENDOR_TYPE_VPN_INFO,
    AdvChallengeExtension,
    AdvFlag,
    AgentAdvertisement,
    AgentSolicitation,
    MNFAChallengeExtension,
    MobilityAgentAdvExtension,
    NAIExtension,
    PrefixLengthsExtension,
    RegistrationReply,
    RegistrationRequest,
    ReplyCode,
    RRQFlag,
    append_authenticator,
    ntp_identification,
    reply_identification,
    sign,
    strip_after,
    vendor_extension,
)

TSHARK = shutil.which("tshark")
pytestmark = pytest.mark.skipif(TSHARK is None, reason="tshark is not installed")

NOW = 1_795_761_042.5  # 2026-11-27 06:30:42.5 UTC
IDENT = ntp_identification(NOW)
CHALLENGE = bytes.fromhex("a1b2c3d4e5f60718")
MN, FA, HA, HOA = "198.18.2.10", "198.18.2.1", "198.18.1.1", "198.18.1.10"
SEVERITY_WARN = 0x00600000  # wireshark PI_WARN; PI_ERROR is 0x00800000

FIELDS = [
    "frame.number",
    "mip.type",
    "mip.flags",
    "mip.code",
    "mip.life",
    "mip.homeaddr",
    "mip.haaddr",
    "mip.coa",
    "mip.ident",
    "mip.nai",
    "mip.ext.type",
    "mip.ext.auth.subtype",
    "mip.auth.spi",
    "mip.auth.auth",
    "mip.ext.cvse.vendor_id",
    "mip.ext.cvse.vendor_type",
    "mip.ext.cvse.vendor_value",
    "mip.ext.nvse.vendor_id",
    "mip.ext.nvse.vendor_type",
    "mip.ext.nvse.vendor_value",
    "icmp.type",
    "icmp.code",
    "icmp.checksum.status",
    "icmp.lifetime",
    "icmp.mip.type",
    "icmp.mip.seq",
    "icmp.mip.life",
    "icmp.mip.flags",
    "icmp.mip.r",
    "icmp.mip.h",
    "icmp.mip.f",
    "icmp.mip.coa",
    "icmp.mip.prefixlength",
    "icmp.mip.challenge",
    "ip.checksum.status",
    "udp.checksum.status",
    "_ws.malformed",
    "_ws.expert",
    "_ws.expert.severity",
]


def tshark_ek(path) -> list[dict[str, list[str]]]:
    cmd = [TSHARK, "-r", str(path), "-o", "ip.check_checksum:TRUE"]
    cmd += ["-o", "udp.check_checksum:TRUE", "-T", "ek"]
    for f in FIELDS:
        cmd += ["-e", f]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=60).stdout
    frames = [json.loads(line) for line in out.splitlines() if line.startswith('{"timestamp"')]
    return [fr["layers"] for fr in frames]


def ek_get(frame: dict[str, list[str]], field: str) -> list[str]:
    """Values of ``field`` in one frame of ``-T ek`` output (which writes dots as ``_``)."""
    return frame.get(field.replace(".", "_"), [])


def assert_clean(frame):
    assert not ek_get(frame, "_ws.malformed"), frame
    severities = [int(s) for s in ek_get(frame, "_ws.expert.severity")]
    assert all(s < SEVERITY_WARN for s in severities), frame


def udp(src, dst, payload: bytes):
    return IP(src=src, dst=dst) / UDP(sport=434, dport=434) / payload


def icmp(src, dst, payload: bytes):
    return IP(src=src, dst=dst, ttl=1, proto=1) / payload


@pytest.fixture(scope="module")
def built():
    mn_ha, mn_aaa = Secret(b"mn-ha key"), Secret(b"mn-aaa key")
    mn_fa, fa_ha = Secret(b"mn-fa key"), Secret(b"fa-ha key")
    rrq = RegistrationRequest(
        home_address=HOA,
        home_agent=HA,
        care_of_address=FA,
        identification=IDENT,
        lifetime=600,
        flags=RRQFlag.T,
        extensions=[
            NAIExtension("alice@example.net"),
            MNFAChallengeExtension(CHALLENGE),
            vendor_extension(VENDOR_TYPE_VPN_INFO, b"\x01\x02\x03", critical=True),
            vendor_extension(VENDOR_TYPE_PREVIOUS_FA, bytes([198, 18, 3, 1]), critical=False),
        ],
    )
    rrq = sign(rrq, EXT_MN_HA_AUTH, 0x100, mn_ha)
    rrq = sign(rrq, EXT_GEN_AUTH, CHAP_SPI, mn_aaa)
    rrq = sign(rrq, EXT_MN_FA_AUTH, 0x200, mn_fa)
    rrq_wire = rrq.encode()
    relayed = append_authenticator(
        strip_after(rrq_wire, EXT_GEN_AUTH), EXT_FA_HA_AUTH, 0x300, fa_ha
    )
    rrp = sign(
        RegistrationReply(ReplyCode.ACCEPTED, HOA, HA, IDENT, lifetime=600),
        EXT_MN_HA_AUTH,
        0x100,
        mn_ha,
    )
    rrp133 = RegistrationReply(
        ReplyCode.HA_IDENTIFICATION_MISMATCH,
        HOA,
        HA,
        reply_identification(IDENT, NOW + 100, accepted=False),
    )
    adv = AgentAdvertisement(
        lifetime=1800,
        addresses=[(FA, 0)],
        code=16,
        extensions=[
            MobilityAgentAdvExtension(
                42, 600, AdvFlag.R | AdvFlag.F | AdvFlag.H, [FA, "198.18.2.2"]
            ),
            PrefixLengthsExtension([24]),
            AdvChallengeExtension(CHALLENGE),
        ],
    )
    pkts = [
        udp(MN, FA, rrq_wire),
        udp(FA, HA, relayed),
        udp(HA, FA, rrp.encode()),
        udp(HA, FA, rrp133.encode()),
        icmp(FA, "224.0.0.1", adv.encode()),
        icmp(MN, "224.0.0.2", AgentSolicitation().encode()),
    ]
    return {"rrq": rrq, "relayed": relayed, "rrp": rrp, "pkts": pkts}


@pytest.fixture(scope="module")
def frames(built, tmp_path_factory):
    path = tmp_path_factory.mktemp("mip") / "mip.pcap"
    wrpcap(str(path), built["pkts"])
    out = tshark_ek(path)
    assert len(out) == len(built["pkts"])
    return out


def test_no_malformed_or_expert_problems(frames):
    for fr in frames:
        assert_clean(fr)
        assert ek_get(fr, "ip.checksum.status") == ["1"]


def test_rrq_fields(frames, built):
    fr = frames[0]
    assert ek_get(fr, "mip.type") == ["1"]
    assert ek_get(fr, "mip.flags") == ["0x02"]
    assert ek_get(fr, "mip.life") == ["600"]
    assert ek_get(fr, "mip.homeaddr") == [HOA]
    assert ek_get(fr, "mip.haaddr") == [HA]
    assert ek_get(fr, "mip.coa") == [FA]
    assert ek_get(fr, "mip.ident") == ["Nov 27, 2026 06:30:42.500000000 UTC"]
    assert (
        datetime.fromtimestamp(NOW, UTC).strftime("%b %d, %Y %H:%M:%S")
        in ek_get(fr, "mip.ident")[0]
    )
    assert ek_get(fr, "mip.nai") == ["alice@example.net"]
    assert ek_get(fr, "mip.ext.type") == ["131", "132", "38", "134", "32", "36", "33"]
    assert ek_get(fr, "mip.ext.auth.subtype") == ["1"]
    assert ek_get(fr, "mip.auth.spi") == ["0x00000100", "0x00000002", "0x00000200"]
    ours = [e.authenticator.hex() for e in built["rrq"].extensions[-3:]]
    assert ek_get(fr, "mip.auth.auth") == ours
    assert ek_get(fr, "mip.ext.cvse.vendor_id") == [str(VENDOR_ID)]
    assert [int(v, 0) for v in ek_get(fr, "mip.ext.cvse.vendor_type")] == [VENDOR_TYPE_VPN_INFO]
    assert ek_get(fr, "mip.ext.cvse.vendor_value") == ["010203"]
    assert ek_get(fr, "mip.ext.nvse.vendor_id") == [str(VENDOR_ID)]
    assert [int(v, 0) for v in ek_get(fr, "mip.ext.nvse.vendor_type")] == [VENDOR_TYPE_PREVIOUS_FA]
    assert ek_get(fr, "mip.ext.nvse.vendor_value") == ["c6120301"]
    assert ek_get(fr, "udp.checksum.status") == ["1"]


def test_relayed_rrq_fields(frames):
    fr = frames[1]
    assert ek_get(fr, "mip.ext.type") == ["131", "132", "38", "134", "32", "36", "34"]
    assert ek_get(fr, "mip.auth.spi") == ["0x00000100", "0x00000002", "0x00000300"]


def test_rrp_fields(frames):
    fr = frames[2]
    assert ek_get(fr, "mip.type") == ["3"]
    assert ek_get(fr, "mip.code") == ["0"]
    assert ek_get(fr, "mip.life") == ["600"]
    assert ek_get(fr, "mip.homeaddr") == [HOA]
    assert ek_get(fr, "mip.haaddr") == [HA]
    assert ek_get(fr, "mip.ident") == ["Nov 27, 2026 06:30:42.500000000 UTC"]
    assert ek_get(fr, "mip.auth.spi") == ["0x00000100"]
    fr = frames[3]
    assert ek_get(fr, "mip.code") == ["133"]
    # high 32 bits: the HA's clock (100 s later); low 32 bits copied from the request
    assert ek_get(fr, "mip.ident") == ["Nov 27, 2026 06:32:22.500000000 UTC"]


def test_agent_advertisement_fields(frames):
    fr = frames[4]
    assert ek_get(fr, "icmp.type") == ["9"]
    assert ek_get(fr, "icmp.code") == ["16"]
    assert ek_get(fr, "icmp.checksum.status") == ["1"]
    assert ek_get(fr, "icmp.lifetime") == ["1800"]
    assert ek_get(fr, "icmp.mip.type") == ["16", "19", "24"]
    assert ek_get(fr, "icmp.mip.seq") == ["42"]
    assert ek_get(fr, "icmp.mip.life") == ["600"]
    assert ek_get(fr, "icmp.mip.flags") == ["0xb000"]
    assert ek_get(fr, "icmp.mip.r") == ["1"]
    assert ek_get(fr, "icmp.mip.h") == ["1"]
    assert ek_get(fr, "icmp.mip.f") == ["1"]
    assert ek_get(fr, "icmp.mip.coa") == [FA, "198.18.2.2"]
    assert ek_get(fr, "icmp.mip.prefixlength") == ["24"]
    assert ek_get(fr, "icmp.mip.challenge") == [CHALLENGE.hex()]


def test_agent_solicitation_fields(frames):
    fr = frames[5]
    assert ek_get(fr, "icmp.type") == ["10"]
    assert ek_get(fr, "icmp.checksum.status") == ["1"]


def test_the_clean_check_is_not_vacuous(built, tmp_path):
    """Negative control: tshark does flag a truncated RRQ and a bad ICMP checksum."""
    bad_icmp = bytearray(AgentSolicitation().encode())
    bad_icmp[3] ^= 0xFF
    path = tmp_path / "bad.pcap"
    wrpcap(
        str(path),
        [udp(MN, FA, built["rrq"].encode()[:-5]), icmp(MN, "224.0.0.2", bytes(bad_icmp))],
    )
    for fr in tshark_ek(path):
        with pytest.raises(AssertionError):
            assert_clean(fr)
