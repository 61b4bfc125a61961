"""What a benchmark reads about the lab's processes: resident memory and CPU time from
``/proc/PID/status`` and ``/proc/PID/stat`` (the lab's supervisor knows the PIDs), and the top
of a daemon's cProfile dump (``mipvpn daemon ... --profile FILE``)."""

from __future__ import annotations

import os
import pstats
from pathlib import Path
from typing import Any

# Where an idle asyncio daemon waits: time inside these is not work (shown apart).
IDLE_FUNCTIONS = ("<method 'poll' of 'select.epoll' objects>", "<method 'select' of 'select.epoll' objects>",
                  "<built-in method select.select>")


def vm_rss_kb(status: str) -> int | None:
    """VmRSS (kB) from the text of ``/proc/PID/status``."""
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return None


def cpu_seconds(stat: str, ticks: int) -> float:
    """User + system CPU time (s) from the text of ``/proc/PID/stat`` (fields 14 and 15; the
    command name in parentheses may hold spaces)."""
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / ticks


def process_stats(processes: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """name -> {pid, rss_kb, cpu_s} for each running process the supervisor reports."""
    ticks = os.sysconf("SC_CLK_TCK")
    out: dict[str, dict[str, Any]] = {}
    for proc in processes:
        pid = proc.get("pid")
        if not proc.get("running") or not pid:
            continue
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        out[str(proc["name"])] = {"pid": pid, "rss_kb": vm_rss_kb(status), "cpu_s": round(cpu_seconds(stat, ticks), 3)}
    return out


def memory_and_cpu(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]], bindings: int,
                   registrations: int) -> dict[str, dict[str, Any]]:
    """Per process seen both times (same PID: not restarted in between): RSS at the end, its
    growth per binding (bytes), CPU seconds spent in between and per registration (ms)."""
    out = {}
    for name, end in after.items():
        start = before.get(name)
        if start is None or start["pid"] != end["pid"] or end["rss_kb"] is None or start["rss_kb"] is None:
            continue
        cpu = end["cpu_s"] - start["cpu_s"]
        grown = end["rss_kb"] - start["rss_kb"]
        out[name] = {"rss_kb": end["rss_kb"], "rss_delta_kb": grown,
                     "bytes_per_binding": round(grown * 1024 / bindings) if bindings else None,
                     "cpu_s": round(cpu, 3),
                     "cpu_ms_per_registration": round(cpu * 1000 / registrations, 3) if registrations else None}
    return out


def short_location(filename: str, line: int, name: str) -> str:
    """``daemons/agents/ha.py:320(on_har)``; library paths from ``site-packages/`` or the stdlib's
    ``lib/python3.X/`` on; built-ins as cProfile names them."""
    if filename == "~":
        return name
    for marker in ("/daemons/", "/lab/", "/site-packages/"):
        if marker in filename:
            filename = filename[filename.rindex(marker) + 1:]
            break
    else:
        parts = filename.split("/lib/python")
        if len(parts) > 1:
            filename = "py" + parts[-1]
    return f"{filename}:{line}({name})"


def is_plumbing(filename: str) -> bool:
    """The standard library's and the interpreter's own frames (the event loop, imports,
    built-ins): in a cumulative list they only say that everything runs under asyncio.run."""
    stdlib = "/lib/python3" in filename and "site-packages" not in filename
    return filename == "~" or filename.startswith("<") or stdlib


def top_functions(stats: dict[tuple[str, int, str], tuple[Any, ...]], key: str, n: int) -> list[dict[str, Any]]:
    """The ``n`` functions with the most ``key`` time from a pstats table
    ``{(file, line, name): (primitive calls, calls, tottime, cumtime, callers)}``: ``tottime``, in
    the function itself, idle waits left out; ``cumtime``, with what it calls, the project's and
    its libraries' functions only (``is_plumbing``)."""
    index = {"tottime": 2, "cumtime": 3}[key]
    rows = [(loc, v) for loc, v in stats.items()
            if not (loc[2] in IDLE_FUNCTIONS if key == "tottime" else is_plumbing(loc[0]))]
    rows.sort(key=lambda r: r[1][index], reverse=True)
    return [{"function": short_location(*loc), "calls": int(v[1]), "tottime_s": round(float(v[2]), 3),
             "cumtime_s": round(float(v[3]), 3)} for loc, v in rows[:n]]


def profile_summary(path: Path, n: int = 15) -> dict[str, Any]:
    """The top of one cProfile dump: total time in functions, idle waits, top by self and by
    cumulative time."""
    stats = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]
    idle = sum(float(v[2]) for loc, v in stats.items() if loc[2] in IDLE_FUNCTIONS)
    total = sum(float(v[2]) for v in stats.values())
    return {"file": str(path), "total_s": round(total, 3), "idle_s": round(idle, 3),
            "by_self": top_functions(stats, "tottime", n), "by_cumulative": top_functions(stats, "cumtime", n)}


def format_profile(name: str, summary: dict[str, Any], n: int = 12) -> list[str]:
    lines = [f"profile {name}: {summary['total_s']:.2f} s in functions, of which {summary['idle_s']:.2f} s idle "
             f"in epoll ({summary['file']})",
             f"  {'self s':>8} {'cum s':>8} {'calls':>9}  by self time (idle waits left out)"]
    lines += [f"  {r['tottime_s']:>8.3f} {r['cumtime_s']:>8.3f} {r['calls']:>9}  {r['function']}"
              for r in summary["by_self"][:n]]
    lines.append(f"  {'self s':>8} {'cum s':>8} {'calls':>9}  by cumulative time (project and libraries)")
    lines += [f"  {r['tottime_s']:>8.3f} {r['cumtime_s']:>8.3f} {r['calls']:>9}  {r['function']}"
              for r in summary["by_cumulative"][:n]]
    return lines
