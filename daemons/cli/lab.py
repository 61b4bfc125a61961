"""`mipvpn lab ...`: bring the lab up, look around, move mobile nodes, capture, tear down."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import click

from daemons.provision.configs import services as daemon_services
from daemons.provision.kinds import load_topology
from daemons.vpn.factory import choose_backend
from lab.lab import DEFAULT_NS_PREFIX, DEFAULT_RUN_DIR, Lab, LabError
from lab.topology import TopologyError

BACKENDS = ("auto", "xfrm", "strongswan", "none")


def require_root() -> None:
    if os.geteuid() != 0:
        raise click.ClickException("the lab creates network namespaces: run it as root")


def open_lab(run_dir: Path) -> Lab:
    try:
        return Lab.open(run_dir)
    except LabError as exc:
        raise click.ClickException(str(exc)) from None


@click.group("lab")
@click.option("--run-dir", type=click.Path(path_type=Path), default=DEFAULT_RUN_DIR,
              show_default=True, envvar="MIPVPN_RUN_DIR",
              help="Where logs, pcaps, configs and control sockets live.")
@click.pass_context
def lab_group(ctx: click.Context, run_dir: Path) -> None:
    """Build and drive the namespace lab."""
    ctx.obj = run_dir.absolute()


@lab_group.command("up")
@click.option("-t", "--topology", "topology_file", type=click.Path(path_type=Path),
              help="Topology YAML (default: the built-in default topology).")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
              help="IPsec backend for the agents (none: Mobile IP only, no VPN paths).")
@click.option("--ns-prefix", default=DEFAULT_NS_PREFIX, show_default=True,
              envvar="MIPVPN_NS_PREFIX", help="Prefix of the lab's namespace names.")
@click.option("--capture/--no-capture", default=False,
              help="Start a capture on every link before anything else runs.")
@click.pass_obj
def up(run_dir: Path, topology_file: Path | None, backend: str, ns_prefix: str,
       capture: bool) -> None:
    """Create the namespaces, links and processes of a topology."""
    try:
        topo = load_topology(topology_file)  # refuse a bad file before touching anything
    except TopologyError as exc:
        raise click.ClickException(str(exc)) from None
    require_root()
    try:
        existing = Lab.open(run_dir)
    except LabError:
        existing = None
    if existing is not None:
        if existing.is_up():
            click.echo(f"lab already up in {run_dir} ({existing.topology.name} topology); "
                       "`mipvpn lab down` first to rebuild it")
            return
        click.echo(f"cleaning up a lab that did not finish or crashed in {run_dir}")
        existing.down()
    if backend != "none":
        backend, reason = choose_backend(backend)
        click.echo(f"IPsec backend: {reason}")
    the_lab = Lab(run_dir, topo, ns_prefix, backend)
    started = time.monotonic()
    try:
        the_lab.up(capture=capture, services=daemon_services)
    except Exception as exc:
        raise click.ClickException(f"lab up failed and was rolled back: {exc}") from None
    click.echo(f"lab {topo.name!r} up in {time.monotonic() - started:.2f}s: "
               f"{len(topo.nodes)} nodes, backend {backend}, run directory {run_dir}")


@lab_group.command("down")
@click.option("--ns-prefix", default=DEFAULT_NS_PREFIX, show_default=True,
              envvar="MIPVPN_NS_PREFIX", help="Used only when the run directory has no lab.")
@click.pass_obj
def down(run_dir: Path, ns_prefix: str) -> None:
    """Stop every lab process and remove every namespace and file. Idempotent."""
    require_root()
    try:
        the_lab = Lab.open(run_dir)
    except (LabError, TopologyError):
        the_lab = Lab(run_dir, load_topology(None), ns_prefix)  # no state: clean the default names
    started = time.monotonic()
    removed = the_lab.down()
    if removed:
        click.echo(f"lab down in {time.monotonic() - started:.2f}s: removed {len(removed)} namespaces")
    else:
        click.echo("no lab was up")


@lab_group.command("status")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def status(run_dir: Path, as_json: bool) -> None:
    """Nodes, their addresses and processes, and where each mobile node is attached."""
    info = open_lab(run_dir).status()
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"lab {info['name']} ({info['topology']})  backend={info['backend']}  "
               f"supervisor={'running' if info['supervisor'] else 'NOT RUNNING'}  "
               f"run_dir={info['run_dir']}")
    for node in info["nodes"]:
        addrs = "  ".join(f"{ifn}={','.join(a)}" for ifn, a in sorted(node["addresses"].items()))
        state = "up" if node["up"] else "MISSING"
        click.echo(f"  {node['name']:<6} {node['role']:<6} {node['domain'] or '-':<16} {state:<7} {addrs}")
        for proc in node["processes"]:
            health = "running" if proc["running"] else f"exited {proc['last_exit']}"
            if "healthy" in proc:
                health += ", healthy" if proc["healthy"] else ", NOT HEALTHY"
            click.echo(f"         {proc['name']:<24} pid={proc['pid']} {health} "
                       f"restarts={proc['restarts']}")
    for mn, owner in info["attachments"].items():
        click.echo(f"  {mn} attached to {owner or 'nothing'}")


@lab_group.command("exec", context_settings={"ignore_unknown_options": True})
@click.argument("node")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_obj
def exec_(run_dir: Path, node: str, command: tuple[str, ...]) -> None:
    """Run COMMAND inside NODE's namespace (e.g. `lab exec cn -- ping 198.18.100.10`)."""
    the_lab = open_lab(run_dir)
    if node not in the_lab.topology.nodes:
        raise click.ClickException(f"unknown node {node!r} (one of: {', '.join(the_lab.topology.nodes)})")
    sys.stdout.flush()
    os.execvp("ip", ["ip", "netns", "exec", the_lab.ns(node), *command])


@lab_group.command("move")
@click.argument("mn")
@click.argument("agent")
@click.pass_obj
def move(run_dir: Path, mn: str, agent: str) -> None:
    """Detach mobile node MN from its segment and attach it to AGENT's segment."""
    require_root()
    the_lab = open_lab(run_dir)
    try:
        previous = the_lab.move(mn, agent)
    except LabError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{mn}: {previous or 'nothing'} -> {agent}")


@lab_group.group("capture")
def capture() -> None:
    """Packet captures, one pcap per link, in RUN_DIR/captures."""


@capture.command("start")
@click.pass_obj
def capture_start(run_dir: Path) -> None:
    require_root()
    try:
        files = open_lab(run_dir).capture_start()
    except LabError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"capturing {len(files)} links into {files[0].parent if files else run_dir}")


@capture.command("stop")
@click.pass_obj
def capture_stop(run_dir: Path) -> None:
    files = open_lab(run_dir).capture_stop()
    for f in files:
        click.echo(str(f))


@lab_group.command("demo")
@click.option("--mn", default="mn1", show_default=True, help="The mobile node that moves.")
@click.option("--peer", default="cn", show_default=True, help="The correspondent node probing it.")
@click.option("--moves", default="fa2,fa3,fa1", show_default=True,
              help="Comma-separated agents the MN moves to, in order.")
@click.option("--dwell", type=click.FloatRange(0.2, 60), default=3.0, show_default=True,
              help="Seconds before the first move, between moves and after the last.")
@click.option("--rate", type=click.FloatRange(1, 5000), default=200.0, show_default=True,
              help="Probe datagrams per second, each direction.")
@click.option("--capture/--no-capture", default=True, show_default=True,
              help="Start captures if none are running (and stop those at the end).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.pass_obj
def demo(run_dir: Path, mn: str, peer: str, moves: str, dwell: float, rate: float, capture: bool,
         as_json: bool) -> None:
    """UDP probe PEER <-> MN while MN moves; per-move interruption summary and a timeline PNG."""
    from daemons.provision.demo import format_summary, run_demo

    require_root()
    the_lab = open_lab(run_dir)
    if not the_lab.is_up():
        raise click.ClickException(f"the lab in {run_dir} is not up")
    targets = [m.strip() for m in moves.split(",") if m.strip()]
    try:
        result = run_demo(the_lab, mn, peer, targets, dwell, rate, capture,
                          echo=(lambda s: click.echo(s, err=True)) if as_json else click.echo)
    except LabError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(result.as_dict(), indent=2) if as_json else format_summary(result))
