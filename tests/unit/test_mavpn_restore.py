"""The MAVPN control's cache survives a restart, and one unreadable entry costs only that user."""

from __future__ import annotations

import json
from pathlib import Path

from daemons.store.state import StateFile
from daemons.vpn.mavpn import MavpnControl
from tests.unit.test_vpninfo import NAI, info


def test_a_bad_entry_is_dropped_the_rest_restored(tmp_path: Path) -> None:
    state = StateFile(tmp_path / "vpn.json")
    good = MavpnControl(backend=None, state=state)  # type: ignore[arg-type]  # restore never touches it
    original = info()
    good.cache[NAI] = {1: original}
    good.persist()
    data = json.loads(state.path.read_text())
    data["vpn"]["broken@home.example"] = ["00zz"]  # not hex
    data["vpn"]["short@home.example"] = [info().to_avp().encode().hex()[:-8]]  # truncated AVP
    state.path.write_text(json.dumps(data))

    restored = MavpnControl(backend=None, state=state)  # type: ignore[arg-type]
    restored.restore()
    assert list(restored.cache) == [NAI]
    assert restored.cache[NAI] == {1: original}
