"""Diameter peers (RFC 6733 §2.1, §5): the peer table and the peer state machine.

A :class:`Peer` is an entry of the peer table: its identity, realm, where to dial it (if we
dial it), where it may connect from, and its run-time state. :class:`PeerTable` keeps the
transport connections to the peers: it listens and dials (re-dialling with back-off), runs the
capabilities exchange (CER/CEA, with the election of §5.6.4 when both sides dial), reads every
connection, answers the base protocol's messages and disconnects (DPR/DPA). It hands the
watchdog's messages (DWR/DWA) to :mod:`daemons.diameter.watchdog` and every other message of an
open peer to the ``deliver`` callback (the node's dispatcher).

* Who a connection's peer is, is decided in one place, :meth:`PeerTable.identify`: for an
  incoming connection, its CER names a configured peer (Origin-Host and Origin-Realm) and the
  connection comes from one of that peer's addresses (``sources``, and the address we dial it
  at); for one we dialled, the CEA names the peer we dialled. Over TLS the peer's certificate
  (verified against the configured CA during the handshake) must name that Origin-Host in its
  subjectAltName DNS entries. Anything else is refused: a CER with 3010 DIAMETER_UNKNOWN_PEER
  (RFC 6733 §5.3; the same answer for an unknown name, a wrong realm, a wrong source address and
  a certificate for another name, so that nobody learns which names are configured), a CEA by
  closing the connection.
* TLS (RFC 6733 §2.1, §13; :mod:`.tls`): when the node has TLS contexts, every connection is TLS
  from its first byte, TLS 1.3, the certificate of the other end required and verified. A
  handshake that fails (no certificate, one from another CA, not TLS at all) closes the
  connection before any Diameter message is read; it is counted (``tls_handshake_failed``) and
  logged with the address and the ssl module's reason. Without TLS contexts the node speaks
  plain TCP and says so at start (``diameter.plaintext``).
* Unknown peers are refused unless ``accept_unknown_peers`` (tests and tools only; a warning at
  start): they then become ``dynamic`` peers, not bound to any address, forgotten
  ``dynamic_peer_ttl`` after their connection closed.
* Connection set-up: configure dialling on one side only (FA -> AAAF -> AAAH -> HA); the
  other side adds the peer without an address, with the ``sources`` it connects from. A dialled
  peer is never dialled while it has a connection. If both sides dial anyway, both keep the
  connection the lower Origin-Host dialled: a CER that comes while our own connection still
  waits for its CEA is accepted, and the election (§5.6.4) closes one of the two when the CEA
  comes (the higher Origin-Host keeps the connection it accepted); a CER for a peer whose
  connection we dialled is open is answered 4003 DIAMETER_ELECTION_LOST when we are the lower
  one, and probed as below when we are the higher.
* A CER for a peer that is already open never replaces its connection on a name alone (§5.6:
  R-Conn-CER in R-Open/I-Open is R-Reject): the live connection is probed with a DWR, and only
  if it stays silent for ``peer_probe_timeout`` (the peer restarted before our watchdog noticed)
  does the new connection take over; otherwise the CER is answered 5012
  DIAMETER_UNABLE_TO_COMPLY and its connection closed.
* Limits: a message before the capabilities exchange is done may be ``max_frame_before_cer``
  bytes long, after it ``max_frame`` (longer: the connection is closed); at most
  ``max_connections_per_source`` connections from one source address (more are closed at once).
  Every refusal is counted (``LocalNode.counters``) and logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ipaddress
import random
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from daemons.wire.diameter.avp import Avp
from daemons.wire.diameter.constants import (
    APP_RELAY,
    DIAMETER_PORT,
    FLAG_ERROR,
    FLAG_PROXIABLE,
    VENDOR_MIPVPN,
    DisconnectCause,
    ResultCode,
    is_protocol_error,
)
from daemons.wire.diameter.errors import DecodeError
from daemons.wire.diameter.message import Header, Message

from .connection import Connection, FramingError
from .errors import example_avp
from .local import CMD_CER, CMD_DPR, CMD_DWR, LocalNode, hex_id, log
from .tls import Tls, reason

if TYPE_CHECKING:
    from .watchdog import Watchdog

Deliver = Callable[[Connection, "Peer", Message], None]
"""Takes a message that is not base protocol, from an open peer, on that peer's connection."""


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



Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def source_address(conn: Connection) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address a connection comes from (an IPv4-mapped IPv6 address as IPv4)."""
    if conn.remote is None:
        return None
    try:
        ip = ipaddress.ip_address(conn.remote[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@dataclass
class Refusal:
    """Why :meth:`PeerTable.identify` refused a connection's claimed identity."""

    result_code: int | None  # the CEA's Result-Code (None: a CEA we got, the connection is closed)
    counter: str  # the counter it is counted under
    reason: str  # for the log (never sent)


@dataclass(eq=False)
class Peer:
    """One entry of the peer table.

    ``connect`` peers are dialled (and re-dialled with back-off); the others only accept an
    incoming connection, from one of their ``sources`` (or the ``address`` we would dial).
    ``agent`` peers relay requests of others (an AAAF, a relay agent): their requests may carry
    another node's Origin-Host; every other peer's requests must carry its own. ``dynamic`` peers
    were not configured but connected to us (``accept_unknown_peers``).
    """

    host: str
    realm: str
    address: str | None = None
    port: int = DIAMETER_PORT
    connect: bool = False
    watchdog_interval: float | None = None  # None: the node's default
    sources: tuple[Network, ...] = ()
    agent: bool = False
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
    expiry: asyncio.TimerHandle | None = None  # a dynamic peer without connection is forgotten then

    @property
    def key(self) -> str:
        return self.host.lower()

    def may_connect_from(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> bool:
        """Whether a connection from ``ip`` may be this peer's (its sources and dial address)."""
        if ip is None:
            return False
        if self.address is not None:
            with contextlib.suppress(ValueError):
                if ipaddress.ip_address(self.address) == ip:
                    return True
        return any(ip.version == net.version and ip in net for net in self.sources)

    @property
    def is_open(self) -> bool:
        """Usable for new requests: OPEN (not SUSPECT, not CLOSING)."""
        return self.state is PeerState.OPEN and self.conn is not None and not self.conn.is_closed

    def supports(self, application_id: int) -> bool:
        return application_id in self.applications or APP_RELAY in self.applications

    def note_origin_state_id(self, msg: Message) -> None:
        """Remember the Origin-State-Id of a CER/CEA/DWR/DWA; a new value means the peer restarted."""
        osi = msg.get("Origin-State-Id")
        if osi is None:
            return
        if self.origin_state_id is not None and osi != self.origin_state_id:
            log.warning("peer.restarted", peer=self.host, old=self.origin_state_id, new=osi)
        self.origin_state_id = osi

    def status(self) -> dict[str, Any]:
        return {
            "peer": self.host,
            "state": self.state.value,
            "realm": self.realm,
            "address": None if self.address is None else f"{self.address}:{self.port}",
            "sources": [str(n) for n in self.sources] or None,
            "agent": self.agent,
            "dynamic": self.dynamic,
            "connected": None if self.conn is None else self.conn.remote_text,
            "tls": None if self.conn is None or self.conn.tls is None else self.conn.tls.version,
            "direction": None if self.conn is None else ("in" if self.conn.incoming else "out"),
            "applications": sorted(self.applications),
            "origin_state_id": self.origin_state_id,
            "last_watchdog": None if self.last_watchdog is None else round(self.last_watchdog, 3),
            "pending": 0 if self.conn is None else len(self.conn.pending),
        }


class PeerTable:
    """The peer table and the peer state machine of one node (see the module docstring)."""

    def __init__(self, local: LocalNode, peers: dict[str, Peer], watchdog: Watchdog, deliver: Deliver, *,
                 listen_address: str | None = None, listen_port: int = DIAMETER_PORT, tls: Tls | None = None) -> None:
        self.local = local
        self.tls = tls  # None: plain TCP
        self.peers = peers  # by lower-case host; the router routes on the same table
        self.watchdog = watchdog
        self.deliver = deliver
        self.listen_address = listen_address
        self.listen_port = listen_port
        self.conns: set[Connection] = set()  # every connection not yet lost, open or not
        self._server: asyncio.Server | None = None

    def add(
        self,
        host: str,
        realm: str,
        address: str | None = None,
        port: int = DIAMETER_PORT,
        *,
        connect: bool | None = None,
        watchdog_interval: float | None = None,
        sources: Iterable[str] = (),
        agent: bool = False,
    ) -> Peer:
        """Add a peer; with an ``address`` (and ``connect`` not False) it is dialled. It may
        connect to us from ``sources`` (addresses or prefixes) and from ``address``."""
        if host.lower() == self.local.origin_host.lower():
            raise ValueError("a node cannot be its own peer")
        old = self.peers.get(host.lower())
        if old is not None and not old.dynamic:
            raise ValueError(f"peer {host} already configured")
        if connect is None:
            connect = address is not None
        if connect and address is None:
            raise ValueError(f"peer {host}: connect needs an address")
        nets: list[Network] = []
        for src in sources:
            try:
                nets.append(ipaddress.ip_network(str(src), strict=False))
            except ValueError:
                raise ValueError(f"peer {host}: source {src!r} is not an address or prefix") from None
        if address is None and not nets:
            raise ValueError(f"peer {host}: neither an address to dial nor sources it may connect from")
        peer = Peer(host, realm, address, port, connect=connect, watchdog_interval=watchdog_interval,
                    sources=tuple(nets), agent=agent)
        if old is not None:  # a dynamic entry of the same name: configuration wins
            self._forget(old)
        self.peers[peer.key] = peer
        if self.local.running and connect:
            self._start_dialler(peer)
        return peer

    # -- life cycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen (when a listen address is set) and dial every peer to be dialled."""
        if self.local.settings.accept_unknown_peers:
            log.warning("diameter.unknown_peers_accepted", host=self.local.origin_host,
                        why="accept_unknown_peers is on: any host may connect, under any name (tests and tools only)")
        if self.tls is None:
            log.warning("diameter.plaintext", host=self.local.origin_host,
                        why="Diameter over plain TCP: peers are not authenticated and every AVP, keys included, "
                            "crosses the wire in clear (RFC 6733 §13 requires TLS or IPsec)")
        elif self.tls.keylog is not None:
            log.warning("diameter.tls.keylog", host=self.local.origin_host, file=str(self.tls.keylog),
                        why="TLS session secrets are written to this file: anyone who reads it decrypts the "
                            "captured traffic (a lab and debugging aid only)")
        if self.listen_address is not None:
            self._server = await asyncio.start_server(self._accept, self.listen_address, self.listen_port)
            log.info("diameter.listen", host=self.local.origin_host, address=self.listen_address, port=self.port,
                     transport="tcp" if self.tls is None else "tls",
                     peers=",".join(sorted(p.host for p in self.peers.values() if not p.dynamic and
                                           (p.sources or p.address))) or None)
        for peer in self.peers.values():
            if peer.connect:
                self._start_dialler(peer)

    @property
    def port(self) -> int | None:
        """The TCP port actually listened on (useful with ``listen_port=0``)."""
        if self._server is None or not self._server.sockets:
            return None
        return self._server.sockets[0].getsockname()[1]

    async def stop(self, cause: DisconnectCause) -> None:
        """DPR/DPA with every open peer, then close every connection and background task."""
        if self._server is not None:
            self._server.close()
        for peer in self.peers.values():
            if peer.task is not None:
                peer.task.cancel()
            if peer.expiry is not None:
                peer.expiry.cancel()
                peer.expiry = None
        await asyncio.gather(*(self._disconnect(c, cause) for c in list(self.conns)), return_exceptions=True)
        for c in list(self.conns):
            c.close(abort=True)
        await self.local.cancel_tasks()
        for peer in self.peers.values():
            if peer.task is not None:
                with contextlib.suppress(BaseException):
                    await peer.task
                peer.task = None
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    # -- dialling --------------------------------------------------------------------------

    def _start_dialler(self, peer: Peer) -> None:
        if peer.task is None or peer.task.done():
            peer.task = asyncio.ensure_future(self._dial_loop(peer))

    async def _dial_loop(self, peer: Peer) -> None:
        """Keep a connection to a dialled peer, re-dialling with exponential back-off."""
        local, settings = self.local, self.local.settings
        while not local.stopping:
            if peer.conn is not None:  # connected (maybe through an incoming connection)
                await peer.conn.closed.wait()
                await asyncio.sleep(0)
                continue
            opened = await self._dial_once(peer)
            if local.stopping:
                return
            if opened and peer.conn is not None:
                await peer.conn.closed.wait()
            if local.stopping:
                return
            if opened:
                peer.backoff = settings.reconnect_min
            if peer.last_disconnect_cause in (DisconnectCause.BUSY, DisconnectCause.DO_NOT_WANT_TO_TALK_TO_YOU):
                peer.backoff = settings.reconnect_max
                peer.last_disconnect_cause = None
            delay = peer.backoff or settings.reconnect_min
            delay *= random.uniform(0.8, 1.2)
            log.info("peer.reconnect", peer=peer.host, delay=f"{delay:.2f}")
            await asyncio.sleep(delay)
            peer.backoff = min(settings.reconnect_max,
                               max(settings.reconnect_min, (peer.backoff or settings.reconnect_min) * 2))

    async def _dial_once(self, peer: Peer) -> bool:
        assert peer.address is not None
        settings = self.local.settings
        self._dial_state(peer, PeerState.CONNECTING)
        secure: dict[str, Any] = {} if self.tls is None else {
            "ssl": self.tls.client, "server_hostname": peer.host, "ssl_handshake_timeout": settings.connect_timeout}
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(peer.address, peer.port, **secure), settings.connect_timeout
            )
        except ssl.SSLError as e:  # connected, but the TLS handshake failed (e.g. its certificate is not trusted)
            self._dial_state(peer, PeerState.CLOSED)
            self.local.counters["tls_handshake_failed"] += 1
            log.warning("peer.tls.failed", peer=peer.host, address=f"{peer.address}:{peer.port}", direction="out",
                        reason=reason(e))
            return False
        except (OSError, TimeoutError) as e:
            self._dial_state(peer, PeerState.CLOSED)
            log.info("peer.connect.failed", peer=peer.host, address=f"{peer.address}:{peer.port}",
                     error=type(e).__name__)
            return False
        conn = Connection(reader, writer, incoming=False)
        self.conns.add(conn)
        log.info("peer.connected", peer=peer.host, address=conn.remote_text, direction="out",
                 tls=None if conn.tls is None else conn.tls.version)
        conn.cea = asyncio.get_running_loop().create_future()
        reader_task = self.local.spawn(self._read_loop(conn))
        self._dial_state(peer, PeerState.WAIT_CEA)
        self.local.send(conn, self._cer(conn))
        try:
            cea = await asyncio.wait_for(asyncio.shield(conn.cea), settings.cea_timeout)
        except (TimeoutError, ConnectionError):
            log.warning("peer.cea.timeout", peer=peer.host)
            self._dial_state(peer, PeerState.CLOSED)
            conn.close(abort=True)
            await asyncio.gather(reader_task, return_exceptions=True)
            return False
        rc = cea.result_code
        common = self._common_applications(cea)
        if rc != ResultCode.DIAMETER_SUCCESS or not common:
            log.warning("peer.cea.rejected", peer=peer.host, rc=None if rc is None else int(rc),
                        common=",".join(map(str, sorted(common))) or None)
            self._dial_state(peer, PeerState.CLOSED)
            conn.close()
            await asyncio.gather(reader_task, return_exceptions=True)
            return False
        _, refusal = self.identify(conn, cea, dialled=peer)
        if refusal is not None:
            self.local.counters[refusal.counter] += 1
            log.warning("peer.cea.refused", peer=peer.host, address=conn.remote_text, reason=refusal.reason)
            self._dial_state(peer, PeerState.CLOSED)
            conn.close(abort=True)
            await asyncio.gather(reader_task, return_exceptions=True)
            return False
        old = peer.conn
        if old is not None and not old.is_closed:
            # both sides dialled and the peer's connection opened first: election (RFC 6733 §5.6.4)
            if self._keeps_incoming(peer.host):
                log.info("peer.election", peer=peer.host, kept=old.remote_text, closed=conn.remote_text)
                conn.close()
                await asyncio.gather(reader_task, return_exceptions=True)
                return True
            log.info("peer.election", peer=peer.host, kept=conn.remote_text, closed=old.remote_text)
            old.close()
            self._connection_lost(old)
        self._open(peer, conn, cea, common)
        return True

    @staticmethod
    def _dial_state(peer: Peer, state: PeerState) -> None:
        """Dialling progress shows in the peer's state only while it has no connection."""
        if peer.conn is None:
            peer.state = state

    # -- capabilities exchange (CER/CEA) ---------------------------------------------------

    def _cer(self, conn: Connection) -> Message:
        msg = Message.request("CER", self._capabilities(conn), end_to_end=self.local.next_end_to_end())
        msg.hop_by_hop = conn.next_hop_by_hop()
        return msg

    def _capabilities(self, conn: Connection) -> list[Any]:
        local = self.local
        addresses = list(local.host_ip_addresses)
        if not addresses and conn.local is not None:
            addresses = [ipaddress.ip_address(conn.local[0])]
        avps: list[Any] = [("Origin-Host", local.origin_host), ("Origin-Realm", local.origin_realm)]
        avps += [("Host-IP-Address", a) for a in addresses]
        avps += [("Vendor-Id", local.vendor_id), ("Product-Name", local.product_name),
                 ("Origin-State-Id", local.origin_state_id), ("Supported-Vendor-Id", VENDOR_MIPVPN)]
        avps += [("Auth-Application-Id", a) for a in sorted(local.applications)]
        return avps

    def _common_applications(self, msg: Message) -> frozenset[int]:
        ours = self.local.applications
        theirs = {a.value for a in msg.find_all("Auth-Application-Id")}
        theirs |= {a.value for a in msg.find_all("Acct-Application-Id")}
        for vsa in msg.find_all("Vendor-Specific-Application-Id"):
            theirs |= {a.value for a in vsa.find_all("Auth-Application-Id")}
            theirs |= {a.value for a in vsa.find_all("Acct-Application-Id")}
        if APP_RELAY in theirs:
            return frozenset(ours | {APP_RELAY})
        if APP_RELAY in ours:
            return frozenset(theirs)
        return frozenset(ours & theirs)

    # -- who is this connection's peer ------------------------------------------------------

    def identify(self, conn: Connection, msg: Message,
                 dialled: Peer | None = None) -> tuple[Peer | None, Refusal | None]:
        """The one place that decides who a connection's peer is (RFC 6733 §5.3, §13).

        ``msg`` is the CER of an incoming connection (``dialled`` None) or the CEA on a
        connection we dialled to ``dialled``. Returns the peer (for an unknown host with
        ``accept_unknown_peers``, a new dynamic peer not yet in the table) or why not.
        Incoming: Origin-Host names a configured peer, Origin-Realm is its realm, and the
        connection comes from one of its addresses. Dialled: the CEA names the peer we dialled
        (its address is where we dialled). Over TLS, both ways, the certificate the peer showed in
        the handshake must name the Origin-Host (subjectAltName DNS, case-insensitive).
        """
        host = str(msg.get("Origin-Host") or "")
        realm = str(msg.get("Origin-Realm") or "")
        if dialled is not None:
            if host.lower() != dialled.key or realm.lower() != dialled.realm.lower():
                return None, Refusal(None, "cea_identity_mismatch", f"CEA from {host or '-'} ({realm or '-'}), "
                                     f"dialled {dialled.host} ({dialled.realm})")
            if conn.tls is not None and not conn.tls.names(host):
                return None, Refusal(None, "cea_certificate_mismatch",
                                     f"its certificate names {','.join(conn.tls.dns_names) or 'no DNS name'}")
            return dialled, None
        peer = self.peers.get(host.lower())
        certified = conn.tls is None or conn.tls.names(host)
        if peer is None or peer.dynamic:
            if not self.local.settings.accept_unknown_peers:
                return None, Refusal(ResultCode.DIAMETER_UNKNOWN_PEER, "cer_unknown_peer", "not a configured peer")
            if not certified:
                return None, Refusal(ResultCode.DIAMETER_UNKNOWN_PEER, "cer_certificate_mismatch",
                                     "its certificate does not name that Origin-Host")
            if peer is None:
                peer = Peer(host, realm, dynamic=True)
            elif realm.lower() != peer.realm.lower():
                peer.realm = realm
            return peer, None
        if realm.lower() != peer.realm.lower():
            return None, Refusal(ResultCode.DIAMETER_UNKNOWN_PEER, "cer_unknown_peer",
                                 f"Origin-Realm {realm} is not its configured realm {peer.realm}")
        if not peer.may_connect_from(source_address(conn)):
            return None, Refusal(ResultCode.DIAMETER_UNKNOWN_PEER, "cer_address_refused",
                                 "not one of the peer's addresses")
        if not certified:
            assert conn.tls is not None
            return None, Refusal(ResultCode.DIAMETER_UNKNOWN_PEER, "cer_certificate_mismatch",
                                 f"its certificate names {','.join(conn.tls.dns_names) or 'no DNS name'}")
        return peer, None

    def _on_cer(self, conn: Connection, cer: Message) -> None:
        if conn.peer is not None or not conn.incoming or conn.cer_pending:
            log.warning("peer.protocol", peer=conn.peer.host if conn.peer else conn.remote_text,
                        error="CER on an open connection")
            self.local.send(conn, self.local.base_answer(cer, rc=ResultCode.DIAMETER_UNABLE_TO_COMPLY))
            return
        host = cer.get("Origin-Host")
        realm = cer.get("Origin-Realm")
        missing = [n for n, v in (("Origin-Host", host), ("Origin-Realm", realm)) if not v]
        if missing:
            self._reject_cer(conn, cer, ResultCode.DIAMETER_MISSING_AVP, failed=[example_avp(n) for n in missing])
            return
        peer, refusal = self.identify(conn, cer)
        if refusal is not None or peer is None:
            assert refusal is not None and refusal.result_code is not None
            self.local.counters[refusal.counter] += 1
            self._reject_cer(conn, cer, refusal.result_code, host=host, reason=refusal.reason)
            return
        common = self._common_applications(cer)
        if not common:
            self._reject_cer(conn, cer, ResultCode.DIAMETER_NO_COMMON_APPLICATION, host=host)
            return
        old = peer.conn
        if old is not None and not old.is_closed:
            if not old.incoming and not self._keeps_incoming(host):
                self._reject_cer(conn, cer, ResultCode.DIAMETER_ELECTION_LOST, host=host)
                return
            conn.cer_pending = True  # answered once the live connection has shown whether it is alive
            self.local.spawn(self._contest(conn, cer, peer, common, old))
            return
        self._accept_cer(conn, cer, peer, common)

    async def _contest(self, conn: Connection, cer: Message, peer: Peer, common: frozenset[int],
                       old: Connection) -> None:
        """A CER for a peer that has an open connection: keep the live one, unless it is dead."""
        alive = await self._probe(old)
        if conn.is_closed:
            return
        current = peer.conn
        if current is not None and not current.is_closed and (alive or current is not old):
            self.local.counters["cer_already_connected"] += 1
            self._reject_cer(conn, cer, ResultCode.DIAMETER_UNABLE_TO_COMPLY, host=peer.host,
                             reason=f"already connected ({current.remote_text}), that connection answered")
            return
        if current is old:
            log.info("peer.replaced", peer=peer.host, old=old.remote_text, new=conn.remote_text,
                     why=f"no answer to a DWR within {self.local.settings.peer_probe_timeout} s")
            old.close(abort=True)
            self._connection_lost(old)
        conn.cer_pending = False
        self._accept_cer(conn, cer, peer, common)

    async def _probe(self, conn: Connection) -> bool:
        """Whether ``conn`` shows it is alive: any message on it within ``peer_probe_timeout``
        after a DWR (RFC 3539's watchdog, asked early)."""
        if conn.is_closed:
            return False
        before = conn.received
        conn.heard.clear()
        if not conn.dwr_outstanding:
            self.watchdog.send_dwr(conn)
        heard = asyncio.ensure_future(conn.heard.wait())
        closed = asyncio.ensure_future(conn.closed.wait())
        try:
            await asyncio.wait({heard, closed}, timeout=self.local.settings.peer_probe_timeout,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            heard.cancel()
            closed.cancel()
        return conn.received > before and not conn.is_closed

    def _accept_cer(self, conn: Connection, cer: Message, peer: Peer, common: frozenset[int]) -> None:
        if peer.dynamic and self.peers.get(peer.key) is not peer:
            if (other := self.peers.get(peer.key)) is not None:
                self._forget(other)
            self.peers[peer.key] = peer
        if peer.expiry is not None:
            peer.expiry.cancel()
            peer.expiry = None
        self.local.send(conn, self.local.base_answer(cer, self._capabilities(conn)[2:]))  # [2:]: Origin-* added there
        self._open(peer, conn, cer, common)

    def _keeps_incoming(self, peer_host: str) -> bool:
        """Election (RFC 6733 §5.6.4): the higher identity keeps the connection it accepted,
        so both ends keep the connection the lower identity dialled."""
        return self.local.origin_host.lower() > peer_host.lower()

    def _reject_cer(self, conn: Connection, cer: Message, rc: int, host: str | None = None,
                    failed: list[Avp] | None = None, reason: str | None = None) -> None:
        log.warning("peer.cer.rejected", peer=host or "-", address=conn.remote_text, rc=int(rc), reason=reason)
        extra: list[Any] = self._capabilities(conn)[2:]
        if failed:
            extra.append(("Failed-AVP", failed))
        self.local.send(conn, self.local.base_answer(cer, extra, rc=rc))
        conn.close()

    def _open(self, peer: Peer, conn: Connection, cex: Message, common: frozenset[int]) -> None:
        conn.peer = peer
        peer.conn = conn
        peer.applications = common
        peer.product_name = cex.get("Product-Name")
        peer.note_origin_state_id(cex)
        peer.state = PeerState.OPEN
        peer.last_watchdog = time.time()
        peer.backoff = self.local.settings.reconnect_min
        peer.opened.set()
        self.watchdog.arm(peer, conn)
        self.local.spawn(self._supervise(peer, conn))
        log.info("peer.open", peer=peer.host, realm=peer.realm, address=conn.remote_text,
                 direction="in" if conn.incoming else "out", apps=",".join(map(str, sorted(common))),
                 product=peer.product_name)

    async def _supervise(self, peer: Peer, conn: Connection) -> None:
        """Run the watchdog of an open connection; close the connection when it says the peer is down."""
        if await self.watchdog.watch(peer, conn):
            conn.close(abort=True)
            self._connection_lost(conn)

    # -- accepting and reading -------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Connection(reader, writer, incoming=True)
        if self.local.stopping:
            conn.close(abort=True)
            return
        src = source_address(conn)
        limit = self.local.settings.max_connections_per_source
        if sum(1 for c in self.conns if c.incoming and source_address(c) == src) >= limit:
            self.local.counters["connections_refused"] += 1
            log.warning("peer.connection.refused", address=conn.remote_text,
                        why=f"already {limit} connections from {src}")
            conn.close(abort=True)
            return
        self.conns.add(conn)
        if self.tls is not None and not await self._handshake(conn):
            return
        log.info("peer.accepted", address=conn.remote_text, tls=None if conn.tls is None else conn.tls.version)
        timer = asyncio.get_running_loop().call_later(self.local.settings.cer_timeout, self._cer_timeout, conn)
        try:
            await self._read_loop(conn)
        finally:
            timer.cancel()

    async def _handshake(self, conn: Connection) -> bool:
        """TLS server handshake on an accepted connection (nothing else is read before it is done)."""
        assert self.tls is not None
        try:
            await conn.writer.start_tls(self.tls.server, ssl_handshake_timeout=self.local.settings.cer_timeout)
        except (OSError, TimeoutError) as e:  # ssl.SSLError is an OSError
            conn.close(abort=True)
            self._connection_lost(conn)
            if not self.local.stopping:
                self.local.counters["tls_handshake_failed"] += 1
                log.warning("peer.tls.failed", address=conn.remote_text, direction="in", reason=reason(e))
            return False
        conn.secured()
        return True

    def _cer_timeout(self, conn: Connection) -> None:
        if conn.peer is None and not conn.is_closed:
            log.warning("peer.cer.timeout", address=conn.remote_text)
            conn.close(abort=True)

    async def _read_loop(self, conn: Connection) -> None:
        settings = self.local.settings
        try:
            while True:
                opened = conn.peer is not None
                try:
                    # before the capabilities exchange a few KiB, and nothing read beyond a long header
                    data = await conn.read_frame(settings.max_frame if opened else settings.max_frame_before_cer,
                                                 read_header=opened)
                except FramingError as e:
                    self._framing_error(conn, e)
                    break
                self.local.counters["received"] += 1
                try:
                    msg = Message.decode(data)
                except DecodeError as e:
                    self._malformed(conn, e)
                    if conn.peer is None:
                        break
                    continue
                self._receive(conn, msg)
        except ssl.SSLError as e:  # e.g. the other end refused our certificate (TLS 1.3: after its handshake)
            log.warning("peer.tls.error", peer=conn.peer.host if conn.peer else "-", address=conn.remote_text,
                        reason=reason(e))
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            conn.close(abort=True)
            self._connection_lost(conn)
            raise
        conn.close()
        self._connection_lost(conn)

    def _framing_error(self, conn: Connection, e: FramingError) -> None:
        if e.oversized:
            self.local.counters["oversized_frames"] += 1
            log.warning("msg.oversized", peer=conn.peer.host if conn.peer else conn.remote_text,
                        error=str(e.decode_error), limit=self.local.settings.max_frame if conn.peer is not None
                        else self.local.settings.max_frame_before_cer, action="close")
        else:
            self.local.counters["malformed"] += 1
            log.warning("msg.malformed", peer=conn.peer.host if conn.peer else conn.remote_text,
                        error=str(e.decode_error), rc=e.decode_error.result_code, action="close")
        if e.header is not None and e.header.is_request and e.decode_error.result_code is not None:
            self.local.send(conn, self._error_from_header(e.header, e.decode_error))

    def _malformed(self, conn: Connection, e: DecodeError) -> None:
        self.local.counters["malformed"] += 1
        h = e.header
        log.warning("msg.malformed", peer=conn.peer.host if conn.peer else conn.remote_text, error=str(e),
                    rc=e.result_code, hbh=None if h is None else hex_id(h.hop_by_hop),
                    cmd=None if h is None else h.command_code)
        if h is not None and h.is_request:
            self.local.send(conn, self._error_from_header(h, e))

    def _error_from_header(self, h: Header, e: DecodeError) -> Message:
        rc = e.result_code or ResultCode.DIAMETER_UNABLE_TO_COMPLY
        avps: list[Any] = [("Result-Code", rc), ("Origin-Host", self.local.origin_host),
                           ("Origin-Realm", self.local.origin_realm)]
        if e.avp_code is not None:
            from daemons.wire.diameter.dictionary import DICTIONARY

            d = DICTIONARY.avp(e.avp_code, e.avp_vendor_id)
            if d is not None:
                avps.append(("Failed-AVP", [example_avp(d.name)]))
            else:
                avps.append(("Failed-AVP", [Avp(e.avp_code, b"", vendor_id=e.avp_vendor_id)]))
        flags = (h.flags & FLAG_PROXIABLE) | (FLAG_ERROR if is_protocol_error(rc) else 0)
        return Message(h.command_code, flags=flags, application_id=h.application_id,
                       hop_by_hop=h.hop_by_hop, end_to_end=h.end_to_end, avps=avps)

    def _receive(self, conn: Connection, msg: Message) -> None:
        """One decoded message: the base protocol's here, the rest to the watchdog or ``deliver``."""
        conn.received += 1
        conn.heard.set()
        peer = conn.peer
        if peer is not None and peer.conn is conn:
            self.watchdog.heard(peer, conn)
        self.local.received(conn, msg)
        code = msg.command_code
        if code == CMD_CER and msg.is_request:
            self._on_cer(conn, msg)
        elif peer is None:
            if code == CMD_CER and conn.cea is not None and not conn.cea.done():
                conn.cea.set_result(msg)
            else:
                log.warning("peer.protocol", address=conn.remote_text, cmd=msg.name, error="message before CER/CEA")
                conn.close()
        elif code == CMD_DWR:
            self.watchdog.receive(conn, peer, msg)
        elif code == CMD_DPR and msg.is_request:
            cause = msg.get("Disconnect-Cause")
            peer.last_disconnect_cause = cause
            peer.state = PeerState.CLOSING
            peer.opened.clear()
            log.info("peer.dpr", peer=peer.host, cause=None if cause is None else getattr(cause, "name", cause))
            self.local.send(conn, self.local.base_answer(msg))
            self.watchdog.failover(conn, "peer disconnecting")
            conn.close()
        elif code == CMD_DPR:
            if conn.dpa is not None and not conn.dpa.done():
                conn.dpa.set_result(msg)
        else:
            self.deliver(conn, peer, msg)

    def _connection_lost(self, conn: Connection) -> None:
        if conn not in self.conns:
            return
        self.conns.discard(conn)
        conn.closed.set()
        if conn.cea is not None and not conn.cea.done():
            conn.cea.set_exception(ConnectionError("connection closed"))
            conn.cea.exception()  # mark retrieved
        if conn.dpa is not None and not conn.dpa.done():
            conn.dpa.set_exception(ConnectionError("connection closed"))
            conn.dpa.exception()
        peer = conn.peer
        if peer is not None and peer.conn is conn:
            peer.conn = None
            peer.state = PeerState.CLOSED
            peer.opened.clear()
            log.info("peer.closed", peer=peer.host, address=conn.remote_text, pending=len(conn.pending))
            if peer.dynamic and not self.local.stopping:
                # dynamic peers keep their entry a while (for `show`, reused when they come back), then go
                peer.expiry = asyncio.get_running_loop().call_later(
                    self.local.settings.dynamic_peer_ttl, self._expire_dynamic, peer)
        self.watchdog.failover(conn, "connection closed")

    def _expire_dynamic(self, peer: Peer) -> None:
        peer.expiry = None
        if peer.conn is None and self.peers.get(peer.key) is peer:
            self._forget(peer)
            self.local.counters["dynamic_peers_expired"] += 1
            log.info("peer.expired", peer=peer.host, after_s=self.local.settings.dynamic_peer_ttl)

    def _forget(self, peer: Peer) -> None:
        """Remove a dynamic peer's entry."""
        if peer.expiry is not None:
            peer.expiry.cancel()
            peer.expiry = None
        if self.peers.get(peer.key) is peer:
            del self.peers[peer.key]

    # -- disconnect (DPR/DPA) --------------------------------------------------------------

    async def _disconnect(self, conn: Connection, cause: DisconnectCause) -> None:
        peer = conn.peer
        if peer is None or conn.is_closed:
            conn.close(abort=True)
            return
        peer.state = PeerState.CLOSING
        peer.opened.clear()
        conn.dpa = asyncio.get_running_loop().create_future()
        local = self.local
        dpr = Message.request("DPR", [("Origin-Host", local.origin_host), ("Origin-Realm", local.origin_realm),
                                      ("Disconnect-Cause", cause)], end_to_end=local.next_end_to_end())
        dpr.hop_by_hop = conn.next_hop_by_hop()
        self.local.send(conn, dpr)
        try:
            await asyncio.wait_for(asyncio.shield(conn.dpa), self.local.settings.dpa_timeout)
            log.info("peer.dpa", peer=peer.host)
        except (TimeoutError, ConnectionError):
            log.warning("peer.dpa.missing", peer=peer.host)
        conn.close()

    async def disconnect_peer(self, peer_host: str, cause: DisconnectCause = DisconnectCause.REBOOTING) -> None:
        """DPR/DPA with one peer (a dialled peer is re-dialled after back-off)."""
        peer = self.peers[peer_host.lower()]
        if peer.conn is not None:
            peer.last_disconnect_cause = cause
            await self._disconnect(peer.conn, cause)


__all__ = ["Deliver", "Peer", "PeerState", "PeerTable"]
