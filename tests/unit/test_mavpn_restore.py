"""The MAVPN control's cache survives a restart, and one unreadable entry costs only that user."""

from __future__ import annotations

from pathlib import Path

from daemons.store.records import RecordStore
from daemons.vpn.mavpn import MavpnControl
from tests.unit.test_vpninfo import NAI, info


def test_a_bad_entry_is_dropped_the_rest_restored(tmp_path: Path) -> None:
    state = RecordStore(tmp_path / "vpn.db")
    good = MavpnControl(backend=None, state=state)  # type: ignore[arg-type]  # restore never touches it
    original = info()
    good.cache[NAI] = {1: original}
    good.persist(NAI)
    state.put("vpn", "broken@home.example", ["00zz"])  # not hex
    state.put("vpn", "short@home.example", [info().to_avp().encode().hex()[:-8]])  # truncated AVP
    state.close()

    again = RecordStore(tmp_path / "vpn.db")
    restored = MavpnControl(backend=None, state=again)  # type: ignore[arg-type]
    restored.restore()
    assert list(restored.cache) == [NAI]
    assert restored.cache[NAI] == {1: original}
    assert again.dropped == 2 and list(again.rows("vpn")) == [NAI]  # the bad ones go: they warn once
