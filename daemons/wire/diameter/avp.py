"""AVPs (RFC 6733 §4): header, flags, optional Vendor-Id, typed data, padding."""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from daemons.runtime.secret import Secret

from .constants import (
    AVP_FLAG_MANDATORY,
    AVP_FLAG_PROTECTED,
    AVP_FLAG_VENDOR,
    VENDOR_IETF,
    ResultCode,
)
from .datatypes import AvpType, coerce, decode_value, encode_value
from .dictionary import DICTIONARY, AvpDef, Rule
from .errors import DecodeError

MAX_AVP_LENGTH = 0xFFFFFF
MAX_GROUP_DEPTH = 32  # deeper nesting in received bytes is refused (no RecursionError)

AvpKey = str | int | AvpDef

_INTEGER_TYPES = (
    AvpType.INTEGER32,
    AvpType.INTEGER64,
    AvpType.UNSIGNED32,
    AvpType.UNSIGNED64,
    AvpType.ENUMERATED,
)


def _key_of(key: AvpKey) -> tuple[int, int]:
    if isinstance(key, AvpDef):
        return key.key
    if isinstance(key, int):
        return (key, VENDOR_IETF)
    return DICTIONARY.avp_by_name(key).key


class AvpContainer:
    """Lookup helpers shared by :class:`Message` and Grouped :class:`Avp`."""

    __slots__ = ()

    def children(self) -> list[Avp]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Avp]:
        return iter(self.children())

    def find_all(self, *path: AvpKey) -> list[Avp]:
        """All AVPs named by the last element of ``path``, inside the first match of the rest."""
        if not path:
            raise TypeError("find_all() needs at least one AVP name or code")
        parent: AvpContainer | None = self.find(*path[:-1]) if len(path) > 1 else self
        if parent is None:
            return []
        if isinstance(parent, Avp) and parent.dtype is not AvpType.GROUPED:
            return []
        k = _key_of(path[-1])
        return [a for a in parent.children() if a.key == k]

    def find(self, *path: AvpKey) -> Avp | None:
        """The first AVP matching ``path`` (names, codes or AvpDefs; descends Grouped AVPs)."""
        node: AvpContainer = self
        found: Avp | None = None
        for key in path:
            if isinstance(node, Avp) and node.dtype is not AvpType.GROUPED:
                return None
            k = _key_of(key)
            found = next((a for a in node.children() if a.key == k), None)
            if found is None:
                return None
            node = found
        return found

    def get(self, *path: AvpKey, default: Any = None) -> Any:
        """The value of :meth:`find` (``default`` when absent)."""
        a = self.find(*path)
        return default if a is None else a.value

    def walk(self) -> Iterator[Avp]:
        """Every AVP, depth first, including those inside Grouped AVPs."""
        for a in self.children():
            yield a
            if a.dtype is AvpType.GROUPED:
                yield from a.walk()


def make_avp(spec: Avp | tuple[str, Any] | tuple[int, Any]) -> Avp:
    """An :class:`Avp` from an Avp or a ``(name, value)`` pair."""
    if isinstance(spec, Avp):
        return spec
    if isinstance(spec, tuple) and len(spec) == 2:
        name, value = spec
        if isinstance(name, int):
            return Avp(name, value)
        return Avp.new(name, value)
    raise TypeError(f"not an AVP or (name, value) pair: {type(spec).__name__}")


def make_avps(specs: Iterable[Any] | Mapping[str, Any]) -> list[Avp]:
    if isinstance(specs, Mapping):
        specs = list(specs.items())
    return [make_avp(s) for s in specs]


class Avp(AvpContainer):
    """One AVP. ``value`` is typed per the dictionary (see :mod:`.datatypes`).

    ``vendor_id`` is ``None`` when the V bit is clear. ``flags`` is the raw flags octet
    (the V bit is derived from ``vendor_id`` on encoding; reserved bits are kept as received).
    AVPs unknown to the dictionary hold their data as ``bytes`` (OctetString) and re-encode
    byte-identically.
    """

    __slots__ = ("_value", "code", "dtype", "flags", "vendor_id")

    def __init__(
        self,
        code: int,
        value: Any,
        *,
        vendor_id: int | None = None,
        mandatory: bool | None = None,
        protected: bool = False,
        dtype: AvpType | None = None,
    ) -> None:
        if not 0 <= code <= 0xFFFFFFFF:
            raise ValueError(f"AVP code out of range: {code}")
        if vendor_id is not None and not 0 <= vendor_id <= 0xFFFFFFFF:
            raise ValueError(f"Vendor-Id out of range: {vendor_id}")
        d = DICTIONARY.avp(code, vendor_id)
        self.code = code
        self.vendor_id = vendor_id
        self.dtype = dtype or (d.dtype if d else AvpType.OCTET_STRING)
        if mandatory is None:
            mandatory = d is not None and d.m_rule is Rule.MUST
        self.flags = (AVP_FLAG_MANDATORY if mandatory else 0) | (AVP_FLAG_PROTECTED if protected else 0)
        self.value = value

    @classmethod
    def new(cls, name: str, value: Any, *, mandatory: bool | None = None, protected: bool = False) -> Avp:
        """An AVP by dictionary name; M and V flags follow the definition."""
        d = DICTIONARY.avp_by_name(name)
        vendor = d.vendor_id if d.vendor_flag else None
        return cls(d.code, value, vendor_id=vendor, mandatory=mandatory, protected=protected)

    # -- attributes -------------------------------------------------------------------------

    @property
    def key(self) -> tuple[int, int]:
        return (self.code, self.vendor_id or VENDOR_IETF)

    @property
    def definition(self) -> AvpDef | None:
        d = DICTIONARY.avp(self.code, self.vendor_id)
        return d if d is not None and d.dtype is self.dtype else None

    @property
    def name(self) -> str:
        d = self.definition
        if d is not None:
            return d.name
        if self.vendor_id is not None:
            return f"AVP-{self.vendor_id}-{self.code}"
        return f"AVP-{self.code}"

    @property
    def known(self) -> bool:
        return self.definition is not None

    @property
    def mandatory(self) -> bool:
        return bool(self.flags & AVP_FLAG_MANDATORY)

    @mandatory.setter
    def mandatory(self, on: bool) -> None:
        self.flags = (self.flags | AVP_FLAG_MANDATORY) if on else (self.flags & ~AVP_FLAG_MANDATORY)

    @property
    def protected(self) -> bool:
        return bool(self.flags & AVP_FLAG_PROTECTED)

    @protected.setter
    def protected(self, on: bool) -> None:
        self.flags = (self.flags | AVP_FLAG_PROTECTED) if on else (self.flags & ~AVP_FLAG_PROTECTED)

    @property
    def value(self) -> Any:
        return self._value

    @value.setter
    def value(self, value: Any) -> None:
        self._value = self._coerce(value)

    def _coerce(self, value: Any) -> Any:
        if self.dtype is AvpType.GROUPED:
            if isinstance(value, Avp | str | bytes):
                raise TypeError("a Grouped AVP needs a list of AVPs or (name, value) pairs")
            return make_avps(value)
        d = self.definition
        if self.dtype is AvpType.OCTET_STRING and isinstance(value, Secret):
            return value
        value = coerce(self.dtype, value)
        return self._typed(d, value)

    @staticmethod
    def _typed(d: AvpDef | None, value: Any) -> Any:
        if d is None:
            return value
        if d.secret:
            return Secret(value)
        if d.enum is not None and d.dtype in _INTEGER_TYPES:
            try:
                return d.enum(value)
            except ValueError:
                return int(value)
        return value

    def children(self) -> list[Avp]:
        if self.dtype is not AvpType.GROUPED:
            raise TypeError(f"{self.name} is not a Grouped AVP")
        return self._value

    # -- wire -------------------------------------------------------------------------------

    def data(self) -> bytes:
        """The AVP data without header or padding."""
        if self.dtype is AvpType.GROUPED:
            return b"".join(a.encode() for a in self._value)
        return encode_value(self.dtype, self._value)

    def encode(self) -> bytes:
        data = self.data()
        hdr = 12 if self.vendor_id is not None else 8
        length = hdr + len(data)
        if length > MAX_AVP_LENGTH:
            raise ValueError(f"{self.name}: AVP too long ({length} bytes)")
        flags = (self.flags & ~AVP_FLAG_VENDOR & 0xFF) | (AVP_FLAG_VENDOR if self.vendor_id is not None else 0)
        out = struct.pack(">II", self.code, (flags << 24) | length)
        if self.vendor_id is not None:
            out += struct.pack(">I", self.vendor_id)
        return out + data + b"\0" * (-length % 4)

    @classmethod
    def decode(cls, data: bytes) -> Avp:
        """Exactly one AVP (with or without its trailing padding)."""
        avps = decode_avps(data)
        if len(avps) != 1:
            raise DecodeError(f"expected one AVP, found {len(avps)}")
        return avps[0]

    # -- python -----------------------------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Avp):
            return NotImplemented
        return (
            self.code == other.code
            and self.vendor_id == other.vendor_id
            and self.flags == other.flags
            and self.dtype is other.dtype
            and self._value == other._value
        )

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        d = self.definition
        if d is not None:
            default = AVP_FLAG_MANDATORY if d.m_rule is Rule.MUST else 0
            extra = f", flags=0x{self.flags:02x}" if self.flags != default else ""
            return f"Avp({d.name!r}, {self._value!r}{extra})"
        vendor = f", vendor_id={self.vendor_id}" if self.vendor_id is not None else ""
        return f"Avp(code={self.code}{vendor}, flags=0x{self.flags:02x}, value={self._value!r})"


def _decode_one(buf: memoryview, off: int, end: int, depth: int) -> tuple[Avp, int]:
    if end - off < 8:
        raise DecodeError("truncated AVP header", result_code=ResultCode.DIAMETER_INVALID_AVP_LENGTH)
    code, flags_len = struct.unpack_from(">II", buf, off)
    flags, length = flags_len >> 24, flags_len & 0xFFFFFF
    vendor_flag = bool(flags & AVP_FLAG_VENDOR)
    hdr = 12 if vendor_flag else 8
    if length < hdr or off + length > end:
        raise DecodeError(
            f"AVP {code}: length {length} does not fit",
            result_code=ResultCode.DIAMETER_INVALID_AVP_LENGTH,
            avp_code=code,
        )
    vendor_id = struct.unpack_from(">I", buf, off + 8)[0] if vendor_flag else None
    data = bytes(buf[off + hdr : off + length])
    d = DICTIONARY.avp(code, vendor_id)
    try:
        if d is None:
            dtype, value = AvpType.OCTET_STRING, data
        elif d.dtype is AvpType.GROUPED:
            if depth >= MAX_GROUP_DEPTH:
                raise DecodeError(
                    "Grouped AVPs nested too deeply",
                    result_code=ResultCode.DIAMETER_INVALID_AVP_VALUE,
                )
            dtype, value = d.dtype, decode_avps(data, _depth=depth + 1)
        else:
            dtype, value = d.dtype, Avp._typed(d, decode_value(d.dtype, data))
    except DecodeError as e:
        if e.avp_code is None:
            e.avp_code, e.avp_vendor_id = code, vendor_id
        raise
    avp = Avp.__new__(Avp)
    avp.code, avp.vendor_id, avp.flags, avp.dtype, avp._value = (
        code,
        vendor_id,
        flags & ~AVP_FLAG_VENDOR,
        dtype,
        value,
    )
    # The padding of the last AVP in a Grouped AVP may be left out by some senders.
    return avp, min(off + length + (-length % 4), end)


def decode_avps(data: bytes | bytearray | memoryview, *, _depth: int = 0) -> list[Avp]:
    """A sequence of padded AVPs; raises DecodeError only."""
    buf = memoryview(bytes(data))
    off, end, out = 0, len(buf), []
    while off < end:
        avp, off = _decode_one(buf, off, end, _depth)
        out.append(avp)
    return out


def encode_avps(avps: Iterable[Avp]) -> bytes:
    return b"".join(a.encode() for a in avps)
