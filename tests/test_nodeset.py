"""Tests for shoal.logic.nodeset."""

from __future__ import annotations

import re

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from shoal.logic.nodeset import MAX_EXPANSION, NodeSet, NodeSetError, natural_key


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
        ("n[1 - 2]", ["n1", "n2"]),
        ("n[1-10/3]", ["n1", "n4", "n7", "n10"]),
        ("n[01-10/3]", ["n01", "n04", "n07", "n10"]),
        ("n1[0-2]", ["n10", "n11", "n12"]),
        ("n0[1-2]", ["n01", "n02"]),
        ("n[1-2]0", ["n10", "n20"]),
        ("n[1-2]x5[3-4]", ["n1x53", "n1x54", "n2x53", "n2x54"]),
        ("n[1-5]!n[2-3]", ["n1", "n4", "n5"]),
        ("n[1-5]&n[4-9]", ["n4", "n5"]),
        ("n[1-3]^n[3-4]", ["n1", "n2", "n4"]),
        ("a,b&b,c", ["b", "c"]),  # left to right, no precedence, as ClusterShell
        ("a!b,c", ["a", "c"]),
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
        ("a,,b", "missing node set operand with ','"),
        ("a,", "missing node set operand with ','"),
        ("!a", "missing node set operand with '!'"),
        ("a&", "missing node set operand with '&'"),
        ("n[1-044]", "padding length mismatch"),
        ("0[7-10]", "padding length mismatch"),
        ("n[01-5]", "padding length mismatch"),
        ("n[1-2][3-4]", "illegal reopening bracket"),
        ("n[1-2]5[3-4]", "illegal reopening bracket"),
        ("n[1/2]", "invalid step usage"),
        ("n[1-9/0]", "invalid step"),
        ("n[1-1000000/2]", "more than"),
        ("n[1-2]0[1-3000000]", "illegal reopening"),
        ("n1234567890123456789", "too long"),
        ("@x", "cannot be resolved"),
        ("node[]", "empty range"),
        ("node[1,]", "empty range"),
        ("node[a-b]", "invalid range"),
        ("node[1-x]", "invalid range"),
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
        ([f"node{i}-ib0" for i in range(1, 4)], "node[1-3]-ib0"),
        ([f"x{i}y{j}" for i in (1, 2) for j in (3, 4)], "x[1-2]y[3-4]"),
        (["n1", "n2", "n05", "n10"], "n[1-2,05,10]"),
        (["n08", "n09", "n10"], "n[08-10]"),
        (["n098", "n099", "n100"], "n[098-100]"),
        (["a2", "a1x", "a", "b"], "a,a2,a1x,b"),
        ([], ""),
    ],
)
def test_fold(members: list[str], folded: str) -> None:
    ns = NodeSet(members)
    assert str(ns) == folded
    assert NodeSet.parse(folded) == ns


def test_order_and_natural_key() -> None:
    assert names(NodeSet(["node10", "node2", "node1"])) == ["node1", "node2", "node10"]
    # ClusterShell's order: by pattern, then by each number's length and value
    assert names(NodeSet(["a1x", "a2", "n01", "n1"])) == ["a2", "a1x", "n1", "n01"]
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
        ns._levels = {}
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
    assert list(a) == list(NodeSet(sorted(x)))


# --- agreement with ClusterShell itself (installed by the bench extra) -----------------

cs_nodeset = pytest.importorskip("ClusterShell.NodeSet")

digits = st.text(alphabet="01239", min_size=1, max_size=3)
item = st.one_of(
    digits,
    st.builds(lambda a, b, sp: f"{a}{sp}-{sp}{b}", digits, digits, st.sampled_from(["", " "])),
    st.builds(lambda a, b, s: f"{a}-{b}/{s}", digits, digits, st.sampled_from(["1", "2", "3"])),
)
bracket = st.lists(item, min_size=1, max_size=3).map(lambda xs: "[" + ",".join(xs) + "]")
literal = st.text(alphabet="ab-.019", max_size=3)
element = st.builds(
    lambda head, parts: head + "".join(b + lit for b, lit in parts),
    literal,
    st.lists(st.tuples(bracket, literal), max_size=3),
).filter(bool)
expression = st.builds(
    lambda first, rest: first + "".join(op + e for op, e in rest),
    element,
    st.lists(st.tuples(st.sampled_from([",", "!", "&", "^", " , "]), element), max_size=3),
)


def clustershell(text: str) -> tuple[set[str], str] | None:
    try:
        ns = cs_nodeset.NodeSet(text)
    except (cs_nodeset.NodeSetParseError, cs_nodeset.RangeSetParseError):
        return None
    return set(ns), str(ns)


def _one_slot(ns: NodeSet) -> bool:
    return all(name.count("%s") <= 1 for name in ns._levels)


@settings(max_examples=400, deadline=None)
@given(expression)
def test_agrees_with_clustershell(text: str) -> None:
    try:
        ours: NodeSet | None = NodeSet.parse(text)
    except NodeSetError:
        ours = None
    # ClusterShell expands what we keep as ranges: keep its side small.
    assume(ours is None or len(ours) <= 20_000)
    theirs = clustershell(text)
    if theirs is None:
        # ClusterShell fails on spaces in a bracket followed by digits ("[0 - 1]0", it glues
        # the digits onto the text with the spaces); shoal reads those as without spaces.
        assume(not re.search(r" [^\]]*\]\d", text))
        assert ours is None, f"{text!r}: ClusterShell refuses it, shoal gives {ours}"
        return
    assert ours is not None, f"{text!r}: ClusterShell reads it as {theirs[1]}"
    assert set(ours) == theirs[0]
    assert len(ours) == len(theirs[0])
    assert NodeSet.parse(str(ours)) == ours
    if _one_slot(ours):  # nD folding is greedy in ClusterShell; there we compare sets only
        assert str(ours) == theirs[1]


@settings(max_examples=300, deadline=None)
@given(st.frozensets(st.text(alphabet="ab-019", min_size=1, max_size=6), max_size=30))
def test_folds_names_as_clustershell(members: frozenset[str]) -> None:
    ours = NodeSet(members)
    theirs = cs_nodeset.NodeSet.fromlist(sorted(members))
    assert set(theirs) == members
    if _one_slot(ours):
        assert str(ours) == str(theirs)
    assert list(ours) == list(NodeSet.parse(str(ours)))


nd_names = st.builds(lambda a, b, c: f"r{a}-n{b}" + (f"c{c}" if c else ""),
                     st.sampled_from(["1", "2", "01", "10"]), st.integers(0, 12),
                     st.sampled_from(["", "0", "1", "3"]))


@given(st.frozensets(nd_names, max_size=40), st.frozensets(nd_names, max_size=40))
def test_nd_algebra_matches_frozenset(x: frozenset[str], y: frozenset[str]) -> None:
    a, b = NodeSet(x), NodeSet(y)
    for ours, expected in ((a | b, x | y), (a & b, x & y), (a - b, x - y), (a ^ b, x ^ y)):
        assert set(ours) == expected
        assert ours == NodeSet(expected) and hash(ours) == hash(NodeSet(expected))
        assert NodeSet.parse(str(ours)) == ours
        assert len(ours) == len(expected)
        assert all(n in ours for n in expected) and "r1-n99" not in ours


def test_million_names_are_ranges_not_names() -> None:
    big = NodeSet.parse("artcore[1-1000000]-ib0")
    assert len(big) == 1_000_000
    assert str(big) == "artcore[1-1000000]-ib0"
    assert big.intervals() == 14  # per digit count: one interval, and the ib0 under it
    cut = big - NodeSet.parse("artcore[500000-500009]-ib0")
    assert len(cut) == 999_990 and str(cut) == "artcore[1-499999,500010-1000000]-ib0"
    grid = NodeSet.parse("x[1-1000]y[1-1000]")
    assert len(grid) == 1_000_000 and grid.intervals() <= 20
    assert "x500y999" in grid and "x500y1001" not in grid
    assert hash(grid) == hash(NodeSet.parse("x[1-500]y[1-1000],x[501-1000]y[1-1000]"))
