"""What an agent reports to the controllers on its own subjects (``shoal.report.<node>.*``),
for them to apply after checking that the record names that node.

Agents never touch session records: the controllers own them. A node says what happened to
its sessions (``SessionReport`` on ``shoal.report.<node>.session``, a request the controllers
answer with ``SessionReportReply``) and the controller writes it by compare-and-set, only
while the record still names that node and that attempt (its fence).
"""

from __future__ import annotations

from typing import Literal

import msgspec
from msgspec import UNSET, Struct, UnsetType

# What an agent may move its own session to (pending is a ``SessionReschedule``; lost is
# the controllers' verdict, or a ``SessionDropped``).
AgentState = Literal["starting", "running", "exited", "failed", "killed"]
Refusal = Literal["", "fenced", "not_yours", "illegal", "bad"]


class OutputTrim(Struct, frozen=True):
    """Drop the session's stored output before stream sequence ``keep`` (its output cap)."""

    session: str
    keep: int


class OutputWhere(Struct, frozen=True):
    """Request (reply: ``OutputWhereReply``): where the output of attempt ``epoch`` of the
    session stands, for its writer to go on from (a node credential may not read the
    output stream itself). Answered only while the record names the asking node and
    ``epoch`` is its current attempt."""

    session: str
    epoch: int


class OutputLast(Struct, frozen=True):
    """The stored end of a session's output. ``seq``: the stream sequence of its last chunk
    under any node's name (what a fenced publish expects); the rest describe its last chunk
    that readers believe (``outputtrust``): ``end`` is where the next byte goes."""

    seq: int = 0
    end: int = 0
    chunk_seq: int = 0
    node: str = ""
    epoch: int = 0
    stream: str = ""
    offset: int = 0


class OutputWhereReply(Struct, frozen=True):
    ok: bool
    last: OutputLast = OutputLast()
    reason: str = ""  # when not ok: the session is not this node's attempt (fenced)


class SessionMove(Struct, frozen=True, tag="move"):
    """This node's placement ``attempt`` of ``session`` reached ``state``; the fields set
    are written with it (the ones left unset are kept)."""

    session: str
    attempt: int
    state: AgentState
    pid: int | UnsetType = UNSET
    started: float | UnsetType = UNSET
    restarts: int | UnsetType = UNSET
    user: str | UnsetType = UNSET
    exit_code: int | None | UnsetType = UNSET
    signal: int | None | UnsetType = UNSET
    reason: str | UnsetType = UNSET
    output_bytes: int | UnsetType = UNSET


class SessionReschedule(Struct, frozen=True, tag="reschedule"):
    """A daemon this node ends to run elsewhere (drained, the agent stopping, a reschedule
    asked for): back to pending, its output going on from ``output_bytes``."""

    session: str
    attempt: int
    why: str
    output_bytes: int | None = None


class SessionDropped(Struct, frozen=True, tag="dropped"):
    """This node does not run the placement the record names (the controller's go came to
    an agent that had restarted since it offered): a daemon is rescheduled, else lost."""

    session: str
    attempt: int
    why: str


class SessionsRestarted(Struct, frozen=True, tag="restarted"):
    """The agent of this node started afresh and runs none of its sessions: every live
    record naming the node is a leftover (daemons rescheduled, the rest lost)."""


class SessionsCheck(Struct, frozen=True, tag="check"):
    """Which of these (session -> attempt) are still this node's? (after a partition, or a
    go that never came)."""

    sessions: dict[str, int]


SessionReport = SessionMove | SessionReschedule | SessionDropped | SessionsRestarted \
    | SessionsCheck


class SessionReportReply(Struct, frozen=True):
    """``refused``: ``fenced`` / ``not_yours`` (the record names another attempt or node:
    end this copy without writing again), ``illegal`` (the lifecycle forbids it), ``bad``
    (not a report). ``gone``: for a check, the sessions no longer this node's, and why."""

    ok: bool
    refused: Refusal = ""
    reason: str = ""
    gone: dict[str, str] = {}
    count: int = 0  # for a restart: how many leftover records were settled


_encode = msgspec.msgpack.Encoder().encode
_decode_report = msgspec.msgpack.Decoder(SessionReport).decode
_decode_reply = msgspec.msgpack.Decoder(SessionReportReply).decode


def pack(msg: SessionReport | SessionReportReply) -> bytes:
    return _encode(msg)


def unpack_report(data: bytes) -> SessionReport:
    return _decode_report(data)


def unpack_reply(data: bytes) -> SessionReportReply:
    return _decode_reply(data)
