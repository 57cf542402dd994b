"""What the sessions reconciler decides, as a pure function of what it sees.

``plan`` takes the session records, the nodes, whether the view of the nodes can be trusted,
what this controller is placing already and the clock, and returns the actions to take; the
loop in ``shoal.controller.sessions`` gathers the inputs and applies the actions (each a
compare-and-set on one record, so a stale plan changes nothing it should not).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping

import msgspec

from ..wire import messages as m
from .sessionstate import FINAL, LIVE

STALE_PENDING = 10.0  # a pending record nobody is placing after this long gets placed


class Reschedule(msgspec.Struct, frozen=True):
    """A daemon (restart policy) on a node seen down: back to pending, placed elsewhere."""

    id: str
    node: str
    why: str


class Lose(msgspec.Struct, frozen=True):
    """A session without a restart policy on a node seen down: it ends as lost."""

    id: str
    node: str
    why: str


class Place(msgspec.Struct, frozen=True):
    """A pending record to offer to the nodes (rescheduled, waiting, or stale)."""

    id: str


class Purge(msgspec.Struct, frozen=True):
    """An ended record older than the retention: delete it and its output."""

    id: str


Action = Reschedule | Lose | Place | Purge


def plan(records: Iterable[m.SessionRecord], nodes: Mapping[str, m.NodeInfo], *,
         trusted: bool, placing: Collection[str], now: float,
         retention: float) -> list[Action]:
    """The actions for one pass. ``trusted``: the view of the nodes is fresh and settled
    (heard from some node lately, not just back from a NATS outage); without it, no node
    is judged down, since more likely we are cut off than they are dead. ``placing``: ids
    this controller is placing right now (never placed twice at once). ``now``: wall clock
    seconds, as in the records."""
    actions: list[Action] = []
    for r in records:
        node = nodes.get(r.node) if r.node else None
        if trusted and r.state in LIVE and node is not None and node.state == "down":
            if r.spec.restart != "never":
                actions.append(Reschedule(r.id, r.node, f"node {r.node} lost"))
            else:
                actions.append(Lose(r.id, r.node, f"node {r.node} lost"))
        elif r.state == "pending" and r.id not in placing and _due(r, now):
            actions.append(Place(r.id))
        elif r.state in FINAL and r.ended and now - r.ended > retention:
            actions.append(Purge(r.id))
    return actions


def _due(r: m.SessionRecord, now: float) -> bool:
    """A pending record is placed at once when requeued (rescheduled, or waiting for the
    view to settle); a new one is its creator's to place, unless nobody did for a while."""
    if r.requeued:
        return True
    return not r.node and now - max(r.created, r.ended) > STALE_PENDING
