"""NETLINK_XFRM against the running kernel: XfrmSocket, XfrmMonitor and probe_kernel_esp.

The tests need root (they create a scratch namespace ``mipvpn-t-xfrm-<pid>-<n>``, removed
whatever happens) and compare what our code writes with what ``ip xfrm`` reads, and vice versa.
SAs are checked natively only as far as this kernel allows (see ``probe_kernel_esp``); the full
SA + traffic test is in the VM tier (tests/kernel/test_xfrm_sa.py).  The message codec alone is
tested in tests/unit/test_xfrm_codec.py.
"""

from __future__ import annotations

import errno
import itertools
import os
import re
import subprocess
from collections.abc import Iterator

import pytest

from daemons.runtime.secret import Secret
from daemons.vpn.xfrm import netlink as xn
from daemons.vpn.xfrm.netlink import XfrmError, XfrmSocket
from daemons.wire.xfrm import SA, Policy, Selector, Tmpl, XfrmEvent

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, NETLINK_XFRM writes)")


def test_kernel_errors_name_the_operation_without_secrets() -> None:
    key = Secret(bytes.fromhex("00112233445566778899aabbccddeeff01020304"))
    sa = SA.gcm("198.18.0.1", "198.18.0.2", 0x1234, key)
    err = XfrmError(errno.ESRCH, f"add {sa.describe()}", "Requested type not found")
    assert str(err) == "add SA spi=0x00001234 198.18.0.1->198.18.0.2 failed: No such process " \
                       "(kernel: Requested type not found)"
    assert err.errno == errno.ESRCH
    assert "00112233" not in str(err) and "00112233" not in repr(err)



# --------------------------------------------------------------------------------------------
# against the running kernel

_counter = itertools.count()


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"mipvpn-t-xfrm-{os.getpid()}-{next(_counter)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture
def xs(netns: str) -> Iterator[XfrmSocket]:
    sock = XfrmSocket(netns)
    try:
        yield sock
    finally:
        sock.close()


def ip(netns: str, *args: str) -> str:
    return subprocess.run(["ip", "-n", netns, *args], check=True, capture_output=True, text=True).stdout


def ip_policies(netns: str) -> list[dict[str, object]]:
    """Parse `ip xfrm policy` text: one dict per policy (selector, dir, priority, tmpls)."""
    out = []
    for block in re.split(r"\n(?=src )", ip(netns, "xfrm", "policy").strip()):
        if not block:
            continue
        head = re.match(r"src (\S+) dst (\S+)", block)
        d = re.search(r"dir (\w+) priority (\d+)", block)
        assert head and d, block
        tmpls = re.findall(r"tmpl src (\S+) dst (\S+)\s+proto (\w+) reqid (\d+) mode (\w+)", block)
        out.append({"src": head[1], "dst": head[2], "dir": d[1], "priority": int(d[2]),
                    "tmpls": [(s, dd, p, int(r), m) for s, dd, p, r, m in tmpls]})
    return sorted(out, key=lambda p: (p["dir"], p["src"]))


def _policy_pair() -> tuple[Policy, Policy, Policy]:
    out = Policy(Selector.of("198.18.10.0/24", "198.18.20.0/24"), "out",
                 (Tmpl("198.18.0.1", "198.18.0.2", reqid=7),), priority=100)
    inb = Policy(Selector.of("198.18.20.0/24", "198.18.10.0/24"), "in",
                 (Tmpl("198.18.0.2", "198.18.0.1", reqid=8),), priority=200)
    fwd = Policy(Selector.of("198.18.20.0/24", "198.18.10.0/24"), "fwd",
                 (Tmpl("198.18.0.2", "198.18.0.1", reqid=8),), priority=200)
    return out, inb, fwd


@needs_root
def test_our_policies_as_ip_sees_them(netns: str, xs: XfrmSocket) -> None:
    out, inb, fwd = _policy_pair()
    for pol in (out, inb, fwd):
        xs.add_policy(pol)
    seen = ip_policies(netns)
    assert seen == sorted([
        {"src": "198.18.20.0/24", "dst": "198.18.10.0/24", "dir": "fwd", "priority": 200,
         "tmpls": [("198.18.0.2", "198.18.0.1", "esp", 8, "tunnel")]},
        {"src": "198.18.20.0/24", "dst": "198.18.10.0/24", "dir": "in", "priority": 200,
         "tmpls": [("198.18.0.2", "198.18.0.1", "esp", 8, "tunnel")]},
        {"src": "198.18.10.0/24", "dst": "198.18.20.0/24", "dir": "out", "priority": 100,
         "tmpls": [("198.18.0.1", "198.18.0.2", "esp", 7, "tunnel")]},
    ], key=lambda p: (p["dir"], p["src"]))
    # and our own dump/get agree (index is the kernel's)
    dumped = {p.dir: p for p in xs.dump_policies()}
    for pol in (out, inb, fwd):
        assert dumped[pol.dir] == Policy(pol.selector, pol.dir, pol.tmpls, pol.priority, index=dumped[pol.dir].index)
        assert xs.get_policy(pol.selector, pol.dir) == dumped[pol.dir]


@needs_root
def test_ip_policies_decoded_by_our_dump(netns: str, xs: XfrmSocket) -> None:
    ip(netns, "xfrm", "policy", "add", "src", "198.18.30.0/24", "dst", "198.18.40.0/25", "proto", "udp",
       "dport", "4789", "dir", "out", "priority", "77", "tmpl", "src", "198.18.1.1", "dst", "198.18.1.2",
       "proto", "esp", "reqid", "42", "mode", "tunnel")
    ip(netns, "xfrm", "policy", "add", "src", "198.18.40.0/25", "dst", "198.18.30.0/24", "dir", "in",
       "priority", "78", "mark", "0x10", "mask", "0xff",
       "tmpl", "src", "198.18.1.2", "dst", "198.18.1.1", "proto", "esp", "reqid", "43", "mode", "tunnel",
       "tmpl", "src", "198.18.1.2", "dst", "198.18.1.3", "proto", "esp", "reqid", "44", "mode", "tunnel",
       "level", "use")
    ip(netns, "xfrm", "policy", "add", "src", "198.18.50.1/32", "dst", "198.18.50.2/32", "dir", "out",
       "action", "block")
    got = {(p.dir, str(p.selector.src)): p for p in xs.dump_policies()}
    assert len(got) == 3
    a = got[("out", "198.18.30.0/24")]
    assert a.selector == Selector.of("198.18.30.0/24", "198.18.40.0/25", proto=17, dport=4789)
    assert a.priority == 77 and a.action == "allow" and a.mark is None
    assert a.tmpls == (Tmpl("198.18.1.1", "198.18.1.2", reqid=42),)
    b = got[("in", "198.18.40.0/25")]
    assert b.priority == 78 and b.mark == (0x10, 0xFF)
    assert b.tmpls == (Tmpl("198.18.1.2", "198.18.1.1", reqid=43), Tmpl("198.18.1.2", "198.18.1.3", reqid=44,
                                                                         optional=True))
    c = got[("out", "198.18.50.1/32")]
    assert c.action == "block" and c.tmpls == ()
    assert xs.get_policy(b.selector, "in", mark=(0x10, 0xFF)) == b


@needs_root
def test_update_delete_flush_policies(netns: str, xs: XfrmSocket) -> None:
    out, inb, fwd = _policy_pair()
    for pol in (out, inb, fwd):
        xs.add_policy(pol)
    with pytest.raises(XfrmError, match=r"add policy 198\.18\.10\.0/24->198\.18\.20\.0/24 dir out failed: "
                                        r"File exists") as info:
        xs.add_policy(out)
    assert info.value.errno == errno.EEXIST
    xs.update_policy(Policy(out.selector, "out", (Tmpl("198.18.0.1", "198.18.0.9", reqid=9),), priority=5))
    assert next(p for p in ip_policies(netns) if p["dir"] == "out")["tmpls"] == \
        [("198.18.0.1", "198.18.0.9", "esp", 9, "tunnel")]
    xs.delete_policy(out.selector, "out")
    assert [p["dir"] for p in ip_policies(netns)] == ["fwd", "in"]
    with pytest.raises(XfrmError, match=r"delete policy .* dir out failed: No such file or directory"):
        xs.delete_policy(out.selector, "out")
    index = xs.get_policy(inb.selector, "in").index
    xs.delete_policy(None, "in", index=index)
    assert [p["dir"] for p in ip_policies(netns)] == ["fwd"]
    xs.flush_policies()
    assert ip(netns, "xfrm", "policy").strip() == ""
    assert xs.dump_policies() == []


@needs_root
def test_sa_add_natively_surfaces_the_kernel_error(netns: str, xs: XfrmSocket) -> None:
    probe = xn.probe_kernel_esp(netns)
    if probe is True:
        pytest.skip("this kernel has ESP + GCM: SAs are covered natively by the kernel tier's test")
    assert isinstance(probe, str)
    assert probe.startswith("add SA spi=0x0dec0de1 198.18.255.1->198.18.255.2 failed: ")
    assert "(kernel: " in probe  # the kernel's extended-ack text, e.g. "Requested AEAD algorithm not found"
    sa = SA.cbc_sha256("198.18.0.1", "198.18.0.2", 0x100, Secret(bytes(16)), Secret(bytes(32)))
    with pytest.raises(XfrmError) as info:
        xs.add_sa(sa)
    # without ESP: EPROTONOSUPPORT "Requested type not found"; without the algorithm: ENOSYS
    assert info.value.errno in (errno.EPROTONOSUPPORT, errno.ENOSYS, errno.ENOENT)
    assert str(info.value).startswith(f"add SA spi=0x00000100 198.18.0.1->198.18.0.2 failed: "
                                      f"{os.strerror(info.value.errno)}")
    assert xs.dump_sas() == []
    with pytest.raises(XfrmError, match=r"get SA spi=0x00000100 .* failed: No such process"):
        xs.get_sa("198.18.0.2", 0x100)
    xs.flush_sas()  # flushing an empty SAD is fine


@needs_root
def test_probe_without_namespace_cleans_up() -> None:
    before = set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()
    result = xn.probe_kernel_esp(scratch_prefix="mipvpn-t-probe-")
    assert result is True or isinstance(result, str)
    after = set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()
    assert after == before


def _acquire_setup(netns: str) -> None:
    """198.18.10.1 on lo, 198.18.20.0/24 routed out of a veth: pings from one to the other hit the policy."""
    ip(netns, "link", "set", "lo", "up")
    ip(netns, "link", "add", "v0", "type", "veth", "peer", "name", "v1")
    ip(netns, "addr", "add", "198.18.0.1/24", "dev", "v0")
    ip(netns, "link", "set", "v0", "up")
    ip(netns, "link", "set", "v1", "up")
    ip(netns, "addr", "add", "198.18.10.1/32", "dev", "lo")
    ip(netns, "route", "add", "198.18.20.0/24", "via", "198.18.0.2", "dev", "v0")


@needs_root
def test_monitor_reports_acquire(netns: str, xs: XfrmSocket) -> None:
    _acquire_setup(netns)
    out = Policy(Selector.of("198.18.10.0/24", "198.18.20.0/24"), "out",
                 (Tmpl("198.18.0.1", "198.18.0.2", reqid=7),), priority=100)
    with xs.monitor() as mon:
        xs.add_policy(out)
        subprocess.run(["ip", "netns", "exec", netns, "ping", "-c1", "-W1", "-I", "198.18.10.1", "198.18.20.1"],
                       capture_output=True, check=False, timeout=10)
        events = mon.read(timeout=5)
    acquires = [e for e in events if e.kind == "acquire"]
    assert acquires, events
    ev = acquires[0]
    assert (ev.src, ev.dst) == ("198.18.0.1", "198.18.0.2")
    assert ev.selector is not None and str(ev.selector.src) == "198.18.10.1/32"
    assert str(ev.selector.dst) == "198.18.20.1/32" and ev.selector.proto == 1
    assert ev.policy is not None and ev.policy.tmpls == out.tmpls and ev.policy.dir == "out"


@needs_root
def test_alloc_spi_holds_a_larval_sa(netns: str, xs: XfrmSocket) -> None:
    spi = xs.alloc_spi("198.18.0.1", "198.18.0.2", reqid=3, low=0x1000, high=0x1FFF)
    assert 0x1000 <= spi <= 0x1FFF
    assert f"proto esp spi 0x{spi:08x} reqid 3 mode tunnel" in ip(netns, "xfrm", "state")
    (larval,) = xs.dump_sas()
    assert (larval.src, larval.dst, larval.spi, larval.reqid, larval.aead) == ("198.18.0.1", "198.18.0.2", spi, 3,
                                                                                 None)
    xs.flush_sas()
    assert xs.dump_sas() == []


@needs_root
def test_usable_from_asyncio(netns: str, xs: XfrmSocket) -> None:
    import asyncio

    out, inb, _ = _policy_pair()

    async def main() -> list[Policy]:
        await asyncio.to_thread(xs.add_policy, out)
        await xs.acall(xs.add_policy, inb)
        return await xs.acall(xs.dump_policies)

    assert {p.dir for p in asyncio.run(main())} == {"in", "out"}


@needs_root
def test_monitor_async_iteration(netns: str, xs: XfrmSocket) -> None:
    import asyncio

    async def main() -> XfrmEvent:
        with xs.monitor() as mon:
            await asyncio.to_thread(_acquire_setup, netns)
            await xs.acall(xs.add_policy, Policy(Selector.of("198.18.10.0/24", "198.18.20.0/24"), "out",
                                                 (Tmpl("198.18.0.1", "198.18.0.2", reqid=9),)))
            ping = asyncio.create_subprocess_exec("ip", "netns", "exec", netns, "ping", "-c1", "-W1", "-I",
                                                  "198.18.10.1", "198.18.20.1", stdout=asyncio.subprocess.DEVNULL,
                                                  stderr=asyncio.subprocess.DEVNULL)
            proc = await ping
            async with asyncio.timeout(10):
                async for event in mon:
                    if event.kind == "acquire":
                        await proc.wait()
                        return event
        raise AssertionError("monitor ended")

    event = asyncio.run(main())
    assert event.policy is not None and event.policy.tmpls[0].reqid == 9
