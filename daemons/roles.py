"""The one role registry: every daemon role, its configuration class and its daemon class.

Everything that lists roles reads them here: the daemon entry (``mipvpn daemon ROLE``), the
configuration loader (which fields a role's file must name), provisioning (the start order:
what others connect to first — the HA listens before the AAAH dials it, the AAAH before the
AAAFs, the AAAFs before the FAs, the agents before the mobile nodes) and the lab's node
kinds (``daemons.provision.kinds``). Daemon classes are imported only when one runs, so
reading the registry loads no protocol engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import Any

from daemons.runtime import config as cfg


@dataclass(frozen=True)
class Role:
    name: str
    config: type[cfg.Common]
    daemon: str  # "module:Class"; the class takes the config and has ``async run()``
    required: tuple[str, ...]  # configuration fields a file for this role must name
    terminates_paths: bool = False  # installs VPN paths (an IPsec gateway: FA, HA, CN-GW)
    diameter: bool = False  # a Diameter node (has a Diameter identity and realm)

    def daemon_class(self) -> Any:
        module, _, name = self.daemon.partition(":")
        return getattr(import_module(module), name)


# In start order.
ROLES: dict[str, Role] = {role.name: role for role in (
    Role("ha", cfg.HAConfig, "daemons.agents.ha:HomeAgent", ("address", "home_prefix"),
         terminates_paths=True, diameter=True),
    Role("cngw", cfg.CNGWConfig, "daemons.agents.cngw:CorrespondentGateway", ("address",),
         terminates_paths=True),
    Role("aaah", cfg.AAAHConfig, "daemons.aaa.aaah:HomeAAAServer",
         ("diameter_host", "diameter_realm", "address", "db_url", "master_secret", "home_agents"), diameter=True),
    Role("aaaf", cfg.AAAFConfig, "daemons.aaa.aaaf:ForeignAAAServer",
         ("diameter_host", "diameter_realm", "address", "home_servers"), diameter=True),
    Role("fa", cfg.FAConfig, "daemons.agents.fa:ForeignAgent", ("access_address", "care_of_address"),
         terminates_paths=True, diameter=True),
    Role("mn", cfg.MNConfig, "daemons.agents.mn:MobileNode",
         ("nai", "home_address", "home_prefix", "home_agent", "mn_ha")),
)}


def load_config(path: Any) -> cfg.Common:
    """A daemon's configuration file, checked against its role (ConfigError names the field)."""
    data, source = cfg.read(path)
    name = data.get("role")
    role = ROLES.get(name)  # type: ignore[arg-type]
    if role is None:
        raise cfg.ConfigError(source, "role", f"unknown or missing role {name!r} (one of: {', '.join(ROLES)})")
    for field_name in role.required:
        if field_name not in data:
            raise cfg.ConfigError(source, field_name, "missing")
    return cfg.build(role.config, data, source, "")
