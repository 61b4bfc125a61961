"""What every `mipvpn bench ...` command shares: the machine it ran on, percentiles of a
sample, and running as root with the lab torn down on SIGTERM too."""

from __future__ import annotations

import os
import platform
import signal
import statistics
from collections.abc import Callable
from typing import Any, TypeVar

import click

T = TypeVar("T")


def machine() -> dict[str, Any]:
    return {"nproc": os.cpu_count(), "kernel": platform.release(), "machine": platform.machine(),
            "python": platform.python_version(), "host": platform.node()}


def percentiles(values: list[float]) -> dict[str, float | int]:
    """Median, nearest rank for p90/p99, min, max, mean (ms, rounded to µs)."""
    s = sorted(values)
    if not s:
        return {"n": 0}

    def pct(p: float) -> float:
        return round(s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))], 3)

    return {"n": len(s), "min": round(s[0], 3), "p50": round(statistics.median(s), 3), "p90": pct(90),
            "p99": pct(99), "max": round(s[-1], 3), "mean": round(statistics.fmean(s), 3)}


def run_as_root(bench: Callable[[], T]) -> T:
    """Run ``bench`` (which builds and always tears down a lab of its own) as root, turning
    SIGTERM into the KeyboardInterrupt its ``finally`` handles and a LabError into a clean
    command-line error."""
    from lab.lab import LabError

    if os.geteuid() != 0:
        raise click.ClickException("needs root (network namespaces)")
    main_pid = os.getpid()

    def on_term(_signo: int, _frame: object) -> None:
        if os.getpid() != main_pid:  # a child forked by pyroute2 (netns helpers): just end it
            os._exit(128 + signal.SIGTERM)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        return bench()
    except LabError as exc:
        raise click.ClickException(str(exc)) from None
