"""VPN-only access at an FA (daemons/vpn/access.py and each backend's guard_* operations).

Pure: the xfrm guard's BLOCK policies and their NETLINK_XFRM encoding.  Against this machine's
kernel, in three scratch namespaces ``mipvpn-t-ag<pid>-{mn,fa,core}`` (removed whatever
happens): an "MN" sending from its home address through an "FA" that forwards to a "core".
Policies work without kernel ESP, so what the guard drops (and what a more preferred policy
takes instead) shows here; that the visitor's traffic leaves in ESP once its path is up is
the kernel tier's (tests/kernel/test_guard_xfrm.py).
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemons.vpn.access import AccessGuard
from daemons.vpn.strongswan.backend import StrongswanBackend
from daemons.vpn.xfrm.backend import GUARD_PRIORITY, PRIORITY_BASE, XfrmBackend, guard_policies, is_guard_policy
from daemons.wire import xfrm as xn
from daemons.wire.xfrm import Policy, Selector, Tmpl

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")
HOA, HOA2, FA_ACCESS, FA_CORE, CORE = "198.18.100.10", "198.18.100.11", "198.18.101.1", "198.18.0.14", "198.18.0.13"


# ---- pure -----------------------------------------------------------------------------------------


def test_guard_policies_block_everything_from_the_home_address_below_every_path() -> None:
    pols = guard_policies(HOA)
    assert [(str(p.selector.src), str(p.selector.dst)) for p in pols] == \
        [(f"{HOA}/32", "0.0.0.0/1"), (f"{HOA}/32", "128.0.0.0/1")]
    assert all(p.dir == "out" and p.action == "block" and not p.tmpls for p in pols)
    # lower number = preferred: every path policy (PRIORITY_BASE + 0..64) wins over the guard
    assert all(p.priority == GUARD_PRIORITY > PRIORITY_BASE + 64 for p in pols)
    assert all(is_guard_policy(p) for p in pols)
    # not the path to the HA's own selector (HOA/32 -> any): the kernel keys policies by selector
    path_out = Policy(Selector.of(f"{HOA}/32", "0.0.0.0/0"), "out", (Tmpl("198.18.0.1", "198.18.0.2", reqid=1),),
                      priority=PRIORITY_BASE + 32)
    assert not is_guard_policy(path_out) and all(p.selector != path_out.selector for p in pols)
    assert not is_guard_policy(Policy(pols[0].selector, "fwd", (), priority=GUARD_PRIORITY, action="block"))


def test_guard_policy_message_encoding_round_trip() -> None:
    for pol, half in zip(guard_policies(HOA), ("0.0.0.0", "128.0.0.0"), strict=True):
        data = xn.encode_message(xn.XFRM_MSG_NEWPOLICY, xn.policy_to_msg(pol))
        assert len(data) == 16 + 168  # nlmsghdr + xfrm_userpolicy_info, no template attribute
        # read back by hand (struct xfrm_userpolicy_info, x86-64), not by our codec
        info = data[16:]
        assert info[0:4] == ipaddress.IPv4Address(half).packed  # sel.daddr
        assert info[16:20] == ipaddress.IPv4Address(HOA).packed  # sel.saddr
        assert int.from_bytes(info[40:42], "little") == 2 and (info[42], info[43], info[44]) == (1, 32, 0)
        assert info[152:156] == GUARD_PRIORITY.to_bytes(4, "little")  # priority
        assert (info[160], info[161]) == (xn.POLICY_DIRS["out"], xn.XFRM_POLICY_BLOCK)  # dir, action
        back = xn.policy_from_msg(xn.decode_message(data))
        assert back == pol and is_guard_policy(back)


# ---- against the kernel ----------------------------------------------------------------------------


def sh(*cmd: str, check: bool = True) -> str:
    return subprocess.run(cmd, check=check, capture_output=True, text=True).stdout


@pytest.fixture
def nets() -> Iterator[tuple[str, str, str]]:
    mn, fa, core = (f"mipvpn-t-ag{os.getpid()}-{n}" for n in ("mn", "fa", "core"))
    try:
        for ns in (mn, fa, core):
            sh("ip", "netns", "add", ns)
        sh("ip", "-n", fa, "link", "add", "access", "type", "veth", "peer", "name", "eth0", "netns", mn)
        sh("ip", "-n", fa, "link", "add", "core", "type", "veth", "peer", "name", "fa", "netns", core)
        sh("ip", "-n", fa, "addr", "add", f"{FA_ACCESS}/24", "dev", "access")
        sh("ip", "-n", fa, "addr", "add", f"{FA_CORE}/30", "dev", "core")
        sh("ip", "-n", core, "addr", "add", f"{CORE}/30", "dev", "fa")
        sh("ip", "-n", mn, "addr", "add", f"{HOA}/32", "dev", "eth0")
        sh("ip", "-n", mn, "addr", "add", f"{HOA2}/32", "dev", "eth0")
        for ns, devs in ((mn, ("lo", "eth0")), (fa, ("lo", "access", "core")), (core, ("lo", "fa"))):
            for dev in devs:
                sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", mn, "route", "add", "default", "via", FA_ACCESS, "dev", "eth0", "onlink")
        sh("ip", "-n", fa, "route", "add", f"{HOA}/32", "dev", "access")  # the visitor routes
        sh("ip", "-n", fa, "route", "add", f"{HOA2}/32", "dev", "access")
        sh("ip", "-n", core, "route", "add", "198.18.100.0/24", "via", FA_CORE)
        sh("ip", "netns", "exec", fa, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        yield mn, fa, core
    finally:
        for ns in (mn, fa, core):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def forwarded(mn: str, src: str) -> bool:
    """Does a ping from ``src`` reach the core through the FA (and its answer come back)?"""
    return subprocess.run(["ip", "netns", "exec", mn, "ping", "-c", "1", "-W", "1", "-I", src, CORE],
                          capture_output=True).returncode == 0


def rules(ns: str, pref: int) -> list[str]:
    return [r for r in sh("ip", "-n", ns, "rule").splitlines() if r.startswith(f"{pref}:")]


def block_policies(ns: str) -> list[tuple[str, str, str, int]]:
    """The BLOCK policies as iproute2 (an independent decoder) reads them."""
    text = sh("ip", "-n", ns, "xfrm", "policy", "show")
    return sorted((src, dst, d, int(prio)) for src, dst, d, action, prio in
                  re.findall(r"src (\S+) dst (\S+)\s+dir (\S+) action (\S+) priority (\d+)", text)
                  if action == "block")


@needs_root
def test_xfrm_guard_drops_a_visitor_until_a_path_takes_it(nets: tuple[str, str, str]) -> None:
    mn, fa, _ = nets
    assert forwarded(mn, HOA)  # no guard: the FA forwards the visitor's traffic in clear

    async def main() -> None:
        backend = XfrmBackend("fa", fa)
        try:
            await backend.guard_access("access", [])
            await backend.guard_access("access", [])  # idempotent
            assert rules(fa, AccessGuard.PREF) == ["990:\tfrom all iif access lookup 224"]
            assert [r.split(" proto")[0] for r in sh("ip", "-n", fa, "route", "show", "table", "224").splitlines()] \
                == ["blackhole default"]
            assert not forwarded(mn, HOA)  # a host the FA has not taken in: blackholed

            await backend.guard_visitor(HOA)
            await backend.guard_visitor(HOA)  # idempotent (a re-registration)
            assert rules(fa, AccessGuard.ADMIT_PREF) == [f"980:\tfrom {HOA} iif access lookup main"]
            assert not forwarded(mn, HOA)  # routed now, but no path takes it: the guard drops it
            assert block_policies(fa) == [(f"{HOA}/32", "0.0.0.0/1", "out", GUARD_PRIORITY),
                                          (f"{HOA}/32", "128.0.0.0/1", "out", GUARD_PRIORITY)]
            # A policy preferred over the guard (a path's priority) takes what it covers; a
            # template-less allow stands in for a path here (ESP SAs need the kernel tier).
            sh("ip", "-n", fa, "xfrm", "policy", "add", "src", f"{HOA}/32", "dst", f"{CORE}/32", "dir", "out",
               "priority", str(PRIORITY_BASE + 32))
            assert forwarded(mn, HOA)
            sh("ip", "-n", fa, "xfrm", "policy", "del", "src", f"{HOA}/32", "dst", f"{CORE}/32", "dir", "out")
            assert not forwarded(mn, HOA)

            await backend.reconcile([])  # paths only: the guards stay
            assert len(block_policies(fa)) == 2
            await backend.guard_access("access", [HOA2])  # after a restart: exactly the visitors held
            assert rules(fa, AccessGuard.ADMIT_PREF) == [f"980:\tfrom {HOA2} iif access lookup main"]
            assert {p[0] for p in block_policies(fa)} == {f"{HOA2}/32"}
            await backend.release_visitor(HOA2)
            await backend.release_visitor(HOA2)  # gone already: no error
            assert rules(fa, AccessGuard.ADMIT_PREF) == [] and block_policies(fa) == []
            assert not forwarded(mn, HOA2)  # blackholed again
            await backend.guard_visitor(HOA)
            await backend.flush()  # the guards go, the access segment's blackhole stays
            assert rules(fa, AccessGuard.ADMIT_PREF) == [] and block_policies(fa) == []
            assert rules(fa, AccessGuard.PREF) and not forwarded(mn, HOA)
        finally:
            await backend.close()

    asyncio.run(main())


@needs_root
def test_xfrm_guard_refuses_a_selector_another_policy_holds(nets: tuple[str, str, str]) -> None:
    _, fa, _ = nets
    sh("ip", "-n", fa, "xfrm", "policy", "add", "src", f"{HOA}/32", "dst", "128.0.0.0/1", "dir", "out")

    async def main() -> None:
        backend = XfrmBackend("fa", fa)
        try:
            with pytest.raises(Exception, match="selector already used"):
                await backend.guard_visitor(HOA)
            assert block_policies(fa) == []  # the half it had added is rolled back
        finally:
            await backend.close()

    asyncio.run(main())


@needs_root
def test_strongswan_guard_is_the_access_blackhole(nets: tuple[str, str, str], tmp_path: Path) -> None:
    mn, fa, _ = nets

    async def main() -> None:
        backend = StrongswanBackend("fa", tmp_path, fa)
        await backend.guard_access("access", [HOA])
        await backend.guard_access("access", [HOA])
        await backend.guard_visitor(HOA)  # nothing per visitor: its source rule comes with its path
        assert rules(fa, AccessGuard.PREF) == ["990:\tfrom all iif access lookup 224"]
        assert rules(fa, AccessGuard.ADMIT_PREF) == [] and block_policies(fa) == []
        await backend.release_visitor(HOA)

    asyncio.run(main())
    assert not forwarded(mn, HOA)
