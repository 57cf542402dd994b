"""The bodies of the controller's API, HTTP and NATS alike: the requests each operation
decodes (once, into these structs, on both transports), the answers it encodes, the error
body, the NDJSON log lines and the attach socket's JSON frames. Nothing is built as a dict.

A request struct holds every field an operation takes. Over NATS it is the whole request
body; over HTTP the fields named in the path (``{id}``, ``{name}``) come from the path and
the rest from the JSON body (POST) or the query string (GET, DELETE). The operation table
(controller/operations.py) says which is which.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import Meta, Struct

from ..errors import ValidationError
from . import servicetypes as st
from .messages import NodeInfo, SessionRecord, SessionState

MAX_DEADLINE = 86400.0
# Checked by ``validate`` (400, one message on both transports), not by a Meta bound (422).
Deadline = Annotated[float, Meta(description="Seconds before what is left is killed, "
                                             f"0-{MAX_DEADLINE:g}.")]
MAX_OFFSET = 1 << 50  # far beyond any session's output, and within every JSON integer
Offset = Annotated[int, Meta(ge=0, le=MAX_OFFSET)]
MAX_LOG_BYTES = 512 << 10
MAX_AUDIT = 10000
SessionFilter = Literal["live", "pending", "starting", "running", "exited", "failed",
                        "killed", "lost"]


class Error(Struct):
    """Every 4xx/5xx answer of the API; over NATS, ``{"ok": false, "status", "error"}``."""

    error: str
    status: int


class NatsReply(Struct, omit_defaults=True):
    """A NATS API reply: ``ok`` with ``result`` and the answering ``controller``, or not
    ``ok`` with ``status`` (as HTTP) and ``error``."""

    ok: bool
    result: Any = None
    controller: str = ""
    status: int = 0
    error: str = ""


# ------------------------------------------------------------------ requests


class Empty(Struct, forbid_unknown_fields=True):
    """No fields (an empty body means ``{}``)."""


class Named(Struct, forbid_unknown_fields=True):
    name: str


class SessionRef(Struct, forbid_unknown_fields=True):
    id: str


class NodesQuery(Struct, forbid_unknown_fields=True):
    nodes: Annotated[str, Meta(max_length=65536)] = ""
    state: str = ""
    q: str = ""
    limit: Annotated[int, Meta(ge=0, le=100_000)] = 0
    after: str = ""


def check_deadline(deadline: float | None) -> None:
    if deadline is not None and not 0 <= deadline <= MAX_DEADLINE:
        raise ValidationError(f"deadline must be between 0 and {MAX_DEADLINE:g} seconds")


class DrainNode(Struct, forbid_unknown_fields=True, kw_only=True):
    name: str
    deadline: Deadline | None = None
    wait: bool = False

    def validate(self) -> None:
        check_deadline(self.deadline)


class ListSessions(Struct, forbid_unknown_fields=True):
    state: SessionFilter | None = None
    node: str | None = None
    name: str | None = None
    labels: dict[str, str] = {}


class SignalSession(Struct, forbid_unknown_fields=True, kw_only=True):
    id: str
    signal: str | int = "TERM"


class ReadLogs(Struct, forbid_unknown_fields=True, kw_only=True):
    id: str
    offset: Offset = 0
    max_bytes: Annotated[int, Meta(ge=1, le=MAX_LOG_BYTES)] = MAX_LOG_BYTES


class ScaleService(Struct, forbid_unknown_fields=True, kw_only=True):
    name: str
    replicas: int


class DrainService(Struct, forbid_unknown_fields=True, kw_only=True):
    name: str
    replica: str | None = None
    deadline: Deadline | None = None
    wait: bool = False

    def validate(self) -> None:
        check_deadline(self.deadline)


class RemoveService(Struct, forbid_unknown_fields=True, kw_only=True):
    name: str
    deadline: Deadline | None = None

    def validate(self) -> None:
        check_deadline(self.deadline)


class TokenRef(Struct, forbid_unknown_fields=True):
    id: str


class AuditQuery(Struct, forbid_unknown_fields=True):
    user: str | None = None
    since: float | None = None
    limit: Annotated[int, Meta(ge=1, le=MAX_AUDIT)] = 1000


# ------------------------------------------------------------------ answers


class DrainResult(Struct):
    """``nodes.drain``: ``remaining`` lists the sessions still live there."""

    node: str
    remaining: list[str]
    draining: Literal[True] = True


class UndrainResult(Struct):
    node: str
    draining: Literal[False] = False


class Removed(Struct):
    """The NATS answer of a removal (HTTP answers 204, no body)."""

    removed: Literal[True] = True


class SessionCreated(Struct):
    """``sessions.create`` over NATS (HTTP answers the record, 201 or 200 if it existed)."""

    session: SessionRecord
    created: bool


class ServiceCreated(Struct):
    service: st.ServiceView
    created: bool


class NodesPage(Struct):
    """``nodes.list``: a page and how many match in all (HTTP: ``X-Total-Count``)."""

    nodes: list[NodeInfo]
    total: int


class Whoami(Struct):
    user: str
    token: str
    scopes: list[str]


class TerminalInfo(Struct):
    """``GET /terminal/info``: whether ``/terminal`` is open to anyone, and a warning when
    some nodes cannot isolate terminals (they would run as the agent's user)."""

    public: bool
    warning: str | None


# ------------------------------------------------------------------ log lines (NDJSON)


class LogChunk(Struct, tag="out", tag_field="t"):
    """``data`` (base64 in JSON) is the output from byte ``offset`` of ``stream``."""

    stream: str
    offset: int
    data: bytes


class LogTruncated(Struct, tag="truncated", tag_field="t",
                   rename={"start": "from", "end": "to"}):
    """Bytes ``from``..``to`` were dropped by the output cap; output resumes at ``to``."""

    start: int
    end: int


class LogAttempt(Struct, tag="attempt", tag_field="t"):
    """With ``attempts``: placement ``attempt``'s output begins at ``offset``."""

    attempt: int
    offset: int


class LogEnd(Struct, tag="end", tag_field="t"):
    """The session has ended and everything was sent."""

    offset: int
    state: str
    exit_code: int | None = None
    signal: int | None = None
    reason: str = ""


class LogEof(Struct, tag="eof", tag_field="t"):
    """No ``follow``: this is all there is for now; resume with ``from=offset``."""

    offset: int


class LogError(Struct, tag="error", tag_field="t"):
    """The controller could not read on (the output stream failed); resume from ``offset``."""

    offset: int
    message: str


LogLine = LogChunk | LogTruncated | LogAttempt | LogEnd | LogEof | LogError
StoredLog = LogChunk | LogTruncated  # what ``sessions.logs`` over NATS pages through


# ------------------------------------------------------------------ attach frames (JSON text)


class AttachHello(Struct, tag="hello", tag_field="t"):
    """First frame: the session, its state, and the byte offset output resumes from."""

    session: str
    offset: int
    state: SessionState


class AttachTruncated(Struct, tag="truncated", tag_field="t",
                      rename={"start": "from", "end": "to"}):
    """Bytes ``from``..``to`` were dropped by the output cap; output resumes at ``to``."""

    start: int
    end: int


class AttachExit(Struct, tag="exit", tag_field="t"):
    """Last frame: how the session ended. The server closes the socket after it."""

    state: SessionState
    code: int | None
    signal: int | None
    reason: str


class AttachError(Struct, tag="error", tag_field="t"):
    """Server -> client, last instead of exit: the output could not be read on; reconnect
    with ``from=offset`` (the offset after the last byte sent)."""

    status: int
    offset: int
    message: str


class AttachResize(Struct, tag="resize", tag_field="t"):
    """Client -> server: the terminal size changed."""

    cols: int
    rows: int


class AttachEof(Struct, tag="eof", tag_field="t"):
    """Client -> server: close the session's stdin."""


AttachServerText = AttachHello | AttachTruncated | AttachExit | AttachError
AttachClientText = AttachResize | AttachEof
