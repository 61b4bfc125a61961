"""The xfrm path backend, natively: what does not need kernel ESP.

Pure parts (what a path becomes), and against this machine's kernel in a scratch namespace
``mipvpn-t-xb-<pid>-n`` (removed whatever happens): policies can be written without ESP, so the
ownership rules (flush/reconcile/list touch only our reqid band), the error and roll-back of an
install the kernel refuses, the ESP-header QoS filter and the backend choice are checked here.
SAs and traffic are in the VM tier (tests/kernel/test_xfrm_backend.py).
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import subprocess
from collections.abc import Iterator

import pytest

from daemons.runtime.secret import Secret
from daemons.vpn.factory import choose_backend, make_backend
from daemons.vpn.path import (
    DirectionKeys,
    Endpoint,
    EndpointType,
    EspSuite,
    PathBackend,
    PathError,
    PathState,
    Qos,
    SecurityService,
    VpnPath,
)
from daemons.vpn.xfrm.backend import (
    PRIORITY_BASE,
    REQID_BASE,
    EspQos,
    XfrmBackend,
    XfrmPathError,
    path_entries,
)
from daemons.vpn.xfrm.netlink import XfrmSocket, probe_kernel_esp
from daemons.wire.xfrm import Policy, Selector, Tmpl

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")


def make_path(path_id: str = "mn1@home.example:fa-ha", suite: EspSuite = EspSuite.AES128GCM16,
              local_ts: tuple[str, ...] = ("198.18.10.10/32",),
              remote_ts: tuple[str, ...] = ("198.18.20.0/24",)) -> VpnPath:
    def keys(spi: int) -> DirectionKeys:
        auth = Secret(os.urandom(suite.auth_key_len)) if suite.auth_key_len else None
        return DirectionKeys(spi, Secret(os.urandom(suite.enc_key_len)), auth)

    return VpnPath(
        id=path_id,
        local=Endpoint(ipaddress.IPv4Address("198.18.0.1"), EndpointType.FA),
        remote=Endpoint(ipaddress.IPv4Address("198.18.0.2"), EndpointType.HA),
        local_ts=tuple(ipaddress.IPv4Network(n) for n in local_ts),
        remote_ts=tuple(ipaddress.IPv4Network(n) for n in remote_ts),
        security=SecurityService(suite=suite, outbound=keys(0x1000), inbound=keys(0x1001)),
    )


# --------------------------------------------------------------------------- pure


def test_path_entries_two_sas_three_policies_per_selector_pair() -> None:
    p = make_path(local_ts=("198.18.10.10/32", "198.18.11.0/24"))
    e = path_entries(p, REQID_BASE + 5)
    assert (e.sa_out.src, e.sa_out.dst, e.sa_out.spi) == ("198.18.0.1", "198.18.0.2", 0x1000)
    assert (e.sa_in.src, e.sa_in.dst, e.sa_in.spi) == ("198.18.0.2", "198.18.0.1", 0x1001)
    assert {sa.reqid for sa in e.sas} == {REQID_BASE + 5} and all(sa.mode == "tunnel" for sa in e.sas)
    assert e.sa_out.aead is not None and e.sa_out.aead[0] == "rfc4106(gcm(aes))"
    assert e.sa_out.aead[1] == p.security.outbound.enc_key  # type: ignore[union-attr]
    assert len(e.policies) == 6
    by_dir = {(pol.dir, str(pol.selector.src), str(pol.selector.dst)): pol for pol in e.policies}
    out = by_dir[("out", "198.18.10.10/32", "198.18.20.0/24")]
    assert out.tmpls == (Tmpl("198.18.0.1", "198.18.0.2", reqid=REQID_BASE + 5),)
    for d in ("in", "fwd"):
        assert by_dir[(d, "198.18.20.0/24", "198.18.11.0/24")].tmpls == (
            Tmpl("198.18.0.2", "198.18.0.1", reqid=REQID_BASE + 5),)
    # more specific selectors get the preferred (lower) priority
    assert out.priority == PRIORITY_BASE + 64 - 32 - 24
    assert by_dir[("out", "198.18.11.0/24", "198.18.20.0/24")].priority == PRIORITY_BASE + 64 - 24 - 24
    assert "Secret(***)" in repr(e) and p.security.outbound.enc_key.reveal().hex() not in repr(e)  # type: ignore


def test_path_entries_cbc_and_psk_only() -> None:
    e = path_entries(make_path(suite=EspSuite.AES128_SHA256), REQID_BASE + 1)
    assert e.sa_out.enc is not None and e.sa_out.enc[0] == "cbc(aes)"
    assert e.sa_out.auth is not None and e.sa_out.auth[0] == "hmac(sha256)" and e.sa_out.auth[2] == 128
    p = make_path()
    psk_only = VpnPath(p.id, p.local, p.remote, p.local_ts, p.remote_ts,
                       SecurityService(psk=Secret(os.urandom(32))))
    with pytest.raises(PathError, match="manual keys"):
        path_entries(psk_only, REQID_BASE + 1)


def test_choose_backend_explicit_and_invalid() -> None:
    assert choose_backend("xfrm") == ("xfrm", "xfrm requested")
    assert choose_backend("strongswan")[0] == "strongswan"
    with pytest.raises(ValueError):
        choose_backend("racoon")
    with pytest.raises(ValueError):
        make_backend("auto", "n", "/tmp")


# --------------------------------------------------------------------------- against this kernel


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"mipvpn-t-xb-{os.getpid()}-n"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def ip(ns: str, *args: str) -> str:
    return subprocess.run(["ip", "-n", ns, *args], check=True, capture_output=True, text=True).stdout.strip()


@needs_root
def test_auto_choice_matches_the_probe() -> None:
    name, reason = choose_backend("auto")
    expect = "xfrm" if probe_kernel_esp(scratch_prefix="mipvpn-t-xb-probe-") is True else "strongswan"
    assert name == expect and reason.startswith("auto: ")


@needs_root
def test_backend_is_a_path_backend(netns: str) -> None:
    b = make_backend("xfrm", "n", "/nonexistent", netns)
    try:
        assert isinstance(b, XfrmBackend) and isinstance(b, PathBackend) and b.name == "xfrm"
    finally:
        asyncio.run(b.close())  # type: ignore[attr-defined]


@needs_root
def test_refused_install_surfaces_kernel_error_and_leaves_nothing(netns: str) -> None:
    if probe_kernel_esp(netns) is True:
        pytest.skip("this kernel has ESP: the install succeeds (VM tier covers it)")

    async def go() -> None:
        b = XfrmBackend("n", netns)
        try:
            with pytest.raises(XfrmPathError) as err:
                await b.install(make_path())
            assert err.value.errno is not None and err.value.cause is not None
            assert "add SA spi=0x00001000 198.18.0.1->198.18.0.2 failed" in str(err.value)
            assert "(kernel: " in str(err.value)  # the kernel's own text
            assert await b.list() == []
        finally:
            await b.close()

    asyncio.run(go())
    assert ip(netns, "xfrm", "state") == "" and ip(netns, "xfrm", "policy") == ""


@needs_root
def test_flush_and_reconcile_touch_only_our_band(netns: str) -> None:
    foreign = Policy(Selector.of("198.18.99.0/24", "198.18.98.0/24"), "out",
                     (Tmpl("198.18.0.9", "198.18.0.8", reqid=7),), priority=100)
    stray = [Policy(Selector.of("198.18.10.10/32", "198.18.20.0/24"), "out",
                    (Tmpl("198.18.0.1", "198.18.0.2", reqid=REQID_BASE + 42),), priority=PRIORITY_BASE),
             Policy(Selector.of("198.18.20.0/24", "198.18.10.10/32"), "in",
                    (Tmpl("198.18.0.2", "198.18.0.1", reqid=REQID_BASE + 42),), priority=PRIORITY_BASE)]
    with XfrmSocket(netns) as xs:
        for pol in (foreign, *stray):
            xs.add_policy(pol)

        async def go() -> None:
            b = XfrmBackend("n", netns, xfrm=xs)
            [st] = await b.list()
            assert st.state is PathState.STRAY and st.detail["reqid"] == f"0x{REQID_BASE + 42:08x}"
            assert (str(st.local), str(st.remote)) == ("198.18.0.1", "198.18.0.2")
            assert [str(n) for n in st.local_ts] == ["198.18.10.10/32"]
            assert await b.reconcile([]) == []
            assert [p.selector for p in xs.dump_policies()] == [foreign.selector]
            await b.flush()
            assert [p.selector for p in xs.dump_policies()] == [foreign.selector]
            # strays appearing later (another instance, a crash) are flushed too
            for pol in stray:
                xs.add_policy(pol)
            await b.flush()
            assert len(xs.dump_policies()) == 1

        asyncio.run(go())
        assert xs.dump_policies()[0].tmpls[0].reqid == 7


@needs_root
def test_esp_qos_filter_on_outer_header(netns: str) -> None:
    subprocess.run(["ip", "-n", netns, "link", "add", "wan", "type", "veth", "peer", "name", "wanp"], check=True)
    ip(netns, "addr", "add", "198.18.0.1/24", "dev", "wan")
    ip(netns, "link", "set", "wan", "up")
    ip(netns, "link", "set", "wanp", "up")
    b = XfrmBackend("n", netns)
    try:
        assert b._egress_ifname("198.18.0.2") == "wan"
        q = EspQos(netns, "wan")
        asyncio.run(q.apply_esp("p1", Qos(rate=1_000_000, ceil=2_000_000), 0x1000, "198.18.0.1", "198.18.0.2"))
        filters = subprocess.run(["tc", "-n", netns, "filter", "show", "dev", "wan"], check=True,
                                 capture_output=True, text=True).stdout
        assert "00001000/ffffffff at 20" in filters  # the SPI
        assert "c6120002/ffffffff at 16" in filters  # outer dst
        assert "00320000/00ff0000 at 8" in filters  # protocol ESP
        classes = subprocess.run(["tc", "-n", netns, "class", "show", "dev", "wan"], check=True,
                                 capture_output=True, text=True).stdout
        assert "rate 1Mbit ceil 2Mbit" in classes
        asyncio.run(q.remove("p1"))
        qdiscs = subprocess.run(["tc", "-n", netns, "qdisc", "show", "dev", "wan"], check=True,
                                capture_output=True, text=True).stdout
        assert "htb" not in qdiscs
    finally:
        asyncio.run(b.close())


# --------------------------------------------------------------------------- bench CLI


def test_bench_paths_are_distinct_users_of_one_pair() -> None:
    from daemons.cli.bench import make_paths

    paths = make_paths(300)
    assert len({p.id for p in paths}) == 300 and len({p.local_ts for p in paths}) == 300
    assert {p.pair for p in paths} == {paths[0].pair}
    spis = [k.spi for p in paths for k in (p.security.outbound, p.security.inbound)]  # type: ignore[union-attr]
    assert len(set(spis)) == 600
    assert len({p.security.psk for p in paths}) == 300  # one IKE secret per path


@needs_root
def test_bench_cli_reports_kernel_refusal_and_cleans_up() -> None:
    from click.testing import CliRunner

    from daemons.cli.bench import bench_group

    if probe_kernel_esp(scratch_prefix="mipvpn-t-xb-probe-") is True:
        pytest.skip("this kernel has ESP")
    result = CliRunner().invoke(bench_group, ["paths", "--backend", "xfrm", "--paths", "2"])
    assert result.exit_code == 1 and "(kernel: " in result.output, result.output
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"mipvpn-bench-{os.getpid()}-" not in left
