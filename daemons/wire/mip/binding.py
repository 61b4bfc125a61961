"""Route-optimisation / smooth-handoff binding messages (semantics of draft-ietf-mobileip-optim),
carried in the RFC 4064 Experimental Message. Pure code, no I/O.

The draft gave Binding Warning, Request, Update and Acknowledge the Mobile IP message types
16-19; the IANA registry now gives those numbers to other RFCs (RFC 4881, RFC 4857), so we
do not use them.  Instead every binding message is an RFC 4064 Experimental Message (type
255) with our Vendor-Id 32473 (RFC 5612) and a subtype::

     0                   1                   2                   3
     0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |   Type = 255  |    Subtype    |         Reserved (0)          |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                      Vendor-Id = 32473                        |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |  subtype-specific fixed part ...  |  extensions ...

    subtype 1 Binding Update       flags(A I M G 0 0 0 0) reserved(8) lifetime(16)
                                   home address(32) care-of address(32)
                                   [identification(64), present iff I]
    subtype 2 Binding Acknowledge  status(8) reserved(8) lifetime(16) home address(32)
                                   identification(64)
    subtype 3 Binding Request      home address(32) identification(64)
    subtype 4 Binding Warning      home address(32) target node(32)

Extensions follow as in registration messages (same registry and framing:
:data:`~daemons.wire.mip.extensions.REGISTRATION_EXTENSIONS`), e.g. NAI, the VPN-info CVSE and an
authentication extension.  Binding authentication uses ``EXT_BINDING_AUTH`` (= FA-HA 34,
SPI + HMAC-MD5 over everything before the authenticator); :func:`~daemons.wire.mip.auth.sign`
and :func:`~daemons.wire.mip.auth.verify` work on these messages unchanged.

Reserved fields and the four low flag bits are sent as zero and a message with any of them
set is rejected (``DecodeError``): decoding stays canonical (``encode()`` of a decoded message
gives back exactly its bytes) and a later revision uses a new subtype instead.  A type-255
message of another Vendor-Id, or of an unknown subtype, is a ``DecodeError`` too.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address
from typing import ClassVar, Self, TypeVar

from .constants import (
    BINDING_SUBTYPE_ACKNOWLEDGE,
    BINDING_SUBTYPE_REQUEST,
    BINDING_SUBTYPE_UPDATE,
    BINDING_SUBTYPE_WARNING,
    MSG_EXPERIMENTAL,
    VENDOR_ID,
    BindingStatus,
    BUFlag,
)
from .errors import DecodeError
from .extensions import REGISTRATION_EXTENSIONS, Extension, decode_extensions
from .messages import SUBTYPED_MESSAGES, Message

__all__ = [
    "BINDING_MESSAGES",
    "BindingAcknowledge",
    "BindingMessage",
    "BindingRequest",
    "BindingUpdate",
    "BindingWarning",
]

_HEADER = struct.Struct("!BBHI")  # type, subtype, reserved, vendor-id


def _addr(value: IPv4Address | str | int | bytes) -> IPv4Address:
    return value if isinstance(value, IPv4Address) else IPv4Address(value)


class BindingMessage(Message):
    """Base of the four binding messages: RFC 4064 header + fixed part + ``extensions``.

    ``BindingMessage.decode(data)`` decodes any of them (dispatching on the subtype);
    ``BindingUpdate.decode(data)`` etc. accept only their own subtype.
    """

    TYPE: ClassVar[int] = MSG_EXPERIMENTAL
    SUBTYPE: ClassVar[int]
    VENDOR_ID: ClassVar[int] = VENDOR_ID
    HEADER_LEN: ClassVar[int] = _HEADER.size  # 8
    FIXED_LEN: ClassVar[int] = _HEADER.size

    @property
    def name(self) -> str:
        """Human name, e.g. ``"Binding Update"`` (what the Lua dissector shows)."""
        return _NAMES[self.SUBTYPE]

    def _header(self) -> bytes:
        return _HEADER.pack(self.TYPE, self.SUBTYPE, 0, self.VENDOR_ID)

    def _encode_body(self) -> bytes:
        raise NotImplementedError

    def _encode_fixed(self) -> bytes:
        return self._header() + self._encode_body()

    @classmethod
    def _fixed_len(cls, data: bytes) -> int:
        """Length of header + fixed part of ``data`` (which holds at least the header)."""
        return cls.FIXED_LEN

    @classmethod
    def decode_with_offsets(cls, data: bytes) -> tuple[Self, list[int]]:
        """Decode; also return the byte offset of every extension (for authenticators)."""
        data = bytes(data)
        if len(data) < _HEADER.size:
            raise DecodeError(f"experimental message: {len(data)} bytes < {_HEADER.size}")
        msg_type, subtype, reserved, vendor_id = _HEADER.unpack_from(data)
        if msg_type != MSG_EXPERIMENTAL:
            raise DecodeError(f"binding message: type {msg_type} != {MSG_EXPERIMENTAL}")
        if vendor_id != VENDOR_ID:
            raise DecodeError(f"experimental message of vendor {vendor_id}, not {VENDOR_ID}")
        target = BINDING_MESSAGES.get((msg_type, subtype))
        if target is None:
            raise DecodeError(f"experimental message of vendor {vendor_id}: unknown subtype {subtype}")
        if cls is not BindingMessage and target is not cls:
            raise DecodeError(f"{cls.__name__}: subtype {subtype} != {cls.SUBTYPE}")
        if reserved:
            raise DecodeError(f"{target.__name__}: reserved header field {reserved:#x} is not zero")
        fixed = target._fixed_len(data)
        if len(data) < fixed:
            raise DecodeError(f"{target.__name__}: {len(data)} bytes < {fixed}")
        msg = target._decode_fixed(data)
        make_partial: Callable[[list[Extension]], object] = lambda exts: replace(msg, extensions=exts)  # noqa: E731
        pairs = decode_extensions(data, fixed, REGISTRATION_EXTENSIONS, make_partial)
        msg.extensions = [e for _, e in pairs]
        return msg, [o for o, _ in pairs]  # type: ignore[return-value]


BINDING_MESSAGES: dict[tuple[int, int], type[BindingMessage]] = {}
_NAMES: dict[int, str] = {}
B = TypeVar("B", bound=type[BindingMessage])


def _register(name: str) -> Callable[[B], B]:
    def deco(cls: B) -> B:
        key = (cls.TYPE, cls.SUBTYPE)
        if key in BINDING_MESSAGES or key in SUBTYPED_MESSAGES:
            raise RuntimeError(f"message type/subtype {key} registered twice")
        BINDING_MESSAGES[key] = cls
        SUBTYPED_MESSAGES[key] = cls  # decode_message() dispatches here for type 255
        _NAMES[cls.SUBTYPE] = name
        return cls

    return deco


@_register("Binding Update")
@dataclass
class BindingUpdate(BindingMessage):
    """Binding Update (subtype 1): "deliver ``home_address``'s traffic to ``care_of_address``".

    Sent by the HA to a dynamic CN-GW (route optimisation, F4/F5, and in answer to a Binding
    Request, F8) and by a new FA to the previous FA (smooth handoff, F6), with the VPN info
    in a CVSE.  ``identification`` (64 bits, NTP-style as in registrations) is optional on the
    wire; the ``I`` flag is set by the codec exactly when it is given (passing ``I`` without an
    identification is a ValueError).  ``lifetime`` 0 deletes the binding.
    """

    SUBTYPE: ClassVar[int] = BINDING_SUBTYPE_UPDATE
    FIXED_LEN: ClassVar[int] = 20  # without identification; 28 with it

    home_address: IPv4Address
    care_of_address: IPv4Address
    identification: int | None
    lifetime: int = 0
    flags: BUFlag = BUFlag(0)  # noqa: RUF009
    extensions: list[Extension] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.home_address = _addr(self.home_address)
        self.care_of_address = _addr(self.care_of_address)
        flags = BUFlag(self.flags)
        if int(flags) & ~0xF0:
            raise ValueError(f"Binding Update flags {int(flags):#x}: reserved bits set")
        if self.identification is None:
            if BUFlag.I in flags:
                raise ValueError("Binding Update: flag I without identification")
        else:
            flags |= BUFlag.I
        self.flags = flags
        self.extensions = list(self.extensions)

    @property
    def ack_requested(self) -> bool:
        return BUFlag.A in self.flags

    @property
    def is_deletion(self) -> bool:
        return self.lifetime == 0

    def _encode_body(self) -> bytes:
        body = struct.pack(
            "!BBH4s4s",
            int(self.flags),
            0,
            self.lifetime,
            self.home_address.packed,
            self.care_of_address.packed,
        )
        if self.identification is not None:
            body += struct.pack("!Q", self.identification)
        return body

    @classmethod
    def _fixed_len(cls, data: bytes) -> int:
        if len(data) > 8 and data[8] & BUFlag.I:
            return cls.FIXED_LEN + 8
        return cls.FIXED_LEN

    @classmethod
    def _decode_fixed(cls, data: bytes) -> Self:
        flags, reserved, life, hoa, coa = struct.unpack_from("!BBH4s4s", data, 8)
        if flags & 0x0F or reserved:
            raise DecodeError(f"Binding Update: reserved bits set ({flags:#04x}, {reserved:#04x})")
        ident = struct.unpack_from("!Q", data, 20)[0] if flags & BUFlag.I else None
        return cls(
            home_address=IPv4Address(hoa),
            care_of_address=IPv4Address(coa),
            identification=ident,
            lifetime=life,
            flags=BUFlag(flags),
        )


@_register("Binding Acknowledge")
@dataclass
class BindingAcknowledge(BindingMessage):
    """Binding Acknowledge (subtype 2): answer to a Binding Update with the A flag.

    ``status`` is a :class:`~daemons.wire.mip.constants.BindingStatus` when known, otherwise the
    plain int received; ``identification`` echoes the update's (0 if it had none);
    ``lifetime`` is the lifetime granted.
    """

    SUBTYPE: ClassVar[int] = BINDING_SUBTYPE_ACKNOWLEDGE
    FIXED_LEN: ClassVar[int] = 24

    status: BindingStatus | int
    home_address: IPv4Address
    identification: int
    lifetime: int = 0
    extensions: list[Extension] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.home_address = _addr(self.home_address)
        try:
            self.status = BindingStatus(self.status)
        except ValueError:
            self.status = int(self.status)
        self.extensions = list(self.extensions)

    @property
    def accepted(self) -> bool:
        return self.status == BindingStatus.ACCEPTED

    def _encode_body(self) -> bytes:
        return struct.pack(
            "!BBH4sQ", int(self.status), 0, self.lifetime, self.home_address.packed, self.identification
        )

    @classmethod
    def _decode_fixed(cls, data: bytes) -> Self:
        status, reserved, life, hoa, ident = struct.unpack_from("!BBH4sQ", data, 8)
        if reserved:
            raise DecodeError(f"Binding Acknowledge: reserved octet {reserved:#04x} is not zero")
        return cls(status=status, home_address=IPv4Address(hoa), identification=ident, lifetime=life)


@_register("Binding Request")
@dataclass
class BindingRequest(BindingMessage):
    """Binding Request (subtype 3): a CN-GW whose binding for ``home_address`` is about to
    expire asks the HA that posted it for a fresh Binding Update (F8)."""

    SUBTYPE: ClassVar[int] = BINDING_SUBTYPE_REQUEST
    FIXED_LEN: ClassVar[int] = 20

    home_address: IPv4Address
    identification: int
    extensions: list[Extension] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.home_address = _addr(self.home_address)
        self.extensions = list(self.extensions)

    def _encode_body(self) -> bytes:
        return struct.pack("!4sQ", self.home_address.packed, self.identification)

    @classmethod
    def _decode_fixed(cls, data: bytes) -> Self:
        hoa, ident = struct.unpack_from("!4sQ", data, 8)
        return cls(home_address=IPv4Address(hoa), identification=ident)


@_register("Binding Warning")
@dataclass
class BindingWarning(BindingMessage):
    """Binding Warning (subtype 4): tells the HA that ``target_node`` (e.g. a CN-GW or a
    previous FA still tunnelling to a stale care-of address) needs a Binding Update for
    ``home_address``."""

    SUBTYPE: ClassVar[int] = BINDING_SUBTYPE_WARNING
    FIXED_LEN: ClassVar[int] = 16

    home_address: IPv4Address
    target_node: IPv4Address
    extensions: list[Extension] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.home_address = _addr(self.home_address)
        self.target_node = _addr(self.target_node)
        self.extensions = list(self.extensions)

    def _encode_body(self) -> bytes:
        return struct.pack("!4s4s", self.home_address.packed, self.target_node.packed)

    @classmethod
    def _decode_fixed(cls, data: bytes) -> Self:
        hoa, target = struct.unpack_from("!4s4s", data, 8)
        return cls(home_address=IPv4Address(hoa), target_node=IPv4Address(target))
