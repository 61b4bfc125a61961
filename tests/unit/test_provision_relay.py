"""The optional Diameter relay of a realm (``domains: {REALM: {aaa: AAAH, relay: NODE}}``): validated
by the topology, wired by provisioning (AAAFs dial the relay, the relay peers with AAAH and AAAFs).
No root, nothing started: freeDiameterd itself runs in ``tests/lab/test_freediameter.py``."""

from __future__ import annotations

import copy
import stat
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import NameOID

from daemons.provision import configs as provision
from daemons.provision import fdrelay
from daemons.provision.kinds import parse_topology as parse
from daemons.roles import load_config
from lab.lab import healthy, tcp_listening
from lab.topology import TopologyError

DEFAULT = yaml.safe_load(Path("lab/topologies/default.yaml").read_text())


def with_relay(**spec: Any) -> dict[str, Any]:
    data = copy.deepcopy(DEFAULT)
    data["domains"]["home.example"].update(spec)
    return data


@pytest.mark.parametrize(("spec", "problem"), [
    ({"relay": "nosuch"}, "unknown node 'nosuch'"),
    ({"relay": "aaaf1"}, "node 'aaaf1' (role aaaf) cannot run a relay: only host and router nodes can"),
    ({"relay": "core", "aaa": "aaaf1"}, "a relay needs the domain's home AAA server"),
])
def test_bad_relay_is_refused_naming_the_field(spec: dict[str, Any], problem: str) -> None:
    with pytest.raises(TopologyError) as err:
        parse(with_relay(**spec), "bad.yaml")
    assert str(err.value).startswith("bad.yaml: domains.home.example.relay:"), str(err.value)
    assert problem in str(err.value)


def test_no_relay_without_aaa() -> None:
    data = with_relay(relay="core")
    data["domains"]["home.example"].pop("aaa")
    with pytest.raises(TopologyError, match=r"domains\.home\.example\.relay: a relay needs"):
        parse(data, "bad.yaml")


def test_provisioning_puts_the_relay_between_aaafs_and_aaah(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fdrelay.shutil, "which", lambda name: f"/usr/bin/{name}")
    topo = parse(with_relay(relay="core"), "relay.yaml")
    run = tmp_path / "run"
    services = provision.services(topo, run, "none")
    names = [s.name for s in services]
    # after the AAAH it dials, before the AAAFs that dial it
    assert names.index("daemon:aaah") < names.index("relay:core") < names.index("daemon:aaaf1")
    relay = services[names.index("relay:core")]
    conf = run / "nodes" / "core" / "freediameter" / "freeDiameter.conf"
    assert (relay.node, relay.argv, relay.control_socket, relay.listen_port) == \
        ("core", ["/usr/bin/freeDiameterd", "-c", str(conf)], None, 3868)
    text = conf.read_text()
    assert 'Identity = "core.relay.example";' in text and 'ListenOn = "198.18.0.1";' in text
    for host, address in (("aaah.home.example", "198.18.0.6"), ("aaaf1.visit-a.example", "198.18.0.10"),
                          ("aaaf2.visit-b.example", "198.18.0.22")):
        assert f'ConnectPeer = "{host}" {{ ConnectTo = "{address}"; Port = 3868; No_TLS; }};' in text
    # the throwaway credentials: the key private, the certificate's owner the relay's identity
    key, cert = conf.parent / "key.pem", conf.parent / "cert.pem"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    subject = x509.load_pem_x509_certificate(cert.read_bytes()).subject
    assert subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "core.relay.example"
    # every AAAF reaches home.example through the relay, which has its own realm and may also dial the
    # AAAF from any of core's addresses (the one facing the AAAF is not where it listens)
    core = [f"198.18.0.{i}/32" for i in (1, 5, 9, 13, 17, 21, 25, 29, 33)]
    for aaaf in ("aaaf1", "aaaf2"):
        cfg = yaml.safe_load((run / "nodes" / aaaf / "aaaf.yaml").read_text())
        assert [{"port": 3868, **h} for h in cfg["home_servers"]] == [
            {"host": "core.relay.example", "realm": "relay.example", "address": "198.18.0.1", "port": 3868,
             "source_addresses": core, "routes": ["home.example"]}]
    # the AAAH lets only the relay in (an agent: the AMRs it relays are the FAs')
    aaah = yaml.safe_load((run / "nodes" / "aaah" / "aaah.yaml").read_text())
    assert aaah["accept_peers"] == [{"host": "core.relay.example", "realm": "relay.example", "addresses": core,
                                     "agent": True}]
    # and every configuration still loads
    for node in ("ha", "aaah", "aaaf1", "aaaf2", "fa1"):
        role = "fa" if node == "fa1" else node.rstrip("12")
        assert load_config(run / "nodes" / node / f"{role}.yaml").accept_peers is not None


def test_without_relay_nothing_changes(tmp_path: Path) -> None:
    services = provision.services(parse(copy.deepcopy(DEFAULT), "default.yaml"), tmp_path / "run", "none")
    assert not [s for s in services if s.name.startswith("relay:")]
    cfg = yaml.safe_load((tmp_path / "run" / "nodes" / "aaaf1" / "aaaf.yaml").read_text())
    assert [{"port": 3868, **h} for h in cfg["home_servers"]] == [
        {"host": "aaah.home.example", "realm": "home.example", "address": "198.18.0.6", "port": 3868}]


def test_each_daemon_is_told_who_may_connect(tmp_path: Path) -> None:
    """RFC 6733 §5.3: only configured peers get in, each from its own addresses: the HA its AAAH,
    the AAAH every AAAF (agents: they relay the FAs' AMRs), each AAAF the FAs of its domain."""
    provision.services(parse(copy.deepcopy(DEFAULT), "default.yaml"), tmp_path / "run", "none")

    def accepted(node: str, role: str) -> list[tuple[str, str, list[str], bool]]:
        config = load_config(tmp_path / "run" / "nodes" / node / f"{role}.yaml")
        return [(p.host, p.realm, [str(a) for a in p.addresses], p.agent) for p in config.accept_peers]

    assert accepted("ha", "ha") == [("aaah.home.example", "home.example", ["198.18.0.6/32"], False)]
    assert accepted("aaah", "aaah") == [
        ("aaaf1.visit-a.example", "visit-a.example", ["198.18.0.10/32"], True),
        ("aaaf2.visit-b.example", "visit-b.example", ["198.18.0.22/32"], True)]
    assert accepted("aaaf1", "aaaf") == [
        ("fa1.visit-a.example", "visit-a.example", ["198.18.0.14/32", "198.18.101.1/32"], False),
        ("fa2.visit-a.example", "visit-a.example", ["198.18.0.18/32", "198.18.102.1/32"], False)]
    assert accepted("aaaf2", "aaaf") == [
        ("fa3.visit-b.example", "visit-b.example", ["198.18.0.26/32", "198.18.103.1/32"], False)]
    assert accepted("fa1", "fa") == []  # it dials its AAAF, nobody dials it


def test_missing_freediameterd_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fdrelay.shutil, "which", lambda name: None)
    with pytest.raises(fdrelay.RelayUnavailable, match="Debian package freediameterd"):
        provision.services(parse(with_relay(relay="core"), "relay.yaml"), tmp_path / "run", "none")


def test_tcp_health_check() -> None:
    import os
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        assert not tcp_listening(os.getpid(), port)
        s.listen()
        assert tcp_listening(os.getpid(), port) and healthy(f"tcp:{port}", os.getpid())
    assert not healthy(f"tcp:{port}", None)
    assert not healthy("/nonexistent/control.sock", None)
