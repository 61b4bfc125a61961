"""Provisioning gives every agent that installs paths its seal key (daemons.vpn.seal), fresh per
lab, in files of mode 0600: each HA and dynamic CN-GW its own, the FAs of one visited domain
one shared key, each AAAF its own (its local-answer keys), the AAAH all of them. No root, nothing started."""

from __future__ import annotations

import copy
import stat
from pathlib import Path

import yaml

from daemons.provision import configs as provision
from daemons.provision.kinds import parse_topology as parse
from daemons.roles import load_config
from daemons.runtime.config import read_key_file

DEFAULT = yaml.safe_load(Path("lab/topologies/default.yaml").read_text())


def provisioned(run: Path) -> dict[str, object]:
    provision.services(parse(copy.deepcopy(DEFAULT), "default.yaml"), run, "none")
    return {p.parent.name: load_config(p) for p in sorted((run / "nodes").glob("*/*.yaml"))}


def test_every_agent_gets_its_seal_key_and_the_aaah_all_of_them(tmp_path: Path) -> None:
    configs = provisioned(tmp_path / "run")
    own = {node: configs[node].seal for node in ("ha", "fa1", "fa2", "fa3", "cngw2", "aaaf1", "aaaf2")}  # type: ignore[attr-defined]
    assert {node: ref.name for node, ref in own.items()} == {
        "ha": "ha.home.example", "fa1": "visit-a.example", "fa2": "visit-a.example", "fa3": "visit-b.example",
        "cngw2": "cngw2", "aaaf1": "aaaf1.visit-a.example", "aaaf2": "aaaf2.visit-b.example"}
    assert configs["cngw"].seal is None  # type: ignore[attr-defined]  # static: nothing comes sealed to it
    # A local AAA's key opens its local-answer keys only: it is not its FAs' (their paths' keys).
    assert not hasattr(configs["aaaf1"], "seal_keys")
    keys = {node: read_key_file(ref, node, "seal.key_file") for node, ref in own.items()}
    assert keys["fa1"] == keys["fa2"] and len({keys[n] for n in ("ha", "fa1", "fa3", "cngw2", "aaaf1", "aaaf2")}) == 6
    aaah = {ref.name: read_key_file(ref, "aaah", "seal_keys") for ref in configs["aaah"].seal_keys}  # type: ignore[attr-defined]
    assert aaah == {own[n].name: keys[n] for n in own}
    files = "".join(p.read_text() for p in (tmp_path / "run").rglob("*.yaml"))  # no key in a config file
    for ref in [*own.values(), *configs["aaah"].seal_keys]:  # type: ignore[attr-defined]
        assert stat.S_IMODE(ref.key_file.stat().st_mode) == 0o600
        assert ref.key_file.read_text().strip() not in files
    # Fresh per lab.
    again = provisioned(tmp_path / "other")
    assert read_key_file(again["fa1"].seal, "fa1", "seal") != keys["fa1"]  # type: ignore[attr-defined]
