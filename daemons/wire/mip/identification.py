"""Identification field helpers: timestamp-based replay protection (RFC 5944 section 5.7).

The 64-bit Identification is an NTP timestamp: seconds since 1900-01-01 in the high 32 bits,
the binary fraction of a second in the low 32 bits.  NTP era rollover (2036) is handled by
interpreting seconds in the era closest to the local clock.
"""

from __future__ import annotations

NTP_UNIX_OFFSET = 2_208_988_800  # seconds from 1900-01-01 to 1970-01-01
_U32 = 1 << 32
_U64_MASK = (1 << 64) - 1

__all__ = [
    "NTP_UNIX_OFFSET",
    "clock_offset",
    "identification_acceptable",
    "identification_expired",
    "identification_time",
    "ntp_identification",
    "reply_identification",
    "reply_matches_request",
]


def ntp_identification(now: float) -> int:
    """64-bit NTP timestamp for the Unix time ``now`` (e.g. ``time.time()``)."""
    total = now + NTP_UNIX_OFFSET
    secs = int(total // 1)
    frac = int((total - secs) * _U32)
    return ((secs % _U32) << 32 | min(frac, _U32 - 1)) & _U64_MASK


def identification_time(ident: int, now: float) -> float:
    """Unix time encoded in ``ident``, choosing the NTP era closest to ``now``."""
    secs = (ident >> 32) & 0xFFFFFFFF
    frac = (ident & 0xFFFFFFFF) / _U32
    base = now + NTP_UNIX_OFFSET
    era = round((base - secs) / _U32)
    return era * _U32 + secs + frac - NTP_UNIX_OFFSET


def _ticks(ident: int, now: float) -> int:
    """Identification as an exact count of 2**-32 s since 1900 of era 0, era resolved."""
    secs = (ident >> 32) & 0xFFFFFFFF
    era = round((now + NTP_UNIX_OFFSET - secs) / _U32)
    return (era << 64) + (ident & _U64_MASK)


def identification_acceptable(
    last: int | None, new: int, now: float, window_s: float = 7.0
) -> bool:
    """Replay check done by a home agent on a Registration Request's Identification.

    Acceptable when its timestamp lies within ``window_s`` seconds of ``now`` and it is
    strictly later than the last accepted Identification of this mobile node (if any).
    Otherwise answer with code 133 and :func:`reply_identification` (accepted=False).
    """
    t = identification_time(new, now)
    if abs(t - now) > window_s:
        return False
    return last is None or _ticks(new, now) > _ticks(last, now)


def identification_expired(last: int, now: float, window_s: float = 7.0) -> bool:
    """True once :func:`identification_acceptable` refuses, on the time window alone, every
    Identification not later than ``last``: ``last``'s timestamp lies more than ``window_s``
    seconds before ``now``. From then on a receiver need not remember ``last`` (its record of
    the last accepted Identification can go: replays of it or of anything earlier are stale)."""
    return identification_time(last, now) + window_s < now


def reply_identification(request_ident: int, now: float, *, accepted: bool = True) -> int:
    """Identification for the Registration Reply to a request carrying ``request_ident``.

    Accepted timestamp: the whole Identification is copied.  Mismatch (code 133): the high
    32 bits carry the home agent's own time, the low 32 bits are copied from the request, so
    the mobile node can match the reply and resynchronise its clock.
    """
    if accepted:
        return request_ident & _U64_MASK
    return (ntp_identification(now) & ~0xFFFFFFFF & _U64_MASK) | (request_ident & 0xFFFFFFFF)


def reply_matches_request(request_ident: int, reply_ident: int) -> bool:
    """RFC 5944 5.7: the low-order 32 bits of the reply must equal those of the request."""
    return (request_ident & 0xFFFFFFFF) == (reply_ident & 0xFFFFFFFF)


def clock_offset(reply_ident: int, now: float) -> float:
    """Seconds to add to the local clock to match the home agent's (after a 133 reply):
    the HA's time from the reply's high 32 bits minus ``now``, whole-second resolution."""
    ha_secs = identification_time(reply_ident & ~0xFFFFFFFF, now)
    return ha_secs - float(int(now))
