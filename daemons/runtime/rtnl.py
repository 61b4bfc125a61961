"""One rtnetlink socket (pyroute2 ``AsyncIPRoute``) per owner of routes, rules or neighbour
entries: opened on first use, one request at a time, errors carrying the kernel's message.
Used by the agents' routes (``daemons.agents.routing``) and the FA's access guard
(``daemons.vpn.access``)."""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

from pyroute2 import AsyncIPRoute
from pyroute2.netlink import NLM_F_DUMP, NLM_F_REQUEST
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import RTM_GETNEIGH, ndmsg


class RouteError(RuntimeError):
    pass


class Rtnl:
    """One rtnetlink socket in ``netns`` (None: ours), opened on first use; requests one at a
    time. Failures raise ``error`` (default :class:`RouteError`) naming what was asked and the
    kernel's answer."""

    def __init__(self, netns: str | None = None, error: type[Exception] = RouteError) -> None:
        self.netns = netns
        self.error = error
        self._ipr: Any = None
        self._lock = asyncio.Lock()
        self._ifindex: dict[str, int] = {}

    def _socket(self) -> Any:
        if self._ipr is None:
            # flags=0: never create a missing namespace (pyroute2 would, silently).
            self._ipr = AsyncIPRoute(netns=self.netns, flags=0) if self.netns else AsyncIPRoute()
        return self._ipr

    async def call(self, what: str, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """``ipr.METHOD(*args, **kwargs)``, a dump read to the end."""
        async with self._lock:
            try:
                result = await getattr(self._socket(), method)(*args, **kwargs)
                if hasattr(result, "__aiter__"):
                    return [msg async for msg in result]
                return list(result)
            except NetlinkError as exc:
                raise self.error(f"{what}: {os.strerror(exc.code) if exc.code else exc}") from None

    async def neighbours_proxied(self) -> list[Any]:
        """The proxy-ARP entries (a dump with NTF_PROXY in the request, as ``ip neigh show proxy``)."""
        msg = ndmsg.ndmsg()
        msg["family"] = socket.AF_INET
        msg["flags"] = ndmsg.NTF_PROXY
        async with self._lock:
            try:
                result = await self._socket().nlm_request(msg, RTM_GETNEIGH, NLM_F_REQUEST | NLM_F_DUMP)
                return [m async for m in result]
            except NetlinkError as exc:
                raise self.error(f"proxy neighbours: {os.strerror(exc.code)}") from None

    async def ifindex(self, name: str) -> int:
        if name not in self._ifindex:
            found = await self.call(f"interface {name}", "link_lookup", ifname=name)
            if not found:
                raise self.error(f"no interface {name}")
            self._ifindex[name] = found[0]
        return self._ifindex[name]

    def close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None


__all__ = ["RouteError", "Rtnl"]
