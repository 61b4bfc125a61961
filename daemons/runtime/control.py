"""The control socket of a daemon: newline-delimited JSON over a unix stream socket.

Request ``{"cmd": "bindings"}``; answer ``{"ok": true, "data": ...}`` or
``{"ok": false, "error": "..."}``. `mipvpn show ...` and the tests are its clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

Handler = Callable[[dict[str, Any]], Awaitable[Any] | Any]


class ControlServer:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.handlers: dict[str, Handler] = {}
        self.server: asyncio.AbstractServer | None = None

    def register(self, cmd: str, handler: Handler) -> None:
        self.handlers[cmd] = handler

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self.server = await asyncio.start_unix_server(self._serve, path=str(self.path))

    async def stop(self) -> None:
        if self.server:
            self.server.close()
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                writer.write(json.dumps(await self._answer(line), default=str).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _answer(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
            handler = self.handlers[request["cmd"]]
        except (ValueError, KeyError, TypeError):
            return {"ok": False, "error": f"unknown or malformed request; commands: {sorted(self.handlers)}"}
        try:
            result = handler(request)
            if asyncio.iscoroutine(result):
                result = await result
        except Exception as exc:  # a failing command must not take the daemon down
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        return {"ok": True, "data": result}


class ControlUnavailable(RuntimeError):
    pass


def exchange(path: Path | str, message: dict[str, Any], timeout: float = 10.0) -> Any:
    """One newline-delimited JSON request on a unix socket and its answer (the daemons' and
    the lab supervisor's control sockets speak this). Raises OSError, or ValueError for a
    garbled answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(json.dumps(message).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            data += chunk
    return json.loads(data)


def call(path: Path | str, cmd: str, timeout: float = 10.0, **args: Any) -> Any:
    """Synchronous client of a daemon: one command, its data (raises ControlUnavailable)."""
    try:
        answer = exchange(path, {"cmd": cmd, **args}, timeout)
    except OSError as exc:
        raise ControlUnavailable(f"daemon control socket {path} not reachable: {exc.strerror or exc}") from None
    if not answer.get("ok"):
        raise ControlUnavailable(answer.get("error", "unknown error"))
    return answer["data"]
