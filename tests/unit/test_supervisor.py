"""The lab supervisor's own ends, without processes: its event lines and its socket client."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from daemons.provision.demo import FIELD, LOG_LINE
from lab import supervisor


def test_event_lines_read_like_the_daemons(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger=supervisor.log.name):
        supervisor.event("process.killed", logging.WARNING, name="daemon:ha", pid=7, why="ignored SIGTERM",
                         netns=None)
        supervisor.event("supervisor.stopped")
    killed, stopped = (supervisor.formatter().format(r) for r in caplog.records)
    m = LOG_LINE.match(killed)
    assert m and m.group(2) == "WARNING" and m.group(3) == "supervisor"
    fields = {k: v.strip('"') for k, v in FIELD.findall(m.group(4))}
    assert fields == {"event": "process.killed", "name": "daemon:ha", "pid": "7", "why": "ignored SIGTERM"}
    assert stopped.endswith("node=supervisor event=supervisor.stopped")


def test_event_values_stay_on_one_line(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger=supervisor.log.name):
        supervisor.event("process.exited", why="out\nevent=forged\x1b")
    (line,) = (supervisor.formatter().format(r) for r in caplog.records)
    m = LOG_LINE.match(line)
    assert m and line.isprintable()
    assert {k: v.strip('"') for k, v in FIELD.findall(m.group(4))} == {"event": "process.exited",
                                                                        "why": "out\\nevent=forged\\x1b"}


def test_request_gets_the_supervisors_answer(tmp_path: Path) -> None:
    async def go() -> tuple[dict, dict]:
        sup = supervisor.Supervisor(tmp_path)
        server = await asyncio.start_unix_server(sup.serve_client, path=str(tmp_path / "supervisor.sock"))
        async with server:
            status = await asyncio.to_thread(supervisor.request, tmp_path, {"op": "status"})
            bad = await asyncio.to_thread(supervisor.request, tmp_path, {"op": "dance"})
        return status, bad

    status, bad = asyncio.run(go())
    assert status["ok"] and status["processes"] == []
    assert bad == {"ok": False, "error": "unknown op 'dance'"}
    (tmp_path / "supervisor.sock").unlink(missing_ok=True)  # gone when the server closed (Python >= 3.13)
    with pytest.raises(supervisor.SupervisorUnavailable, match=r"supervisor not reachable at .*supervisor\.sock"):
        supervisor.request(tmp_path, {"op": "status"}, timeout=1)
