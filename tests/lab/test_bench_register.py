"""`mipvpn bench register`: synthetic users registered through FA -> AAAF -> AAAH -> HA.

Asserts only on correctness (every reply accepted, the HA's bindings), never on a timing. The
command brings up and tears down a lab of its own (run directory under /tmp, namespace prefix
``mvrPID-``); the check at the end makes sure it left no namespace behind.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import MIPVPN, ROOT, leftover_namespaces

pytestmark = pytest.mark.lab


def test_three_synthetic_users_register_through_the_aaa_chain() -> None:
    proc = subprocess.run([*MIPVPN, "bench", "register", "--mns", "3", "--json"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert res["mns"] == 3
    assert res["accepted"] == 3 and res["all_accepted"]
    assert res["reply_codes"] == {"0": 3}
    assert res["unauthentic_replies"] == 0 and res["timeouts"] == 0
    assert res["bindings"] == 3 and res["bindings_match"]
    assert res["fa_visitors"] == 3
    assert sorted(r["nai"] for r in res["registrations"]) == [f"bench{k}@home.example" for k in (1, 2, 3)]
    assert all(r["code"] == 0 and r["authentic"] and r["lifetime"] > 0 for r in res["registrations"])
    if res["backend"] != "none":  # each bench user got its own VPN path at the HA, two at fa1 (HA, cngw2)
        assert res["paths"]["ha"]["bench_users"] == 3
        assert res["paths"]["fa1"]["bench_users"] == 6
    assert {"nproc", "kernel"} <= set(res["machine"])
    prefix = res["lab"]["namespace_prefix"]
    assert prefix.startswith("mvr") and not leftover_namespaces(prefix), "bench register left namespaces behind"
