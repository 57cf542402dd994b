"""Immutable sets of node names with ClusterShell-like range syntax.

``NodeSet.parse("node[1-3,5],web[01-02]")`` expands bracket ranges into names and
``str(nodeset)`` folds them back into the shortest range form, so that
``NodeSet.parse(str(ns)) == ns`` always holds.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Iterator

__all__ = ["MAX_EXPANSION", "NodeSet", "NodeSetError", "natural_key"]

# Upper bound on the names one element may expand to: a typo such as
# node[1-100000000] must fail fast instead of eating all memory.
MAX_EXPANSION = 100_000

_NAME_RE = re.compile(r"[A-Za-z0-9._-]+")
_LITERAL_RE = re.compile(r"[A-Za-z0-9._-]*")
_RANGE_ITEM_RE = re.compile(r"(\d+)(?:-(\d+))?")
_DIGITS_SPLIT_RE = re.compile(r"(\d+)")
# A lazy prefix plus a digit-free tail make group 2 the *last* digit run.
_LAST_DIGITS_RE = re.compile(r"(.*?)(\d+)(\D*)")

NaturalKey = tuple[tuple[tuple[str, int], ...], str]


class NodeSetError(ValueError):
    """Raised for node set text or node names that cannot be parsed."""


def natural_key(name: str) -> NaturalKey:
    """Sort key ordering embedded numbers by value: node2 before node10.

    Every text run is paired with the number following it (-1 when none), so all
    tuple positions hold the same types and compare cleanly; the name itself is
    the final tie-breaker (node01 vs node1) to keep the order total.
    """
    parts = _DIGITS_SPLIT_RE.split(name)
    pairs = [(parts[i], int(parts[i + 1])) for i in range(0, len(parts) - 1, 2)]
    pairs.append((parts[-1], -1))
    return (tuple(pairs), name)


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise NodeSetError(f"invalid node name {name!r}: allowed characters are A-Z a-z 0-9 . _ -")
    return name


def _split_top(text: str) -> list[str]:
    """Split on commas outside brackets, checking bracket balance on the way."""
    elements: list[str] = []
    depth = 0
    start = 0
    for i, ch in enumerate(text):
        if ch == "[":
            if depth:
                raise NodeSetError(f"nested '[' at position {i} in {text!r}")
            depth = 1
        elif ch == "]":
            if not depth:
                raise NodeSetError(f"unbalanced ']' at position {i} in {text!r}")
            depth = 0
        elif ch == "," and not depth:
            elements.append(text[start:i])
            start = i + 1
    if depth:
        raise NodeSetError(f"unclosed '[' in {text!r}")
    elements.append(text[start:])
    return elements


def _expand_range(body: str, elem: str) -> list[str]:
    """Expand the inside of one bracket group, e.g. ``01-03,7``."""
    values: list[str] = []
    for raw in body.split(","):
        item = raw.strip()
        if not item:
            raise NodeSetError(f"empty range item in {elem!r}")
        m = _RANGE_ITEM_RE.fullmatch(item)
        if m is None:
            raise NodeSetError(f"invalid range {item!r} in {elem!r}: expected N or N-M digits")
        lo_s, hi_s = m.group(1), m.group(2)
        if hi_s is None:
            values.append(lo_s)
            continue
        lo, hi = int(lo_s), int(hi_s)
        if lo > hi:
            raise NodeSetError(f"reversed range {item!r} in {elem!r}")
        if hi - lo + 1 + len(values) > MAX_EXPANSION:
            raise NodeSetError(
                f"range {item!r} in {elem!r} expands to more than {MAX_EXPANSION} names"
            )
        # A leading zero on the lower bound fixes the width (web[01-10]).
        width = len(lo_s) if len(lo_s) > 1 and lo_s[0] == "0" else 0
        values.extend(str(n).zfill(width) for n in range(lo, hi + 1))
    return values


def _expand(elem: str) -> list[str]:
    """Expand one comma-free element such as ``rack[1-2]-n[1-3]``."""
    segments: list[list[str]] = []
    total = 1
    pos = 0
    while pos < len(elem):
        open_at = elem.find("[", pos)
        literal = elem[pos:] if open_at < 0 else elem[pos:open_at]
        if not _LITERAL_RE.fullmatch(literal):
            bad = sorted({c for c in literal if not _NAME_RE.fullmatch(c)})
            raise NodeSetError(f"invalid character(s) {''.join(bad)!r} in {elem!r}")
        if literal:
            segments.append([literal])
        if open_at < 0:
            break
        close_at = elem.find("]", open_at)  # balance already checked by _split_top
        body = elem[open_at + 1 : close_at]
        values = _expand_range(body, elem)
        total *= len(values)
        if total > MAX_EXPANSION:
            raise NodeSetError(f"{elem!r} expands to more than {MAX_EXPANSION} names")
        segments.append(values)
        pos = close_at + 1
    return ["".join(parts) for parts in itertools.product(*segments)]


def _fold_numbers(digits: list[str]) -> list[str]:
    """Fold digit strings sharing a prefix/suffix into bracket items like ``01-03``.

    Each string goes to a width class: zero-padded strings to their own length,
    unpadded ones to the widest padded class they fit (so web01..web10 stay one
    range) or to class 0.  Within a class the text of every number is
    ``str(n).zfill(width)``, so consecutive numbers fold into ranges that parse back
    to exactly the same strings.
    """
    padded = {len(s) for s in digits if len(s) > 1 and s[0] == "0"}
    classes: dict[int, set[int]] = {}
    for s in digits:
        if len(s) > 1 and s[0] == "0":
            width = len(s)
        else:
            width = max((w for w in padded if w <= len(s)), default=0)
        classes.setdefault(width, set()).add(int(s))
    items: list[tuple[int, int, str]] = []
    for width, numbers in classes.items():
        ordered = sorted(numbers)
        run_start = prev = ordered[0]
        for n in [*ordered[1:], None]:
            if n is not None and n == prev + 1:
                prev = n
                continue
            lo, hi = str(run_start).zfill(width), str(prev).zfill(width)
            items.append((run_start, width, lo if run_start == prev else f"{lo}-{hi}"))
            if n is not None:
                run_start = prev = n
    items.sort()
    return [text for _, _, text in items]


def _fold(names: Iterable[str]) -> str:
    """Shortest range form: names grouped by text around their last digit run."""
    buckets: dict[tuple[str, str], list[str]] = {}
    groups: list[tuple[NaturalKey, str]] = []
    for name in names:
        m = _LAST_DIGITS_RE.fullmatch(name)
        if m is None:
            groups.append((natural_key(name), name))
        else:
            buckets.setdefault((m.group(1), m.group(3)), []).append(m.group(2))
    for (prefix, suffix), digits in buckets.items():
        # Same prefix and suffix: ordering by (value, text) equals natural order.
        first = prefix + min(digits, key=lambda d: (int(d), d)) + suffix
        if len(digits) == 1:
            groups.append((natural_key(first), first))
        else:
            body = ",".join(_fold_numbers(digits))
            groups.append((natural_key(first), f"{prefix}[{body}]{suffix}"))
    groups.sort()
    return ",".join(text for _, text in groups)


class NodeSet:
    """Immutable, hashable set of node names; iterates in natural sort order."""

    __slots__ = ("_names", "_sorted", "_text")

    _names: frozenset[str]
    _sorted: tuple[str, ...] | None
    _text: str | None

    def __init__(self, names: Iterable[str] = ()) -> None:
        if isinstance(names, str):
            # Iterating a str would silently yield single characters.
            raise TypeError("NodeSet() takes an iterable of names; use NodeSet.parse() for text")
        if isinstance(names, NodeSet):
            frozen = names._names
        else:
            frozen = frozenset(names)
            for name in frozen:
                _check_name(name)
        object.__setattr__(self, "_names", frozen)
        object.__setattr__(self, "_sorted", None)
        object.__setattr__(self, "_text", None)

    @classmethod
    def _wrap(cls, names: frozenset[str]) -> NodeSet:
        # Results of set algebra on valid sets are valid: skip re-validation.
        ns = cls.__new__(cls)
        object.__setattr__(ns, "_names", names)
        object.__setattr__(ns, "_sorted", None)
        object.__setattr__(ns, "_text", None)
        return ns

    @classmethod
    def parse(cls, text: str) -> NodeSet:
        """Parse ``node[1-8,12],web[01-10],other``; blank text gives an empty set."""
        if not text.strip():
            return cls._wrap(frozenset())
        names: set[str] = set()
        for raw in _split_top(text):
            elem = raw.strip()
            if not elem:
                raise NodeSetError(f"empty element in {text!r}")
            names.update(_expand(elem))
        return cls._wrap(frozenset(names))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("NodeSet is immutable")

    # --- container protocol -------------------------------------------------

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __len__(self) -> int:
        return len(self._names)

    def __bool__(self) -> bool:
        return bool(self._names)

    def __iter__(self) -> Iterator[str]:
        if self._sorted is None:
            object.__setattr__(self, "_sorted", tuple(sorted(self._names, key=natural_key)))
        assert self._sorted is not None
        return iter(self._sorted)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, NodeSet):
            return NotImplemented
        return self._names == other._names

    def __hash__(self) -> int:
        return hash(self._names)

    def __str__(self) -> str:
        if self._text is None:
            object.__setattr__(self, "_text", _fold(self._names))
        assert self._text is not None
        return self._text

    def __repr__(self) -> str:
        return f"NodeSet.parse({str(self)!r})"

    # --- set algebra --------------------------------------------------------

    @staticmethod
    def _names_of(other: Iterable[str]) -> frozenset[str]:
        return other._names if isinstance(other, NodeSet) else NodeSet(other)._names

    def union(self, *others: Iterable[str]) -> NodeSet:
        return self._wrap(self._names.union(*(self._names_of(o) for o in others)))

    def intersection(self, *others: Iterable[str]) -> NodeSet:
        return self._wrap(self._names.intersection(*(self._names_of(o) for o in others)))

    def difference(self, *others: Iterable[str]) -> NodeSet:
        return self._wrap(self._names.difference(*(self._names_of(o) for o in others)))

    def symmetric_difference(self, other: Iterable[str]) -> NodeSet:
        return self._wrap(self._names.symmetric_difference(self._names_of(other)))

    def issubset(self, other: Iterable[str]) -> bool:
        return self._names.issubset(self._names_of(other))

    def issuperset(self, other: Iterable[str]) -> bool:
        return self._names.issuperset(self._names_of(other))

    def isdisjoint(self, other: Iterable[str]) -> bool:
        return self._names.isdisjoint(self._names_of(other))

    def __or__(self, other: object) -> NodeSet:
        if not isinstance(other, NodeSet):
            return NotImplemented
        return self._wrap(self._names | other._names)

    def __and__(self, other: object) -> NodeSet:
        if not isinstance(other, NodeSet):
            return NotImplemented
        return self._wrap(self._names & other._names)

    def __sub__(self, other: object) -> NodeSet:
        if not isinstance(other, NodeSet):
            return NotImplemented
        return self._wrap(self._names - other._names)

    def __xor__(self, other: object) -> NodeSet:
        if not isinstance(other, NodeSet):
            return NotImplemented
        return self._wrap(self._names ^ other._names)

    def __le__(self, other: object) -> bool:
        if not isinstance(other, NodeSet):
            return NotImplemented
        return self._names <= other._names

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, NodeSet):
            return NotImplemented
        return self._names < other._names

    def __ge__(self, other: object) -> bool:
        if not isinstance(other, NodeSet):
            return NotImplemented
        return self._names >= other._names

    def __gt__(self, other: object) -> bool:
        if not isinstance(other, NodeSet):
            return NotImplemented
        return self._names > other._names
