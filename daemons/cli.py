"""`mipvpn`: the command line of the whole system (lab, show, db, daemon)."""

from __future__ import annotations

import click

from lab.cli import lab_group


@click.group()
@click.version_option(package_name="mipvpn")
def main() -> None:
    """mipvpn: AAA-distributed IPsec VPN paths that follow Mobile IPv4 nodes."""


main.add_command(lab_group)


if __name__ == "__main__":
    main()
