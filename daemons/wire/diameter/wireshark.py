"""Wireshark dictionary text for our vendor AVPs (generated from :data:`DICTIONARY`).

Stock Wireshark shows vendor-32473 AVPs as "Unknown AVP" (an expert warning, not a malformed
packet). Dropping :func:`vendor_dictionary_xml` in as ``diameter/Custom.xml`` of a Wireshark
data directory (``WIRESHARK_DATA_DIR``; the stock dictionary.xml includes ``&Custom;``) makes
tshark/Wireshark decode them by name. Pure text generation: the caller writes the file.
"""

from __future__ import annotations

from xml.sax.saxutils import quoteattr

from .constants import VENDOR_MIPVPN
from .datatypes import AvpType
from .dictionary import DICTIONARY, Dictionary

_WS_TYPES = {
    AvpType.OCTET_STRING: "OctetString",
    AvpType.INTEGER32: "Integer32",
    AvpType.INTEGER64: "Integer64",
    AvpType.UNSIGNED32: "Unsigned32",
    AvpType.UNSIGNED64: "Unsigned64",
    AvpType.FLOAT32: "Float32",
    AvpType.FLOAT64: "Float64",
    AvpType.ADDRESS: "Address",
    AvpType.TIME: "Time",
    AvpType.UTF8STRING: "UTF8String",
    AvpType.DIAMETER_IDENTITY: "DiameterIdentity",
    AvpType.DIAMETER_URI: "DiameterURI",
    AvpType.ENUMERATED: "Enumerated",
    AvpType.IP_FILTER_RULE: "IPFilterRule",
    AvpType.IP_PREFIX: "UTF8String",
}

VENDOR_XML_ID = "MIPVPN"


def vendor_dictionary_xml(
    vendor_id: int = VENDOR_MIPVPN,
    *,
    vendor_name: str = "mipvpn (RFC 5612 documentation enterprise number)",
    dictionary: Dictionary = DICTIONARY,
) -> str:
    """A Wireshark dictionary fragment with a ``<vendor>`` and its AVPs."""
    defs = sorted((d for d in dictionary.avps.values() if d.vendor_id == vendor_id), key=lambda d: d.code)
    vid = quoteattr(VENDOR_XML_ID)
    lines = [
        '<?xml version="1.0" encoding="utf-8"?>',
        f'<vendor vendor-id={vid} code="{vendor_id}" name={quoteattr(vendor_name)}>',
    ]
    for d in defs:
        lines.append(
            f'  <avp name={quoteattr(d.name)} code="{d.code}" mandatory="{d.m_rule.value}"'
            f' vendor-bit="must" vendor-id={vid} may-encrypt="no">'
        )
        if d.dtype is AvpType.GROUPED:
            lines.append("    <grouped>")
            members = [m for m in defs if m is not d and m.dtype is not AvpType.GROUPED]
            lines += [f"      <gavp name={quoteattr(m.name)}/>" for m in members]
            lines.append("    </grouped>")
        else:
            lines.append(f'    <type type-name="{_WS_TYPES[d.dtype]}"/>')
            if d.enum is not None:
                lines += [f'    <enum name={quoteattr(m.name)} code="{int(m)}"/>' for m in d.enum]
        lines.append("  </avp>")
    lines.append("</vendor>")
    return "\n".join(lines) + "\n"
