r"""Structured logs: one event per line, ``key=value`` pairs, the node always named.

    2026-11-27T07:05:01.123Z INFO node=ha event=rrq.accepted mn=mn1@home.example id=0x... coa=...

At INFO the lines of one registration read as its story. Never pass key material: values
are formatted with ``str()``, and ``daemons.runtime.secret.Secret`` prints as ``Secret(***)``.

Values often come off the wire (an RRQ's NAI, a Diameter peer's Origin-Host), so no value can
end a line or forge a field: control characters (CR, LF, ESC ..., also Unicode format and
line/paragraph separators) are escaped as ``\n``, ``\r``, ``\t``, ``\xHH`` or ``\uHHHH``, a
backslash as ``\\``; a value with white space, ``"`` or ``=`` is quoted (``"`` becomes ``'``).
Lines of other loggers (asyncio ...) carry their text as one such field, ``msg="..."``.
"""

from __future__ import annotations

import logging
import sys
import time
import unicodedata
from typing import Any

_NODE = "-"


class EventFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        fields = getattr(record, "fields", None)
        # Ours read "event=NAME"; another library's free text becomes one quoted field.
        message = escape(record.getMessage()) if fields is not None else "msg=" + _fmt(record.getMessage())
        text = f"{stamp}.{int(record.msecs):03d}Z {record.levelname} node={_NODE} {message}"
        if fields:
            text += " " + " ".join(f"{k}={_fmt(v)}" for k, v in fields.items() if v is not None)
        if record.exc_info:
            text += " error=" + _fmt(repr(record.exc_info[1]))
        return text


_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_UNSAFE = ("Cc", "Cf", "Zl", "Zp")  # control, format (bidi overrides ...), line and paragraph separators


def _escape_char(c: str) -> str:
    if c in _ESCAPES:
        return _ESCAPES[c]
    if unicodedata.category(c) not in _UNSAFE:
        return c
    n = ord(c)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"


def escape(text: str) -> str:
    """``text`` on one line: control characters and backslashes escaped (see the module doc)."""
    if text.isprintable() and "\\" not in text:
        return text  # the common case, fast (isprintable is False for every character we escape)
    return "".join(_escape_char(c) for c in text)


def _fmt(value: Any) -> str:
    text = escape(str(value))
    if not text or any(c.isspace() or c in '"=' for c in text):
        return '"' + text.replace('"', "'") + '"'
    return text


def setup(node: str, level: str = "INFO") -> None:
    global _NODE
    _NODE = node
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(EventFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


class EventLog:
    """``log.event("rrq.accepted", mn=..., id=...)`` writes one structured line."""

    def __init__(self, name: str) -> None:
        self.logger = logging.getLogger(name)

    def event(self, event: str, level: int = logging.INFO, **fields: Any) -> None:
        if self.logger.isEnabledFor(level):
            self.logger.log(level, "event=%s", event, extra={"fields": fields})

    def info(self, event: str, **fields: Any) -> None:
        self.event(event, logging.INFO, **fields)

    def debug(self, event: str, **fields: Any) -> None:
        self.event(event, logging.DEBUG, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self.event(event, logging.WARNING, **fields)

    def error(self, event: str, **fields: Any) -> None:
        self.event(event, logging.ERROR, **fields)
