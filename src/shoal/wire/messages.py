"""Every message shoal sends, as typed structs, in one place.

Messages travel as msgpack on NATS and on binary WebSocket frames, and as JSON on the HTTP
API. Decoding validates types and the size caps given by ``Meta`` constraints, so a bad
message is rejected at the edge with a clear error and never reaches the logic.

Unions are tagged (``"t"`` field) so one decoder handles every frame of a stream. What
msgspec cannot express (exactly one of argv or shell, NUL bytes, environment names, an
absolute cwd) is each struct's ``validate``, which both API transports run (``check``).

Over 400 lines on purpose: the fleet's whole contract, in one place to read. The API's own
bodies are in api.py, services' in servicetypes.py.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from msgspec import Meta, Struct

from ..errors import ValidationError

# Size caps for everything a client controls.
# No '.' in node names: a name is one NATS subject token.
NodeName = Annotated[
    str, Meta(min_length=1, max_length=63, pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")]
LabelKey = Annotated[
    str, Meta(min_length=1, max_length=63, pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")]
LabelValue = Annotated[str, Meta(max_length=253)]
Arg = Annotated[str, Meta(max_length=65536)]
Argv = Annotated[list[Arg], Meta(min_length=1, max_length=4096)]
EnvName = Annotated[str, Meta(min_length=1, max_length=256)]
EnvMap = Annotated[dict[EnvName, Arg], Meta(max_length=512)]
Labels = Annotated[dict[LabelKey, LabelValue], Meta(max_length=64)]
Seconds = Annotated[float, Meta(gt=0, le=31_536_000)]
TermSize = Annotated[int, Meta(ge=1, le=10000)]
ShellText = Annotated[str, Meta(min_length=1, max_length=262144)]  # for /bin/sh -c
Directory = Annotated[str, Meta(min_length=1, max_length=4096)]
# A Unix user name as useradd takes it (agent/runas.py checks the agent allows it).
UNIX_USER_PATTERN = r"^[a-z_][a-z0-9_.-]{0,31}[$]?$"
UnixUser = Annotated[str, Meta(min_length=1, max_length=32, pattern=UNIX_USER_PATTERN)]

Stream = Literal["stdout", "stderr", "pty"]
NodeState = Literal["ready", "draining", "down"]


# --------------------------------------------------------------------------- nodes


class Load(Struct, frozen=True):
    load1: float = 0.0
    cpu_percent: float = 0.0
    mem_percent: float = 0.0


class NodeInfo(Struct, frozen=True):
    """What an agent publishes about its node on every heartbeat."""

    name: str
    labels: dict[str, str] = {}
    capacity: int = 0
    sessions: int = 0
    load: Load = Load()
    state: NodeState = "ready"
    version: str = ""
    address: str = ""
    hostname: str = ""
    pid: int = 0
    started_at: float = 0.0
    last_seen: float = 0.0
    isolation: bool = False  # the agent can run sessions as throwaway users (it is root)
    # Throwaway users' network policy in force: "none", "outbound", "open", or "unenforced"
    # (asked for but the agent cannot install it; its log says why). "" from older agents.
    network: str = ""
    cgroups: str = ""  # how sessions are contained ("v2+v1(cpu,memory,pids)"); "" = not at all
    # Whether the node runs `runtime = "container"` sessions (podman and runc present), and
    # if not, why not ("" from older agents: they cannot).
    containers: bool = False
    containers_reason: str = ""


class FleetSummary(Struct, frozen=True):
    """``GET /api/v1/fleet``: the nodes counted, for a fleet too big for a table.
    ``sessions``, ``capacity``, ``network``, ``agents`` and ``hosts`` count nodes that are
    up; ``labels`` gives per key the 20 commonest values (the rest as ``…others``)."""

    nodes: int
    states: dict[str, int]
    sessions: int
    capacity: int
    versions: dict[str, int]
    network: dict[str, int]
    labels: dict[str, dict[str, int]]
    agents: int  # agent processes (hostname, pid)
    hosts: int


# --------------------------------------------------------------------------- runs

class Targets(Struct, frozen=True, forbid_unknown_fields=True):
    """Which nodes a run goes to: the union of ``all``/``nodes``, less ``exclude``,
    filtered by ``labels``."""

    all: bool = False
    nodes: Annotated[str, Meta(max_length=65536)] = ""
    exclude: Annotated[str, Meta(max_length=65536)] = ""
    labels: Labels = {}


class RunSpec(Struct, frozen=True, forbid_unknown_fields=True):
    """What to run: exactly one of ``argv`` (exec'd as is) or ``shell`` (``/bin/sh -c``)."""

    argv: Argv | None = None
    shell: ShellText | None = None
    env: EnvMap = {}
    cwd: Directory | None = None
    tty: bool = False
    cols: TermSize = 80
    rows: TermSize = 24
    stdin: bool = False
    timeout: Seconds | None = None
    user: UnixUser | None = None  # run as this user (the agent's run_as must list it)

    def validate(self) -> None:
        """What msgspec cannot say: exactly one of argv or shell, and no argument, variable
        or directory the kernel would cut short."""
        if (self.argv is None) == (self.shell is None):
            raise ValidationError("give exactly one of argv (a list) or shell (a string)")
        check_process("argv", self.argv, self.shell, self.env, self.cwd)


class RunRequest(Struct, frozen=True):
    """Controller -> agent (request on ``shoal.agent.<node>.run``)."""

    run_id: str
    spec: RunSpec
    window: int = 4 << 20


class RunAccepted(Struct, frozen=True, tag="accepted", tag_field="t"):
    node: str
    pid: int


class RunRefused(Struct, frozen=True, tag="refused", tag_field="t"):
    node: str
    reason: str


class RunBatch(Struct, frozen=True):
    """Controller -> agent process (request on ``shoal.agent.<lead>.runs``): one run on
    several of its nodes. Answered at once with ``RunBatchAck``; each node then reports
    ``RunBatchStarted`` and ``RunBatchExited`` (in groups, on the lead's subject), or
    ``Exit`` alone (it could not start) on the run's event subjects."""

    run_id: str
    spec: RunSpec
    nodes: Annotated[list[NodeName], Meta(min_length=1, max_length=100_000)]
    window: int = 4 << 20


class RunBatchAck(Struct, frozen=True):
    """``reason`` set: the whole batch is refused. Else ``refused`` lists the nodes of the
    batch this process does not serve; it starts every other."""

    refused: list[str] = []
    reason: str = ""


class RunBatchStarted(Struct, frozen=True, tag="batch-started", tag_field="t"):
    """Agent -> controller on ``shoal.run.<run>.out.<lead>``: these nodes' processes started,
    as ``[node, pid]`` pairs (one message per few hundred nodes, not one per node)."""

    started: list[tuple[str, int]]




class Output(Struct, frozen=True, tag="out", tag_field="t"):
    """A chunk of a process's output at a byte offset of its stream."""

    node: str
    stream: Stream
    offset: int
    data: bytes


class OutputFrame(Struct, frozen=True, tag="out", tag_field="t"):
    """An ``Output`` read without copying its data: ``data`` stays msgpack-encoded, so the
    controller can check an agent's frame and pass it on to the client as it came."""

    node: str
    stream: Stream
    offset: int
    data: msgspec.Raw

    @property
    def size(self) -> int | None:
        """Length of the encoded bytes, or None if ``data`` is not a msgpack bin."""
        raw = memoryview(self.data)
        head = _BIN_HEADER.get(raw[0]) if raw.nbytes else None
        return None if head is None else raw.nbytes - head


_BIN_HEADER = {0xC4: 2, 0xC5: 3, 0xC6: 5}  # msgpack bin 8/16/32: marker and length bytes


class Exit(Struct, frozen=True, tag="exit", tag_field="t"):
    """How a process ended. ``code`` for a normal exit, ``signal`` if killed by one;
    ``reason`` explains anything unusual (timeout, not found, could not start)."""

    node: str
    code: int | None = None
    signal: int | None = None
    reason: str = ""
    timed_out: bool = False
    started: float = 0.0
    ended: float = 0.0


class RunBatchExited(Struct, frozen=True, tag="batch-exited", tag_field="t"):
    """Agent -> controller on ``shoal.run.<run>.out.<lead>``: these nodes of a batch ended
    (gathered for a few milliseconds, at most a few hundred per message): 10,000 ``true``
    cost one write and one message per few hundred nodes, not one per node."""

    exits: list[Exit]


class Unreachable(Struct, frozen=True, tag="unreachable", tag_field="t"):
    node: str
    reason: str


class Started(Struct, frozen=True, tag="started", tag_field="t"):
    node: str
    pid: int


class Skipped(Struct, frozen=True, tag="skipped", tag_field="t"):
    """A node a rolling run (``batch``) did not start, and why (an earlier slice failed,
    or the run was interrupted)."""

    node: str
    reason: str


RunEvent = Output | Exit | Unreachable | Started | Skipped


# Control frames, controller -> agents of one run (``shoal.run.<id>.ctl``), and the
# client -> controller WebSocket.

class StdinData(Struct, frozen=True, tag="stdin", tag_field="t"):
    offset: int
    data: bytes
    eof: bool = False


class Resize(Struct, frozen=True, tag="resize", tag_field="t"):
    cols: TermSize
    rows: TermSize


class SignalRun(Struct, frozen=True, tag="signal", tag_field="t"):
    signum: Annotated[int, Meta(ge=1, le=64)]


class Keepalive(Struct, frozen=True, tag="keepalive", tag_field="t"):
    pass


class Cancel(Struct, frozen=True, tag="cancel", tag_field="t"):
    reason: str = "cancelled"


RunControl = StdinData | Resize | SignalRun | Keepalive | Cancel


class OutputAck(Struct, frozen=True):
    """Controller -> agent: bytes of output consumed so far (flow control credit)."""

    consumed: int


class StdinAck(Struct, frozen=True):
    """Agent -> controller: bytes of stdin written to the process so far."""

    node: str
    written: int


# Client <-> controller over the run WebSocket.

class RunStart(Struct, frozen=True, tag="start", tag_field="t", forbid_unknown_fields=True):
    targets: Targets
    spec: RunSpec
    connect_timeout: Annotated[float, Meta(gt=0, le=300)] = 5.0
    # Rolling runs: ``batch`` nodes (or ``batch_percent`` of them) at a time, each slice
    # finished before the next starts, stopping after a slice with a failure unless
    # ``keep_going``; ``fanout`` bounds how many run at once (0: all).
    batch: Annotated[int, Meta(ge=0, le=1_000_000)] = 0
    batch_percent: Annotated[int, Meta(ge=0, le=100)] = 0
    fanout: Annotated[int, Meta(ge=0, le=1_000_000)] = 0
    keep_going: bool = False


class RunPlan(Struct, frozen=True, tag="plan", tag_field="t"):
    run_id: str
    nodes: list[str]


class RunDone(Struct, frozen=True, tag="done", tag_field="t"):
    pass


class RunEvents(Struct, frozen=True, tag="events", tag_field="t"):
    """Events that came together, in order, in one frame: a fan-out's thousand exits cost
    the controller and the client a thousand sends and receives otherwise."""
    events: list[RunEvent]


class ErrorFrame(Struct, frozen=True, tag="error", tag_field="t"):
    status: int
    message: str


ClientFrame = RunStart | StdinData | Resize | SignalRun | Cancel
ServerFrame = (RunPlan | Output | Exit | Unreachable | Started | Skipped | RunEvents
               | RunDone | ErrorFrame)


# --------------------------------------------------------------------------- sessions

SessionId = Annotated[
    str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")]
SessionState = Literal[
    "pending", "starting", "running", "exited", "failed", "killed", "lost"]
# Why a pending record waits for a placement: "" a new record (its creator places it, the
# reconciler too once it is stale), "rescheduled" it ran and must run again (its node was lost,
# drained or restarted), "waiting" no node could be chosen while the view was not settled.
# Only a "rescheduled" record may go back from starting/running to pending.
Requeue = Literal["", "rescheduled", "waiting"]
RestartPolicy = Literal["never", "on-failure", "always"]
Runtime = Literal["process", "container"]
ImageRef = Annotated[str, Meta(min_length=1, max_length=512,
                               pattern=r"^[A-Za-z0-9][A-Za-z0-9._/:@-]*$")]
NetworkName = Annotated[str, Meta(min_length=1, max_length=63,
                                  pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
ContainerPath = Annotated[str, Meta(min_length=1, max_length=4096, pattern=r"^/[^,\n\x00]*$")]
ContainerPort = Annotated[int, Meta(ge=1, le=65535)]


class Mount(Struct, frozen=True, forbid_unknown_fields=True):
    """A read-only bind mount into a container, of a host path under a directory the node
    allows (its ``container_mounts`` setting)."""

    source: ContainerPath
    target: ContainerPath


class Limits(Struct, frozen=True, forbid_unknown_fields=True):
    """Per-session resource limits: memory, processes and CPU weight through the session's
    cgroup (setrlimit where the node has no cgroups), the rest through setrlimit."""

    cpu_seconds: Annotated[int, Meta(ge=1, le=10_000_000)] | None = None
    memory_mb: Annotated[int, Meta(ge=16, le=4_000_000)] | None = None
    processes: Annotated[int, Meta(ge=1, le=1_000_000)] | None = None
    open_files: Annotated[int, Meta(ge=16, le=1_000_000)] | None = None
    cpu_weight: Annotated[int, Meta(ge=1, le=10_000)] | None = None  # cgroup v2 scale, 100 = fair
    file_size_mb: Annotated[int, Meta(ge=1, le=4_000_000)] | None = None  # largest file written


class SessionSpec(Struct, frozen=True, forbid_unknown_fields=True):
    """What a client asks for. Exactly one of ``command`` (argv) or ``shell``; a container
    (``runtime = "container"``) may give neither and run its image's own command."""

    id: SessionId | None = None
    name: Annotated[str, Meta(max_length=128)] = ""
    command: Argv | None = None
    shell: ShellText | None = None
    env: EnvMap = {}
    cwd: Directory | None = None
    tty: bool = False
    cols: TermSize = 80
    rows: TermSize = 24
    stdin: bool = False
    user: Annotated[str, Meta(min_length=1, max_length=32)] = "agent"
    restart: RestartPolicy = "never"
    timeout: Seconds | None = None
    idle_timeout: Seconds | None = None
    detach_timeout: Seconds | None = None
    ports: Annotated[int, Meta(ge=0, le=64)] = 0
    limits: Limits = Limits()
    node: NodeName | None = None
    selector: Labels = {}
    strategy: Literal["spread", "binpack"] = "spread"
    service: Annotated[str, Meta(max_length=63)] = ""
    labels: Labels = {}
    output_cap: Annotated[int, Meta(ge=1024, le=1 << 40)] | None = None
    # Containers (docs/containers.md): the image, the container port each allocated port
    # maps to (in order), read-only mounts, and the podman network ("none": loopback only).
    runtime: Runtime = "process"
    image: ImageRef | None = None
    container_ports: Annotated[list[ContainerPort], Meta(max_length=64)] = []
    mounts: Annotated[list[Mount], Meta(max_length=64)] = []
    network: NetworkName = "none"

    def validate(self) -> None:
        """What msgspec cannot say about a spec on its own (the controller checks what
        depends on the fleet, the agent what depends on the node)."""
        if self.runtime == "container":
            self._validate_container()
        else:
            if (self.command is None) == (self.shell is None):
                raise ValidationError("give exactly one of command (an argv list) or shell "
                                      "(a string)")
            if self.user not in ("agent", "ephemeral") and \
                    not re.fullmatch(UNIX_USER_PATTERN, self.user):
                raise ValidationError(f"user {self.user!r}: use 'agent', 'ephemeral' or the "
                                      "name of a user the node's agent allows (its run_as "
                                      "setting)")
            if self.image is not None or self.container_ports or self.mounts or \
                    self.network != "none":
                raise ValidationError("image, container_ports, mounts and network are for "
                                      "containers: add runtime = \"container\"")
        check_process("command", self.command, self.shell, self.env, self.cwd)

    def _validate_container(self) -> None:
        """A container runs its image's command unless given one (command or shell, not
        both); the agent checks what depends on the node (mounts it allows, the image)."""
        if self.image is None:
            raise ValidationError("a container session needs an image (one loaded on the "
                                  "nodes with podman load or podman import)")
        if self.command is not None and self.shell is not None:
            raise ValidationError("give at most one of command (an argv list) or shell (a "
                                  "string)")
        if self.user != "agent":
            raise ValidationError("a container runs as its image's user: leave user unset "
                                  "(throwaway users are for processes)")
        if self.container_ports and self.network == "none":
            raise ValidationError("container ports need a network: set network to a podman "
                                  "network's name (podman's default is 'podman')")
        if len(self.container_ports) != self.ports:
            raise ValidationError(f"container_ports lists {len(self.container_ports)} port(s) "
                                  f"and ports asks for {self.ports}: give one container port "
                                  "per allocated port (or leave ports unset)")
        if self.network in ("host", "slirp4netns", "pasta"):
            raise ValidationError(f"network {self.network!r} reaches the node's own network; "
                                  "use 'none' or the name of a podman network")


class SessionRecord(Struct, frozen=True):
    """A session as stored in the sessions bucket and returned by the API."""

    id: str
    spec: SessionSpec
    state: SessionState = "pending"
    name: str = ""
    node: str = ""
    pid: int = 0
    ports: list[int] = []
    address: str = ""
    exit_code: int | None = None
    signal: int | None = None
    reason: str = ""
    created: float = 0.0
    started: float = 0.0
    ended: float = 0.0
    restarts: int = 0
    attempt: int = 0  # fencing epoch: +1 at every placement; only its agent may write
    # The node of each attempt (attempt i at index i-1; "" before this was kept): output
    # readers trust a chunk of attempt i only from that node's subject.
    placements: list[str] = []
    output_bytes: int = 0
    user: str = ""
    draining: bool = False
    seal: str = ""  # HMAC of the spec by the controllers' key: only they may launch it
    owner: str = ""  # the API user who created it (scopes limited to one's own sessions)
    requeued: Requeue = ""  # set only while pending (see Requeue); "" in every other state


def spec_digest(spec: SessionSpec) -> str:
    import hashlib

    return hashlib.sha256(msgspec.json.encode(spec)).hexdigest()


class SessionStart(Struct, frozen=True):
    """Controller -> agent: would you run this session? ``record`` is its pending record as
    the controller holds it (agents cannot read the bucket); the agent takes it only if the
    spec has this digest. A yes reserves room and ports; the controller then writes the
    record ``starting`` on that node and says go (``SessionGo``)."""

    id: str
    digest: str = ""
    record: SessionRecord | None = None


class SessionStartReply(Struct, frozen=True):
    ok: bool
    reason: str = ""
    # From agents that wrote the record themselves (before the controllers owned records).
    record: SessionRecord | None = None
    # A yes: what the node reserved, for the controller to write into the record.
    ports: list[int] = []
    address: str = ""
    user: str = ""  # the spec's user, or "agent" for a throwaway user it cannot make


class SessionGo(Struct, frozen=True):
    """Controller -> agent, after its yes: the record now says ``starting`` on this node at
    ``attempt`` (``go``), or the session went elsewhere meanwhile (not ``go``): release."""

    id: str
    attempt: int
    go: bool = True


class NodeDrain(Struct, frozen=True):
    """Controller -> agent: stop (or resume) taking sessions; at ``deadline`` (seconds from
    now) end what still runs, daemons with a restart policy going elsewhere. The agent keeps
    the deadline itself, so it holds even if the controller that asked goes away."""

    draining: bool
    deadline: float | None = None


class SessionInput(Struct, frozen=True, tag="in", tag_field="t"):
    """Attached client -> agent (``shoal.session.<id>.ctl``): keystrokes or pasted bytes."""

    data: bytes
    eof: bool = False


class SessionAttached(Struct, frozen=True, tag="attached", tag_field="t"):
    """Sent every few seconds while a client is attached (drives ``detach_timeout``)."""


SessionControl = SessionInput | Resize | SessionAttached


class SessionSignal(Struct, frozen=True):
    """Controller -> agent: signal a session, or end it (``kill``) with a reason."""

    id: str
    signum: int = 15
    kill: bool = False
    reason: str = ""
    reschedule: bool = False  # a daemon with a restart policy starts again elsewhere


# --------------------------------------------------------------------------- encoding

_msgpack_encoder = msgspec.msgpack.Encoder()
_json_encoder = msgspec.json.Encoder()
T = TypeVar("T")


# --------------------------------------------------------------------------- validation

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def check_process(argv_field: str, argv: list[str] | None, shell: str | None,
                  env: Mapping[str, str], cwd: str | None) -> None:
    """What a process spec must not hold, for every spec that starts one: a NUL byte (the
    kernel ends a C string there, so the process would get something else than was
    asked), an environment name a shell could not read, a relative working directory."""
    for i, arg in enumerate(argv or ()):
        if "\0" in arg:
            raise ValidationError(f"{argv_field}[{i}] holds a NUL byte, which no argument can "
                                  "carry: remove it")
    if shell is not None and "\0" in shell:
        raise ValidationError("shell holds a NUL byte, which no command line can carry: "
                              "remove it")
    for name, value in env.items():
        if not ENV_NAME.fullmatch(name):
            raise ValidationError(f"env name {name[:80]!r}: use letters, digits and _, not "
                                  "starting with a digit")
        if "\0" in value:
            raise ValidationError(f"env {name}: the value holds a NUL byte, which no "
                                  "variable can carry: remove it")
    if cwd is not None and (not cwd.startswith("/") or "\0" in cwd):
        raise ValidationError(f"cwd {cwd[:80]!r}: give an absolute directory (starting with "
                              "/, no NUL byte)")


def check(msg: Any) -> None:
    """The checks of a decoded request that msgspec's constraints cannot express (its
    struct's ``validate``): run by both API transports on every request they decode.
    (A plain attribute lookup: isinstance against a runtime Protocol cost a fifth of a
    session create.)"""
    validate = getattr(msg, "validate", None)
    if validate is not None:
        validate()


def pack(msg: Any) -> bytes:
    return _msgpack_encoder.encode(msg)


def unpack(data: bytes, kind: type[T]) -> T:
    return msgspec.msgpack.decode(data, type=kind)


# Decoders for the tagged unions (one frame may be any member).
# Annotated, so that the return types hold whether or not msgspec infers a union's type.
_control: msgspec.msgpack.Decoder[RunControl] = msgspec.msgpack.Decoder(RunControl)
_client_frame: msgspec.msgpack.Decoder[ClientFrame] = msgspec.msgpack.Decoder(ClientFrame)
_server_frame: msgspec.msgpack.Decoder[ServerFrame] = msgspec.msgpack.Decoder(ServerFrame)
_run_reply: msgspec.msgpack.Decoder[RunAccepted | RunRefused | Exit] = msgspec.msgpack.Decoder(
    RunAccepted | RunRefused | Exit)
_agent_event_frame: msgspec.msgpack.Decoder[
    OutputFrame | Exit | RunBatchStarted | RunBatchExited] = (
    msgspec.msgpack.Decoder(OutputFrame | Exit | RunBatchStarted | RunBatchExited))
_session_control: msgspec.msgpack.Decoder[SessionControl] = msgspec.msgpack.Decoder(
    SessionControl)


def unpack_session_control(data: bytes) -> SessionControl:
    return _session_control.decode(data)


def unpack_control(data: bytes) -> RunControl:
    return _control.decode(data)


def unpack_client_frame(data: bytes) -> ClientFrame:
    return _client_frame.decode(data)


def unpack_server_frame(data: bytes) -> ServerFrame:
    return _server_frame.decode(data)


def unpack_run_reply(data: bytes) -> RunAccepted | RunRefused | Exit:
    return _run_reply.decode(data)


def unpack_agent_event_frame(data: bytes,
                             ) -> OutputFrame | Exit | RunBatchStarted | RunBatchExited:
    """An agent's output, exit or batch-started event, leaving output data encoded."""
    return _agent_event_frame.decode(data)


def to_json(msg: Any) -> bytes:
    return _json_encoder.encode(msg)


def to_builtins(msg: Any) -> Any:
    return msgspec.to_builtins(msg)
