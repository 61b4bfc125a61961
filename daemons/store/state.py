"""Persisted daemon state: the record builders, and the reader of the old JSON state files.

A daemon restarted by the supervisor (or systemd) carries on with its bindings, visitors
and sessions. They live in ``daemons.store.records`` (one SQLite row per record, written per
change); this module holds what that store shares with the JSON documents it replaced: the
record builders (:func:`dataclass_record`, :func:`ipv4_fields`, ...), the errors a builder
may raise, and :class:`StateFile`, which reads such a document once, to import it.

Loading is record by record, and nothing in a file stops a start (docs/reliability.md):

- a document is sections (``"bindings"``, ``"vpn"``, ...), each a mapping of key -> record (or
  a list of records); :meth:`StateFile.load_records` builds every record with the caller's
  constructor (``build(key, record)``);
- a record the constructor refuses (``TypeError``/``KeyError``/``ValueError``/
  ``AttributeError``: a changed schema, a corrupt entry; ``VpnInfoError`` is a ``ValueError``)
  is dropped, counted (:attr:`StateFile.dropped`) and logged as ``state.record_dropped`` with
  the file, the section, the key and the reason; the other records load;
- a file that is not a JSON object at all is moved aside (``<name>.corrupt-<UTC time>``, kept
  for inspection), logged as ``state.file_corrupt``, and the daemon starts empty.

The loader knows no record type: ``daemons.store.records`` loads with the same builders.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import math
import os
import re
import time
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from daemons.runtime.log import EventLog

log = EventLog("mipvpn.state")

#: what a record's constructor may raise for a record it cannot read (a schema that changed,
#: a corrupt entry); VpnInfoError and DecodeError are ValueErrors
RECORD_ERRORS: tuple[type[Exception], ...] = (TypeError, KeyError, ValueError, AttributeError)

Build = Callable[[str, Any], Any]
T = TypeVar("T")
_SCALARS = (str, int, float, bool, type(None))

_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_NAME = re.compile(r"[A-Za-z_]{1,40}")


def reason(exc: BaseException) -> str:
    """Why a record was dropped, safe for a log line: the exception type and message, with every
    quoted literal withheld except field names (letters and ``_`` only: a stored value, which
    may be key material in hex, is never repeated)."""

    def keep(m: re.Match[str]) -> str:
        return m.group(0) if _NAME.fullmatch(m.group(0)[1:-1]) else "'…'"

    text = _QUOTED.sub(keep, str(exc))[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def dataclass_record(cls: type[T], record: Any) -> T:
    """``cls(**record)`` for a dataclass record, every field whose annotation is a scalar (``str``,
    ``int``, ``float``, ``bool``, ``None`` or a union of them) checked against it (an ``int``
    serves for a ``float``): a record of another schema raises ``TypeError`` here, not later
    in the daemon that compares its ``expires`` with the clock."""
    if not isinstance(record, dict):
        raise TypeError(f"record is a JSON {type(record).__name__}, not an object")
    obj = cls(**record)
    hints = typing.get_type_hints(cls)
    fixed: dict[str, Any] = {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        hint = hints[field.name]
        allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        if not all(a in _SCALARS for a in allowed):
            continue  # not a scalar field: the class checks it, if anyone does
        value = getattr(obj, field.name)
        if type(value) is float and not math.isfinite(value):  # JSON's Infinity/NaN: no lifetime ends at inf
            raise ValueError(f"field '{field.name}' is not a finite number")
        if type(value) in allowed:
            continue
        if float in allowed and type(value) is int:
            fixed[field.name] = float(value)
            continue
        raise TypeError(f"field '{field.name}' is a {type(value).__name__}, not "
                        f"{' or '.join(getattr(a, '__name__', str(a)) for a in allowed)}")
    return dataclasses.replace(obj, **fixed) if fixed else obj  # type: ignore[type-var]


def ipv4_fields(record: T, *names: str) -> T:
    """``record`` once each named field (a ``str``, or None) is a dotted-quad IPv4 address: these
    values go to the kernel (routes, proxy ARP) and on the wire, where anything else fails
    later, outside the loader (``ipaddress.AddressValueError`` is a ``ValueError``)."""
    for name in names:
        value = getattr(record, name)
        if value is not None:
            ipaddress.IPv4Address(value)
    return record


def int_record(record: Any) -> int:
    """A record that is one integer (a JSON number without fraction, not ``true``/``false``)."""
    if type(record) is not int:
        raise TypeError(f"record is a JSON {type(record).__name__}, not an integer")
    return record


def float_record(record: Any) -> float:
    """A record that is one number (e.g. a wall-clock time)."""
    if type(record) not in (int, float):
        raise TypeError(f"record is a JSON {type(record).__name__}, not a number")
    if not math.isfinite(record):
        raise ValueError("record is not a finite number")
    return float(record)


class StateFile:
    """One JSON state document of the daemons before per-record storage (read only: the
    :class:`daemons.store.records.RecordStore` that replaces it imports it once)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.dropped = 0  # records (and whole files) dropped by the loads so far

    def load(self) -> dict[str, Any]:
        """The whole document; {} if there is none. One that is not a JSON object (a torn or
        corrupt file) is moved aside for inspection and the daemon starts empty."""
        try:
            text = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as exc:  # incl. UnicodeDecodeError; nesting too deep to parse
            self._set_aside(reason(exc))
            return {}
        if not isinstance(data, dict):
            self._set_aside(f"a JSON {type(data).__name__}, not an object")
            return {}
        return data

    def load_records(self, builders: Mapping[str, Build]) -> dict[str, dict[str, Any]]:
        """Per section named in ``builders``: its records, each built with ``build(key, record)``
        (records that cannot be built dropped, counted and logged)."""
        document = self.load()
        return {section: self.records(document, section, build) for section, build in builders.items()}

    def records(self, document: Mapping[str, Any], section: str, build: Build) -> dict[str, Any]:
        """The records of one section of ``document`` (as :meth:`load` returned it), by key (a
        list section's keys are the positions, ``"0"``, ``"1"``, ...)."""
        out: dict[str, Any] = {}
        for key, record in self.items(document, section):
            try:
                out[key] = build(key, record)
            except RECORD_ERRORS as exc:
                self.drop(section, key, reason(exc))
        return out

    def items(self, document: Mapping[str, Any], section: str) -> list[tuple[str, Any]]:
        """The (key, raw record) pairs of one section, unbuilt; a section that is neither an
        object nor a list is dropped (counted and logged) and has none."""
        raw = document.get(section)
        if raw is None:
            return []
        if isinstance(raw, dict):
            return [(str(k), v) for k, v in raw.items()]
        if isinstance(raw, list):
            return [(str(i), v) for i, v in enumerate(raw)]
        self.drop(section, None, f"section is a JSON {type(raw).__name__}")
        return []

    def drop(self, section: str, key: str | None, why: str) -> None:
        """Count and log one record (or section) that cannot be read."""
        self.dropped += 1
        log.warning("state.record_dropped", file=self.path.name, section=section,
                    key=key[:80] if key is not None else None, reason=why)

    def _set_aside(self, why: str) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 1
        while aside.exists():
            aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
            n += 1
        os.replace(self.path, aside)
        self.dropped += 1
        log.warning("state.file_corrupt", file=self.path.name, moved_to=aside.name, reason=why)
