"""Synthetic users (topology users without an ``mn`` node, for `mipvpn bench register`): validated by
the topology, provisioned like any user (HA, VPN database) but with no MN daemon; their keys go to
``RUN_DIR/bench-users.yaml`` (0600) and nowhere else outside the HA's config and the database.
No root, nothing started."""

from __future__ import annotations

import copy
import stat
from pathlib import Path
from typing import Any

import pytest
import yaml

from daemons.bench.register import bench_topology_data
from daemons.provision import configs as provision
from daemons.provision.kinds import parse_topology as parse
from daemons.store.vpndb import open_database
from lab.topology import TopologyError

DEFAULT = yaml.safe_load(Path("lab/topologies/default.yaml").read_text())


def with_users(*users: dict[str, Any]) -> dict[str, Any]:
    data = copy.deepcopy(DEFAULT)
    data["users"] += list(users)
    return data


def test_a_user_without_mn_is_synthetic() -> None:
    topo = parse(with_users({"nai": "bench1@home.example", "home_address": "198.18.100.11", "home_agent": "ha"}))
    assert [(u.nai, u.mn) for u in topo.users] == [("mn1@home.example", "mn1"), ("bench1@home.example", None)]
    assert topo.user_of("mn1") is not None


@pytest.mark.parametrize(("user", "problem"), [
    ({"nai": "b@home.example", "mn": "fa1", "home_address": "198.18.100.11", "home_agent": "ha"},
     "users[1].mn: node 'fa1' is not a mobile node"),
    ({"nai": "b@home.example", "home_address": "198.18.100.10", "home_agent": "ha"},
     "users[1].home_address: address 198.18.100.10 already used"),
    ({"nai": "b@home.example", "home_agent": "ha"}, "users[1].home_address: missing"),
])
def test_synthetic_users_are_still_validated(user: dict[str, Any], problem: str) -> None:
    with pytest.raises(TopologyError) as err:
        parse(with_users(user), "bad.yaml")
    assert problem in str(err.value)


def test_provisioning_synthetic_users(tmp_path: Path) -> None:
    topo = parse(bench_topology_data(3), "bench.yaml")
    run = tmp_path / "run"
    services = provision.services(topo, run, "none")
    names = [s.name for s in services]
    assert "daemon:mn1" in names and "daemon:drv" not in names  # drv: an mn node without a user
    ha = yaml.safe_load((run / "nodes" / "ha" / "ha.yaml").read_text())
    bench = [f"bench{k}@home.example" for k in (1, 2, 3)]
    assert [m["nai"] for m in ha["mobile_nodes"]] == ["mn1@home.example", *bench]
    path = run / provision.SYNTHETIC_USERS_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    users = provision.read_synthetic_users(run)
    assert [(u.nai, str(u.home_address), str(u.home_agent)) for u in users] == [
        (nai, f"198.19.0.{k + 11}", "198.19.0.1") for k, nai in enumerate(bench)]  # after mn1's 198.19.0.10
    # the same MN-HA keys as the HA's, the same MN-AAA secrets as the AAAH's database
    assert [m["key"] for m in ha["mobile_nodes"][1:]] == [u.mn_ha.key.reveal().hex() for u in users]
    db = open_database(f"sqlite:///{run / 'nodes' / 'aaah' / 'vpn.db'}")
    try:
        for u in users:
            assert db.mn_aaa_secret(u.nai, u.mn_aaa.spi) == u.mn_aaa.key
    finally:
        db.close()
    assert "mn1@home.example" not in path.read_text()  # an MN's keys stay in its own config


def test_no_synthetic_users_no_file(tmp_path: Path) -> None:
    provision.services(parse(copy.deepcopy(DEFAULT), "default.yaml"), tmp_path / "run", "none")
    assert not (tmp_path / "run" / provision.SYNTHETIC_USERS_FILE).exists()


def test_bench_home_prefixes_and_more_home_agents(tmp_path: Path) -> None:
    """The bench's home link is 198.19.0.0/16 (mn1 keeps its offset); past it, ha2 and ha3 of the
    home domain, each a valid node of the lab with its own home link, provisioned like ha."""
    from daemons.bench.register import bench_base_topology, bench_pools, home_agents_needed, max_users

    one = parse(bench_base_topology(1), "bench.yaml")
    assert str(one.segment_of("ha").prefix) == "198.19.0.0/16"  # type: ignore[union-attr]
    assert str(one.user_of("mn1").home_address) == "198.19.0.10"  # type: ignore[union-attr]
    assert home_agents_needed(65_524) == 1 and home_agents_needed(65_525) == 2 and max_users() == 102_382
    three = parse(bench_base_topology(3), "bench3.yaml")
    assert [str(three.segment_of(h).prefix) for h in ("ha", "ha2", "ha3")] == [  # type: ignore[union-attr]
        "198.19.0.0/16", "198.18.128.0/17", "198.18.112.0/20"]
    assert [ha for ha, _ in bench_pools(bench_base_topology(3))] == ["ha", "ha2", "ha3"]
    data = bench_base_topology(2)
    data["users"].append({"nai": "bench1@home.example", "home_address": "198.18.128.2", "home_agent": "ha2"})
    services = provision.services(parse(data, "bench2.yaml"), tmp_path / "run", "none")
    assert {"daemon:ha", "daemon:ha2"} <= {s.name for s in services}
    ha2 = yaml.safe_load((tmp_path / "run" / "nodes" / "ha2" / "ha.yaml").read_text())
    assert [m["nai"] for m in ha2["mobile_nodes"]] == ["bench1@home.example"]
