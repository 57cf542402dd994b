"""Immutable sets of node names with ClusterShell's node-set syntax and semantics.

``NodeSet.parse("node[1-3]-ib0,web[01-10/2]!web05")`` reads ranges (with steps), several
numeric positions per name, operators and node groups; ``str(nodeset)`` folds back into
ClusterShell's form, so ``NodeSet.parse(str(ns)) == ns`` always holds.

Representation: a name is a *pattern* (its text with every maximal digit run replaced by a
slot, ``node%s-ib%s``) and a vector of digit strings. A digit string ``t`` is the integer key
``int("1" + t)``, which keeps ``1``, ``01`` and ``001`` apart (they are different nodes) and
orders keys by (length, value) as ClusterShell does. Per pattern, the vectors form a *level*:
sorted, disjoint key intervals, each mapped to the level of the next slot (``None`` on the
last slot), with neighbours merged when they map to the same thing. That form is canonical
(equal sets have equal levels, so equality and hashing are structural) and holds ranges,
never expanded names: ``n[1-1000000]`` is a single interval.

Over 400 lines: ClusterShell's whole node-set grammar (ranges, steps, padding, nD folding,
operators) with its folding; groups are in nodegroups.py.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Iterable, Iterator

__all__ = ["MAX_EXPANSION", "GroupResolver", "NodeSet", "NodeSetError", "natural_key"]

# Bound on the values one bracket may list one by one (steps, digits after ']'), and on
# digits per number: a typo must fail fast instead of eating all memory.
MAX_EXPANSION = 100_000
MAX_DIGITS = 18
MAX_TEXT = 64 << 10

_NAME_RE = re.compile(r"[A-Za-z0-9._-]+")
_DIGITS_SPLIT_RE = re.compile(r"(\d+)")
_ITEM_RE = re.compile(r"\s*(\d+)\s*(?:-\s*(\d+)\s*(?:/\s*(\d+)\s*)?)?")
_GROUP_RE = re.compile(r"@(?:[A-Za-z0-9._-]+:)?(?:\*|[A-Za-z0-9._=:\[\],/-]+)")
_OPERATORS = ",!&^"

NaturalKey = tuple[tuple[tuple[str, int], ...], str]
# key interval (lo, hi) -> the level of the next slot; None on the last slot
Level = tuple[tuple[int, int, "Level | None"], ...]
# "@name" (without the @) -> the nodes of that group; raises NodeSetError if unknown
GroupResolver = Callable[[str], "NodeSet"]


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


# --------------------------------------------------------------------------- levels


def _key(digits: str) -> int:
    return int("1" + digits)


def _text(key: int) -> str:
    return str(key)[1:]


def _from_keys(keys: Iterable[int], sub: Level | None = None) -> Level:
    out: list[tuple[int, int, Level | None]] = []
    for k in sorted(set(keys)):
        if out and out[-1][1] + 1 == k:
            out[-1] = (out[-1][0], k, sub)
        else:
            out.append((k, k, sub))
    return tuple(out)


def _combine(a: Level, b: Level, keep: Callable[[bool, bool], bool]) -> Level:
    """One set operation on two levels: ``keep(in_a, in_b)`` says which vectors stay.

    A sweep over the cut points of both interval lists; where both sides cover a
    segment, their next levels are combined the same way (memoised: many segments
    share them)."""
    cuts = sorted({c for lo, hi, _ in (*a, *b) for c in (lo, hi + 1)})
    out: list[tuple[int, int, Level | None]] = []
    memo: dict[tuple[int, int], Level | None] = {}
    ia = ib = 0
    for start, stop in zip(cuts, cuts[1:], strict=False):
        while ia < len(a) and a[ia][1] < start:
            ia += 1
        while ib < len(b) and b[ib][1] < start:
            ib += 1
        in_a = ia < len(a) and a[ia][0] <= start
        in_b = ib < len(b) and b[ib][0] <= start
        if not (in_a or in_b):
            continue
        sub: Level | None
        if in_a and in_b:
            sa, sb = a[ia][2], b[ib][2]
            if sa is None or sb is None:  # the last slot: the operation decides
                if not keep(True, True):
                    continue
                sub = None
            else:  # the same prefix on both sides: the operation applies one slot down
                ident = (id(sa), id(sb))
                if ident not in memo:
                    memo[ident] = _combine(sa, sb, keep) or ()
                sub = memo[ident]
                if not sub:
                    continue
        elif keep(in_a, in_b):
            sub = a[ia][2] if in_a else b[ib][2]
        else:
            continue
        if out and out[-1][1] + 1 == start and out[-1][2] == sub:
            out[-1] = (out[-1][0], stop - 1, sub)
        else:
            out.append((start, stop - 1, sub))
    return tuple(out)


def _union(a: bool, b: bool) -> bool:
    return a or b


def _inter(a: bool, b: bool) -> bool:
    return a and b


def _diff(a: bool, b: bool) -> bool:
    return a and not b


def _xor(a: bool, b: bool) -> bool:
    return a != b


def _count(level: Level) -> int:
    return sum((hi - lo + 1) * (1 if sub is None else _count(sub)) for lo, hi, sub in level)


def _vectors(level: Level) -> Iterator[tuple[int, ...]]:
    for lo, hi, sub in level:
        for k in range(lo, hi + 1):
            if sub is None:
                yield (k,)
            else:
                for rest in _vectors(sub):
                    yield (k, *rest)


def _holds(level: Level | None, keys: list[int]) -> bool:
    for k in keys:
        if level is None:
            return False
        i = bisect.bisect_right(level, (k, float("inf"))) - 1
        if i < 0 or level[i][1] < k:
            return False
        level = level[i][2]
    return level is None


def _box(rangesets: list[Level]) -> Level:
    """The product of one key set per slot, as a level."""
    sub: Level | None = None
    for keys in reversed(rangesets):
        sub = tuple((lo, hi, sub) for lo, hi, _ in keys)
    assert sub is not None
    return sub


# --------------------------------------------------------------------------- folding


def _slices(level: Level) -> list[str]:
    """ClusterShell's text for one slot: keys in (length, value) order, consecutive values
    joined while padding allows (an unpadded run may grow longer, 9-10; a padded one keeps
    its width, 08-12)."""
    segments: list[tuple[int, int, int, bool]] = []  # length, first, last value, padded
    for lo, hi, _ in level:
        length = len(str(lo)) - 1
        base = 10**length
        first, last = lo - base, hi - base
        natural_from = 0 if length == 1 else 10 ** (length - 1)
        if first < natural_from:
            segments.append((length, first, min(last, natural_from - 1), True))
        if last >= natural_from:
            segments.append((length, max(first, natural_from), last, False))
    out: list[str] = []
    cur: list[int] = []  # start, last, width, padded
    for length, first, last, padded in segments:
        if cur and (length == cur[2] if cur[3] else not padded):
            if first == cur[1] + 1:
                cur[1] = last
                continue
            # A gap, not a padding change: ClusterShell carries the padding on (00,10-99
            # stays width 2 and so does not run on into 100).
            out.append(_slice_text(cur))
            cur = [first, last, cur[2], cur[3]]
            continue
        if cur:
            out.append(_slice_text(cur))
        cur = [first, last, length, int(padded)]
    if cur:
        out.append(_slice_text(cur))
    return out


def _slice_text(cur: list[int]) -> str:
    start, last, width, padded = cur
    pad = width if padded else 0
    if start == last:
        return f"{start:0{pad}d}"
    return f"{start:0{pad}d}-{last:0{pad}d}"


def _boxes(level: Level) -> Iterator[list[Level]]:
    """Cover a level with products: keys of this slot grouped by what follows them."""
    groups: dict[Level | None, list[tuple[int, int, None]]] = {}
    for lo, hi, sub in level:
        groups.setdefault(sub, []).append((lo, hi, None))
    for sub, keys in groups.items():
        if sub is None:
            yield [tuple(keys)]
        else:
            for rest in _boxes(sub):
                yield [tuple(keys), *rest]


def _fold_pattern(pattern: str, level: Level) -> Iterator[str]:
    if "%" not in pattern:
        yield pattern
        return
    for box in _boxes(level):
        parts = []
        for keys in box:
            items = _slices(keys)
            parts.append(items[0] if len(items) == 1 and "-" not in items[0]
                         else "[" + ",".join(items) + "]")
        yield pattern % tuple(parts)


# --------------------------------------------------------------------------- parsing


def _split_name(name: str) -> tuple[str, list[int]]:
    parts = _DIGITS_SPLIT_RE.split(name)
    digits = parts[1::2]
    if any(len(d) > MAX_DIGITS for d in digits):
        raise NodeSetError(f"number too long in {name!r}: at most {MAX_DIGITS} digits")
    return "%s".join(parts[::2]), [_key(d) for d in digits]


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise NodeSetError(f"invalid node name {name!r}: allowed characters are A-Z a-z 0-9 . _ -")
    return name


def _range_keys(item: str, where: str) -> list[tuple[int, int]]:
    """Key intervals of one bracket item: ``N``, ``N-M`` or ``N-M/STEP``."""
    m = _ITEM_RE.fullmatch(item)
    if m is None:
        if "/" in item and "-" not in item:
            raise NodeSetError(f"invalid step usage {item.strip()!r} {where}: a step needs a"
                               " range, as in 1-10/2")
        raise NodeSetError(f"invalid range {item.strip()!r} {where}: expected N, N-M or N-M/STEP")
    begin, end, step_s = m.groups()
    _digits_ok(begin, where)
    if end is None:
        return [(_key(begin), _key(begin))]
    _digits_ok(end, where)
    pad = len(begin) if (begin[0] == "0" and len(begin) > 1) else 0
    endpad = len(end) if (end[0] == "0" and int(end) != 0) else 0
    if (pad or endpad) and len(begin) != len(end):
        raise NodeSetError(f"padding length mismatch in {begin}-{end} {where}: both bounds need"
                           " the same number of digits when one starts with 0")
    lo, hi, step = int(begin), int(end), int(step_s or 1)
    if lo > hi:
        raise NodeSetError(f"reversed range {begin}-{end} {where}")
    if step < 1:
        raise NodeSetError(f"invalid step {step_s} {where}: it must be 1 or more")
    if step > 1:
        if (hi - lo) // step + 1 > MAX_EXPANSION:
            raise NodeSetError(f"{begin}-{end}/{step} {where} lists more than {MAX_EXPANSION}"
                               " values")
        return [(k, k) for k in (_key(f"{v:0{pad}d}") for v in range(lo, hi + 1, step))]
    if pad:
        return [(_key(begin), _key(end))]
    out = []
    length = len(str(lo))
    while lo <= hi:  # unpadded: one interval per digit count
        top = min(hi, 10**length - 1)
        out.append((_key(str(lo)), _key(str(top))))
        lo, length = top + 1, length + 1
    return out


def _digits_ok(text: str, where: str) -> bool:
    if len(text) > MAX_DIGITS:
        raise NodeSetError(f"number too long {where}: at most {MAX_DIGITS} digits")
    return True


def _items(items: Iterable[str], where: str) -> Level:
    level: Level = ()
    for item in items:
        if not item.strip():
            raise NodeSetError(f"empty range {where}")
        level = _combine(level, tuple((lo, hi, None) for lo, hi in _range_keys(item, where)),
                         _union)
    return level


def _bracket(body: str, prefix: str, suffix: str, where: str) -> Level:
    """One bracket's keys. Digits written right after it are appended to both bounds of
    every item (``[1-2]0`` is ``10-20/10``); digits right before it are prepended to the
    bounds of each contiguous piece (``0[7-10]`` is ``07-010``, a padding mismatch), which
    is how ClusterShell reads them."""
    items = body.split(",")
    if suffix:
        if "/" in body:
            raise NodeSetError(f"illegal trailing digits {suffix!r} after a range with a step"
                               f" {where}")
        step = "/1" + "0" * len(suffix)
        items = [("-".join(b.strip() + suffix for b in it.split("-")) + step) if "-" in it
                 else it.strip() + suffix for it in items if it.strip()] or [""]
    level = _items(items, where)
    if prefix:
        level = _items(("-".join(prefix + b for b in piece.split("-"))
                        for piece in _slices(level)), where)
    return level


def _element(elem: str, at: int, text: str) -> tuple[str, Level]:
    """One operand without operators or groups, e.g. ``rack[1-2]-n[1-3]x5``."""
    where = f"at position {at} in {text!r}"
    pieces: list[str] = []  # literal text between brackets
    bodies: list[str] = []
    pos = 0
    while True:
        open_at = elem.find("[", pos)
        if open_at < 0:
            pieces.append(elem[pos:])
            break
        close_at = elem.find("]", open_at)  # balance checked by the operator scan
        pieces.append(elem[pos:open_at])
        bodies.append(elem[open_at + 1:close_at])
        pos = close_at + 1
    for i, literal in enumerate(pieces):
        if 0 < i < len(pieces) - 1 and (literal.isdigit() or not literal):
            raise NodeSetError(f"illegal reopening bracket after {literal!r} {where}: two"
                               " ranges need a non-digit between them, as in n[1-2]-[3-4]")
        if literal and not _NAME_RE.fullmatch(literal):
            bad = "".join(sorted({c for c in literal if not _NAME_RE.fullmatch(c)}))
            raise NodeSetError(f"invalid character(s) {bad!r} {where}: allowed are A-Z a-z"
                               " 0-9 . _ - and the operators , ! & ^")
    if not bodies:
        pattern, keys = _split_name(elem)
        return pattern, _box([((k, k, None),) for k in keys]) if keys else ((0, 0, None),)
    # Each literal splits into digit runs; a run touching a bracket belongs to that bracket.
    split = [_DIGITS_SPLIT_RE.split(literal) for literal in pieces]  # text, digits, ..., text
    suffixes = [""] * len(bodies)
    prefixes = [""] * len(bodies)
    for i, parts in enumerate(split):
        if i > 0 and len(parts) > 1 and parts[0] == "":
            suffixes[i - 1] = parts[1]
            parts = split[i] = parts[2:]
        if i < len(bodies) and len(parts) > 1 and parts[-1] == "":
            prefixes[i] = parts[-2]
            split[i] = parts[:-2]
    pattern_parts: list[str] = []
    slots: list[Level] = []
    for i, parts in enumerate(split):
        for j, part in enumerate(parts):
            if j % 2:
                _digits_ok(part, where)
                slots.append(((_key(part), _key(part), None),))
                pattern_parts.append("%s")
            else:
                pattern_parts.append(part)
        if i < len(bodies):
            slots.append(_bracket(bodies[i], prefixes[i], suffixes[i], where))
            pattern_parts.append("%s")
    return "".join(pattern_parts), _box(slots)


def _scan(text: str) -> list[tuple[str, str, int]]:
    """Split on top-level operators: [(operator before, operand, its position)]."""
    out: list[tuple[str, str, int]] = []
    depth = 0
    start = 0
    op = ","
    for i, ch in enumerate(text):
        if ch == "[":
            if depth:
                raise NodeSetError(f"nested '[' at position {i} in {text!r}")
            depth = 1
        elif ch == "]":
            if not depth:
                raise NodeSetError(f"unbalanced ']' at position {i} in {text!r}")
            depth = 0
        elif ch in _OPERATORS and not depth:
            out.append((op, text[start:i], start))
            op, start = ch, i + 1
    if depth:
        raise NodeSetError(f"unclosed '[' in {text!r}")
    out.append((op, text[start:], start))
    for i, (op, operand, at) in enumerate(out):
        if not operand.strip():
            shown = op if i else out[1][0] if len(out) > 1 else ","
            raise NodeSetError(f"missing node set operand with {shown!r} at position {at} in"
                               f" {text!r}")
    return out


_KEEP = {",": _union, "&": _inter, "!": _diff, "^": _xor}


class NodeSet:
    """Immutable, hashable set of node names; iterates in ClusterShell's order (by pattern,
    then by each number's length and value)."""

    __slots__ = ("_levels", "_text", "_len")

    _levels: dict[str, Level]
    _text: str | None
    _len: int | None

    def __init__(self, names: Iterable[str] = ()) -> None:
        if isinstance(names, str):
            # Iterating a str would silently yield single characters.
            raise TypeError("NodeSet() takes an iterable of names; use NodeSet.parse() for text")
        if isinstance(names, NodeSet):
            levels = names._levels
        else:
            levels = _levels_of(names)
        object.__setattr__(self, "_levels", levels)
        object.__setattr__(self, "_text", None)
        object.__setattr__(self, "_len", None)

    @classmethod
    def _wrap(cls, levels: dict[str, Level]) -> NodeSet:
        ns = cls.__new__(cls)
        object.__setattr__(ns, "_levels", {p: lv for p, lv in levels.items() if lv})
        object.__setattr__(ns, "_text", None)
        object.__setattr__(ns, "_len", None)
        return ns

    @classmethod
    def parse(cls, text: str, groups: GroupResolver | None = None) -> NodeSet:
        """Parse node set text; blank text gives an empty set.

        ``node[1-8,12]``, ``web[01-10/2]``, ``rack[1-2]-n[1-3]``, operators applied left to
        right as in ClusterShell (``,`` union, ``!`` difference, ``&`` intersection, ``^``
        symmetric difference), and ``@group`` operands looked up with ``groups``."""
        if len(text) > MAX_TEXT:
            raise NodeSetError(f"node set text longer than {MAX_TEXT} characters")
        if not text.strip():
            return cls._wrap({})
        result = cls._wrap({})
        for op, raw, at in _scan(text):
            operand = raw.strip()
            at += len(raw) - len(raw.lstrip())
            if operand.startswith("@"):
                value = _group(operand, at, text, groups)
            else:
                pattern, level = _element(operand, at, text)
                value = cls._wrap({pattern: level})
            result = result._apply(value, _KEEP[op])
        return result

    def _apply(self, other: NodeSet, keep: Callable[[bool, bool], bool]) -> NodeSet:
        levels = dict(self._levels)
        for pattern in set(self._levels) | set(other._levels):
            levels[pattern] = _combine(self._levels.get(pattern, ()),
                                       other._levels.get(pattern, ()), keep)
        return self._wrap(levels)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("NodeSet is immutable")

    # --- container protocol -------------------------------------------------

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            return False
        pattern, keys = _split_name(name)
        level = self._levels.get(pattern)
        if level is None:
            return False
        return _holds(level, keys or [0])

    def __len__(self) -> int:
        if self._len is None:
            object.__setattr__(self, "_len", sum(map(_count, self._levels.values())))
        assert self._len is not None
        return self._len

    def __bool__(self) -> bool:
        return bool(self._levels)

    def __iter__(self) -> Iterator[str]:
        for pattern in sorted(self._levels):
            if "%" not in pattern:
                yield pattern
                continue
            for vector in _vectors(self._levels[pattern]):
                yield pattern % tuple(map(_text, vector))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, NodeSet):
            return NotImplemented
        return self._levels == other._levels

    def __hash__(self) -> int:
        return hash(frozenset(self._levels.items()))

    def __str__(self) -> str:
        if self._text is None:
            parts = [t for p in sorted(self._levels) for t in _fold_pattern(p, self._levels[p])]
            object.__setattr__(self, "_text", ",".join(parts))
        assert self._text is not None
        return self._text

    def __repr__(self) -> str:
        return f"NodeSet.parse({str(self)!r})"

    def patterns(self) -> int:
        """How many distinct patterns (names with their numbers taken out) the set holds."""
        return len(self._levels)

    def intervals(self) -> int:
        """Size of the stored form (key intervals, all levels): what a set costs to keep."""
        def size(level: Level) -> int:
            return sum(1 + (0 if sub is None else size(sub)) for _, _, sub in level)
        return sum(map(size, self._levels.values()))

    # --- set algebra --------------------------------------------------------

    @staticmethod
    def _of(other: Iterable[str]) -> NodeSet:
        return other if isinstance(other, NodeSet) else NodeSet(other)

    def union(self, *others: Iterable[str]) -> NodeSet:
        out = self
        for o in others:
            out = out._apply(self._of(o), _union)
        return out

    def intersection(self, *others: Iterable[str]) -> NodeSet:
        out = self
        for o in others:
            out = out._apply(self._of(o), _inter)
        return out

    def difference(self, *others: Iterable[str]) -> NodeSet:
        out = self
        for o in others:
            out = out._apply(self._of(o), _diff)
        return out

    def symmetric_difference(self, other: Iterable[str]) -> NodeSet:
        return self._apply(self._of(other), _xor)

    def issubset(self, other: Iterable[str]) -> bool:
        return not self._apply(self._of(other), _diff)

    def issuperset(self, other: Iterable[str]) -> bool:
        return self._of(other).issubset(self)

    def isdisjoint(self, other: Iterable[str]) -> bool:
        return not self._apply(self._of(other), _inter)

    def __or__(self, other: object) -> NodeSet:
        if not isinstance(other, NodeSet):
            return NotImplemented
        return self._apply(other, _union)

    def __and__(self, other: object) -> NodeSet:
        if not isinstance(other, NodeSet):
            return NotImplemented
        return self._apply(other, _inter)

    def __sub__(self, other: object) -> NodeSet:
        if not isinstance(other, NodeSet):
            return NotImplemented
        return self._apply(other, _diff)

    def __xor__(self, other: object) -> NodeSet:
        if not isinstance(other, NodeSet):
            return NotImplemented
        return self._apply(other, _xor)

    def __le__(self, other: object) -> bool:
        if not isinstance(other, NodeSet):
            return NotImplemented
        return self.issubset(other)

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, NodeSet):
            return NotImplemented
        return self != other and self.issubset(other)

    def __ge__(self, other: object) -> bool:
        if not isinstance(other, NodeSet):
            return NotImplemented
        return other.issubset(self)

    def __gt__(self, other: object) -> bool:
        if not isinstance(other, NodeSet):
            return NotImplemented
        return self != other and other.issubset(self)


def _levels_of(names: Iterable[str]) -> dict[str, Level]:
    """Levels from explicit names: vectors grouped by pattern, then built slot by slot."""
    by_pattern: dict[str, list[list[int]]] = {}
    for name in names:
        _check_name(name)
        pattern, keys = _split_name(name)
        by_pattern.setdefault(pattern, []).append(keys)
    return {p: _build(vectors) if "%" in p else ((0, 0, None),)
            for p, vectors in by_pattern.items()}


def _build(vectors: list[list[int]]) -> Level:
    if len(vectors[0]) == 1:
        return _from_keys(v[0] for v in vectors)
    by_first: dict[int, list[list[int]]] = {}
    for v in vectors:
        by_first.setdefault(v[0], []).append(v[1:])
    out: list[tuple[int, int, Level | None]] = []
    for k in sorted(by_first):
        sub = _build(by_first[k])
        if out and out[-1][1] + 1 == k and out[-1][2] == sub:
            out[-1] = (out[-1][0], k, sub)
        else:
            out.append((k, k, sub))
    return tuple(out)


def _group(operand: str, at: int, text: str, groups: GroupResolver | None) -> NodeSet:
    where = f"at position {at} in {text!r}"
    if not _GROUP_RE.fullmatch(operand):
        raise NodeSetError(f"invalid group {operand!r} {where}: expected @name, @source:name"
                           " or @key=value")
    if groups is None:
        raise NodeSetError(f"node group {operand!r} {where} cannot be resolved here: groups come"
                           " from the controller's groups file and node labels")
    name = operand[1:]
    source, _, base = name.rpartition(":") if ":" in name else ("", "", name)
    if "[" in base:  # @rack[1-2] is @rack1,@rack2
        out = NodeSet()
        for each in NodeSet.parse(base):
            out = out | groups(f"{source}:{each}" if source else each)
        return out
    return groups(name)
