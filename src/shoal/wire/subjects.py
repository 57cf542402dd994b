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
    """Everything addressed to ``node`` (an agent's one subscription per node): requests,
    and the control and flow-control frames of its runs and sessions. A node's NATS
    credential may subscribe here and nowhere else (docs/security.md)."""
    return f"{PREFIX}.agent.{node}.>"


def run_events(run_id: str, node: str = "*") -> str:
    """Agent -> controller: output and exit events of a run."""
    return f"{PREFIX}.run.{run_id}.out.{node}"


def run_control(run_id: str, node: str) -> str:
    """Controller -> the agent of ``node``: stdin, resize, signals, keepalive, cancel. Sent
    to a batch's lead node once for the whole batch (the agent applies it to every node of
    the batch), else to each node."""
    return f"{PREFIX}.agent.{node}.ctl.run.{run_id}"


def run_output_ack(run_id: str, node: str) -> str:
    """Controller -> one agent: output flow-control credit."""
    return f"{PREFIX}.agent.{node}.ack.run.{run_id}"


def run_stdin_ack(run_id: str, node: str = "*") -> str:
    """Agent -> controller: stdin bytes written."""
    return f"{PREFIX}.run.{run_id}.inack.{node}"


def agent_session(node: str, op: str) -> str:
    """Request to the agent of ``node``: ``start`` or ``signal`` a session, or ``go``."""
    return f"{PREFIX}.agent.{node}.session.{op}"


def session_control(node: str, session_id: str) -> str:
    """Attached clients -> the agent of ``node``, which runs the session: input, resize,
    attached."""
    return f"{PREFIX}.agent.{node}.ctl.session.{session_id}"


def node_renew(node: str) -> str:
    """Agent -> controllers: a fresh credential for ``node`` (only that node's own
    credential may publish here, so the server has authenticated the asker)."""
    return f"{PREFIX}.identity.renew.{node}"


def node_report(node: str, what: str) -> str:
    """Agent of ``node`` -> controllers: a fact or a request about its own sessions
    (``trim``: drop its session's oldest output; ``session``: a ``SessionReport``, a request
    the controllers answer). Only that node's credential may publish
    here; the controller applies it once the record names that node."""
    return f"{PREFIX}.report.{node}.{what}"


REPORT_TRIM = "trim"
REPORT_SESSION = "session"
REPORT_OUTPUT = "output"  # a request: where the session's stored output stands
REPORTS_QUEUE = "shoal-reports"


def node_inbox(node: str) -> str:
    """The inbox prefix of the agent whose first node is ``node``: replies to it, and to
    nobody else's node."""
    return f"_INBOX_AGENT.{node}"


def api(op: str) -> str:
    """The NATS JSON API, served by the controllers as a queue group."""
    return f"{PREFIX}.api.{op}"
