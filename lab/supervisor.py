"""The lab's process supervisor: runs long-lived processes inside lab nodes.

One supervisor process per lab (``python -m lab.supervisor RUN_DIR``), started detached by
``mipvpn lab up``. It starts each process as ``ip netns exec NS ARGV...`` (which execs, so
the recorded PID is the process itself), writes ``pids/NAME.json`` with the PID and the
kernel start time (so a reused PID is never mistaken for ours), restarts processes that die
unless told not to, and on SIGTERM or a ``shutdown`` request stops exactly its children.

Control: newline-delimited JSON over the unix socket ``RUN_DIR/supervisor.sock``::

    {"op": "start", "name": "daemon:ha", "netns": "mipvpn-ha", "argv": [...], "restart": true}
    {"op": "stop", "name": "daemon:ha"}
    {"op": "status"}
    {"op": "shutdown"}
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("lab.supervisor")


def event(what: str, level: int = logging.INFO, **fields: Any) -> None:
    """One event per line with ``key=value`` fields, the way the daemons log (control characters
    escaped, a value with a space, quote or ``=`` in double quotes, None left out)."""
    log.log(level, "event=%s%s", what, "".join(f" {key}={_value(value)}" for key, value in fields.items()
                                              if value is not None))


def formatter() -> logging.Formatter:
    """Lines as the daemons write them: ``2026-11-27T07:05:01.123Z INFO node=supervisor event=...``."""
    fmt = logging.Formatter("%(asctime)s.%(msecs)03dZ %(levelname)s node=supervisor %(message)s", "%Y-%m-%dT%H:%M:%S")
    fmt.converter = time.gmtime
    return fmt


def _value(value: Any) -> str:
    text = str(value)
    if not text.isprintable() or "\\" in text:  # one line whatever the value holds (as the daemons')
        text = text.encode("unicode_escape").decode("ascii")
    if not text or any(c in text for c in ' "='):
        return '"' + text.replace('"', "'") + '"'
    return text


STOP_GRACE_S = 3.0
RESTART_DELAYS_S = (0.2, 0.5, 1.0, 2.0, 5.0)  # back-off for a process that keeps dying
STABLE_AFTER_S = 10.0  # a process that ran this long has its back-off reset


def process_start_time(pid: int) -> int | None:
    """The kernel's start time of a live PID (clock ticks since boot); None if it is gone
    or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces: split after its closing parenthesis.
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def is_same_process(record: dict[str, Any]) -> bool:
    return process_start_time(int(record["pid"])) == record.get("starttime")


@dataclass
class Child:
    name: str
    netns: str
    argv: list[str]
    restart: bool
    proc: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    restarts: int = 0
    last_exit: int | None = None
    stopping: bool = False
    watcher: asyncio.Task[None] | None = field(default=None, repr=False)

    def info(self) -> dict[str, Any]:
        running = self.proc is not None and self.proc.returncode is None
        return {
            "name": self.name, "netns": self.netns, "argv": self.argv,
            "pid": self.proc.pid if running and self.proc else None,
            "running": running, "restart": self.restart, "restarts": self.restarts,
            "last_exit": self.last_exit,
            "uptime_s": round(time.monotonic() - self.started_at, 1) if running else None,
        }


class Supervisor:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.pid_dir = run_dir / "pids"
        self.log_dir = run_dir / "logs"
        self.children: dict[str, Child] = {}
        self.done = asyncio.Event()
        self.stopped = asyncio.Event()

    async def spawn(self, child: Child) -> None:
        # Opening a local log file does not block the loop in any way that matters.
        logfile = open(self.log_dir / f"{child.name.replace(':', '-')}.log", "ab")  # noqa: ASYNC230
        try:
            child.proc = await asyncio.create_subprocess_exec(
                "ip", "netns", "exec", child.netns, *child.argv,
                stdin=asyncio.subprocess.DEVNULL, stdout=logfile, stderr=logfile,
                start_new_session=True,  # our signals reach only the processes we aim at
            )
        finally:
            logfile.close()
        child.started_at = time.monotonic()
        record = {"name": child.name, "pid": child.proc.pid, "netns": child.netns,
                  "starttime": process_start_time(child.proc.pid), "argv": child.argv}
        (self.pid_dir / f"{child.name.replace(':', '-')}.json").write_text(json.dumps(record))
        event("process.started", name=child.name, pid=child.proc.pid, netns=child.netns)

    async def watch(self, child: Child) -> None:
        failures = 0
        while True:
            assert child.proc is not None
            code = await child.proc.wait()
            child.last_exit = code
            if child.stopping or not child.restart or self.done.is_set():
                return
            ran_for = time.monotonic() - child.started_at
            failures = 0 if ran_for > STABLE_AFTER_S else failures + 1
            delay = RESTART_DELAYS_S[min(failures, len(RESTART_DELAYS_S) - 1)]
            event("process.exited", logging.WARNING, name=child.name, code=code, ran_s=f"{ran_for:.1f}",
                  restart_in_s=f"{delay:.1f}")
            await asyncio.sleep(delay)
            if child.stopping or self.done.is_set():
                return
            child.restarts += 1
            await self.spawn(child)

    async def start(self, name: str, netns: str, argv: list[str], restart: bool) -> dict[str, Any]:
        existing = self.children.get(name)
        if existing and existing.proc and existing.proc.returncode is None:
            return {"ok": False, "error": f"{name} is already running (pid {existing.proc.pid})"}
        child = Child(name, netns, list(argv), restart)
        self.children[name] = child
        await self.spawn(child)
        child.watcher = asyncio.create_task(self.watch(child))
        return {"ok": True, "pid": child.proc.pid if child.proc else None}

    async def stop(self, name: str) -> dict[str, Any]:
        child = self.children.pop(name, None)
        if child is None:
            return {"ok": False, "error": f"no process named {name}"}
        await self._terminate(child)
        with contextlib.suppress(FileNotFoundError):
            (self.pid_dir / f"{name.replace(':', '-')}.json").unlink()
        return {"ok": True, "exit": child.last_exit}

    async def _terminate(self, child: Child) -> None:
        child.stopping = True
        proc = child.proc
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), STOP_GRACE_S)
            except TimeoutError:
                event("process.killed", logging.WARNING, name=child.name, pid=proc.pid, why="ignored SIGTERM")
                proc.kill()
                await proc.wait()
            child.last_exit = proc.returncode
        if child.watcher:
            child.watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await child.watcher

    async def shutdown(self) -> None:
        self.done.set()
        await asyncio.gather(*(self._terminate(c) for c in self.children.values()))
        for child in self.children.values():
            with contextlib.suppress(FileNotFoundError):
                (self.pid_dir / f"{child.name.replace(':', '-')}.json").unlink()
        self.children.clear()
        self.stopped.set()

    async def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op == "start":
            return await self.start(request["name"], request["netns"], request["argv"],
                                    bool(request.get("restart", True)))
        if op == "stop":
            return await self.stop(request["name"])
        if op == "status":
            return {"ok": True, "pid": os.getpid(),
                    "processes": [c.info() for c in self.children.values()]}
        if op == "shutdown":
            asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(self.shutdown()))
            return {"ok": True}
        return {"ok": False, "error": f"unknown op {op!r}"}

    async def serve_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                try:
                    request = json.loads(line)
                    response = await self.handle(request)
                except (ValueError, KeyError, TypeError) as exc:
                    response = {"ok": False, "error": f"bad request: {exc}"}
                except OSError as exc:
                    response = {"ok": False, "error": str(exc)}
                writer.write(json.dumps(response).encode() + b"\n")
                await writer.drain()
        finally:
            writer.close()

    async def run(self) -> None:
        self.pid_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        sock_path = self.run_dir / "supervisor.sock"
        with contextlib.suppress(FileNotFoundError):
            sock_path.unlink()
        server = await asyncio.start_unix_server(self.serve_client, path=str(sock_path))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(self.shutdown()))
        (self.run_dir / "supervisor.pid").write_text(json.dumps(
            {"pid": os.getpid(), "starttime": process_start_time(os.getpid())}))
        event("supervisor.ready", pid=os.getpid())
        await self.stopped.wait()
        server.close()
        with contextlib.suppress(FileNotFoundError):
            sock_path.unlink()
        with contextlib.suppress(FileNotFoundError):
            (self.run_dir / "supervisor.pid").unlink()
        event("supervisor.stopped")


# ---- client side (used by the CLI) ---------------------------------------------------------


class SupervisorUnavailable(RuntimeError):
    pass


def request(run_dir: Path, message: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """Send one request to a running supervisor and return its answer."""
    path = run_dir / "supervisor.sock"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(json.dumps(message).encode() + b"\n")
            with sock.makefile("rb") as answer:
                return dict(json.loads(answer.readline()))
    except OSError as exc:
        raise SupervisorUnavailable(f"supervisor not reachable at {path}: {exc.strerror or exc}") from None


def main() -> None:
    run_dir = Path(sys.argv[1])
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    asyncio.run(Supervisor(run_dir).run())


if __name__ == "__main__":
    main()
