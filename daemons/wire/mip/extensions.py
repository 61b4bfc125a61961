"""Mobile IPv4 extensions: one class per type code, registered in a registry dict.

Two registries exist because the same number means different things in registration
messages (UDP 434) and in ICMP agent advertisements:

* ``REGISTRATION_EXTENSIONS``: 32, 33, 34 (auth), 36 (generalized auth), 38 (CVSE),
  131 (NAI), 132 (MN-FA challenge), 134 (NVSE);
* ``ADVERTISEMENT_EXTENSIONS``: 0 (padding), 16 (mobility agent), 19 (prefix lengths),
  24 (challenge), 134 (NVSE).

Framing (RFC 5944 section 1.9-1.11): most extensions are ``type, length(8), data``.  The long
format ``type, subtype-or-reserved(8), length(16), data`` is used by 36 and 38.  Unknown types
128-255 are skippable and kept as :class:`UnknownExtension` (re-encodes byte-identically);
unknown types 0-127 make the whole message unacceptable: :func:`decode_extensions` raises
:class:`~daemons.wire.mip.errors.UnknownExtensionError`.

Decoding is canonical: whenever bytes decode, ``encode()`` gives the very same bytes back.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import ClassVar, Self, TypeVar

from .constants import (
    ADV_EXT_CHALLENGE,
    ADV_EXT_MOBILITY_AGENT,
    ADV_EXT_PADDING,
    ADV_EXT_PREFIX_LENGTHS,
    EXT_CVSE,
    EXT_FA_HA_AUTH,
    EXT_GEN_AUTH,
    EXT_MN_FA_AUTH,
    EXT_MN_FA_CHALLENGE,
    EXT_MN_HA_AUTH,
    EXT_NAI,
    EXT_NVSE,
    GEN_AUTH_SUBTYPE_MN_AAA,
    VENDOR_ID,
    AdvFlag,
)
from .errors import DecodeError, UnknownExtensionError

__all__ = [
    "ADVERTISEMENT_EXTENSIONS",
    "REGISTRATION_EXTENSIONS",
    "AdvChallengeExtension",
    "AuthExtension",
    "CVSEExtension",
    "Extension",
    "FAHAAuthExtension",
    "GeneralizedAuthExtension",
    "MNFAAuthExtension",
    "MNFAChallengeExtension",
    "MNHAAuthExtension",
    "MobilityAgentAdvExtension",
    "NAIExtension",
    "NVSEExtension",
    "PaddingExtension",
    "PrefixLengthsExtension",
    "UnknownExtension",
    "VendorExtension",
    "decode_extensions",
]


class Extension:
    """Base of every extension. Subclasses are dataclasses with ``TYPE`` and ``encode``."""

    TYPE: ClassVar[int]
    LONG: ClassVar[bool] = False  # 16-bit length field after a subtype/reserved octet

    @property
    def ext_type(self) -> int:
        return self.TYPE

    def encode(self) -> bytes:
        raise NotImplementedError

    @classmethod
    def decode(cls, raw: bytes) -> Self:
        """Decode one extension from ``raw``, which holds exactly its bytes (header included)."""
        raise NotImplementedError


REGISTRATION_EXTENSIONS: dict[int, type[Extension]] = {}
ADVERTISEMENT_EXTENSIONS: dict[int, type[Extension]] = {}

E = TypeVar("E", bound=type[Extension])


def _register(*registries: dict[int, type[Extension]]) -> Callable[[E], E]:
    def deco(cls: E) -> E:
        for reg in registries:
            if cls.TYPE in reg:
                raise RuntimeError(f"extension type {cls.TYPE} registered twice")
            reg[cls.TYPE] = cls
        return cls

    return deco


def _short(ext_type: int, body: bytes) -> bytes:
    if len(body) > 255:
        raise ValueError(f"extension {ext_type}: body of {len(body)} bytes exceeds 255")
    return bytes((ext_type, len(body))) + body


def _long(ext_type: int, second: int, body: bytes) -> bytes:
    if len(body) > 0xFFFF:
        raise ValueError(f"extension {ext_type}: body of {len(body)} bytes exceeds 65535")
    return struct.pack("!BBH", ext_type, second, len(body)) + body


def _check_u32(name: str, value: int) -> None:
    if not 0 <= value <= 0xFFFFFFFF:
        raise ValueError(f"{name} out of range for 32 bits")


# --------------------------------------------------------------------------- auth (32-34)
@dataclass(frozen=True)
class AuthExtension(Extension):
    """Common shape of the RFC 5944 authentication extensions: SPI (32 bits) + authenticator.

    ``authenticator`` is a MAC, not key material, so it may appear in repr/logs.
    """

    spi: int
    authenticator: bytes = b""

    HEADER_LEN: ClassVar[int] = 2  # type, length

    def encode(self) -> bytes:
        _check_u32("spi", self.spi)
        return _short(self.TYPE, struct.pack("!I", self.spi) + self.authenticator)

    @classmethod
    def decode(cls, raw: bytes) -> Self:
        body = raw[2:]
        if len(body) < 4:
            raise DecodeError(f"auth extension {raw[0]}: length {len(body)} < 4 (no SPI)")
        return cls(spi=struct.unpack_from("!I", body)[0], authenticator=bytes(body[4:]))


@_register(REGISTRATION_EXTENSIONS)
@dataclass(frozen=True)
class MNHAAuthExtension(AuthExtension):
    """Mobile-Home Authentication Extension (type 32)."""

    TYPE: ClassVar[int] = EXT_MN_HA_AUTH


@_register(REGISTRATION_EXTENSIONS)
@dataclass(frozen=True)
class MNFAAuthExtension(AuthExtension):
    """Mobile-Foreign Authentication Extension (type 33)."""

    TYPE: ClassVar[int] = EXT_MN_FA_AUTH


@_register(REGISTRATION_EXTENSIONS)
@dataclass(frozen=True)
class FAHAAuthExtension(AuthExtension):
    """Foreign-Home Authentication Extension (type 34)."""

    TYPE: ClassVar[int] = EXT_FA_HA_AUTH


@_register(REGISTRATION_EXTENSIONS)
@dataclass(frozen=True)
class GeneralizedAuthExtension(Extension):
    """Generalized Mobile IP Authentication Extension (type 36, RFC 3012 section 5).

    Long format: type, subtype, 16-bit length, SPI, authenticator. Subtype 1 = MN-AAA.
    """

    TYPE: ClassVar[int] = EXT_GEN_AUTH
    LONG: ClassVar[bool] = True
    HEADER_LEN: ClassVar[int] = 4  # type, subtype, length(2)

    spi: int
    authenticator: bytes = b""
    subtype: int = GEN_AUTH_SUBTYPE_MN_AAA

    def encode(self) -> bytes:
        _check_u32("spi", self.spi)
        if not 0 <= self.subtype <= 255:
            raise ValueError("subtype out of range")
        return _long(self.TYPE, self.subtype, struct.pack("!I", self.spi) + self.authenticator)

    @classmethod
    def decode(cls, raw: bytes) -> Self:
        body = raw[4:]
        if len(body) < 4:
            raise DecodeError(f"generalized auth extension: length {len(body)} < 4 (no SPI)")
        return cls(
            spi=struct.unpack_from("!I", body)[0], authenticator=bytes(body[4:]), subtype=raw[1]
        )


# --------------------------------------------------------------------------- NAI, challenge
@_register(REGISTRATION_EXTENSIONS)
@dataclass(frozen=True)
class NAIExtension(Extension):
    """Mobile Node NAI Extension (type 131, RFC 2794), e.g. ``alice@example.net``."""

    TYPE: ClassVar[int] = EXT_NAI

    nai: str

    def encode(self) -> bytes:
        return _short(self.TYPE, self.nai.encode("utf-8"))

    @classmethod
    def decode(cls, raw: bytes) -> Self:
        try:
            return cls(nai=raw[2:].decode("utf-8"))
        except UnicodeDecodeError:
            raise DecodeError("NAI extension: not UTF-8") from None

    @property
    def realm(self) -> str:
        """The part after the last ``@`` (empty if none)."""
        return self.nai.rpartition("@")[2] if "@" in self.nai else ""


@_register(REGISTRATION_EXTENSIONS)
@dataclass(frozen=True)
class MNFAChallengeExtension(Extension):
    """MN-FA Challenge Extension in a Registration Request (type 132, RFC 3012 section 4)."""

    TYPE: ClassVar[int] = EXT_MN_FA_CHALLENGE

    challenge: bytes

    def encode(self) -> bytes:
        return _short(self.TYPE, self.challenge)

    @classmethod
    def decode(cls, raw: bytes) -> Self:
        return cls(challenge=bytes(raw[2:]))


# --------------------------------------------------------------------------- vendor (38, 134)
class VendorExtension(Extension):
    """Common interface of CVSE and NVSE: ``vendor_id``, ``vendor_type``, ``data``."""

    vendor_id: int
    vendor_type: int
    data: bytes


@_register(REGISTRATION_EXTENSIONS)
@dataclass(frozen=True)
class CVSEExtension(VendorExtension):
    """Critical Vendor/Organization Specific Extension (type 38, RFC 3115 section 3.1).

    Long format: type, reserved(8), length(16), vendor-id(32), vendor CVSE type(16), data.
    Critical: an HA/FA that does not understand it must reject the registration.
    """

    TYPE: ClassVar[int] = EXT_CVSE
    LONG: ClassVar[bool] = True

    vendor_type: int
    data: bytes = b""
    vendor_id: int = VENDOR_ID
    reserved: int = 0

    def encode(self) -> bytes:
        _check_u32("vendor_id", self.vendor_id)
        if not 0 <= self.vendor_type <= 0xFFFF or not 0 <= self.reserved <= 0xFF:
            raise ValueError("vendor_type/reserved out of range")
        body = struct.pack("!IH", self.vendor_id, self.vendor_type) + self.data
        return _long(self.TYPE, self.reserved, body)

    @classmethod
    def decode(cls, raw: bytes) -> Self:
        body = raw[4:]
        if len(body) < 6:
            raise DecodeError(f"CVSE: length {len(body)} < 6")
        vid, vtype = struct.unpack_from("!IH", body)
        return cls(vendor_type=vtype, data=bytes(body[6:]), vendor_id=vid, reserved=raw[1])


@_register(REGISTRATION_EXTENSIONS, ADVERTISEMENT_EXTENSIONS)
@dataclass(frozen=True)
class NVSEExtension(VendorExtension):
    """Normal Vendor/Organization Specific Extension (type 134, RFC 3115 section 3.2).

    type, length(8), reserved(16), vendor-id(32), vendor NVSE type(16), data. Skippable.
    """

    TYPE: ClassVar[int] = EXT_NVSE

    vendor_type: int
    data: bytes = b""
    vendor_id: int = VENDOR_ID
    reserved: int = 0

    def encode(self) -> bytes:
        _check_u32("vendor_id", self.vendor_id)
        if not 0 <= self.vendor_type <= 0xFFFF or not 0 <= self.reserved <= 0xFFFF:
            raise ValueError("vendor_type/reserved out of range")
        body = struct.pack("!HIH", self.reserved, self.vendor_id, self.vendor_type) + self.data
        return _short(self.TYPE, body)

    @classmethod
    def decode(cls, raw: bytes) -> Self:
        body = raw[2:]
        if len(body) < 8:
            raise DecodeError(f"NVSE: length {len(body)} < 8")
        reserved, vid, vtype = struct.unpack_from("!HIH", body)
        return cls(vendor_type=vtype, data=bytes(body[8:]), vendor_id=vid, reserved=reserved)


# --------------------------------------------------------------------------- unknown
@dataclass(frozen=True)
class UnknownExtension(Extension):
    """A skippable (type >= 128) extension this codec does not know; kept verbatim."""

    type_code: int
    data: bytes = b""

    TYPE: ClassVar[int] = -1

    @property
    def ext_type(self) -> int:
        return self.type_code

    def encode(self) -> bytes:
        if not 128 <= self.type_code <= 255:
            raise ValueError("UnknownExtension must have a skippable type (128-255)")
        return _short(self.type_code, self.data)

    @classmethod
    def decode(cls, raw: bytes) -> Self:
        return cls(type_code=raw[0], data=bytes(raw[2:]))


# --------------------------------------------------------------------------- advertisement
@_register(ADVERTISEMENT_EXTENSIONS)
@dataclass(frozen=True)
class PaddingExtension(Extension):
    """One-byte padding (type 0, advertisements only): a single zero octet, no length."""

    TYPE: ClassVar[int] = ADV_EXT_PADDING

    def encode(self) -> bytes:
        return b"\x00"

    @classmethod
    def decode(cls, raw: bytes) -> Self:
        return cls()


@_register(ADVERTISEMENT_EXTENSIONS)
@dataclass(frozen=True)
class MobilityAgentAdvExtension(Extension):
    """Mobility Agent Advertisement Extension (type 16, RFC 5944 section 2.1.1)."""

    TYPE: ClassVar[int] = ADV_EXT_MOBILITY_AGENT

    sequence: int
    registration_lifetime: int
    flags: AdvFlag = AdvFlag(0)  # noqa: RUF009
    care_of_addresses: tuple[IPv4Address, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "care_of_addresses", tuple(IPv4Address(a) for a in self.care_of_addresses)
        )
        object.__setattr__(self, "flags", AdvFlag(self.flags))

    def encode(self) -> bytes:
        body = struct.pack("!HHH", self.sequence, self.registration_lifetime, int(self.flags))
        body += b"".join(a.packed for a in self.care_of_addresses)
        return _short(self.TYPE, body)

    @classmethod
    def decode(cls, raw: bytes) -> Self:
        body = raw[2:]
        if len(body) < 6 or (len(body) - 6) % 4:
            raise DecodeError(f"mobility agent advertisement: bad length {len(body)}")
        seq, life, flags = struct.unpack_from("!HHH", body)
        coas = tuple(IPv4Address(bytes(body[i : i + 4])) for i in range(6, len(body), 4))
        return cls(seq, life, AdvFlag(flags), coas)


@_register(ADVERTISEMENT_EXTENSIONS)
@dataclass(frozen=True)
class PrefixLengthsExtension(Extension):
    """Prefix-Lengths Extension (type 19, RFC 5944 section 2.1.2): one octet per router
    address of the ICMP part."""

    TYPE: ClassVar[int] = ADV_EXT_PREFIX_LENGTHS

    prefix_lengths: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "prefix_lengths", tuple(self.prefix_lengths))

    def encode(self) -> bytes:
        return _short(self.TYPE, bytes(self.prefix_lengths))

    @classmethod
    def decode(cls, raw: bytes) -> Self:
        return cls(tuple(raw[2:]))


@_register(ADVERTISEMENT_EXTENSIONS)
@dataclass(frozen=True)
class AdvChallengeExtension(Extension):
    """Challenge Extension of an Agent Advertisement (type 24, RFC 3012 section 2)."""

    TYPE: ClassVar[int] = ADV_EXT_CHALLENGE

    challenge: bytes

    def encode(self) -> bytes:
        return _short(self.TYPE, self.challenge)

    @classmethod
    def decode(cls, raw: bytes) -> Self:
        return cls(challenge=bytes(raw[2:]))


# --------------------------------------------------------------------------- parsing
def decode_extensions(
    data: bytes,
    offset: int,
    registry: dict[int, type[Extension]],
    make_partial: Callable[[list[Extension]], object] | None = None,
) -> list[tuple[int, Extension]]:
    """Parse the extensions in ``data[offset:]``; return ``(offset, extension)`` pairs.

    Raises DecodeError on truncation and UnknownExtensionError (a DecodeError) on an unknown
    type < 128, with ``partial = make_partial(extensions_so_far)``.
    """
    out: list[tuple[int, Extension]] = []
    end = len(data)
    while offset < end:
        t = data[offset]
        cls = registry.get(t)
        if t == ADV_EXT_PADDING and cls is PaddingExtension:
            out.append((offset, PaddingExtension()))
            offset += 1
            continue
        if cls is None and t < 128:
            partial = make_partial([e for _, e in out]) if make_partial else None
            raise UnknownExtensionError(t, offset, partial)
        if cls is not None and cls.LONG:
            if offset + 4 > end:
                raise DecodeError(f"extension {t} at {offset}: truncated header")
            length = struct.unpack_from("!H", data, offset + 2)[0]
            stop = offset + 4 + length
        else:
            if offset + 2 > end:
                raise DecodeError(f"extension {t} at {offset}: truncated header")
            stop = offset + 2 + data[offset + 1]
        if stop > end:
            raise DecodeError(f"extension {t} at {offset}: length runs past the end")
        raw = bytes(data[offset:stop])
        ext = (cls or UnknownExtension).decode(raw)
        out.append((offset, ext))
        offset = stop
    return out
