"""AVP data formats (RFC 6733 §4.2 basic, §4.3 derived) and their Python values.

=================  ==========================================================
type               Python value
=================  ==========================================================
OctetString        ``bytes`` (``Secret`` for AVPs the dictionary marks secret)
Integer32/64       ``int`` (range-checked)
Unsigned32/64      ``int`` (range-checked; an ``IntEnum``/``IntFlag`` member
                   when the dictionary gives one and the value is a member)
Float32/64         ``float`` (Float32 values are rounded to single precision)
Grouped            ``list[Avp]``
Address            ``IPv4Address`` / ``IPv6Address``, or ``OtherAddress``
Time               aware ``datetime`` in UTC, whole seconds (NTP seconds on
                   the wire, RFC 5905 era rule: MSB clear means after 2036)
UTF8String         ``str``
DiameterIdentity   ``str`` (ASCII)
DiameterURI        ``str`` (ASCII)
Enumerated         ``int`` / ``IntEnum`` member (Integer32 on the wire)
IPFilterRule       ``str`` (ASCII)
IPPrefix           ``IPv4Network`` / ``IPv6Network``; our derived type, text
                   ``"a.b.c.d/len"`` in a UTF8String (see docs/protocol.md)
=================  ==========================================================
"""

from __future__ import annotations

import enum
import ipaddress
import math
import struct
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

from .constants import ResultCode
from .errors import DecodeError


class AvpType(enum.Enum):
    OCTET_STRING = "OctetString"
    INTEGER32 = "Integer32"
    INTEGER64 = "Integer64"
    UNSIGNED32 = "Unsigned32"
    UNSIGNED64 = "Unsigned64"
    FLOAT32 = "Float32"
    FLOAT64 = "Float64"
    GROUPED = "Grouped"
    ADDRESS = "Address"
    TIME = "Time"
    UTF8STRING = "UTF8String"
    DIAMETER_IDENTITY = "DiameterIdentity"
    DIAMETER_URI = "DiameterURI"
    ENUMERATED = "Enumerated"
    IP_FILTER_RULE = "IPFilterRule"
    IP_PREFIX = "IPPrefix"


class OtherAddress(NamedTuple):
    """An Address AVP value of a family other than IPv4 (1) / IPv6 (2)."""

    family: int
    data: bytes


ADDRESS_FAMILY_IPV4 = 1
ADDRESS_FAMILY_IPV6 = 2

_NTP_EPOCH = datetime(1900, 1, 1, tzinfo=UTC)
_NTP_ERA1 = _NTP_EPOCH + timedelta(seconds=2**32)
TIME_MIN = _NTP_EPOCH + timedelta(seconds=2**31)  # 1968-01-20T03:14:08Z
TIME_MAX = _NTP_ERA1 + timedelta(seconds=2**31 - 1)  # 2104-02-26T09:42:23Z

_INT_FORMATS: dict[AvpType, tuple[str, int, int]] = {
    AvpType.INTEGER32: (">i", -(2**31), 2**31 - 1),
    AvpType.ENUMERATED: (">i", -(2**31), 2**31 - 1),
    AvpType.INTEGER64: (">q", -(2**63), 2**63 - 1),
    AvpType.UNSIGNED32: (">I", 0, 2**32 - 1),
    AvpType.UNSIGNED64: (">Q", 0, 2**64 - 1),
}
_FLOAT_FORMATS = {AvpType.FLOAT32: ">f", AvpType.FLOAT64: ">d"}
_ASCII_TYPES = (AvpType.DIAMETER_IDENTITY, AvpType.DIAMETER_URI, AvpType.IP_FILTER_RULE)


def _bad_length(dtype: AvpType, n: int) -> DecodeError:
    return DecodeError(f"{dtype.value} AVP data of {n} bytes", result_code=ResultCode.DIAMETER_INVALID_AVP_LENGTH)


def _bad_value(dtype: AvpType, why: str) -> DecodeError:
    return DecodeError(f"invalid {dtype.value} AVP data: {why}", result_code=ResultCode.DIAMETER_INVALID_AVP_VALUE)


def coerce(dtype: AvpType, value: Any) -> Any:
    """Check and normalise a Python value for ``dtype`` (not Grouped); TypeError/ValueError."""
    if dtype in _INT_FORMATS:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{dtype.value} needs an int, not {type(value).__name__}")
        _, lo, hi = _INT_FORMATS[dtype]
        if not lo <= value <= hi:
            raise ValueError(f"{dtype.value} out of range: {value}")
        return value
    if dtype in _FLOAT_FORMATS:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"{dtype.value} needs a float, not {type(value).__name__}")
        value = float(value)
        if dtype is AvpType.FLOAT32 and math.isfinite(value):
            try:
                value = struct.unpack(">f", struct.pack(">f", value))[0]
            except OverflowError:
                raise ValueError("value does not fit in a Float32") from None
        return value
    if dtype is AvpType.OCTET_STRING:
        if not isinstance(value, bytes | bytearray | memoryview):
            raise TypeError(f"OctetString needs bytes, not {type(value).__name__}")
        return bytes(value)
    if dtype is AvpType.UTF8STRING:
        if not isinstance(value, str):
            raise TypeError(f"UTF8String needs a str, not {type(value).__name__}")
        value.encode("utf-8")  # surrogates raise UnicodeEncodeError (a ValueError)
        return value
    if dtype in _ASCII_TYPES:
        if not isinstance(value, str):
            raise TypeError(f"{dtype.value} needs a str, not {type(value).__name__}")
        value.encode("ascii")
        return value
    if dtype is AvpType.ADDRESS:
        if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
            return value
        if isinstance(value, OtherAddress):
            if not 0 <= value.family <= 0xFFFF:
                raise ValueError("address family out of range")
            return OtherAddress(value.family, bytes(value.data))
        if isinstance(value, str):
            return ipaddress.ip_address(value)
        raise TypeError(f"Address needs an IP address, not {type(value).__name__}")
    if dtype is AvpType.TIME:
        if not isinstance(value, datetime):
            raise TypeError(f"Time needs a datetime, not {type(value).__name__}")
        if value.tzinfo is None:
            raise ValueError("Time needs an aware datetime (UTC)")
        value = value.astimezone(UTC).replace(microsecond=0)
        if not TIME_MIN <= value <= TIME_MAX:
            raise ValueError("Time outside the 32-bit NTP range 1968..2104")
        return value
    if dtype is AvpType.IP_PREFIX:
        if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
            return value
        if isinstance(value, str):
            return ipaddress.ip_network(value, strict=True)
        raise TypeError(f"IPPrefix needs an IP network, not {type(value).__name__}")
    raise TypeError(f"no scalar coercion for {dtype.value}")


def encode_value(dtype: AvpType, value: Any) -> bytes:
    """Encode an already coerced scalar value (not Grouped)."""
    if dtype in _INT_FORMATS:
        return struct.pack(_INT_FORMATS[dtype][0], int(value))
    if dtype in _FLOAT_FORMATS:
        return struct.pack(_FLOAT_FORMATS[dtype], value)
    if dtype is AvpType.OCTET_STRING:
        return value.reveal() if hasattr(value, "reveal") else bytes(value)
    if dtype is AvpType.UTF8STRING:
        return value.encode("utf-8")
    if dtype in _ASCII_TYPES:
        return value.encode("ascii")
    if dtype is AvpType.ADDRESS:
        if isinstance(value, ipaddress.IPv4Address):
            return struct.pack(">H", ADDRESS_FAMILY_IPV4) + value.packed
        if isinstance(value, ipaddress.IPv6Address):
            return struct.pack(">H", ADDRESS_FAMILY_IPV6) + value.packed
        return struct.pack(">H", value.family) + value.data
    if dtype is AvpType.TIME:
        secs = int((value - _NTP_EPOCH).total_seconds())
        if secs >= 2**32:
            secs -= 2**32
        return struct.pack(">I", secs)
    if dtype is AvpType.IP_PREFIX:
        return str(value).encode("ascii")
    raise TypeError(f"no scalar encoding for {dtype.value}")


def decode_value(dtype: AvpType, data: bytes) -> Any:
    """Decode the data of a scalar AVP; raises DecodeError only."""
    n = len(data)
    if dtype in _INT_FORMATS:
        fmt = _INT_FORMATS[dtype][0]
        if n != struct.calcsize(fmt):
            raise _bad_length(dtype, n)
        return struct.unpack(fmt, data)[0]
    if dtype in _FLOAT_FORMATS:
        fmt = _FLOAT_FORMATS[dtype]
        if n != struct.calcsize(fmt):
            raise _bad_length(dtype, n)
        return struct.unpack(fmt, data)[0]
    if dtype is AvpType.OCTET_STRING:
        return bytes(data)
    if dtype is AvpType.UTF8STRING:
        try:
            return bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            raise _bad_value(dtype, "not UTF-8") from None
    if dtype in _ASCII_TYPES:
        try:
            return bytes(data).decode("ascii")
        except UnicodeDecodeError:
            raise _bad_value(dtype, "not ASCII") from None
    if dtype is AvpType.ADDRESS:
        if n < 2:
            raise _bad_length(dtype, n)
        family = int.from_bytes(data[:2], "big")
        if family == ADDRESS_FAMILY_IPV4:
            if n != 6:
                raise _bad_length(dtype, n)
            return ipaddress.IPv4Address(bytes(data[2:]))
        if family == ADDRESS_FAMILY_IPV6:
            if n != 18:
                raise _bad_length(dtype, n)
            return ipaddress.IPv6Address(bytes(data[2:]))
        return OtherAddress(family, bytes(data[2:]))
    if dtype is AvpType.TIME:
        if n != 4:
            raise _bad_length(dtype, n)
        secs = int.from_bytes(data, "big")
        base = _NTP_EPOCH if secs & 0x80000000 else _NTP_ERA1
        return base + timedelta(seconds=secs)
    if dtype is AvpType.IP_PREFIX:
        try:
            text = bytes(data).decode("ascii")
            network = ipaddress.ip_network(text, strict=True)
        except ValueError:  # UnicodeDecodeError is a ValueError too
            raise _bad_value(dtype, "not an IP prefix") from None
        if str(network) != text:  # "a.b.c.d/len" as written out, never a bare address or "::0/0"
            raise _bad_value(dtype, "not an IP prefix in canonical form (address/length)")
        return network
    raise TypeError(f"no scalar decoding for {dtype.value}")
