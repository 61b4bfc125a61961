"""`python -m daemons.cli.main`: the same command line as `mipvpn`."""

from daemons.cli.main import main

main()
