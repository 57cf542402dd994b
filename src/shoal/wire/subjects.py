"""NATS subjects and JetStream names, in one place (docs/protocol.md lists them)."""

from __future__ import annotations

PREFIX = "shoal"

# Key-value buckets.
HEARTBEATS_BUCKET = "shoal-heartbeats"  # TTL'd: a key present = a node alive
REGISTRY_BUCKET = "shoal-registry"  # every node ever seen, so a dead one shows as down
SESSIONS_BUCKET = "shoal-sessions"  # session records
CONTROLLERS_QUEUE = "shoal-controllers"  # queue group: one controller answers each API request


def agent_run(node: str) -> str:
    """Request: start a run on ``node``."""
    return f"{PREFIX}.agent.{node}.run"


def agent_runs(lead: str) -> str:
    """Request: start one run on several nodes of the agent process that serves ``lead``."""
    return f"{PREFIX}.agent.{lead}.runs"


def agent_all(node: str) -> str:
    """Everything addressed to ``node`` (an agent's one subscription per node)."""
    return f"{PREFIX}.agent.{node}.>"


def run_events(run_id: str, node: str = "*") -> str:
    """Agent -> controller: output and exit events of a run."""
    return f"{PREFIX}.run.{run_id}.out.{node}"


def run_control(run_id: str) -> str:
    """Controller -> agents: stdin, resize, signals, keepalive, cancel."""
    return f"{PREFIX}.run.{run_id}.ctl"


def run_output_ack(run_id: str, node: str) -> str:
    """Controller -> one agent: output flow-control credit."""
    return f"{PREFIX}.run.{run_id}.ack.{node}"


def run_stdin_ack(run_id: str, node: str = "*") -> str:
    """Agent -> controller: stdin bytes written."""
    return f"{PREFIX}.run.{run_id}.inack.{node}"


def agent_session(node: str, op: str) -> str:
    """Request to the agent of ``node``: ``start`` or ``signal`` a session."""
    return f"{PREFIX}.agent.{node}.session.{op}"


def session_control(session_id: str) -> str:
    """Attached clients -> the agent running the session: input, resize, attached."""
    return f"{PREFIX}.session.{session_id}.ctl"


def api(op: str) -> str:
    """The NATS JSON API, served by the controllers as a queue group."""
    return f"{PREFIX}.api.{op}"
