"""Fire-and-forget tasks that are neither garbage-collected mid-flight nor silently lost."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

from daemons.runtime.log import EventLog

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


async def serve(start: Callable[[], Awaitable[None]], stop: Callable[[], Awaitable[None]]) -> None:
    """A service's whole life as a daemon's main task: started, then kept until the task is
    cancelled (the daemon is told to stop), then stopped."""
    await start()
    try:
        await asyncio.Event().wait()
    finally:
        await stop()


class KeyedLocks:
    """One lock per key (e.g. per user), kept only while someone holds or waits for it: a
    table of every key ever seen would grow with every made-up NAI a peer sends."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}  # key -> (lock, holders + waiters)

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            _, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)
