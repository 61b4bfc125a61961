"""EventLog lines: one event per line whatever the values hold (values often come off the wire)."""

from __future__ import annotations

import logging

import pytest

from daemons.provision.demo import FIELD, LOG_LINE
from daemons.runtime.log import EventFormatter, EventLog

FORGED = "mn1@home.example\n2026-01-01T00:00:00.000Z INFO node=ha event=rrq.accepted mn=victim@home.example"


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    fmt = EventFormatter()
    return "\n".join(fmt.format(r) for r in caplog.records).split("\n")


def fields(line: str) -> dict[str, str]:
    m = LOG_LINE.match(line)
    assert m is not None, line
    return {k: v.strip('"') for k, v in FIELD.findall(m.group(4))}


def test_a_nai_with_a_line_break_cannot_forge_a_log_line(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="test.log"):
        EventLog("test.log").info("rrq.received", mn=FORGED, id="0x1")
    (line,) = lines(caplog)
    got = fields(line)
    assert got["event"] == "rrq.received" and got["id"] == "0x1"
    assert got["mn"] == FORGED.replace("\n", "\\n")  # readable, and still one field
    assert "\r" not in line and "\n" not in line


@pytest.mark.parametrize(("value", "shown"), [
    ("a\r\nevent=x", "a\\r\\nevent=x"),
    ("\x1b[2J", "\\x1b[2J"),  # a terminal escape
    ("nul\x00", "nul\\x00"),
    ("tab\there", "tab\\there"),
    ("del\x7f", "del\\x7f"),
    ("c1\x85", "c1\\x85"),  # NEL
    ("line\u2028sep", "line\\u2028sep"),
    ("bidi\u202eevil", "bidi\\u202eevil"),
    ("back\\slash", "back\\\\slash"),  # so that an escape in the output is always ours
])
def test_control_characters_are_escaped(caplog: pytest.LogCaptureFixture, value: str, shown: str) -> None:
    with caplog.at_level(logging.INFO, logger="test.log"):
        EventLog("test.log").info("x", v=value, plain="mn1@home.example", accented="café")
    (line,) = lines(caplog)
    assert fields(line) == {"event": "x", "v": shown, "plain": "mn1@home.example", "accented": "café"}
    assert line.isprintable()


def test_a_value_with_white_space_or_equals_stays_one_field(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="test.log"):
        EventLog("test.log").info("x", a="one two", b="k=v", c="nb\u00a0x", d='say "hi"')
    got = fields(lines(caplog)[0])
    assert got == {"event": "x", "a": "one two", "b": "k=v", "c": "nb\u00a0x", "d": "say 'hi'"}


def test_foreign_log_messages_and_exceptions_stay_on_one_line(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="test.other"):
        logging.getLogger("test.other").info("peer said %s", "hi\nevent=forged")
        try:
            raise ValueError("bad\nline")
        except ValueError:
            logging.getLogger("test.other").exception("failed")
    first, second = lines(caplog)
    assert fields(first) == {"msg": "peer said hi\\nevent=forged"}
    assert fields(second)["msg"] == "failed" and fields(second)["error"].startswith("ValueError(")
