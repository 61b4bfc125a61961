"""Diameter peers and transport connections (RFC 6733 §2.1, §5; RFC 3539 watchdog states).

A :class:`Peer` is an entry of the peer table: its identity, realm, where to dial it (if we
dial it) and its run-time state. A :class:`Connection` is one TCP connection framed into
Diameter messages; it carries the hop-by-hop identifier sequence (unique per connection) and
the requests sent on it that still wait for an answer. The state machine itself lives in
:mod:`daemons.diameter.node`; this module holds data and the byte-level framing only.
"""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass, field
from typing import Any

from daemons.wire.diameter.constants import APP_RELAY, DIAMETER_PORT
from daemons.wire.diameter.errors import DecodeError
from daemons.wire.diameter.message import Header, Identifiers, Message, message_length

HEADER_REST = 16  # header bytes after the 4 that carry version and length


class PeerState(enum.Enum):
    """Peer states as ``show`` prints them.

    ``closed``: no connection (dialled peers are retried with back-off);
    ``connecting``: TCP connect in progress; ``wait-cea``: CER sent;
    ``open``: CER/CEA done, watchdog OKAY (RFC 3539); ``suspect``: a DWR went unanswered
    for Tw, requests are failed over and no new ones are routed here; ``closing``: DPR
    sent or received.
    """

    CLOSED = "closed"
    CONNECTING = "connecting"
    WAIT_CEA = "wait-cea"
    OPEN = "open"
    SUSPECT = "suspect"
    CLOSING = "closing"


@dataclass(eq=False)
class Peer:
    """One entry of the peer table.

    ``connect`` peers are dialled (and re-dialled with back-off); the others only accept an
    incoming connection. ``dynamic`` peers were not configured but connected to us
    (``accept_unknown_peers``).
    """

    host: str
    realm: str
    address: str | None = None
    port: int = DIAMETER_PORT
    connect: bool = False
    watchdog_interval: float | None = None  # None: the node's default
    dynamic: bool = False
    # run-time state
    state: PeerState = PeerState.CLOSED
    conn: Connection | None = None
    applications: frozenset[int] = frozenset()  # common applications from CER/CEA
    origin_state_id: int | None = None
    product_name: str | None = None
    last_watchdog: float | None = None  # wall clock of the last DWR/DWA exchange
    last_disconnect_cause: int | None = None
    backoff: float = 0.0
    opened: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[Any] | None = None

    @property
    def key(self) -> str:
        return self.host.lower()

    @property
    def is_open(self) -> bool:
        """Usable for new requests: OPEN (not SUSPECT, not CLOSING)."""
        return self.state is PeerState.OPEN and self.conn is not None and not self.conn.is_closed

    def supports(self, application_id: int) -> bool:
        return application_id in self.applications or APP_RELAY in self.applications

    def status(self) -> dict[str, Any]:
        return {
            "peer": self.host,
            "state": self.state.value,
            "realm": self.realm,
            "address": None if self.address is None else f"{self.address}:{self.port}",
            "connected": None if self.conn is None else self.conn.remote_text,
            "direction": None if self.conn is None else ("in" if self.conn.incoming else "out"),
            "applications": sorted(self.applications),
            "origin_state_id": self.origin_state_id,
            "last_watchdog": None if self.last_watchdog is None else round(self.last_watchdog, 3),
            "pending": 0 if self.conn is None else len(self.conn.pending),
        }


@dataclass(eq=False)
class Pending:
    """A request sent on a connection and waiting for its answer.

    ``future`` is set for requests this node originated (``DiameterNode.request``);
    ``origin``/``origin_hbh`` for relayed ones (where the answer goes back to).
    ``tried`` holds the peers it was sent to (failover never picks them again).
    """

    msg: Message
    future: asyncio.Future[Message] | None = None
    origin: Connection | None = None
    origin_hbh: int = 0
    tried: set[str] = field(default_factory=set)
    conn: Connection | None = None
    timer: asyncio.TimerHandle | None = None


class FramingError(Exception):
    """The byte stream cannot be split into messages any more (the connection must close).

    ``decode_error`` says why; ``header`` is the 20-byte header when it could be read.
    """

    def __init__(self, decode_error: DecodeError, header: Header | None) -> None:
        super().__init__(str(decode_error))
        self.decode_error = decode_error
        self.header = header


class Connection:
    """One TCP connection carrying Diameter messages."""

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
        self.closed = asyncio.Event()
        self.opened_at = time.time()
        peername = writer.get_extra_info("peername")
        sockname = writer.get_extra_info("sockname")
        self.remote: tuple[str, int] | None = tuple(peername[:2]) if peername else None
        self.local: tuple[str, int] | None = tuple(sockname[:2]) if sockname else None

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

    async def read_frame(self, header_timeout: float = 1.0) -> bytes:
        """The bytes of the next message.

        Raises ``asyncio.IncompleteReadError``/``ConnectionError`` at end of stream and
        :class:`FramingError` when the length field is unusable (then it tries, for at most
        ``header_timeout``, to read the rest of the header so that an error answer can be
        built).
        """
        head = await self.reader.readexactly(4)
        try:
            length = message_length(head)
        except DecodeError as e:
            header = None
            try:
                rest = await asyncio.wait_for(self.reader.readexactly(HEADER_REST), header_timeout)
                header = Header.decode(head + rest)
            except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, DecodeError):
                pass
            raise FramingError(e, header) from None
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
