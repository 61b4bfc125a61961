"""`mipvpn daemon ROLE -c CONFIG`: load and check the configuration, then run one role."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from daemons.runtime import config as configuration
from daemons.runtime import log


def run(role: str, config_path: Path) -> None:
    """Raises ConfigError (naming the field) before anything starts."""
    cfg = configuration.load(config_path)
    if cfg.role != role:
        raise configuration.ConfigError(config_path.name, "role",
                                        f"is {cfg.role!r}, but the daemon was started as {role!r}")
    log.setup(cfg.node, cfg.log_level)
    os.umask(0o077)  # state files, their directory and sockets are ours alone
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    cfg.state_dir.chmod(0o700)  # also when an earlier run made it with another umask
    if role == "ha":
        from daemons.agents.ha import HomeAgent

        main = HomeAgent(cfg).run()  # type: ignore[arg-type]
    elif role == "fa":
        from daemons.agents.fa import ForeignAgent

        main = ForeignAgent(cfg).run()  # type: ignore[arg-type]
    elif role == "cngw":
        from daemons.agents.cngw import CorrespondentGateway

        main = CorrespondentGateway(cfg).run()
    elif role == "aaah":
        from daemons.aaa.aaah import HomeAAAServer

        main = HomeAAAServer(cfg).run()  # type: ignore[arg-type]
    elif role == "aaaf":
        from daemons.aaa.aaaf import ForeignAAAServer

        main = ForeignAAAServer(cfg).run()  # type: ignore[arg-type]
    else:
        from daemons.agents.mn import MobileNode

        main = MobileNode(cfg).run()  # type: ignore[arg-type]
    asyncio.run(main)
