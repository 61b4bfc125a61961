"""`mipvpn bench ...`: benchmarks that print numbers (never pass/fail on a timing).

``mipvpn bench paths --backend xfrm|strongswan|auto --paths N [--json]`` builds two scratch
namespaces ``mipvpn-bench-<pid>-i`` (initiator, HA-like) and ``mipvpn-bench-<pid>-r``
(responder, CN-GW-like) joined by a veth (198.18.200.1 <-> 198.18.200.2), with N users
198.18.128.1.. (/32 each on the initiator's ``lo``) and the corporate prefix 198.18.64.0/24
(198.18.64.1 on the responder's ``lo``), installs N paths at both ends with the chosen backend,
pings through the first one, removes them all, and prints install/remove latency percentiles
and paths/s (:func:`daemons.bench.paths.bench_paths`).  The process the backend drives, if any
(strongswan: one charon per namespace), is started and stopped by its PID.  Everything it
created is removed, whatever happens.  Numbers are only comparable between runs in the same
environment.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import platform
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from daemons.bench.kit import percentiles
from daemons.bench.paths import BenchResult, Timings, bench_paths
from daemons.runtime.secret import Secret
from daemons.vpn.factory import NodeDaemon, choose_backend, make_backend, node_daemon
from daemons.vpn.keys import new_psk
from daemons.vpn.path import (
    DirectionKeys,
    Endpoint,
    EndpointType,
    EspSuite,
    PathBackend,
    PathError,
    SecurityService,
    VpnPath,
)

INIT_OUTER, RESP_OUTER = "198.18.200.1", "198.18.200.2"
CORP_NET, CORP_HOST = "198.18.64.0/24", "198.18.64.1"
USER_BASE = ipaddress.IPv4Address("198.18.128.0")
MAX_PATHS = 4000


def _sh(*cmd: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, input=stdin, timeout=60)
    if check and proc.returncode != 0:
        raise click.ClickException(f"{' '.join(cmd)}: {proc.stderr.strip() or proc.returncode}")
    return proc


def user_address(i: int) -> str:
    return str(USER_BASE + i + 1)


def make_paths(n: int, suite: EspSuite = EspSuite.AES128GCM16) -> list[VpnPath]:
    """N paths from the initiator's point of view, one user (/32) each, fresh random keys and
    IKE PSK each (strongswan: one IKE_SA per path, as the AAAH hands them out)."""
    paths = []
    for i in range(n):
        def keys(spi: int) -> DirectionKeys:
            auth = Secret(os.urandom(suite.auth_key_len)) if suite.auth_key_len else None
            return DirectionKeys(spi, Secret(os.urandom(suite.enc_key_len)), auth)

        paths.append(VpnPath(
            id=f"bench{i}@home.example:ha-cngw",
            local=Endpoint(ipaddress.IPv4Address(INIT_OUTER), EndpointType.HA),
            remote=Endpoint(ipaddress.IPv4Address(RESP_OUTER), EndpointType.CNGW_STATIC),
            local_ts=(ipaddress.IPv4Network(f"{user_address(i)}/32"),),
            remote_ts=(ipaddress.IPv4Network(CORP_NET),),
            security=SecurityService(suite=suite, outbound=keys(0x10000 + 2 * i), inbound=keys(0x10001 + 2 * i),
                                     psk=new_psk()),
        ))
    return paths


@dataclass
class Scratch:
    """The two namespaces, charons and run directory of one benchmark run."""

    prefix: str
    run_dir: Path
    ns: dict[str, str] = field(default_factory=dict)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def build(self, n: int) -> None:
        for role in ("i", "r"):
            name = f"{self.prefix}{role}"
            _sh("ip", "netns", "add", name)
            self.ns[role] = name
            _sh("ip", "-n", name, "link", "set", "lo", "up")
        i, r = self.ns["i"], self.ns["r"]
        _sh("ip", "-n", i, "link", "add", "bench0", "type", "veth", "peer", "name", "bench0", "netns", r)
        batch_i = [f"addr add {INIT_OUTER}/24 dev bench0", "link set bench0 up",
                   f"route add default via {RESP_OUTER} dev bench0"]
        batch_i += [f"addr add {user_address(k)}/32 dev lo" for k in range(n)]
        batch_r = [f"addr add {RESP_OUTER}/24 dev bench0", "link set bench0 up",
                   f"addr add {CORP_HOST}/32 dev lo", f"route add default via {INIT_OUTER} dev bench0"]
        _sh("ip", "-n", i, "-batch", "-", stdin="\n".join(batch_i) + "\n")
        _sh("ip", "-n", r, "-batch", "-", stdin="\n".join(batch_r) + "\n")

    def start_daemon(self, role: str, daemon: NodeDaemon) -> subprocess.Popen[bytes]:
        """Start the process the backend drives (strongswan: charon) in ``role``'s namespace."""
        cmd = ["ip", "netns", "exec", self.ns[role], *daemon.argv]
        with open(self.run_dir / f"{role}.stdout", "wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        self.procs.append(proc)
        return proc

    def ping(self, count: int = 2) -> bool:
        proc = subprocess.run(["ip", "netns", "exec", self.ns["i"], "ping", "-c", str(count), "-i", "0.2", "-W",
                               "2", "-I", user_address(0), CORP_HOST], capture_output=True, timeout=30)
        return proc.returncode == 0

    def teardown(self) -> list[str]:
        problems = []
        for proc in self.procs:  # only what we started, by PID
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        for name in self.ns.values():
            if _sh("ip", "netns", "del", name, check=False).returncode != 0:
                problems.append(f"could not remove namespace {name}")
        shutil.rmtree(self.run_dir, ignore_errors=True)
        return problems


@contextmanager
def scratch(n: int) -> Iterator[Scratch]:
    s = Scratch(f"mipvpn-bench-{os.getpid()}-", Path(tempfile.mkdtemp(prefix="mipvpn-bench-")))
    try:
        s.build(n)
        yield s
    finally:
        for problem in s.teardown():
            click.echo(f"warning: {problem}", err=True)


def _percentiles(t: Timings) -> dict[str, float | int]:
    return percentiles(t.samples_ms)


def result_dict(result: BenchResult, reason: str) -> dict[str, Any]:
    return {
        "backend": result.backend, "reason": reason, "paths": result.n,
        "kernel": platform.release(), "cpus": os.cpu_count(),
        "responder_install_ms": _percentiles(result.responder_install),
        "first_install_ms": round(result.first_install, 3),
        "install_ms": _percentiles(result.install),
        "remove_ms": _percentiles(result.remove),
        "install_paths_per_s": round(result.install_rate, 1),
        "remove_paths_per_s": round(result.remove_rate, 1),
        "negotiation_ms": _percentiles(result.negotiation),
        "not_up": result.not_up, "probe_ok": result.probe_ok,
    }


def format_result(result: BenchResult, reason: str) -> str:
    d = result_dict(result, reason)

    def line(label: str, p: dict[str, float | int]) -> str:
        if not p.get("n"):
            return f"  {label:<28} n=0"
        return (f"  {label:<28} n={p['n']} p50={p['p50']:.2f} p90={p['p90']:.2f} p99={p['p99']:.2f} "
                f"min={p['min']:.2f} max={p['max']:.2f} ms")

    lines = [
        f"backend {result.backend} ({reason}); kernel {d['kernel']}, {d['cpus']} cpus; {result.n} paths",
        line("responder install:", d["responder_install_ms"]),
        f"  {'first install:':<28} {result.first_install:.2f} ms",
        line("further installs:", d["install_ms"]),
        line("removes:", d["remove_ms"]),
        *([line("negotiation (further):", d["negotiation_ms"])] if result.negotiation.samples_ms else []),
        f"  install {result.install_rate:.1f} paths/s, remove {result.remove_rate:.1f} paths/s",
        f"  ping through the first path with all up: {'ok' if result.probe_ok else 'FAILED'}",
    ]
    if result.not_up:
        lines.append(f"  NOT UP: {len(result.not_up)} paths, e.g. {result.not_up[0]}")
    return "\n".join(lines)


async def run_paths_bench(backend: str, n: int, suite: EspSuite = EspSuite.AES128GCM16) -> tuple[BenchResult, str]:
    """Resolve ``backend``, build the scratch namespaces and run the benchmark."""
    name, reason = await asyncio.to_thread(choose_backend, backend)
    paths = make_paths(n, suite)
    with scratch(n) as s:
        for role in ("i", "r"):
            helper = node_daemon(name, s.run_dir, role)
            if helper is not None:
                s.start_daemon(role, helper)
        init: PathBackend = make_backend(name, "i", s.run_dir, s.ns["i"])
        resp: PathBackend = make_backend(name, "r", s.run_dir, s.ns["r"])
        try:
            await init.wait_ready()
            await resp.wait_ready()

            async def probe() -> bool:
                return await asyncio.to_thread(s.ping)

            result = await bench_paths(init, resp, paths, probe=probe)
        finally:
            for b in (init, resp):
                try:
                    await b.flush()
                finally:
                    await b.close()
    return result, reason


@click.group("bench")
def bench_group() -> None:
    """Benchmarks: they print numbers and never fail on a timing."""


@bench_group.command("paths")
@click.option("--backend", type=click.Choice(["auto", "xfrm", "strongswan"]), default="auto", show_default=True)
@click.option("--paths", "n", type=click.IntRange(1, MAX_PATHS), default=20, show_default=True,
              help="Number of paths (users) between the two gateways.")
@click.option("--suite", type=click.Choice([s.value for s in EspSuite]), default=EspSuite.AES128GCM16.value,
              show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def paths_cmd(backend: str, n: int, suite: str, as_json: bool) -> None:
    """Install/remove latency and paths/s of a path backend between two scratch namespaces."""
    if os.geteuid() != 0:
        raise click.ClickException("needs root (network namespaces)")
    try:
        result, reason = asyncio.run(run_paths_bench(backend, n, EspSuite(suite)))
    except PathError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(result_dict(result, reason), indent=2))
    else:
        click.echo(format_result(result, reason))
    if result.not_up or result.probe_ok is False:
        raise SystemExit(1)


if __name__ == "__main__":
    bench_group()
