"""`mipvpn`: the command line of the whole system (lab, show, daemon)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from daemons.bench.handover import handover
from daemons.bench.register import register
from daemons.cli.bench import bench_group
from daemons.cli.db import db_group
from daemons.cli.lab import lab_group
from daemons.cli.profile import mn_group, profile_group
from daemons.provision.configs import control_socket
from daemons.roles import ROLES
from daemons.runtime import control
from daemons.runtime.config import ConfigError
from lab.lab import DEFAULT_RUN_DIR


@click.group()
@click.version_option(package_name="mipvpn")
def main() -> None:
    """mipvpn: AAA-distributed IPsec VPN paths that follow Mobile IPv4 nodes."""


main.add_command(lab_group)
main.add_command(db_group)
main.add_command(profile_group)
main.add_command(mn_group)
bench_group.add_command(handover)
bench_group.add_command(register)
main.add_command(bench_group)


@main.command("daemon")
@click.argument("role", type=click.Choice(list(ROLES)))
@click.option("-c", "--config", "config_path", type=click.Path(path_type=Path), required=True)
@click.option("--profile", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Run under cProfile and write its statistics (pstats) to this file at exit or SIGTERM.")
def daemon(role: str, config_path: Path, profile: Path | None) -> None:
    """Run one daemon (what the lab's supervisor and systemd units start)."""
    from daemons.runtime.daemon import run

    try:
        run(role, config_path, profile)
    except ConfigError as exc:
        raise click.ClickException(f"refusing to start: {exc}") from None
    except KeyboardInterrupt:
        pass


SHOW = {
    "bindings": "bindings",  # HA binding cache
    "visitors": "visitors",  # FA visitor list
    "registration": "registration",  # MN state
    "counters": "counters",
    "paths": "paths",  # VPN paths of an FA, HA or CN-GW
    "sessions": "sessions",  # cached VPN info per user of an AAAH or AAAF
}


def _table(rows: list[dict], empty: str) -> str:
    if not rows:
        return empty
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(str(r.get(c))) for r in rows)) for c in cols}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in cols)]
    lines += ["  ".join(str(r.get(c)).ljust(widths[c]) for c in cols) for r in rows]
    return "\n".join(lines)


@main.command("show")
@click.argument("what", type=click.Choice(sorted(SHOW)))
@click.option("--node", required=True, help="The lab node whose daemon to ask.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--run-dir", type=click.Path(path_type=Path), default=DEFAULT_RUN_DIR, envvar="MIPVPN_RUN_DIR",
              show_default=True)
def show(what: str, node: str, as_json: bool, run_dir: Path) -> None:
    """Ask a daemon for its state: bindings (HA, dynamic CN-GW), visitors (FA), registration (MN), paths (FA, HA,
    CN-GW), sessions (AAAH, AAAF), counters."""
    try:
        data = control.call(control_socket(run_dir.absolute(), node), SHOW[what])
    except control.ControlUnavailable as exc:
        raise click.ClickException(f"{node}: {exc}") from None
    if as_json:
        click.echo(json.dumps(data, indent=2))
    elif isinstance(data, list):
        click.echo(_table(data, f"no {what} on {node}"))
    else:
        for key, value in data.items():
            click.echo(f"{key}: {value}")


if __name__ == "__main__":
    main()
