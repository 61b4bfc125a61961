"""Diameter messages (RFC 6733 §3): the 20-byte header and a list of AVPs."""

from __future__ import annotations

import random
import struct
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .avp import Avp, AvpContainer, decode_avps, encode_avps, make_avp, make_avps
from .constants import (
    FLAG_ERROR,
    FLAG_PROXIABLE,
    FLAG_REQUEST,
    FLAG_RETRANSMIT,
    HEADER_LENGTH,
    VERSION,
    ResultCode,
    is_protocol_error,
)
from .datatypes import AvpType
from .dictionary import DICTIONARY, CommandDef
from .errors import DecodeError

MAX_MESSAGE_LENGTH = 0xFFFFFF


@dataclass(frozen=True)
class Header:
    """The fixed 20-byte message header."""

    version: int
    length: int
    flags: int
    command_code: int
    application_id: int
    hop_by_hop: int
    end_to_end: int

    @property
    def is_request(self) -> bool:
        return bool(self.flags & FLAG_REQUEST)

    @classmethod
    def decode(cls, data: bytes) -> Header:
        if len(data) < HEADER_LENGTH:
            raise DecodeError(f"{len(data)} bytes: shorter than a Diameter header")
        vl, fc, app, hbh, e2e = struct.unpack_from(">IIIII", data)
        return cls(vl >> 24, vl & 0xFFFFFF, fc >> 24, fc & 0xFFFFFF, app, hbh, e2e)


def message_length(header: bytes, max_length: int = MAX_MESSAGE_LENGTH) -> int:
    """The total length of the message whose first (at least 4) bytes are ``header``.

    For framing a TCP stream: read 4 bytes, call this, read the rest. Raises DecodeError on a
    version other than 1 or a length that cannot be a Diameter message, or exceeds
    ``max_length`` (the peer should then close the connection: the stream cannot be
    re-synchronised).
    """
    if len(header) < 4:
        raise DecodeError("need 4 bytes to learn the message length")
    version, length = header[0], int.from_bytes(header[1:4], "big")
    if version != VERSION:
        raise DecodeError(f"Diameter version {version}", result_code=ResultCode.DIAMETER_UNSUPPORTED_VERSION)
    if length < HEADER_LENGTH or length % 4 or length > max_length:
        raise DecodeError(f"message length {length}", result_code=ResultCode.DIAMETER_INVALID_MESSAGE_LENGTH)
    return length


def _command(command: str | int | CommandDef, request: bool) -> tuple[int, CommandDef | None]:
    if isinstance(command, CommandDef):
        return command.code, DICTIONARY.command(command.code, request)
    if isinstance(command, int):
        return command, DICTIONARY.command(command, request)
    d = DICTIONARY.command_by_name(command)
    if d.request != request:
        raise ValueError(f"{command} is {'a request' if d.request else 'an answer'}")
    return d.code, d


class Message(AvpContainer):
    """A Diameter message: header fields plus a list of :class:`Avp`.

    Build requests with :meth:`request`, answers with :meth:`answer`; ``avps`` entries may be
    :class:`Avp` objects or ``(name, value)`` pairs. Look AVPs up with :meth:`find`,
    :meth:`find_all` and :meth:`get` (which accept a path into Grouped AVPs).
    """

    __slots__ = (
        "application_id",
        "avps",
        "command_code",
        "end_to_end",
        "flags",
        "hop_by_hop",
        "version",
    )

    def __init__(
        self,
        command_code: int,
        *,
        flags: int = 0,
        application_id: int = 0,
        hop_by_hop: int = 0,
        end_to_end: int = 0,
        avps: Iterable[Any] | Mapping[str, Any] = (),
        version: int = VERSION,
    ) -> None:
        for name, v, bits in (
            ("command_code", command_code, 24),
            ("flags", flags, 8),
            ("application_id", application_id, 32),
            ("hop_by_hop", hop_by_hop, 32),
            ("end_to_end", end_to_end, 32),
            ("version", version, 8),
        ):
            if not 0 <= v < 1 << bits:
                raise ValueError(f"{name} out of range: {v}")
        self.version = version
        self.flags = flags
        self.command_code = command_code
        self.application_id = application_id
        self.hop_by_hop = hop_by_hop
        self.end_to_end = end_to_end
        self.avps: list[Avp] = make_avps(avps)

    # -- construction -----------------------------------------------------------------------

    @classmethod
    def request(
        cls,
        command: str | int | CommandDef,
        avps: Iterable[Any] | Mapping[str, Any] = (),
        *,
        application_id: int | None = None,
        hop_by_hop: int = 0,
        end_to_end: int = 0,
        proxiable: bool | None = None,
    ) -> Message:
        """A request by command name ("AMR", "AA-Mobile-Node-Request") or code.

        The application id and the P bit default to the command's definition; commands
        without a fixed application (STR, RAR, ASR) need ``application_id``.
        """
        code, d = _command(command, True)
        if application_id is None:
            if d is None or d.application_id is None:
                raise ValueError(f"command {command!r} needs an explicit application_id")
            application_id = d.application_id
        if proxiable is None:
            proxiable = d.proxiable if d is not None else False
        flags = FLAG_REQUEST | (FLAG_PROXIABLE if proxiable else 0)
        return cls(
            code,
            flags=flags,
            application_id=application_id,
            hop_by_hop=hop_by_hop,
            end_to_end=end_to_end,
            avps=avps,
        )

    def answer(
        self,
        result_code: int | None = None,
        avps: Iterable[Any] | Mapping[str, Any] = (),
        *,
        error: bool | None = None,
    ) -> Message:
        """The answer to this request (RFC 6733 §6.2).

        Copies the command code, application id, P bit, hop-by-hop and end-to-end ids;
        puts Session-Id (if the request has one) first, then Result-Code (if given), then
        ``avps``, then the request's Proxy-Info AVPs in their order. The E bit is set for
        3xxx protocol errors unless ``error`` says otherwise.
        """
        if not self.is_request:
            raise ValueError("answer() of an answer")
        out: list[Avp] = []
        sid = self.find("Session-Id")
        if sid is not None:
            out.append(Avp.new("Session-Id", sid.value))
        if result_code is not None:
            out.append(Avp.new("Result-Code", result_code))
        out.extend(make_avps(avps))
        out.extend(_copy(a) for a in self.find_all("Proxy-Info"))
        if error is None:
            error = result_code is not None and is_protocol_error(result_code)
        flags = (self.flags & FLAG_PROXIABLE) | (FLAG_ERROR if error else 0)
        return Message(
            self.command_code,
            flags=flags,
            application_id=self.application_id,
            hop_by_hop=self.hop_by_hop,
            end_to_end=self.end_to_end,
            avps=out,
        )

    def copy(self) -> Message:
        """A deep copy (e.g. for a relay that adds Route-Record and rewrites hop-by-hop)."""
        m = Message.__new__(Message)
        m.version, m.flags, m.command_code = self.version, self.flags, self.command_code
        m.application_id, m.hop_by_hop, m.end_to_end = (
            self.application_id,
            self.hop_by_hop,
            self.end_to_end,
        )
        m.avps = [_copy(a) for a in self.avps]
        return m

    def add(self, avp: Avp | str | int, value: Any = None) -> Avp:
        """Append an AVP (an :class:`Avp`, or a name/code and a value); returns it."""
        a = avp if isinstance(avp, Avp) else make_avp((avp, value))
        self.avps.append(a)
        return a

    def remove(self, key: str | int) -> int:
        """Remove all top-level AVPs matching ``key``; returns how many."""
        gone = self.find_all(key)
        self.avps = [a for a in self.avps if not any(a is g for g in gone)]
        return len(gone)

    # -- header fields ----------------------------------------------------------------------

    def _flag(self, bit: int) -> bool:
        return bool(self.flags & bit)

    def _set(self, bit: int, on: bool) -> None:
        self.flags = (self.flags | bit) if on else (self.flags & ~bit)

    is_request = property(lambda s: s._flag(FLAG_REQUEST), lambda s, v: s._set(FLAG_REQUEST, v))
    proxiable = property(lambda s: s._flag(FLAG_PROXIABLE), lambda s, v: s._set(FLAG_PROXIABLE, v))
    error = property(lambda s: s._flag(FLAG_ERROR), lambda s, v: s._set(FLAG_ERROR, v))
    retransmit = property(lambda s: s._flag(FLAG_RETRANSMIT), lambda s, v: s._set(FLAG_RETRANSMIT, v))

    @property
    def command(self) -> CommandDef | None:
        return DICTIONARY.command(self.command_code, self.is_request)

    @property
    def name(self) -> str:
        d = self.command
        if d is not None:
            return d.abbrev
        return f"{'Request' if self.is_request else 'Answer'}-{self.command_code}"

    @property
    def session_id(self) -> str | None:
        return self.get("Session-Id")

    @property
    def result_code(self) -> int | None:
        """Result-Code, or Experimental-Result-Code inside Experimental-Result."""
        rc = self.get("Result-Code")
        if rc is None:
            rc = self.get("Experimental-Result", "Experimental-Result-Code")
        return rc

    def header(self) -> Header:
        return Header(
            self.version,
            HEADER_LENGTH + len(encode_avps(self.avps)),
            self.flags,
            self.command_code,
            self.application_id,
            self.hop_by_hop,
            self.end_to_end,
        )

    def children(self) -> list[Avp]:
        return self.avps

    def unknown_mandatory(self) -> list[Avp]:
        """AVPs (also inside Grouped ones) with the M bit that the dictionary does not know:
        a receiver answers those with 5001 DIAMETER_AVP_UNSUPPORTED and a Failed-AVP."""
        return [a for a in self.walk() if a.mandatory and not a.known]

    # -- wire -------------------------------------------------------------------------------

    def encode(self) -> bytes:
        body = encode_avps(self.avps)
        length = HEADER_LENGTH + len(body)
        if length > MAX_MESSAGE_LENGTH:
            raise ValueError(f"message too long ({length} bytes)")
        return (
            struct.pack(
                ">IIIII",
                (self.version << 24) | length,
                (self.flags << 24) | self.command_code,
                self.application_id,
                self.hop_by_hop,
                self.end_to_end,
            )
            + body
        )

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> Message:
        """Exactly one message (``len(data)`` must equal its Message Length).

        Raises DecodeError only; its ``header`` is set whenever the header was readable.
        """
        data = bytes(data)
        header = Header.decode(data)
        try:
            length = message_length(data[:4])
            if length != len(data):
                raise DecodeError(
                    f"message length {length}, got {len(data)} bytes",
                    result_code=ResultCode.DIAMETER_INVALID_MESSAGE_LENGTH,
                )
            avps = decode_avps(memoryview(data)[HEADER_LENGTH:])
        except DecodeError as e:
            e.header = header
            raise
        msg = cls.__new__(cls)
        msg.version = header.version
        msg.flags = header.flags
        msg.command_code = header.command_code
        msg.application_id = header.application_id
        msg.hop_by_hop = header.hop_by_hop
        msg.end_to_end = header.end_to_end
        msg.avps = avps
        return msg

    # -- python -----------------------------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Message):
            return NotImplemented
        return (
            self.version,
            self.flags,
            self.command_code,
            self.application_id,
            self.hop_by_hop,
            self.end_to_end,
            self.avps,
        ) == (
            other.version,
            other.flags,
            other.command_code,
            other.application_id,
            other.hop_by_hop,
            other.end_to_end,
            other.avps,
        )

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        flags = "".join(
            ch
            for ch, bit in zip("RPET", (FLAG_REQUEST, FLAG_PROXIABLE, FLAG_ERROR, FLAG_RETRANSMIT), strict=True)
            if self.flags & bit
        )
        return (
            f"<Message {self.name} flags={flags or '-'} app={self.application_id} "
            f"hbh=0x{self.hop_by_hop:08x} e2e=0x{self.end_to_end:08x} avps={self.avps!r}>"
        )


class Identifiers:
    """Hop-by-hop and end-to-end identifier sources for one peer (RFC 6733 §3).

    End-to-end: high 12 bits from the clock at start-up, low 20 bits random, then
    incremented. Hop-by-hop: random start, then incremented. Both wrap at 2**32.
    """

    def __init__(self, now: float | None = None, rng: random.Random | None = None) -> None:
        rng = rng or random.SystemRandom()
        t = int(time.time() if now is None else now)
        self._e2e = ((t & 0xFFF) << 20) | rng.getrandbits(20)
        self._hbh = rng.getrandbits(32)

    def next_end_to_end(self) -> int:
        v, self._e2e = self._e2e, (self._e2e + 1) & 0xFFFFFFFF
        return v

    def next_hop_by_hop(self) -> int:
        v, self._hbh = self._hbh, (self._hbh + 1) & 0xFFFFFFFF
        return v


def _copy(a: Avp) -> Avp:
    """A deep copy of an AVP (Grouped children copied too)."""
    b = Avp.__new__(Avp)
    b.code, b.vendor_id, b.flags, b.dtype = a.code, a.vendor_id, a.flags, a.dtype
    b._value = [_copy(x) for x in a.value] if a.dtype is AvpType.GROUPED else a.value
    return b


def copy_avp(a: Avp) -> Avp:
    return _copy(a)
