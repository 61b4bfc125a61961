"""A running lab: its run directory, network, supervisor and captures.

``lab.json`` in the run directory is written *before* anything is created, so `lab down`
can always clean up, also after a crashed or half-built `lab up`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from lab import supervisor
from lab.builder import LabNetwork, describe_kernel_state, namespace_exists
from lab.topology import ACCESS_IFNAME, NodeKind, Topology, load

DEFAULT_RUN_DIR = Path(os.environ.get("MIPVPN_RUN_DIR", "/run/mipvpn"))
DEFAULT_NS_PREFIX = os.environ.get("MIPVPN_NS_PREFIX", "mipvpn-")
STATE_FILE = "lab.json"


class LabError(RuntimeError):
    pass


class Service(Protocol):
    """A long-lived process to run in a node; healthy once its control socket answers, or, for
    a process without one (``control_socket`` None), once it listens on TCP ``listen_port``."""

    name: str
    node: str
    argv: list[str]
    control_socket: Path | None
    listen_port: int | None


ServicePlan = Callable[[Topology, Path, str], Sequence[Service]]  # topology, run dir, backend
DEFAULT_HEALTH_TIMEOUT_S = 15.0  # per service; MIPVPN_HEALTH_TIMEOUT overrides it (slow machines, VMs)


def health_timeout() -> float:
    value = os.environ.get("MIPVPN_HEALTH_TIMEOUT", "")
    try:
        return float(value) if value else DEFAULT_HEALTH_TIMEOUT_S
    except ValueError:
        raise LabError(f"MIPVPN_HEALTH_TIMEOUT: {value!r} is not a number of seconds") from None


def socket_answers(path: str) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            sock.connect(path)
        return True
    except OSError:
        return False


def tcp_listening(pid: int, port: int) -> bool:
    """Whether a TCP socket listens on ``port`` in the network namespace of process ``pid``
    (``/proc/PID/net/tcp`` is that namespace's table: no need to enter it)."""
    try:
        rows = Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return False
    for row in rows:
        fields = row.split()  # sl local_address rem_address st ...; st 0A = LISTEN
        if len(fields) > 3 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
            return True
    return False


def healthy(check: str, pid: int | None) -> bool:
    """A service's health check as recorded in ``lab.json``: ``tcp:PORT`` (the process listens
    on that port) or the path of its unix control socket."""
    if check.startswith("tcp:"):
        return pid is not None and tcp_listening(pid, int(check[4:]))
    return socket_answers(check)


@dataclass
class Lab:
    run_dir: Path
    topology: Topology
    prefix: str
    backend: str = "auto"
    health: dict[str, str] = field(default_factory=dict)  # service name -> control socket

    @property
    def network(self) -> LabNetwork:
        return LabNetwork(self.topology, self.prefix)

    @property
    def state_path(self) -> Path:
        return self.run_dir / STATE_FILE

    def ns(self, node: str) -> str:
        return self.network.ns(node)

    # ---- state -----------------------------------------------------------------------
    @classmethod
    def open(cls, run_dir: Path) -> Lab:
        """The lab recorded in ``run_dir``; LabError if none is."""
        path = run_dir / STATE_FILE
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError:
            raise LabError(f"no lab in {run_dir} (start one with `mipvpn lab up`)") from None
        if "kinds" not in state:
            raise LabError(f"{path} was written by an older mipvpn (no node kinds): `mipvpn lab down` cleans it up")
        kinds = [NodeKind(**{**kind, "modes": tuple(kind["modes"])}) for kind in state["kinds"]]
        return cls(run_dir, load(state["topology"], kinds), state["prefix"], state.get("backend", "auto"),
                   state.get("health", {}))

    def save_state(self, phase: str) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        state = {"topology": self.topology.source, "kinds": [asdict(k) for k in self.topology.kinds.values()],
                 "prefix": self.prefix, "backend": self.backend,
                 "phase": phase, "namespaces": self.network.namespaces(), "health": self.health}
        self.state_path.write_text(json.dumps(state, indent=2))

    def supervisor_alive(self) -> bool:
        try:
            record = json.loads((self.run_dir / "supervisor.pid").read_text())
        except (FileNotFoundError, ValueError):
            return False
        return supervisor.is_same_process(record)

    def is_up(self) -> bool:
        return self.state_path.exists() and self.supervisor_alive()

    # ---- up --------------------------------------------------------------------------
    def up(self, capture: bool = False, services: ServicePlan | None = None) -> None:
        # Checked before anything is recorded: rolling back would delete them, and they may
        # be another lab's (same prefix, other run directory).
        taken = [ns for ns in self.network.namespaces() if namespace_exists(ns)]
        if taken:
            raise LabError(f"namespace {taken[0]} already exists: another lab uses the prefix {self.prefix!r} "
                           "(`mipvpn lab down` with its run directory, or choose another --ns-prefix)")
        self.save_state("building")
        try:
            self.network.build()
            self._start_supervisor()
            if capture:
                self.capture_start()
            if services is not None:
                self.start_services(services(self.topology, self.run_dir, self.backend))
            self.save_state("up")
        except BaseException:
            self.down()
            raise

    def start_services(self, plan: Sequence[Service]) -> None:
        """Start each service in order and wait until it is healthy before the next, so
        agents are listening before the mobile nodes that need them start."""
        within = health_timeout()  # a bad MIPVPN_HEALTH_TIMEOUT is refused before any service starts
        for service in plan:
            pid = self.start_process(service.name, service.node, service.argv)
            check = f"tcp:{service.listen_port}" if service.control_socket is None else str(service.control_socket)
            self.health[service.name] = check
            deadline = time.monotonic() + within
            while not healthy(check, pid):
                if time.monotonic() > deadline:
                    log = self.run_dir / "logs" / f"{service.name.replace(':', '-')}.log"
                    tail = log.read_text().strip().splitlines()[-5:] if log.exists() else []
                    raise LabError(f"{service.name} did not become healthy within {within:g}s "
                                   f"(MIPVPN_HEALTH_TIMEOUT to wait longer); last lines of {log}:\n  "
                                   + "\n  ".join(tail))
                time.sleep(0.02)

    def _start_supervisor(self) -> None:
        (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "logs" / "supervisor.log", "ab") as logfile:
            subprocess.Popen(  # detached: it outlives this command
                [sys.executable, "-m", "lab.supervisor", str(self.run_dir)],
                stdin=subprocess.DEVNULL, stdout=logfile, stderr=logfile, start_new_session=True,
            )
        # A Python start: seconds under emulation (the kernel tier's VM), as for the services.
        deadline = time.monotonic() + max(10.0, health_timeout())
        while time.monotonic() < deadline:
            if self.supervisor_alive() and (self.run_dir / "supervisor.sock").exists():
                return
            time.sleep(0.02)
        raise LabError(f"supervisor did not start; see {self.run_dir / 'logs' / 'supervisor.log'}")

    def start_process(self, name: str, node: str, argv: list[str], restart: bool = True) -> int:
        answer = supervisor.request(self.run_dir, {"op": "start", "name": name,
                                                   "netns": self.ns(node), "argv": argv,
                                                   "restart": restart})
        if not answer.get("ok"):
            raise LabError(f"cannot start {name}: {answer.get('error')}")
        return int(answer["pid"])

    def stop_process(self, name: str) -> None:
        answer = supervisor.request(self.run_dir, {"op": "stop", "name": name})
        if not answer.get("ok"):
            raise LabError(f"cannot stop {name}: {answer.get('error')}")

    def processes(self) -> list[dict[str, Any]]:
        if not self.supervisor_alive():
            return []
        return supervisor.request(self.run_dir, {"op": "status"}).get("processes", [])

    # ---- down ------------------------------------------------------------------------
    def down(self) -> list[str]:
        """Stop our processes, delete our namespaces, remove the run directory."""
        self._stop_supervisor()
        self._kill_recorded_pids()
        removed = self.network.destroy()
        shutil.rmtree(self.run_dir, ignore_errors=True)
        return removed

    def _stop_supervisor(self) -> None:
        try:
            record = json.loads((self.run_dir / "supervisor.pid").read_text())
        except (FileNotFoundError, ValueError):
            return
        if not supervisor.is_same_process(record):
            return
        os.kill(int(record["pid"]), signal.SIGTERM)
        deadline = time.monotonic() + supervisor.STOP_GRACE_S + 5
        while time.monotonic() < deadline and supervisor.is_same_process(record):
            time.sleep(0.02)
        if supervisor.is_same_process(record):
            os.kill(int(record["pid"]), signal.SIGKILL)

    def _kill_recorded_pids(self) -> None:
        """Processes whose supervisor died (e.g. was killed): end them by recorded PID,
        only if the PID still belongs to the process we started."""
        for pidfile in (self.run_dir / "pids").glob("*.json") if (self.run_dir / "pids").exists() else []:
            try:
                record = json.loads(pidfile.read_text())
            except ValueError:
                continue
            if supervisor.is_same_process(record):
                os.kill(int(record["pid"]), signal.SIGKILL)
                deadline = time.monotonic() + 2
                while supervisor.is_same_process(record) and time.monotonic() < deadline:
                    time.sleep(0.01)

    # ---- moves and captures ------------------------------------------------------------
    def move(self, mn: str, owner: str) -> str | None:
        topo = self.topology
        if mn not in topo.nodes or not topo.kind(mn).mobile:
            raise LabError(f"{mn!r} is not a mobile node of this lab")
        if topo.segment_of(owner) is None:
            owners = ", ".join(s.owner for s in topo.segments)
            raise LabError(f"{owner!r} owns no access segment (one of: {owners})")
        return self.network.move(mn, owner)

    def capture_points(self) -> dict[str, tuple[str, str]]:
        """Link name -> (node, interface) where that link is captured."""
        points = {}
        for link in self.topology.links:
            (a, _), _ = link.ends
            points[link.name] = (a, link.ifname(a))
        for seg in self.topology.segments:
            points[seg.name] = (seg.owner, ACCESS_IFNAME)
        return points

    def capture_dir(self) -> Path:
        return self.run_dir / "captures"

    def capture_start(self) -> list[Path]:
        self.capture_dir().mkdir(parents=True, exist_ok=True)
        files = []
        for link, (node, ifname) in self.capture_points().items():
            pcap = self.capture_dir() / f"{link}.pcap"
            # --immediate-mode and -U: every packet reaches the file at once, so a pcap read
            # during or right after a capture is complete (libpcap otherwise holds packets
            # in its ring for up to a second, and loses them when tcpdump is stopped).
            self.start_process(f"capture:{link}", node,
                               ["tcpdump", "-i", ifname, "-n", "-s", "0", "-U", "--immediate-mode",
                                "-Z", "root",
                                "-w", str(pcap)], restart=False)
            files.append(pcap)
        self._wait_captures_ready(files)
        return files

    def _wait_captures_ready(self, files: list[Path]) -> None:
        # tcpdump writes the pcap header once it is listening: wait for every file.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if all(f.exists() and f.stat().st_size >= 24 for f in files):
                return
            time.sleep(0.02)
        missing = [f.name for f in files if not f.exists()]
        raise LabError(f"captures did not start: {', '.join(missing)}")

    def capture_stop(self) -> list[Path]:
        stopped = []
        for proc in self.processes():
            if proc["name"].startswith("capture:"):
                self.stop_process(proc["name"])
                stopped.append(self.capture_dir() / f"{proc['name'].split(':', 1)[1]}.pcap")
        return stopped

    # ---- status ------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        topo = self.topology
        procs = self.processes()
        for proc in procs:
            if proc["name"] in self.health:
                proc["healthy"] = proc["running"] and healthy(self.health[proc["name"]], proc.get("pid"))
        nodes = []
        for node in topo.nodes.values():
            ns = self.ns(node.name)
            nodes.append({
                "name": node.name, "role": node.role, "domain": node.domain, "netns": ns,
                "up": namespace_exists(ns), "addresses": describe_kernel_state(ns),
                "processes": [p for p in procs if p["netns"] == ns],
            })
        attachments = {mn.name: self.network.attachment(mn.name) for mn in topo.mobile_nodes()}
        return {"run_dir": str(self.run_dir), "topology": topo.source, "name": topo.name,
                "prefix": self.prefix, "backend": self.backend,
                "supervisor": self.supervisor_alive(), "nodes": nodes,
                "attachments": attachments}
