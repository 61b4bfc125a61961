"""Per-source token buckets in a bounded table (the FA: RRQs and solicitations per source address).

A source may send ``burst`` at once, then ``rate`` per second: each datagram takes a token from
its bucket, which refills at ``rate`` up to ``burst``; with none left the datagram is dropped.
A source whose bucket has filled up again is as good as one never seen, so its entry goes: the
table holds only the sources heard within the last ``burst / rate`` seconds, and at most
``max_sources`` of them. When more sources than that are busy at once (a flood from forged
addresses), the newcomers share one bucket: the sources already in the table keep theirs and
memory stays bounded. Forgetting a source can only give it a full bucket, never fewer tokens.
"""

from __future__ import annotations

import enum
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass


class Limit(enum.Enum):
    PASS = "pass"
    DROP = "drop"
    FIRST_DROP = "first_drop"  # the first drop since this source last got through: worth one log line


@dataclass
class _Bucket:
    tokens: float
    stamp: float
    dropping: bool = False


class RateLimiter:
    PRUNE_PER_CHECK = 2  # amortised: entries refilled since are dropped a few at a time

    def __init__(self, rate: float, burst: int, max_sources: int = 4096,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0 or burst < 1 or max_sources < 1:
            raise ValueError("rate limit: rate must be > 0, burst and max_sources >= 1")
        self.rate = rate
        self.burst = burst
        self.max_sources = max_sources
        self.clock = clock
        self._table: OrderedDict[Hashable, _Bucket] = OrderedDict()  # least recently heard first
        self._overflow = _Bucket(float(burst), clock())
        self.dropped = 0
        self.overflowed = 0  # checks that fell to the shared bucket (the table was full)

    def __len__(self) -> int:
        return len(self._table)

    def _refilled(self, bucket: _Bucket, now: float) -> float:
        return min(float(self.burst), bucket.tokens + (now - bucket.stamp) * self.rate)

    def _prune(self, now: float) -> None:
        for _ in range(self.PRUNE_PER_CHECK):
            if not self._table:
                return
            key, oldest = next(iter(self._table.items()))
            if self._refilled(oldest, now) < self.burst:
                return  # the least recently heard is still counting: so are all the others
            del self._table[key]

    def check(self, source: Hashable) -> Limit:
        """May one more datagram from ``source`` through? (It takes a token if so.)"""
        now = self.clock()
        self._prune(now)
        bucket = self._table.get(source)
        if bucket is not None:
            self._table.move_to_end(source)
        elif len(self._table) < self.max_sources:
            bucket = self._table[source] = _Bucket(float(self.burst), now)
        else:
            bucket = self._overflow
            self.overflowed += 1
        bucket.tokens = self._refilled(bucket, now)
        bucket.stamp = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            bucket.dropping = False
            return Limit.PASS
        self.dropped += 1
        first, bucket.dropping = not bucket.dropping, True
        return Limit.FIRST_DROP if first else Limit.DROP
