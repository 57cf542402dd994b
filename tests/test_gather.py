"""Tests for shoal.logic.gather."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shoal.logic.gather import OutputGatherer
from shoal.logic.nodeset import NodeSet, NodeSetError


def as_text(groups: list[tuple[bytes, NodeSet]]) -> list[tuple[bytes, str]]:
    return [(data, str(ns)) for data, ns in groups]


def test_groups_identical_outputs() -> None:
    g = OutputGatherer()
    for i in (10, 2, 1, 3):
        g.add(f"node{i}", b"hello ")
        g.add(f"node{i}", b"world\n")
    g.add("node5", b"other\n")
    for node in ("node1", "node2", "node3", "node5"):
        g.finish(node)
    assert as_text(g.groups()) == [
        (b"hello world\n", "node[1-3,10]"),
        (b"other\n", "node5"),
    ]


def test_chunk_boundaries_do_not_matter() -> None:
    g = OutputGatherer()
    g.add("a", b"abc")
    g.add("b", b"a")
    g.add("b", b"bc")
    g.finish("a")
    g.finish("b")
    assert as_text(g.groups()) == [(b"abc", "a,b")]


def test_empty_outputs_still_listed() -> None:
    g = OutputGatherer()
    g.add("n1", b"")
    g.finish("n2")
    g.add("n3", b"x")
    assert as_text(g.groups()) == [(b"", "n[1-2]"), (b"x", "n3")]


def test_order_by_first_node_natural() -> None:
    g = OutputGatherer()
    g.add("n10", b"a")
    g.add("n9", b"b")
    g.add("n2", b"c")
    g.add("n11", b"a")
    assert [str(ns) for _, ns in g.groups()] == ["n2", "n9", "n[10-11]"]


def test_finished_outputs_shared() -> None:
    g = OutputGatherer()
    for i in range(100):
        g.add(f"n{i}", b"same output" * 10)
        g.finish(f"n{i}")
    g.finish("n0")  # idempotent
    assert len(g._outputs) == 1
    assert not g._pending
    [(data, ns)] = g.groups()
    assert data == b"same output" * 10 and len(ns) == 100


def test_add_after_finish_reopens() -> None:
    g = OutputGatherer()
    g.add("a", b"1")
    g.finish("a")
    g.add("a", b"2")
    assert g.output("a") == b"12"
    assert not g._outputs  # the stale copy was dropped
    g.finish("a")
    assert as_text(g.groups()) == [(b"12", "a")]


def test_finish_all_nodes_and_output() -> None:
    g = OutputGatherer()
    g.add("b", b"x")
    g.add("a", b"y")
    g.finish_all()
    assert not g._pending
    assert str(g.nodes()) == "a,b"
    assert g.output("a") == b"y" and g.output("zz") == b""


def test_invalid_node_rejected_early() -> None:
    g = OutputGatherer()
    with pytest.raises(NodeSetError):
        g.add("bad node", b"x")
    with pytest.raises(NodeSetError):
        g.finish("bad/node")


@given(
    st.lists(
        st.tuples(st.sampled_from(["n1", "n2", "n3", "n10"]), st.binary(max_size=4)),
        max_size=30,
    ),
    st.sets(st.sampled_from(["n1", "n2", "n3", "n10"])),
)
def test_groups_match_reference(chunks: list[tuple[str, bytes]], finished: set[str]) -> None:
    g = OutputGatherer()
    ref: dict[str, bytes] = {}
    for node, data in chunks:
        g.add(node, data)
        ref[node] = ref.get(node, b"") + data
    for node in finished:
        g.finish(node)
        ref.setdefault(node, b"")
    expected: dict[bytes, set[str]] = {}
    for node, data in ref.items():
        expected.setdefault(data, set()).add(node)
    got = g.groups()
    assert {data: set(ns) for data, ns in got} == expected
    assert len(got) == len(expected)
    firsts = [next(iter(ns)) for _, ns in got]
    assert firsts == list(NodeSet(firsts))
