"""No key crosses any link in clear (issue 15's proof): every link of the default lab is
captured while the MN registers (F1, with route optimisation to cngw2: F4), moves within the
domain (F2, with smooth handoff: F6), to the other domain (F3) and back; then every pcap is
searched for every key, PSK and MN key of the run, raw and as hex. None may be found. tshark,
without the keylogs, sees the Diameter traffic only as TLS 1.3; with them, as Diameter.

The keys come from where the run keeps them: each node's configuration (MN-HA, MN-AAA, FA-HA,
FA-FA, HA-CN-GW keys, the master secret), the seal key files, the IKE PSKs derived from the
master secret for every pair of gateways, the ESP keys and PSKs each agent installed (its MAVPN
cache) and the AAAFs' local-answer keys (their session caches). Assertions name a secret by
its index only, so that a failure prints no key.
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import pytest

from daemons.roles import load_config
from daemons.runtime.secret import Secret
from daemons.store.records import read_rows
from daemons.vpn.keys import pair_psk
from tests.conftest import LabEnv
from tests.lab.mipkit import binding_via, installed_secrets, tshark, wait_for

pytestmark = pytest.mark.lab

HOA = "198.18.100.10"
CN, CN2 = "198.18.2.10", "198.18.3.10"
COA = {"fa1": "198.18.0.14", "fa2": "198.18.0.18", "fa3": "198.18.0.26"}


def secrets_in(value: object, seen: set[int] | None = None) -> list[Secret]:
    """Every Secret inside a configuration object (dataclasses, lists, dicts, tuples)."""
    seen = set() if seen is None else seen
    if id(value) in seen:
        return []
    seen.add(id(value))
    if isinstance(value, Secret):
        return [value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [s for f in dataclasses.fields(value) for s in secrets_in(getattr(value, f.name), seen)]
    if isinstance(value, dict):
        return [s for v in value.values() for s in secrets_in(v, seen)]
    if isinstance(value, list | tuple | set | frozenset):
        return [s for v in value for s in secrets_in(v, seen)]
    return []


def run_secrets(run_dir: Path) -> list[bytes]:
    """Every key of the run that must never be seen on a link."""
    configs = [load_config(p) for p in sorted((run_dir / "nodes").glob("*/*.yaml"))]
    found = [s.reveal() for c in configs for s in secrets_in(c)]
    masters = [c.master_secret for c in configs if getattr(c, "master_secret", None) is not None]
    gateways = {str(a) for c in configs for a in [getattr(c, "address", None)] if a is not None}
    found += [pair_psk(m, a, b).reveal() for m in masters for a, b in itertools.combinations(sorted(gateways), 2)]
    for node in sorted(p.name for p in (run_dir / "nodes").iterdir()):
        found += installed_secrets(run_dir, node)
    # The seal keys (files beside the configurations) and the AAAFs' local-answer keys.
    found += [bytes.fromhex(p.read_text().strip()) for p in sorted((run_dir / "nodes").glob("*/seal/*.key"))]
    for sessions in sorted((run_dir / "nodes").glob("*/state/sessions.db")):
        for record in read_rows(sessions, "sessions").values():
            found += [bytes.fromhex(record[k]) for k in ("local_key", "previous_local_key") if record.get(k)]
    return list(dict.fromkeys(k for k in found if len(k) >= 16))


def forms(key: bytes) -> list[bytes]:
    return [key, key.hex().encode(), key.hex().upper().encode()]


def test_no_key_in_clear_on_any_link_and_diameter_is_tls(lab_up: LabEnv) -> None:
    wait_for(binding_via(lab_up, COA["fa1"]), timeout=15, what="binding via fa1")
    for fa in ("fa2", "fa3", "fa1"):  # F2 (+F6), F3, back
        lab_up.exec("mn1", "ping", "-c", "3", "-i", "0.2", "-W", "2", CN2, check=False)
        lab_up.cli("lab", "move", "mn1", fa)
        wait_for(binding_via(lab_up, COA[fa]), timeout=15, what=f"binding via {fa}")
    lab_up.exec("mn1", "ping", "-c", "3", "-i", "0.2", "-W", "2", CN, check=False)
    lab_up.cli("lab", "capture", "stop")
    captures = sorted((lab_up.run_dir / "captures").glob("*.pcap"))
    assert len(captures) >= 8

    keys = run_secrets(lab_up.run_dir)
    n_keys = len(keys)  # never len(keys) inside an assert: pytest would print the list
    assert n_keys >= 20
    leaks = [(pcap.name, i) for pcap in captures for i, k in enumerate(keys)
             if any(f in pcap.read_bytes() for f in forms(k))]
    assert leaks == []

    # Diameter is TLS on every link: as anyone on a link sees it, no Diameter frame anywhere and
    # TLS 1.3 handshakes on the AAA links; with the lab's key logs the same links carry AMR/HAR.
    clear = [p.name for p in captures
             if tshark(p, "-Y", "diameter", "-T", "fields", "-e", "frame.number", keys=False).split()]
    assert clear == []
    for link in ("core-aaah", "core-fa1", "core-ha"):
        pcap = lab_up.run_dir / "captures" / f"{link}.pcap"
        hello = tshark(pcap, "-Y", "tls.handshake.extensions.supported_version == 0x0304", "-T", "fields",
                       "-e", "frame.number", keys=False).split()
        assert hello, f"no TLS 1.3 handshake on {link}"
        decoded = tshark(pcap, "-Y", "diameter", "-T", "fields", "-e", "diameter.cmd.code").split()
        assert {"260", "262"} & set(decoded), f"{link}: no Diameter inside TLS"
