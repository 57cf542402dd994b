"""Tests for shoal.nodeset."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shoal.nodeset import MAX_EXPANSION, NodeSet, NodeSetError, natural_key


def names(ns: NodeSet) -> list[str]:
    return list(ns)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("node[1-8,12]", [f"node{i}" for i in [1, 2, 3, 4, 5, 6, 7, 8, 12]]),
        ("node-1,node-3", ["node-1", "node-3"]),
        ("web[01-10]", [f"web{i:02d}" for i in range(1, 11)]),
        ("rack[1-2]-n[1-3]", [f"rack{r}-n{n}" for r in (1, 2) for n in (1, 2, 3)]),
        ("alpha", ["alpha"]),
        (" a , b ,c ", ["a", "b", "c"]),
        ("n[ 1 , 3-4 ]", ["n1", "n3", "n4"]),
        ("n[05]", ["n05"]),
        ("n[0-2]", ["n0", "n1", "n2"]),
        ("n[1-3],n2", ["n1", "n2", "n3"]),
        ("[1-3]", ["1", "2", "3"]),
        ("n[1-2]x", ["n1x", "n2x"]),
        ("", []),
        ("   ", []),
    ],
)
def test_parse(text: str, expected: list[str]) -> None:
    assert names(NodeSet.parse(text)) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("node[1-3", "unclosed"),
        ("node1-3]", "unbalanced"),
        ("node[[1-3]]", "nested"),
        ("node[5-1]", "reversed"),
        ("a,,b", "empty element"),
        ("a,", "empty element"),
        ("node[]", "empty range"),
        ("node[1,]", "empty range"),
        ("node[a-b]", "invalid range"),
        ("node[1-x]", "invalid range"),
        ("node[0-100000]", "more than"),
        ("a[1-1000]b[1-1000]", "more than"),
        ("no de", "invalid character"),
        ("node/1", "invalid character"),
        ("nöde", "invalid character"),
    ],
)
def test_parse_errors(text: str, fragment: str) -> None:
    with pytest.raises(NodeSetError) as info:
        NodeSet.parse(text)
    assert fragment in str(info.value)
    assert repr(text.strip()) in str(info.value) or text in str(info.value)
    assert isinstance(info.value, ValueError)


def test_limit_is_inclusive() -> None:
    assert len(NodeSet.parse(f"n[1-{MAX_EXPANSION}]")) == MAX_EXPANSION


@pytest.mark.parametrize(
    ("members", "folded"),
    [
        (["node1", "node2", "node3", "node5"], "node[1-3,5]"),
        (["web01", "web02", "web03"], "web[01-03]"),
        ([f"web{i:02d}" for i in range(1, 11)], "web[01-10]"),
        (["node-1", "node-2"], "node-[1-2]"),
        (["alpha", "beta"], "alpha,beta"),
        (["node1"], "node1"),
        (["a1", "b1", "b2"], "a1,b[1-2]"),
        (["n1x", "n2x", "n1"], "n1,n[1-2]x"),
        (["rack1-n1", "rack1-n2"], "rack1-n[1-2]"),
        (["n1", "n01"], "n[1,01]"),
        (["n9", "n10", "n11"], "n[9-11]"),
        ([], ""),
    ],
)
def test_fold(members: list[str], folded: str) -> None:
    ns = NodeSet(members)
    assert str(ns) == folded
    assert NodeSet.parse(folded) == ns


def test_natural_order_and_key() -> None:
    assert names(NodeSet(["node10", "node2", "node1"])) == ["node1", "node2", "node10"]
    assert sorted(["b", "a10", "a9", "a"], key=natural_key) == ["a", "a9", "a10", "b"]
    assert natural_key("n01") != natural_key("n1")


def test_set_algebra_and_protocols() -> None:
    a = NodeSet.parse("n[1-5]")
    b = NodeSet.parse("n[4-8]")
    assert str(a | b) == "n[1-8]"
    assert str(a & b) == "n[4-5]"
    assert str(a - b) == "n[1-3]"
    assert str(a ^ b) == "n[1-3,6-8]"
    assert a.union(["n9"], b) == NodeSet.parse("n[1-9]")
    assert a.intersection(b) == a & b
    assert a.difference(b) == a - b
    assert a.symmetric_difference(b) == a ^ b
    assert (a & b).issubset(a)
    assert not a.issubset(b)
    assert a.issuperset(["n1"])
    assert a.isdisjoint(NodeSet(["x"]))
    assert a & b <= a and a & b < a and a >= a and not a > a
    assert "n1" in a and "n9" not in a and 3 not in a
    assert len(a) == 5 and bool(a) and not NodeSet()
    assert hash(a) == hash(NodeSet.parse("n1,n2,n3,n4,n5"))
    assert {a: 1}[NodeSet.parse("n[1-5]")] == 1
    assert a != "n[1-5]"
    assert repr(a) == "NodeSet.parse('n[1-5]')"
    assert NodeSet(a) == a


def test_immutable_and_validated() -> None:
    ns = NodeSet(["a"])
    with pytest.raises(AttributeError):
        ns._names = frozenset()
    with pytest.raises(NodeSetError):
        NodeSet(["bad name"])
    with pytest.raises(NodeSetError):
        NodeSet([""])
    with pytest.raises(TypeError):
        NodeSet("node1")
    with pytest.raises(NodeSetError):
        NodeSet.parse("a").union(["b,c"])
    with pytest.raises(TypeError):
        _ = ns | {"a"}


# Few letters and digits with leading zeros make prefix collisions and padding common.
name_strategy = st.text(alphabet="ab-.0129", min_size=1, max_size=7)
set_strategy = st.frozensets(name_strategy, max_size=30)


@given(set_strategy)
def test_round_trip(members: frozenset[str]) -> None:
    ns = NodeSet(members)
    text = str(ns)
    assert NodeSet.parse(text) == ns
    assert set(ns) == members


@given(st.frozensets(st.integers(0, 300), max_size=40), st.sampled_from(["", "0", "00"]))
def test_round_trip_numeric(numbers: frozenset[int], pad: str) -> None:
    ns = NodeSet(f"node{pad}{n}" for n in numbers)
    assert NodeSet.parse(str(ns)) == ns
    # One prefix means one group, hence no top-level comma outside brackets.
    assert "," not in str(ns).split("]")[-1]


@given(set_strategy, set_strategy)
def test_algebra_matches_frozenset(x: frozenset[str], y: frozenset[str]) -> None:
    a, b = NodeSet(x), NodeSet(y)
    assert set(a | b) == x | y
    assert set(a & b) == x & y
    assert set(a - b) == x - y
    assert set(a ^ b) == x ^ y
    assert a.issubset(b) == (x <= y)
    assert (a == b) == (x == y)
    assert len(a) == len(x)
    assert list(a) == sorted(x, key=natural_key)
