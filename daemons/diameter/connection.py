"""One TCP connection (plain or TLS) framed into Diameter messages (RFC 6733 §3), and the requests
sent on it that still wait for an answer.

A :class:`Connection` carries the hop-by-hop identifier sequence (unique per connection) and
its :class:`Pending` requests; it knows bytes and frames, not the peer state machine
(:mod:`daemons.diameter.peer`) nor what the messages mean.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from daemons.wire.diameter.errors import DecodeError
from daemons.wire.diameter.message import MAX_MESSAGE_LENGTH, Header, Identifiers, Message, message_length

from .tls import TlsSession, session_of

if TYPE_CHECKING:
    from .peer import Peer
    from .routing import Remembered

HEADER_REST = 16  # header bytes after the 4 that carry version and length


@dataclass(eq=False)
class Pending:
    """A request sent on a connection and waiting for its answer.

    ``future`` is set for requests this node originated (``DiameterNode.request``);
    ``origin``/``origin_hbh`` for relayed ones (where the answer goes back to).
    ``tried`` holds the peers it was sent to (failover never picks them again).
    A relayed one also holds the peer it came from (``origin_peer``: one request less in
    flight for it once done) and where its answer is remembered for duplicates (``remembered``).
    """

    msg: Message
    future: asyncio.Future[Message] | None = None
    origin: Connection | None = None
    origin_hbh: int = 0
    origin_peer: str | None = None
    remembered: Remembered | None = None
    tried: set[str] = field(default_factory=set)
    conn: Connection | None = None
    timer: asyncio.TimerHandle | None = None


class FramingError(Exception):
    """The byte stream cannot be split into messages any more (the connection must close).

    ``decode_error`` says why; ``header`` is the 20-byte header when it could be read;
    ``oversized``: the length field is valid but above the limit the caller gave.
    """

    def __init__(self, decode_error: DecodeError, header: Header | None, oversized: bool = False) -> None:
        super().__init__(str(decode_error))
        self.decode_error = decode_error
        self.header = header
        self.oversized = oversized


class Connection:
    """One TCP connection carrying Diameter messages; ``tls`` is its TLS session (None: plain TCP)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, incoming: bool) -> None:
        self.reader = reader
        self.writer = writer
        self.incoming = incoming
        self.ids = Identifiers()  # hop-by-hop ids: unique per connection
        self.peer: Peer | None = None  # set once CER/CEA succeeded
        self.pending: dict[int, Pending] = {}
        self.cea: asyncio.Future[Message] | None = None
        self.dpa: asyncio.Future[Message] | None = None
        self.dwr_outstanding = False
        self.watchdog_deadline = 0.0
        # every message received counts and sets ``heard`` (a liveness probe clears it to wait for
        # the next one, and compares the count: another probe may clear it meanwhile)
        self.received = 0
        self.heard = asyncio.Event()
        self.cer_pending = False  # an incoming CER is being decided (its CEA not sent yet)
        self.closed = asyncio.Event()
        self.opened_at = time.time()
        peername = writer.get_extra_info("peername")
        sockname = writer.get_extra_info("sockname")
        self.remote: tuple[str, int] | None = tuple(peername[:2]) if peername else None
        self.local: tuple[str, int] | None = tuple(sockname[:2]) if sockname else None
        self.tls: TlsSession | None = session_of(writer.get_extra_info("ssl_object"))

    def secured(self) -> None:
        """The TLS handshake on this connection is done (``writer.start_tls``): note its session."""
        self.tls = session_of(self.writer.get_extra_info("ssl_object"))

    @property
    def remote_text(self) -> str:
        return "-" if self.remote is None else f"{self.remote[0]}:{self.remote[1]}"

    @property
    def is_closed(self) -> bool:
        return self.closed.is_set() or self.writer.is_closing()

    def next_hop_by_hop(self) -> int:
        return self.ids.next_hop_by_hop()

    def send(self, msg: Message) -> bool:
        """Queue one message; False if the connection is already closing."""
        if self.is_closed:
            return False
        self.writer.write(msg.encode())
        return True

    async def drain(self) -> None:
        if not self.is_closed:
            try:
                await self.writer.drain()
            except (ConnectionError, OSError):
                self.close()

    async def read_frame(self, max_length: int = MAX_MESSAGE_LENGTH, header_timeout: float = 1.0,
                         read_header: bool = True) -> bytes:
        """The bytes of the next message, at most ``max_length`` of them.

        Raises ``asyncio.IncompleteReadError``/``ConnectionError`` at end of stream and
        :class:`FramingError` when the length field is unusable or above ``max_length`` (then,
        if ``read_header``, it tries for at most ``header_timeout`` to read the rest of the
        header so that an error answer can be built). Nothing beyond the header of a message
        that is too long is read.
        """
        head = await self.reader.readexactly(4)
        try:
            length = message_length(head, max_length)
        except DecodeError as e:
            oversized = False
            with contextlib.suppress(DecodeError):
                oversized = message_length(head) > max_length
            header = None
            if read_header:
                try:
                    rest = await asyncio.wait_for(self.reader.readexactly(HEADER_REST), header_timeout)
                    header = Header.decode(head + rest)
                except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, DecodeError):
                    pass
            raise FramingError(e, header, oversized) from None
        return head + await self.reader.readexactly(length - 4)

    def close(self, abort: bool = False) -> None:
        """Close the transport (flushing queued bytes unless ``abort``)."""
        if not self.writer.is_closing():
            if abort:
                self.writer.transport.abort()
            else:
                self.writer.close()
        self.closed.set()

    def __repr__(self) -> str:
        who = self.peer.host if self.peer else "?"
        return f"<Connection {who} {'in' if self.incoming else 'out'} {self.remote_text}>"


__all__ = ["HEADER_REST", "Connection", "FramingError", "Pending"]
