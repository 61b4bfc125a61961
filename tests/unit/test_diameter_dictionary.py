"""The dictionary: cross-checked against Wireshark's (an independent implementation)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from daemons.wire.diameter import (
    DICTIONARY,
    SECRET_AVP_NAMES,
    VENDOR_MIPVPN,
    Avp,
    AvpType,
    Rule,
)
from daemons.wire.diameter.wireshark import vendor_dictionary_xml

WS_DIAMETER = Path("/usr/share/wireshark/diameter")

# Where Wireshark's type differs from the RFC; all are the same bytes on the wire.
WIRE_COMPATIBLE = {
    ("Address", "IPAddress"),  # Wireshark: RFC 6733 Address for codes >= 256
    ("Unsigned32", "AppId"),
    ("Unsigned32", "VendorId"),
    ("Unsigned32", "Enumerated"),  # Result-Code, Session-Binding, Experimental-Result-Code,
    # Inband-Security-Id, MIP-Feature-Vector: Enumerated (Integer32) in Wireshark
    ("Unsigned32", "Integer32"),  # Authorization-Lifetime
}
EXPECTED_TYPE_DIFFERENCES = {257, 258, 259, 265, 266, 268, 270, 291, 298, 299, 333, 334, 337}


def wireshark_avps() -> dict[int, tuple[str, str, str]]:
    out: dict[int, tuple[str, str, str]] = {}
    for f in ("dictionary.xml", "mobileipv4.xml", "nasreq.xml"):
        txt = (WS_DIAMETER / f).read_text(errors="replace")
        for m in re.finditer(r"<avp\s([^>]*)>(.*?)</avp>", txt, re.S):
            attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', m.group(1)))
            if "vendor-id" in attrs:
                continue
            t = re.search(r'type-name="([^"]+)"', m.group(2))
            out.setdefault(
                int(attrs["code"]),
                (attrs["name"], t.group(1) if t else "Grouped", attrs.get("mandatory", "may")),
            )
    return out


@pytest.mark.skipif(not WS_DIAMETER.exists(), reason="Wireshark dictionary not installed")
def test_ietf_avps_agree_with_wireshark():
    ws = wireshark_avps()
    differences = set()
    for d in DICTIONARY.avps.values():
        if d.vendor_id != 0:
            continue
        assert d.code in ws, d.name
        name, wtype, mrule = ws[d.code]
        assert name == d.name or name in d.aliases, (d.code, d.name, name)
        assert mrule == d.m_rule.value, (d.name, mrule)
        if wtype != d.dtype.value:
            assert (d.dtype.value, wtype) in WIRE_COMPATIBLE, (d.name, wtype)
            differences.add(d.code)
    assert differences == EXPECTED_TYPE_DIFFERENCES


@pytest.mark.skipif(not WS_DIAMETER.exists(), reason="Wireshark dictionary not installed")
def test_commands_agree_with_wireshark():
    txt = (WS_DIAMETER / "dictionary.xml").read_text(errors="replace")
    txt += (WS_DIAMETER / "mobileipv4.xml").read_text(errors="replace")
    ws = {int(c): n for n, c in re.findall(r'<command name="([^"]+)"\s+code="(\d+)"', txt)}
    for d in DICTIONARY.commands.values():
        assert d.name.rsplit("-", 1)[0] == ws[d.code], d.name
    assert '<application id="2" name="Mobile IPv4 Application"' in txt


RFC4004 = {
    318: "MIP-FA-to-HA-SPI",
    319: "MIP-FA-to-MN-SPI",
    320: "MIP-Reg-Request",
    321: "MIP-Reg-Reply",
    322: "MIP-MN-AAA-Auth",
    323: "MIP-HA-to-FA-SPI",
    325: "MIP-MN-to-FA-MSA",
    326: "MIP-FA-to-MN-MSA",
    328: "MIP-FA-to-HA-MSA",
    329: "MIP-HA-to-FA-MSA",
    331: "MIP-MN-to-HA-MSA",
    332: "MIP-HA-to-MN-MSA",
    333: "MIP-Mobile-Node-Address",
    334: "MIP-Home-Agent-Address",
    335: "MIP-Nonce",
    336: "MIP-Candidate-Home-Agent-Host",
    337: "MIP-Feature-Vector",
    338: "MIP-Auth-Input-Data-Length",
    339: "MIP-Authenticator-Length",
    340: "MIP-Authenticator-Offset",
    341: "MIP-MN-AAA-SPI",
    342: "MIP-Filter-Rule",
    343: "MIP-Session-Key",
    344: "MIP-FA-Challenge",
    345: "MIP-Algorithm-Type",
    346: "MIP-Replay-Mode",
    347: "MIP-Originating-Foreign-AAA",
    348: "MIP-Home-Agent-Host",
    367: "MIP-MSA-Lifetime",
}


def test_rfc4004_codes():
    for code, name in RFC4004.items():
        d = DICTIONARY.avp(code)
        assert d is not None and d.name == name and d.m_rule is Rule.MUST
    assert DICTIONARY.command_by_name("AMR").code == 260
    assert DICTIONARY.command_by_name("HAA").code == 262
    assert DICTIONARY.command_by_name("Home-Agent-MIP-Answer").application_id == 2


VPN_CODES = {
    1: ("VPN-Info", AvpType.GROUPED),
    2: ("VPN-Path-Id", AvpType.UNSIGNED32),
    3: ("VPN-Endpoint-Local", AvpType.ADDRESS),
    4: ("VPN-Endpoint-Remote", AvpType.ADDRESS),
    5: ("VPN-Endpoint-Local-Type", AvpType.ENUMERATED),
    6: ("VPN-Endpoint-Remote-Type", AvpType.ENUMERATED),
    7: ("VPN-Selector-Local", AvpType.IP_PREFIX),
    8: ("VPN-Selector-Remote", AvpType.IP_PREFIX),
    9: ("VPN-ESP-Suite", AvpType.UTF8STRING),
    10: ("VPN-SPI-In", AvpType.UNSIGNED32),
    11: ("VPN-SPI-Out", AvpType.UNSIGNED32),
    12: ("VPN-Key-In", AvpType.OCTET_STRING),
    13: ("VPN-Key-Out", AvpType.OCTET_STRING),
    14: ("VPN-IKE-PSK", AvpType.OCTET_STRING),
    15: ("VPN-Lifetime", AvpType.UNSIGNED32),
    16: ("VPN-QoS-Rate", AvpType.UNSIGNED64),
    17: ("VPN-QoS-Ceil", AvpType.UNSIGNED64),
    18: ("VPN-QoS-Priority", AvpType.UNSIGNED32),
    19: ("VPN-Distribution", AvpType.ENUMERATED),
    20: ("VPN-Sealed-Keys", AvpType.OCTET_STRING),
    21: ("VPN-Local-Answer-Key", AvpType.OCTET_STRING),
}


def test_vendor_avps_match_docs_table():
    ours = {d.code: (d.name, d.dtype) for d in DICTIONARY.avps.values() if d.vendor_id == 32473}
    assert ours == VPN_CODES
    for code in VPN_CODES:
        a = Avp(code, Avp.new(VPN_CODES[code][0], _sample(VPN_CODES[code][1])).value,
                vendor_id=VENDOR_MIPVPN)  # fmt: skip
        assert a.vendor_id == 32473 and not a.mandatory
        assert a.encode()[4] == 0x80  # V set, M clear
    doc = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
    text = doc.read_text()
    for code, (name, dtype) in VPN_CODES.items():
        wire_type = "UTF8String" if dtype is AvpType.IP_PREFIX else dtype.value
        row = rf"\|\s*{code}\s*\|\s*{re.escape(name)}\s*\|\s*{wire_type}\b"
        assert re.search(row, text), name


def _sample(dtype: AvpType):
    return {
        AvpType.GROUPED: [],
        AvpType.UNSIGNED32: 1,
        AvpType.UNSIGNED64: 1,
        AvpType.ADDRESS: "198.18.0.1",
        AvpType.ENUMERATED: 1,
        AvpType.IP_PREFIX: "198.18.0.0/15",
        AvpType.UTF8STRING: "aes128gcm16",
        AvpType.OCTET_STRING: b"k",
    }[dtype]


def test_secret_avps():
    assert SECRET_AVP_NAMES == {"VPN-Key-In", "VPN-Key-Out", "VPN-IKE-PSK", "MIP-Session-Key"}  # the rest travel sealed


def test_wireshark_fragment_lists_every_vendor_avp():
    xml = vendor_dictionary_xml()
    assert '<vendor vendor-id="MIPVPN" code="32473"' in xml
    for code, (name, _) in VPN_CODES.items():
        assert f'<avp name="{name}" code="{code}" mandatory="mustnot" vendor-bit="must"' in xml
    assert '<enum name="CNGW_DYNAMIC" code="4"/>' in xml
