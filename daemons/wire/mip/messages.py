"""Registration Request (type 1) and Registration Reply (type 3), RFC 5944 sections 3.3-3.4.

One message type, one class, registered by its type code in ``MESSAGES``;
:func:`decode_message` dispatches on the first octet.  Messages that share a type code and
are told apart by the second octet (our binding messages inside the RFC 4064 Experimental
Message, type 255, see :mod:`daemons.wire.mip.binding`) are registered by ``(type, subtype)`` in
``SUBTYPED_MESSAGES``.  Decoding is canonical: if bytes
decode, ``encode()`` of the result returns exactly those bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address
from typing import ClassVar, Self, TypeVar

from .constants import (
    MSG_REGISTRATION_REPLY,
    MSG_REGISTRATION_REQUEST,
    VENDOR_ID,
    ReplyCode,
    RRQFlag,
)
from .errors import DecodeError
from .extensions import REGISTRATION_EXTENSIONS, Extension, VendorExtension, decode_extensions

__all__ = [
    "MESSAGES",
    "SUBTYPED_MESSAGES",
    "Message",
    "RegistrationReply",
    "RegistrationRequest",
    "decode_message",
    "decode_message_with_offsets",
]

X = TypeVar("X", bound=Extension)


class Message:
    """Base of the registration messages: fixed part + ordered ``extensions`` list."""

    TYPE: ClassVar[int]
    FIXED_LEN: ClassVar[int]
    extensions: list[Extension]

    # ---- extension access
    def find(self, cls: type[X]) -> X | None:
        """First extension that is an instance of ``cls``, or None."""
        for ext in self.extensions:
            if isinstance(ext, cls):
                return ext
        return None

    def find_all(self, cls: type[X]) -> list[X]:
        return [e for e in self.extensions if isinstance(e, cls)]

    def vendor_data(self, vendor_type: int, vendor_id: int = VENDOR_ID) -> bytes | None:
        """Payload of the first CVSE/NVSE with this vendor id and vendor type, or None."""
        for ext in self.vendor_extensions(vendor_type, vendor_id):
            return ext.data
        return None

    def vendor_extensions(
        self, vendor_type: int | None = None, vendor_id: int = VENDOR_ID
    ) -> Iterator[VendorExtension]:
        for ext in self.extensions:
            if (
                isinstance(ext, VendorExtension)
                and ext.vendor_id == vendor_id
                and (vendor_type is None or ext.vendor_type == vendor_type)
            ):
                yield ext

    def with_extensions(self, *exts: Extension) -> Self:
        """A copy with ``exts`` appended (the original is not modified)."""
        return replace(self, extensions=[*self.extensions, *exts])  # type: ignore[type-var]

    # ---- codec
    def _encode_fixed(self) -> bytes:
        raise NotImplementedError

    def encode(self) -> bytes:
        try:
            fixed = self._encode_fixed()
        except struct.error as exc:
            raise ValueError(f"{type(self).__name__}: field out of range: {exc}") from None
        return fixed + b"".join(e.encode() for e in self.extensions)

    @classmethod
    def _decode_fixed(cls, data: bytes) -> Self:
        raise NotImplementedError

    @classmethod
    def decode(cls, data: bytes) -> Self:
        return cls.decode_with_offsets(data)[0]

    @classmethod
    def decode_with_offsets(cls, data: bytes) -> tuple[Self, list[int]]:
        """Decode; also return the byte offset of every extension (for authenticators)."""
        data = bytes(data)
        if len(data) < cls.FIXED_LEN:
            raise DecodeError(f"{cls.__name__}: {len(data)} bytes < {cls.FIXED_LEN}")
        if data[0] != cls.TYPE:
            raise DecodeError(f"{cls.__name__}: type {data[0]} != {cls.TYPE}")
        msg = cls._decode_fixed(data)
        pairs = decode_extensions(
            data,
            cls.FIXED_LEN,
            REGISTRATION_EXTENSIONS,
            lambda exts: replace(msg, extensions=exts),  # type: ignore[type-var]
        )
        msg.extensions = [e for _, e in pairs]
        return msg, [o for o, _ in pairs]


MESSAGES: dict[int, type[Message]] = {}
# (type, subtype) -> class, for types whose second octet is a subtype (filled by binding.py)
SUBTYPED_MESSAGES: dict[tuple[int, int], type[Message]] = {}
M = TypeVar("M", bound=type[Message])


def _register(cls: M) -> M:
    if cls.TYPE in MESSAGES:
        raise RuntimeError(f"message type {cls.TYPE} registered twice")
    MESSAGES[cls.TYPE] = cls
    return cls


def _addr(value: IPv4Address | str | int | bytes) -> IPv4Address:
    return value if isinstance(value, IPv4Address) else IPv4Address(value)


@_register
@dataclass
class RegistrationRequest(Message):
    """Registration Request (RFC 5944 section 3.3)::

        type(1) flags(S B D M G r T x) lifetime(16) home address, home agent,
        care-of address (32 each), identification(64), extensions...

    Addresses may be given as strings; they are stored as ``IPv4Address``.
    """

    TYPE: ClassVar[int] = MSG_REGISTRATION_REQUEST
    FIXED_LEN: ClassVar[int] = 24

    home_address: IPv4Address
    home_agent: IPv4Address
    care_of_address: IPv4Address
    identification: int
    lifetime: int = 0
    flags: RRQFlag = RRQFlag(0)  # noqa: RUF009
    extensions: list[Extension] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.home_address = _addr(self.home_address)
        self.home_agent = _addr(self.home_agent)
        self.care_of_address = _addr(self.care_of_address)
        self.flags = RRQFlag(self.flags)
        self.extensions = list(self.extensions)

    @property
    def is_deregistration(self) -> bool:
        return self.lifetime == 0

    def _encode_fixed(self) -> bytes:
        return struct.pack(
            "!BBH4s4s4sQ",
            self.TYPE,
            int(self.flags),
            self.lifetime,
            self.home_address.packed,
            self.home_agent.packed,
            self.care_of_address.packed,
            self.identification,
        )

    @classmethod
    def _decode_fixed(cls, data: bytes) -> Self:
        _, flags, life, hoa, ha, coa, ident = struct.unpack_from("!BBH4s4s4sQ", data)
        return cls(
            home_address=IPv4Address(hoa),
            home_agent=IPv4Address(ha),
            care_of_address=IPv4Address(coa),
            identification=ident,
            lifetime=life,
            flags=RRQFlag(flags),
        )


@_register
@dataclass
class RegistrationReply(Message):
    """Registration Reply (RFC 5944 section 3.4)::

        type(1) code(8) lifetime(16) home address, home agent (32 each),
        identification(64), extensions...

    ``code`` is a :class:`ReplyCode` when known, otherwise the plain int received.
    """

    TYPE: ClassVar[int] = MSG_REGISTRATION_REPLY
    FIXED_LEN: ClassVar[int] = 20

    code: ReplyCode | int
    home_address: IPv4Address
    home_agent: IPv4Address
    identification: int
    lifetime: int = 0
    extensions: list[Extension] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.home_address = _addr(self.home_address)
        self.home_agent = _addr(self.home_agent)
        try:
            self.code = ReplyCode(self.code)
        except ValueError:
            self.code = int(self.code)
        self.extensions = list(self.extensions)

    @property
    def accepted(self) -> bool:
        return self.code in (0, 1)

    def _encode_fixed(self) -> bytes:
        return struct.pack(
            "!BBH4s4sQ",
            self.TYPE,
            int(self.code),
            self.lifetime,
            self.home_address.packed,
            self.home_agent.packed,
            self.identification,
        )

    @classmethod
    def _decode_fixed(cls, data: bytes) -> Self:
        _, code, life, hoa, ha, ident = struct.unpack_from("!BBH4s4sQ", data)
        return cls(
            code=code,
            home_address=IPv4Address(hoa),
            home_agent=IPv4Address(ha),
            identification=ident,
            lifetime=life,
        )


def decode_message_with_offsets(data: bytes) -> tuple[Message, list[int]]:
    """Like :func:`decode_message`, also returning each extension's byte offset."""
    if not data:
        raise DecodeError("empty Mobile IP message")
    cls = MESSAGES.get(data[0])
    if cls is None and any(t == data[0] for t, _ in SUBTYPED_MESSAGES):
        if len(data) < 2:
            raise DecodeError(f"Mobile IP message type {data[0]}: no subtype")
        cls = SUBTYPED_MESSAGES.get((data[0], data[1]))
        if cls is None:
            raise DecodeError(f"Mobile IP message type {data[0]}: unknown subtype {data[1]}")
    if cls is None:
        raise DecodeError(f"unknown Mobile IP message type {data[0]}")
    return cls.decode_with_offsets(data)


def decode_message(data: bytes) -> Message:
    """Decode a UDP-434 payload: a :class:`RegistrationRequest`, :class:`RegistrationReply`
    or one of the binding messages of :mod:`daemons.wire.mip.binding` (check with isinstance).
    Raises only :class:`DecodeError` (or its subclass :class:`UnknownExtensionError` for an
    unknown extension type 0-127)."""
    return decode_message_with_offsets(data)[0]
