"""The lab's node kinds: what a node of each role may be and do in a topology file.

The lab knows no roles (``lab.topology.NodeKind``); this is where they are handed to it, for
every daemon role of ``daemons.roles`` and for the two kinds that run no daemon of ours
(routers, and hosts such as correspondents).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from daemons.roles import ROLES
from lab.topology import NodeKind, Topology, load, parse

KINDS: tuple[NodeKind, ...] = (
    NodeKind("router", forwards=True, runs_relay=True),
    NodeKind("host", runs_relay=True),
    NodeKind("mn", mobile=True),
    NodeKind("fa", forwards=True, owns_segment=True),
    NodeKind("ha", forwards=True, owns_segment=True, serves_users=True),
    NodeKind("aaaf", domain_server=True),
    NodeKind("aaah", domain_server=True, relay_target=True),
    NodeKind("cngw", forwards=True, modes=("static", "dynamic")),
)
assert set(ROLES) <= {k.name for k in KINDS}, "every daemon role needs a node kind"


def load_topology(path: str | Path | None = None) -> Topology:
    """A topology file (the default one for None), validated for mipvpn's node kinds."""
    return load(path, KINDS)


def parse_topology(data: Any, source: str = "<topology>") -> Topology:
    return parse(data, source, KINDS)
