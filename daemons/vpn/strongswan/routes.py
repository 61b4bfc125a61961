"""Routing cleartext into ``ipsec0``: kernel-libipsec's TUN device carries ESP in user space.

With kernel-libipsec the kernel's policy lookup does not steer packets into a tunnel (there is
no kernel ESP): whatever is routed into ``ipsec0`` is, and charon's own ``lookup 220`` rule
would send everything matching table 220 there, the node's own traffic included when a remote
selector is 0.0.0.0/0.  So that rule is deleted after charon starts
(:meth:`TunRouting.delete_charon_rules`) and the backend routes into ``ipsec0`` itself:

* FA-like nodes (local endpoint an FA, :func:`route_mode` ``source``): a rule per user *from*
  the local selectors (to the remote ones) into table 222, which holds ``default dev ipsec0``.
* HA and CN-GW-like nodes (``destination``): destination routes for the remote selectors in
  table 221, with a rule per (local, remote) selector pair ``lookup 221`` — only the protected
  traffic, the gateway's own traffic to the same destinations keeps its normal route.
* When a remote selector covers the peer gateway's own address, ``to PEER lookup main`` at pref
  800 keeps IKE and ESP-in-UDP to the peer on the ordinary route.

Each path needs a few routes and rules (:func:`path_routing`); paths with the same selectors
(make-before-break, many users of one network) share them, so :class:`TunRouting` counts
how many installed paths need each and touches the kernel only when a count goes from or to
zero: adding or removing a path is O(1) in the paths already there.  Routes into ``ipsec0``
vanish when charon restarts (new TUN): ``sync(paths, rescan=True)`` after a restart makes the
kernel exactly what the whole path set needs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ipaddress
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from daemons.vpn.path import EndpointType, PathError, VpnPath

T = TypeVar("T")

TUN_IFNAME = "ipsec0"
CHARON_TABLE = 220  # charon's own routing table (rule deleted after start)
DEST_TABLE = 221  # destination routes into ipsec0 (HA / CN-GW-like nodes)
SRC_TABLE = 222  # `default dev ipsec0`, used by per-user source rules (FA-like nodes)
SRC_RULE_PREF = 900  # .. 964: + (64 - src_len - dst_len), see rule_pref
BYPASS_RULE_PREF = 800  # `to PEER lookup main`: the tunnel never swallows packets to its own peer
MAIN_TABLE = 254
DEST_RULE_PREF = 1000  # .. 1064


def iproute(netns: str | None) -> Any:
    """A pyroute2 IPRoute in ``netns`` (None: this namespace); the caller closes it."""
    from pyroute2 import IPRoute

    return IPRoute(netns=netns) if netns else IPRoute()


@dataclass(frozen=True)
class Route:
    table: int
    dst: ipaddress.IPv4Network


@dataclass(frozen=True)
class Rule:
    pref: int
    table: int
    src: ipaddress.IPv4Network | None = None
    dst: ipaddress.IPv4Network | None = None


def rule_pref(base: int, src: ipaddress.IPv4Network, dst: ipaddress.IPv4Network) -> int:
    """More specific selectors get a smaller pref (looked up first), and two rules that differ
    in specificity never share a pref: the kernel's duplicate check on RTM_NEWRULE (EXCL)
    compares only the selectors the *new* rule sets, so ``to H lookup T`` next to an existing
    ``from S to H lookup T`` at the same pref fails with EEXIST (seen: an FA-HA anchor with
    local 0/0 next to a correspondent path with local S, at a destination-mode node)."""
    return base + 64 - src.prefixlen - dst.prefixlen


def rule_kwargs(rule: Rule) -> dict[str, Any]:
    """pyroute2 ``rule(...)`` arguments for ``rule``."""
    kw: dict[str, Any] = {"priority": rule.pref, "table": rule.table, "family": socket.AF_INET}
    if rule.src is not None and rule.src.prefixlen:
        kw.update(src=str(rule.src.network_address), src_len=rule.src.prefixlen)
    if rule.dst is not None and rule.dst.prefixlen:
        kw.update(dst=str(rule.dst.network_address), dst_len=rule.dst.prefixlen)
    return kw


def rule_from_msg(msg: Any) -> Rule:
    """A :class:`Rule` from a pyroute2 rule message."""
    def net(key: str) -> ipaddress.IPv4Network | None:
        addr = msg.get(key)
        plen = msg[f"{key}_len"]
        return ipaddress.IPv4Network(f"{addr}/{plen}") if addr and plen else None

    return Rule(msg.get("priority") or 0, msg.get("table"), net("src"), net("dst"))


def route_mode(path: VpnPath) -> str:
    """'source' at FA-like nodes (per-user rule by source), 'destination' elsewhere."""
    return "source" if path.local.type is EndpointType.FA else "destination"


def path_routing(p: VpnPath) -> tuple[set[Route], set[Rule]]:
    """The routes and rules into ``ipsec0`` that one path needs (pure)."""
    routes: set[Route] = set()
    rules: set[Rule] = set()
    # When the remote selector covers the peer gateway's own address (a CN-GW
    # protecting the home prefix that holds the HA's address), IKE and ESP-in-UDP to
    # the peer must still take the ordinary route, not the tunnel they build.
    if any(p.remote.address in d for d in p.remote_ts):
        rules.add(Rule(BYPASS_RULE_PREF, MAIN_TABLE, None, ipaddress.IPv4Network(f"{p.remote.address}/32")))
    if route_mode(p) == "source":
        routes.add(Route(SRC_TABLE, ipaddress.IPv4Network("0.0.0.0/0")))
        for s in p.local_ts:
            for d in p.remote_ts:
                rules.add(Rule(rule_pref(SRC_RULE_PREF, s, d), SRC_TABLE, s if s.prefixlen else None,
                               d if d.prefixlen else None))
    else:
        # Only the protected traffic (from the local selectors to the remote ones):
        # the gateway's own traffic to the same destinations keeps its normal route.
        for d in p.remote_ts:
            routes.add(Route(DEST_TABLE, d))
            for s in p.local_ts:
                rules.add(Rule(rule_pref(DEST_RULE_PREF, s, d), DEST_TABLE, s if s.prefixlen else None,
                               d if d.prefixlen else None))
    return routes, rules


def wanted_routing(paths: Iterable[VpnPath]) -> tuple[set[Route], set[Rule]]:
    """The routes and rules into ``ipsec0`` that ``paths`` need together (pure)."""
    routes: set[Route] = set()
    rules: set[Rule] = set()
    for p in paths:
        r, u = path_routing(p)
        routes |= r
        rules |= u
    return routes, rules


def scan_routing(ipr: Any) -> tuple[set[Route], set[Rule]]:
    """The routes and rules of ours the kernel holds (tables 221/222, our rule pref bands)."""
    routes: set[Route] = set()
    for table in (SRC_TABLE, DEST_TABLE):
        for r in ipr.get_routes(family=socket.AF_INET, table=table):
            if r.get("table") != table:
                continue
            dst = r.get("dst") or "0.0.0.0"
            routes.add(Route(table, ipaddress.IPv4Network(f"{dst}/{r['dst_len']}")))
    rules = {
        rule
        for rule in (rule_from_msg(m) for m in ipr.get_rules(family=socket.AF_INET))
        if (rule.table == SRC_TABLE and SRC_RULE_PREF <= rule.pref <= SRC_RULE_PREF + 64)
        or (rule.table == DEST_TABLE and DEST_RULE_PREF <= rule.pref <= DEST_RULE_PREF + 64)
        or (rule.table == MAIN_TABLE and rule.pref == BYPASS_RULE_PREF)
    }
    return routes, rules


class TunRouting:
    """The node's routes and rules into ``ipsec0``, on one rtnetlink socket and worker thread.

    What each installed path needs is kept by path id (``_needs``) with a count per route and
    rule (``_count``); the kernel holds exactly the routes and rules counted."""

    def __init__(self, node: str, netns: str | None, tun_ifname: str = TUN_IFNAME) -> None:
        self.node = node
        self.netns = netns
        self.tun_ifname = tun_ifname
        self._needs: dict[str, frozenset[Route | Rule]] = {}
        self._count: dict[Route | Rule, int] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(1, f"nl-{node}")
        self._ipr: Any = None

    def _nl_sync(self, fn: Callable[[Any], T]) -> T:
        if self._ipr is None:
            self._ipr = iproute(self.netns)
        return fn(self._ipr)

    async def _nl(self, fn: Callable[[Any], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._nl_sync, fn)

    async def tun_present(self) -> bool:
        """Does ``ipsec0`` exist (charon's kernel-libipsec is up)?"""
        return await self._nl(lambda ipr: bool(ipr.link_lookup(ifname=self.tun_ifname)))

    async def delete_charon_rules(self) -> int:
        """Delete charon's ``lookup 220`` rules (after every charon start); returns how many."""
        def run(ipr: Any) -> int:
            n = 0
            for msg in ipr.get_rules(family=socket.AF_INET):
                r = rule_from_msg(msg)
                if r.table == CHARON_TABLE:
                    ipr.rule("del", **rule_kwargs(r))
                    n += 1
            return n

        return await self._nl(run)

    def _count_in(self, items: Iterable[Route | Rule]) -> list[Route | Rule]:
        """Count ``items`` once more; those needed for the first time."""
        first = []
        for item in items:
            self._count[item] = self._count.get(item, 0) + 1
            if self._count[item] == 1:
                first.append(item)
        return first

    def _count_out(self, items: Iterable[Route | Rule]) -> list[Route | Rule]:
        """Count ``items`` once less; those no longer needed."""
        last = []
        for item in items:
            self._count[item] -= 1
            if not self._count[item]:
                del self._count[item]
                last.append(item)
        return last

    async def add(self, path: VpnPath) -> None:
        """Route ``path`` into ``ipsec0`` (replacing what a path of the same id needed: what
        the new one needs goes in first)."""
        routes, rules = path_routing(path)
        needs = frozenset((*routes, *rules))
        old = self._needs.get(path.id, frozenset())
        self._needs[path.id] = needs
        new, gone = self._count_in(needs), self._count_out(old)
        try:
            await self._apply(new, gone)
        except BaseException:
            self._count_out(needs)
            self._count_in(old)
            self._needs[path.id] = old
            raise

    async def remove(self, path_id: str) -> None:
        """Take a path's routes and rules out (those no other path needs)."""
        gone = self._count_out(self._needs.pop(path_id, frozenset()))
        await self._apply([], gone)

    async def _apply(self, new: list[Route | Rule], gone: list[Route | Rule]) -> None:
        if not new and not gone:
            return

        def run(ipr: Any) -> None:
            tun = ipr.link_lookup(ifname=self.tun_ifname)
            if not tun and any(isinstance(i, Route) for i in new):
                raise PathError(f"{self.node}: no {self.tun_ifname} (is charon running?)")
            for item in [i for i in new if isinstance(i, Route)] + [i for i in new if isinstance(i, Rule)]:
                if isinstance(item, Route):
                    ipr.route("replace", dst=str(item.dst), oif=tun[0], table=item.table)
                else:
                    ipr.rule("add", **rule_kwargs(item))
            for item in [i for i in gone if isinstance(i, Rule)] + [i for i in gone if isinstance(i, Route)]:
                with contextlib.suppress(Exception):  # already gone (e.g. with the TUN device)
                    if isinstance(item, Route):
                        ipr.route("del", dst=str(item.dst), table=item.table)
                    else:
                        ipr.rule("del", **rule_kwargs(item))

        await self._nl(run)

    async def sync(self, paths: Iterable[VpnPath], rescan: bool = False) -> None:
        """Make the routes and rules into ``ipsec0`` exactly what ``paths`` need (the whole
        set: at start and after a charon restart).  ``rescan``: read what the kernel holds
        first (after a restart of ours or of charon)."""
        held = set(self._count)
        self._needs = {}
        self._count = {}
        for p in paths:
            routes, rules = path_routing(p)
            self._needs[p.id] = frozenset((*routes, *rules))
            self._count_in(self._needs[p.id])
        want_routes = {i for i in self._count if isinstance(i, Route)}
        want_rules = {i for i in self._count if isinstance(i, Rule)}

        def run(ipr: Any) -> None:
            if rescan:
                have_routes, have_rules = scan_routing(ipr)
            else:
                have_routes = {i for i in held if isinstance(i, Route)}
                have_rules = {i for i in held if isinstance(i, Rule)}
            tun = ipr.link_lookup(ifname=self.tun_ifname)
            if not tun and (want_routes - have_routes):
                raise PathError(f"{self.node}: no {self.tun_ifname} (is charon running?)")
            for rule in have_rules - want_rules:
                with contextlib.suppress(Exception):
                    ipr.rule("del", **rule_kwargs(rule))
            for route in have_routes - want_routes:
                with contextlib.suppress(Exception):
                    ipr.route("del", dst=str(route.dst), table=route.table)
            for route in want_routes - have_routes:
                ipr.route("replace", dst=str(route.dst), oif=tun[0], table=route.table)
            for rule in want_rules - have_rules:
                ipr.rule("add", **rule_kwargs(rule))

        await self._nl(run)

    async def close(self) -> None:
        """Close the rtnetlink socket and let the worker thread go (routes stay)."""
        def close_ipr() -> None:
            if self._ipr is not None:
                self._ipr.close()
                self._ipr = None

        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._pool, close_ipr)
        self._pool.shutdown(wait=False)
