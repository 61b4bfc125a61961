"""`mipvpn bench register`: registrations per second through FA -> AAAF -> AAAH -> HA.

    mipvpn bench register --mns N [--concurrency C] [--backend auto|xfrm|strongswan|none] [--json]
    # without the main CLI wiring: .venv/bin/python -m daemons.bench.register --mns N ...

Brings up a lab of its own (run directory ``/tmp/mipvpn-benchreg-*``, namespace prefix
``mvrPID-``, always torn down, also on SIGTERM) from the default topology plus:

* N *synthetic* users ``benchK@home.example`` (topology users without an ``mn`` node), home
  addresses from the home prefix 198.18.100.0/24 not in use yet (at most 252). The lab
  provisions them like any user (VPN database, HA's mobile nodes) but runs no MN daemon for
  them; their MN-HA and MN-AAA keys are in ``RUN_DIR/bench-users.yaml`` (0600, see
  ``daemons.provision.configs``).
* a node ``drv`` (role mn, no user, so no MN daemon) attached to fa1's access segment: the
  load generator runs in its namespace (``python -m daemons.bench.register drive``, started with
  ``ip netns exec``). It puts every synthetic home address on its ``eth0`` as a /32 with a
  default route to the FA (onlink), exactly what an MN away from home does, and registers
  every user once as an MN would (RFC 5944 + RFC 3012 + RFC 4004): NAI, MN-HA authenticator,
  the FA's challenge, MN-AAA authenticator; one UDP socket, the source address of each RRQ
  chosen per user with IP_PKTINFO; up to C registrations outstanding.

Challenges: the FA accepts a challenge for ``challenge_window`` (8) advertisement intervals after
it advertised it, from every MN that heard it (spent per MN once it bought that MN a
registration), as MNs on one link share the multicast advertisements they hear. So the
generator uses the newest challenge heard for every registration while it is younger than
``CHALLENGE_REUSE_S``, and otherwise sends one Agent Solicitation (one outstanding at a time,
again after ``RESOLICIT_S``) and waits for the advertisement: the FA's per-source solicitation
limit never paces it. The FA runs with its default configuration. A registration the FA still
answers with 104/106 (unknown or stale challenge), or not at all within ``--timeout``, is sent
again as a new request with a newer challenge, as an MN would (at most 3 attempts). The latency of a registration is
its RRQ -> RRP round trip at the generator (the last attempt), not the wait for a challenge,
which is reported apart; registrations per second = accepted / wall time from the first
registration started to the last answered (challenge waits included). Where the time goes,
per stage, comes from the daemons' log lines (``STAGES``).

Afterwards it checks every reply was code 0 with a valid MN-HA authenticator, and asks the
daemons (control sockets) for the HA's bindings, fa1's visitors and the VPN paths the HA and
fa1 hold. It prints numbers; it never fails on a timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
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

AGENT = "fa1"  # the FA the generator is attached to
HOME_AGENT = "ha"
DRIVER = "drv"  # the generator's node (role mn, no user)
REALM = "home.example"
INTERFACE = "eth0"
CHALLENGE_REUSE_S = 2.0  # of the FA's window of 8 advertisement intervals (8 s by default): a wide margin
CHALLENGE_CODES = (104, 106)  # FA_UNKNOWN_CHALLENGE, FA_STALE_CHALLENGE: retried with a new challenge
MAX_ATTEMPTS = 3
RESOLICIT_S = 0.1
MAX_USERS = 252  # free addresses in the default home prefix 198.18.100.0/24 (the HA and mn1 use two)


# ---- the lab: default topology + synthetic users + the generator's node -------------------------


def bench_topology_data(n: int) -> dict[str, Any]:
    """The default topology plus ``drv`` on fa1's segment and N synthetic users (no ``mn``)."""
    from lab.topology import default_topology_path

    data = yaml.safe_load(default_topology_path().read_text())
    home = next(s for s in data["segments"] if s["owner"] == HOME_AGENT)
    used = {ipaddress.IPv4Address(home["address"])}
    used |= {ipaddress.IPv4Address(u["home_address"]) for u in data.get("users") or []}
    free = [a for a in ipaddress.IPv4Network(home["prefix"]).hosts() if a not in used]
    if n > len(free):
        raise click.ClickException(f"at most {len(free)} synthetic users fit in the home prefix {home['prefix']}")
    data["nodes"][DRIVER] = {"role": "mn", "attach": AGENT}
    data.setdefault("users", [])
    data["users"] += [{"nai": f"bench{k + 1}@{REALM}", "home_address": str(free[k]), "home_agent": HOME_AGENT}
                      for k in range(n)]
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


def run_bench(n: int, concurrency: int, backend: str, timeout: float, echo: Any = print) -> dict[str, Any]:
    from daemons.provision.configs import services as daemon_services
    from daemons.provision.kinds import load_topology
    from daemons.vpn.factory import choose_backend
    from lab.lab import Lab

    if backend == "none":
        name, reason = "none", "none requested: Mobile IP and AAA only, no VPN paths"
    else:
        name, reason = choose_backend(backend)
    data = bench_topology_data(n)
    run_dir = Path(tempfile.mkdtemp(prefix="mipvpn-benchreg-"))
    prefix = f"mvr{os.getpid() % 100000}-"
    topo_path = run_dir / "bench-topology.yaml"  # Lab.open reloads the topology from here
    topo_path.write_text(yaml.safe_dump(data, sort_keys=False))
    try:
        lab = Lab(run_dir, load_topology(topo_path), prefix, name)
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    driver: subprocess.Popen[str] | None = None
    echo(f"lab up in {run_dir} (namespaces {prefix}*), backend {name}, {n} synthetic users")
    try:
        t0 = time.monotonic()
        lab.up(capture=False, services=daemon_services)
        lab = Lab.open(run_dir)
        echo(f"lab up in {time.monotonic() - t0:.1f}s; waiting for mn1's own registration")
        mn_states = wait_registered(lab)
        argv = ["ip", "netns", "exec", lab.ns(DRIVER), sys.executable, "-m", "daemons.bench.register", "drive",
                "--run-dir", str(run_dir), "--concurrency", str(concurrency), "--timeout", str(timeout)]
        driver = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=None, text=True,
                                  cwd=Path(__file__).resolve().parent.parent)
        out, _ = driver.communicate()
        if driver.returncode != 0:
            raise click.ClickException(f"the load generator failed (exit {driver.returncode})")
        drive = json.loads(out)
        nais = {r["nai"] for r in drive["registrations"]}
        breakdown = stages(run_dir, nais, since=drive["started"] - 1)
        bindings = ask(run_dir, HOME_AGENT, "bindings")
        visitors = ask(run_dir, AGENT, "visitors")
        ha_paths = ask(run_dir, HOME_AGENT, "paths") if name != "none" else []
        fa_paths = ask(run_dir, AGENT, "paths") if name != "none" else []
        res = summarise(n, concurrency, name, reason, drive, nais, bindings, visitors, ha_paths, fa_paths,
                        mn_states)
        return {**res, "stages_ms": breakdown, "lab": {"run_dir": str(run_dir), "namespace_prefix": prefix}}
    finally:
        if driver is not None and driver.poll() is None:
            driver.kill()  # only the generator we started, by its own handle
            driver.wait()
        lab.down()
        echo(f"lab down ({run_dir} removed)")


def summarise(n: int, concurrency: int, backend: str, reason: str, drive: dict[str, Any], nais: set[str],
              bindings: Any, visitors: Any, ha_paths: Any, fa_paths: Any, mn_states: dict[str, str]) -> dict[str, Any]:
    regs = drive["registrations"]
    codes: dict[str, int] = {}
    for r in regs:
        codes[str(r["code"])] = codes.get(str(r["code"]), 0) + 1
    accepted = [r for r in regs if r["code"] == 0 and r["authentic"]]
    bench_bindings = [b for b in bindings if b.get("mn") in nais] if isinstance(bindings, list) else []
    bench_visitors = [v for v in visitors if v.get("mn") in nais] if isinstance(visitors, list) else []
    wall = drive["wall_s"]
    return {
        "when": drive["when"], "machine": machine(), "backend": backend, "backend_reason": reason,
        "mns": n, "concurrency": concurrency,
        "accepted": len(accepted), "all_accepted": len(accepted) == n, "reply_codes": codes,
        "unauthentic_replies": sum(1 for r in regs if r["code"] is not None and not r["authentic"]),
        "timeouts": sum(1 for r in regs if r["code"] is None),
        "retries": sum(r["attempts"] - 1 for r in regs),
        "bindings": len(bench_bindings),
        "bindings_total": len(bindings) if isinstance(bindings, list) else bindings,
        "bindings_match": len(bench_bindings) == n,
        "fa_visitors": len(bench_visitors),
        "paths": {"ha": count_paths(ha_paths, nais), AGENT: count_paths(fa_paths, nais)},
        "wall_s": round(wall, 3),
        "registrations_per_s": round(len(accepted) / wall, 1) if wall > 0 else None,
        "latency_ms": percentiles([r["latency_ms"] for r in accepted]),
        "challenge_wait_ms": percentiles([r["challenge_wait_ms"] for r in regs if r["challenge_wait_ms"] is not None]),
        "solicitations": drive["solicitations"], "advertisements_heard": drive["advertisements"],
        "other_mns": mn_states,
        "registrations": regs,
    }


def format_report(res: dict[str, Any]) -> str:
    m, lat, cw = res["machine"], res["latency_ms"], res["challenge_wait_ms"]

    def row(label: str, p: dict[str, Any]) -> str:
        if not p.get("n"):
            return f"  {label:<22} n=0"
        return (f"  {label:<22} {p['min']:>8.2f} {p['p50']:>8.2f} {p['p90']:>8.2f} {p['p99']:>8.2f} "
                f"{p['max']:>8.2f}   n={p['n']}")

    lines = [
        f"registration benchmark {res['when']}: {res['mns']} synthetic users through {AGENT} -> aaaf1 -> aaah -> ha,"
        f" up to {res['concurrency']} outstanding",
        f"backend {res['backend']} ({res['backend_reason']})",
        f"machine: {m['nproc']} cpus, kernel {m['kernel']} ({m['machine']}), python {m['python']}", "",
        f"accepted {res['accepted']}/{res['mns']} (reply codes {res['reply_codes']}, "
        f"{res['unauthentic_replies']} unauthentic, {res['timeouts']} timed out, "
        f"{res['retries']} retries)",
        f"{res['registrations_per_s']} registrations/s ({res['accepted']} in {res['wall_s']:.2f} s)", "",
        f"  {'ms':<22} {'min':>8} {'p50':>8} {'p90':>8} {'p99':>8} {'max':>8}",
        row("RRQ -> RRP", lat), row("wait for a challenge", cw), "",
        f"HA bindings: {res['bindings']} bench users ({res['bindings_total']} in all)"
        f"{'' if res['bindings_match'] else '  MISMATCH'}; {AGENT} visitors: {res['fa_visitors']}",
    ]
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
    lines.append(f"solicitations sent {res['solicitations']}, advertisements heard {res['advertisements_heard']}")
    return "\n".join(lines)


@click.command("register")
@click.option("--mns", "n", type=click.IntRange(1, MAX_USERS), default=20, show_default=True,
              help="Synthetic users to register (home prefix 198.18.100.0/24).")
@click.option("--concurrency", type=click.IntRange(1, 64), default=8, show_default=True,
              help="Registrations outstanding at once.")
@click.option("--backend", type=click.Choice(["auto", "xfrm", "strongswan", "none"]), default="auto",
              show_default=True, help="IPsec backend (none: Mobile IP + AAA only, no VPN paths).")
@click.option("--timeout", type=click.FloatRange(1, 60), default=10.0, show_default=True,
              help="Seconds to wait for one reply.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def register(n: int, concurrency: int, backend: str, timeout: float, as_json: bool) -> None:
    """Registrations/s and RRQ->RRP latency of N synthetic users through the AAA chain, in a lab of its own."""
    res = run_as_root(lambda: run_bench(n, concurrency, backend, timeout, echo=lambda s: click.echo(s, err=True)))
    click.echo(json.dumps(res, indent=2) if as_json else format_report(res))


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
    code: int | None  # None: no reply within the timeout
    authentic: bool
    attempts: int
    latency_ms: float | None  # RRQ sent -> RRP received, last attempt
    challenge_wait_ms: float | None  # last attempt
    lifetime: int | None


class Generator:
    def __init__(self, users: list[Any], interface: str, timeout: float) -> None:
        from daemons.runtime.net import IP_PKTINFO

        self.users = users
        self.timeout = timeout
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
                                       lifetime=user.lifetime, nai=user.nai, mn_ha=user.mn_ha, challenge=ch.value,
                                       mn_aaa=user.mn_aaa)
        return ident, rrq.encode()

    async def register(self, user: Any, challenges: Challenges) -> Outcome:
        from daemons.wire import mip

        hoa = str(user.home_address)
        src = struct.pack("=I4s4s", self.ifindex, socket.inet_aton(hoa), socket.inet_aton("0.0.0.0"))
        out = Outcome(user.nai, hoa, None, False, 0, None, None, None)
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
            out.authentic = mip.verify(data, mip.EXT_MN_HA_AUTH, user.mn_ha.key, spi=user.mn_ha.spi)
            if out.code not in CHALLENGE_CODES:
                break
        return out


async def drive_async(run_dir: Path, concurrency: int, reply_timeout: float) -> dict[str, Any]:
    from daemons.agents.routing import ip
    from daemons.provision.configs import read_synthetic_users

    users = read_synthetic_users(run_dir)
    challenges = Challenges(INTERFACE)
    first = await challenges.take()  # learn the agent
    batch = "".join(f"address replace {u.home_address}/32 dev {INTERFACE}\n" for u in users)
    proc = await asyncio.create_subprocess_exec("ip", "-batch", "-", stdin=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate(batch.encode())
    if proc.returncode != 0:
        raise RuntimeError(f"ip -batch: {err.decode().strip()}")
    await ip("route", "replace", "default", "via", first.agent, "dev", INTERFACE, "onlink")
    gen = Generator(users, INTERFACE, reply_timeout)
    queue: deque[Any] = deque(users)
    results: list[Outcome] = []
    print(f"drv: registering {len(users)} users via {first.agent} (care-of {first.care_of_address}), "
          f"up to {concurrency} outstanding", file=sys.stderr)

    async def worker() -> None:
        while queue:
            results.append(await gen.register(queue.popleft(), challenges))

    when = time.time()
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(users)))))
    wall = time.perf_counter() - t0
    order = {u.nai: i for i, u in enumerate(users)}
    results.sort(key=lambda r: order[r.nai])
    return {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when)), "started": when, "wall_s": wall,
            "agent": first.agent, "solicitations": challenges.solicitations, "advertisements": challenges.heard,
            "registrations": [asdict(r) for r in results]}


@click.command("drive", hidden=True)
@click.option("--run-dir", type=click.Path(path_type=Path), required=True)
@click.option("--concurrency", type=int, default=8)
@click.option("--timeout", type=float, default=10.0)
def drive(run_dir: Path, concurrency: int, timeout: float) -> None:
    """The load generator itself: run inside the generator's namespace by `register`."""
    click.echo(json.dumps(asyncio.run(drive_async(run_dir, concurrency, timeout))))


if __name__ == "__main__":
    if sys.argv[1:2] == ["drive"]:
        drive(sys.argv[2:])
    else:
        register()
