"""What the register benchmark reads about processes: VmRSS and CPU time from /proc texts, RSS
and CPU per binding and registration, the top of a cProfile dump (a real one, of this process),
and `mipvpn daemon --profile` writing its statistics on SIGTERM. No root."""

from __future__ import annotations

import cProfile
import os
import pstats
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from daemons.bench.procstat import (
    IDLE_FUNCTIONS,
    cpu_seconds,
    memory_and_cpu,
    process_stats,
    profile_summary,
    short_location,
    top_functions,
    vm_rss_kb,
)


def test_rss_and_cpu_from_proc_texts() -> None:
    assert vm_rss_kb("Name:\tpython\nVmPeak:\t  9 kB\nVmRSS:\t   41236 kB\n") == 41236
    assert vm_rss_kb("Name:\tkthreadd\n") is None
    stat = "123 (a (b) c) S 1 123 123 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0 99 0 0"
    assert cpu_seconds(stat, 100) == 3.0  # utime 250 + stime 50 ticks


def test_this_process_is_measured() -> None:
    got = process_stats([{"name": "me", "pid": os.getpid(), "running": True},
                         {"name": "gone", "pid": None, "running": False}])
    assert set(got) == {"me"} and got["me"]["rss_kb"] > 1000 and got["me"]["cpu_s"] > 0


def test_memory_and_cpu_per_binding_and_registration() -> None:
    before = {"ha": {"pid": 7, "rss_kb": 40_000, "cpu_s": 1.0}, "fa1": {"pid": 8, "rss_kb": 30_000, "cpu_s": 2.0},
              "aaah": {"pid": 9, "rss_kb": 50_000, "cpu_s": 0.5}}
    after = {"ha": {"pid": 7, "rss_kb": 42_000, "cpu_s": 3.0}, "fa1": {"pid": 8, "rss_kb": 31_000, "cpu_s": 6.0},
             "aaah": {"pid": 10, "rss_kb": 50_000, "cpu_s": 0.1}}  # restarted: left out
    got = memory_and_cpu(before, after, bindings=1000, registrations=2000)
    assert set(got) == {"ha", "fa1"}
    assert got["ha"] == {"rss_kb": 42_000, "rss_delta_kb": 2000, "bytes_per_binding": 2048, "cpu_s": 2.0,
                         "cpu_ms_per_registration": 1.0}
    assert got["fa1"]["cpu_ms_per_registration"] == 2.0


def busy(n: int) -> int:
    return sum(i * i for i in range(n))


def test_top_of_a_real_profile(tmp_path: Path) -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(20):
        busy(20_000)
    profiler.disable()
    path = tmp_path / "x.prof"
    profiler.dump_stats(str(path))
    summary = profile_summary(path, n=5)
    names = [r["function"] for r in summary["by_cumulative"]]
    assert any(n.endswith("(busy)") and "test_bench_procstat.py" in n for n in names)
    assert summary["by_self"][0]["tottime_s"] >= summary["by_self"][-1]["tottime_s"]
    assert 2 <= len(summary["by_self"]) <= 5


def test_idle_waits_are_left_out_of_self_time() -> None:
    stats = {("~", 0, IDLE_FUNCTIONS[0]): (1, 1, 9.0, 9.0, {}),
             ("/x/daemons/agents/ha.py", 320, "on_har"): (5, 5, 1.0, 2.0, {})}
    assert [r["function"] for r in top_functions(stats, "tottime", 5)] == ["daemons/agents/ha.py:320(on_har)"]
    assert [r["function"] for r in top_functions(stats, "cumtime", 5)] == ["daemons/agents/ha.py:320(on_har)"]
    assert short_location("/usr/lib/python3.11/asyncio/events.py", 80, "_run") == "py3.11/asyncio/events.py:80(_run)"


def test_daemon_profile_is_written_on_sigterm(tmp_path: Path) -> None:
    """The hook `mipvpn daemon --profile` uses, around a loop that runs until SIGTERM, as a daemon's."""
    out = tmp_path / "d.prof"
    script = textwrap.dedent(f"""
        import asyncio, sys
        from pathlib import Path
        from daemons.runtime.daemon import profiling
        async def forever():
            print("ready", flush=True)
            await asyncio.Event().wait()
        with profiling(Path({str(out)!r})):
            asyncio.run(forever())
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[2])
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
    stats = pstats.Stats(str(out)).stats  # type: ignore[attr-defined]
    assert any(name == "forever" for _, _, name in stats)
    assert profile_summary(out)["total_s"] > 0
    assert not (tmp_path / "d.prof.tmp").exists()
