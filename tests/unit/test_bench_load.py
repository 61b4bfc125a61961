"""The register benchmark's pure parts: home address allocation over several home prefixes,
the `local` routes covering exactly the synthetic users, the open loop's arrivals and user
pool, renewal times, percentiles. No root, nothing started."""

from __future__ import annotations

import ipaddress
import itertools
import random

import pytest

from daemons.bench.kit import percentiles
from daemons.bench.load import (
    RENEW_WINDOW,
    UserPool,
    allocate_home_addresses,
    arrivals,
    by_tenths,
    covering_blocks,
    pool_free,
    renewal_due,
)

A = ipaddress.IPv4Address
N = ipaddress.IPv4Network


def test_pool_starts_after_the_highest_address_in_use() -> None:
    prefix = N("198.19.0.0/16")
    assert pool_free(prefix, [A("198.19.0.1"), A("198.19.0.10"), A("198.18.100.10")]) == (
        int(A("198.19.0.11")), int(A("198.19.255.254")))
    assert pool_free(N("198.18.128.0/30"), []) == (int(A("198.18.128.1")), int(A("198.18.128.2")))


def test_allocation_fills_pools_in_order_and_refuses_too_many() -> None:
    pools = [("ha", pool_free(N("198.19.0.0/29"), [A("198.19.0.1")])),  # .2 .. .6
             ("ha2", pool_free(N("198.18.128.0/30"), [A("198.18.128.1")]))]  # .2
    got = allocate_home_addresses(6, pools)
    assert got == [("ha", A(f"198.19.0.{k}")) for k in range(2, 7)] + [("ha2", A("198.18.128.2"))]
    assert allocate_home_addresses(2, pools) == [("ha", A("198.19.0.2")), ("ha", A("198.19.0.3"))]
    with pytest.raises(ValueError, match="at most 6"):
        allocate_home_addresses(7, pools)


def test_covering_blocks_cover_exactly_the_addresses() -> None:
    addresses = [A(int(A("198.19.0.11")) + k) for k in range(10_000)]
    blocks = covering_blocks(addresses)
    assert len(blocks) < 32  # a handful of routes, not one per user
    covered = {int(a) for b in blocks for a in b}
    assert covered == {int(a) for a in addresses}
    assert A("198.19.0.10") not in covered  # mn1's stays mn1's
    assert covering_blocks([A("10.0.0.1"), A("10.0.0.3"), A("10.0.0.2"), A("10.0.0.9")]) == [
        N("10.0.0.1/32"), N("10.0.0.2/31"), N("10.0.0.9/32")]
    assert covering_blocks([]) == []


def test_arrivals_are_evenly_spaced_over_the_duration() -> None:
    times = arrivals(100, 30)
    assert len(times) == 3000
    assert times[0] == 0 and times[-1] == pytest.approx(29.99)
    assert all(b - a == pytest.approx(0.01) for a, b in itertools.pairwise(times))
    assert len(arrivals(3, 0.5)) == 1 and len(arrivals(0.5, 10)) == 5
    with pytest.raises(ValueError):
        arrivals(0, 10)


def test_user_pool_never_hands_out_a_busy_user() -> None:
    pool = UserPool(["a", "b"])
    assert [pool.take(), pool.take(), pool.take()] == ["a", "b", None]
    assert pool.busy == 1
    pool.give_back("a")
    assert pool.take() == "a" and pool.take() is None and pool.busy == 2
    pool.give_back("b")
    pool.give_back("a")
    assert [pool.take(), pool.take()] == ["b", "a"]  # the one idle longest first


def test_renewals_fall_inside_the_window_of_the_granted_lifetime() -> None:
    lo, hi = RENEW_WINDOW
    assert renewal_due(100.0, 300, 0.0) == pytest.approx(100 + lo * 300)
    assert renewal_due(100.0, 300, 0.999999) == pytest.approx(100 + hi * 300)
    rng = random.Random(1)
    dues = [renewal_due(0.0, 60, rng.random()) for _ in range(1000)]
    assert all(lo * 60 <= d < hi * 60 for d in dues)
    assert max(dues) - min(dues) > 0.3 * 60  # spread, not all at once


def test_a_user_already_in_its_window_renews_in_what_is_left_of_it() -> None:
    # registered at 0 for 60 s; the renewal phase starts at 40 (window 30..54)
    assert renewal_due(0.0, 60, 0.0, now=40.0) == 40.0
    assert renewal_due(0.0, 60, 0.5, now=40.0) == pytest.approx(47.0)
    assert renewal_due(0.0, 60, 0.5, now=10.0) == pytest.approx(30 + 0.5 * 24)  # not yet in it: as usual
    assert renewal_due(0.0, 60, 0.9, now=70.0) == 70.0  # past it: at once


def test_percentiles() -> None:
    assert percentiles([]) == {"n": 0}
    p = percentiles([float(v) for v in range(1, 101)])
    assert (p["n"], p["min"], p["p50"], p["p90"], p["p99"], p["max"]) == (100, 1.0, 50.5, 90.0, 99.0, 100.0)
    assert percentiles([5.0])["p99"] == 5.0


def test_closed_loop_by_tenths_shows_a_slowdown() -> None:
    # 100 answers: the first 50 at 10/s with 100 ms latency, the last 50 at 2/s with 900 ms
    samples = [(k * 0.1, 100.0) for k in range(50)] + [(4.9 + (k + 1) * 0.5, 900.0) for k in range(50)]
    tenths = by_tenths(samples)
    assert [t["answers"] for t in tenths] == [10] * 10
    assert tenths[1]["per_s"] == pytest.approx(10.0) and tenths[-1]["per_s"] == pytest.approx(2.0)
    assert tenths[0]["p50_ms"] == 100.0 and tenths[-1]["p50_ms"] == 900.0
    assert by_tenths([]) == [] and len(by_tenths([(1.0, 5.0), (2.0, 7.0)])) == 2
