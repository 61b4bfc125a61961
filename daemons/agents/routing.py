"""Routes, addresses and neighbour entries a Mobile IP agent or node owns.

Each class changes only what it owns, so it can reconcile after a restart. It drives
``ip`` (iproute2) from asyncio: one short command per change, and an error carries the
kernel's own message.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterable

from daemons.runtime.log import EventLog

log = EventLog("mipvpn.routing")


class RouteError(RuntimeError):
    pass


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


class HomeLink:
    """The home agent's side of the home link: a proxy-ARP entry per away mobile node, so
    that hosts on the home link hand the HA the packets for that home address
    (RFC 5944 §4.6)."""

    def __init__(self, interface: str) -> None:
        self.interface = interface

    async def intercept(self, hoa: str) -> None:
        await ip("neigh", "replace", "proxy", hoa, "dev", self.interface)

    async def release(self, hoa: str) -> None:
        await ip("neigh", "del", "proxy", hoa, "dev", self.interface, check=False)

    async def reconcile(self, hoas: list[str]) -> None:
        out = await ip("-j", "neigh", "show", "proxy", "dev", self.interface)
        await converge((entry["dst"] for entry in json.loads(out or "[]")), hoas, self.intercept, self.release)


class VisitorRoutes:
    """The foreign agent's host routes toward its visiting mobile nodes (RFC 5944 §4.2.2):
    the MN's home address is not on the access prefix, so without this route the FA would
    send the MN's packets back toward its home."""

    def __init__(self, interface: str) -> None:
        self.interface = interface

    async def add(self, hoa: str) -> None:
        await ip("route", "replace", f"{hoa}/32", "dev", self.interface, "proto", "static")

    async def remove(self, hoa: str) -> None:
        await ip("route", "del", f"{hoa}/32", "dev", self.interface, check=False)

    async def reconcile(self, hoas: list[str]) -> None:
        out = await ip("-j", "route", "show", "dev", self.interface, "proto", "static")
        await converge((r["dst"] for r in json.loads(out or "[]") if "/" not in r["dst"]), hoas, self.add, self.remove)


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


class AccessGuard:
    """VPN-only access at an FA (route-based backends, ``Capability.ROUTE_BASED``, e.g.
    strongswan): nothing that arrives on the access segment is forwarded in clear. Each
    visitor's traffic is steered into the tunnel by a per-user rule (pref 900,
    daemons/vpn/strongswan/routes.py); whatever no rule claims — a
    visitor whose path is not up yet, during a handover — hits this blackhole instead of
    leaving toward the core unencrypted. Traffic to the FA itself is local and unaffected.
    """

    TABLE = "224"
    PREF = "990"

    def __init__(self, interface: str) -> None:
        self.interface = interface

    async def install(self) -> None:
        await ip("route", "replace", "blackhole", "default", "table", self.TABLE)
        out = await ip("-j", "rule", "show", "pref", self.PREF)
        if not json.loads(out or "[]"):
            await ip("rule", "add", "iif", self.interface, "lookup", self.TABLE, "pref", self.PREF)
