"""Fire-and-forget tasks that are neither garbage-collected mid-flight nor silently lost."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from daemons.log import EventLog

log = EventLog("mipvpn.tasks")
_running: set[asyncio.Task[Any]] = set()


def background(coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
    task = asyncio.ensure_future(coro)
    _running.add(task)
    task.add_done_callback(_finished)
    return task


def _finished(task: asyncio.Task[Any]) -> None:
    _running.discard(task)
    if not task.cancelled() and task.exception() is not None:
        exc = task.exception()
        log.error("task.failed", task=task.get_coro().__qualname__, error=f"{type(exc).__name__}: {exc}")
