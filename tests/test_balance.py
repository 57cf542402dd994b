"""The balancer, pure: rise/fall, peak EWMA, power of two choices, draining, no replica."""

from __future__ import annotations

import collections
import random

import pytest

from shoal.errors import ValidationError
from shoal.logic import balance
from shoal.logic.balance import Pool, Replica
from shoal.wire.servicetypes import check_name, parse_check


def up(key: str, latency: float = 0.001, now: float = 0.0) -> Replica:
    r = Replica(key=key, host="127.0.0.1", port=1)
    r.check(True, now, latency)
    return r


def test_first_check_decides_then_rise_and_fall() -> None:
    r = Replica(key="a", host="h", port=1, rise=2, fall=3)
    assert r.health == "init" and not r.available
    assert r.check(True, 0.0, 0.001) and r.health == "up"
    assert not r.check(False, 1.0) and not r.check(False, 2.0) and r.health == "up"
    assert not r.check(True, 3.0)  # a pass resets the failure count
    for t in (4.0, 5.0):
        r.check(False, t)
    assert r.health == "up"
    assert r.check(False, 6.0) and r.health == "down" and r.changed_at == 6.0
    assert not r.check(True, 7.0) and r.health == "down"
    assert not r.check(False, 8.0)  # a failure resets the pass count
    r.check(True, 9.0)
    assert r.check(True, 10.0) and r.health == "up"
    first_failure = Replica(key="b", host="h", port=1)
    first_failure.check(False, 0.0, error="refused")
    assert first_failure.health == "down" and first_failure.last_error == "refused"


def test_peak_ewma_rises_at_once_and_decays_slowly() -> None:
    r = Replica(key="a", host="h", port=1)
    assert r.cost(0.0) == pytest.approx(balance.UNMEASURED), "unmeasured is pessimistic"
    r.sample(0.010, 0.0)
    assert r.ewma == pytest.approx(0.010)
    r.sample(0.100, 0.1)
    assert r.ewma == pytest.approx(0.100), "a peak takes over at once"
    r.sample(0.010, 0.2)
    assert 0.095 < r.ewma < 0.100, "a lower sample only decays in"
    r.sample(0.010, 0.2 + 5 * balance.DECAY)
    assert r.ewma == pytest.approx(0.010, abs=0.001), "after several decay times it is back"


def test_cost_counts_in_flight_and_recent_redirects() -> None:
    r = up("a", 0.01)
    base = r.cost(0.0)
    r.begin(0.0)
    r.begin(0.0)
    assert r.cost(0.0) == pytest.approx(3 * base)
    r.end(0.0, None)
    r.end(0.0, None)
    r.end(0.0, None)
    assert r.inflight == 0
    r.assign(0.0)
    assert r.cost(0.0) == pytest.approx(2 * base)
    assert r.cost(10 * balance.RECENT_DECAY) == pytest.approx(base, rel=1e-3), "redirects fade"


def test_choice_skips_down_draining_and_excluded() -> None:
    pool = Pool(rng=random.Random(1))
    assert pool.choose(0.0) is None
    pool.replicas = {k: up(k) for k in "abcd"}
    pool.replicas["b"].check(False, 1.0)
    for t in (2.0, 3.0):
        pool.replicas["b"].check(False, t)
    pool.replicas["c"].draining = True
    picks = {pool.choose(5.0, exclude={"d"}).key for _ in range(50)}  # type: ignore[union-attr]
    assert picks == {"a"}
    assert pool.counts() == {"up": 3, "down": 1, "init": 0, "draining": 1}
    pool.replicas["a"].draining = True
    assert pool.choose(5.0, exclude={"d"}) is None


def test_equal_replicas_share_and_slow_one_gets_fewer() -> None:
    rng = random.Random(7)
    pool = Pool(rng=rng)
    pool.replicas = {"fast1": up("fast1", 0.002), "fast2": up("fast2", 0.002),
                     "fast3": up("fast3", 0.0021), "slow": up("slow", 0.050)}
    counts: collections.Counter[str] = collections.Counter()
    now = 0.0
    for _ in range(1000):  # redirects, 1 ms apart: only `recent` tells load
        now += 0.001
        r = pool.choose(now)
        assert r is not None
        r.assign(now)
        counts[r.key] += 1
    fast = [counts[k] for k in ("fast1", "fast2", "fast3")]
    assert min(fast) > 250 and counts["slow"] < min(fast) / 4, counts


def test_in_flight_steers_away_from_a_busy_replica() -> None:
    pool = Pool(rng=random.Random(3))
    pool.replicas = {"a": up("a", 0.001), "b": up("b", 0.001)}
    for _ in range(5):
        pool.replicas["a"].begin(0.0)
    assert {pool.choose(0.0).key for _ in range(20)} == {"b"}  # type: ignore[union-attr]


def test_names_and_checks() -> None:
    assert check_name("web-1") == "web-1"
    for bad in ("Web", "-web", "web-", "a_b", "", "x" * 64, "a/b"):
        with pytest.raises(ValidationError):
            check_name(bad)
    assert parse_check("tcp") == ("tcp", "")
    assert parse_check("http:/healthz?x=1") == ("http", "/healthz?x=1")
    for bad in ("udp", "http:", "http:health", "http:/a b", "http:/a\r\nX: y", "tcp:80"):
        with pytest.raises(ValidationError):
            parse_check(bad)
