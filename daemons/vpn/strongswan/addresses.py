"""The addresses and ip rules a node must own for kernel-libipsec (the FA recipe).

kernel-libipsec only installs an outbound policy if the gateway owns an address inside its
local traffic selector ("unable to install IPsec policies (SPD)" otherwise), and routes the
remote selector into table 220 with that address as ``src``.  HA and CN-GW normally own an
address inside the prefix they protect (home link / LAN address) and need nothing.  An FA,
whose local selector is the MN's home address, does (:func:`prepare_local_selector`): the home
address as a /32 on ``lo``; the ``local`` rule moved behind a rule that sends traffic *to* the
home address out of the access interface; ``accept_local=1`` and ``arp_ignore=1`` there.
:func:`release_local_selector` gives an address back when no path needs it any more.

None of this is needed with a kernel that has ESP (the xfrm backend).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import subprocess

from daemons.vpn.path import PathError
from daemons.vpn.strongswan.routes import Rule, iproute, rule_from_msg, rule_kwargs

ACCESS_TABLE = 223  # FA recipe: `HOA dev ACCESS`
ACCESS_RULE_PREF = 50
LOCAL_RULE_PREF = 100


def _sysctl(netns: str | None, key: str, value: str) -> None:
    cmd = ["sysctl", "-qw", f"{key}={value}"]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    subprocess.run(cmd, check=True, capture_output=True)


def _prepare_local_selector_sync(
    netns: str | None, address: str, access_ifname: str, table: int
) -> None:
    addr = ipaddress.IPv4Address(address)
    ipr = iproute(netns)
    try:
        lo = ipr.link_lookup(ifname="lo")[0]
        acc = ipr.link_lookup(ifname=access_ifname)
        if not acc:
            raise PathError(f"no interface {access_ifname}")
        acc_idx = acc[0]
        have = {(a.get("address"), a["prefixlen"]) for a in ipr.get_addr(index=lo, family=2)}
        if (str(addr), 32) not in have:
            ipr.addr("add", index=lo, address=str(addr), prefixlen=32)
        rules = [rule_from_msg(r) for r in ipr.get_rules(family=socket.AF_INET)]
        if not any(r.pref == LOCAL_RULE_PREF and r.table == 255 for r in rules):
            ipr.rule("add", priority=LOCAL_RULE_PREF, table=255, family=socket.AF_INET)
        if any(r.pref == 0 and r.table == 255 for r in rules):
            ipr.rule("del", priority=0, table=255, family=socket.AF_INET)
        ipr.route("replace", dst=f"{addr}/32", oif=acc_idx, table=table)
        hoa_rule = Rule(ACCESS_RULE_PREF, table, None, ipaddress.IPv4Network(f"{addr}/32"))
        if hoa_rule not in rules:
            ipr.rule("add", **rule_kwargs(hoa_rule))
    finally:
        ipr.close()
    _sysctl(netns, f"net.ipv4.conf.{access_ifname}.accept_local", "1")
    _sysctl(netns, f"net.ipv4.conf.{access_ifname}.arp_ignore", "1")


async def prepare_local_selector(
    netns: str | None, address: str, access_ifname: str, table: int = ACCESS_TABLE
) -> None:
    """FA recipe for kernel-libipsec: make the node own ``address`` (the MN's home address,
    the FA-side local traffic selector) without stealing the MN's traffic.

    Needed on any node whose local traffic selector contains none of its own addresses
    (typically the FA, local selector = MN home address/32) and only with the strongswan
    backend on kernels without ESP (kernel-libipsec refuses to install the outbound policy
    otherwise).  HA and CN-GW normally own an address inside the prefix they protect (home
    link / LAN address) and need nothing.  Idempotent.  Does: ``address/32`` on ``lo``; the
    ``local`` rule moved from pref 0 to 100; ``to address lookup TABLE`` at pref 50 with
    ``address dev ACCESS`` in TABLE; ``accept_local=1``, ``arp_ignore=1`` on ACCESS.
    """
    await asyncio.to_thread(_prepare_local_selector_sync, netns, address, access_ifname, table)


def _release_local_selector_sync(netns: str | None, address: str, table: int) -> None:
    addr = ipaddress.IPv4Address(address)
    ipr = iproute(netns)
    try:
        lo = ipr.link_lookup(ifname="lo")[0]
        with contextlib.suppress(Exception):
            ipr.addr("del", index=lo, address=str(addr), prefixlen=32)
        with contextlib.suppress(Exception):
            ipr.route("del", dst=f"{addr}/32", table=table)
        hoa_rule = Rule(ACCESS_RULE_PREF, table, None, ipaddress.IPv4Network(f"{addr}/32"))
        with contextlib.suppress(Exception):
            ipr.rule("del", **rule_kwargs(hoa_rule))
    finally:
        ipr.close()


async def release_local_selector(
    netns: str | None, address: str, table: int = ACCESS_TABLE
) -> None:
    """Undo :func:`prepare_local_selector` for one address (the node-wide ``local`` rule move
    and the sysctls stay; they are harmless)."""
    await asyncio.to_thread(_release_local_selector_sync, netns, address, table)
