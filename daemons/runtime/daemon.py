"""`mipvpn daemon ROLE -c CONFIG`: load and check the configuration, then run one role."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from daemons.roles import ROLES, load_config
from daemons.runtime import config as configuration
from daemons.runtime import log


def run(role: str, config_path: Path) -> None:
    """Raises ConfigError (naming the field) before anything starts."""
    cfg = load_config(config_path)
    if cfg.role != role:
        raise configuration.ConfigError(config_path.name, "role",
                                        f"is {cfg.role!r}, but the daemon was started as {role!r}")
    log.setup(cfg.node, cfg.log_level)
    os.umask(0o077)  # state files, their directory and sockets are ours alone
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    cfg.state_dir.chmod(0o700)  # also when an earlier run made it with another umask
    asyncio.run(ROLES[role].daemon_class()(cfg).run())
