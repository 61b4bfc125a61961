"""A daemon's durable state, one record per change: SQLite (stdlib ``sqlite3``) in WAL mode.

One row per (section, key) — a binding, a visitor, a session, one user's VPN cache, one
small counter — holding the record as JSON. A change writes the rows it changed
(:meth:`RecordStore.put`, :meth:`RecordStore.delete`): its cost does not depend on how many
records the daemon holds (an upsert in a B-tree), where the JSON document of
``daemons.store.state`` was rewritten whole, O(N) per change and O(N²) to fill.

Durability: every put/delete is committed before it returns, so the caller, which answers
(RRP, BA, AMA, HAA) only after its state call returned, never answers for a change that is
not on disk yet. This is the simplest correct design: no queue, no group-commit task, no
thread. In WAL mode with ``synchronous=NORMAL`` (the default) a commit is one ``write()`` of
the changed pages to the ``-wal`` file, no fsync: it survives a kill -9 of the daemon (the
data is in the kernel's page cache) but not necessarily a power loss or kernel crash, which
needs ``synchronous="FULL"`` (an fsync of the WAL per commit; a constructor option). Several
changes that belong together go in one commit with :meth:`RecordStore.batch`. The event loop
blocks for one small commit per change; every ~1000 pages written SQLite's automatic
checkpoint copies the WAL back into the database (with fsyncs) inside the commit that crosses
that mark, the one longer pause (docs/reliability.md).

Loading (:meth:`RecordStore.load_records`) has the builder API of
:meth:`daemons.store.state.StateFile.load_records`: per section the caller's
``build(key, record)``; a record it refuses (``RECORD_ERRORS``, or JSON that does not parse)
is dropped, counted (:attr:`RecordStore.dropped`), logged as ``state.record_dropped`` and
deleted, so it warns once. A database that cannot be opened or read (not a database, a
malformed page: ``sqlite3.DatabaseError``) is moved aside with its ``-wal``
(``<name>.corrupt-<UTC time>``), logged as ``state.file_corrupt``, and the daemon starts empty.

Migration: if the daemon's old JSON file exists and the database has no table yet, the first
:meth:`RecordStore.load_records` imports the JSON's records (through the same builders: what
they refuse is dropped and counted as before) in the one transaction that creates the table,
then renames the JSON to ``<name>.migrated`` (``state.migrated``). A crash before that commit
leaves no table, so the next start imports again.

Permissions: the state directory is 0700 and the database, ``-wal`` and ``-shm`` are 0600 (they
hold key material: VPN caches, sessions): the file is created 0600 before SQLite opens it, and
SQLite gives its ``-wal``/``-shm`` the database file's mode.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from daemons.runtime.log import EventLog
from daemons.store.state import RECORD_ERRORS, Build, StateFile, reason

log = EventLog("mipvpn.state")

Synchronous = Literal["NORMAL", "FULL"]
SUFFIXES = ("-wal", "-shm")
_SCHEMA = ("CREATE TABLE records (section TEXT NOT NULL, key TEXT NOT NULL, record TEXT NOT NULL, "
           "PRIMARY KEY (section, key)) WITHOUT ROWID")
_PUT = "INSERT INTO records (section, key, record) VALUES (?, ?, ?) " \
       "ON CONFLICT (section, key) DO UPDATE SET record = excluded.record"
_DELETE = "DELETE FROM records WHERE section = ? AND key = ?"


def encode(record: Any) -> str:
    """A record as stored (compact JSON; anything else JSON cannot say as its ``str``, as the
    JSON documents had it)."""
    return json.dumps(record, separators=(",", ":"), default=str)


class RecordStore:
    """One daemon's records in ``path`` (a SQLite database); ``legacy``: the JSON document it
    replaces, imported once (see the module). Opened at the first use, from one thread (the
    daemon's event loop)."""

    def __init__(self, path: Path, *, legacy: Path | None = None, synchronous: Synchronous = "NORMAL") -> None:
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous: {synchronous!r} is not NORMAL or FULL")
        self.path = path
        self.legacy = legacy
        self.synchronous = synchronous
        self.dropped = 0  # records (and whole files) dropped by the loads so far
        self.db: sqlite3.Connection | None = None  # open once used (tests may trace it)
        self._migrate = False  # a legacy file waits for load_records
        self._depth = 0  # nesting of batch()

    @classmethod
    def in_dir(cls, state_dir: Path, name: str, synchronous: Synchronous = "NORMAL") -> RecordStore:
        """``<state_dir>/<name>.db``, taking over ``<name>.json`` if that is still there."""
        return cls(state_dir / f"{name}.db", legacy=state_dir / f"{name}.json", synchronous=synchronous)

    # ---- opening ---------------------------------------------------------------------------
    def _open(self, migrate: bool = True) -> sqlite3.Connection:
        """The connection (opened on first use); ``migrate``: a legacy file may be imported
        (not after a corrupt database was set aside: the daemon starts empty then)."""
        if self.db is not None:
            return self.db
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(OSError):
            self.path.parent.chmod(0o700)
        try:
            self.db = self._connect(migrate)
        except sqlite3.DatabaseError as exc:
            self._set_aside(reason(exc))
            self.db = self._connect(migrate=False)
        return self.db

    def _connect(self, migrate: bool) -> sqlite3.Connection:
        # Created 0600 before SQLite sees it: its -wal and -shm get the same mode.
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        for name in (self.path, *(self._sibling(s) for s in SUFFIXES)):
            with contextlib.suppress(FileNotFoundError):
                name.chmod(0o600)
        db = sqlite3.connect(self.path, isolation_level=None)  # autocommit: each put is its own transaction
        try:
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.DatabaseError(f"journal mode {mode}, not wal")
            db.execute(f"PRAGMA synchronous={self.synchronous}")
            has_table = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'records'").fetchone()
            if has_table is None:
                if migrate and self.legacy is not None and self.legacy.exists():
                    self._migrate = True  # the table comes with the import, in one transaction
                else:
                    db.execute(_SCHEMA)
            elif self.legacy is not None and self.legacy.exists():
                log.warning("state.legacy_ignored", file=self.legacy.name, db=self.path.name,
                            reason="the database exists; the JSON file is not imported")
        except BaseException:
            db.close()
            raise
        return db

    def _sibling(self, suffix: str) -> Path:
        return self.path.with_name(self.path.name + suffix)

    def _set_aside(self, why: str) -> None:
        if self.db is not None:
            with contextlib.suppress(sqlite3.Error):
                self.db.close()
            self.db = None
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 1
        while aside.exists():
            aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
            n += 1
        os.replace(self.path, aside)
        for suffix in SUFFIXES:  # the WAL goes with it (it belongs to that file, not to a new one)
            with contextlib.suppress(FileNotFoundError):
                os.replace(self._sibling(suffix), aside.with_name(aside.name + suffix))
        self.dropped += 1
        log.warning("state.file_corrupt", file=self.path.name, moved_to=aside.name, reason=why)

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None

    # ---- loading ---------------------------------------------------------------------------
    def load_records(self, builders: Mapping[str, Build],
                     keys: Mapping[str, Callable[[Any], str]] | None = None) -> dict[str, dict[str, Any]]:
        """Per section named in ``builders``: its records by key, each built with
        ``build(key, record)`` (records that cannot be built dropped, counted, logged and
        deleted). ``keys``: for a migration only, the key a built record of a section is
        stored under (a JSON list section's keys were its positions)."""
        try:
            db = self._open()
            if self._migrate:
                return self._import(builders, keys or {})
            db.execute("BEGIN")  # one snapshot for every section
            try:
                check = db.execute("PRAGMA quick_check").fetchone()[0]
                if check != "ok":
                    raise sqlite3.DatabaseError(f"quick_check: {str(check)[:120]}")
                rows = {section: db.execute("SELECT key, record FROM records WHERE section = ?",
                                            (section,)).fetchall() for section in builders}
            finally:
                db.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            self._set_aside(reason(exc))
            self._open(migrate=False)
            return {section: {} for section in builders}
        out: dict[str, dict[str, Any]] = {}
        bad: list[tuple[str, str]] = []
        for section, build in builders.items():
            records: dict[str, Any] = {}
            for key, text in rows[section]:
                try:
                    records[key] = build(key, json.loads(text))
                except (*RECORD_ERRORS, RecursionError) as exc:
                    self._drop(section, key, reason(exc))
                    bad.append((section, key))
            out[section] = records
        if bad:  # the database says what we hold: a bad record warns once
            with self.batch():
                for section, key in bad:
                    self.delete(section, key)
        return out

    def _import(self, builders: Mapping[str, Build],
                keys: Mapping[str, Callable[[Any], str]]) -> dict[str, dict[str, Any]]:
        """The legacy JSON document into the new database (see the module)."""
        assert self.legacy is not None and self.db is not None
        legacy = StateFile(self.legacy)
        document = legacy.load()  # a corrupt one is set aside there (state.file_corrupt)
        out: dict[str, dict[str, Any]] = {}
        with self.batch():
            self.db.execute(_SCHEMA)
            for section, build in builders.items():
                records: dict[str, Any] = {}
                for key, raw in legacy.items(document, section):
                    try:
                        built = build(key, raw)
                    except RECORD_ERRORS as exc:
                        legacy.drop(section, key, reason(exc))
                        continue
                    if section in keys:
                        key = keys[section](built)
                    records[key] = built
                    self.db.execute(_PUT, (section, key, encode(raw)))
                out[section] = records
        self._migrate = False
        self.dropped += legacy.dropped
        if self.legacy.exists():
            migrated = self.legacy.with_name(self.legacy.name + ".migrated")
            os.replace(self.legacy, migrated)
            with contextlib.suppress(OSError):
                migrated.chmod(0o600)  # it may hold keys, as the database does
            log.info("state.migrated", file=self.legacy.name, db=self.path.name, moved_to=migrated.name,
                     records=sum(len(r) for r in out.values()), dropped=legacy.dropped)
        return out

    def _drop(self, section: str, key: str, why: str) -> None:
        self.dropped += 1
        log.warning("state.record_dropped", file=self.path.name, section=section, key=key[:80], reason=why)

    # ---- changes ---------------------------------------------------------------------------
    def _writable(self) -> sqlite3.Connection:
        db = self._open()
        if self._migrate:
            raise RuntimeError(f"{self.path.name}: load_records() first ({self.legacy} waits to be imported)")
        return db

    def put(self, section: str, key: str, record: Any) -> None:
        """``record`` (anything JSON can say) as the record ``key`` of ``section``, committed
        when this returns (or with the enclosing :meth:`batch`)."""
        self._writable().execute(_PUT, (section, key, encode(record)))

    def delete(self, section: str, key: str) -> None:
        """The record ``key`` of ``section`` gone (none there: nothing happens), committed as :meth:`put`."""
        self._writable().execute(_DELETE, (section, key))

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """The puts and deletes inside commit together, once, at the end (nested: with the
        outermost); an exception rolls them back."""
        db = self._open()
        if self._depth == 0:
            db.execute("BEGIN")
        self._depth += 1
        try:
            yield
        except BaseException:
            self._depth -= 1
            if self._depth == 0:
                db.execute("ROLLBACK")
            raise
        self._depth -= 1
        if self._depth == 0:
            db.execute("COMMIT")

    # ---- inspection ------------------------------------------------------------------------
    def rows(self, section: str) -> dict[str, Any]:
        """The stored records of ``section`` as JSON values, unbuilt (for ``show`` and tests)."""
        db = self._open()
        return {key: json.loads(text) for key, text in
                db.execute("SELECT key, record FROM records WHERE section = ? ORDER BY key", (section,))}


def read_rows(path: Path, section: str) -> dict[str, Any]:
    """The records of ``section`` in the database at ``path``, read-only (another process may
    be writing it: WAL readers do not block it); {} if there is no such file."""
    if not path.exists():
        return {}
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return {key: json.loads(text) for key, text in
                db.execute("SELECT key, record FROM records WHERE section = ? ORDER BY key", (section,))}
    finally:
        db.close()


__all__ = ["RecordStore", "Synchronous", "encode", "read_rows"]
