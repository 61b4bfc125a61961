"""Socket helpers shared by the daemons: UDP endpoints and raw ICMP sockets.

Only socket plumbing lives here; message formats are in ``daemons.wire.mip``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Callable

IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
_IN_PKTINFO = struct.Struct("=I4s4s")  # struct in_pktinfo: ipi_ifindex, ipi_spec_dst, ipi_addr

DatagramHandler = Callable[[bytes, tuple[str, int]], None]
LinkDatagramHandler = Callable[[bytes, tuple[str, int], int | None], None]


class UdpEndpoint(asyncio.DatagramProtocol):
    """A bound UDP socket whose datagrams go to ``handler(data, (addr, port))``."""

    def __init__(self, handler: DatagramHandler) -> None:
        self.handler = handler
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.handler(data, addr)

    def error_received(self, exc: Exception) -> None:  # ICMP errors for earlier sends
        pass

    def send(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        self.transport.sendto(data, addr)

    @classmethod
    async def open(cls, handler: DatagramHandler, host: str, port: int, device: str | None = None) -> UdpEndpoint:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        if device:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
        sock.bind((host, port))
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_datagram_endpoint(lambda: cls(handler), sock=sock)
        return proto

    def close(self) -> None:
        if self.transport:
            self.transport.close()


class LinkUdpEndpoint:
    """A bound UDP socket that tells which interface each datagram came in on
    (``handler(data, (addr, port), ifindex)``, from IP_PKTINFO) and can send out of a given
    interface to an address no route leads to (:meth:`send_on_link`): with an outgoing
    interface set, Linux takes a destination the routing tables do not send there as on that
    link and resolves it there (ARP). What a foreign agent needs to answer a mobile node it
    holds no route for yet (RFC 5944 §3.7.2.3). ``send`` works as :class:`UdpEndpoint`'s."""

    def __init__(self, handler: LinkDatagramHandler, sock: socket.socket) -> None:
        self.handler = handler
        self.sock = sock
        self.dropped = 0  # sends that failed (no buffer room, unreachable ...): UDP, the peer retransmits
        self.last_error: str | None = None

    @classmethod
    async def open(cls, handler: LinkDatagramHandler, host: str, port: int) -> LinkUdpEndpoint:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        sock.bind((host, port))
        sock.setblocking(False)
        endpoint = cls(handler, sock)
        asyncio.get_running_loop().add_reader(sock.fileno(), endpoint._readable)
        return endpoint

    def _readable(self) -> None:
        for _ in range(64):  # then let the loop breathe; it calls us again while data waits
            try:
                data, ancdata, _flags, addr = self.sock.recvmsg(65535, socket.CMSG_SPACE(_IN_PKTINFO.size))
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue  # e.g. a queued ICMP error for an earlier send
            ifindex = None
            for level, kind, value in ancdata:
                if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(value) >= _IN_PKTINFO.size:
                    ifindex = _IN_PKTINFO.unpack_from(value)[0]
            self.handler(data, addr, ifindex)

    def _send(self, data: bytes, addr: tuple[str, int], ancdata: list[tuple[int, int, bytes]]) -> None:
        try:
            self.sock.sendmsg([data], ancdata, 0, addr)
        except OSError as exc:  # as asyncio's datagram transport: a failed send is not the caller's crash
            self.dropped += 1
            self.last_error = exc.strerror or str(exc)

    def send(self, data: bytes, addr: tuple[str, int]) -> None:
        self._send(data, addr, [])

    def send_on_link(self, data: bytes, addr: tuple[str, int], ifindex: int, source: str) -> None:
        """Out of interface ``ifindex`` from ``source``, whatever the routing tables say."""
        info = _IN_PKTINFO.pack(ifindex, socket.inet_aton(source), bytes(4))
        self._send(data, addr, [(socket.IPPROTO_IP, IP_PKTINFO, info)])

    def close(self) -> None:
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()


def icmp_socket(device: str, multicast_ttl: int = 1, join: list[str] | None = None,
                local: str | None = None) -> socket.socket:
    """A raw ICMP socket bound to one interface (receives whole IP packets, sends ICMP).

    ``join``: multicast groups to join on that interface (e.g. 224.0.0.2 for an agent
    listening to solicitations). RFC 5944 §2.3: advertisements and solicitations go out
    with TTL 1.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, multicast_ttl)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 1)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
    ifindex = socket.if_nametoindex(device)
    # struct ip_mreqn: multiaddr, address, ifindex — selects the outgoing interface.
    mreqn = socket.inet_aton("0.0.0.0") + socket.inet_aton(local or "0.0.0.0") + ifindex.to_bytes(4, "little")
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, mreqn)
    for group in join or []:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                        socket.inet_aton(group) + socket.inet_aton("0.0.0.0") + ifindex.to_bytes(4, "little"))
    sock.setblocking(False)
    return sock
