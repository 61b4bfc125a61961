"""`mipvpn lab demo`: a UDP probe cn <-> mn1 survives every move (it resumes in both
directions), the timeline PNG is written, and the summary has one entry per move.
Resumption is asserted, never a timing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import LabEnv

pytestmark = pytest.mark.lab

MOVES = ["fa2", "fa3", "fa1"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_demo_probe_resumes_after_every_move(lab_up: LabEnv) -> None:
    proc = lab_up.cli("lab", "demo", "--moves", ",".join(MOVES), "--dwell", "1.5", "--rate", "100", "--json",
                      timeout=180)
    result = json.loads(proc.stdout)
    summary = json.loads(Path(result["summary_json"]).read_text())
    assert [m["to"] for m in summary["moves"]] == MOVES
    assert [m["to"] for m in result["moves"]] == MOVES
    for move in summary["moves"]:
        assert set(move["directions"]) == {"cn->mn1", "mn1->cn"}, move["directions"]
        for direction, r in move["directions"].items():
            where = f"move {move['index']} {move['from']}->{move['to']} {direction}: {r}"
            assert r["resumed"], f"probe did not resume after {where}\n{proc.stderr}"
            assert r["received_after"] > 0, where
    # Both probes ran and wrote their records into the run directory.
    for node in ("cn", "mn1"):
        records = (lab_up.run_dir / "demo" / f"probe-{node}.jsonl").read_text().splitlines()
        assert json.loads(records[-1])["summary"] is True
        assert len(records) > 1
    png = Path(result["png"])
    assert png.parent == lab_up.run_dir / "demo"
    assert png.read_bytes()[:8] == PNG_MAGIC
    # The demo leaves captures as it found them (the fixture started them): pcaps are there.
    assert result["captures"] == str(lab_up.run_dir / "captures")
    assert any((lab_up.run_dir / "captures").glob("*.pcap"))
