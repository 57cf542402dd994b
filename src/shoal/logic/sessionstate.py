"""The session state machine as data: every legal transition is in one table.

    pending ──▶ starting ──▶ running ──▶ exited | killed | failed | lost
       │           │            │
       └───────────┴────────────┴──▶ failed | killed | lost   (could not start, ended early)
    running/starting ──▶ pending   only to reschedule a daemon whose node was lost
    running ──▶ starting          a restart on the same node (restart policy)

A final state never changes: a writer that finds a final state leaves it alone.
"""

from __future__ import annotations

from ..wire.messages import SessionState

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


class IllegalTransition(Exception):
    def __init__(self, old: SessionState, new: SessionState) -> None:
        super().__init__(f"session cannot go from {old} to {new}")
        self.old = old
        self.new = new


def can_move(old: SessionState, new: SessionState) -> bool:
    return new in TRANSITIONS[old]


def check(old: SessionState, new: SessionState) -> None:
    if not can_move(old, new):
        raise IllegalTransition(old, new)


def is_final(state: SessionState) -> bool:
    return state in FINAL
