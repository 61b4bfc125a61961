"""`python -m daemons.cli`: the same command line as `mipvpn`."""

from daemons.cli.main import main

main()
