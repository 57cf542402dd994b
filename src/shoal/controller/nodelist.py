"""Listing nodes for people and tools at fleet scale (pure, no I/O): filters, pages in
natural name order, and the fleet summary that stands in for a 10,000-row table."""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Callable, Iterable, Sequence

from ..errors import ValidationError
from ..logic.nodeset import NaturalKey, NodeSet, NodeSetError, natural_key
from ..wire.messages import FleetSummary, NodeInfo

MAX_LABEL_VALUES = 20  # per label key in a summary; the rest are counted as "others"
NODE_STATES = ("ready", "draining", "down")


MAX_NAMES = 100_000  # a listing's node set names at most this many


def parse_nodeset(text: str) -> NodeSet:
    """A node set of at most ``MAX_NAMES`` names, parsed a top-level element at a time so
    that many large ranges (``a[1-99999],b[1-99999],...``) fail before they fill memory."""
    names: set[str] = set()
    try:
        for elem in _top_level(text):
            if not elem.strip():
                raise NodeSetError(f"empty element in {text[:200]!r}")
            names.update(NodeSet.parse(elem))
            if len(names) > MAX_NAMES:
                raise ValidationError(f"the node set names more than {MAX_NAMES:,} nodes")
        return NodeSet(names)
    except NodeSetError as e:
        raise ValidationError(f"bad node set {text[:200]!r}: {e}") from e


def _top_level(text: str) -> list[str]:
    """``text`` split at the commas outside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def matcher(state: str = "", text: str = "",
            names: NodeSet | None = None) -> Callable[[NodeInfo], bool]:
    """A test for the listing's filters: ``state``, a case-insensitive ``text`` found in the
    name, address, hostname or a ``key=value`` label, and membership of ``names``."""
    if state and state not in NODE_STATES:
        raise ValidationError(f"state must be one of {', '.join(NODE_STATES)}, not {state!r}")
    needle = text.lower()

    def match(n: NodeInfo) -> bool:
        if state and n.state != state:
            return False
        if names is not None and n.name not in names:
            return False
        if needle and not (needle in n.name.lower() or needle in n.address.lower()
                           or needle in n.hostname.lower()
                           or any(needle in f"{k}={v}".lower() for k, v in n.labels.items())):
            return False
        return True

    return match


def start_after(names: Sequence[str], keys: Sequence[NaturalKey], after: str) -> int:
    """Index of the first of ``names`` (sorted, with their ``keys``) that comes after
    ``after`` in natural order; ``after`` need not be a known name."""
    if not after:
        return 0
    return bisect.bisect_right(keys, natural_key(after))


def summarise(nodes: Iterable[NodeInfo]) -> FleetSummary:
    states: Counter[str] = Counter({s: 0 for s in NODE_STATES})
    versions: Counter[str] = Counter()
    network: Counter[str] = Counter()
    labels: dict[str, Counter[str]] = {}
    agents: set[tuple[str, int]] = set()
    hosts: set[str] = set()
    total = sessions = capacity = 0
    for n in nodes:
        total += 1
        states[n.state] += 1
        versions[n.version or "?"] += 1
        if n.state != "down":
            sessions += n.sessions
            capacity += n.capacity
            network[n.network or "?"] += 1
            agents.add((n.hostname, n.pid))
            hosts.add(n.hostname)
        for k, v in n.labels.items():
            labels.setdefault(k, Counter())[v] += 1
    shown: dict[str, dict[str, int]] = {}
    for k, counts in sorted(labels.items()):
        top = dict(counts.most_common(MAX_LABEL_VALUES))
        rest = sum(counts.values()) - sum(top.values())
        if rest:
            top["…others"] = rest
        shown[k] = top
    return FleetSummary(nodes=total, states=dict(states), sessions=sessions, capacity=capacity,
                        versions=dict(versions.most_common()), network=dict(network),
                        labels=shown, agents=len(agents), hosts=len(hosts))
