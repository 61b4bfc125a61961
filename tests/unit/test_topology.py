"""Topology files: the default one is valid; every kind of mistake is refused by name."""

from __future__ import annotations

import copy
import ipaddress
from pathlib import Path
from typing import Any

import pytest
import yaml

from daemons.provision.kinds import load_topology as load
from daemons.provision.kinds import parse_topology as parse
from lab.topology import TopologyError

DEFAULT = yaml.safe_load(Path("lab/topologies/default.yaml").read_text())


def test_default_topology_is_the_design_one() -> None:
    topo = load()
    assert set(topo.nodes) == {"core", "ha", "aaah", "aaaf1", "fa1", "fa2", "aaaf2", "fa3", "cngw", "cn", "cngw2",
                               "cn2", "mn1"}
    # Two correspondent networks: cngw HA-anchored (static), cngw2 route-optimised (dynamic).
    assert (topo.mode("cngw"), topo.mode("cngw2"), topo.mode("ha")) == ("static", "dynamic", None)
    assert topo.prefixes_behind("cngw2") == [ipaddress.IPv4Network("198.18.3.0/24")]
    assert topo.nodes["mn1"].attach == "fa1"
    assert topo.user_of("mn1").nai == "mn1@home.example"  # type: ignore[union-attr]
    # Core knows every stub prefix; cn is reached through cngw.
    core_routes = dict(topo.routes("core"))
    assert str(core_routes["198.18.2.0/24"]) == "198.18.0.30"
    assert str(core_routes["198.18.100.0/24"]) == "198.18.0.2"
    assert dict(topo.routes("cn")) == {"default": topo.link_between("cn", "cngw").address_of("cngw")}  # type: ignore[union-attr]


def mutated(change) -> dict[str, Any]:
    data = copy.deepcopy(DEFAULT)
    change(data)
    return data


CASES = [
    ("unknown node in a link",
     lambda d: d["links"][0]["ends"].update({"nosuch": "198.18.0.3"}) or d["links"][0]["ends"].pop("ha"),
     "links[0].ends", "unknown node 'nosuch'"),
    ("overlapping prefix",
     lambda d: d["links"][1].update({"prefix": "198.18.0.0/29", "ends": {"core": "198.18.0.5", "aaah": "198.18.0.6"}}),
     "links[1].prefix", "overlaps"),
    ("malformed prefix", lambda d: d["links"][0].update({"prefix": "198.18.0.1/30"}),
     "links[0].prefix", "malformed prefix"),
    ("prefix outside the lab space", lambda d: d["segments"][0].update({"prefix": "10.0.0.0/24"}),
     "segments[0].prefix", "outside the lab address space"),
    ("address outside its prefix", lambda d: d["links"][0]["ends"].update({"ha": "198.18.0.9"}),
     "links[0].ends.ha", "not inside 198.18.0.0/30"),
    ("missing role", lambda d: d["nodes"]["cn"].pop("role"), "nodes.cn.role", "missing role"),
    ("unknown role", lambda d: d["nodes"]["cn"].update({"role": "toaster"}), "nodes.cn.role", "unknown role"),
    ("unknown field", lambda d: d["nodes"]["cn"].update({"colour": "red"}), "nodes.cn.colour", "unknown field"),
    ("bad node name", lambda d: d["nodes"].update({"Bad_Name": {"role": "host"}}), "nodes.Bad_Name",
     "invalid node name"),
    ("unknown domain", lambda d: d["nodes"]["cn"].update({"domain": "nowhere.example"}), "nodes.cn.domain",
     "unknown domain"),
    ("upstream without a link", lambda d: d["nodes"]["cn"].update({"upstream": "core"}), "nodes.cn.upstream",
     "no link between"),
    ("two roots", lambda d: d["nodes"]["cn"].pop("upstream"), "nodes", "exactly one node"),
    ("mobile node without attach", lambda d: d["nodes"]["mn1"].pop("attach"), "nodes.mn1.attach", "missing"),
    ("mobile node on a non-agent", lambda d: d["nodes"]["mn1"].update({"attach": "cn"}), "nodes.mn1.attach",
     "owns no access segment"),
    ("segment owned by a host", lambda d: d["segments"][1].update({"owner": "cn"}), "segments[1].owner",
     "cannot own an access segment"),
    ("duplicate address", lambda d: d["segments"][1].update({"address": "198.18.101.1"}) or
     d["segments"][2].update({"prefix": "198.18.101.0/24", "address": "198.18.101.1"}),
     "segments[2].prefix", "overlaps"),
    ("user with an unknown realm", lambda d: d["users"][0].update({"nai": "mn1@elsewhere"}), "users[0].nai",
     "known realm"),
    ("home address off the home link", lambda d: d["users"][0].update({"home_address": "198.18.101.10"}),
     "users[0].home_address", "not inside 198.18.100.0/24"),
    ("missing nodes", lambda d: d.pop("nodes"), "nodes", "missing"),
    ("unknown CN-GW mode", lambda d: d["nodes"]["cngw2"].update({"mode": "sometimes"}), "nodes.cngw2.mode",
     "unknown mode 'sometimes' (one of: static, dynamic)"),
    ("mode on a host", lambda d: d["nodes"]["cn"].update({"mode": "dynamic"}), "nodes.cn.mode",
     "a host node has no mode"),
    ("settings not a mapping", lambda d: d["nodes"]["cngw2"].update({"settings": [1]}), "nodes.cngw2.settings",
     "must be a mapping"),
    ("link with three ends", lambda d: d["links"][0]["ends"].update({"aaah": "198.18.0.3"}), "links[0].ends",
     "exactly two ends"),
]


@pytest.mark.parametrize(("what", "change", "field", "problem"), CASES, ids=[c[0] for c in CASES])
def test_invalid_topology_is_refused_naming_the_field(what, change, field, problem) -> None:
    with pytest.raises(TopologyError) as err:
        parse(mutated(change), "bad.yaml")
    message = str(err.value)
    assert message.startswith(f"bad.yaml: {field}:"), message
    assert problem in message, message


def test_duplicate_node_name_in_the_file(tmp_path: Path) -> None:
    text = Path("lab/topologies/default.yaml").read_text().replace(
        "  cn:    {role: host,", "  cngw:  {role: host, domain: corp.example, upstream: core}\n  cn:    {role: host,")
    bad = tmp_path / "dup.yaml"
    bad.write_text(text)
    with pytest.raises(TopologyError, match=r"dup.yaml: file: .*duplicate key 'cngw'"):
        load(bad)


def test_unreadable_and_non_yaml_files(tmp_path: Path) -> None:
    with pytest.raises(TopologyError, match=r"missing\.yaml: file: cannot read"):
        load(tmp_path / "missing.yaml")
    (tmp_path / "junk.yaml").write_text("nodes: [unclosed")
    with pytest.raises(TopologyError, match=r"junk\.yaml: file: not valid YAML"):
        load(tmp_path / "junk.yaml")


def test_lab_up_refuses_a_bad_file_before_touching_anything(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from daemons.cli.main import main

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(mutated(lambda d: d["nodes"]["cn"].update({"role": "toaster"}))))
    result = CliRunner().invoke(main, ["lab", "--run-dir", str(tmp_path / "run"), "up", "-t", str(bad),
                                       "--ns-prefix", "mvnever-"])
    assert result.exit_code != 0
    assert "bad.yaml: nodes.cn.role: unknown role 'toaster'" in result.output
    assert not (tmp_path / "run").exists()
    assert not list(Path("/run/netns").glob("mvnever-*"))


def test_the_lab_knows_only_the_kinds_it_is_given() -> None:
    """Nothing Mobile IP in the model: other kinds, other names, the same rules."""
    from lab.topology import NodeKind
    from lab.topology import parse as lab_parse

    kinds = [NodeKind("backbone", forwards=True), NodeKind("ap", forwards=True, owns_segment=True),
             NodeKind("phone", mobile=True), NodeKind("server")]
    data = {"nodes": {"bb": {"role": "backbone"}, "ap1": {"role": "ap", "upstream": "bb"},
                      "srv": {"role": "server", "upstream": "bb"}, "p1": {"role": "phone", "attach": "ap1"}},
            "links": [{"prefix": "198.18.0.0/30", "ends": {"bb": "198.18.0.1", "ap1": "198.18.0.2"}},
                      {"prefix": "198.18.0.4/30", "ends": {"bb": "198.18.0.5", "srv": "198.18.0.6"}}],
            "segments": [{"owner": "ap1", "prefix": "198.18.10.0/24", "address": "198.18.10.1"}]}
    topo = lab_parse(data, "mine.yaml", kinds)
    assert [n.name for n in topo.mobile_nodes()] == ["p1"]
    assert topo.kind("ap1").forwards and not topo.kind("srv").forwards
    data["segments"][0]["owner"] = "srv"
    with pytest.raises(TopologyError, match=r"segments\[0\]\.owner: .* only ap can"):
        lab_parse(data, "mine.yaml", kinds)
    data["nodes"]["srv"]["role"] = "ha"  # a mipvpn role means nothing to the lab
    with pytest.raises(TopologyError, match=r"nodes\.srv\.role: unknown role 'ha' \(one of: backbone, ap, phone, "):
        lab_parse(data, "mine.yaml", kinds)
