"""Socket helpers shared by the daemons: a UDP endpoint and raw ICMP sockets.

Only socket plumbing lives here; message formats are in ``daemons.wire.mip``.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)

DatagramHandler = Callable[[bytes, tuple[str, int]], None]


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
