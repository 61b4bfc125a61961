"""Path-backend benchmark: install/remove latency and paths/s between two prepared nodes.

Benchmarks print numbers; they are never assertions (timings depend on the machine).
Usage (e.g. from a lab scenario or a test)::

    result = await bench_paths(fa_backend, gw_backend, paths)
    print(result.format())

``paths`` are written from the initiator's point of view; the responder gets
:meth:`VpnPath.mirrored`.  Both nodes must be prepared for them (charon running, local-selector
addresses owned where the backend needs it, see :meth:`PathBackend.prepare_local_selector`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from daemons.vpn.path import PathBackend, PathState, VpnPath


@dataclass
class Timings:
    samples_ms: list[float] = field(default_factory=list)

    def add(self, seconds: float) -> None:
        self.samples_ms.append(seconds * 1000.0)

    def summary(self) -> str:
        s = sorted(self.samples_ms)
        if not s:
            return "n=0"
        p90 = s[min(len(s) - 1, round(0.9 * (len(s) - 1)))]
        return (f"n={len(s)} min={s[0]:.2f} median={statistics.median(s):.2f} "
                f"p90={p90:.2f} max={s[-1]:.2f} ms")


@dataclass
class BenchResult:
    backend: str
    n: int
    responder_install: Timings
    first_install: float  # ms, initiator, includes the gateway pair's IKE_SA
    install: Timings  # initiator installs after the first (per-user SA only)
    remove: Timings  # initiator removes (SA delete + routes + config)
    install_rate: float  # paths/s over the initiator's installs
    remove_rate: float  # paths/s over the initiator's removes
    not_up: list[str]
    probe_ok: bool | None = None
    first_negotiation: float | None = None  # ms, the backend's own negotiation, if it says
    negotiation: Timings = field(default_factory=Timings)

    def format(self) -> str:
        lines = [
            f"backend {self.backend}: {self.n} paths",
            f"  responder install (config only): {self.responder_install.summary()}",
            f"  first install (pair SA + path):  {self.first_install:.2f} ms",
            f"  further installs (until up):     {self.install.summary()}",
            f"  removes:                         {self.remove.summary()}",
            *([f"  negotiation only (first):        {self.first_negotiation:.2f} ms"]
              if self.first_negotiation is not None else []),
            *([f"  negotiation only (further):      {self.negotiation.summary()}"]
              if self.negotiation.samples_ms else []),
            f"  install rate {self.install_rate:.1f} paths/s, "
            f"remove rate {self.remove_rate:.1f} paths/s",
        ]
        if self.not_up:
            lines.append(f"  NOT UP: {', '.join(self.not_up)}")
        if self.probe_ok is not None:
            verdict = "ok" if self.probe_ok else "FAILED"
            lines.append(f"  traffic probe with all paths up: {verdict}")
        return "\n".join(lines)


async def bench_paths(
    initiator: PathBackend,
    responder: PathBackend,
    paths: Sequence[VpnPath],
    *,
    probe: Callable[[], Awaitable[bool]] | None = None,
) -> BenchResult:
    """Install ``paths`` on both nodes (responder first, so the initiator's install is the one
    that negotiates), optionally run ``probe`` with all of them up, then remove them all
    (initiator first).  Leaves both backends as it found them for these path ids."""
    if not paths:
        raise ValueError("no paths to benchmark")
    clock = time.perf_counter
    resp_t = Timings()
    for p in paths:
        t0 = clock()
        await responder.install(p.mirrored())
        resp_t.add(clock() - t0)

    inst_t = Timings()
    nego_t = Timings()
    first_nego: float | None = None
    not_up: list[str] = []
    first = 0.0
    t_all = clock()
    for i, p in enumerate(paths):
        t0 = clock()
        st = await initiator.install(p)
        dt = clock() - t0
        nego = initiator.last_negotiation_ms
        if i == 0:
            first = dt * 1000.0
            first_nego = nego
        else:
            inst_t.add(dt)
            if nego is not None:
                nego_t.add(nego / 1000.0)
        if st.state is not PathState.UP:
            not_up.append(p.id)
    install_total = clock() - t_all

    probe_ok = await probe() if probe is not None else None

    rem_t = Timings()
    t_all = clock()
    for p in paths:
        t0 = clock()
        await initiator.remove(p.id)
        rem_t.add(clock() - t0)
    remove_total = clock() - t_all
    for p in paths:
        await responder.remove(p.id)

    return BenchResult(
        backend=initiator.name,
        n=len(paths),
        responder_install=resp_t,
        first_install=first,
        install=inst_t,
        remove=rem_t,
        install_rate=len(paths) / install_total if install_total > 0 else float("inf"),
        remove_rate=len(paths) / remove_total if remove_total > 0 else float("inf"),
        not_up=not_up,
        probe_ok=probe_ok,
        first_negotiation=first_nego,
        negotiation=nego_t,
    )
