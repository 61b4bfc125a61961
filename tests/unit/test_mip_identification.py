"""Identification (RFC 5944 5.7): NTP timestamps, replay window, code-133 resync."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from daemons.wire.mip import (
    clock_offset,
    identification_acceptable,
    identification_time,
    ntp_identification,
    reply_identification,
    reply_matches_request,
)

NOW = 1_795_761_042.5  # 2026-11-27 06:30:42.5 UTC


def test_ntp_layout():
    ident = ntp_identification(NOW)
    assert ident >> 32 == int(NOW) + 2_208_988_800
    assert ident & 0xFFFFFFFF == 0x80000000
    assert ntp_identification(0.0) == 2_208_988_800 << 32


def test_ntp_era_rollover_2036():
    t = 2_085_978_496.25  # 2036-02-07 06:28:16.25 UTC, first second of NTP era 1
    ident = ntp_identification(t)
    assert ident >> 32 == 0
    assert identification_time(ident, t) == t
    assert identification_acceptable(ntp_identification(t - 1), ident, t)


@given(st.floats(min_value=1e9, max_value=4e9))
def test_time_round_trip(now):
    assert abs(identification_time(ntp_identification(now), now) - now) < 1e-6


def test_replay_window_and_monotonicity():
    new = ntp_identification(NOW)
    assert identification_acceptable(None, new, NOW)
    assert identification_acceptable(None, ntp_identification(NOW + 6.9), NOW)
    assert not identification_acceptable(None, ntp_identification(NOW + 7.5), NOW)
    assert not identification_acceptable(None, ntp_identification(NOW - 8), NOW)
    assert identification_acceptable(None, ntp_identification(NOW - 20), NOW, window_s=30)
    assert not identification_acceptable(new, new, NOW)  # replay
    assert not identification_acceptable(new, ntp_identification(NOW - 1), NOW)
    assert identification_acceptable(new, new + 1, NOW)


def test_reply_identification():
    req = ntp_identification(NOW - 1000)  # MN clock far behind
    assert reply_identification(req, NOW) == req
    rej = reply_identification(req, NOW, accepted=False)
    assert rej & 0xFFFFFFFF == req & 0xFFFFFFFF
    assert rej >> 32 == int(NOW) + 2_208_988_800
    assert reply_matches_request(req, rej)
    assert not reply_matches_request(req, rej ^ 1)
    # the MN learns how far its clock is off and can build an acceptable request
    offset = clock_offset(rej, NOW - 1000)
    assert offset == 1000
    fixed = ntp_identification(NOW - 1000 + offset)
    assert identification_acceptable(None, fixed, NOW)
