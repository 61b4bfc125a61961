"""The load generator's pure parts (no I/O, unit-tested): where the synthetic users' home
addresses come from, the routes that make them the generator's own, the open loop's arrivals
and the users they go to, and when a registered user renews."""

from __future__ import annotations

import ipaddress
import statistics
from collections import deque
from collections.abc import Iterable
from typing import Generic, TypeVar

T = TypeVar("T")

# A renewal is sent when this fraction of the granted lifetime has run (uniformly in between),
# as an MN re-registers some time before its binding would expire.
RENEW_WINDOW = (0.5, 0.9)


def pool_free(prefix: ipaddress.IPv4Network, used: Iterable[ipaddress.IPv4Address]) -> tuple[int, int]:
    """The synthetic users' range in one home prefix as (first, last) integers: from the address
    after the highest one in use (the HA's, the lab's own MNs') to the one before broadcast, so
    that a short list of blocks covers exactly the synthetic users (``covering_blocks``)."""
    inside = [int(a) for a in used if a in prefix]
    first = max(inside, default=int(prefix.network_address)) + 1
    return first, int(prefix.broadcast_address) - 1


def allocate_home_addresses(n: int, pools: list[tuple[str, tuple[int, int]]]
                            ) -> list[tuple[str, ipaddress.IPv4Address]]:
    """N (home agent, home address) pairs, filling each pool's free range in order; ValueError
    naming how many fit if N do not."""
    out: list[tuple[str, ipaddress.IPv4Address]] = []
    for ha, (first, last) in pools:
        take = min(n - len(out), max(0, last - first + 1))
        out += [(ha, ipaddress.IPv4Address(first + k)) for k in range(take)]
        if len(out) == n:
            return out
    raise ValueError(f"at most {len(out)} synthetic users fit in the home prefixes")


def covering_blocks(addresses: Iterable[ipaddress.IPv4Address]) -> list[ipaddress.IPv4Network]:
    """The fewest prefixes covering exactly these addresses (each run of consecutive addresses
    summarised): the generator makes each a ``local`` route, one per block, not one per user."""
    values = sorted({int(a) for a in addresses})
    blocks: list[ipaddress.IPv4Network] = []
    k = 0
    while k < len(values):
        j = k
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        blocks += ipaddress.summarize_address_range(ipaddress.IPv4Address(values[k]),
                                                    ipaddress.IPv4Address(values[j]))
        k = j + 1
    return blocks


def arrivals(rate: float, duration: float) -> list[float]:
    """An open loop's arrival times (seconds from its start): one every 1/rate for ``duration``
    seconds, whatever the answers do (``rate * duration`` of them, rounded down)."""
    if rate <= 0 or duration <= 0:
        raise ValueError("rate and duration must be positive")
    count = int(rate * duration + 1e-9)
    return [k / rate for k in range(count)]


class UserPool(Generic[T]):
    """The users an open loop's arrivals go to: the one idle longest first; a user still in a
    registration is never sent another (an MN has one at a time), so an arrival that finds
    every user busy is counted (``busy``) and not sent."""

    def __init__(self, users: Iterable[T]) -> None:
        self.idle: deque[T] = deque(users)
        self.busy = 0

    def take(self) -> T | None:
        if not self.idle:
            self.busy += 1
            return None
        return self.idle.popleft()

    def give_back(self, user: T) -> None:
        self.idle.append(user)


def renewal_due(replied_at: float, granted: int, u: float, now: float | None = None) -> float:
    """When a user registered at ``replied_at`` for ``granted`` seconds renews: at a point of
    ``RENEW_WINDOW`` of its lifetime picked by ``u`` in [0, 1). Given ``now`` (the first renewal
    after a long initial phase), a user already inside its window renews in what is left of it,
    spread the same way, rather than all of them at once."""
    lo, hi = (replied_at + f * granted for f in RENEW_WINDOW)
    if now is not None and lo < now:
        return now + u * max(0.0, hi - now)
    return lo + u * (hi - lo)


def by_tenths(samples: list[tuple[float, float]]) -> list[dict[str, float | int]]:
    """How a closed loop went as the bindings piled up: its answers ``(replied_at s, latency ms)``
    in reply order, cut into ten consecutive slices (fewer for fewer answers), each with its
    count, answers a second (from the previous slice's last answer, the first slice from its own
    first) and median latency."""
    s = sorted(samples)
    if not s:
        return []
    parts = min(10, len(s))
    out: list[dict[str, float | int]] = []
    start = s[0][0]
    for k in range(parts):
        chunk = s[k * len(s) // parts:(k + 1) * len(s) // parts]
        end = chunk[-1][0]
        lat = [v for _, v in chunk]
        out.append({"answers": len(chunk), "per_s": round(len(chunk) / (end - start), 1) if end > start else 0.0,
                    "p50_ms": round(statistics.median(lat), 1)})
        start = end
    return out
