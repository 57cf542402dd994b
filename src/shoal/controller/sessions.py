"""The session service: what the HTTP and NATS APIs both call. No state of its own beyond
caches of the buckets; every decision that matters is a compare-and-set on a record or an
agent saying yes or no."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import time
from typing import TYPE_CHECKING

import msgspec

from ..errors import (
    ConflictError,
    NoResponder,
    NotFoundError,
    RemoteTimeout,
    ShoalError,
    Unavailable,
    ValidationError,
)
from ..logic import placement, sessionreconcile, sessionstate
from ..logic.sessionstate import FINAL, LIVE, attempt_nodes
from ..natsio import outputlog, rpc
from ..natsio.sessionstore import SessionCache, SessionStore
from ..system.tasks import end_tasks
from ..wire import messages as m
from ..wire import subjects

if TYPE_CHECKING:
    from ..natsio.types import JetStreamContext, NatsClient
    from .registry import NodeRegistry

log = logging.getLogger(__name__)

AGENT_TIMEOUT = 5.0
RECONCILE_EVERY = 2.0
WAITING = "waiting for the nodes"  # reason of a session kept pending while the view settles
PENDING: frozenset[m.SessionState] = frozenset({"pending"})


def validate(spec: m.SessionSpec, terminal: bool = False) -> None:
    if spec.id and outputlog.is_terminal(spec.id) != terminal:
        raise ValidationError(f"session ids starting with {outputlog.TERMINAL_PREFIX!r} are "
                              "kept for the terminal pool (their output has a stream of its "
                              "own); choose another id")
    spec.validate()  # the spec on its own: shoal.wire.messages


class SessionService:
    def __init__(self, nc: NatsClient, js: JetStreamContext, store: SessionStore,
                 cache: SessionCache, registry: NodeRegistry, retention: float,
                 secret: str) -> None:
        self.key = hmac.new(secret.encode(), b"shoal session seal v1", hashlib.sha256).digest()
        self.nc = nc
        self.js = js
        self.store = store
        self.cache = cache
        self.registry = registry
        self.retention = retention
        self._placing: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._reconcile_loop())

    async def stop(self) -> None:
        await end_tasks([self._task])

    # ------------------------------------------------------------------ create

    async def create(self, spec: m.SessionSpec, terminal: bool = False, owner: str = "",
                     ) -> tuple[m.SessionRecord, bool]:
        """Create and place a session; with a known ``id``, return the first one instead.
        Only the terminal pool creates with ``terminal`` (and a ``t_`` id). ``owner`` is
        the API user asking (sealed with the spec: agents cannot change it)."""
        if spec.runtime == "container" and spec.container_ports and not spec.ports:
            spec = msgspec.structs.replace(spec, ports=len(spec.container_ports))
        validate(spec, terminal)
        nodes = self.registry.snapshot()
        if not self.registry.settled() and not placement.eligible(spec, nodes):
            # Just back from a NATS outage: the nodes may be up and not heard from yet.
            # Saying "no node has room" now would be a guess; nothing is created.
            wait = self.registry.settles_in()
            raise Unavailable(f"this controller is catching up with the nodes after a NATS "
                              f"outage; nothing was created: retry in {wait:.0f} s", wait)
        if spec.node is not None and spec.node not in nodes:
            raise NotFoundError(f"no node named {spec.node!r}; `shoal nodes` lists them")
        spec_id = spec.id
        sid = spec_id or "s-" + secrets.token_hex(6)
        spec = msgspec.structs.replace(spec, id=sid)
        digest = m.spec_digest(spec)
        record = m.SessionRecord(id=sid, spec=spec, name=spec.name or sid, created=time.time(),
                                 seal=self.seal(spec, owner, digest), owner=owner)
        if not spec_id and self.registry.settled():
            return await self._create_placed(record, digest), True
        record, created = await self.store.create(record)
        if not created:
            if _what_runs(record.spec) != _what_runs(spec):
                raise ConflictError(f"a different session already has id {sid}; choose "
                                    "another id (the same spec with the same id is fine)")
            return record, False
        return await self.place(record, digest), True

    def seal(self, spec: m.SessionSpec, owner: str = "", digest: str = "") -> str:
        text = (digest or m.spec_digest(spec)) + (f"\0{owner}" if owner else "")
        return hmac.new(self.key, text.encode(), hashlib.sha256).hexdigest()

    def sealed(self, record: m.SessionRecord, digest: str = "") -> bool:
        """Whether a controller made this record's spec (and gave it this owner). Only
        controllers write records; still every path that acts on one (placement, services,
        terminals, scope checks) asks this first, so a record written by anything else
        (a credential that should not have had the bucket) is never acted on. ``digest``:
        the spec's, if already known."""
        return hmac.compare_digest(record.seal, self.seal(record.spec, record.owner, digest))

    async def place(self, record: m.SessionRecord, digest: str = "") -> m.SessionRecord:
        """Offer the session to candidate nodes until one takes it. ``digest``: of its
        spec, if known."""
        self._placing.add(record.id)
        try:
            digest = digest or m.spec_digest(record.spec)
            if not self.sealed(record, digest):
                # Only a controller's spec is ever launched.
                log.warning("session %s has no valid seal; not placing it", record.id)
                failed = await self.store.move_from(
                    record.id, LIVE, "failed",
                    reason="refused: the spec was not made by a controller")
                return failed or record
            if record.restarts:  # rescheduled: go on from the last byte actually stored
                end = await outputlog.end_offset(self.js, record.id, attempt_nodes(record))
                if end != record.output_bytes:
                    record = await self.store.move_from(record.id, PENDING, "pending",
                                                   output_bytes=end) or record
            reasons: list[str] = []
            for node in placement.candidates(record.spec, self.registry.snapshot()):
                reply = await self._ask(node, "start", m.SessionStart(id=record.id, digest=digest,
                                                                      record=record))
                if reply.ok:
                    if reply.record is not None and reply.record.id == record.id:
                        return reply.record  # an agent that wrote the record itself
                    return await self._take(record, node, reply)
                reasons.append(reply.reason)
                current = await self.store.get(record.id)
                if current is None or current[0].state != "pending":
                    return current[0] if current else record
            why = "; ".join(reasons) if reasons else _no_candidates_reason(record.spec)
            if not self.registry.settled():  # not a verdict yet: the reconciler tries again
                waiting = await self.store.move_from(record.id, PENDING, "pending",
                                                requeued="waiting", reason=f"{WAITING} ({why})")
                return waiting or record
            failed = await self.store.move_from(record.id, PENDING, "failed",
                                           reason=f"no node has room ({why})")
            return failed or record
        finally:
            self._placing.discard(record.id)

    async def _create_placed(self, record: m.SessionRecord, digest: str) -> m.SessionRecord:
        """A new session under an id of our own (nobody else can know it yet): offered
        first, then stored once, already ``starting`` on the node that said yes (or
        ``failed`` if none did). One write where placing a stored record takes two."""
        reasons: list[str] = []
        for node in placement.candidates(record.spec, self.registry.snapshot()):
            reply = await self._ask(node, "start", m.SessionStart(id=record.id, digest=digest,
                                                                  record=record))
            if not reply.ok:
                reasons.append(reply.reason)
                continue
            placed = _placed(record, node, reply)
            created = False
            try:
                placed, created = await self.store.create(placed)
            finally:
                await self._go(node, record.id, placed.attempt, created)
            return placed
        why = "; ".join(reasons) if reasons else _no_candidates_reason(record.spec)
        failed, _ = await self.store.create(msgspec.structs.replace(
            record, state="failed", reason=f"no node has room ({why})", ended=time.time()))
        return failed

    async def _take(self, offered: m.SessionRecord, node: str,
                    reply: m.SessionStartReply) -> m.SessionRecord:
        """``node`` said yes to ``offered``: write it ``starting`` there (the placement's
        new attempt), then tell the node to go, or to release what it reserved if the
        record moved on meanwhile (killed while pending, placed by another controller)."""
        attempt = offered.attempt + 1

        def take(r: m.SessionRecord) -> m.SessionRecord | None:
            if r.state != "pending" or r.attempt != offered.attempt:
                return None
            return _placed(r, node, reply)

        written = None
        try:
            written = await self.store.update_rev(offered.id, take)
        finally:
            await self._go(node, offered.id, attempt, written is not None)
        if written is None:
            found = await self.store.get(offered.id)
            return found[0] if found else offered
        return written[0]

    async def _go(self, node: str, sid: str, attempt: int, go: bool) -> None:
        try:  # lost: the node asks after a while (agent/sessions.py, GO_TIMEOUT)
            await self.nc.publish(subjects.agent_session(node, "go"),
                                  m.pack(m.SessionGo(id=sid, attempt=attempt, go=go)))
        except Exception as e:
            log.info("session %s: cannot tell node %s to %s: %s", sid, node,
                     "go" if go else "release it", e)

    async def _ask(self, node: str, op: str, msg: msgspec.Struct) -> m.SessionStartReply:
        try:
            data = await rpc.request(self.nc, subjects.agent_session(node, op), m.pack(msg),
                                     AGENT_TIMEOUT)
            return m.unpack(data, m.SessionStartReply)
        except NoResponder:
            return m.SessionStartReply(ok=False, reason=f"node {node} is not answering")
        except RemoteTimeout:
            return m.SessionStartReply(ok=False, reason=f"node {node} timed out")

    # ------------------------------------------------------------------ read

    async def get(self, sid: str) -> m.SessionRecord:
        found = await self.store.get(sid)
        if found is None:
            raise NotFoundError(f"no session {sid!r}; `shoal session list` shows them")
        return found[0]

    def find(self, state: str | None = None, node: str | None = None, name: str | None = None,
             labels: dict[str, str] | None = None) -> list[m.SessionRecord]:
        out = []
        for r in self.cache.records.values():
            if state and r.state != state and not (state == "live" and r.state in LIVE):
                continue
            if node and r.node != node:
                continue
            if name and r.name != name:
                continue
            if labels and any(r.spec.labels.get(k) != v for k, v in labels.items()):
                continue
            out.append(r)
        out.sort(key=lambda r: r.created)
        return out

    # ------------------------------------------------------------------ change

    async def signal(self, sid: str, signum: int) -> m.SessionRecord:
        record = await self.get(sid)
        if record.state in FINAL:
            raise ConflictError(f"session {sid} has already ended ({record.state})")
        if not record.node:
            raise ConflictError(f"session {sid} is {record.state}: not running on a node yet")
        reply = await self._ask(record.node, "signal", m.SessionSignal(id=sid, signum=signum))
        if not reply.ok:
            raise ConflictError(f"session {sid} is not running on {record.node}")
        return record

    async def kill(self, sid: str, reason: str = "killed on request",
                   reschedule: bool = False) -> m.SessionRecord:
        record = await self.get(sid)
        if record.state in FINAL:
            return record
        if record.node:
            reply = await self._ask(record.node, "signal",
                                    m.SessionSignal(id=sid, kill=True, reason=reason,
                                                    reschedule=reschedule))
            if reply.ok:
                return await self.get(sid)
        # Not placed yet, or its node does not know it: end the record directly.
        moved = await self.store.move_from(sid, LIVE, "killed", reason=reason)
        return moved or await self.get(sid)

    async def wait_final(self, sid: str, timeout: float) -> m.SessionRecord:
        deadline = time.monotonic() + timeout
        while True:
            record = await self.get(sid)
            if record.state in FINAL or time.monotonic() > deadline:
                return record
            await asyncio.sleep(0.1)

    async def remove(self, sid: str, grace: float = 15.0) -> None:
        record = await self.get(sid)
        if record.state not in FINAL:
            await self.kill(sid, "removed")
            record = await self.wait_final(sid, grace)
            if record.state not in FINAL:
                raise RemoteTimeout(f"session {sid} did not end within {grace:g}s; try again")
        # Output first: a purge the store refuses (full) leaves the record, so `rm` can be
        # run again once there is room, and no output is left behind without a record.
        await outputlog.purge(self.js, sid, strict=True)
        await self.store.delete(sid)

    # ------------------------------------------------------------------ nodes

    async def set_draining(self, node: str, draining: bool,
                           deadline: float | None = None) -> None:
        if self.registry.node(node) is None:
            raise NotFoundError(f"no node named {node!r}; `shoal nodes` lists them")
        reply = await self._ask(node, "drain", m.NodeDrain(draining=draining, deadline=deadline))
        if not reply.ok:
            raise ConflictError(f"node {node} did not accept the drain: {reply.reason}")

    async def drain(self, node: str, deadline: float | None, wait: bool) -> list[str]:
        """Stop placements on ``node``; at the deadline (kept by the agent) what still runs
        there ends, daemons with a restart policy starting again elsewhere. With ``wait``,
        return once nothing runs there. Returns the sessions left running."""
        await self.set_draining(node, True, deadline)
        while wait and self.find(node=node, state="live"):
            await asyncio.sleep(0.2)
        return [r.id for r in self.find(node=node, state="live")]

    # ------------------------------------------------------------------ reconciler

    async def _reconcile_loop(self) -> None:
        while True:
            await asyncio.sleep(RECONCILE_EVERY)
            try:
                await self.reconcile()
            except Exception as e:
                log.warning("reconcile failed: %s", e)

    async def reconcile(self) -> None:
        """One pass of ``shoal.logic.sessionreconcile.plan``: sessions on nodes that went
        down become lost (daemons with a restart policy are rescheduled); pending sessions
        that are due get placed; old records are purged."""
        # Heard from no node lately, or just back from an outage: more likely we are cut off
        # (or the agents have not caught up yet) than the nodes are dead.
        trusted = self.registry.fresh() and self.registry.settled()
        records = dict(self.cache.records)
        actions = sessionreconcile.plan(records.values(), self.registry.snapshot(),
                                        trusted=trusted, placing=self._placing,
                                        now=time.time(), retention=self.retention)
        for action in actions:
            try:
                await self._apply(action, records[action.id])
            except ShoalError as e:  # one record's trouble does not hold up the others
                log.warning("session %s: %s failed: %s", action.id,
                            type(action).__name__.lower(), e)

    async def _apply(self, action: sessionreconcile.Action, record: m.SessionRecord) -> None:
        """Each action is a compare-and-set on what the record is now: one that has moved
        on since the plan (placed elsewhere, ended) is left alone."""
        match action:
            case sessionreconcile.Reschedule(id=sid, node=node, why=why):
                await self.store.reschedule(sid, why, on_node=node, only_from=LIVE)
            case sessionreconcile.Lose(id=sid, node=node, why=why):
                await self.store.move_from(sid, LIVE, "lost", on_node=node, reason=why)
            case sessionreconcile.Place():
                self._placing.add(record.id)  # before the task runs: never placed twice
                asyncio.create_task(self.place(record))
            case sessionreconcile.Purge(id=sid):
                await self.store.delete(sid)
                await outputlog.purge(self.js, sid)


def _placed(r: m.SessionRecord, node: str, reply: m.SessionStartReply) -> m.SessionRecord:
    """``r`` placed on ``node``, which said yes with ``reply``: its next attempt."""
    # The node may run a throwaway user's session as itself (it cannot make users).
    user = reply.user if reply.user == "agent" else r.spec.user
    return msgspec.structs.replace(r, state="starting", ports=reply.ports,
                                   address=reply.address, user=user, requeued="",
                                   **sessionstate.placed(r, node))


def _what_runs(spec: m.SessionSpec) -> tuple[object, ...]:
    return (spec.command, spec.shell, spec.tty, spec.env, spec.cwd, spec.restart, spec.ports,
            spec.runtime, spec.image, spec.container_ports, spec.mounts, spec.network)


def _no_candidates_reason(spec: m.SessionSpec) -> str:
    if spec.runtime == "container":
        return ("no ready node with free capacity can run containers (`shoal nodes` shows "
                "which can: they need podman and runc)")
    if spec.node:
        return f"node {spec.node} is not ready or is full"
    if spec.selector:
        return "no ready node with free capacity matches the selector"
    return "every node is full, draining or down"
