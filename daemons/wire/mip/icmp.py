"""Agent Advertisement and Agent Solicitation (RFC 5944 section 2, RFC 1256, RFC 3012).

These are ICMP messages; the codec works on the ICMP bytes (after the IP header) and
handles the ICMP checksum: ``encode()`` computes it, ``decode()`` verifies it (DecodeError
if wrong).  :func:`strip_ipv4_header` takes what a raw ICMP socket delivers apart.
One ICMP type, one class, registered in ``ICMP_MESSAGES``; :func:`decode_icmp` dispatches.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address
from typing import ClassVar, Self, TypeVar

from .constants import ADV_CODE_ROUTES, ICMP_ROUTER_ADVERTISEMENT, ICMP_ROUTER_SOLICITATION
from .errors import DecodeError
from .extensions import (
    ADVERTISEMENT_EXTENSIONS,
    AdvChallengeExtension,
    Extension,
    MobilityAgentAdvExtension,
    PrefixLengthsExtension,
    decode_extensions,
)

__all__ = [
    "ICMP_MESSAGES",
    "AgentAdvertisement",
    "AgentSolicitation",
    "decode_icmp",
    "internet_checksum",
    "strip_ipv4_header",
]

X = TypeVar("X", bound=Extension)


def internet_checksum(data: bytes) -> int:
    """RFC 1071 one's-complement checksum of ``data``."""
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _with_checksum(msg: bytes) -> bytes:
    cks = internet_checksum(msg)
    return msg[:2] + struct.pack("!H", cks) + msg[4:]


def _check(data: bytes, name: str) -> None:
    if internet_checksum(data) != 0:
        raise DecodeError(f"{name}: bad ICMP checksum")


class ICMPMessage:
    ICMP_TYPE: ClassVar[int]

    def encode(self) -> bytes:
        raise NotImplementedError

    @classmethod
    def decode(cls, data: bytes) -> Self:
        raise NotImplementedError


ICMP_MESSAGES: dict[int, type[ICMPMessage]] = {}
C = TypeVar("C", bound=type[ICMPMessage])


def _register(cls: C) -> C:
    ICMP_MESSAGES[cls.ICMP_TYPE] = cls
    return cls


@_register
@dataclass
class AgentAdvertisement(ICMPMessage):
    """ICMP Router Advertisement (type 9) carrying mobility extensions::

        type(9) code checksum | num addrs, addr entry size(2), lifetime(16)
        | (router address, preference)*num | extensions...

    ``code`` is 0, or 16 when the agent does not route common traffic.  ``lifetime`` is the
    ICMP (router) lifetime; the registration lifetime is in the mobility extension.
    ``preference`` values are signed 32-bit integers.  Only address entry size 2 is
    accepted (the only size RFC 1256 defines).
    """

    ICMP_TYPE: ClassVar[int] = ICMP_ROUTER_ADVERTISEMENT

    lifetime: int
    addresses: list[tuple[IPv4Address, int]] = field(default_factory=list)
    extensions: list[Extension] = field(default_factory=list)
    code: int = ADV_CODE_ROUTES

    def __post_init__(self) -> None:
        self.addresses = [(IPv4Address(a), int(p)) for a, p in self.addresses]
        self.extensions = list(self.extensions)

    # ---- convenience
    def find(self, cls: type[X]) -> X | None:
        for ext in self.extensions:
            if isinstance(ext, cls):
                return ext
        return None

    def find_all(self, cls: type[X]) -> list[X]:
        return [e for e in self.extensions if isinstance(e, cls)]

    @property
    def mobility(self) -> MobilityAgentAdvExtension | None:
        """The Mobility Agent Advertisement extension; None means a plain router ad."""
        return self.find(MobilityAgentAdvExtension)

    @property
    def challenge(self) -> bytes | None:
        ext = self.find(AdvChallengeExtension)
        return ext.challenge if ext else None

    @property
    def prefix_lengths(self) -> tuple[int, ...] | None:
        ext = self.find(PrefixLengthsExtension)
        return ext.prefix_lengths if ext else None

    def with_extensions(self, *exts: Extension) -> Self:
        return replace(self, extensions=[*self.extensions, *exts])

    # ---- codec
    def encode(self) -> bytes:
        try:
            head = struct.pack(
                "!BBHBBH", self.ICMP_TYPE, self.code, 0, len(self.addresses), 2, self.lifetime
            )
            head += b"".join(struct.pack("!4si", a.packed, p) for a, p in self.addresses)
        except struct.error as exc:
            raise ValueError(f"AgentAdvertisement: field out of range: {exc}") from None
        body = head + b"".join(e.encode() for e in self.extensions)
        return _with_checksum(body)

    @classmethod
    def decode(cls, data: bytes) -> Self:
        data = bytes(data)
        if len(data) < 8:
            raise DecodeError(f"router advertisement: {len(data)} bytes < 8")
        typ, code, _cks, num, size, life = struct.unpack_from("!BBHBBH", data)
        if typ != cls.ICMP_TYPE:
            raise DecodeError(f"ICMP type {typ} is not a router advertisement")
        if size != 2:
            raise DecodeError(f"router advertisement: address entry size {size} != 2")
        end = 8 + 8 * num
        if len(data) < end:
            raise DecodeError("router advertisement: truncated address list")
        _check(data, "router advertisement")
        addrs = [
            (IPv4Address(data[o : o + 4]), struct.unpack_from("!i", data, o + 4)[0])
            for o in range(8, end, 8)
        ]
        msg = cls(lifetime=life, addresses=addrs, code=code)
        pairs = decode_extensions(
            data, end, ADVERTISEMENT_EXTENSIONS, lambda exts: replace(msg, extensions=exts)
        )
        msg.extensions = [e for _, e in pairs]
        return msg


@_register
@dataclass
class AgentSolicitation(ICMPMessage):
    """ICMP Router Solicitation (type 10, code 0): type, code, checksum, reserved(32)."""

    ICMP_TYPE: ClassVar[int] = ICMP_ROUTER_SOLICITATION

    code: int = 0
    reserved: int = 0

    def encode(self) -> bytes:
        try:
            return _with_checksum(struct.pack("!BBHI", self.ICMP_TYPE, self.code, 0, self.reserved))
        except struct.error as exc:
            raise ValueError(f"AgentSolicitation: field out of range: {exc}") from None

    @classmethod
    def decode(cls, data: bytes) -> Self:
        data = bytes(data)
        if len(data) < 8:
            raise DecodeError(f"router solicitation: {len(data)} bytes < 8")
        typ, code, _cks, reserved = struct.unpack_from("!BBHI", data)
        if typ != cls.ICMP_TYPE:
            raise DecodeError(f"ICMP type {typ} is not a router solicitation")
        _check(data, "router solicitation")
        # RFC 1256: ICMP length must be 8 or more; further octets are ignored
        return cls(code=code, reserved=reserved)


def decode_icmp(data: bytes) -> AgentAdvertisement | AgentSolicitation:
    """Decode ICMP bytes (no IP header) as an agent advertisement or solicitation.

    Any other ICMP type raises DecodeError (callers on a raw ICMP socket see every ICMP
    message; check ``data[0]`` first if that matters).
    """
    if not data:
        raise DecodeError("empty ICMP message")
    cls = ICMP_MESSAGES.get(data[0])
    if cls is None:
        raise DecodeError(f"ICMP type {data[0]} is not agent discovery")
    return cls.decode(data)  # type: ignore[return-value]


def strip_ipv4_header(
    data: bytes, *, protocols: Iterable[int] = (1,)
) -> tuple[IPv4Address, IPv4Address, int, bytes]:
    """Validate the IPv4 header of a datagram from a raw socket and split it off.

    Returns ``(src, dst, ttl, payload)``. Checks version 4, IHL >= 5, total length, the
    header checksum, no fragmentation, and that the protocol is in ``protocols`` (ICMP by
    default). Anything else raises DecodeError. RFC 5944 2.1 wants TTL 1 on agent
    advertisements: the caller decides what to do with ``ttl``.
    """
    data = bytes(data)
    if len(data) < 20:
        raise DecodeError(f"IPv4 header: {len(data)} bytes < 20")
    ver_ihl, _tos, total, _ident, frag, ttl, proto, _cks = struct.unpack_from("!BBHHHBBH", data)
    if ver_ihl >> 4 != 4:
        raise DecodeError(f"IP version {ver_ihl >> 4} != 4")
    ihl = (ver_ihl & 0x0F) * 4
    if ihl < 20 or len(data) < ihl:
        raise DecodeError(f"IPv4 header: bad IHL {ihl}")
    if total < ihl or total > len(data):
        raise DecodeError(f"IPv4 header: total length {total} inconsistent with {len(data)}")
    if internet_checksum(data[:ihl]) != 0:
        raise DecodeError("IPv4 header: bad checksum")
    if frag & 0x3FFF:
        raise DecodeError("IPv4 fragment (not reassembled)")
    if proto not in tuple(protocols):
        raise DecodeError(f"IP protocol {proto} not expected")
    return IPv4Address(data[12:16]), IPv4Address(data[16:20]), ttl, data[ihl:total]
