"""What an agent does with a Mobile IP datagram it receives on UDP 434 (FA, CN-GW): decode it,
hand it to the handler of its message type, and count and log what cannot be handled in one
way — ``malformed`` in the agent's counters and one of the log lines ``message.malformed``,
``message.unknown_extension`` or ``message.unexpected`` (with ``src``)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from inspect import isawaitable
from typing import Any

from daemons.runtime.log import EventLog
from daemons.runtime.tasks import background
from daemons.wire import mip

# handler(message, raw bytes, (address, port)); a coroutine it returns runs in the background.
Handler = Callable[[Any, bytes, tuple[str, int]], Awaitable[None] | None]


def dispatch(data: bytes, addr: tuple[str, int], handlers: Mapping[type[mip.Message], Handler],
             counters: dict[str, int], log: EventLog,
             poorly_formed: Callable[[Any, tuple[str, int]], None] | None = None) -> None:
    """Decode ``data`` (from ``addr``) and pass it to the handler of its type. A message with an
    unknown non-skippable extension (RFC 5944 §1.9) is refused: ``poorly_formed(partial,
    addr)`` gets what was decoded before that extension (None is not passed on), to answer it
    with the "poorly formed" code of the message."""
    try:
        msg = mip.decode_message(data)
    except mip.UnknownExtensionError as exc:
        counters["malformed"] += 1
        log.warning("message.unknown_extension", src=addr[0], reason=exc)
        if poorly_formed is not None and exc.partial is not None:
            poorly_formed(exc.partial, addr)
        return
    except mip.DecodeError as exc:
        counters["malformed"] += 1
        log.warning("message.malformed", src=addr[0], reason=exc)
        return
    handler = next((h for cls, h in handlers.items() if isinstance(msg, cls)), None)
    if handler is None:
        counters["malformed"] += 1
        log.warning("message.unexpected", src=addr[0], type=type(msg).__name__)
        return
    result = handler(msg, data, addr)
    if isawaitable(result):
        background(result)  # type: ignore[arg-type]
