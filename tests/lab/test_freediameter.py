"""Flow F1 through an independent Diameter relay: freeDiameterd (Debian ``freediameterd``) between
the AAAFs and the AAAH, over TLS 1.3 on every leg.

The default topology with ``domains: {home.example: {aaa: aaah, relay: core}}``: the lab runs
freeDiameterd in ``core`` (``daemons.provision.fdrelay``; its certificate is issued by the lab's CA
in the run directory, under the test's tmp dir), the AAAFs dial it for home.example instead of the AAAH.
The registration still completes, the MN reaches the CN over its VPN, a wrong MN-AAA secret is
still refused, and the captures show the AMR crossing the relay with the Route-Record it added.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import yaml

from daemons.provision.configs import control_socket
from daemons.runtime import control
from daemons.runtime.config import SecurityAssociation
from daemons.runtime.secret import Secret
from daemons.wire import mip
from lab.topology import default_topology_path
from tests.conftest import LabEnv
from tests.lab.mipkit import binding_via, heard_advertisement, send_udp, show, tshark, wait_for

pytestmark = [pytest.mark.lab,
              pytest.mark.skipif(shutil.which("freeDiameterd") is None,
                                 reason="freeDiameterd (Debian package freediameterd) is not installed")]

HOA, CN, HA = "198.18.100.10", "198.18.2.10", "198.18.100.1"
FA1, FA1_ACCESS = "198.18.0.14", "198.18.101.1"
RELAY = "198.18.0.1"  # core's address (its first link): where the relay listens
AAAH, AAAF1 = "198.18.0.6", "198.18.0.10"
RELAY_HOST, AAAH_HOST = "core.relay.example", "aaah.home.example"
FA1_HOST, AAAF1_HOST = "fa1.visit-a.example", "aaaf1.visit-a.example"


@pytest.fixture
def relay_lab(lab_env: LabEnv, tmp_path: Path) -> LabEnv:
    """The default lab, home.example's AAA reached through freeDiameterd in core, captures on."""
    topo = yaml.safe_load(default_topology_path().read_text())
    topo["domains"]["home.example"]["relay"] = "core"
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(topo, sort_keys=False))  # keep link end order: link and pcap names
    lab_env.cli("lab", "up", "-t", str(path), "--capture")
    return lab_env


def paths_up(env: LabEnv, node: str, count: int):
    def check():
        rows = show(env, "paths", node)
        return rows if sum(r.get("state") == "up" for r in rows) >= count else None  # type: ignore[union-attr]
    return check


def peers(env: LabEnv, node: str) -> dict[str, dict]:
    return {p["peer"]: p for p in control.call(control_socket(env.run_dir, node), "peers")}


def diameter_rows(pcap: Path, *fields: str, where: str = "diameter") -> list[list[str]]:
    out = tshark(pcap, "-Y", where, "-T", "fields", "-E", "occurrence=a", "-E", "aggregator=,",
                 *(x for f in fields for x in ("-e", f)))
    return [line.split("\t") for line in out.splitlines() if line.strip()]


def test_f1_through_a_freediameter_relay(relay_lab: LabEnv) -> None:
    env = relay_lab
    wait_for(binding_via(env, FA1), timeout=15, what="binding via fa1")
    wait_for(paths_up(env, "fa1", 1), timeout=15, what="fa1 path up")
    wait_for(paths_up(env, "ha", 2), timeout=15, what="ha paths up")
    wait_for(paths_up(env, "cngw", 1), timeout=15, what="cngw path up")
    env.cli("lab", "exec", "mn1", "--", "ping", "-c", "3", "-i", "0.2", "-W", "2", CN)
    env.cli("lab", "exec", "cn", "--", "ping", "-c", "3", "-i", "0.2", "-W", "2", HOA)
    assert [s["mn"] for s in show(env, "sessions", "aaah")] == ["mn1@home.example"]  # type: ignore[index]
    assert [s["mn"] for s in show(env, "sessions", "aaaf1")] == ["mn1@home.example"]  # type: ignore[index]

    # Who is connected to whom: the AAAF to the relay only (for home.example), the AAAH to the relay.
    aaaf_peers, aaah_peers = peers(env, "aaaf1"), peers(env, "aaah")
    assert AAAH_HOST not in aaaf_peers
    assert aaaf_peers[RELAY_HOST]["state"] == "open" and aaaf_peers[RELAY_HOST]["address"] == f"{RELAY}:5658"
    assert aaah_peers[RELAY_HOST]["state"] == "open" and aaah_peers[RELAY_HOST]["realm"] == "relay.example"
    # over TLS 1.3, freeDiameter's certificate (the lab CA's, for its identity) checked by both
    assert aaaf_peers[RELAY_HOST]["tls"] == aaah_peers[RELAY_HOST]["tls"] == "TLSv1.3"
    assert 0xFFFFFFFF in aaah_peers[RELAY_HOST]["applications"]  # it advertised Relay-Application-Id

    # A wrong MN-AAA secret is still refused, its 4001 relayed back through freeDiameter.
    challenge = heard_advertisement(env, "mn1").challenge
    rrq = mip.registration_request(home_address=HOA, home_agent=HA, care_of_address=FA1,
                                   identification=mip.ntp_identification(time.time()), lifetime=60,
                                   nai="mn1@home.example", mn_ha=SecurityAssociation(0x1000, Secret(b"x" * 16)),
                                   challenge=challenge, mn_aaa=SecurityAssociation(0x3000, Secret(b"wrong secret 123")))
    reply = mip.decode_message(send_udp(env, "mn1", FA1_ACCESS, rrq.encode(), wait=6))
    assert isinstance(reply, mip.RegistrationReply) and reply.code == mip.ReplyCode.FA_MN_FAILED_AUTHENTICATION
    assert [b["care_of_address"] for b in show(env, "bindings", "ha")] == [FA1]  # type: ignore[index]

    env.cli("lab", "capture", "stop")
    captures = env.run_dir / "captures"
    fields = ("tcp.stream", "ip.src", "ip.dst", "diameter.flags.request", "diameter.Origin-Host",
              "diameter.Route-Record", "diameter.Result-Code")

    # aaaf1 → relay: the AAAF's AMRs go to the relay's address, carrying the Route-Record the AAAF added.
    amrs = diameter_rows(captures / "core-aaaf1.pcap", *fields, where="diameter.cmd.code == 260")
    to_relay = [r for r in amrs if r[3] == "1" and r[1] == AAAF1]
    assert len(to_relay) >= 2 and all(r[2] == RELAY and r[5] == FA1_HOST for r in to_relay), amrs
    assert not [r for r in amrs if AAAH in r[1:3]], "an AMR went from aaaf1 straight to the AAAH"

    # relay → AAAH: on a connection whose CER came from freeDiameter, the AMR from fa1 with both
    # Route-Records (the AAAF's and the relay's); the AMAs back: 2001 and 4001.
    link = captures / "core-aaah.pcap"
    cers = diameter_rows(link, "tcp.stream", "diameter.Origin-Host", "diameter.Product-Name",
                         where="diameter.cmd.code == 257 && diameter.flags.request == 1")
    relay_streams = {r[0] for r in cers if r[1] == RELAY_HOST and r[2] == "freeDiameter"}
    assert relay_streams, cers
    rows = diameter_rows(link, *fields, where="diameter.cmd.code == 260")
    requests = [r for r in rows if r[3] == "1"]
    answers = [r for r in rows if r[3] == "0"]
    assert len(requests) >= 2 and all(r[0] in relay_streams and r[2] == AAAH for r in requests), rows
    assert all(r[4] == FA1_HOST and r[5] == f"{FA1_HOST},{AAAF1_HOST}" for r in requests), requests
    assert {"2001", "4001"} <= {r[6] for r in answers}, answers
    assert all(r[0] in relay_streams and r[1] == AAAH for r in answers), answers

    # HAR/HAA still go straight from the AAAH to the HA.
    har = diameter_rows(captures / "core-ha.pcap", "diameter.flags.request", where="diameter.cmd.code == 262")
    assert {("1",), ("0",)} <= {tuple(r) for r in har}
    # No Diameter message on the relayed legs that tshark calls malformed (our vendor AVPs are unknown
    # to it; the relay's first dial to an AAAF not yet listening is a TCP reset, not a problem).
    for pcap in ("core-aaaf1.pcap", "core-aaah.pcap"):
        out = tshark(captures / pcap, "-Y", "diameter && (_ws.malformed || _ws.expert.severity >= 6291456)",
                     "-T", "fields", "-e", "frame.number", "-e", "_ws.expert.message")
        problems = [p for p in out.splitlines() if p.strip() and "Unknown AVP" not in p and "Undecoded" not in p]
        assert problems == [], (pcap, problems)
    # Every relayed leg is TLS 1.3 on 5658 (decoded above with the key logs); without them: no
    # Diameter at all. GnuTLS wrote the relay's own key log (SSLKEYLOGFILE).
    for pcap in ("core-aaaf1.pcap", "core-aaah.pcap"):
        assert tshark(captures / pcap, "-Y", "diameter || tcp.port == 3868", "-T", "fields", "-e", "frame.number",
                      keys=False).split() == [], pcap
        hellos = tshark(captures / pcap, "-Y", "tls.handshake.type == 2", "-T", "fields",
                        "-e", "tls.handshake.extensions.supported_version", keys=False).split()
        assert hellos and set(hellos) == {"0x0304"}, (pcap, hellos)
    assert "CLIENT_TRAFFIC_SECRET_0" in (env.run_dir / "tls-keys" / "core.keys").read_text()
