"""The agent process: one or more logical nodes (``--virtual N``) on one NATS connection.

Each node answers run requests on its own subject, heartbeats its load into the heartbeat
bucket, and keeps a ledger of its cgroups and process groups. Every run and session lives in
a cgroup of its own (agent/cgroups.py) where the node has them; the agent says at start when
it has none, and its heartbeats say which it has. On SIGTERM, SIGINT or SIGHUP the agent
stops taking work, ends every run and session (SIGTERM to each process, then SIGKILL of the
whole cgroup after the grace period), reports every exit, and leaves. If it is SIGKILLed, its
keeper (keeper.py) ends its cgroups at once, and the next start ends whatever is still
listed in the ledger (see ledger.py).

Self-fencing: when no heartbeat has been stored for longer than the node TTL (the heartbeat
bucket's, read at start), the controllers have declared this node down and are placing its
daemons elsewhere, so the agent ends here every session with a restart policy, without
writing its record (like Nomad's ``stop_after_client_disconnect``). Sessions without one
keep running: nothing replaces them, and the agent ends them only once it hears that the
fleet gave them up (``_verify_sessions``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from .. import __version__, bus, subjects
from .. import messages as m
from ..config import AgentConfig, shoal_home
from ..errors import ConnectError
from ..loadinfo import LoadSampler
from ..outputlog import describe_store_error
from ..sessionstate import FINAL, LIVE
from ..sessionstore import SessionCache, SessionStore
from . import cgroups, keeper, netpolicy, procs
from .cgroup_layout import Layout
from .ledger import Ledger, reap_leftovers
from .ports import PortPool
from .runs import Run
from .sessions import SessionManager

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription

log = logging.getLogger(__name__)

STOP_REPORT_TIME = 10.0
DEFAULT_NODE_TTL = 6.0  # when the heartbeat bucket does not say


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
    """Per run, one pair of subscriptions shared by all of this host's nodes in it."""

    ctl: Subscription
    ack: Subscription
    runs: dict[str, Run] = field(default_factory=dict)  # node name -> run


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
        self._keeper: subprocess.Popen[bytes] | None = None
        self.nodes = {n: Node(n, Ledger(state_dir / "ledgers" / f"{n}.ledger", n)) for n in names}
        # A drained node stays drained across restarts of its agent until undrained.
        self.drained_dir = state_dir / "drained"
        self.nc: NatsClient | None = None
        self.buckets: bus.Buckets | None = None
        self._routes: dict[str, _RunRoute] = {}
        self._sampler = LoadSampler()
        self._last_load = m.Load()
        self._started_at = time.time()
        self._stopping = False
        self._stopped = asyncio.Event()
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._base_env = dict(os.environ)
        first_port, _, last_port = cfg.ports.partition("-")
        self.ports = PortPool(int(first_port), int(last_port or first_port))
        self.store: SessionStore = None  # type: ignore[assignment]
        self._beat_soon = asyncio.Event()
        self.node_ttl = DEFAULT_NODE_TTL
        self._last_beat_ok = time.monotonic()
        self._fenced_outage = False  # sessions already self-fenced in this outage
        self.netpolicy: netpolicy.Policy | None = None
        self.network = netpolicy.Status(netpolicy.UNENFORCED, "not started")

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

    async def _start(self) -> None:
        for node in self.nodes.values():
            await reap_leftovers(node.ledger, self.cfg.grace, self.layout)
            node.ledger.open()
        if self.layout is not None:  # ends our cgroups at once if we die without stopping
            self._keeper = keeper.start(self.cfg.grace, list(self.nodes),
                                        self.layout.base_dirs())
        first = next(iter(self.nodes))
        label = first if len(self.nodes) == 1 else f"{first}+{len(self.nodes) - 1}"
        self.nc = await bus.connect(self.cfg.nats, f"shoal-agent {label}",
                                    inbox_prefix=bus.AGENT_INBOX)
        self.buckets = await self._open_buckets()
        self.store = SessionStore(self.buckets.sessions)
        try:
            ttl = (await self.buckets.heartbeats.status()).ttl
            if ttl:
                self.node_ttl = float(ttl)
        except Exception as e:
            log.warning("cannot read the node TTL (%s); assuming %gs", e, self.node_ttl)
        address = self.cfg.address or socket.gethostname()
        for node in self.nodes.values():
            node.sessions = SessionManager(
                node.name, self.nc, self.buckets.js, self.store, node.ledger,
                self.cfg.capacity, self.ports, self.cfg.grace, self._base_env, address,
                on_change=self._changed, layout=self.layout,
                ephemeral_uids=netpolicy.parse_uid_range(self.cfg.ephemeral_uids))
        for node in self.nodes.values():
            self._load_drain(node)
        await self._reconcile_sessions()
        await self._heartbeat(register=True)
        for node in self.nodes.values():
            node.subs = [
                await self.nc.subscribe(subjects.agent_run(node.name),
                                        cb=self._make_handler(node)),
                await self.nc.subscribe(subjects.agent_session(node.name, "*"),
                                        cb=self._make_session_handler(node)),
            ]
        await self.nc.flush()
        self._heartbeat_task = asyncio.create_task(self._heartbeat_loop())
        log.info("agent up: %d node(s), capacity %d each", len(self.nodes), self.cfg.capacity)

    async def _open_buckets(self) -> bus.Buckets:
        assert self.nc is not None
        warned = False
        while True:
            try:
                return await bus.open_buckets(self.nc)
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
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
        if self.nc is not None and self.buckets is not None:
            await asyncio.gather(*(_quietly(self.buckets.heartbeats.delete(n))
                                   for n in self.nodes), return_exceptions=True)
            await bus.close(self.nc)
        for node in self.nodes.values():
            node.ledger.close()
        if self._keeper is not None:
            await asyncio.to_thread(keeper.release, self._keeper)
        if self.layout is not None:
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
        )

    async def _heartbeat(self, register: bool = False) -> None:
        assert self.buckets is not None
        self._last_load = self._sampler.sample()
        infos = [(n.name, msgspec.json.encode(self.node_info(n))) for n in self.nodes.values()]
        puts = [self.buckets.heartbeats.put(name, data) for name, data in infos]
        if register:
            puts += [self.buckets.registry.put(name, data) for name, data in infos]
        results = await asyncio.gather(*puts, return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            log.warning("heartbeat: %d of %d puts failed: %s", len(failed), len(puts),
                        describe_store_error(failed[0]))
        else:
            self._last_beat_ok = time.monotonic()
            self._fenced_outage = False

    def _self_fence(self) -> None:
        """Cut off for longer than the node TTL: our daemons are being placed elsewhere."""
        silent = time.monotonic() - self._last_beat_ok
        if self._fenced_outage or silent <= self.node_ttl:
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
        were ended with the leftovers, so say so (the controller reschedules daemons)."""
        cache = SessionCache(self.buckets.sessions)  # type: ignore[union-attr]
        await cache.start()
        await cache.stop()
        for rec in cache.records.values():
            if rec.node not in self.nodes or rec.state not in LIVE:
                continue
            if rec.spec.restart != "never":  # a daemon: the scheduler starts it again
                await self.store.move(rec.id, "pending", node="", pid=0, ports=[],
                                      restarts=rec.restarts + 1,
                                      reason=f"rescheduling: agent of {rec.node} restarted")
            else:
                await self.store.move(rec.id, "lost", reason=f"agent of {rec.node} restarted")

    async def _verify_quietly(self) -> None:
        try:
            await self._verify_sessions()
        except Exception as e:
            log.warning("checking sessions against their records failed: %s", e)

    async def _verify_sessions(self) -> None:
        """After a partition the fleet may have given up on a session and moved it: a local
        copy that the record no longer names is ended without touching the record."""
        for node in self.nodes.values():
            assert node.sessions is not None
            for sid, session in list(node.sessions.sessions.items()):
                found = await self.store.get(sid)
                if found is None or found[0].node != node.name or found[0].state in FINAL \
                        or found[0].attempt != session.attempt:
                    session.fence("the fleet gave this session up (node was unreachable)")

    # ------------------------------------------------------------------ runs

    def _make_handler(self, node: Node):  # type: ignore[no-untyped-def]
        async def handle(msg: Msg) -> None:
            await self._on_run_request(node, msg)

        return handle

    async def _on_run_request(self, node: Node, msg: Msg) -> None:
        try:
            req = m.unpack(msg.data, m.RunRequest)
        except msgspec.DecodeError as e:
            await msg.respond(m.pack(m.RunRefused(node=node.name, reason=f"bad request: {e}")))
            return
        if self._stopping:
            await msg.respond(m.pack(m.RunRefused(node=node.name, reason="the agent is stopping")))
            return
        route = await self._route(req.run_id)
        run = Run(self.nc, node.name, req, self.cfg.grace,  # type: ignore[arg-type]
                  node.ledger, self.layout)
        reply = run.start(self._base_env)
        if isinstance(reply, m.RunAccepted):
            node.runs[req.run_id] = run
            route.runs[node.name] = run
            asyncio.create_task(self._forget(node, route, req.run_id, run))
        else:
            await self._maybe_drop_route(req.run_id)
        await msg.respond(m.pack(reply))

    async def _route(self, run_id: str) -> _RunRoute:
        route = self._routes.get(run_id)
        if route is not None:
            return route
        assert self.nc is not None

        async def on_ctl(msg: Msg) -> None:
            try:
                frame = m.unpack_control(msg.data)
            except msgspec.DecodeError:
                return
            r = self._routes.get(run_id)
            for run in list(r.runs.values()) if r else ():
                run.on_control(frame)

        async def on_ack(msg: Msg) -> None:
            node = msg.subject.rsplit(".", 1)[-1]
            r = self._routes.get(run_id)
            run = r.runs.get(node) if r else None
            if run is not None:
                try:
                    run.on_output_ack(m.unpack(msg.data, m.OutputAck))
                except msgspec.DecodeError:
                    pass

        ctl = await self.nc.subscribe(subjects.run_control(run_id), cb=on_ctl)
        ack = await self.nc.subscribe(subjects.run_output_ack(run_id, "*"), cb=on_ack)
        route = self._routes.setdefault(run_id, _RunRoute(ctl, ack))
        if route.ctl is not ctl:  # another node of ours raced us to it
            await ctl.unsubscribe()
            await ack.unsubscribe()
        return route

    async def _forget(self, node: Node, route: _RunRoute, run_id: str, run: Run) -> None:
        await run.done.wait()
        node.runs.pop(run_id, None)
        route.runs.pop(node.name, None)
        await self._maybe_drop_route(run_id)

    async def _maybe_drop_route(self, run_id: str) -> None:
        route = self._routes.get(run_id)
        if route is not None and not route.runs:
            del self._routes[run_id]
            await _quietly(route.ctl.unsubscribe())
            await _quietly(route.ack.unsubscribe())


async def _quietly(aw: object) -> None:
    try:
        await aw  # type: ignore[misc]
    except Exception as e:
        log.debug("ignored during shutdown: %s", e)


def virtual_names(prefix: str, count: int) -> list[str]:
    return [f"{prefix}{i}" for i in range(1, count + 1)]


async def run_agent(cfg: AgentConfig, names: list[str]) -> None:
    """Run an agent until SIGTERM, SIGINT or SIGHUP, then stop it cleanly."""
    host = AgentHost(cfg, names)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    await host.start()
    await stop.wait()
    await host.stop()
