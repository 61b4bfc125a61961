"""`mipvpn lab demo`: a live UDP probe between a correspondent and a mobile node while the
mobile node moves, then a per-move summary and a timeline picture.

The lab stays ignorant of protocol details: the demo moves links, runs probes (lab.probe,
one per namespace), and reads the mobile node's event list (its control socket's ``events``
command) and the daemons' log lines as opaque timestamped records. Everything it writes goes
to ``RUN_DIR/demo/``: ``probe-NODE.jsonl`` (what NODE received), ``summary.json``,
``timeline.png``. Pcaps, if captures run, are in ``RUN_DIR/captures``.

The pieces (ProbePair, analyse_direction, read_daemon_events, plot_timeline) are shared with
the handover benchmark (daemons/benchho.py).
"""

from __future__ import annotations

import calendar
import json
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemons.provision.configs import KEYLOG_DIR
from daemons.runtime import control
from lab.lab import Lab, LabError
from lab.probe import DEFAULT_PORT

ROOT = Path(__file__).resolve().parent.parent
DEMO_DIR = "demo"  # under the run directory; "demo-PEER" for a peer other than DEFAULT_PEER
DEFAULT_PEER = "cn"


# ---- probes --------------------------------------------------------------------------------
@dataclass
class Arrival:
    seq: int
    sent: float
    recv: float


@dataclass
class ProbeEnd:
    node: str
    address: str  # where the other end sends to
    out: Path
    proc: subprocess.Popen[bytes] | None = None


class ProbePair:
    """Two lab.probe processes, one in each node's namespace, each sending to the other."""

    def __init__(self, lab: Lab, a: tuple[str, str], b: tuple[str, str], out_dir: Path,
                 rate: float = 200.0, port: int = DEFAULT_PORT) -> None:
        self.lab = lab
        self.rate = rate
        self.port = port
        self.out_dir = out_dir
        self.ends = [ProbeEnd(node, addr, out_dir / f"probe-{node}.jsonl") for node, addr in (a, b)]
        self.started_at = 0.0
        self.stopping_at = 0.0
        self.stopped_at = 0.0

    def direction(self, receiver: str) -> str:
        sender = next(e.node for e in self.ends if e.node != receiver)
        return f"{sender}->{receiver}"

    @property
    def directions(self) -> list[str]:
        return [self.direction(e.node) for e in self.ends]

    def start(self, timeout: float = 15.0) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for me, peer in (self.ends, self.ends[::-1]):
            ready = self.out_dir / f"probe-{me.node}.ready"
            ready.unlink(missing_ok=True)
            me.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.lab.ns(me.node), sys.executable, "-m", "lab.probe",
                 "--peer", peer.address, "--port", str(self.port), "--rate", str(self.rate),
                 "--out", str(me.out), "--ready", str(ready)],
                cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )
        deadline = time.monotonic() + timeout
        for me in self.ends:
            ready = self.out_dir / f"probe-{me.node}.ready"
            while not ready.exists():
                assert me.proc is not None
                if me.proc.poll() is not None or time.monotonic() > deadline:
                    err = me.proc.stderr.read().decode(errors="replace") if me.proc.poll() is not None \
                        and me.proc.stderr else ""
                    self.stop()
                    raise LabError(f"probe in {me.node} did not start: {err.strip()[-500:]}")
                time.sleep(0.01)
        self.started_at = time.time()

    def wait_flowing(self, timeout: float = 20.0) -> None:
        """Until both ends have received something (the path is up end to end)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(e.out.exists() and e.out.stat().st_size > 0 for e in self.ends):
                return
            time.sleep(0.05)
        sizes = ", ".join(f"{e.node}: {e.out.stat().st_size if e.out.exists() else 0} bytes" for e in self.ends)
        raise LabError(f"no probe traffic in both directions within {timeout:.0f}s ({sizes})")

    def stop(self) -> None:
        """Stop the two probe processes we started, by their PIDs."""
        self.stopping_at = time.time()  # the end of the measurement: nothing is sent after it
        for e in self.ends:
            if e.proc is not None and e.proc.poll() is None:
                e.proc.send_signal(signal.SIGTERM)
        for e in self.ends:
            if e.proc is None:
                continue
            try:
                e.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                e.proc.kill()
                e.proc.wait(timeout=5)
            if e.proc.stderr:
                e.proc.stderr.close()
        self.stopped_at = time.time()

    def arrivals(self) -> dict[str, list[Arrival]]:
        """Per direction ("sender->receiver"), what arrived, in arrival order."""
        return {self.direction(e.node): read_arrivals(e.out) for e in self.ends}

    def summaries(self) -> dict[str, dict[str, Any]]:
        """Per direction "a->b": what a sent (and how many sends failed) and b received."""
        own = {e.node: read_summary(e.out) for e in self.ends}
        out = {}
        for e in self.ends:
            sender = next(x.node for x in self.ends if x.node != e.node)
            out[self.direction(e.node)] = {"sent": own[sender].get("sent"),
                                           "send_errors": own[sender].get("send_errors"),
                                           "send_blocked": own[sender].get("send_blocked"),
                                           "received": own[e.node].get("received"),
                                           "rate": own[sender].get("rate")}
        return out


def read_arrivals(path: Path) -> list[Arrival]:
    out = []
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill
        if "seq" in rec:
            out.append(Arrival(int(rec["seq"]), float(rec["sent"]), float(rec["recv"])))
    out.sort(key=lambda a: a.recv)
    return out


def read_summary(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    for line in reversed(path.read_text().splitlines()):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("summary"):
            return rec
    return {}


def analyse_direction(arrivals: Sequence[Arrival], t_move: float, t_end: float, pre: float = 0.5,
                      rate: float | None = None) -> dict[str, Any]:
    """The interruption a move at ``t_move`` caused in one direction.

    Looks at arrivals from ``pre`` seconds before the move (or from the last one before it, if
    the direction was already silent) to ``t_end`` (the next move or the end of the probe) and
    takes the longest silence that ends after the move: from the last packet before it to the
    first packet after it (``interruption_ms``); a silence that lasts
    until ``t_end`` counts too, and then the direction has not ``resumed``. ``lost`` counts the
    sequence numbers in between that never arrived; ``received_after`` the packets that
    arrived after the silence; ``later_gaps`` further silences of more than 10 ms (and 3 probe
    intervals) after it (the path came back, then broke again); ``disrupted_ms`` the span from
    the first to the end of the last such silence around the move; ``lost_in_window`` every
    sequence number missing in the window.
    """
    earlier = [a for a in arrivals if a.recv < t_move]
    lo = t_move - pre
    if earlier and earlier[-1].recv < lo:  # silent since before the window: start at the last packet
        lo = earlier[-1].recv
    window = [a for a in arrivals if lo <= a.recv < t_end]
    before = [a for a in window if a.recv < t_move]
    result: dict[str, Any] = {"interruption_ms": None, "lost": None, "last_before": None, "first_after": None,
                              "from_move_ms": None, "received_before": len(before), "received_after": 0,
                              "lost_in_window": _missing(window), "later_gaps": 0, "silent_until_end_ms": None,
                              "disrupted_ms": None,
                              "resumed": False}
    # Candidate silences: (start, end, index of the arrival that ends it or None if none does).
    candidates: list[tuple[float, float, int | None]] = []
    if not before:
        candidates.append((t_move, window[0].recv if window else t_end, 0 if window else None))
    for i in range(max(1, len(before)), len(window)):
        candidates.append((window[i - 1].recv, window[i].recv, i))
    limit = 3.0 / rate if rate else 0.05  # a silence: more than 3 probe intervals
    if window and window[-1].recv >= t_move and t_end - window[-1].recv > limit:
        candidates.append((window[-1].recv, t_end, None))  # silent until the next move / the end
    elif window and window[-1].recv < t_move:
        candidates.append((window[-1].recv, t_end, None))  # nothing at all after the move
    start, end, i = max(candidates, key=lambda c: c[1] - c[0])
    if i is None:
        result["silent_until_end_ms"] = round((t_end - start) * 1000, 3)
        result["last_before"] = start if window else None
        result["received_after"] = sum(1 for a in window if a.recv >= t_move)
        return result
    first = window[i]
    last = window[i - 1] if i > 0 else None
    seen = {a.seq for a in window}
    lost = sum(1 for s in range(last.seq + 1, first.seq) if s not in seen) if last else None
    big = max(limit, 0.01)
    later = sum(1 for k in range(i + 1, len(window)) if window[k].recv - window[k - 1].recv > big)
    if t_end - window[-1].recv > big:
        later += 1
    # The whole disturbance: silences of 10 ms or more from around the move to 1 s after it
    # (a path can come back in bursts), from the first one's start to the last one's end.
    spans = [(window[k - 1].recv, window[k].recv) for k in range(1, len(window))
             if window[k].recv - window[k - 1].recv > big and t_move - big <= window[k].recv
             and window[k - 1].recv <= t_move + 1.0]
    result.update({
        "disrupted_ms": round((spans[-1][1] - spans[0][0]) * 1000, 3) if spans else None,
        "interruption_ms": round((end - start) * 1000, 3) if last else None,
        "lost": lost,
        "last_before": last.recv if last else None,
        "first_after": first.recv,
        "from_move_ms": round((first.recv - t_move) * 1000, 3),
        "received_after": len(window) - i,
        "later_gaps": later,
        "resumed": True,
    })
    return result


def _missing(window: Sequence[Arrival]) -> int:
    seqs = {a.seq for a in window}
    return (max(seqs) - min(seqs) + 1 - len(seqs)) if seqs else 0


# ---- event records -------------------------------------------------------------------------
class EventCollector:
    """A node's event list, fetched as often as wanted and merged (the node keeps only its
    last few hundred). Records are opaque: ``{"t": epoch seconds, "event": name, ...}``."""

    def __init__(self, lab: Lab, node: str) -> None:
        self.node = node
        self.socket = lab.health.get(f"daemon:{node}")
        self.records: dict[tuple[float, str], dict[str, Any]] = {}
        self.error: str | None = None

    def fetch(self) -> None:
        if self.socket is None:
            self.error = f"no control socket recorded for {self.node}"
            return
        try:
            for rec in control.call(self.socket, "events", timeout=5.0):
                if isinstance(rec, dict) and "t" in rec:
                    self.records[(float(rec["t"]), str(rec.get("event")))] = rec
        except (control.ControlUnavailable, ValueError) as exc:
            self.error = f"{self.node}: events unavailable: {exc}"

    def events(self) -> list[dict[str, Any]]:
        return [self.records[k] for k in sorted(self.records)]


LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3})Z (\w+) node=(\S+) (.*)$")
FIELD = re.compile(r'(\w[\w.]*)=("[^"]*"|\S*)')


def read_daemon_events(run_dir: Path, nodes: Sequence[str] | None = None, since: float = 0.0) -> list[dict[str, Any]]:
    """Every ``event=...`` line of RUN_DIR/logs/daemon-NODE.log at or after ``since``, as
    ``{"t", "node", "event", **fields}``, in time order (the logs have millisecond stamps)."""
    out = []
    for path in sorted((run_dir / "logs").glob("daemon-*.log")):
        node = path.stem.removeprefix("daemon-")
        if nodes is not None and node not in nodes:
            continue
        for line in path.read_text(errors="replace").splitlines():
            m = LOG_LINE.match(line)
            if not m:
                continue
            t = calendar.timegm(time.strptime(m.group(1)[:19], "%Y-%m-%dT%H:%M:%S")) + int(m.group(1)[20:]) / 1000
            if t < since:
                continue
            fields = {k: v.strip('"') for k, v in FIELD.findall(m.group(4))}
            if "event" not in fields:
                continue
            out.append({"t": t, "node": m.group(3), "level": m.group(2), **fields})
    out.sort(key=lambda r: r["t"])
    return out


# ---- the demo ------------------------------------------------------------------------------
@dataclass
class Move:
    index: int
    mn: str
    src: str | None
    dst: str
    t: float  # epoch seconds just before the link was moved
    t_done: float  # ...and when Lab.move returned
    directions: dict[str, dict[str, Any]] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "mn": self.mn, "from": self.src, "to": self.dst, "t": self.t,
                "move_ms": round((self.t_done - self.t) * 1000, 3), "directions": self.directions,
                "events": self.events}


def addresses_for(lab: Lab, mn: str, peer: str) -> tuple[str, str]:
    """(mobile node's home address, peer's first address) from the topology."""
    topo = lab.topology
    user = topo.user_of(mn)
    if mn not in topo.nodes or topo.nodes[mn].role != "mn" or user is None:
        raise LabError(f"{mn!r} is not a mobile node with a user in this lab")
    if peer not in topo.nodes:
        raise LabError(f"unknown node {peer!r}")
    addrs = topo.addresses(peer)
    if not addrs:
        raise LabError(f"{peer!r} has no address")
    return str(user.home_address), str(addrs[0][1].ip)


def captures_running(lab: Lab) -> bool:
    return any(p["name"].startswith("capture:") and p.get("running") for p in lab.processes())


def run_moves(lab: Lab, probes: ProbePair, mn: str, moves: Sequence[str], dwell: float,
              collector: EventCollector | None = None,
              on_move: Callable[[Move], None] | None = None) -> list[Move]:
    """Move ``mn`` to each agent in turn, ``dwell`` seconds apart, with the probes running."""
    done = []
    time.sleep(dwell)  # some traffic before the first move
    for i, dst in enumerate(moves):
        t = time.time()
        src = lab.move(mn, dst)
        move = Move(i + 1, mn, src, dst, t, time.time())
        done.append(move)
        if on_move:
            on_move(move)
        time.sleep(dwell)
        if collector:
            collector.fetch()
    return done


def analyse(moves: Sequence[Move], probes: ProbePair, end: float,
            events: Sequence[dict[str, Any]] = ()) -> None:
    arrivals = probes.arrivals()
    for i, move in enumerate(moves):
        t_end = moves[i + 1].t if i + 1 < len(moves) else end
        move.directions = {d: analyse_direction(arr, move.t, t_end, rate=probes.rate) for d, arr in arrivals.items()}
        move.events = [e for e in events if move.t - 0.05 <= float(e["t"]) < t_end]


@dataclass
class DemoResult:
    run_dir: Path
    out_dir: Path
    mn: str
    peer: str
    rate: float
    moves: list[Move]
    probe_summaries: dict[str, dict[str, Any]]
    png: Path | None
    captures: Path | None
    started: float
    ended: float
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"run_dir": str(self.run_dir), "mn": self.mn, "peer": self.peer, "rate": self.rate,
                "started": self.started, "ended": self.ended, "moves": [m.as_dict() for m in self.moves],
                "probes": self.probe_summaries, "png": str(self.png) if self.png else None,
                "captures": str(self.captures) if self.captures else None,
                "summary_json": str(self.out_dir / "summary.json"), "notes": self.notes}


def run_demo(lab: Lab, mn: str = "mn1", peer: str = "cn", moves: Sequence[str] = ("fa2", "fa3", "fa1"),
             dwell: float = 3.0, rate: float = 200.0, capture: bool = True,
             echo: Callable[[str], None] = print) -> DemoResult:
    hoa, peer_addr = addresses_for(lab, mn, peer)
    for dst in moves:
        if lab.topology.segment_of(dst) is None:
            raise LabError(f"{dst!r} owns no access segment")
    out_dir = lab.run_dir / (DEMO_DIR if peer == DEFAULT_PEER else f"{DEMO_DIR}-{peer}")
    out_dir.mkdir(parents=True, exist_ok=True)
    started_captures = False
    notes: list[str] = []
    captured = captures_running(lab)
    if capture and not captured:
        lab.capture_start()
        started_captures = captured = True
    probes = ProbePair(lab, (peer, peer_addr), (mn, hoa), out_dir, rate=rate)
    collector = EventCollector(lab, mn)
    try:
        probes.start()
        echo(f"probe {peer} {peer_addr} <-> {mn} {hoa}, UDP {rate:g}/s each way; waiting for traffic")
        probes.wait_flowing()
        collector.fetch()

        def said(m: Move) -> None:
            echo(f"  move {m.index}: {m.mn} {m.src or 'nothing'} -> {m.dst} "
                 f"(+{m.t - probes.started_at:.2f}s)")

        done = run_moves(lab, probes, mn, moves, dwell, collector, on_move=said)
    finally:
        probes.stop()
        if started_captures:
            lab.capture_stop()
    collector.fetch()
    if collector.error:
        notes.append(collector.error)
    events = collector.events()
    analyse(done, probes, probes.stopping_at, events)
    png = out_dir / "timeline.png"
    try:
        plot_timeline(png, probes, done, events, title=f"{lab.topology.name} lab: {peer} <-> {mn}, "
                      f"UDP {rate:g}/s, backend {lab.backend}")
    except ImportError as exc:
        notes.append(f"no timeline picture: {exc} (pip install matplotlib)")
        png = None  # type: ignore[assignment]
    captures = lab.capture_dir() if captured and any(lab.capture_dir().glob("*.pcap")) else None
    result = DemoResult(lab.run_dir, out_dir, mn, peer, rate, done, probes.summaries(), png, captures,
                        probes.started_at, probes.stopped_at, notes)
    (out_dir / "summary.json").write_text(json.dumps(result.as_dict(), indent=2))
    return result


def format_summary(result: DemoResult) -> str:
    lines = []
    for m in result.moves:
        lines.append(f"move {m.index}: {m.mn} {m.src or 'nothing'} -> {m.dst}")
        for d, r in m.directions.items():
            if not r["resumed"]:
                lines.append(f"  {d:<12} DID NOT RESUME: silent for {r['silent_until_end_ms']} ms until the "
                             f"{'next move' if m is not result.moves[-1] else 'end'} "
                             f"({r['received_after']} packets after the move, in flight)")
                continue
            if r["interruption_ms"] is None:
                lines.append(f"  {d:<12} resumed {r['from_move_ms']:.1f} ms after the move (no traffic before it)")
                continue
            unstable = f"; then {r['later_gaps']} more gap(s)" if r["later_gaps"] else ""
            lines.append(f"  {d:<12} interruption {r['interruption_ms']:8.1f} ms  lost {r['lost']:>5}  "
                         f"(first packet {r['from_move_ms']:.1f} ms after the move{unstable})")
        if m.events:
            story = ", ".join(f"{e.get('event')} +{(float(e['t']) - m.t) * 1000:.1f}" for e in m.events[:12])
            lines.append(f"  {m.mn} events (ms after the move): {story}")
    for d, s in result.probe_summaries.items():
        if s:
            lines.append(f"probe {d}: sent {s.get('sent')} received {s.get('received')} "
                         f"(send errors {s.get('send_errors')}, blocked {s.get('send_blocked')})")
    lines += result.notes
    lines.append(f"summary: {result.out_dir / 'summary.json'}")
    lines.append(f"probe records: {', '.join(str(p) for p in sorted(result.out_dir.glob('probe-*.jsonl')))}")
    if result.png:
        lines.append(f"timeline: {result.png}")
    if result.captures:
        lines.append(f"pcaps: {result.captures}/ (copy them out before `mipvpn lab down`)")
        keys = result.run_dir / KEYLOG_DIR
        if any(keys.glob("*.keys")):
            lines.append(f"Diameter is TLS in them: decrypt with the key logs {keys}/*.keys (docs/protocol.md, "
                         "\"Transport: TLS\")")
    return "\n".join(lines)


# ---- the picture ----------------------------------------------------------------------------
def plot_timeline(png: Path, probes: ProbePair, moves: Sequence[Move], events: Sequence[dict[str, Any]],
                  title: str = "", bin_s: float = 0.02, extra_events: Sequence[dict[str, Any]] = ()) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = probes.started_at
    t_end = probes.stopped_at or time.time()
    arrivals = probes.arrivals()
    dirs = list(arrivals)
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:purple"]
    n_rows = len({(e.get("node"), e.get("event")) for e in [*events, *extra_events]})
    ev_height = max(1.6, 0.16 * n_rows)
    fig, (ax_rate, ax_gap, ax_ev) = plt.subplots(3, 1, sharex=True, figsize=(13, 5.5 + ev_height),
                                                 gridspec_kw={"height_ratios": [3, 1.3, ev_height]})
    nbins = max(1, int((t_end - t0) / bin_s) + 1)
    for k, d in enumerate(dirs):
        counts = [0] * nbins
        for a in arrivals[d]:
            i = int((a.recv - t0) / bin_s)
            if 0 <= i < nbins:
                counts[i] += 1
        xs = [i * bin_s for i in range(nbins)]
        ax_rate.step(xs, [c / bin_s for c in counts], where="post", lw=0.9, color=colours[k % 4],
                     label=f"{d} received")
    ax_rate.set_ylabel("packets/s received")
    ax_rate.legend(loc="lower left", fontsize=8)
    ax_rate.set_ylim(bottom=0, top=probes.rate * 1.6)

    # Loss gaps: silences longer than 3 probe intervals (and 10 ms), one row per direction.
    min_gap = max(3.0 / probes.rate, 0.01)
    for k, d in enumerate(dirs):
        arr = arrivals[d]
        spans = [(arr[i - 1].recv - t0, arr[i].recv - arr[i - 1].recv) for i in range(1, len(arr))
                 if arr[i].recv - arr[i - 1].recv > min_gap]
        ax_gap.broken_barh(spans, (k - 0.35, 0.7), color=colours[k % 4])
    for m in moves:
        for k, d in enumerate(dirs):
            r = m.directions.get(d, {})
            if r.get("interruption_ms") is not None and r.get("last_before") is not None:
                ax_gap.annotate(f"{r['interruption_ms']:.0f} ms / {r['lost']} lost",
                                (r["last_before"] - t0 + r["interruption_ms"] / 1000, k), xytext=(4, 0),
                                textcoords="offset points", fontsize=7, va="center")
    ax_gap.set_yticks(range(len(dirs)), [f"{d} gaps" for d in dirs], fontsize=8)
    ax_gap.set_ylim(-0.7, len(dirs) - 0.3)

    # Events: one row per (node, event name), markers at their times.
    allev = [{**e, "node": e.get("node", moves[0].mn if moves else "mn")} for e in events] + list(extra_events)
    rows: list[str] = []
    for e in allev:
        key = f"{e['node']}: {e.get('event')}"
        if key not in rows:
            rows.append(key)
    for e in allev:
        t = float(e["t"]) - t0
        if 0 <= t <= t_end - t0:
            ax_ev.plot(t, rows.index(f"{e['node']}: {e.get('event')}"), "|", ms=9, mew=1.5, color="black")
    ax_ev.set_yticks(range(len(rows)), rows, fontsize=7)
    ax_ev.set_ylim(-0.7, max(len(rows), 1) - 0.3)
    ax_ev.invert_yaxis()
    ax_ev.set_xlabel(f"seconds since the probe started ({time.strftime('%H:%M:%S', time.gmtime(t0))} UTC)")

    for m in moves:
        for ax in (ax_rate, ax_gap, ax_ev):
            ax.axvline(m.t - t0, color="red", lw=0.8, ls="--")
        ax_rate.text(m.t - t0, probes.rate * 1.5, f" {m.src or '?'}→{m.dst}", color="red", fontsize=8,
                     va="top")
    for ax in (ax_rate, ax_gap, ax_ev):
        ax.grid(axis="x", alpha=0.3)
    ax_ev.set_xlim(0, t_end - t0)
    fig.suptitle(title or "handover timeline", fontsize=10)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def median_and_worst(values: Sequence[float | int | None]) -> dict[str, float | None]:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"n": 0, "median": None, "worst": None}  # type: ignore[dict-item]
    return {"n": len(vals), "median": round(statistics.median(vals), 3), "worst": round(max(vals), 3)}
