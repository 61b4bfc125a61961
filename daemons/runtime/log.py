"""Structured logs: one event per line, ``key=value`` pairs, the node always named.

    2026-11-27T07:05:01.123Z INFO node=ha event=rrq.accepted mn=mn1@home.example id=0x... coa=...

At INFO the lines of one registration read as its story. Never pass key material: values
are formatted with ``str()``, and ``daemons.runtime.secret.Secret`` prints as ``Secret(***)``.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

_NODE = "-"


class EventFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        fields = getattr(record, "fields", None)
        text = f"{stamp}.{int(record.msecs):03d}Z {record.levelname} node={_NODE} {record.getMessage()}"
        if fields:
            text += " " + " ".join(f"{k}={_fmt(v)}" for k, v in fields.items() if v is not None)
        if record.exc_info:
            text += " error=" + _fmt(repr(record.exc_info[1]))
        return text


def _fmt(value: Any) -> str:
    text = str(value)
    if not text or any(c in text for c in ' "='):
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
