"""Routes, rules and neighbour entries a Mobile IP agent or node owns.

Each class changes only what it owns, so it can reconcile after a restart. The agents' (FA,
HA) go through rtnetlink (pyroute2 ``AsyncIPRoute``): one socket per owner, opened on first
use, one request at a time; no process is forked per change, and an error carries the
kernel's own message. The mobile node's link (a few changes per move) still drives ``ip``.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import socket
from collections.abc import Awaitable, Callable, Iterable

from pyroute2.netlink.rtnl import ndmsg

from daemons.runtime.log import EventLog
from daemons.runtime.rtnl import RouteError, Rtnl

log = EventLog("mipvpn.routing")

RTPROT_STATIC = 4  # `proto static`
RT_SCOPE_LINK = 253
MAIN_TABLE = 254
_USABLE_NEIGHBOUR = ~(ndmsg.NUD_INCOMPLETE | ndmsg.NUD_FAILED | ndmsg.NUD_NONE)


async def ip(*args: str, check: bool = True) -> str:
    proc = await asyncio.create_subprocess_exec("ip", *args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    if check and proc.returncode != 0:
        raise RouteError(f"ip {' '.join(args)}: {err.decode().strip()}")
    return out.decode()


async def converge(present: Iterable[str], wanted: Iterable[str], add: Callable[[str], Awaitable[None]],
                   remove: Callable[[str], Awaitable[None]]) -> None:
    """After a restart: ``remove`` what is there but not wanted, then ``add`` what is wanted but missing."""
    have, want = set(present), set(wanted)
    for stray in have - want:
        await remove(stray)
    for missing in want - have:
        await add(missing)


def _missing(exc: RouteError) -> bool:
    return os.strerror(errno.ESRCH) in str(exc) or os.strerror(errno.ENOENT) in str(exc)


class HomeLink:
    """The home agent's side of the home link: a proxy-ARP entry per away mobile node, so
    that hosts on the home link hand the HA the packets for that home address
    (RFC 5944 §4.6)."""

    def __init__(self, interface: str, netns: str | None = None) -> None:
        self.interface = interface
        self.nl = Rtnl(netns)

    async def intercept(self, hoa: str) -> None:
        index = await self.nl.ifindex(self.interface)
        await self.nl.call(f"proxy {hoa} dev {self.interface}", "neigh", "replace", dst=hoa, ifindex=index,
                           flags=ndmsg.NTF_PROXY, family=socket.AF_INET)

    async def release(self, hoa: str) -> None:
        index = await self.nl.ifindex(self.interface)
        try:
            await self.nl.call(f"proxy {hoa} dev {self.interface}", "neigh", "del", dst=hoa, ifindex=index,
                               flags=ndmsg.NTF_PROXY, family=socket.AF_INET)
        except RouteError as exc:
            if not _missing(exc):
                raise

    async def reconcile(self, hoas: list[str]) -> None:
        index = await self.nl.ifindex(self.interface)
        present = [m.get("dst") for m in await self.nl.neighbours_proxied() if m["ifindex"] == index]
        await converge((p for p in present if p), hoas, self.intercept, self.release)


class VisitorRoutes:
    """The foreign agent's host routes toward its visiting mobile nodes (RFC 5944 §4.2.2):
    the MN's home address is not on the access prefix, so without this route the FA would
    send the MN's packets back toward its home. ``HOA/32 dev ACCESS proto static scope link``
    in the main table, one per accepted visitor (``daemons.agents.fa``: never for a request
    that has not been accepted)."""

    def __init__(self, interface: str, netns: str | None = None) -> None:
        self.interface = interface
        self.nl = Rtnl(netns)

    async def add(self, hoa: str) -> None:
        index = await self.nl.ifindex(self.interface)
        await self.nl.call(f"route {hoa}/32 dev {self.interface}", "route", "replace", dst=f"{hoa}/32", oif=index,
                           proto=RTPROT_STATIC, scope=RT_SCOPE_LINK, table=MAIN_TABLE)

    async def remove(self, hoa: str) -> None:
        index = await self.nl.ifindex(self.interface)
        try:
            await self.nl.call(f"route {hoa}/32 dev {self.interface}", "route", "del", dst=f"{hoa}/32", oif=index,
                               scope=RT_SCOPE_LINK, table=MAIN_TABLE)
        except RouteError as exc:
            if not _missing(exc):
                raise

    async def present(self) -> list[str]:
        """The home addresses we hold a host route for (ours: /32, on the access link, proto static)."""
        index = await self.nl.ifindex(self.interface)
        routes = await self.nl.call("routes", "route", "dump", family=socket.AF_INET)
        return [r.get("dst") for r in routes
                if r["dst_len"] == 32 and r.get("oif") == index and r["proto"] == RTPROT_STATIC
                and r.get("table") == MAIN_TABLE and r.get("dst")]

    async def reconcile(self, hoas: list[str]) -> None:
        await converge(await self.present(), hoas, self.add, self.remove)

    async def neighbour(self, address: str) -> str | None:
        """The link-layer address the kernel holds for ``address`` on the access link, if any
        (learnt from the MN's own ARP request for our address, which it sent before its RRQ)."""
        try:
            index = await self.nl.ifindex(self.interface)
            entries = await self.nl.call(f"neighbour {address}", "neigh", "get", dst=address, ifindex=index,
                                         family=socket.AF_INET)
        except RouteError:  # none (ENOENT), or no answer: the record just lacks it
            return None
        return next((e.get("lladdr") for e in entries if e["state"] & _USABLE_NEIGHBOUR and e.get("lladdr")), None)


class MobileNodeLink:
    """The mobile node's own interface: its home address and its default router."""

    def __init__(self, interface: str, home_address: str, home_prefixlen: int) -> None:
        self.interface = interface
        self.home_address = home_address
        self.home_prefixlen = home_prefixlen

    async def away(self, agent: str) -> None:
        """Away from home: home address as a /32, the foreign agent as default router
        (it is not on any prefix of ours, hence onlink)."""
        await ip("addr", "replace", f"{self.home_address}/32", "dev", self.interface)
        await ip("addr", "del", f"{self.home_address}/{self.home_prefixlen}", "dev", self.interface, check=False)
        await ip("route", "replace", "default", "via", agent, "dev", self.interface, "onlink")

    async def home(self, router: str) -> None:
        await ip("addr", "replace", f"{self.home_address}/{self.home_prefixlen}", "dev", self.interface)
        await ip("addr", "del", f"{self.home_address}/32", "dev", self.interface, check=False)
        await ip("route", "replace", "default", "via", router, "dev", self.interface)

    async def carrier(self) -> bool:
        out = await ip("-j", "link", "show", "dev", self.interface)
        flags = json.loads(out)[0].get("flags", [])
        return "LOWER_UP" in flags

