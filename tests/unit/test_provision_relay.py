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
    # GnuTLS writes the relay's TLS secrets into the lab's key log directory (SSLKEYLOGFILE)
    assert (relay.node, relay.argv, relay.control_socket, relay.listen_port) == \
        ("core", ["/usr/bin/env", f"SSLKEYLOGFILE={run / 'tls-keys' / 'core.keys'}", "/usr/bin/freeDiameterd", "-c",
                  str(conf)], None, 5658)
    text = conf.read_text()
    assert 'Identity = "core.relay.example";' in text and 'ListenOn = "198.18.0.1";' in text
    # TLS from the first byte on 5658 only, TLS 1.3, the lab's CA; peers dialled over TLS on 5658
    assert "Port = 0;" in text and "SecPort = 5658;" in text and "No_TLS" not in text and "TLS_old_method" not in text
    assert 'TLS_Prio = "NORMAL:-VERS-ALL:+VERS-TLS1.3";' in text
    assert f'TLS_CA = "{run / "pki" / "ca.pem"}";' in text
    for host, address in (("aaah.home.example", "198.18.0.6"), ("aaaf1.visit-a.example", "198.18.0.10"),
                          ("aaaf2.visit-b.example", "198.18.0.22")):
        assert f'ConnectPeer = "{host}" {{ ConnectTo = "{address}"; Port = 5658; }};' in text
    # its credentials: the key private, the certificate the lab CA's, for the relay's identity
    key, cert = conf.parent / "tls.key", conf.parent / "tls.pem"
    assert f'TLS_Cred = "{cert}", "{key}";' in text
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    issued = x509.load_pem_x509_certificate(cert.read_bytes())
    assert issued.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "core.relay.example"
    assert issued.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
        .get_values_for_type(x509.DNSName) == ["core.relay.example"]
    issued.verify_directly_issued_by(x509.load_pem_x509_certificate((run / "pki" / "ca.pem").read_bytes()))
    # every AAAF reaches home.example through the relay, which has its own realm and may also dial the
    # AAAF from any of core's addresses (the one facing the AAAF is not where it listens)
    core = [f"198.18.0.{i}/32" for i in (1, 5, 9, 13, 17, 21, 25, 29, 33)]
    for aaaf in ("aaaf1", "aaaf2"):
        cfg = yaml.safe_load((run / "nodes" / aaaf / "aaaf.yaml").read_text())
        assert cfg["home_servers"] == [
            {"host": "core.relay.example", "realm": "relay.example", "address": "198.18.0.1", "port": 5658,
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
    assert cfg["home_servers"] == [  # the port is the transport's (TLS: 5658)
        {"host": "aaah.home.example", "realm": "home.example", "address": "198.18.0.6"}]


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


def test_every_diameter_node_gets_a_certificate_of_the_lab_ca(tmp_path: Path) -> None:
    """Diameter over TLS is on in the lab: each Diameter daemon's configuration names the lab's CA,
    its own certificate (for its Diameter identity) and key (0600), and a key log in the lab's
    directory; each passes the daemon's TLS checks. The CA key stays in RUN_DIR/pki, 0600."""
    from daemons.diameter.setup import node_tls

    run = tmp_path / "run"
    provision.services(parse(copy.deepcopy(DEFAULT), "default.yaml"), run, "none")
    ca = x509.load_pem_x509_certificate((run / "pki" / "ca.pem").read_bytes())
    assert stat.S_IMODE((run / "pki" / "ca.key").stat().st_mode) == 0o600
    assert sorted(p.name for p in run.rglob("ca.key")) == ["ca.key"]
    for node, role in (("ha", "ha"), ("aaah", "aaah"), ("aaaf1", "aaaf"), ("aaaf2", "aaaf"), ("fa1", "fa"),
                       ("fa2", "fa"), ("fa3", "fa")):
        config = load_config(run / "nodes" / node / f"{role}.yaml")
        assert config.diameter_transport == "tls" and config.diameter_tls is not None
        tls = config.diameter_tls
        assert tls.ca == run / "pki" / "ca.pem" and tls.keylog == run / "tls-keys" / f"{node}.keys"
        assert tls.cert.parent == tls.key.parent == run / "nodes" / node
        assert stat.S_IMODE(tls.key.stat().st_mode) == 0o600
        cert = x509.load_pem_x509_certificate(tls.cert.read_bytes())
        cert.verify_directly_issued_by(ca)
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert names.get_values_for_type(x509.DNSName) == [config.diameter_host]
        assert node_tls(config, node) is not None
