"""The agent process: one or more logical nodes (``--virtual N``) on one NATS connection.

Each node answers run and session requests on its own subjects and keeps a ledger of its
cgroups and process groups; the process heartbeats all its nodes at once (``shoal.wire.hostbeat``:
one key per thousand nodes) and takes a run on many of its nodes as one batch request. Every
run and session lives in a cgroup of its own (agent/cgroups.py) where the node has them; the
agent says at start when it has none, and its heartbeats say which it has. On SIGTERM, SIGINT
or SIGHUP the agent stops taking work, ends every run and session (SIGTERM to each process,
then SIGKILL of the whole cgroup after the grace period), reports every exit, and leaves. If
it is SIGKILLed, its keeper (keeper.py) ends its cgroups at once, and the next start ends
whatever is still listed in the ledger (see ledger.py).

Self-fencing: when no heartbeat has been stored for longer than the node TTL (the heartbeat
bucket's, read at start), the controllers have declared this node down and are placing its
daemons elsewhere, so the agent ends here every session with a restart policy, without
writing its record (like Nomad's ``stop_after_client_disconnect``). Sessions without one
keep running: nothing replaces them, and the agent ends them only once it hears that the
fleet gave them up (``_verify_sessions``).

Over 400 lines: the agent process's wiring (connection and credentials, heartbeats and
self-fencing, request routing for many nodes); runs, sessions and processes are their own
modules.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import os
import resource
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Container
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from .. import __version__
from ..config import AgentConfig, shoal_home
from ..errors import AuthError, ConnectError
from ..natsio import bus
from ..natsio.outputlog import ACK_TIMEOUT, Fenced, describe_store_error
from ..system import stacks
from ..system.process import freeze_heap
from ..system.tasks import end_tasks
from ..wire import hostbeat, subjects
from ..wire import messages as m
from ..wire.reports import (
    OutputLast,
    OutputTrim,
    OutputWhere,
    OutputWhereReply,
    SessionsCheck,
    SessionsRestarted,
)
from . import cgroups, containers, identity, keeper, netpolicy, procs
from .cgroup_layout import Layout
from .ledger import Ledger, reap_leftovers
from .loadinfo import LoadSampler
from .looplag import LoopLag
from .ports import PortPool
from .process import agent_env
from .reporter import Reporter
from .runs import Run
from .sessions import SessionManager

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription

log = logging.getLogger(__name__)

STOP_REPORT_TIME = 10.0
BATCH_REPORT = 256  # nodes per RunBatchStarted message, at most
BATCH_SLICE = 0.01  # seconds of spawning between two turns of the event loop
EXIT_GATHER = 0.005  # seconds a batch's exits are gathered into one RunBatchExited
DEFAULT_NODE_TTL = 6.0  # when the heartbeat bucket does not say
RECONCILE_WAIT = 5.0  # the start waits this long for the controllers to settle leftovers
RECONCILING_AT_ONCE = 64  # nodes whose restart reports are in flight together


@dataclass
class Node:
    name: str
    ledger: Ledger
    runs: dict[str, Run] = field(default_factory=dict)
    state: m.NodeState = "ready"
    subs: list[Subscription] = field(default_factory=list)
    sessions: SessionManager | None = None
    drain_timer: asyncio.TimerHandle | None = None


@dataclass
class _RunRoute:
    """Per run, this host's nodes in it. Its control frames and output credit come on each
    node's own subscription (``shoal.agent.<node>.>``); a batch's control frames come once,
    to its lead, and apply to every node of the batch."""

    runs: dict[str, Run] = field(default_factory=dict)  # node name -> run
    batches: dict[str, list[str]] = field(default_factory=dict)  # lead -> its batch's nodes
    exits: list[m.Exit] = field(default_factory=list)  # a batch's, not yet reported
    flush: asyncio.TimerHandle | None = None
    running: int = 0  # a batch's runs started and not yet exited


class AgentHost:
    def __init__(self, cfg: AgentConfig, names: list[str]) -> None:
        if not names:
            raise ValueError("an agent needs at least one node name")
        self.cfg = cfg
        state_dir = Path(cfg.state_dir) if cfg.state_dir else shoal_home() / "agent-state"
        self.state_dir = state_dir
        # Units of this state directory's agents go under shoal.<tag>, apart from any other.
        self.cgroup_tag = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:12]
        self.layout: Layout | None = None
        self.podman, self.containers_reason = _podman(cfg)
        self._keeper: subprocess.Popen[bytes] | None = None
        self.nodes = {n: Node(n, Ledger(state_dir / "ledgers" / f"{n}.ledger", n)) for n in names}
        # A drained node stays drained across restarts of its agent until undrained.
        self.drained_dir = state_dir / "drained"
        self.nc: NatsClient | None = None
        self.buckets: bus.NodeBuckets | None = None
        self._reconciling: asyncio.Task[None] | None = None
        self._routes: dict[str, _RunRoute] = {}
        self._sampler = LoadSampler()
        self._last_load = m.Load()
        self._started_at = time.time()
        self._stopping = False
        self._stopped = asyncio.Event()
        self._heartbeat_task: asyncio.Task[None] | None = None
        self.host_id = secrets.token_hex(6)  # names this process's heartbeat keys
        self._batches: set[asyncio.Task[None]] = set()  # run batches spawning or reporting
        self._session_ops: set[asyncio.Task[None]] = set()  # session requests in flight
        self.lead = names[0]
        self._base_env = agent_env(os.environ)
        self.ports = PortPool.parse(cfg.ports)
        self.reporter: Reporter = None  # type: ignore[assignment]
        self._beat_soon = asyncio.Event()
        self.node_ttl = DEFAULT_NODE_TTL
        self._last_beat_ok = time.monotonic()
        self._lag = LoopLag()  # was this process away (stopped), not merely waiting?
        self._fenced_outage = False  # sessions already self-fenced in this outage
        self.netpolicy: netpolicy.Policy | None = None
        self.network = netpolicy.Status(netpolicy.UNENFORCED, "not started")
        self._renewer: asyncio.Task[None] | None = None
        self.refused = ""  # why NATS refused our credential for good (revoked, expired)
        self.refused_event = asyncio.Event()

    def _refused(self, why: str) -> None:
        log.error("%s", why)
        self.refused = why
        self.refused_event.set()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        found = cgroups.detect(self.cgroup_tag)
        if isinstance(found, str):
            log.warning("no cgroups (%s): sessions are contained by process group only, and "
                        "limits by setrlimit; a setsid'd or double-forked process can outlive "
                        "its session", found)
        else:
            self.layout = found
            procs.become_subreaper()  # orphans of sessions come to us, and we reap them
            log.info("cgroups: %s, units under %s", found.describe(),
                     ", ".join(found.base_dirs()))
        # Before any session runs: throwaway users never see an open loopback.
        self.netpolicy = await netpolicy.for_agent(self.cfg, self.state_dir, next(iter(self.nodes)))
        self.network = await netpolicy.apply(self.netpolicy)
        try:
            await self._start()
        except BaseException:  # an agent that never came up leaves no rules behind
            await netpolicy.remove(self.netpolicy.table)
            raise
        freeze_heap()

    async def _start(self) -> None:
        for node in self.nodes.values():
            await reap_leftovers(node.ledger, self.cfg.grace, self.layout)
            node.ledger.open()
        await self._remove_containers()
        if self.layout is not None:  # ends our cgroups at once if we die without stopping
            self._keeper = keeper.start(self.cfg.grace, list(self.nodes),
                                        self.layout.base_dirs())
        first = next(iter(self.nodes))
        label = first if len(self.nodes) == 1 else f"{first}+{len(self.nodes) - 1}"
        creds: Path | None = None
        if identity.uses_identity(self.cfg, self.state_dir, self.lead):
            self.cfg = await identity.ensure(self.cfg, self.state_dir, list(self.nodes))
            creds = Path(self.cfg.nats.creds or "")
            # Its credential may write its lead's heartbeat keys only.
            self.host_id = self.lead
        self.nc = await bus.connect(self.cfg.nats, f"shoal-agent {label}",
                                    inbox_prefix=subjects.node_inbox(self.lead),
                                    on_refused=self._refused)
        if creds is not None:
            self._renewer = asyncio.create_task(identity.renew_forever(self.nc, creds,
                                                                       self.lead))
        self.buckets = await self._open_buckets()
        self.reporter = Reporter(self.nc)
        try:
            ttl = (await self.buckets.heartbeats.status()).ttl
            if ttl:
                self.node_ttl = float(ttl)
        except Exception as e:
            log.warning("cannot read the node TTL (%s); assuming %gs", e, self.node_ttl)
        address = self.cfg.address or socket.gethostname()
        for node in self.nodes.values():
            node.sessions = SessionManager(
                node.name, self.nc, self.buckets.js, self.reporter, node.ledger,
                self.cfg.capacity, self.ports, self.cfg.grace, self._base_env, address,
                on_change=self._changed, layout=self.layout,
                ephemeral_uids=netpolicy.parse_uid_range(self.cfg.ephemeral_uids),
                podman=self.podman, container_mounts=tuple(self.cfg.container_mounts),
                allowed_users=self.cfg.run_as)
        for node in self.nodes.values():
            self._load_drain(node)
            if creds is not None:  # a node credential may not purge: controllers do it
                node.sessions.trim_output = self._trimmer(node.name)  # type: ignore[union-attr]
                # Nor read the output stream: where an attempt's output goes on, likewise.
                node.sessions.output_where = self._output_asker(node.name)  # type: ignore[union-attr]
        self._reconciling = asyncio.create_task(self._reconcile_sessions())
        # In the background past a while (no controller runs): offers wait for it.
        await asyncio.wait([self._reconciling], timeout=RECONCILE_WAIT)
        await self._heartbeat(register=True)
        _raise_open_files_limit()  # a run on thousands of nodes holds two pipes per node
        for node in self.nodes.values():
            # One subscription per node for all its subjects: each costs the agent a task.
            node.subs = [await self.nc.subscribe(subjects.agent_all(node.name),
                                                 cb=self._make_handler(node))]
        await self.nc.flush()
        self._lag.start()
        self._heartbeat_task = asyncio.create_task(self._heartbeat_loop())
        log.info("agent up: %d node(s), capacity %d each", len(self.nodes), self.cfg.capacity)

    async def _open_buckets(self) -> bus.NodeBuckets:
        assert self.nc is not None
        warned = False
        while True:
            try:
                return await bus.open_node_buckets(self.nc)
            except ConnectError as e:
                if not warned:
                    log.warning("%s; waiting", e)
                    warned = True
                await asyncio.sleep(1.0)

    async def stop(self) -> None:
        """Stop taking work, end every process, report, leave. Safe to call twice."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        log.info("agent stopping: ending %d run(s)", sum(len(n.runs) for n in self.nodes.values()))
        for node in self.nodes.values():
            node.state = "draining"
            for sub in node.subs:
                await _quietly(sub.unsubscribe())
        runs = [r for n in self.nodes.values() for r in n.runs.values()]
        for r in runs:
            r.end("the agent is stopping")
        ending = asyncio.gather(*(r.done.wait() for r in runs),
                                *(n.sessions.stop("the agent is stopping")
                                  for n in self.nodes.values() if n.sessions is not None))
        try:
            # Processes are killed after the grace period whatever happens; the extra time
            # is for recording final states, which needs NATS.
            await asyncio.wait_for(ending, self.cfg.grace + STOP_REPORT_TIME)
        except TimeoutError:
            log.warning("could not record every final state (is NATS down?); leaving anyway")
            for node in self.nodes.values():
                await reap_leftovers(node.ledger, 0, self.layout)
        if self.netpolicy is not None:  # every process is gone: nothing left to confine
            await netpolicy.remove(self.netpolicy.table)
        self._lag.stop()
        # Ended, not only cancelled: a heartbeat that ran on would list the node again after
        # its keys are deleted below.
        await end_tasks([self._reconciling, self._heartbeat_task, self._renewer])
        if self.nc is not None and self.buckets is not None:
            keys = hostbeat.host_keys(self.host_id, len(self.nodes))
            await asyncio.gather(*(_quietly(self.buckets.heartbeats.delete(k)) for k in keys),
                                 return_exceptions=True)
            await bus.close(self.nc)
        for node in self.nodes.values():
            node.ledger.close()
        if self._keeper is not None:
            await asyncio.to_thread(keeper.release, self._keeper)
        if self.layout is not None:
            for name in self.nodes:
                cgroups.drop_spares(name)
            for d in self.layout.base_dirs():
                cgroups.remove_dir(d)  # only if empty: other agents may share the state dir
        self._stopped.set()

    # ------------------------------------------------------------------ heartbeats

    def node_info(self, node: Node) -> m.NodeInfo:
        load = self._last_load
        return m.NodeInfo(
            name=node.name, labels=self.cfg.labels, capacity=self.cfg.capacity,
            sessions=node.sessions.live if node.sessions else 0, load=load,
            state="draining" if node.sessions and node.sessions.draining else node.state,
            version=__version__,
            address=self.cfg.address or socket.gethostname(), hostname=socket.gethostname(),
            pid=os.getpid(), started_at=self._started_at, last_seen=time.time(),
            isolation=os.geteuid() == 0, network=self.network.network,
            cgroups=self.layout.describe() if self.layout is not None else "",
            containers=self.podman is not None, containers_reason=self.containers_reason,
        )

    def _node_beat(self, node: Node) -> hostbeat.NodeBeat:
        mgr = node.sessions
        return hostbeat.NodeBeat(node.name, mgr.live if mgr else 0,
                                 "draining" if mgr and mgr.draining else node.state)

    async def _remove_containers(self) -> None:
        """Containers a previous agent of these nodes left (it was SIGKILLed: its keeper
        ended the ``podman run`` processes, but a container lives on under conmon). No
        session survives an agent restart, so none is kept."""
        if self.podman is None:
            return
        try:
            gone = await self.podman.remove_leftovers_of(set(self.nodes))
        except containers.ContainerError as e:
            log.warning("cannot look for containers a previous agent left: %s", e)
            return
        if gone:
            log.warning("removed %d container(s) a previous agent left: %s", len(gone),
                        ", ".join(gone))

    async def _heartbeat(self, register: bool = False) -> None:
        assert self.buckets is not None
        self._last_load = self._sampler.sample()
        common = self.node_info(self.nodes[self.lead])
        beats = hostbeat.split(self.host_id, self.lead, common,
                               [self._node_beat(n) for n in self.nodes.values()])
        puts = [self.buckets.heartbeats.put(key, hostbeat.encode(beat)) for key, beat in beats]
        if register:  # the registry keeps every node ever seen, one key each, written once
            puts += [self.buckets.registry.put(n.name, msgspec.json.encode(self.node_info(n)))
                     for n in self.nodes.values()]
        results = await asyncio.gather(*puts, return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            log.warning("heartbeat: %d of %d puts failed: %s", len(failed), len(puts),
                        describe_store_error(failed[0]))
        else:
            self._last_beat_ok = time.monotonic()
            self._fenced_outage = False

    def _self_fence(self) -> None:
        """Cut off for longer than the node TTL: our daemons are being placed elsewhere.

        Only when this agent was itself away (stopped, frozen: its loop did not run, or its
        NATS connection is down): heartbeats that merely fail to store while we are
        connected are the whole fleet's pause (a stream electing a leader), in which the
        controllers give no verdict for ``PAUSE_VERDICT`` TTLs; past that, we fence too."""
        now = time.monotonic()
        silent = now - self._last_beat_ok
        stalled = self._lag.take() > self.node_ttl
        if self._fenced_outage or silent <= self.node_ttl:
            return
        away = stalled or self.nc is None or not self.nc.is_connected
        if not away and silent <= hostbeat.PAUSE_VERDICT * self.node_ttl:
            return
        self._fenced_outage = True
        why = (f"no heartbeat stored for {silent:.0f}s (node TTL {self.node_ttl:g}s): the "
               "fleet is placing this session elsewhere")
        ended = 0
        for node in self.nodes.values():
            for session in list(node.sessions.sessions.values()) if node.sessions else ():
                if session.spec.restart != "never":
                    session.fence(why)
                    ended += 1
        log.warning("self-fencing: %s; ended %d session(s) with a restart policy", why, ended)

    def _trimmer(self, name: str):  # type: ignore[no-untyped-def]
        subject = subjects.node_report(name, subjects.REPORT_TRIM)

        async def trim(session: str, keep: int) -> None:
            assert self.nc is not None  # answered once the purge is done (or refused)
            await self.nc.request(subject, msgspec.msgpack.encode(OutputTrim(session, keep)),
                                  timeout=ACK_TIMEOUT)

        return trim

    def _output_asker(self, name: str) -> Callable[[str, int], Awaitable[OutputLast]]:
        subject = subjects.node_report(name, subjects.REPORT_OUTPUT)

        async def where(session: str, epoch: int) -> OutputLast:
            assert self.nc is not None
            msg = await self.nc.request(subject, msgspec.msgpack.encode(
                OutputWhere(session, epoch)), timeout=ACK_TIMEOUT)
            reply = msgspec.msgpack.decode(msg.data, type=OutputWhereReply)
            if not reply.ok:
                raise Fenced(reply.reason)
            return reply.last

        return where

    def _changed(self) -> None:
        """Session count changed: tell the schedulers soon, not at the next beat."""
        self._beat_soon.set()

    async def _heartbeat_loop(self) -> None:
        beats = 0
        verifying: asyncio.Task[None] | None = None
        while True:
            self._beat_soon.clear()
            try:
                await asyncio.wait_for(self._beat_soon.wait(), self.cfg.heartbeat)
                await asyncio.sleep(0.05)  # coalesce a burst of changes
            except TimeoutError:
                pass
            beats += 1
            self._self_fence()  # first: a SIGCONT wakes us here, before any beat
            if self.layout is not None:
                procs.reap_orphans(self.layout.base)  # orphans that died meanwhile
            try:
                await self._heartbeat()
            except Exception as e:  # keep beating through NATS outages
                log.warning("heartbeat failed: %s", e)
            # Beside the beats, never in their way: reads wait out a stream's leader
            # election, and a node that stops beating that long looks lost.
            if beats % 5 == 0 and (verifying is None or verifying.done()):
                verifying = asyncio.create_task(self._verify_quietly())

    # ------------------------------------------------------------------ sessions

    def _make_session_handler(self, node: Node):  # type: ignore[no-untyped-def]
        async def handle(msg: Msg) -> None:
            op = msg.subject.rsplit(".", 1)[-1]
            mgr = node.sessions
            assert mgr is not None
            if op == "go":  # a plain message, no answer
                try:
                    mgr.handle_go(m.unpack(msg.data, m.SessionGo))
                except msgspec.DecodeError as e:
                    log.warning("bad go for a session of %s: %s", node.name, e)
                return
            try:
                if op == "start":
                    reply = await mgr.handle_start(m.unpack(msg.data, m.SessionStart))
                    await msg.respond(m.pack(reply))
                elif op == "signal":
                    found = mgr.handle_signal(m.unpack(msg.data, m.SessionSignal))
                    await msg.respond(m.pack(m.SessionStartReply(ok=found)))
                elif op == "drain":
                    req = m.unpack(msg.data, m.NodeDrain)
                    deadline = time.time() + req.deadline if req.deadline is not None else None
                    self._set_drain(node, req.draining, deadline)
                    await msg.respond(m.pack(m.SessionStartReply(ok=True)))
            except msgspec.DecodeError as e:
                await msg.respond(m.pack(m.SessionStartReply(ok=False, reason=f"bad request: {e}")))

        return handle

    def _set_drain(self, node: Node, draining: bool, deadline: float | None) -> None:
        """Drain or undrain ``node``, remembered on disk; at ``deadline`` (epoch seconds)
        end its sessions, daemons going back to the scheduler."""
        mgr = node.sessions
        assert mgr is not None
        mgr.draining = draining
        marker = self.drained_dir / node.name
        if node.drain_timer is not None:
            node.drain_timer.cancel()
            node.drain_timer = None
        if draining:
            self.drained_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            marker.write_text("" if deadline is None else f"{deadline}\n")
            if deadline is not None:
                node.drain_timer = asyncio.get_running_loop().call_later(
                    max(0.0, deadline - time.time()), mgr.end_all, f"node {node.name} drained")
        else:
            marker.unlink(missing_ok=True)
        self._changed()

    def _load_drain(self, node: Node) -> None:
        marker = self.drained_dir / node.name
        try:
            text = marker.read_text().strip()
        except FileNotFoundError:
            return
        try:
            deadline = float(text) if text else None
        except ValueError:
            deadline = None
        self._set_drain(node, True, deadline)

    async def _reconcile_sessions(self) -> None:
        """Records that say a session runs here, from before this start: their processes
        were ended with the leftovers. Each node says it restarted and the controllers
        settle its records (daemons rescheduled, the rest lost); until then it takes no
        placement, which the controllers would count among the leftovers."""
        gate = asyncio.Semaphore(RECONCILING_AT_ONCE)

        async def one(node: Node) -> None:
            async with gate:
                await self.reporter.send(node.name, SessionsRestarted())
            assert node.sessions is not None
            node.sessions.reconciled = True

        await asyncio.gather(*(one(n) for n in self.nodes.values()))

    async def _verify_quietly(self) -> None:
        try:
            await self._verify_sessions()
        except Exception as e:
            log.warning("checking sessions against their records failed: %s", e)

    async def _verify_sessions(self) -> None:
        """After a partition the fleet may have given up on a session and moved it: a local
        copy that the record no longer names is ended without touching the record. The
        controllers say which (a node cannot read records)."""
        for node in self.nodes.values():
            assert node.sessions is not None
            mine = dict(node.sessions.sessions)
            if not mine:
                continue
            reply = await self.reporter.once(node.name, SessionsCheck(
                {sid: s.attempt for sid, s in mine.items()}))
            for sid, why in reply.gone.items():
                session = mine.get(sid)
                if session is not None and node.sessions.sessions.get(sid) is session:
                    session.fence(why)

    # ------------------------------------------------------------------ runs

    def _make_handler(self, node: Node):  # type: ignore[no-untyped-def]
        on_session = self._make_session_handler(node)

        async def handle(msg: Msg) -> None:
            # shoal.agent.<node>.run | .runs | .session.<op> | .ctl.run.<id> | .ack.run.<id>
            op = msg.subject.split(".", 3)[3]
            if op.startswith("ctl.run."):
                self._on_run_control(node, op[8:], msg)
            elif op.startswith("ack.run."):
                self._on_output_ack(node, op[8:], msg)
            elif op.startswith("ctl.session."):
                pass  # the session's own subscription takes its frames
            elif op == "run":
                await self._on_run_request(node, msg)
            elif op == "runs":
                await self._on_run_batch(msg)
            elif op.startswith("session."):
                # Not awaited: nats-py runs one subscription's callbacks one at a time, and a
                # start waits on the store (handle_start reserves capacity before any await).
                task = asyncio.create_task(on_session(msg))
                self._session_ops.add(task)
                task.add_done_callback(self._session_op_done)

        return handle

    def _session_op_done(self, task: asyncio.Task[None]) -> None:
        self._session_ops.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("session request failed: %r", task.exception())

    async def _on_run_batch(self, msg: Msg) -> None:
        """One run on many of our nodes: say at once which we take, then start them,
        reporting the pids a group at a time (so a 9,000-node batch is not 9,000 replies
        racing the controller's timeout)."""
        try:
            req = m.unpack(msg.data, m.RunBatch)
        except msgspec.DecodeError as e:
            await msg.respond(m.pack(m.RunBatchAck(reason=f"bad request: {e}")))
            return
        if self._stopping:
            await msg.respond(m.pack(m.RunBatchAck(reason="the agent is stopping")))
            return
        mine, refused = split_batch(req.nodes, self.nodes)
        route = self._route(req.run_id)
        route.batches[msg.subject.split(".")[2]] = mine
        await msg.respond(m.pack(m.RunBatchAck(refused=refused)))
        # Spawn in a task of its own: this subscription's next message (another run's batch,
        # a session request for the lead) must not wait seconds for these spawns.
        task = asyncio.create_task(self._start_batch(req, mine, route))
        self._batches.add(task)
        task.add_done_callback(self._batches.discard)

    async def _start_batch(self, req: m.RunBatch, mine: list[str], route: _RunRoute) -> None:
        one = m.RunRequest(run_id=req.run_id, spec=req.spec, window=req.window)
        events = subjects.run_events(req.run_id, self.lead)
        left = iter(mine)
        found: dict[tuple[str, str], str] = {}  # its command in PATH, looked up once
        more = True
        while more:
            # A slice of spawns in one synchronous step (procs.batch), then its reports.
            started: list[tuple[str, int]] = []
            refused: list[tuple[str, m.Exit]] = []
            slice_end = time.monotonic() + BATCH_SLICE
            with procs.batch(found):
                while len(started) < BATCH_REPORT and time.monotonic() < slice_end:
                    name = next(left, None)
                    if name is None:
                        more = False
                        break
                    if self._stopping:  # stop() ends what started; the rest never starts
                        refused.append((name, m.Exit(node=name, code=None,
                                                     reason="the agent is stopping")))
                        continue
                    reply = self._start_run(self.nodes[name], route, one, batched=True)
                    if isinstance(reply, m.RunAccepted):
                        started.append((name, reply.pid))
                        route.running += 1
                    else:
                        refused.append((name, reply))
            for name, reply in refused:
                await self._publish(subjects.run_events(req.run_id, name), reply)
            # Queued before any exit of these: their supervisors run only once we yield.
            if started:
                await self._publish(events, m.RunBatchStarted(started=started))
            if more:
                # Let heartbeats, exits and output through: a loop busy spawning for seconds
                # would miss beats and its nodes would look down.
                await asyncio.sleep(0)
        self._maybe_drop_route(req.run_id)

    async def _publish(self, subject: str, msg: object) -> None:
        assert self.nc is not None
        try:
            await self.nc.publish(subject, m.pack(msg))
        except Exception as e:  # a closed connection while stopping
            log.debug("cannot publish run event: %s", e)

    def _start_run(self, node: Node, route: _RunRoute, req: m.RunRequest,
                   batched: bool = False) -> m.RunAccepted | m.Exit:
        on_exit = functools.partial(self._batch_exit, req.run_id, route) if batched else None
        run = Run(self.nc, node.name, req, self.cfg.grace,  # type: ignore[arg-type]
                  node.ledger, self.layout, allowed_users=self.cfg.run_as, on_exit=on_exit)
        reply = run.start(self._base_env)
        if isinstance(reply, m.RunAccepted):
            node.runs[req.run_id] = run
            route.runs[node.name] = run
            run.on_done = functools.partial(self._forget, node, route, req.run_id)
        return reply

    async def _on_run_request(self, node: Node, msg: Msg) -> None:
        try:
            req = m.unpack(msg.data, m.RunRequest)
        except msgspec.DecodeError as e:
            await msg.respond(m.pack(m.RunRefused(node=node.name, reason=f"bad request: {e}")))
            return
        if self._stopping:
            await msg.respond(m.pack(m.RunRefused(node=node.name, reason="the agent is stopping")))
            return
        route = self._route(req.run_id)
        reply = self._start_run(node, route, req)
        if not isinstance(reply, m.RunAccepted):
            self._maybe_drop_route(req.run_id)
        await msg.respond(m.pack(reply))

    def _batch_exit(self, run_id: str, route: _RunRoute, exit_: m.Exit) -> None:
        """Gather the exits of a batch's nodes: reported a few hundred at a time, on the
        lead's subject, after their RunBatchStarted (queued before any exit of theirs)."""
        route.exits.append(exit_)
        route.running -= 1
        # The last one is not held back: nothing more is coming to gather it with.
        if len(route.exits) >= BATCH_REPORT or route.running <= 0 or self._stopping:
            self._flush_exits(run_id, route)
        elif route.flush is None:
            route.flush = asyncio.get_running_loop().call_later(
                EXIT_GATHER, self._flush_exits, run_id, route)

    def _flush_exits(self, run_id: str, route: _RunRoute) -> None:
        if route.flush is not None:
            route.flush.cancel()
            route.flush = None
        exits, route.exits = route.exits, []
        if exits:
            task = asyncio.create_task(self._publish(subjects.run_events(run_id, self.lead),
                                                     m.RunBatchExited(exits=exits)))
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)

    def _route(self, run_id: str) -> _RunRoute:
        return self._routes.setdefault(run_id, _RunRoute())

    def _on_run_control(self, node: Node, run_id: str, msg: Msg) -> None:
        route = self._routes.get(run_id)
        if route is None:
            return
        try:
            frame = m.unpack_control(msg.data)
        except msgspec.DecodeError:
            return
        for name in route.batches.get(node.name, [node.name]):
            run = route.runs.get(name)
            if run is not None:
                run.on_control(frame)

    def _on_output_ack(self, node: Node, run_id: str, msg: Msg) -> None:
        route = self._routes.get(run_id)
        run = route.runs.get(node.name) if route else None
        if run is not None:
            try:
                run.on_output_ack(m.unpack(msg.data, m.OutputAck))
            except msgspec.DecodeError:
                pass

    def _forget(self, node: Node, route: _RunRoute, run_id: str) -> None:
        """A run has ended (a callback, not a task per run: 10,000 runs, 10,000 tasks)."""
        node.runs.pop(run_id, None)
        route.runs.pop(node.name, None)
        self._maybe_drop_route(run_id)

    def _maybe_drop_route(self, run_id: str) -> None:
        route = self._routes.get(run_id)
        if route is not None and not route.runs:
            del self._routes[run_id]


def _podman(cfg: AgentConfig) -> tuple[containers.Podman | None, str]:
    """The node's podman, or None and why this node cannot run containers."""
    if not cfg.podman:
        return None, "container sessions are turned off on this node (its podman setting)"
    pod = containers.Podman(cfg.podman, cfg.podman_runtime, cfg.podman_root or None,
                            cfg.podman_runroot or None, cfg.container_publish)
    why = pod.unavailable()
    return (None, why) if why else (pod, "")


async def _quietly(aw: object) -> None:
    try:
        await aw  # type: ignore[misc]
    except Exception as e:
        log.debug("ignored during shutdown: %s", e)


def split_batch(names: list[str], served: Container[str]) -> tuple[list[str], list[str]]:
    """A batch's nodes as (ours, not ours), each once, in the order given."""
    mine: list[str] = []
    refused: list[str] = []
    seen: set[str] = set()
    for name in names:
        if name in seen:
            continue
        seen.add(name)
        (mine if name in served else refused).append(name)
    return mine, refused


def _raise_open_files_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as e:
            log.debug("cannot raise the open files limit: %s", e)


def virtual_names(prefix: str, count: int) -> list[str]:
    return [f"{prefix}{i}" for i in range(1, count + 1)]


async def run_agent(cfg: AgentConfig, names: list[str]) -> None:
    """Run an agent until SIGTERM, SIGINT or SIGHUP, then stop it cleanly."""
    host = AgentHost(cfg, names)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    stacks.dump_on_signal(loop)
    try:
        await host.start()
    except Exception:
        if host.refused:  # the server ended us over the credential while we started
            raise AuthError(host.refused) from None
        raise
    waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(host.refused_event.wait())]
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for w in waits:
        w.cancel()
    await host.stop()
    if host.refused:
        raise AuthError(host.refused)
