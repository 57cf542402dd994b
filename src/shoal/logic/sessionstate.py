"""The session lifecycle as data: every legal transition is in one table, and every change
of a record goes through ``change`` (or ``reschedule``), which checks it.

    pending ──▶ starting ──▶ running ──▶ exited | killed | failed | lost
       │           │            │
       └───────────┴────────────┴──▶ failed | killed | lost   (could not start, ended early)
    running/starting ──▶ pending   only as a *reschedule* (``requeued="rescheduled"``): a
                                   daemon whose node was lost, drained or restarted
    pending ──▶ pending            with ``requeued="waiting"``: no verdict while the view of
                                   the nodes was not settled; placed again once it is
    running ──▶ starting          a restart on the same node (restart policy)

A final state never changes: a writer that finds a final state leaves it alone (``Final``).
docs/architecture.md draws this.
"""

from __future__ import annotations

from typing import Any

import msgspec

from ..errors import IllegalTransition
from ..wire.messages import SessionRecord, SessionState

__all__ = ["FINAL", "LIVE", "TRANSITIONS", "Final", "IllegalTransition", "attempt_nodes",
           "can_move", "change", "check", "check_record", "is_final", "placed", "reschedule"]

FINAL: frozenset[SessionState] = frozenset({"exited", "failed", "killed", "lost"})
LIVE: frozenset[SessionState] = frozenset({"pending", "starting", "running"})

TRANSITIONS: dict[SessionState, frozenset[SessionState]] = {
    "pending": frozenset({"starting", "failed", "killed", "lost"}),
    "starting": frozenset({"running", "pending", "exited", "failed", "killed", "lost"}),
    "running": frozenset({"starting", "pending", "exited", "failed", "killed", "lost"}),
    "exited": frozenset(),
    "failed": frozenset(),
    "killed": frozenset(),
    "lost": frozenset(),
}


class Final(Exception):
    """The record has already ended: a late writer (a kill racing the exit, a node lost
    after its session ended) has nothing to change. Not an error: the first end wins."""

    def __init__(self, record: SessionRecord) -> None:
        super().__init__(f"session {record.id} has already ended ({record.state})")
        self.record = record


def can_move(old: SessionState, new: SessionState) -> bool:
    return new in TRANSITIONS[old]


def check(old: SessionState, new: SessionState) -> None:
    if not can_move(old, new):
        raise IllegalTransition("", old, new)


def is_final(state: SessionState) -> bool:
    return state in FINAL


def check_record(old: SessionRecord, new: SessionRecord) -> None:
    """Raise ``IllegalTransition`` unless ``old`` may become ``new``: the state table, plus
    the rules the table cannot say (going back to pending is a reschedule, and only a
    pending record says why it is pending)."""
    if new.state != old.state and not can_move(old.state, new.state):
        raise IllegalTransition(old.id, old.state, new.state)
    if new.state == "pending" and old.state != "pending" and new.requeued != "rescheduled":
        raise IllegalTransition(old.id, old.state, new.state,
                                "only a reschedule puts a placed session back to pending")
    if new.state != "pending" and new.requeued:
        raise IllegalTransition(old.id, old.state, new.state,
                                f"requeued={new.requeued!r} is for pending records only")


def normalized(new: SessionRecord) -> SessionRecord:
    """``new`` with what only a pending record carries cleared once it leaves pending (an
    agent taking a rescheduled record writes starting and need not know the field)."""
    if new.state != "pending" and new.requeued:
        return msgspec.structs.replace(new, requeued="")
    return new


def change(record: SessionRecord, state: SessionState, now: float,
           **fields: Any) -> SessionRecord:
    """``record`` moved to ``state`` with ``fields`` set; ``ended`` is stamped with ``now``
    on reaching a final state. Raises ``Final`` if the record has ended already and
    ``IllegalTransition`` if the lifecycle does not allow the move."""
    if is_final(record.state):
        raise Final(record)
    if is_final(state):
        fields.setdefault("ended", now)
    if state != "pending":
        fields.setdefault("requeued", "")
    new = msgspec.structs.replace(record, state=state, **fields)
    check_record(record, new)
    return new


def reschedule(record: SessionRecord, why: str, output_bytes: int | None = None,
               ) -> SessionRecord:
    """The reschedule transition: back to pending, off its node, to be placed again at once
    (a daemon, restart policy other than "never"; its output goes on from ``output_bytes``).
    ``why`` is for people (the reason reads "rescheduling: WHY"); ``requeued`` is the flag."""
    if is_final(record.state):
        raise Final(record)
    if record.spec.restart == "never":
        raise IllegalTransition(record.id, record.state, "pending",
                                "a session with restart=never is not rescheduled")
    fields: dict[str, Any] = {} if output_bytes is None else {"output_bytes": output_bytes}
    new = msgspec.structs.replace(record, state="pending", requeued="rescheduled", node="",
                                  pid=0, ports=[], restarts=record.restarts + 1,
                                  reason=f"rescheduling: {why}",
                                  **fields)
    check_record(record, new)
    return new


def placed(record: SessionRecord, node: str) -> dict[str, Any]:
    """The fields of ``record`` placed on ``node``: its next attempt, and that attempt's node
    added to ``placements`` ("" for attempts made before it was kept)."""
    return {"node": node, "attempt": record.attempt + 1,
            "placements": [*attempt_nodes(record), node]}


def attempt_nodes(record: SessionRecord) -> list[str]:
    """The node of each attempt (index i-1 for attempt i), for output readers: the record's
    ``placements``, and its current node for the current attempt of a record placed before
    ``placements`` was kept."""
    nodes = list(record.placements[:record.attempt])
    nodes += [""] * (record.attempt - len(nodes))
    if record.attempt and record.node and not nodes[record.attempt - 1]:
        nodes[record.attempt - 1] = record.node
    return nodes
