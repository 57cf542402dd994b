"""Tests for shoal.logic.lines."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shoal.logic.lines import LineSplitter, prefix_lines, safe_text


def split_all(data: bytes, cuts: list[int], max_line: int) -> list[bytes]:
    """Feed ``data`` cut at the given offsets, then flush."""
    sp = LineSplitter(max_line)
    out: list[bytes] = []
    prev = 0
    for cut in [*sorted(cuts), len(data)]:
        out += sp.feed(data[prev:cut])
        prev = max(prev, cut)
    tail = sp.flush()
    if tail is not None:
        out.append(tail)
    return out


def test_feed_and_flush() -> None:
    sp = LineSplitter()
    assert sp.feed(b"a\nb") == [b"a\n"]
    assert sp.pending == 1
    assert sp.feed(b"c\n\nd") == [b"bc\n", b"\n"]
    assert sp.flush() == b"d"
    assert sp.flush() is None
    assert sp.feed(b"") == []


def test_long_lines_are_cut() -> None:
    sp = LineSplitter(max_line=4)
    assert sp.feed(b"abc\n") == [b"abc\n"]  # exactly max_line with newline: whole
    assert sp.feed(b"abcdefghij\nxy") == [b"abcd", b"efgh", b"ij\n"]
    assert sp.feed(b"zzzz") == [b"xyzz"]
    assert sp.flush() == b"zz"


def test_byte_at_a_time_long_partial_line() -> None:
    sp = LineSplitter(max_line=1000)
    out: list[bytes] = []
    for _ in range(999):
        out += sp.feed(b"x")
    assert out == [] and sp.pending == 999
    assert sp.feed(b"\n") == [b"x" * 999 + b"\n"]


def test_invalid_max_line() -> None:
    with pytest.raises(ValueError):
        LineSplitter(0)


def test_prefix_lines() -> None:
    assert prefix_lines("n1", [b"a\n", b"b"]) == b"n1: a\nn1: b\n"
    assert prefix_lines("n1", []) == b""


def test_safe_text() -> None:
    assert safe_text(b"caf\xc3\xa9") == "café"
    assert safe_text(b"\xff\xfe ok") == "\ufffd\ufffd ok"


@given(
    st.binary(max_size=200).map(lambda b: b.replace(b"a", b"\n")),
    st.lists(st.integers(0, 200), max_size=20),
    st.integers(1, 16),
)
def test_any_chunking_same_lines(data: bytes, cuts: list[int], max_line: int) -> None:
    whole = split_all(data, [], max_line)
    assert split_all(data, cuts, max_line) == whole
    assert b"".join(whole) == data
    assert all(len(piece) <= max_line for piece in whole)
    # Only the final piece may lack a newline unless it was cut at max_line.
    assert all(p.endswith(b"\n") or len(p) == max_line for p in whole[:-1])


@given(st.binary(max_size=300).map(lambda b: b.replace(b"\x00", b"\n")),
       st.lists(st.integers(0, 300), max_size=8), st.integers(1, 20))
def test_render_matches_feed(data: bytes, cuts: list[int], max_line: int) -> None:
    """``render`` gives exactly ``prefix_lines`` of what ``feed`` returns, for any chunking."""
    a, b = LineSplitter(max_line), LineSplitter(max_line)
    prev = 0
    for cut in [*sorted(cuts), len(data)]:
        chunk = data[prev:cut]
        prev = max(prev, cut)
        assert a.render(chunk, b"n1: ") == prefix_lines("n1", b.feed(chunk))
        assert a.pending == b.pending
    assert a.flush() == b.flush()


def test_render_long_binary_chunk() -> None:
    sp = LineSplitter(max_line=4)
    assert sp.render(b"abcdefghij", b"n: ") == b"n: abcd\nn: efgh\n"
    assert sp.render(b"k\nxy\nz", b"n: ") == b"n: ijk\nn: xy\n"
    assert sp.flush() == b"z"
