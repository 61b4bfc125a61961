"""Agent Advertisement and Solicitation handling (RFC 5944 §2), shared by FA and HA.

Advertises every ``interval`` seconds on one interface and at once when a solicitation
arrives; with ``challenge`` on, each advertisement carries a fresh RFC 3012 challenge from
:class:`daemons.agents.challenges.ChallengeWindow`, which checks registrations' challenges
without a list of what was advertised (so solicitations cannot push one out). :func:`read_icmp`
is how both sides (the agents here, the mobile node for advertisements) read their raw ICMP
sockets.

Solicitations are answered at once (a handover waits on the answer), with two limits: per
source (``solicitation_limit``, a token bucket: the excess is dropped and counted) and at most
one solicited advertisement per ``MIN_SOLICITED_GAP``. The answer is multicast, so a real MN
hears the one its solicitation asked for even when its own source was flooded in its name.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket

from daemons.agents.challenges import ChallengeWindow
from daemons.runtime.log import EventLog
from daemons.runtime.net import icmp_socket
from daemons.runtime.ratelimit import Limit, RateLimiter
from daemons.wire import mip

log = EventLog("mipvpn.advertiser")
ALL_SYSTEMS = "224.0.0.1"
ALL_ROUTERS = "224.0.0.2"
# Solicited advertisements at most this often (200 a second): solicitations from many (forged)
# sources cannot make the agent flood the link; a real MN waits at most this long for the answer.
MIN_SOLICITED_GAP = 0.005


def read_icmp(sock: socket.socket, icmp_type: int) -> tuple[ipaddress.IPv4Address, bytes] | None:
    """One packet from a raw ICMP socket: (its source, the ICMP message) when it is of
    ``icmp_type``; None when nothing was waiting or it is of another type (a raw ICMP socket
    sees every ICMP packet). ``mip.DecodeError``: not an IPv4 packet."""
    try:
        packet, _ = sock.recvfrom(65535)
    except BlockingIOError:
        return None
    src, _dst, _ttl, icmp = mip.strip_ipv4_header(packet)
    if not icmp or icmp[0] != icmp_type:
        return None
    return src, icmp


class Advertiser:
    def __init__(self, interface: str, address: ipaddress.IPv4Address, flags: mip.AdvFlag,
                 care_of_addresses: tuple[ipaddress.IPv4Address, ...], registration_lifetime: int,
                 interval: float, challenge: bool, challenge_window: int = 8,
                 solicitation_limit: RateLimiter | None = None) -> None:
        self.interface = interface
        self.address = address
        self.flags = flags
        self.care_of_addresses = care_of_addresses
        self.registration_lifetime = registration_lifetime
        self.interval = interval
        self.challenges = ChallengeWindow(interval, challenge_window) if challenge else None
        self.solicitation_limit = solicitation_limit
        self.sequence = 0
        self.counters = {"advertisements": 0, "solicitations": 0, "malformed_solicitations": 0,
                         "solicitations_rate_limited": 0}
        self.sock: socket.socket | None = None
        self.now = asyncio.Event()

    def advertisement(self) -> mip.AgentAdvertisement:
        self.sequence = self.sequence + 1 if self.sequence < 0xFFFF else 256  # §2.1.1 wrap
        exts: list[mip.Extension] = [mip.MobilityAgentAdvExtension(
            sequence=self.sequence, registration_lifetime=self.registration_lifetime,
            flags=self.flags, care_of_addresses=self.care_of_addresses)]
        if self.challenges is not None:
            exts.append(mip.AdvChallengeExtension(self.challenges.issue()))
        lifetime = max(3, int(3 * self.interval))  # RFC 1256: three times the interval
        return mip.AgentAdvertisement(lifetime=lifetime, addresses=[(self.address, 0)], extensions=exts,
                                      code=mip.ADV_CODE_MOBILITY_ONLY)

    async def run(self) -> None:
        self.sock = icmp_socket(self.interface, join=[ALL_ROUTERS], local=str(self.address))
        loop = asyncio.get_running_loop()
        loop.add_reader(self.sock.fileno(), self.on_icmp)
        while True:
            self.now.clear()  # what was solicited so far, this advertisement answers
            self.send()
            sent = loop.time()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.now.wait(), self.interval)
            if self.now.is_set() and (gap := MIN_SOLICITED_GAP - (loop.time() - sent)) > 0:
                await asyncio.sleep(gap)

    def send(self) -> None:
        assert self.sock is not None
        try:
            self.sock.sendto(self.advertisement().encode(), (ALL_SYSTEMS, 0))
            self.counters["advertisements"] += 1
        except OSError as exc:  # e.g. no port of the access bridge is up yet
            log.debug("advertisement.failed", reason=os.strerror(exc.errno or 0))

    def on_icmp(self) -> None:
        assert self.sock is not None
        try:
            got = read_icmp(self.sock, mip.ICMP_ROUTER_SOLICITATION)
        except mip.DecodeError:
            self.counters["malformed_solicitations"] += 1
            return
        if got is None:
            return  # only solicitations matter
        src, icmp = got
        if self.solicitation_limit is not None and (limit := self.solicitation_limit.check(str(src))) is not Limit.PASS:
            self.counters["solicitations_rate_limited"] += 1
            if limit is Limit.FIRST_DROP:
                log.warning("solicitation.rate_limited", src=src, interface=self.interface)
            return
        try:
            mip.decode_icmp(icmp)
        except mip.DecodeError as exc:
            self.counters["malformed_solicitations"] += 1
            log.debug("solicitation.malformed", src=src, reason=exc)
            return
        self.counters["solicitations"] += 1
        log.info("solicitation.received", src=src, interface=self.interface)
        self.now.set()
