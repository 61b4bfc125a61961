"""`mipvpn bench handover`: how long a move interrupts MN <-> CN traffic, and where the time goes.

    mipvpn bench handover [--moves N] [--rate 1000] [--dwell 2] [--backend auto]
                          [--smooth-handoff both|on|off] [--peer cn|cn2] [--json]
    # without the main CLI wiring: .venv/bin/python -m daemons.bench.handover [--moves N] ...

Brings up its own default lab (a run directory under /tmp and the namespace prefix
``mvbPID-``, always torn down), runs a UDP probe between the peer (``cn`` behind the static
CN-GW: HA-anchored; ``cn2`` behind the dynamic one: route optimised) and ``mn1`` in both directions
(lab.probe, one process per namespace), and moves mn1 until it has made N intra-domain moves
(fa1 <-> fa2, flow F2: the AAAF answers locally) and N inter-domain moves (to or from fa3,
flow F3: through the new domain's AAAF to the AAAH). For every move it reports, per
direction, the interruption (last packet before the move -> first packet after it) and the
packets lost, and the signalling breakdown from the daemons' event records: the MN's own
``events`` list (control socket) and every daemon's log lines, as milliseconds after the
move started (the moment before the MN's port is taken down). Then the median and worst per
move type. With ``--smooth-handoff both`` (the default) the whole move plan runs twice, first
with F6 (the old FA forwards to the new one for a while) and then without, switched on every
FA through its control socket. It prints numbers; it never fails on a timing.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from daemons.bench.kit import machine, run_as_root
from daemons.provision.configs import control_socket
from daemons.provision.demo import (
    EventCollector,
    Move,
    ProbePair,
    addresses_for,
    analyse,
    median_and_worst,
    plot_timeline,
    read_daemon_events,
)
from daemons.provision.kinds import load_topology
from daemons.runtime import control
from lab.lab import Lab, LabError
from lab.topology import Topology

MN = "mn1"
PEERS = ("cn", "cn2")  # behind the static CN-GW (HA-anchored) / the dynamic one (route optimised)

# The story of one handover, in protocol order: (label, who, event name). ``who`` is a role
# relative to the move: the MN, the agent it moves to / from, that agent's AAA, the AAAH, the HA,
# the peer's CN-GW (route optimisation: the HA's Binding Update).
STEPS: list[tuple[str, str, str]] = [
    ("MN link down", "mn", "link.down"),
    ("MN link up", "mn", "link.up"),
    ("MN solicitation sent", "mn", "solicitation.sent"),
    ("MN agent found", "mn", "agent.found"),
    ("MN RRQ sent", "mn", "rrq.sent"),
    ("FA RRQ received", "new_fa", "rrq.received"),
    ("FA AMR sent", "new_fa", "amr.sent"),
    ("AAAF AMR received", "aaaf", "amr.received"),
    ("AAAF answered locally", "aaaf", "amr.answered_locally"),
    ("AAAH AMR received", "aaah", "amr.received"),
    ("AAAH HAR sent", "aaah", "har.sent"),
    ("HA HAR received", "ha", "har.received"),
    ("FA AMA received", "new_fa", "ama.received"),
    ("HA RRQ received", "ha", "rrq.received"),
    ("HA binding updated", "ha", "binding.updated"),
    ("HA path installed", "ha", "path.installed"),
    ("HA BU sent to CN-GW", "ha", "bu.sent"),
    ("CN-GW BU received", "cngw", "bu.received"),
    ("CN-GW path installed", "cngw", "path.installed"),
    ("HA BA received", "ha", "ba.received"),
    ("HA RRP sent", "ha", "rrp.sent"),
    ("FA path installed", "new_fa", "path.installed"),
    ("FA RRP relayed", "new_fa", "rrp.relayed"),
    ("MN RRP received", "mn", "rrp.received"),
    ("MN registered", "mn", "registered"),
    ("FA BU sent", "new_fa", "bu.sent"),
    ("old FA BU received", "old_fa", "bu.received"),
    ("old FA path removed", "old_fa", "path.removed"),
    ("old FA forwarding up", "old_fa", "forwarding.up"),
    ("FA forwarding up", "new_fa", "forwarding.up"),
]
# --smooth-handoff: which F6 settings to measure, in this order (the whole move plan per setting).
SMOOTH_HANDOFF_PHASES = {"both": (True, False), "on": (True,), "off": (False,)}
LOG_SLACK_S = 0.002  # log stamps are truncated to the millisecond


@dataclass
class Plan:
    dst: str
    kind: str  # "intra-domain" | "inter-domain"


def move_kind(topo: Topology, a: str, b: str) -> tuple[str, str]:
    da, db = topo.nodes[a].domain, topo.nodes[b].domain
    if da == db:
        return "intra-domain", f"intra-domain ({da})"
    return "inter-domain", f"inter-domain ({' <-> '.join(sorted([str(da), str(db)]))})"


def plan_moves(topo: Topology, start: str, n: int) -> list[Plan]:
    """Moves until there are at least ``n`` of each kind: always the kind done fewer times
    when the current agent allows it, preferring to return to the starting agent."""
    agents = [s.owner for s in topo.segments if topo.nodes[s.owner].role == "fa"]
    counts = {"intra-domain": 0, "inter-domain": 0}
    loc, plan = start, []
    while min(counts.values()) < n:
        options: dict[str, list[str]] = {"intra-domain": [], "inter-domain": []}
        for b in agents:
            if b != loc:
                options[move_kind(topo, loc, b)[0]].append(b)
        kinds = sorted((k for k in counts if options[k]), key=lambda k: (counts[k], k != "intra-domain"))
        if not kinds:
            raise LabError(f"no agent to move to from {loc}")
        kind = kinds[0]
        dst = start if start in options[kind] else options[kind][0]
        plan.append(Plan(dst, kind))
        counts[kind] += 1
        loc = dst
    return plan


def roles_for(topo: Topology, src: str | None, dst: str, peer: str = "cn") -> dict[str, str | None]:
    domain = topo.nodes[dst].domain
    aaa = topo.domains.get(domain or "", {}).get("aaa") if domain else None
    return {
        "mn": MN, "new_fa": dst, "old_fa": src, "aaaf": aaa, "cngw": topo.nodes[peer].upstream,
        "aaah": next((n.name for n in topo.nodes.values() if n.role == "aaah"), None),
        "ha": next((n.name for n in topo.nodes.values() if n.role == "ha"), None),
    }


def breakdown(move: Move, t_end: float, roles: dict[str, str | None], mn_events: list[dict[str, Any]],
              log_events: list[dict[str, Any]]) -> dict[str, float | None]:
    """First occurrence of each step after the move, in ms after the move started."""
    out: dict[str, float | None] = {}
    for label, who, event in STEPS:
        node = roles.get(who)
        if node is None:
            out[label] = None
            continue
        if who == "mn" and mn_events:
            source = [e for e in mn_events if e.get("event") == event]
            slack = 0.0
        else:
            source = [e for e in log_events if e["node"] == node and e["event"] == event]
            slack = LOG_SLACK_S
        t = next((float(e["t"]) for e in source if move.t - slack <= float(e["t"]) < t_end), None)
        out[label] = None if t is None else round(max(0.0, t - move.t) * 1000, 1)
    return out


def set_smooth_handoff(lab: Lab, topo: Topology, enabled: bool) -> None:
    """Switch F6 on every FA (control command; it applies from the next move)."""
    for fa in (n.name for n in topo.nodes.values() if n.role == "fa"):
        control.call(control_socket(lab.run_dir, fa), "smooth-handoff", enabled=enabled)


def run_bench(n: int, rate: float, dwell: float, backend: str, timeline: Path | None,
              echo: Any = print, smooth_handoff: str = "both", peer: str = "cn",
              keep_logs: Path | None = None) -> dict[str, Any]:
    from daemons.provision.configs import services as daemon_services
    from daemons.vpn.factory import choose_backend

    topo = load_topology(None)
    name, reason = choose_backend(backend)
    run_dir = Path(tempfile.mkdtemp(prefix="mipvpn-benchho-"))
    prefix = f"mvb{os.getpid() % 100000}-"
    lab = Lab(run_dir, topo, prefix, name)
    echo(f"lab up in {run_dir} (namespaces {prefix}*), backend {name}")
    try:
        lab.up(capture=False, services=daemon_services)
        lab = Lab.open(run_dir)  # with the health map (control sockets) recorded by up()
        start = lab.network.attachment(MN) or "fa1"
        plan = plan_moves(topo, start, n)
        hoa, peer_addr = addresses_for(lab, MN, peer)
        probes = ProbePair(lab, (peer, peer_addr), (MN, hoa), run_dir / "bench", rate=rate)
        collector = EventCollector(lab, MN)
        moves: list[Move] = []
        f6: list[bool] = []  # per move: smooth handoff on?
        phases = SMOOTH_HANDOFF_PHASES[smooth_handoff]
        try:
            probes.start()
            probes.wait_flowing()
            time.sleep(dwell)
            for phase, enabled in enumerate(phases):
                set_smooth_handoff(lab, topo, enabled)
                if phase:  # from wherever the previous phase left the MN
                    plan = plan_moves(topo, moves[-1].dst if moves else start, n)
                for p in plan:
                    t = time.time()
                    src = lab.move(MN, p.dst)
                    moves.append(Move(len(moves) + 1, MN, src, p.dst, t, time.time()))
                    f6.append(enabled)
                    echo(f"  move {len(moves)}/{len(plan) * len(phases)}: {src} -> {p.dst} "
                         f"({move_kind(topo, src or p.dst, p.dst)[1]}, smooth handoff {'on' if enabled else 'off'})")
                    time.sleep(dwell)
                    collector.fetch()
        finally:
            probes.stop()
        collector.fetch()
        mn_events = collector.events()
        log_events = read_daemon_events(run_dir, since=probes.started_at - 1)
        analyse(moves, probes, probes.stopping_at, mn_events)
        rows = []
        for i, m in enumerate(moves):
            t_end = moves[i + 1].t if i + 1 < len(moves) else probes.stopping_at
            kind, label = move_kind(topo, m.src or m.dst, m.dst)
            rows.append({"index": m.index, "from": m.src, "to": m.dst, "kind": kind, "label": label,
                         "smooth_handoff": f6[i], "directions": m.directions,
                         "steps_ms": breakdown(m, t_end, roles_for(topo, m.src, m.dst, peer), mn_events,
                                               log_events)})
        if timeline is not None:
            wanted = {(roles_for(topo, None, "fa1", peer)[w] or "", e) for _, w, e in STEPS}
            wanted |= {(fa, e) for fa in ("fa1", "fa2", "fa3") for _, w, e in STEPS if w in ("new_fa", "old_fa")}
            wanted |= {("aaaf1", "amr.received"), ("aaaf2", "amr.received"), ("aaaf1", "amr.answered_locally")}
            extra = [e for e in log_events if (e["node"], e["event"]) in wanted and e["node"] != MN]
            plot_timeline(timeline, probes, moves, mn_events, extra_events=extra,
                          title=f"mipvpn bench handover: {peer} <-> {MN}, UDP {rate:g}/s, backend {name}")
        return {"machine": machine(), "backend": name, "backend_reason": reason, "peer": peer,
                "peer_gateway": f"{topo.nodes[peer].upstream} ({topo.mode(topo.nodes[peer].upstream or '')})",
                "rate": rate, "dwell": dwell,
                "moves_per_kind": n, "moves": rows, "summary": summarise(rows, probes.directions),
                "probe": probes.summaries(), "timeline": str(timeline) if timeline else None,
                "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(probes.started_at))}
    finally:
        if keep_logs is not None:  # the daemons' and charons' logs, before down removes them
            shutil.copytree(run_dir / "logs", keep_logs, dirs_exist_ok=True)
            echo(f"logs copied to {keep_logs}")
        lab.down()
        echo(f"lab down ({run_dir} removed)")


def summarise(rows: list[dict[str, Any]], directions: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind, enabled in itertools.product(("intra-domain", "inter-domain"), (True, False)):
        sel = [r for r in rows if r["kind"] == kind and r["smooth_handoff"] == enabled]
        if not sel:
            continue
        out[f"{kind}, smooth handoff {'on' if enabled else 'off'}"] = {
            "moves": len(sel),
            "labels": sorted({r["label"] for r in sel}),
            "resumed": {d: sum(1 for r in sel if r["directions"][d]["resumed"]) for d in directions},
            "interruption_ms": {d: median_and_worst([r["directions"][d]["interruption_ms"] for r in sel])
                                for d in directions},
            "lost": {d: median_and_worst([r["directions"][d]["lost"] for r in sel]) for d in directions},
            "disrupted_ms": {d: median_and_worst([r["directions"][d]["disrupted_ms"] for r in sel])
                             for d in directions},
            "lost_in_window": {d: median_and_worst([r["directions"][d]["lost_in_window"] for r in sel])
                               for d in directions},
            "steps_ms": {label: median_and_worst([r["steps_ms"][label] for r in sel]) for label, _, _ in STEPS},
        }
    return out


def _num(v: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def format_report(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [f"handover benchmark {res['when']}: backend {res['backend']} ({res['backend_reason']})",
             f"machine: {m['nproc']} cpus, kernel {m['kernel']} ({m['machine']}), python {m['python']}; "
             f"UDP probe {res['rate']:g}/s each way, {res['dwell']:g}s between moves; "
             f"peer {res['peer']} behind {res['peer_gateway']}", ""]
    dirs = list(res["probe"])
    lines.append(f"{'#':>3} {'move':<10} {'kind':<13} {'F6':<3} "
                 + " ".join(f"{d + ' ms':>14} {'lost':>5}" for d in dirs) + f" {'registered':>10}")
    for r in res["moves"]:
        cells = []
        for d in dirs:
            x = r["directions"][d]
            if not x["resumed"]:
                cells.append(f"{'NO RESUME':>14} {'-':>5}")
            else:
                cells.append(f"{_num(x['interruption_ms']):>14} {_num(x['lost'], '{}'):>5}")
        lines.append(f"{r['index']:>3} {r['from'] + '->' + r['to']:<10} {r['kind']:<13} "
                     f"{'on' if r['smooth_handoff'] else 'off':<3} " + " ".join(cells)
                     + f" {_num(r['steps_ms']['MN registered']):>10}")
    for kind, s in res["summary"].items():
        lines += ["", f"{kind}: {s['moves']} moves, {'; '.join(s['labels'])}",
                  f"  {'':<26} {'median':>9} {'worst':>9}"]
        for d in dirs:
            i, lo = s["interruption_ms"][d], s["lost"][d]
            lines.append(f"  {'interruption ' + d + ', ms':<26} {_num(i['median']):>9} {_num(i['worst']):>9}"
                         f"   (resumed {s['resumed'][d]}/{s['moves']})")
            lines.append(f"  {'lost ' + d + ', packets':<26} {_num(lo['median'], '{:.0f}'):>9} "
                         f"{_num(lo['worst'], '{:.0f}'):>9}")
            di, lw = s["disrupted_ms"][d], s["lost_in_window"][d]
            lines.append(f"  {'  disrupted span, ms':<26} {_num(di['median']):>9} {_num(di['worst']):>9}")
            lines.append(f"  {'  lost around the move':<26} {_num(lw['median'], '{:.0f}'):>9} "
                         f"{_num(lw['worst'], '{:.0f}'):>9}")
        lines.append("  signalling, ms after the move started:")
        for label, _, _ in STEPS:
            st = s["steps_ms"][label]
            if st["n"]:
                lines.append(f"    {label:<24} {_num(st['median']):>9} {_num(st['worst']):>9}   n={st['n']}")
    for d, p in res["probe"].items():
        lines.append(f"probe {d}: sent {p.get('sent')} ({p.get('send_errors')} send errors, "
                     f"{p.get('send_blocked')} blocked: buffer full), "
                     f"received {p.get('received')}")
    if res.get("timeline"):
        lines.append(f"timeline: {res['timeline']}")
    return "\n".join(lines)


@click.command("handover")
@click.option("--moves", "n", type=click.IntRange(1, 50), default=5, show_default=True,
              help="Moves of each kind (intra-domain fa1<->fa2, inter-domain to/from fa3).")
@click.option("--rate", type=click.FloatRange(10, 5000), default=1000.0, show_default=True,
              help="Probe datagrams per second, each direction.")
@click.option("--dwell", type=click.FloatRange(0.5, 60), default=2.0, show_default=True,
              help="Seconds between moves.")
@click.option("--backend", type=click.Choice(["auto", "xfrm", "strongswan"]), default="auto", show_default=True)
@click.option("--timeline", type=click.Path(path_type=Path), default=None,
              help="Also draw a timeline PNG here (needs matplotlib).")
@click.option("--smooth-handoff", type=click.Choice(list(SMOOTH_HANDOFF_PHASES)), default="both", show_default=True,
              help="Measure with F6 (the old FA forwards to the new one), without, or both (the moves twice).")
@click.option("--peer", type=click.Choice(PEERS), default="cn", show_default=True,
              help="The correspondent: cn (static CN-GW, HA-anchored) or cn2 (dynamic CN-GW, route optimised).")
@click.option("--keep-logs", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Copy the daemons' and charons' logs here before the lab goes.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def handover(n: int, rate: float, dwell: float, backend: str, timeline: Path | None, smooth_handoff: str,
             peer: str, keep_logs: Path | None, as_json: bool) -> None:
    """Interruption and signalling breakdown of MN handovers in a lab of its own."""
    res = run_as_root(lambda: run_bench(n, rate, dwell, backend, timeline.absolute() if timeline else None,
                                        echo=lambda s: click.echo(s, err=True), smooth_handoff=smooth_handoff,
                                        peer=peer, keep_logs=keep_logs.absolute() if keep_logs else None))
    click.echo(json.dumps(res, indent=2) if as_json else format_report(res))


if __name__ == "__main__":
    handover()
