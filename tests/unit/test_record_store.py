"""The per-record state store (daemons/store/records.py): one SQLite row per record, each change
committed before the caller goes on, the JSON documents of before imported once.

Real databases in tmp_path; the kill -9 test kills a real child process that writes them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from daemons.aaa.sessions import Session, SessionStore
from daemons.agents.ha import Binding, HomeAgent
from daemons.runtime.config import HAConfig, MobileNodeEntry, SecurityAssociation
from daemons.runtime.log import EventFormatter
from daemons.runtime.secret import Secret
from daemons.store.records import RecordStore, read_rows
from daemons.store.state import dataclass_record, int_record
from daemons.wire import mip

ROOT = Path(__file__).resolve().parents[2]


def ints(_: str, record: Any) -> int:
    return int_record(record)


def traced(store: RecordStore) -> list[str]:
    """Every statement ``store`` executes from now on, with its bound values."""
    assert store.db is not None
    statements: list[str] = []
    store.db.set_trace_callback(statements.append)
    return statements


@pytest.fixture
def events(caplog: pytest.LogCaptureFixture) -> Callable[[], str]:
    caplog.set_level(logging.INFO)
    return lambda: "\n".join(EventFormatter().format(r) for r in caplog.records)


# ---- per-record semantics ------------------------------------------------------------------------


def test_put_overwrites_delete_removes_and_a_reload_sees_exactly_that(tmp_path: Path) -> None:
    store = RecordStore(tmp_path / "s.db")
    assert store.load_records({"a": ints, "b": ints}) == {"a": {}, "b": {}}
    store.put("a", "k1", 1)
    store.put("a", "k2", 2)
    store.put("a", "k1", 10)  # the same key: replaced, not added
    store.put("b", "k1", 5)  # another section: its own key space
    store.delete("a", "k2")
    store.delete("a", "never there")  # nothing to delete: no error
    store.close()
    again = RecordStore(tmp_path / "s.db")
    assert again.load_records({"a": ints, "b": ints}) == {"a": {"k1": 10}, "b": {"k1": 5}}
    assert again.dropped == 0


def test_a_batch_commits_once_and_an_exception_rolls_it_back(tmp_path: Path) -> None:
    store = RecordStore(tmp_path / "s.db")
    store.load_records({"a": ints})
    statements = traced(store)
    with store.batch():
        store.put("a", "x", 1)
        with store.batch():  # nested: commits with the outer one
            store.put("a", "y", 2)
        assert read_rows(store.path, "a") == {}  # another connection sees nothing yet
    assert [s.split()[0] for s in statements] == ["BEGIN", "INSERT", "INSERT", "COMMIT"]
    assert read_rows(store.path, "a") == {"x": 1, "y": 2}
    with pytest.raises(RuntimeError), store.batch():
        store.put("a", "x", 99)
        store.delete("a", "y")
        raise RuntimeError("the caller failed half-way")
    assert store.rows("a") == {"x": 1, "y": 2}


def test_the_synchronous_setting_is_an_option_and_checked(tmp_path: Path) -> None:
    full = RecordStore(tmp_path / "f.db", synchronous="FULL")
    full.load_records({})
    assert full.db is not None and full.db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert full.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    normal = RecordStore(tmp_path / "n.db")
    normal.load_records({})
    assert normal.db is not None and normal.db.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    with pytest.raises(ValueError, match="synchronous"):
        RecordStore(tmp_path / "o.db", synchronous="OFF")  # type: ignore[arg-type]


# ---- what cannot be read --------------------------------------------------------------------------


def test_unreadable_records_are_dropped_counted_logged_and_deleted(tmp_path: Path, events: Callable[[], str]) -> None:
    store = RecordStore(tmp_path / "s.db")
    store.load_records({"a": ints})
    store.put("a", "good", 1)
    store.put("a", "old-schema", {"value": "secret-ish 00ff"})
    store.put("a", "fraction", 1.5)
    assert store.db is not None
    store.db.execute("INSERT INTO records VALUES ('a', 'torn', '{\"v\": 1')")  # JSON that does not parse
    store.db.execute("INSERT INTO records VALUES ('a', 'deep', ?)", ("[" * 100_000,))
    store.put("other", "kept", "not loaded: not asked for")
    store.close()

    again = RecordStore(tmp_path / "s.db")
    assert again.load_records({"a": ints}) == {"a": {"good": 1}}
    assert again.dropped == 4
    text = events()
    for key in ("old-schema", "fraction", "torn", "deep"):
        assert f"event=state.record_dropped file=s.db section=a key={key} reason=" in text
    assert "secret-ish" not in text and "00ff" not in text  # a stored value is never repeated
    # Deleted: they warn once, not at every start; what was not asked for stays.
    assert again.rows("a") == {"good": 1} and again.rows("other") == {"kept": "not loaded: not asked for"}
    third = RecordStore(tmp_path / "s.db")
    assert third.load_records({"a": ints}) == {"a": {"good": 1}} and third.dropped == 0


def big_database(path: Path, n: int = 2000) -> None:
    store = RecordStore(path)
    store.load_records({})
    with store.batch():
        for i in range(n):
            store.put("a", f"{i:06d}", i)
    store.close()


@pytest.mark.parametrize("damage", ["not a database", "truncated", "page overwritten"])
def test_a_corrupt_database_is_moved_aside_and_the_daemon_starts_empty(tmp_path: Path, damage: str,
                                                                       events: Callable[[], str]) -> None:
    path = tmp_path / "bindings.db"
    if damage == "not a database":
        path.write_bytes(b"{\"bindings\": {}}" * 300)
    else:
        big_database(path)
        data = bytearray(path.read_bytes())
        if damage == "truncated":
            data = data[: len(data) // 2]
        else:
            page = 4096
            data[3 * page: 4 * page] = os.urandom(page)
        path.write_bytes(bytes(data))
    original = path.read_bytes()
    store = RecordStore(path)
    assert store.load_records({"a": ints}) == {"a": {}}
    assert store.dropped == 1
    (aside,) = tmp_path.glob("bindings.db.corrupt-*[0-9Z]")
    assert aside.read_bytes() == original  # kept for inspection
    assert "event=state.file_corrupt file=bindings.db moved_to=bindings.db.corrupt-" in events()
    store.put("a", "k", 1)  # a fresh database, working
    assert read_rows(path, "a") == {"k": 1}


def test_after_a_corrupt_database_an_old_json_file_is_not_brought_back(tmp_path: Path) -> None:
    big_database(tmp_path / "v.db")
    data = bytearray((tmp_path / "v.db").read_bytes())
    (tmp_path / "v.db").write_bytes(bytes(data[: len(data) // 2]))
    (tmp_path / "v.json").write_text(json.dumps({"a": {"old": 1}}))  # older than the database
    store = RecordStore.in_dir(tmp_path, "v")
    assert store.load_records({"a": ints}) == {"a": {}} and store.dropped == 1
    store.put("a", "k", 2)  # writable at once
    assert read_rows(tmp_path / "v.db", "a") == {"k": 2}


def test_a_second_corrupt_database_does_not_overwrite_the_first(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    for text in (b"first" * 1000, b"second" * 1000):
        path.write_bytes(text)
        for suffix in ("-wal", "-shm"):
            path.with_name(path.name + suffix).unlink(missing_ok=True)
        store = RecordStore(path)
        assert store.load_records({"a": ints}) == {"a": {}}
        store.close()
    kept = sorted(p.read_bytes()[:6] for p in tmp_path.glob("s.db.corrupt-*") if not p.name.endswith(("-wal", "-shm")))
    assert kept == [b"firstf", b"second"]


# ---- migration from the JSON documents ---------------------------------------------------------------


def test_a_json_state_file_is_imported_through_the_builders_once(tmp_path: Path, events: Callable[[], str]) -> None:
    now = time.time()
    good = Binding("mn1@home.example", "198.18.100.10", "198.18.0.14", 300, now + 100, 7, None)
    (tmp_path / "bindings.json").write_text(json.dumps({
        "bindings": {good.home_address: asdict(good), "198.18.100.11": {"nai": "old schema"}},
        "last_ident": {good.home_address: 7}, "ids": [["fa", "h1", 3], ["fa", "h2", 4]],
        "unasked": {"x": 1}}))
    builders = {"bindings": lambda _, r: dataclass_record(Binding, r), "last_ident": ints,
                "ids": lambda _, r: (r[0], r[1], int_record(r[2]))}
    store = RecordStore.in_dir(tmp_path, "bindings")
    loaded = store.load_records(builders, keys={"ids": lambda r: f"{r[0]} {r[1]}"})
    assert loaded == {"bindings": {good.home_address: good}, "last_ident": {good.home_address: 7},
                      "ids": {"fa h1": ("fa", "h1", 3), "fa h2": ("fa", "h2", 4)}}  # a list section: re-keyed
    assert store.dropped == 1
    text = events()
    assert "event=state.record_dropped file=bindings.json section=bindings key=198.18.100.11" in text
    assert "event=state.migrated file=bindings.json db=bindings.db moved_to=bindings.json.migrated records=4 " \
           "dropped=1" in text
    migrated = tmp_path / "bindings.json.migrated"
    assert not (tmp_path / "bindings.json").exists() and stat.S_IMODE(migrated.stat().st_mode) == 0o600
    assert store.rows("ids") == {"fa h1": ["fa", "h1", 3], "fa h2": ["fa", "h2", 4]}
    assert store.rows("unasked") == {}  # only what the daemon reads is imported
    store.close()
    again = RecordStore.in_dir(tmp_path, "bindings")
    assert again.load_records(builders) == loaded and again.dropped == 0


def test_an_import_cut_short_is_done_again_a_json_beside_a_database_is_not(tmp_path: Path,
                                                                           events: Callable[[], str]) -> None:
    (tmp_path / "v.json").write_text(json.dumps({"a": {"k": 1}}))
    (tmp_path / "v.db").write_bytes(b"")  # a crash after SQLite created the file, before the import's commit
    store = RecordStore.in_dir(tmp_path, "v")
    assert store.load_records({"a": ints}) == {"a": {"k": 1}}
    store.close()
    (tmp_path / "v.json").write_text(json.dumps({"a": {"k": 2, "j": 3}}))  # e.g. an older version ran meanwhile
    again = RecordStore.in_dir(tmp_path, "v")
    assert again.load_records({"a": ints}) == {"a": {"k": 1}}
    assert (tmp_path / "v.json").exists()  # left for the operator, with a warning
    assert "event=state.legacy_ignored file=v.json db=v.db" in events()


def test_a_corrupt_json_file_is_set_aside_and_the_import_is_empty(tmp_path: Path) -> None:
    (tmp_path / "v.json").write_text('{"a": {"k": 1')
    store = RecordStore.in_dir(tmp_path, "v")
    assert store.load_records({"a": ints}) == {"a": {}} and store.dropped == 1
    assert len(list(tmp_path.glob("v.json.corrupt-*"))) == 1 and not (tmp_path / "v.json.migrated").exists()
    store.put("a", "k", 5)
    assert RecordStore.in_dir(tmp_path, "v").load_records({"a": ints}) == {"a": {"k": 5}}


def test_a_put_before_the_import_is_refused(tmp_path: Path) -> None:
    (tmp_path / "v.json").write_text(json.dumps({"a": {"k": 1}}))
    with pytest.raises(RuntimeError, match="load_records"):
        RecordStore.in_dir(tmp_path, "v").put("a", "k", 2)


# ---- permissions ----------------------------------------------------------------------------------------


def test_the_database_and_its_wal_and_shm_are_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        store = RecordStore(tmp_path / "state" / "sessions.db")
        store.load_records({"a": ints})
        store.put("a", "k", 1)
        state = tmp_path / "state"
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        files = {p.name: stat.S_IMODE(p.stat().st_mode) for p in state.iterdir()}
        assert files == {"sessions.db": 0o600, "sessions.db-wal": 0o600, "sessions.db-shm": 0o600}
        # A database left readable (e.g. copied in by hand) is made private when opened.
        store.close()
        for p in state.iterdir():
            p.chmod(0o644)
        RecordStore(state / "sessions.db").load_records({"a": ints})
        assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in state.iterdir()} == files
    finally:
        os.umask(old)


# ---- kill -9: nothing acknowledged is lost ------------------------------------------------------------------

CHILD = """
import sys
from pathlib import Path
from daemons.store.records import RecordStore

store = RecordStore(Path(sys.argv[1]))
store.load_records({"s": lambda k, r: r})
k = 0
while True:
    if k % 5 == 4:  # a change of two records, one commit
        with store.batch():
            store.put("s", f"{k:08d}", {"k": k, "pad": "x" * 300})
            store.delete("s", f"{k - 1:08d}")
    else:
        store.put("s", f"{k:08d}", {"k": k, "pad": "x" * 300})
    print(f"acked {k}", flush=True)
    k += 1
"""


@pytest.mark.parametrize("round_", range(3))
def test_a_kill_9_loses_no_acknowledged_change(tmp_path: Path, round_: int) -> None:
    seed = random.randrange(1 << 30)
    kill_after = random.Random(seed).randint(1, 3000)
    path = tmp_path / "s.db"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE, text=True,
                             cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert child.stdout is not None
    acked: list[int] = []
    try:
        for line in child.stdout:
            acked.append(int(line.split()[1]))
            if len(acked) >= kill_after:
                os.kill(child.pid, signal.SIGKILL)
                break
        rest = child.stdout.read()  # what it acknowledged before it died
    finally:
        child.kill()
        child.wait(10)
    assert child.returncode == -signal.SIGKILL, f"seed {seed}: the child ended by itself"
    acked += [int(line.split()[1]) for line in rest.splitlines() if line.startswith("acked ")]
    assert len(acked) >= kill_after
    held = RecordStore(path).load_records({"s": lambda _, r: r["k"]})["s"]
    deleted = {k - 1 for k in acked if k % 5 == 4}
    in_flight = max(acked) + 1  # its change may or may not have committed: it was never acknowledged
    for k in acked:
        if k == in_flight - 1 and in_flight % 5 == 4:
            continue  # acknowledged, then (perhaps) deleted by the change in flight
        if k in deleted:
            assert f"{k:08d}" not in held, f"seed {seed}: acknowledged deletion of {k} lost"
        else:
            assert held.get(f"{k:08d}") == k, f"seed {seed}: acknowledged record {k} lost"


# ---- the work per change does not depend on N ------------------------------------------------------------


def filled(path: Path, n: int) -> RecordStore:
    store = RecordStore(path)
    store.load_records({})
    with store.batch():
        for i in range(n):
            store.put("a", f"k{i:06d}", {"i": i, "pad": "p" * 100})
    return store


def test_a_put_or_delete_executes_the_same_statements_at_n_10_and_n_10000(tmp_path: Path) -> None:
    work: dict[int, list[str]] = {}
    for n in (10, 10_000):
        store = filled(tmp_path / f"{n}.db", n)
        statements = traced(store)
        store.put("a", "k000005", {"i": -1, "pad": "q" * 100})  # an existing record changed
        store.put("a", "knew", {"i": -2})  # a new one
        store.delete("a", "k000007")
        with store.batch():
            store.put("a", "k000008", 1)
            store.delete("a", "knew")
        work[n] = list(statements)
        assert len(store.rows("a")) == n - 1  # the store does hold N (less the one deleted)
    assert work[10] == work[10_000] and len(work[10]) == 7  # the same statements, byte for byte


HA_ADDR = IPv4Address("198.18.100.1")
COA = IPv4Address("198.18.0.14")


class NoHomeLink:
    """The home link (proxy ARP) is not what this test is about."""

    async def intercept(self, hoa: str) -> None: ...
    async def release(self, hoa: str) -> None: ...
    async def reconcile(self, hoas: list[str]) -> None: ...


def test_a_registration_at_the_ha_writes_only_its_own_records_whatever_n(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The HA with N bindings restored: one registration writes its binding and its
    identification, nothing of the other N, the same statements at N = 10 and N = 10,000."""
    import daemons.agents.ha as ha_module

    now = 1_800_000_000.0
    monkeypatch.setattr(ha_module.time, "time", lambda: now)
    mn_ha = SecurityAssociation(0x1000, Secret(b"mn-ha-key-of-mn1"))
    hoa = IPv4Address("198.18.100.10")
    work: dict[int, list[str]] = {}
    for n in (10, 10_000):
        state_dir = tmp_path / str(n)
        others = RecordStore.in_dir(state_dir, "bindings")
        others.load_records({})
        with others.batch():
            for i in range(n):
                other = f"10.1.{100 + i // 100}.{100 + i % 100}"
                others.put("bindings", other, asdict(Binding(f"u{i:05d}@home.example", other, str(COA), 300,
                                                             now + 300, i, str(COA))))
                others.put("last_ident", other, i)
        others.close()
        ha = HomeAgent(HAConfig(node="ha", role="ha", state_dir=state_dir, control_socket=tmp_path / "ha.sock",
                                address=HA_ADDR, home_prefix=IPv4Network("198.18.100.0/24"),
                                mobile_nodes=[MobileNodeEntry("mn1@home.example", hoa, mn_ha.spi, mn_ha.key)]))
        ha.home_link = NoHomeLink()  # type: ignore[assignment]
        ha.restore()
        assert len(ha.bindings) == n
        statements = traced(ha.state)
        ident = mip.ntp_identification(now)
        rrq = mip.RegistrationRequest(hoa, HA_ADDR, COA, ident, 300, extensions=[mip.NAIExtension("mn1@home.example")])
        wire = asyncio.run(ha.process_request(mip.sign(rrq, mip.EXT_MN_HA_AUTH, mn_ha.spi, mn_ha.key).encode(),
                                              str(COA)))
        assert wire is not None and mip.decode_message(wire).code == mip.ReplyCode.ACCEPTED  # type: ignore[union-attr]
        assert len(ha.bindings) == n + 1
        work[n] = statements
    assert work[10] == work[10_000]
    writes = [s for s in work[10] if s.startswith(("INSERT", "DELETE"))]
    assert len(writes) == 2 and all(f"'{hoa}'" in s for s in writes)  # its binding and its identification


def test_a_users_paths_at_the_mavpn_write_that_users_record_only_whatever_n(tmp_path: Path) -> None:
    from daemons.vpn.mavpn import MavpnControl
    from tests.unit.test_restart_state import MN1, KernelLike, ha_path

    work: dict[int, list[str]] = {}
    for n in (10, 10_000):
        store = filled(tmp_path / f"vpn{n}.db", 0)
        control = MavpnControl(KernelLike(), store)
        with store.batch():
            for i in range(n):
                store.put("vpn", f"u{i:05d}@home.example", ["00"])  # others' records: never read here
        statements = traced(store)
        asyncio.run(control.apply(MN1, [ha_path(MN1)]))
        asyncio.run(control.remove_user(MN1))
        work[n] = list(statements)
        assert len(store.rows("vpn")) == n
    assert work[10] == work[10_000] and [s.split()[0] for s in work[10]] == ["INSERT", "DELETE"]
    assert all(f"'{MN1}'" in s for s in work[10])


def test_a_session_change_writes_one_record_and_the_counters_their_own(tmp_path: Path) -> None:
    from daemons.aaa.aaah import SpiAllocator

    store = SessionStore(tmp_path)
    store.load({"spi_next": ints})
    statements = traced(store.state)
    session = Session("mn1@home.example", "fa1;1", IPv4Address("198.18.0.14"), "fa1", HA_ADDR,
                      IPv4Address("198.18.100.10"), (), 1.0, local_key=Secret(b"k" * 32))
    store.put(session)
    store.put_extra("spi_next", str(HA_ADDR), 70000)
    store.drop("mn1@home.example")
    store.put(session)
    assert [s.split()[0] for s in statements] == ["INSERT", "INSERT", "DELETE", "INSERT"]
    again = SessionStore(tmp_path)
    assert again.load({"spi_next": ints}) == {"spi_next": {str(HA_ADDR): 70000}}
    assert again.get("mn1@home.example") == session
    spis = SpiAllocator()
    spis.allocate("a"), spis.allocate("b")
    assert spis.changed == {"a", "b"}  # what the AAAH writes with the next session: the counters that moved


def test_the_database_is_sqlite_in_wal_mode(tmp_path: Path) -> None:
    store = RecordStore(tmp_path / "s.db")
    store.load_records({})
    store.put("a", "k", 1)
    assert (tmp_path / "s.db-wal").exists()
    with sqlite3.connect(tmp_path / "s.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
