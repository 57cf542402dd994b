"""What an agent reports to the controllers on its own subjects (``shoal.report.<node>.*``),
for them to apply after checking that the record names that node."""

from __future__ import annotations

from msgspec import Struct


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
