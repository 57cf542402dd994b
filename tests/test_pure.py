"""Pure logic of sessions, placement, tokens and rate limits, driven without sockets."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shoal.agent.ledger import Ledger
from shoal.config import ControllerConfig
from shoal.controller import hosts
from shoal.controller.terminals import RateLimiter, client_key
from shoal.logic import placement, tokens
from shoal.logic.sessionstate import (
    FINAL,
    TRANSITIONS,
    IllegalTransition,
    can_move,
    check,
    is_final,
)
from shoal.wire import messages as m

STATES: list[m.SessionState] = list(TRANSITIONS)


def test_every_transition_is_decided_by_the_table() -> None:
    legal = {("pending", "starting"), ("pending", "failed"), ("pending", "killed"),
             ("pending", "lost"),
             ("starting", "running"), ("starting", "pending"), ("starting", "exited"),
             ("starting", "failed"), ("starting", "killed"), ("starting", "lost"),
             ("running", "starting"), ("running", "pending"), ("running", "exited"),
             ("running", "failed"), ("running", "killed"), ("running", "lost")}
    for old, new in itertools.product(STATES, STATES):
        assert can_move(old, new) == ((old, new) in legal), (old, new)
        if (old, new) in legal:
            check(old, new)
        else:
            with pytest.raises(IllegalTransition):
                check(old, new)


def test_final_states_never_change() -> None:
    assert FINAL == {"exited", "failed", "killed", "lost"}
    for state in FINAL:
        assert is_final(state) and not TRANSITIONS[state]


def _node(name: str, sessions: int, capacity: int = 10, state: str = "ready",
          cpu: float = 0.0, **labels: str) -> m.NodeInfo:
    return m.NodeInfo(name=name, sessions=sessions, capacity=capacity, state=state,  # type: ignore[arg-type]
                      load=m.Load(cpu_percent=cpu), labels=labels)


NODES = {n.name: n for n in [_node("a", 0), _node("b", 5), _node("c", 10),
                             _node("d", 0, state="draining"), _node("e", 2, zone="x")]}


def test_placement_filters() -> None:
    spec = m.SessionSpec(command=["x"])
    assert set(placement.candidates(spec, NODES)) == {"a", "b", "e"}
    assert placement.candidates(m.SessionSpec(command=["x"], node="b"), NODES) == ["b"]
    assert placement.candidates(m.SessionSpec(command=["x"], node="c"), NODES) == []
    assert placement.candidates(m.SessionSpec(command=["x"], selector={"zone": "x"}),
                                NODES) == ["e"]


def test_spread_prefers_the_idle_and_binpack_the_full() -> None:
    rng = random.Random(1)
    spread = [placement.candidates(m.SessionSpec(command=["x"]), NODES, rng)[0]
              for _ in range(300)]
    binpack = [placement.candidates(m.SessionSpec(command=["x"], strategy="binpack"), NODES, rng)[0]
               for _ in range(300)]
    assert spread.count("a") > spread.count("b")
    assert binpack.count("b") > binpack.count("a")


@given(st.lists(st.tuples(st.integers(0, 20), st.integers(1, 20)), min_size=1, max_size=12))
def test_candidates_are_each_eligible_node_once(loads: list[tuple[int, int]]) -> None:
    nodes = {f"n{i}": _node(f"n{i}", s, c) for i, (s, c) in enumerate(loads)}
    got = placement.candidates(m.SessionSpec(command=["x"]), nodes)
    assert sorted(got) == sorted(n for n, info in nodes.items() if info.sessions < info.capacity)


def test_tokens() -> None:
    key = tokens.derive_key("secret")
    t = tokens.issue(key, "s-1", 60, now=1000.0)
    claims = tokens.verify(key, t, now=1059.0)
    assert claims is not None and (claims.session, claims.kind) == ("s-1", "link")
    again = tokens.verify(key, tokens.issue(key, "s-1", 60, now=1000.0), now=1000.0)
    assert len(claims.nonce) == 16 and again != claims
    assert tokens.verify(key, t, now=1061.0) is None
    assert tokens.verify(tokens.derive_key("other"), t, now=1000.0) is None
    body, sig = t.split(".")
    assert tokens.verify(key, body + "." + sig[::-1], now=1000.0) is None
    assert tokens.verify(key, "garbage", now=1000.0) is None
    assert tokens.verify(key, "", now=1000.0) is None


def test_rate_limiter() -> None:
    limiter = RateLimiter(per_minute=3)
    assert [limiter.allow("ip", now=0.0) for _ in range(4)] == [True, True, True, False]
    assert limiter.allow("other", now=0.0)
    assert limiter.allow("ip", now=20.0)  # one token back after 20 s
    assert not limiter.allow("ip", now=20.5)


def test_rate_limiter_never_forgets_everyone_at_once() -> None:
    """Past the key bound the least recently seen go, never a busy client's bucket (the old
    limiter cleared every bucket at 100 000 keys: a flood of addresses reset it)."""
    limiter = RateLimiter(per_minute=1)
    assert limiter.allow("busy", now=0.0) and not limiter.allow("busy", now=0.0)
    for i in range(99_990):
        limiter.allow(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}", now=1.0)
    assert not limiter.ready("busy", now=2.0) and not limiter.allow("busy", now=2.0)
    for i in range(50):
        limiter.allow(f"flood-{i}", now=3.0)
    assert len(limiter.buckets) <= 100_000
    assert not limiter.ready("busy", now=4.0), "the busy client's bucket survived the flood"


def test_rate_limiter_ready_spends_nothing() -> None:
    limiter = RateLimiter(per_minute=1)
    assert all(limiter.ready("ip", now=0.0) for _ in range(5))
    assert limiter.allow("ip", now=0.0) and not limiter.ready("ip", now=0.0)
    limiter.refund("ip", now=0.0)
    assert limiter.ready("ip", now=0.0)


def test_client_keys_group_an_ipv6_64() -> None:
    assert client_key("2001:db8:1:2::10") == client_key("2001:db8:1:2:ffff:1:2:3") \
        == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:3::10") != client_key("2001:db8:1:2::10")
    assert client_key("::ffff:192.0.2.7") == client_key("192.0.2.7") == "192.0.2.7"
    assert client_key("fe80::1%eth0") == "fe80::/64"
    assert client_key("192.0.2.7") != client_key("192.0.2.8")
    assert client_key("not an address") == "not an address"


@pytest.mark.parametrize(("bound", "allowed", "public", "host", "ok"), [
    ("127.0.0.1", [], "", "127.0.0.1:7470", True),
    ("127.0.0.1", [], "", "localhost:7470", True),
    ("127.0.0.1", [], "", "localhost.", True),
    ("127.0.0.1", [], "", "[::1]:7470", True),
    ("127.0.0.1", [], "", "evil.example:7470", False),
    ("127.0.0.1", [], "", "localhost.evil.example", False),
    ("127.0.0.1", [], "", "", False),
    ("127.0.0.1", [], "", "[bad", False),
    ("127.0.0.1", [], "", "192.0.2.10", False),
    ("192.0.2.10", [], "", "192.0.2.10:7470", True),
    ("127.0.0.1", ["Shoal.Example.org"], "", "shoal.example.org", True),
    ("127.0.0.1", [], "https://pool.example.org/", "pool.example.org:443", True),
    ("127.0.0.1", [], "https://pool.example.org/", "other.example.org", False),
    ("127.0.0.1", ["*"], "", "anything.example", True),
])
def test_host_policy(bound: str, allowed: list[str], public: str, host: str, ok: bool) -> None:
    rules = hosts.policy(ControllerConfig(host=bound, allowed_hosts=allowed, public_url=public))
    assert hosts.host_ok(host, rules) is ok


def test_ledger_survives_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "n.ledger"
    path.write_text("+ 100\n+ 200\n- 100\nu+ shoal-aa\nu+ shoal-bb\nu- shoal-aa\n+ 3x")
    groups, users = Ledger(path, "n").leftovers()
    assert groups == {200} and users == {"shoal-bb"}


def test_client_address_behind_trusted_proxies() -> None:
    from shoal.controller.auth import nearest_untrusted

    proxies = ["10.0.0.1", "10.0.0.2"]
    assert nearest_untrusted("203.0.113.9", "1.2.3.4", proxies) == "203.0.113.9"
    assert nearest_untrusted("10.0.0.1", "198.51.100.7", proxies) == "198.51.100.7"
    # A client's forged first hop is ignored: the proxies' own entries come last.
    assert nearest_untrusted("10.0.0.1", "6.6.6.6, 198.51.100.7, 10.0.0.2", proxies) \
        == "198.51.100.7"
    assert nearest_untrusted("10.0.0.1", "", proxies) == "10.0.0.1"
