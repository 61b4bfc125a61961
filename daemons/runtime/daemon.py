"""`mipvpn daemon ROLE -c CONFIG [--profile FILE]`: load and check the configuration, then run one role."""

from __future__ import annotations

import asyncio
import contextlib
import cProfile
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

from daemons.roles import ROLES, load_config
from daemons.runtime import config as configuration
from daemons.runtime import log

events = log.EventLog("mipvpn.daemon")


def run(role: str, config_path: Path, profile: Path | None = None) -> None:
    """Raises ConfigError (naming the field) before anything starts. With ``profile``, the
    daemon runs under cProfile (its main thread: work handed to threads is not in it) and the
    statistics go to that file when it exits, also on SIGTERM (see ``profiling``)."""
    cfg = load_config(config_path)
    if cfg.role != role:
        raise configuration.ConfigError(config_path.name, "role",
                                        f"is {cfg.role!r}, but the daemon was started as {role!r}")
    log.setup(cfg.node, cfg.log_level)
    os.umask(0o077)  # state files, their directory and sockets are ours alone
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    cfg.state_dir.chmod(0o700)  # also when an earlier run made it with another umask
    with profiling(profile) if profile is not None else contextlib.nullcontext():
        asyncio.run(ROLES[role].daemon_class()(cfg).run())


@contextlib.contextmanager
def profiling(path: Path) -> Iterator[None]:
    """Profile what runs inside, and write the statistics to ``path`` (pstats format, written
    whole to a temporary file and renamed) on the way out, and on SIGTERM, which otherwise ends
    a daemon where it stands: the handler writes them, then exits as SIGTERM would have."""
    profiler = cProfile.Profile()
    written = False

    def dump() -> None:
        nonlocal written
        if written:
            return
        written = True
        profiler.disable()
        tmp = path.with_name(path.name + ".tmp")
        profiler.dump_stats(str(tmp))
        os.replace(tmp, path)
        events.info("daemon.profile_written", file=str(path))

    def on_term(signo: int, _frame: FrameType | None) -> None:
        dump()
        os._exit(128 + signo)

    previous = signal.signal(signal.SIGTERM, on_term)
    profiler.enable()
    try:
        yield
    finally:
        dump()
        signal.signal(signal.SIGTERM, previous)
