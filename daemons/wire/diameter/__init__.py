"""Diameter wire format (RFC 6733 base, RFC 4004 Mobile IPv4, our VPN AVPs). No I/O.

Quick tour::

    from daemons.wire.diameter import Message, Avp, ResultCode, message_length

    amr = Message.request("AMR", [
        ("Session-Id", "fa1.visit-a.example;1;1"),
        ("Auth-Application-Id", 2),
        ("User-Name", "mn1@home.example"),
        ("MIP-Reg-Request", rrq_bytes),
        ("MIP-MN-AAA-Auth", [("MIP-MN-AAA-SPI", 256), ...]),
    ], hop_by_hop=1, end_to_end=2)
    wire = amr.encode()
    msg = Message.decode(wire)            # raises DecodeError only
    msg.get("MIP-MN-AAA-Auth", "MIP-MN-AAA-SPI")
    ama = msg.answer(ResultCode.DIAMETER_SUCCESS, [("Origin-Host", "aaah.home.example")])
"""

from . import constants
from .avp import Avp, decode_avps, encode_avps, make_avp, make_avps
from .constants import *  # noqa: F403
from .datatypes import AvpType, OtherAddress
from .dictionary import DICTIONARY, SECRET_AVP_NAMES, AvpDef, CommandDef, Dictionary, Rule
from .errors import DecodeError
from .message import Header, Identifiers, Message, copy_avp, message_length

__all__ = [
    "DICTIONARY",
    "SECRET_AVP_NAMES",
    "Avp",
    "AvpDef",
    "AvpType",
    "CommandDef",
    "DecodeError",
    "Dictionary",
    "Header",
    "Identifiers",
    "Message",
    "OtherAddress",
    "Rule",
    "copy_avp",
    "decode_avps",
    "encode_avps",
    "make_avp",
    "make_avps",
    "message_length",
    *(n for n in dir(constants) if not n.startswith("_") and n not in ("annotations", "enum")),
]
