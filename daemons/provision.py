"""Turn a lab topology into daemon configurations and the processes that run them.

This is where protocol knowledge meets the topology, so the lab itself stays ignorant of
it: the lab asks for ``services(topology, run_dir)`` and runs what it gets. Secrets are
fresh per lab (CSPRNG) and live only in the per-node configuration files (mode 0600).
"""

from __future__ import annotations

import ipaddress
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from daemons import config as cfg
from daemons.secret import Secret
from lab.topology import Topology

DAEMON_ROLES = ("ha", "fa", "mn")  # start order: agents before the nodes that need them
SPI_MN_HA = 0x1000
SPI_FA_HA = 0x2000
SPI_MN_AAA = 0x3000
SPI_FA_FA = 0x4000


@dataclass(frozen=True)
class Service:
    name: str
    node: str
    argv: list[str]
    control_socket: Path


def node_dir(run_dir: Path, node: str) -> Path:
    return run_dir / "nodes" / node


def control_socket(run_dir: Path, node: str) -> Path:
    return node_dir(run_dir, node) / "control.sock"


def _key() -> Secret:
    return Secret(secrets.token_bytes(16))


def build_configs(topo: Topology, run_dir: Path) -> dict[str, cfg.Common]:
    configs: dict[str, cfg.Common] = {}

    def common(node: str) -> dict[str, object]:
        return {"node": node, "role": topo.nodes[node].role, "state_dir": node_dir(run_dir, node) / "state",
                "control_socket": control_socket(run_dir, node)}

    def ha_address(ha: str) -> str:
        seg = topo.segment_of(ha)
        assert seg is not None  # validated: a user's HA owns a home link
        return str(seg.address)

    def coa(fa: str) -> str:
        up = topo.nodes[fa].upstream
        link = topo.link_between(fa, up) if up else None
        return str(link.address_of(fa)) if link else str(topo.addresses(fa)[0][1].ip)

    mn_keys = {u.nai: (_key(), _key()) for u in topo.users}  # MN-HA, MN-AAA
    fas = [n for n in topo.nodes if topo.nodes[n].role == "fa"]
    fa_ha_keys = {(fa, ha): _key() for fa in fas for ha in topo.nodes if topo.nodes[ha].role == "ha"}
    fa_fa_keys = {frozenset((a, b)): _key() for a in fas for b in fas if a < b}
    for node in topo.nodes.values():
        if node.role == "ha":
            seg = topo.segment_of(node.name)
            assert seg is not None
            configs[node.name] = cfg.HAConfig(
                **common(node.name), address=seg.address, home_prefix=seg.prefix,  # type: ignore[arg-type]
                mobile_nodes=[cfg.MobileNodeEntry(u.nai, u.home_address, SPI_MN_HA, mn_keys[u.nai][0])
                              for u in topo.users if u.home_agent == node.name],
                foreign_agents=[cfg.PeerAgent(ipaddress.IPv4Address(coa(fa)), SPI_FA_HA, key)
                                for (fa, ha), key in fa_ha_keys.items() if ha == node.name])
        elif node.role == "fa":
            seg = topo.segment_of(node.name)
            assert seg is not None
            configs[node.name] = cfg.FAConfig(
                **common(node.name), access_address=seg.address,  # type: ignore[arg-type]
                care_of_address=ipaddress.IPv4Address(coa(node.name)),
                home_agents=[cfg.PeerAgent(ipaddress.IPv4Address(ha_address(ha)), SPI_FA_HA, key)
                             for (fa, ha), key in fa_ha_keys.items() if fa == node.name],
                peer_agents=[cfg.PeerAgent(ipaddress.IPv4Address(coa(other)), SPI_FA_FA,
                                           fa_fa_keys[frozenset((node.name, other))])
                             for other in fas if other != node.name])
        elif node.role == "mn":
            user = topo.user_of(node.name)
            if user is None:
                continue
            home = topo.segment_of(user.home_agent)
            assert home is not None
            configs[node.name] = cfg.MNConfig(
                **common(node.name), nai=user.nai, home_address=user.home_address,  # type: ignore[arg-type]
                home_prefix=home.prefix, home_agent=home.address,
                mn_ha=cfg.SecurityAssociation(SPI_MN_HA, mn_keys[user.nai][0]),
                mn_aaa=cfg.SecurityAssociation(SPI_MN_AAA, mn_keys[user.nai][1]),
                lifetime=int(user.extra.get("lifetime", 300)))
    return configs


def write_config(path: Path, config: cfg.Common) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(yaml.safe_dump(cfg.dump(config), sort_keys=False))


def services(topo: Topology, run_dir: Path) -> list[Service]:
    """Write every daemon's configuration; return the processes, in start order."""
    configs = build_configs(topo, run_dir)
    out = []
    for role in DAEMON_ROLES:
        for node, config in configs.items():
            if config.role != role:
                continue
            path = node_dir(run_dir, node) / f"{role}.yaml"
            write_config(path, config)
            out.append(Service(f"daemon:{node}", node,
                               [sys.executable, "-m", "daemons.cli", "daemon", role, "-c", str(path)],
                               control_socket(run_dir, node)))
    return out
