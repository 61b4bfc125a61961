"""`mipvpn bench register`: registrations per second through FA -> AAAF -> AAAH -> HA.

    mipvpn bench register --mns N [--concurrency C]                      # closed loop (default)
    mipvpn bench register --mns N --rate R --duration S                  # open loop
    mipvpn bench register --mns N --renew --duration S [--lifetime L]    # steady renewals
        [--backend auto|xfrm|strongswan|none] [--timeout T] [--profile [--profile-dir DIR]] [--json]
    # without the main CLI wiring: .venv/bin/python -m daemons.bench.register --mns N ...

Brings up a lab of its own (run directory ``/tmp/mipvpn-benchreg-*``, namespace prefix
``mvrPID-``, always torn down, also on SIGTERM) from the default topology with the bench's home
prefixes (``HOME_POOLS``: the HA's home link widened to 198.19.0.0/16, mn1 at 198.19.0.10; past
65,524 users a second and third HA of the home domain, 198.18.128.0/17 and 198.18.112.0/20) plus:

* N *synthetic* users ``benchK@home.example`` (topology users without an ``mn`` node), home
  addresses after the highest one in use in each home prefix (``load.allocate_home_addresses``).
  The lab provisions them like any user (VPN database, HA's mobile nodes) but runs no MN daemon
  for them; their MN-HA and MN-AAA keys are in ``RUN_DIR/bench-users.yaml`` (0600, see
  ``daemons.provision.configs``).
* a node ``drv`` (role mn, no user, so no MN daemon) attached to fa1's access segment: the
  load generator runs in its namespace (``python -m daemons.bench.register drive``, started with
  ``ip netns exec``). It has one address of its own on ``eth0`` (the last of fa1's segment, for its
  solicitations) and makes the synthetic home addresses its own with a few ``local`` routes on
  ``lo`` covering exactly them (``load.covering_blocks``: about 16 for 10,000 users), not one address
  per user: the kernel then answers the FA's ARP for every home address (the FA sends each RRP
  to the home address on the access link) and accepts them as IP_PKTINFO sources. Default route
  to the FA (onlink), as an MN away from home has. It registers as an MN would (RFC 5944 + RFC 3012 +
  RFC 4004): NAI, MN-HA authenticator, the FA's challenge, MN-AAA authenticator; one UDP socket,
  the source address of each RRQ chosen per user with IP_PKTINFO.

Modes: **closed loop** (default): every user once, up to C registrations outstanding;
registrations/s = accepted / wall time from the first started to the last answered. **Open loop**
(``--rate R --duration S``): a registration started every 1/R s for S s whatever the answers do
(``load.arrivals``), each for the user idle longest (``load.UserPool``; an arrival finding every
user busy is counted, not sent); offered and achieved rate (accepted / S), latency of the last
request and from when it was due (challenge waits and retries in: no coordinated omission), lost
(no answer after ``MAX_ATTEMPTS``) and retried. **Renewals** (``--renew --duration S``): the closed
loop first, then every user re-registers at a random point of 50-90 % of the lifetime it was
granted (``load.renewal_due``), for S s; renewals/s, latency; at the end every user's binding must
still be at the HA (``bindings_live``). ``--lifetime`` sets the lifetime asked in the RRQs (the HA
grants at most its ``max_lifetime``, 300 s).

Challenges: the FA accepts a challenge for ``challenge_window`` (8) advertisement intervals after
it advertised it, from every MN that heard it (spent per MN once it bought that MN a
registration), as MNs on one link share the multicast advertisements they hear. So the
generator uses the newest challenge heard for every registration while it is younger than
``CHALLENGE_REUSE_S``, and otherwise sends one Agent Solicitation (one outstanding at a time,
again after ``RESOLICIT_S``) and waits for the advertisement: the FA's per-source solicitation
limit never paces it. The FA runs with its default configuration. A registration the FA still
answers with 104/106 (unknown or stale challenge), or not at all within ``--timeout``, is sent
again as a new request with a newer challenge, as an MN would (at most 3 attempts). Where the
time goes, per stage, comes from the daemons' log lines (``STAGES``; first registration of each user).

Afterwards it checks every reply was code 0 with a valid MN-HA authenticator, and asks the
daemons (control sockets) for every HA's bindings, fa1's visitors and the VPN paths the HA and
fa1 hold; it reads each daemon's RSS and CPU time (``/proc``, PIDs from the lab's supervisor)
before and after the load: RSS growth per binding, CPU ms per registration. ``--profile`` starts
every daemon with ``mipvpn daemon --profile DIR/NODE.prof`` and the generator under
``python -m cProfile``; the files are written when the lab goes down, kept in DIR (default
``/tmp/mipvpn-benchprof-TIME``), and the top functions per process printed. It prints numbers;
it never fails on a timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import random
import resource
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click
import yaml

from daemons.bench.kit import machine, percentiles, run_as_root
from daemons.bench.load import (
    UserPool,
    allocate_home_addresses,
    arrivals,
    by_tenths,
    covering_blocks,
    pool_free,
    renewal_due,
)
from daemons.bench.procstat import format_profile

AGENT = "fa1"  # the FA the generator is attached to
HOME_AGENT = "ha"
DRIVER = "drv"  # the generator's node (role mn, no user)
REALM = "home.example"
INTERFACE = "eth0"
CHALLENGE_REUSE_S = 2.0  # of the FA's window of 8 advertisement intervals (8 s by default): a wide margin
CHALLENGE_CODES = (104, 106)  # FA_UNKNOWN_CHALLENGE, FA_STALE_CHALLENGE: retried with a new challenge
MAX_ATTEMPTS = 3
RESOLICIT_S = 0.1
RETRY_BACKOFF_S = (1.0, 8.0)  # a renewal refused or unanswered is tried again after 1 s, doubling to 8 s (as mn.py)

# The bench's home prefixes (inside the lab's 198.18.0.0/15, clear of what the default topology
# uses: 198.18.0.0/24 links, 198.18.2-3.0/24 corporate networks, 198.18.100-103.0/24 segments).
# The default HA's home link becomes 198.19.0.0/16 (its lab users keep their offsets: mn1 at
# 198.19.0.10); more home agents join the home domain only when one prefix is too small, each with
# its uplink to core and its own home link. (home agent, home prefix, uplink /30 or None for ha)
HOME_POOLS: tuple[tuple[str, str, str | None], ...] = (
    (HOME_AGENT, "198.19.0.0/16", None),
    ("ha2", "198.18.128.0/17", "198.18.0.36/30"),
    ("ha3", "198.18.112.0/20", "198.18.0.40/30"),
)


def max_users() -> int:
    data = bench_base_topology(len(HOME_POOLS))
    return sum(last - first + 1 for _, (first, last) in bench_pools(data))


def bench_base_topology(home_agents: int) -> dict[str, Any]:
    """The default topology with the bench's home prefixes: the HA's home link widened (its users
    keep their offsets in it) and ``home_agents - 1`` more HAs of the home domain."""
    from lab.topology import default_topology_path

    data = yaml.safe_load(default_topology_path().read_text())
    ha_seg = next(s for s in data["segments"] if s["owner"] == HOME_AGENT)
    old, new = ipaddress.IPv4Network(ha_seg["prefix"]), ipaddress.IPv4Network(HOME_POOLS[0][1])

    def rebase(address: str) -> str:
        return str(new.network_address + (int(ipaddress.IPv4Address(address)) - int(old.network_address)))

    ha_seg.update(prefix=str(new), address=rebase(ha_seg["address"]))
    for user in data.get("users") or []:
        if user["home_agent"] == HOME_AGENT:
            user["home_address"] = rebase(user["home_address"])
    domain = data["nodes"][HOME_AGENT]["domain"]
    for name, prefix, uplink in HOME_POOLS[1:home_agents]:
        assert uplink is not None
        up = ipaddress.IPv4Network(uplink)
        data["nodes"][name] = {"role": "ha", "domain": domain, "upstream": "core"}
        data["links"].append({"prefix": uplink, "ends": {"core": str(up.network_address + 1),
                                                         name: str(up.network_address + 2)}})
        net = ipaddress.IPv4Network(prefix)
        data["segments"].append({"owner": name, "prefix": prefix, "address": str(net.network_address + 1)})
    return data


def bench_pools(data: dict[str, Any]) -> list[tuple[str, tuple[int, int]]]:
    """Each home agent's free range in a (bench) topology's data."""
    used = {ipaddress.IPv4Address(u["home_address"]) for u in data.get("users") or []}
    pools = []
    for seg in data["segments"]:
        if any(seg["owner"] == name for name, _, _ in HOME_POOLS):
            pools.append((seg["owner"], pool_free(ipaddress.IPv4Network(seg["prefix"]),
                                                  used | {ipaddress.IPv4Address(seg["address"])})))
    return pools


def home_agents_needed(n: int) -> int:
    """How many of ``HOME_POOLS`` N synthetic users need."""
    for k in range(1, len(HOME_POOLS) + 1):
        if sum(last - first + 1 for _, (first, last) in bench_pools(bench_base_topology(k))) >= n:
            return k
    raise click.ClickException(f"at most {max_users()} synthetic users fit in the bench's home prefixes")


def bench_topology_data(n: int) -> dict[str, Any]:
    """The bench topology (``bench_base_topology``) plus ``drv`` on fa1's segment and N synthetic
    users (no ``mn``), ``benchK@home.example``, home addresses from ``allocate_home_addresses``."""
    data = bench_base_topology(home_agents_needed(n))
    try:
        allocated = allocate_home_addresses(n, bench_pools(data))
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    data["nodes"][DRIVER] = {"role": "mn", "attach": AGENT}
    data.setdefault("users", [])
    data["users"] += [{"nai": f"bench{k + 1}@{REALM}", "home_address": str(hoa), "home_agent": ha}
                      for k, (ha, hoa) in enumerate(allocated)]
    return data


def wait_registered(lab: Any, timeout: float = 30.0) -> dict[str, str]:
    """Wait until every MN daemon of the lab (mn1) is registered, so that none of them takes one
    of the challenges meant for the generator while it runs (an MN re-registers only minutes later)."""
    from daemons.provision.configs import control_socket
    from daemons.runtime import control

    mns = [n.name for n in lab.topology.mobile_nodes() if lab.topology.user_of(n.name) is not None]
    states: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for mn in mns:
            with contextlib.suppress(control.ControlUnavailable):
                states[mn] = control.call(control_socket(lab.run_dir, mn), "registration").get("state", "?")
        if all(states.get(mn) in ("registered", "home") for mn in mns):
            break
        time.sleep(0.1)
    return states


def ask(run_dir: Path, node: str, cmd: str) -> Any:
    from daemons.provision.configs import control_socket
    from daemons.runtime import control

    try:
        return control.call(control_socket(run_dir, node), cmd, timeout=30)
    except control.ControlUnavailable as exc:
        return {"error": str(exc)}


def count_paths(rows: Any, nais: set[str]) -> dict[str, Any]:
    """VPN paths a node holds (``show paths``): in all, the per-user ones of bench users, the
    shared network-to-network ones (``net:...``, e.g. the HA's side of the CN-GW tunnel), by state."""
    if not isinstance(rows, list):
        return {"error": rows.get("error") if isinstance(rows, dict) else str(rows)}
    states: dict[str, int] = {}
    for r in rows:
        states[str(r.get("state"))] = states.get(str(r.get("state")), 0) + 1
    shared = [r for r in rows if str(r.get("path", "")).startswith("net:")]
    bench = sum(1 for r in rows if r not in shared and nais & set(str(r.get("users") or "").split(",")))
    return {"total": len(rows), "bench_users": bench, "shared": len(shared), "by_state": states}


# Where a registration's time goes, from the daemons' log lines (millisecond stamps, so +-1 ms):
# (label, (node, event) where the stage starts, (node, event) where it ends).
STAGES: list[tuple[str, tuple[str, str], tuple[str, str]]] = [
    ("FA: RRQ in -> AMR out", (AGENT, "rrq.received"), (AGENT, "amr.sent")),
    ("FA AMR -> AAAH (via aaaf1)", (AGENT, "amr.sent"), ("aaah", "amr.received")),
    ("AAAH: AMR in -> HAR out", ("aaah", "amr.received"), ("aaah", "har.sent")),
    ("AAAH HAR -> HA", ("aaah", "har.sent"), (HOME_AGENT, "har.received")),
    ("HA: HAR in -> RRP/HAA out", (HOME_AGENT, "har.received"), (HOME_AGENT, "rrp.sent")),
    ("HA -> FA (HAA, AMA)", (HOME_AGENT, "rrp.sent"), (AGENT, "ama.received")),
    ("FA: AMA in -> RRP out", (AGENT, "ama.received"), (AGENT, "rrp.relayed")),
]


def stages(run_dir: Path, nais: set[str], since: float) -> dict[str, dict[str, float | int]]:
    """Per-stage percentiles over the bench users' registrations (first occurrence of each event)."""
    from daemons.provision.demo import read_daemon_events

    first: dict[tuple[str, str, str], float] = {}
    for e in read_daemon_events(run_dir, since=since):
        if e.get("mn") in nais:
            first.setdefault((e["node"], e["event"], e["mn"]), float(e["t"]))
    out = {}
    for label, (n0, e0), (n1, e1) in STAGES:
        spans = [(first[(n1, e1, nai)] - first[(n0, e0, nai)]) * 1000 for nai in nais
                 if (n0, e0, nai) in first and (n1, e1, nai) in first]
        out[label] = percentiles(spans)
    return out


@dataclass(frozen=True)
class Options:
    """What to measure: ``mode`` closed (every user once, up to ``concurrency`` outstanding), open
    (``rate`` a second for ``duration`` s) or renew (closed, then renewals for ``duration`` s)."""

    n: int
    backend: str = "none"
    mode: str = "closed"
    concurrency: int = 8
    timeout: float = 10.0
    rate: float = 0.0
    duration: float = 0.0
    lifetime: int | None = None  # requested in the RRQs (the HA grants at most its max_lifetime)
    profile_dir: Path | None = None  # run every daemon (and the generator) under cProfile, dumps here
    seed: int | None = None


def profiled(plan: Any, out_dir: Path) -> Any:
    """The lab's service plan with every daemon started under cProfile (``mipvpn daemon --profile``),
    one ``NODE.prof`` each in ``out_dir``, written when the daemon is stopped."""
    import dataclasses

    def services(topo: Any, run_dir: Path, backend: str) -> list[Any]:
        return [dataclasses.replace(s, argv=[*s.argv, "--profile", str(out_dir / f"{s.node}.prof")])
                if s.name.startswith("daemon:") else s for s in plan(topo, run_dir, backend)]

    return services


def home_agents_of(lab: Any) -> list[str]:
    return list(dict.fromkeys(user.home_agent for user in lab.topology.users))


def run_bench(opts: Options, echo: Any = print) -> dict[str, Any]:
    from daemons.bench.procstat import process_stats
    from daemons.provision.configs import services as daemon_services
    from daemons.provision.kinds import load_topology
    from daemons.vpn.factory import choose_backend
    from lab.lab import Lab

    if opts.backend == "none":
        name, reason = "none", "none requested: Mobile IP and AAA only, no VPN paths"
    else:
        name, reason = choose_backend(opts.backend)
    t_prov = time.monotonic()
    data = bench_topology_data(opts.n)
    run_dir = Path(tempfile.mkdtemp(prefix="mipvpn-benchreg-"))
    prefix = f"mvr{os.getpid() % 100000}-"
    topo_path = run_dir / "bench-topology.yaml"  # Lab.open reloads the topology from here
    topo_path.write_text(yaml.safe_dump(data, sort_keys=False))
    try:
        lab = Lab(run_dir, load_topology(topo_path), prefix, name)
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    plan = daemon_services
    if opts.profile_dir is not None:
        opts.profile_dir.mkdir(parents=True, exist_ok=True)
        plan = profiled(daemon_services, opts.profile_dir)
    driver: subprocess.Popen[str] | None = None
    echo(f"lab in {run_dir} (namespaces {prefix}*), backend {name}, {opts.n} synthetic users, "
         f"{len(home_agents_of(lab))} home agent(s)")
    timings: dict[str, float] = {}
    try:
        t0 = time.monotonic()
        lab.up(capture=False, services=plan)
        timings["lab_up_s"] = round(time.monotonic() - t0, 1)
        lab = Lab.open(run_dir)
        timings["provision_and_up_s"] = round(time.monotonic() - t_prov, 1)
        echo(f"lab up in {timings['lab_up_s']:.1f}s ({timings['provision_and_up_s']:.1f}s with the topology); "
             "waiting for mn1's own registration")
        mn_states = wait_registered(lab)
        before = process_stats(lab.processes())
        segment = lab.topology.segment_of(AGENT)
        assert segment is not None
        own = str(segment.prefix.broadcast_address - 1)  # the generator's one address on fa1's link
        cmd = [sys.executable]
        if opts.profile_dir is not None:
            cmd += ["-m", "cProfile", "-o", str(opts.profile_dir / f"{DRIVER}.prof")]
        argv = ["ip", "netns", "exec", lab.ns(DRIVER), *cmd, "-m", "daemons.bench.register", "drive",
                "--run-dir", str(run_dir), "--mode", opts.mode, "--concurrency", str(opts.concurrency),
                "--timeout", str(opts.timeout), "--own-address", own, "--rate", str(opts.rate),
                "--duration", str(opts.duration)]
        argv += ["--lifetime", str(opts.lifetime)] if opts.lifetime else []
        argv += ["--seed", str(opts.seed)] if opts.seed is not None else []
        driver = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=None, text=True,
                                  cwd=Path(__file__).resolve().parent.parent)
        out, _ = driver.communicate()
        if driver.returncode != 0:
            raise click.ClickException(f"the load generator failed (exit {driver.returncode})")
        drive = json.loads(out)
        after = process_stats(lab.processes())
        phases = [drive["registrations"], drive.get("open", {}).get("registrations", []),
                  drive.get("renew", {}).get("registrations", [])]
        nais = {r["nai"] for phase in phases for r in phase}
        breakdown = stages(run_dir, nais, since=drive["started"] - 1)
        bindings: Any = []
        for ha in home_agents_of(lab):
            rows = ask(run_dir, ha, "bindings")
            bindings = bindings + rows if isinstance(rows, list) and isinstance(bindings, list) else rows
        visitors = ask(run_dir, AGENT, "visitors")
        ha_paths = ask(run_dir, HOME_AGENT, "paths") if name != "none" else []
        fa_paths = ask(run_dir, AGENT, "paths") if name != "none" else []
        res = summarise(opts, name, reason, drive, nais, bindings, visitors, ha_paths, fa_paths, mn_states)
        res["provisioning"] = timings
        res["processes"] = memory(before, after, res)
        return {**res, "stages_ms": breakdown, "lab": {"run_dir": str(run_dir), "namespace_prefix": prefix}}
    finally:
        if driver is not None and driver.poll() is None:
            driver.kill()  # only the generator we started, by its own handle
            driver.wait()
        lab.down()  # stops the daemons (SIGTERM): with --profile, each writes its statistics
        echo(f"lab down ({run_dir} removed)")


def memory(before: dict[str, Any], after: dict[str, Any], res: dict[str, Any]) -> dict[str, Any]:
    from daemons.bench.procstat import memory_and_cpu

    registrations = len(res["registrations"]) + sum(p["count"] for p in (res.get("open"), res.get("renew")) if p)
    return memory_and_cpu({k.removeprefix("daemon:"): v for k, v in before.items()},
                          {k.removeprefix("daemon:"): v for k, v in after.items()},
                          res["bindings"], registrations)


def phase_summary(regs: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    """Counts and percentiles of one phase's registrations: accepted (code 0, authentic), lost
    (no answer after MAX_ATTEMPTS), retried (requests after the first), latency of the last
    request (RRQ -> RRP) and from when it was due (challenge waits and retries in)."""
    codes: dict[str, int] = {}
    for r in regs:
        codes[str(r["code"])] = codes.get(str(r["code"]), 0) + 1
    accepted = [r for r in regs if r["code"] == 0 and r["authentic"]]
    return {"count": len(regs), "accepted": len(accepted), "reply_codes": codes,
            # an FA's or AAA's denial carries no MN-HA authenticator: only acceptances must verify
            "unauthentic_replies": sum(1 for r in regs if r["code"] == 0 and not r["authentic"]),
            "lost": sum(1 for r in regs if r["code"] is None),
            "retried": sum(r["attempts"] - 1 for r in regs),
            "wall_s": round(wall, 3), "per_s": round(len(accepted) / wall, 1) if wall > 0 else None,
            "latency_ms": percentiles([r["latency_ms"] for r in accepted]),
            "from_due_ms": percentiles([r["total_ms"] for r in accepted if r["total_ms"] is not None]),
            "challenge_wait_ms": percentiles([r["challenge_wait_ms"] for r in regs
                                              if r["challenge_wait_ms"] is not None])}


def summarise(opts: Options, backend: str, reason: str, drive: dict[str, Any], nais: set[str],
              bindings: Any, visitors: Any, ha_paths: Any, fa_paths: Any, mn_states: dict[str, str]) -> dict[str, Any]:
    regs = drive["registrations"]
    first = phase_summary(regs, drive["wall_s"])
    bench_bindings = [b for b in bindings if b.get("mn") in nais] if isinstance(bindings, list) else []
    bench_visitors = [v for v in visitors if v.get("mn") in nais] if isinstance(visitors, list) else []
    res: dict[str, Any] = {
        "when": drive["when"], "machine": machine(), "backend": backend, "backend_reason": reason,
        "mode": opts.mode, "mns": opts.n, "concurrency": opts.concurrency, "lifetime": opts.lifetime,
        "accepted": first["accepted"], "all_accepted": first["accepted"] == opts.n, "reply_codes": first["reply_codes"],
        "unauthentic_replies": first["unauthentic_replies"], "timeouts": first["lost"], "retries": first["retried"],
        "bindings": len(bench_bindings),
        "bindings_live": sum(1 for b in bench_bindings if float(b.get("remaining") or 0) > 0),
        "bindings_total": len(bindings) if isinstance(bindings, list) else bindings,
        "bindings_expected": len(nais) if opts.mode == "open" else opts.n,
        "fa_visitors": len(bench_visitors),
        "paths": {"ha": count_paths(ha_paths, nais), AGENT: count_paths(fa_paths, nais)},
        "wall_s": first["wall_s"], "registrations_per_s": first["per_s"],
        "latency_ms": first["latency_ms"], "challenge_wait_ms": first["challenge_wait_ms"],
        "solicitations": drive["solicitations"], "advertisements_heard": drive["advertisements"],
        "local_routes": drive.get("local_routes"), "generator": drive.get("generator"),
        "other_mns": mn_states, "registrations": regs,
    }
    res["bindings_match"] = res["bindings"] == res["bindings_expected"]
    res["closed_by_tenths"] = by_tenths([(r["replied_at"], r["latency_ms"]) for r in regs
                                         if r["code"] == 0 and r["authentic"] and r["replied_at"] is not None])
    if "open" in drive:
        o = drive["open"]
        # achieved: accepted per second over the time registrations were being started
        res["open"] = {**phase_summary(o["registrations"], o["sending_s"]), "rate": o["rate"],
                       "duration_s": o["duration_s"], "offered": o["offered"], "busy_users": o["busy_users"],
                       "offered_per_s": round(o["offered"] / o["duration_s"], 1),
                       "start_lag_ms": o["start_lag_ms"], "drain_wall_s": o["wall_s"]}
    if "renew" in drive:
        r = drive["renew"]
        res["renew"] = {**phase_summary(r["registrations"], r["duration_s"]), "duration_s": r["duration_s"],
                        "renewing_users": r["renewing_users"]}
    return res


def format_report(res: dict[str, Any]) -> str:
    m = res["machine"]

    def row(label: str, p: dict[str, Any]) -> str:
        if not p.get("n"):
            return f"  {label:<22} n=0"
        return (f"  {label:<22} {p['min']:>8.2f} {p['p50']:>8.2f} {p['p90']:>8.2f} {p['p99']:>8.2f} "
                f"{p['max']:>8.2f}   n={p['n']}")

    header = f"  {'ms':<22} {'min':>8} {'p50':>8} {'p90':>8} {'p99':>8} {'max':>8}"
    lines = [
        f"registration benchmark {res['when']}: {res['mns']} synthetic users through {AGENT} -> aaaf1 -> aaah -> ha,"
        f" mode {res['mode']}",
        f"backend {res['backend']} ({res['backend_reason']})",
        f"machine: {m['nproc']} cpus, kernel {m['kernel']} ({m['machine']}), python {m['python']}",
        f"provisioning: {res['provisioning']}", "",
    ]
    if res["mode"] != "open":
        lines += [
            f"closed loop, up to {res['concurrency']} outstanding: accepted {res['accepted']}/{res['mns']} "
            f"(reply codes {res['reply_codes']}, {res['unauthentic_replies']} unauthentic, {res['timeouts']} lost, "
            f"{res['retries']} retries)",
            f"{res['registrations_per_s']} registrations/s ({res['accepted']} in {res['wall_s']:.2f} s)",
            header, row("RRQ -> RRP", res["latency_ms"]), row("wait for a challenge", res["challenge_wait_ms"])]
        tenths = res.get("closed_by_tenths") or []
        if tenths:
            lines += ["  as the bindings piled up, tenth by tenth of the accepted (answers/s, p50 ms): "
                      + ", ".join(f"{t['per_s']}/{t['p50_ms']:.0f}" for t in tenths)]
        lines.append("")
    for key in ("open", "renew"):
        p = res.get(key)
        if not p:
            continue
        if key == "open":
            lines.append(f"open loop: offered {p['offered']} at {p['offered_per_s']}/s for {p['duration_s']:g} s "
                         f"({p['busy_users']} arrivals found every user busy); achieved {p['per_s']}/s accepted")
        else:
            lines.append(f"renewals for {p['duration_s']:g} s by {p['renewing_users']} users (lifetime asked "
                         f"{res['lifetime'] or 'per user'}): {p['per_s']} renewals/s accepted")
        lines += [f"  {p['count']} sent, {p['accepted']} accepted (codes {p['reply_codes']}), {p['lost']} lost, "
                  f"{p['retried']} retried, {p['unauthentic_replies']} unauthentic",
                  header, row("RRQ -> RRP (last try)", p["latency_ms"]), row("due -> RRP", p["from_due_ms"]),
                  row("wait for a challenge", p["challenge_wait_ms"])]
        if key == "open":
            lines.append(row("start lag", p["start_lag_ms"]))
        lines.append("")
    lines.append(f"HA bindings: {res['bindings']} bench users ({res['bindings_live']} live, {res['bindings_total']} "
                 f"in all; expected {res['bindings_expected']}){'' if res['bindings_match'] else '  MISMATCH'}; "
                 f"{AGENT} visitors: {res['fa_visitors']}")
    if res.get("stages_ms"):
        lines += ["", f"  {'stage (daemon logs), ms':<30} {'p50':>8} {'p90':>8} {'max':>8}"]
        for label, p in res["stages_ms"].items():
            if p.get("n"):
                lines.append(f"  {label:<30} {p['p50']:>8.1f} {p['p90']:>8.1f} {p['max']:>8.1f}   n={p['n']}")
        lines.append("")
    for node, p in res["paths"].items():
        if "error" in p:
            lines.append(f"VPN paths at {node}: {p['error']}")
        else:
            lines.append(f"VPN paths at {node}: {p['total']} ({p['bench_users']} per-user paths of bench users, "
                         f"{p['shared']} shared; by state {p['by_state']})")
    lines.append(f"solicitations sent {res['solicitations']}, advertisements heard {res['advertisements_heard']}; "
                 f"generator: {res['local_routes']} local routes, {res['generator']}")
    procs = res.get("processes") or {}
    if procs:
        lines += ["", f"  {'process':<16} {'RSS kB':>9} {'+kB':>8} {'B/binding':>10} {'CPU s':>8} {'CPU ms/reg':>11}"]
        for name, p in sorted(procs.items(), key=lambda kv: -kv[1]["cpu_s"]):
            lines.append(f"  {name:<16} {p['rss_kb']:>9} {p['rss_delta_kb']:>8} {p['bytes_per_binding']!s:>10} "
                         f"{p['cpu_s']:>8.2f} {p['cpu_ms_per_registration']!s:>11}")
    profiles = res.get("profiles") or {}
    busy = {name: p["total_s"] - p["idle_s"] for name, p in profiles.items() if "error" not in p}
    quiet = [name for name, t in busy.items() if t < 0.2 * max(busy.values())]
    for name, summary in profiles.items():
        if "error" in summary:
            lines += ["", f"profile {name}: {summary['error']}"]
        elif name not in quiet:
            lines += ["", *format_profile(name, summary)]
    if quiet:
        lines += ["", f"profiles of the nodes with less than a fifth of the busiest one's time, not shown: "
                  f"{', '.join(f'{n} {busy[n]:.2f} s' for n in quiet)}"]
    return "\n".join(lines)


@click.command("register")
@click.option("--mns", "n", type=click.IntRange(1), default=20, show_default=True,
              help="Synthetic users (home prefix 198.19.0.0/16, more home agents past 65,524).")
@click.option("--concurrency", type=click.IntRange(1, 256), default=8, show_default=True,
              help="Closed loop: registrations outstanding at once.")
@click.option("--rate", type=click.FloatRange(0, min_open=True), default=None,
              help="Open loop: start this many registrations a second (needs --duration).")
@click.option("--duration", type=click.FloatRange(0, min_open=True), default=None,
              help="Open loop or --renew: seconds to run.")
@click.option("--renew", is_flag=True, help="After registering every user, renewals as MNs make them, for --duration.")
@click.option("--lifetime", type=click.IntRange(1, 65535), default=None,
              help="Lifetime to ask for in every RRQ (default: the user's, 300 s).")
@click.option("--backend", type=click.Choice(["auto", "xfrm", "strongswan", "none"]), default="auto",
              show_default=True, help="IPsec backend (none: Mobile IP + AAA only, no VPN paths).")
@click.option("--timeout", type=click.FloatRange(0.1, 60), default=10.0, show_default=True,
              help="Seconds to wait for one reply.")
@click.option("--profile", "profile", is_flag=True,
              help="Run every daemon and the generator under cProfile; print where the time goes.")
@click.option("--profile-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the .prof files go (kept; default /tmp/mipvpn-benchprof-TIME).")
@click.option("--seed", type=int, default=None, help="Seed of the renewal times.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def register(n: int, concurrency: int, rate: float | None, duration: float | None, renew: bool,
             lifetime: int | None, backend: str, timeout: float, profile: bool, profile_dir: Path | None,
             seed: int | None, as_json: bool) -> None:
    """Registrations/s and RRQ->RRP latency of N synthetic users through the AAA chain, in a lab of its own:
    closed loop (default), open loop (--rate, --duration) or steady renewals (--renew --duration)."""
    if renew and rate is not None:
        raise click.UsageError("--renew and --rate do not go together")
    if (rate is not None or renew) and duration is None:
        raise click.UsageError("--rate and --renew need --duration")
    if duration is not None and rate is None and not renew:
        raise click.UsageError("--duration goes with --rate or --renew")
    if profile_dir is not None:
        profile = True
    if profile and profile_dir is None:
        profile_dir = Path(f"/tmp/mipvpn-benchprof-{time.strftime('%Y%m%dT%H%M%S')}")
    mode = "open" if rate is not None else "renew" if renew else "closed"
    opts = Options(n, backend, mode, concurrency, timeout, rate or 0.0, duration or 0.0, lifetime,
                   profile_dir.resolve() if profile_dir else None, seed)
    res = run_as_root(lambda: run_bench(opts, echo=lambda s: click.echo(s, err=True)))
    if opts.profile_dir is not None:
        res["profiles"] = profiles(opts.profile_dir)
        click.echo(f"profiles kept in {opts.profile_dir}", err=True)
    click.echo(json.dumps(res, indent=2) if as_json else format_report(res))


def profiles(out_dir: Path) -> dict[str, Any]:
    """The top of each .prof the daemons and the generator wrote (at lab down)."""
    from daemons.bench.procstat import profile_summary

    out: dict[str, Any] = {}
    for path in sorted(out_dir.glob("*.prof")):
        try:
            out[path.stem] = profile_summary(path)
        except (OSError, ValueError, EOFError, TypeError) as exc:
            out[path.stem] = {"error": str(exc)}
    return out


# ---- the load generator (runs inside the drv namespace) -----------------------------------------


@dataclass
class Challenge:
    value: bytes
    agent: str  # the advertisement's source: where RRQs go
    care_of_address: str
    index: int  # how many advertisements had been heard, this one included


class Challenges:
    """The FA's challenge for every registration: the newest heard in an advertisement on our
    link, while it is younger than ``CHALLENGE_REUSE_S``; otherwise one solicitation (at most one
    unanswered, again after ``RESOLICIT_S``) and every registration waiting gets the challenge of
    the advertisement that answers it."""

    def __init__(self, interface: str) -> None:
        from daemons.runtime.net import icmp_socket

        self.sock = icmp_socket(interface)  # sends solicitations, receives whole IP packets
        self.heard = 0
        self.solicitations = 0
        self.solicited_at: float | None = None  # the unanswered solicitation, if any
        self.current: Challenge | None = None
        self.heard_at = 0.0
        self.fresh = asyncio.Event()  # set when an advertisement brings a challenge
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self.on_icmp)

    def solicit(self) -> None:
        from daemons.wire import mip

        now = time.monotonic()
        if self.solicited_at is not None and now - self.solicited_at < RESOLICIT_S:
            return
        with contextlib.suppress(OSError):
            self.sock.sendto(mip.AgentSolicitation().encode(), ("224.0.0.2", 0))
            self.solicitations += 1
            self.solicited_at = now

    def on_icmp(self) -> None:
        from daemons.wire import mip

        try:
            packet, _ = self.sock.recvfrom(65535)
        except BlockingIOError:
            return
        try:
            src, _dst, _ttl, icmp = mip.strip_ipv4_header(packet)
            adv = mip.decode_icmp(icmp)
        except mip.DecodeError:
            return
        if not isinstance(adv, mip.AgentAdvertisement) or adv.mobility is None or not adv.challenge:
            return
        self.heard += 1
        self.solicited_at = None
        coas = adv.mobility.care_of_addresses
        self.current = Challenge(adv.challenge, str(src), str(coas[0]) if coas else str(src), self.heard)
        self.heard_at = time.monotonic()
        self.fresh.set()
        self.fresh = asyncio.Event()

    async def take(self, newer_than: int = 0) -> Challenge:
        """A usable challenge, newer than the advertisement number ``newer_than`` (a retry after
        104/106 asks for one newer than the one refused)."""
        while True:
            ch = self.current
            if ch is not None and ch.index > newer_than and time.monotonic() - self.heard_at < CHALLENGE_REUSE_S:
                return ch
            self.solicit()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.fresh.wait(), RESOLICIT_S)


@dataclass
class Outcome:
    nai: str
    home_address: str
    code: int | None  # None: no reply within the timeout (lost, after MAX_ATTEMPTS)
    authentic: bool
    attempts: int
    latency_ms: float | None  # RRQ sent -> RRP received, last attempt
    challenge_wait_ms: float | None  # last attempt
    lifetime: int | None  # granted
    total_ms: float | None = None  # due (scheduled) -> RRP, challenge waits and retries included
    due_s: float | None = None  # when it was due, from the start of its phase
    replied_at: float | None = None  # perf_counter() at the RRP


class Generator:
    def __init__(self, users: list[Any], interface: str, timeout: float, lifetime: int | None = None) -> None:
        from daemons.runtime.net import IP_PKTINFO

        self.users = users
        self.timeout = timeout
        self.lifetime = lifetime  # requested in every RRQ instead of the user's own
        self.pktinfo = IP_PKTINFO
        self.ifindex = socket.if_nametoindex(interface)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
        self.sock.bind(("0.0.0.0", 0))
        self.sock.setblocking(False)
        # home address -> (identification, user, future of (reply bytes, receive time))
        self.outstanding: dict[str, tuple[int, Any, asyncio.Future[tuple[bytes, float]]]] = {}
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self.on_reply)

    def on_reply(self) -> None:
        from daemons.wire import mip

        while True:
            try:
                data, _ = self.sock.recvfrom(65535)
            except BlockingIOError:
                return
            now = time.perf_counter()
            try:
                reply = mip.decode_message(data)
            except mip.DecodeError:
                continue
            if not isinstance(reply, mip.RegistrationReply):
                continue
            entry = self.outstanding.get(str(reply.home_address))
            if entry is None or not mip.reply_matches_request(entry[0], reply.identification):
                continue
            if not entry[2].done():
                entry[2].set_result((data, now))

    def request(self, user: Any, ch: Challenge) -> tuple[int, bytes]:
        from daemons.wire import mip

        ident = mip.ntp_identification(time.time())
        rrq = mip.registration_request(home_address=user.home_address, home_agent=user.home_agent,
                                       care_of_address=ch.care_of_address, identification=ident,
                                       lifetime=self.lifetime or user.lifetime, nai=user.nai, mn_ha=user.mn_ha,
                                       challenge=ch.value, mn_aaa=user.mn_aaa)
        return ident, rrq.encode()

    async def register(self, user: Any, challenges: Challenges, due: float | None = None) -> Outcome:
        """One registration as an MN makes it (up to MAX_ATTEMPTS requests); ``due``: when it
        was meant to start (perf_counter), for ``total_ms``."""
        from daemons.wire import mip

        hoa = str(user.home_address)
        src = struct.pack("=I4s4s", self.ifindex, socket.inet_aton(hoa), socket.inet_aton("0.0.0.0"))
        out = Outcome(user.nai, hoa, None, False, 0, None, None, None)
        start = time.perf_counter() if due is None else due
        refused = 0  # the advertisement whose challenge a retry must not use again
        for attempt in range(1, MAX_ATTEMPTS + 1):
            t_wait = time.perf_counter()
            ch = await challenges.take(newer_than=refused)
            refused = ch.index
            ident, wire = self.request(user, ch)
            future: asyncio.Future[tuple[bytes, float]] = asyncio.get_running_loop().create_future()
            self.outstanding[hoa] = (ident, user, future)
            t_sent = time.perf_counter()
            self.sock.sendmsg([wire], [(socket.IPPROTO_IP, self.pktinfo, src)], 0, (ch.agent, mip.MIP_UDP_PORT))
            out.attempts = attempt
            out.challenge_wait_ms = round((t_sent - t_wait) * 1000, 3)
            try:
                data, t_recv = await asyncio.wait_for(future, self.timeout)
            except TimeoutError:
                out.code, out.latency_ms = None, None
                continue  # no reply: a new request with a new challenge
            finally:
                self.outstanding.pop(hoa, None)
            reply = mip.decode_message(data)
            assert isinstance(reply, mip.RegistrationReply)
            out.code, out.lifetime = int(reply.code), reply.lifetime
            out.latency_ms = round((t_recv - t_sent) * 1000, 3)
            out.total_ms = round((t_recv - start) * 1000, 3)
            out.replied_at = t_recv
            out.authentic = mip.verify(data, mip.EXT_MN_HA_AUTH, user.mn_ha.key, spi=user.mn_ha.spi)
            if out.code not in CHALLENGE_CODES:
                break
        return out


async def closed_loop(gen: Generator, challenges: Challenges, users: list[Any], concurrency: int) -> tuple[
        list[Outcome], float]:
    """Every user once, up to ``concurrency`` registrations outstanding; (outcomes in user order, wall s)."""
    queue: deque[Any] = deque(users)
    results: list[Outcome] = []

    async def worker() -> None:
        while queue:
            results.append(await gen.register(queue.popleft(), challenges))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(users)))))
    wall = time.perf_counter() - t0
    order = {u.nai: i for i, u in enumerate(users)}
    results.sort(key=lambda r: order[r.nai])
    return results, wall


async def open_loop(gen: Generator, challenges: Challenges, users: list[Any], rate: float,
                    duration: float) -> dict[str, Any]:
    """Registrations started at ``rate`` a second for ``duration`` seconds whatever the answers
    do (``load.arrivals``), each to the user idle longest (``load.UserPool``); a late start is
    measured (``start_lag_ms``) and its latency counted from when it was due."""
    pool: UserPool[Any] = UserPool(users)
    results: list[Outcome] = []
    lags: list[float] = []
    tasks: set[asyncio.Task[None]] = set()
    t0 = time.perf_counter()

    async def one(user: Any, due: float) -> None:
        try:
            out = await gen.register(user, challenges, due=due)
            out.due_s = round(due - t0, 4)
            results.append(out)
        finally:
            pool.give_back(user)

    schedule = arrivals(rate, duration)
    for offset in schedule:
        due = t0 + offset
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        lags.append((time.perf_counter() - due) * 1000)
        user = pool.take()
        if user is None:
            continue
        task = asyncio.create_task(one(user, due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    sent_s = time.perf_counter() - t0
    await asyncio.gather(*list(tasks))
    return {"rate": rate, "duration_s": duration, "offered": len(schedule), "busy_users": pool.busy,
            "sending_s": round(sent_s, 3), "wall_s": round(time.perf_counter() - t0, 3),
            "start_lag_ms": percentiles(lags), "registrations": [asdict(r) for r in results]}


async def renew_loop(gen: Generator, challenges: Challenges, users: list[Any], first: list[Outcome],
                     duration: float, rng: random.Random) -> dict[str, Any]:
    """Steady state: every user accepted in ``first`` renews before its binding runs out, at a
    random point of ``load.RENEW_WINDOW`` of the lifetime it was granted (``load.renewal_due``),
    for ``duration`` seconds; a renewal not accepted is tried again after a back-off, 1 s doubling
    up to 8 s (``RETRY_BACKOFF_S``), as an MN retransmits."""
    t0 = time.perf_counter()
    end = t0 + duration
    results: list[Outcome] = []
    by_nai = {u.nai: u for u in users}

    async def mn(user: Any, replied_at: float, granted: int) -> None:
        due = renewal_due(replied_at, granted, rng.random(), now=t0)
        backoff = RETRY_BACKOFF_S[0]
        while due < end:
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            out = await gen.register(user, challenges, due=due)
            out.due_s = round(due - t0, 4)
            results.append(out)
            if out.code == 0 and out.lifetime and out.replied_at is not None:
                due = renewal_due(out.replied_at, out.lifetime, rng.random())
                backoff = RETRY_BACKOFF_S[0]
            else:
                due = time.perf_counter() + backoff
                backoff = min(2 * backoff, RETRY_BACKOFF_S[1])

    await asyncio.gather(*(mn(by_nai[o.nai], o.replied_at, o.lifetime) for o in first
                           if o.code == 0 and o.lifetime and o.replied_at is not None))
    return {"duration_s": duration, "wall_s": round(time.perf_counter() - t0, 3),
            "renewing_users": sum(1 for o in first if o.code == 0 and o.lifetime),
            "registrations": [asdict(r) for r in results]}


async def drive_async(run_dir: Path, mode: str, concurrency: int, reply_timeout: float, own_address: str,
                      rate: float, duration: float, lifetime: int | None, seed: int | None) -> dict[str, Any]:
    from daemons.agents.routing import ip
    from daemons.provision.configs import read_synthetic_users

    users = read_synthetic_users(run_dir)
    # One address of our own on the link (solicitations, ARP); the synthetic users' home
    # addresses are ours through a few `local` routes (covering_blocks), not one address per user:
    # the kernel answers ARP for them and accepts IP_PKTINFO sources in them.
    await ip("address", "replace", f"{own_address}/32", "dev", INTERFACE)
    blocks = covering_blocks([u.home_address for u in users])
    batch = "".join(f"route replace local {b} dev lo\n" for b in blocks)
    proc = await asyncio.create_subprocess_exec("ip", "-batch", "-", stdin=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate(batch.encode())
    if proc.returncode != 0:
        raise RuntimeError(f"ip -batch: {err.decode().strip()}")
    challenges = Challenges(INTERFACE)
    first = await challenges.take()  # learn the agent
    await ip("route", "replace", "default", "via", first.agent, "dev", INTERFACE, "onlink")
    gen = Generator(users, INTERFACE, reply_timeout, lifetime)
    print(f"drv: {mode} loop, {len(users)} users ({len(blocks)} local routes) via {first.agent} "
          f"(care-of {first.care_of_address})", file=sys.stderr)
    when = time.time()
    out: dict[str, Any] = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when)), "started": when,
                           "agent": first.agent, "local_routes": len(blocks), "registrations": [], "wall_s": 0.0}
    if mode == "open":
        out["open"] = await open_loop(gen, challenges, users, rate, duration)
    else:
        results, wall = await closed_loop(gen, challenges, users, concurrency)
        out.update(registrations=[asdict(r) for r in results], wall_s=wall)
        if mode == "renew":
            print(f"drv: renewals for {duration:g} s", file=sys.stderr)
            out["renew"] = await renew_loop(gen, challenges, users, results, duration, random.Random(seed))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out.update(solicitations=challenges.solicitations, advertisements=challenges.heard,
               generator={"cpu_s": round(usage.ru_utime + usage.ru_stime, 3), "max_rss_kb": usage.ru_maxrss})
    return out


@click.command("drive", hidden=True)
@click.option("--run-dir", type=click.Path(path_type=Path), required=True)
@click.option("--mode", type=click.Choice(["closed", "open", "renew"]), default="closed")
@click.option("--concurrency", type=int, default=8)
@click.option("--timeout", type=float, default=10.0)
@click.option("--own-address", required=True)
@click.option("--rate", type=float, default=0.0)
@click.option("--duration", type=float, default=0.0)
@click.option("--lifetime", type=int, default=None)
@click.option("--seed", type=int, default=None)
def drive(run_dir: Path, mode: str, concurrency: int, timeout: float, own_address: str, rate: float,
          duration: float, lifetime: int | None, seed: int | None) -> None:
    """The load generator itself: run inside the generator's namespace by `register`."""
    click.echo(json.dumps(asyncio.run(drive_async(run_dir, mode, concurrency, timeout, own_address, rate, duration,
                                                  lifetime, seed))))


if __name__ == "__main__":
    if sys.argv[1:2] == ["drive"]:
        drive(sys.argv[2:])
    else:
        register()
