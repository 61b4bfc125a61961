"""Independent decoder: our Diameter messages in a pcap (TCP 3868), decoded by tshark.

tshark's RFC 4004 dictionary must name the commands and AVPs, and must report no malformed
packet and no expert info at warning/error level, except (with the stock dictionary) the
"unknown AVP/vendor" notes for our own vendor-32473 AVPs. With the dictionary fragment that
daemons.wire.diameter.wireshark generates, those disappear too.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from daemons.wire.diameter import (
    VENDOR_MIPVPN,
    Message,
    MipAlgorithmType,
    MipFeatureVector,
    MipReplayMode,
    ResultCode,
    VpnDistribution,
    VpnEndpointType,
)
from daemons.wire.diameter.wireshark import vendor_dictionary_xml

TSHARK = shutil.which("tshark")
pytestmark = pytest.mark.skipif(TSHARK is None, reason="tshark not installed")
WS_DATA = Path("/usr/share/wireshark")

FA, AAAF, AAAH, HA = "198.18.1.2", "198.18.1.3", "198.18.0.3", "198.18.0.2"


def vpn_info(path_id: int, local: str, remote: str, ltype, rtype) -> tuple[str, list]:
    rnd = random.Random(path_id)
    return (
        "VPN-Info",
        [
            ("VPN-Path-Id", path_id),
            ("VPN-Endpoint-Local", local),
            ("VPN-Endpoint-Remote", remote),
            ("VPN-Endpoint-Local-Type", ltype),
            ("VPN-Endpoint-Remote-Type", rtype),
            ("VPN-Selector-Local", "198.18.100.10/32"),
            ("VPN-Selector-Remote", "198.18.200.0/24"),
            ("VPN-ESP-Suite", "aes128gcm16"),
            ("VPN-SPI-In", 0x10000 + path_id),
            ("VPN-SPI-Out", 0x20000 + path_id),
            ("VPN-Key-In", rnd.randbytes(20)),
            ("VPN-Key-Out", rnd.randbytes(20)),
            ("VPN-IKE-PSK", rnd.randbytes(32)),
            ("VPN-Lifetime", 3600),
            ("VPN-QoS-Rate", 2_000_000),
            ("VPN-QoS-Ceil", 10_000_000_000),
            ("VPN-QoS-Priority", 1),
            ("VPN-Distribution", VpnDistribution.AT_REGISTRATION),
        ],
    )


def exchanges(seed: int) -> dict[tuple[str, str], list[Message]]:
    """Request/answer pairs per TCP connection (client, server)."""
    rnd = random.Random(seed)
    sid = f"fa1.visit-a.example;{seed};1"
    cer = Message.request(
        "CER",
        [
            ("Origin-Host", "fa1.visit-a.example"),
            ("Origin-Realm", "visit-a.example"),
            ("Host-IP-Address", FA),
            ("Host-IP-Address", "2001:db8::2"),
            ("Vendor-Id", VENDOR_MIPVPN),
            ("Product-Name", "mipvpn"),
            ("Origin-State-Id", 1),
            ("Supported-Vendor-Id", VENDOR_MIPVPN),
            ("Auth-Application-Id", 2),
            ("Inband-Security-Id", 0),
            ("Firmware-Revision", 1),
        ],
        hop_by_hop=1,
        end_to_end=0x10000001,
    )
    cea = cer.answer(
        ResultCode.DIAMETER_SUCCESS,
        [
            ("Origin-Host", "aaaf1.visit-a.example"),
            ("Origin-Realm", "visit-a.example"),
            ("Host-IP-Address", AAAF),
            ("Vendor-Id", VENDOR_MIPVPN),
            ("Product-Name", "mipvpn"),
            ("Auth-Application-Id", 2),
        ],
    )
    dwr = Message.request(
        "DWR",
        [("Origin-Host", "fa1.visit-a.example"), ("Origin-Realm", "visit-a.example")],
        hop_by_hop=2,
        end_to_end=0x10000002,
    )
    dwa = dwr.answer(2001, [("Origin-Host", "aaaf1.visit-a.example"), ("Origin-Realm", "visit-a.example")])
    amr = Message.request(
        "AMR",
        [
            ("Session-Id", sid),
            ("Auth-Application-Id", 2),
            ("User-Name", "mn1@home.example"),
            ("Destination-Realm", "home.example"),
            ("Origin-Host", "fa1.visit-a.example"),
            ("Origin-Realm", "visit-a.example"),
            ("MIP-Reg-Request", rnd.randbytes(rnd.randrange(1, 120))),
            (
                "MIP-MN-AAA-Auth",
                [
                    ("MIP-MN-AAA-SPI", 256),
                    ("MIP-Auth-Input-Data-Length", 60),
                    ("MIP-Authenticator-Length", 16),
                    ("MIP-Authenticator-Offset", 66),
                ],
            ),
            (
                "MIP-Feature-Vector",
                MipFeatureVector.HOME_AGENT_REQUESTED | MipFeatureVector.FA_HA_KEY_REQUEST,
            ),
            ("MIP-Mobile-Node-Address", "198.18.100.10"),
            ("MIP-Home-Agent-Address", HA),
            ("MIP-FA-Challenge", rnd.randbytes(16)),
            ("Acct-Multi-Session-Id", "ms-1"),
            ("Event-Timestamp", datetime(2026, 11, 27, 7, 0, 0, tzinfo=UTC)),
            vpn_info(1, FA, HA, VpnEndpointType.FA, VpnEndpointType.HA),
            ("Proxy-Info", [("Proxy-Host", "aaaf1.visit-a.example"), ("Proxy-State", b"\x07")]),
            ("Route-Record", "aaaf1.visit-a.example"),
        ],
        hop_by_hop=3,
        end_to_end=0x10000003,
    )
    msa = [("MIP-Algorithm-Type", MipAlgorithmType.HMAC_SHA_1), ("MIP-Session-Key", b"k" * 16)]
    ama = amr.answer(
        ResultCode.DIAMETER_SUCCESS,
        [
            ("Auth-Application-Id", 2),
            ("Origin-Host", "aaah.home.example"),
            ("Origin-Realm", "home.example"),
            ("User-Name", "mn1@home.example"),
            ("Authorization-Lifetime", 1800),
            ("Auth-Session-State", 1),
            ("MIP-Reg-Reply", rnd.randbytes(rnd.randrange(1, 80))),
            ("MIP-FA-to-HA-MSA", [("MIP-FA-to-HA-SPI", 0x1001), *msa]),
            ("MIP-FA-to-MN-MSA", [("MIP-FA-to-MN-SPI", 0x1002), *msa]),
            (
                "MIP-MN-to-HA-MSA",
                [
                    ("MIP-Algorithm-Type", 2),
                    ("MIP-Replay-Mode", MipReplayMode.TIMESTAMPS),
                    ("MIP-Nonce", rnd.randbytes(16)),
                ],
            ),
            ("MIP-MSA-Lifetime", 1800),
            ("MIP-Home-Agent-Address", HA),
            ("MIP-Mobile-Node-Address", "198.18.100.10"),
            ("MIP-Filter-Rule", "permit in ip from 198.18.100.10 to any"),
            vpn_info(1, FA, HA, VpnEndpointType.FA, VpnEndpointType.HA),
            vpn_info(2, FA, "198.18.2.1", VpnEndpointType.FA, VpnEndpointType.CNGW_DYNAMIC),
        ],
    )
    har = Message.request(
        "HAR",
        [
            ("Session-Id", sid),
            ("Auth-Application-Id", 2),
            ("Authorization-Lifetime", 1800),
            ("Auth-Session-State", 1),
            ("MIP-Reg-Request", rnd.randbytes(rnd.randrange(1, 120))),
            ("Origin-Host", "aaah.home.example"),
            ("Origin-Realm", "home.example"),
            ("User-Name", "mn1@home.example"),
            ("Destination-Realm", "home.example"),
            ("MIP-Feature-Vector", MipFeatureVector.FA_HA_KEY_REQUEST),
            ("Destination-Host", "ha.home.example"),
            ("MIP-HA-to-FA-MSA", [("MIP-HA-to-FA-SPI", 0x1003), *msa]),
            (
                "MIP-HA-to-MN-MSA",
                [("MIP-Algorithm-Type", 2), ("MIP-Replay-Mode", 2), ("MIP-Session-Key", b"m" * 16)],
            ),
            ("MIP-MSA-Lifetime", 1800),
            (
                "MIP-Originating-Foreign-AAA",
                [("Origin-Realm", "visit-a.example"), ("Origin-Host", "aaaf1.visit-a.example")],
            ),
            ("MIP-Mobile-Node-Address", "198.18.100.10"),
            ("MIP-Home-Agent-Address", HA),
            vpn_info(1, HA, FA, VpnEndpointType.HA, VpnEndpointType.FA),
            vpn_info(3, HA, "198.18.2.1", VpnEndpointType.HA, VpnEndpointType.CNGW_STATIC),
        ],
        hop_by_hop=4,
        end_to_end=0x20000004,
    )
    haa = har.answer(
        ResultCode.DIAMETER_SUCCESS,
        [
            ("Auth-Application-Id", 2),
            ("Origin-Host", "ha.home.example"),
            ("Origin-Realm", "home.example"),
            ("User-Name", "mn1@home.example"),
            ("MIP-Reg-Reply", rnd.randbytes(rnd.randrange(1, 80))),
            ("MIP-Home-Agent-Address", HA),
            ("MIP-Mobile-Node-Address", "198.18.100.10"),
            ("MIP-FA-to-HA-SPI", 0x1001),
            ("MIP-FA-to-MN-SPI", 0x1002),
        ],
    )
    dpr = Message.request(
        "DPR",
        [
            ("Origin-Host", "aaah.home.example"),
            ("Origin-Realm", "home.example"),
            ("Disconnect-Cause", 0),
        ],
        hop_by_hop=5,
        end_to_end=0x20000005,
    )
    dpa = dpr.answer(
        ResultCode.DIAMETER_UNKNOWN_PEER,
        [
            ("Origin-Host", "ha.home.example"),
            ("Origin-Realm", "home.example"),
            ("Error-Message", "who are you?"),
            ("Failed-AVP", [("Origin-Host", "aaah.home.example")]),
        ],
    )
    return {
        (FA, AAAF): [cer, cea, dwr, dwa, amr, ama],
        (AAAH, HA): [har, haa, dpr, dpa],
    }


def write_pcap(path: Path, conns: dict[tuple[str, str], list[Message]]) -> None:
    from scapy.all import IP, TCP, Ether, wrpcap

    pkts = []
    for n, ((cli, srv), msgs) in enumerate(conns.items()):
        cport, sport = 40000 + n, 3868
        cseq, sseq = 1000, 5000

        def seg(src, dst, sp, dp, flags, seq, ack, payload=b""):
            return Ether() / IP(src=src, dst=dst) / TCP(sport=sp, dport=dp, flags=flags, seq=seq, ack=ack) / payload

        pkts += [
            seg(cli, srv, cport, sport, "S", cseq - 1, 0),
            seg(srv, cli, sport, cport, "SA", sseq - 1, cseq),
            seg(cli, srv, cport, sport, "A", cseq, sseq),
        ]
        for m in msgs:
            data = m.encode()
            if m.is_request:
                pkts.append(seg(cli, srv, cport, sport, "PA", cseq, sseq, data))
                cseq += len(data)
            else:
                pkts.append(seg(srv, cli, sport, cport, "PA", sseq, cseq, data))
                sseq += len(data)
    for i, p in enumerate(pkts):
        p.time = 1_700_000_000 + i / 100
    wrpcap(str(path), pkts)


def tshark(pcap: Path, *args: str, datadir: Path | None = None) -> str:
    cmd = [TSHARK, "-n", "-r", str(pcap), *args]
    env = dict(os.environ)
    if datadir is not None:
        env["WIRESHARK_DATA_DIR"] = str(datadir)
        env["HOME"] = str(datadir)
        if os.geteuid() == 0:  # Wireshark ignores WIRESHARK_DATA_DIR for root
            cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, check=True)
    return out.stdout


def expert_summaries(pcap: Path, datadir: Path | None = None) -> dict[str, list[str]]:
    """Expert infos by severity section ("Errors", "Warns", ...) -> summary lines."""
    out = tshark(pcap, "-q", "-z", "expert", datadir=datadir)
    sections: dict[str, list[str]] = {}
    current = None
    for line in out.splitlines():
        m = re.match(r"^(Errors|Warns|Notes|Chats|Comments) \(\d+\)", line)
        if m:
            current = sections.setdefault(m.group(1), [])
        elif current is not None and re.match(r"^\s+\d+\s+\S", line):
            current.append(line.strip())
    return sections


@pytest.fixture
def workdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="mipvpn-diameter-"))
    try:
        d.chmod(0o755)  # readable by the unprivileged tshark run
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(params=[1, 2, 3])
def capture(request, workdir) -> Path:
    pcap = workdir / "diameter.pcap"
    write_pcap(pcap, exchanges(request.param))
    pcap.chmod(0o644)
    return pcap


def test_tshark_names_commands_and_applications(capture):
    rows = [
        line.split("\t")
        for line in tshark(
            capture,
            "-Y", "diameter",
            "-T", "fields",
            "-E", "separator=/t",
            "-e", "diameter.cmd.code",
            "-e", "diameter.applicationId",
            "-e", "diameter.flags.request",
            "-e", "diameter.flags.error",
        ).splitlines()
    ]  # fmt: skip
    flag = {"1": True, "0": False, "True": True, "False": False}
    got = [(int(c), int(a), flag[r], flag[e]) for c, a, r, e in rows]
    assert got == [
        (257, 0, True, False),
        (257, 0, False, False),
        (280, 0, True, False),
        (280, 0, False, False),
        (260, 2, True, False),
        (260, 2, False, False),
        (262, 2, True, False),
        (262, 2, False, False),
        (282, 0, True, False),
        (282, 0, False, True),
    ]
    text = tshark(capture, "-V", "-O", "diameter")
    for expect in [
        "Command Code: AA-Mobile-Node (260)",
        "Command Code: Home-Agent-MIP (262)",
        "Command Code: Capabilities-Exchange (257)",
        "ApplicationId: Mobile IPv4 Application (2)",
        "Result-Code: DIAMETER_SUCCESS (2001)",
        "Result-Code: DIAMETER_UNKNOWN_PEER (3010)",
        "Host-IP-Address Address: 198.18.1.2",
        "Host-IP-Address Address: 2001:db8::2",
        "MIP-Mobile-Node-Address Address: 198.18.100.10",
        "MIP-Home-Agent-Address Address: 198.18.0.2",
        "Event-Timestamp: Nov 27, 2026 07:00:00.000000000 UTC",
        "Origin-Host: fa1.visit-a.example",
        "MIP-Algorithm-Type: HMAC-SHA-1 (2)",
        "MIP-Replay-Mode: Timestamps (2)",
    ]:
        assert expect in text, expect
    for name, code in [
        ("MIP-Reg-Request", 320),
        ("MIP-Reg-Reply", 321),
        ("MIP-MN-AAA-Auth", 322),
        ("MIP-MN-AAA-SPI", 341),
        ("MIP-Auth-Input-Data-Length", 338),
        ("MIP-Authenticator-Length", 339),
        ("MIP-Authenticator-Offset", 340),
        ("MIP-Feature-Vector", 337),
        ("MIP-FA-Challenge", 344),
        ("MIP-FA-to-HA-MSA", 328),
        ("MIP-FA-to-MN-MSA", 326),
        ("MIP-MN-to-HA-MSA", 331),
        ("MIP-HA-to-FA-MSA", 329),
        ("MIP-HA-to-MN-MSA", 332),
        ("MIP-FA-to-HA-SPI", 318),
        ("MIP-FA-to-MN-SPI", 319),
        ("MIP-HA-to-FA-SPI", 323),
        ("MIP-Session-Key", 343),
        ("MIP-Nonce", 335),
        ("MIP-MSA-Lifetime", 367),
        ("MIP-Filter-Rule", 342),
        ("MIP-Originating-Foreign-AAA", 347),
        ("Accounting-Multi-Session-Id", 50),
        ("Proxy-Info", 284),
        ("Failed-AVP", 279),
    ]:
        assert f"AVP: {name}({code})" in text, name
    assert "Malformed" not in text and "Bad " not in text


def test_tshark_no_malformed_and_no_expert_warnings(capture):
    assert tshark(capture, "-Y", "_ws.malformed") == ""
    assert tshark(capture, "-Y", "_ws.expert.severity >= error") == ""
    experts = expert_summaries(capture)
    assert "Errors" not in experts
    assert experts.get("Warns"), "stock tshark should flag our vendor AVPs as undecoded"
    assert _only_our_vendor(experts), experts["Warns"]
    assert all("Malformed" not in line for lines in experts.values() for line in lines)


def _only_our_vendor(experts: dict[str, list[str]]) -> bool:
    """Stock Wireshark does not know vendor 32473: 'Unknown AVP'/'Unknown Vendor' warnings
    (group Undecoded) for our AVPs are all it may say at warning level."""
    for line in experts.get("Warns", []):
        if "Undecoded" not in line or "Diameter" not in line:
            return False
        if not ("Unknown Vendor" in line or "vendor=Example Enterprise Number for Documentation" in line):
            return False
    return True


def _datadir_with_our_dictionary(root: Path) -> Path:
    """A Wireshark data directory: the stock one plus our vendor AVPs as diameter/Custom.xml."""
    d = root / "wireshark"
    (d / "diameter").mkdir(parents=True)
    for entry in WS_DATA.iterdir():
        if entry.name != "diameter":
            (d / entry.name).symlink_to(entry)
    for entry in (WS_DATA / "diameter").iterdir():
        if entry.name != "Custom.xml":
            (d / "diameter" / entry.name).symlink_to(entry)
    (d / "diameter" / "Custom.xml").write_text(vendor_dictionary_xml())
    for p in (d, d / "diameter"):
        p.chmod(0o755)
    return d


@pytest.mark.skipif(
    not (WS_DATA / "diameter" / "dictionary.xml").exists() or (os.geteuid() == 0 and shutil.which("setpriv") is None),
    reason="needs the stock Wireshark data directory (and setpriv when root)",
)
def test_tshark_with_our_vendor_dictionary(workdir):
    pcap = workdir / "diameter.pcap"
    write_pcap(pcap, exchanges(7))
    pcap.chmod(0o644)
    datadir = _datadir_with_our_dictionary(workdir)
    experts = expert_summaries(pcap, datadir)
    assert "Errors" not in experts and "Warns" not in experts, experts
    text = tshark(pcap, "-V", "-O", "diameter", datadir=datadir)
    for expect in [
        "AVP: VPN-Info(1)",
        "AVP: VPN-Path-Id(2)",
        "VPN-Endpoint-Local-Type: FA (1)",
        "VPN-Endpoint-Remote-Type: CNGW_DYNAMIC (4)",
        "VPN-Selector-Remote: 198.18.200.0/24",
        "VPN-ESP-Suite: aes128gcm16",
        "VPN-QoS-Ceil: 10000000000",
        "VPN-Distribution: AT_REGISTRATION (0)",
        "AVP: VPN-Key-In(12)",
        "AVP: VPN-IKE-PSK(14)",
    ]:
        assert expect in text, expect
    assert "Unknown AVP" not in text and "Malformed" not in text
