"""Sessions on one node: the agent side of the session lifecycle.

The controller writes a ``pending`` record and offers it to a node (the record in the
request: a node cannot read the bucket). The node says no when it is full, draining or out of
ports (the scheduler then tries the next node); else it reserves room and ports and says
yes; the controller writes the record ``starting`` there and says go, and only then does the
process start. From then on the node reports what happens (``running``, restarts by policy,
exactly one final state) and the controllers write it (agent/reporter.py,
controller/reports.py): a node never touches a record itself.

Output goes to the durable stream (``shoal.natsio.outputlog``) with bounded unacknowledged bytes:
when JetStream lags, the node stops reading the pipe and the process blocks on write.

A session is policy on top of the process owner (agent/process.py): restarts, limits, who it
runs as, containers, watchdogs and the record; the process, its output, input and end are
the owner's. (Over 400 lines: the session's lifecycle and its manager, read together.)

Over 400 lines: the agent's whole side of the session lifecycle (placement answer,
restarts, throwaway users, limits, containers, watchdogs, fencing) reads best in one place;
the process itself is agent/process.py.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import signal
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec

from ..logic import sessionstate
from ..natsio.outputlog import DEFAULT_CAP, OutputWriter
from ..wire import messages as m
from ..wire import reports as r
from ..wire import subjects
from ..wire.reports import OutputLast
from . import containers, runas, users
from .cgroup_layout import Layout, unit_name
from .ledger import Ledger
from .ports import PortPool
from .process import Launch, Process, child_env, command_argv, read_size_for
from .procs import RunAs, SpawnError
from .reporter import Reporter
from .sandbox import Sandbox

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription
    from nats.js import JetStreamContext

log = logging.getLogger(__name__)

FAST_FAILURE = 10.0  # a run shorter than this counts towards giving up
GIVE_UP_AFTER = 5
MAX_BACKOFF = 30.0
# What the `podman run` client keeps of the agent's environment (never its SHOAL_ secrets).
PODMAN_ENV = frozenset({"PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "XDG_RUNTIME_DIR"})
KILL_OUTPUT_GRACE = 5.0  # a killed session's output still unstored then is dropped
# What a throwaway user gets unless the spec says otherwise.
EPHEMERAL_LIMITS = m.Limits(memory_mb=2048, processes=512, file_size_mb=1024, open_files=4096)
# How long a yes waits for the controller's go before asking whether the record names us
# (the go is a plain message: lost if the connection blinks, or the controller died).
GO_TIMEOUT = 10.0


def effective_limits(limits: m.Limits, ephemeral: bool) -> m.Limits:
    if not ephemeral:
        return limits
    fields = {f: getattr(limits, f) if getattr(limits, f) is not None
              else getattr(EPHEMERAL_LIMITS, f) for f in m.Limits.__struct_fields__}
    return m.Limits(**fields)


def _rlimits(limits: m.Limits, cgroup: frozenset[str] = frozenset()) -> tuple[tuple[int, int], ...]:
    """setrlimit for what the session's cgroup (controllers in ``cgroup``) does not bound:
    a cgroup memory limit ends in the OOM killer, RLIMIT_AS in failed allocations."""
    out = []
    if limits.cpu_seconds:
        out.append((resource.RLIMIT_CPU, limits.cpu_seconds))
    if limits.memory_mb and "memory" not in cgroup:
        out.append((resource.RLIMIT_AS, limits.memory_mb << 20))
    if limits.processes and "pids" not in cgroup:
        out.append((resource.RLIMIT_NPROC, limits.processes))
    if limits.open_files:
        out.append((resource.RLIMIT_NOFILE, limits.open_files))
    if limits.file_size_mb:
        out.append((resource.RLIMIT_FSIZE, limits.file_size_mb << 20))
    return tuple(out)


def should_restart(policy: m.RestartPolicy, code: int | None, killed: bool) -> bool:
    if killed or policy == "never":
        return False
    return policy == "always" or code != 0


class Session:
    """One session on this node, across its restarts."""

    def __init__(self, mgr: SessionManager, record: m.SessionRecord, ports: list[int]) -> None:
        self.mgr = mgr
        self.id = record.id
        self.spec = record.spec
        self.record = record
        self.ports = ports
        self.proc: Process | None = None
        self.user: users.EphemeralUser | None = None
        self.named: runas.NamedUser | None = None  # a user of the agent's run_as
        self.writer = OutputWriter(mgr.js, record.id, mgr.node,
                                   cap=record.spec.output_cap or DEFAULT_CAP,
                                   start_offset=record.output_bytes, trim=mgr.trim_output,
                                   where=mgr.output_where)
        self.writer.on_unblock = self._resume_reading
        self.read_size = read_size_for(mgr.nc.max_payload)
        self.writer.on_fenced = lambda: self.fence("a newer attempt writes its output")
        self.attempt = record.attempt  # this placement's fencing epoch
        self.kill_reason = ""
        self.restarts = record.restarts
        self.fast_failures = 0
        self.last_activity = time.monotonic()
        self.last_attached = time.monotonic()
        self.done = asyncio.Event()
        self._sub: Subscription | None = None
        self._reporting: asyncio.Task[None] | None = None  # the last report posted
        self._wake = asyncio.Event()
        self.detached_from_record = False  # the fleet moved on: never write the record again
        self.reschedule = False
        self.size = (record.spec.cols, record.spec.rows)
        # A container session's container (podman's name for it), else None.
        self.container = (containers.container_name(mgr.node, record.id)
                          if record.spec.runtime == "container" else None)
        self._removed = True  # nothing to remove until a container is started

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        try:
            await self._run()
        except Exception as e:  # never leave a record live behind us
            log.exception("session %s failed in the agent", self.id)
            await self._finish("failed", reason=f"agent error: {e}")
        finally:
            await self._cleanup()
            self.done.set()

    async def _run(self) -> None:
        self._sub = await self.mgr.nc.subscribe(subjects.session_control(self.mgr.node, self.id),
                                                cb=self._on_control)
        if self.spec.user == "ephemeral":
            try:
                self.user = await asyncio.to_thread(users.create, self.mgr.ephemeral_uids)
                self.mgr.ledger.add_user(self.user.name)
            except users.UserError as e:
                await self._finish("failed", reason=str(e))
                return
        elif self.spec.user != "agent":
            try:
                self.named = runas.resolve(self.spec.user, self.mgr.allowed_users)
            except runas.RunAsError as e:
                await self._finish("failed", reason=str(e), exit_code=126)
                return
        await self.writer.begin(self.attempt)
        if self.writer.fenced:  # the record moved on before we began: nothing to run
            return
        watchdog = asyncio.create_task(self._watchdog())
        try:
            while True:
                started = time.monotonic()
                try:
                    await self._spawn()
                except SpawnError as e:
                    await self._finish("failed", reason=str(e), exit_code=e.code)
                    return
                assert self.proc is not None
                await self.proc.until_running()
                self._move("running", pid=self.proc.pid, started=time.time(),
                           restarts=self.restarts,
                           user=self.user.name if self.user else self.spec.user)
                code, sig, limit = await self._wait_child()
                killed = bool(self.kill_reason)
                if not should_restart(self.spec.restart, code, killed):
                    # A limit that bit (the OOM killer) ends it as killed, with the reason.
                    by_limit = bool(limit) and (sig == signal.SIGKILL
                                                or self.container is not None)
                    state: r.AgentState = "killed" if killed or by_limit else "exited"
                    await self._finish(state, exit_code=code, signal=sig,
                                       reason=self.kill_reason or limit)
                    return
                self.fast_failures = self.fast_failures + 1 \
                    if time.monotonic() - started < FAST_FAILURE else 0
                if self.fast_failures >= GIVE_UP_AFTER:
                    await self._finish("failed", exit_code=code, signal=sig,
                                       reason=f"gave up after {GIVE_UP_AFTER} quick failures "
                                              f"in a row (last: {_describe(code, sig)})")
                    return
                self.restarts += 1
                delay = min(MAX_BACKOFF, 0.5 * 2 ** max(0, self.fast_failures - 1))
                self._move("starting", restarts=self.restarts, exit_code=code, signal=sig,
                           reason=f"restarting in {delay:g}s after {_describe(code, sig)}"
                                  + (f" ({limit})" if limit else ""))
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), delay)
                except TimeoutError:
                    pass
                if self.kill_reason:
                    await self._finish("killed", exit_code=code, signal=sig,
                                       reason=self.kill_reason)
                    return
        finally:
            watchdog.cancel()

    async def _spawn(self) -> None:
        spec = self.spec
        argv = command_argv(spec.shell, spec.command)
        user = self.user
        who: dict[str, str] = {}
        if user is not None:
            who = {"HOME": user.home, "USER": user.name, "LOGNAME": user.name}
        elif self.named is not None:
            who = self.named.env()
        ours = {"SHOAL_SESSION_ID": self.id, "SHOAL_NODE": self.mgr.node}
        if self.ports:
            ours.update(PORT=str(self.ports[0]), SHOAL_PORTS=",".join(map(str, self.ports)))
        env = child_env(self.mgr.base_env, spec.tty, who, spec.env, ours)
        cwd = spec.cwd or (user.home if user is not None
                           else self.named.home if self.named is not None else None)
        if self.container is not None:
            argv = self._container_argv()  # `podman run`: the client is the session's process
            self._removed = False
            # The podman client keeps little of the agent's environment (never its secrets)
            # and the session's own goes into the container; spec.cwd is inside (--workdir).
            env = child_env({k: v for k, v in self.mgr.base_env.items() if k in PODMAN_ENV},
                            spec.tty, who)
            cwd = None
        limits = effective_limits(spec.limits, user is not None)
        if self.container is not None:
            limits = m.Limits()  # the container's own, not the podman client's
        launch = Launch(argv, env, f"session {self.id}", marker=("SHOAL_SESSION_ID", self.id),
                        cwd=cwd, tty=spec.tty, cols=self.size[0], rows=self.size[1],
                        stdin=spec.stdin or spec.tty, run_as=self._confinement(limits),
                        unit=unit_name(self.mgr.node, "s", f"{self.id}-{self.restarts}"),
                        limits=limits)
        self.proc = Process(launch, self.mgr.ledger, self.mgr.layout, self._on_output,
                            read_size=self.read_size)
        await self.proc.start_off_loop()  # a burst of creates is answered meanwhile
        if self.kill_reason:  # ended while it was starting
            self._stop()

    def _confinement(self, limits: m.Limits) -> RunAs:
        """Who the process runs as and the limits its cgroup does not set."""
        user = self.user
        bounded = frozenset(self.mgr.layout.limits) if self.mgr.layout is not None else frozenset()
        if self.named is not None:  # a user of run_as: its groups, no sandbox
            return RunAs(uid=self.named.uid, gid=self.named.gid, groups=self.named.groups,
                         rlimits=_rlimits(limits, bounded))
        return RunAs(uid=user.uid if user else None, gid=user.gid if user else None,
                     rlimits=_rlimits(limits, bounded),
                     sandbox=Sandbox(user.uid, user.gid, user.home) if user else None)

    async def _wait_child(self) -> tuple[int | None, int | None, str]:
        """Wait for the end of the process (agent/process.py), then for its output to be
        stored. Returns (exit code, signal, the limit that bit or "")."""
        proc = self.proc
        assert proc is not None
        oom = ""

        async def after_leader(code: int | None, sig: int | None) -> None:
            nonlocal oom
            if self.container is not None:
                oom = self._container_oom(code)
                await self._remove_container()

        ended = await proc.wait(after_leader)
        await self.writer.flush(self._output_bound())
        return ended.code, ended.signal, oom or ended.limit

    def _output_bound(self) -> float | None:
        """How long an ending waits for its output to be stored: a kill never waits on the
        output path (a full store may never take it); a natural exit waits for NATS."""
        return KILL_OUTPUT_GRACE if self.kill_reason else None

    def _move(self, state: r.AgentState, **fields: Any) -> asyncio.Task[None]:
        """Report a move of our session; the controller writes it only while the record is
        still this placement's (else we fence). See ``_post``."""
        return self._post(r.SessionMove(session=self.id, attempt=self.attempt, state=state,
                                        **fields))

    def _post(self, report: r.SessionMove | r.SessionReschedule) -> asyncio.Task[None]:
        """Send ``report`` after the ones posted before it (in order), in the background:
        with no controller running, a daemon still restarts meanwhile. An end awaits the
        task: its output's end marker follows the final record."""
        before = self._reporting

        async def send() -> None:
            if before is not None:
                await asyncio.gather(before, return_exceptions=True)  # said by its own
            try:
                await self._report(report)
            except Exception:
                log.exception("session %s: reporting %s failed", self.id,
                              type(report).__name__)

        self._reporting = asyncio.create_task(send())
        return self._reporting

    async def _report(self, report: r.SessionMove | r.SessionReschedule) -> None:
        if self.detached_from_record:
            return
        reply = await self.mgr.reporter.send(self.mgr.node, report,
                                             give_up=lambda: self.detached_from_record)
        if reply is None or reply.ok:
            return
        if reply.refused in ("fenced", "not_yours"):
            self.fence(reply.reason)
        else:  # a bug in us or the controller: said, and the session goes on
            log.error("session %s: the controller refused %s: %s", self.id,
                      type(report).__name__, reply.reason)

    def fence(self, reason: str) -> None:
        """This copy is no longer the session (the fleet placed it again, or we were cut
        off past the node TTL): end it, and never write its record or output again."""
        if not self.detached_from_record:
            log.warning("session %s (attempt %d) fenced: %s", self.id, self.attempt, reason)
        self.detached_from_record = True
        self.writer.abandon()
        self._resume_reading()  # what the pipes still hold is read, and dropped
        self.end(f"fenced: {reason}")

    async def _finish(self, state: r.AgentState, *, exit_code: int | None = None,
                      signal: int | None = None, reason: str = "") -> None:
        if self.detached_from_record:
            self.writer.abandon()
            return
        if self.reschedule and state == "killed":
            # its output goes on elsewhere
            await self.writer.close(end_marker=False, timeout=self._output_bound())
            await self._post(r.SessionReschedule(session=self.id, attempt=self.attempt,
                                                 why=self.kill_reason,
                                                 output_bytes=self.writer.offset))
            return
        # Output first, then the final record, then the end marker: a reader that sees the
        # marker finds the record final, and one that sees the record final has all output.
        await self.writer.flush(self._output_bound())
        await self._move(state, exit_code=exit_code, signal=signal, reason=reason,
                         output_bytes=self.writer.offset, restarts=self.restarts)
        await self.writer.close(timeout=self._output_bound())

    async def _cleanup(self) -> None:
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception:
                pass
        if self.container is not None and self.proc is not None and not self._removed:
            await self._remove_container()  # only after an error in the agent
        if self.proc is not None:
            await self.proc.close()  # only does something after an error in the agent
        if self.user is not None:
            # Its processes ended with the cgroup; users.remove checks, and keeps the user
            # (for the next start to retry) rather than free a UID something still runs as.
            if await users.remove(self.user.name):
                self.mgr.ledger.remove_user(self.user.name)
            else:
                log.error("session %s: processes of %s survived; user kept", self.id,
                          self.user.name)
        self.mgr.ports.release(self.ports)

    def end(self, reason: str, reschedule: bool = False) -> None:
        """End the session on request: SIGTERM to its group, SIGKILL after the grace.
        With ``reschedule``, a daemon with a restart policy goes back to pending for the
        scheduler to start elsewhere, instead of ending as killed."""
        if self.kill_reason:
            return
        self.kill_reason = reason
        self.reschedule = reschedule and self.spec.restart != "never"
        self._wake.set()
        self._stop()

    def _stop(self) -> None:
        if self.proc is not None:
            self.proc.stop_soon(self.mgr.grace, first=self._stop_container
                                if self.container is not None else None)

    # ------------------------------------------------------------------ containers
    # A container session's process is a foreground `podman run` (agent/containers.py); the
    # container itself runs under conmon, outside the session's cgroup, so stopping and
    # removing it go through podman by name.

    def _container_argv(self) -> list[str]:
        spec, pod = self.spec, self.mgr.podman
        assert pod is not None and self.container is not None
        env = dict(spec.env)
        if spec.tty:
            env.setdefault("TERM", "xterm-256color")
        env.update(SHOAL_SESSION_ID=self.id, SHOAL_NODE=self.mgr.node)
        if spec.container_ports:
            env.setdefault("PORT", str(spec.container_ports[0]))
        try:
            cspec = containers.from_session(spec, self.ports, env)
            return pod.run_argv(cspec, self.mgr.node, self.id, self.mgr.container_mounts)
        except (containers.ContainerError, msgspec.ValidationError) as e:
            raise SpawnError(str(e), 125) from e

    async def _stop_container(self) -> None:
        """Stop the container by name (SIGTERM, SIGKILL after the grace): a signal to the
        `podman run` client alone would leave the container running. Then the client."""
        pod = self.mgr.podman
        assert pod is not None and self.container is not None
        try:
            await pod.stop(self.container, self.mgr.grace)
        except containers.ContainerError as e:
            log.warning("session %s: %s", self.id, e)

    def _container_oom(self, code: int | None) -> str:
        """A memory kill: exit 137 (SIGKILL) with a memory limit set and no stop asked for.
        (podman's own OOMKilled flag stays false on a cgroup v1 memory controller.)"""
        memory = self.spec.limits.memory_mb
        if memory and code == 128 + signal.SIGKILL and not self.kill_reason:
            return (f"out of memory: the container was killed at its {memory} MiB memory "
                    "limit")
        return ""

    async def _remove_container(self) -> None:
        pod = self.mgr.podman
        if pod is None or self.container is None:
            return
        try:
            await pod.remove(self.container)
            self._removed = True
        except containers.ContainerError as e:
            log.warning("session %s: %s", self.id, e)

    async def _watchdog(self) -> None:
        spec = self.spec
        start = time.monotonic()
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            if spec.timeout is not None and now - start >= spec.timeout:
                self.end(f"timed out after {spec.timeout:g}s")
            elif spec.idle_timeout is not None and now - self.last_activity >= spec.idle_timeout:
                self.end(f"idle timeout: no input or output for {spec.idle_timeout:g}s")
            elif (spec.detach_timeout is not None
                  and now - self.last_attached >= spec.detach_timeout):
                self.end(f"no client attached for {spec.detach_timeout:g}s")

    # ------------------------------------------------------------------ output

    def _on_output(self, stream: str, data: bytes) -> None:
        self.last_activity = time.monotonic()
        self.writer.write(stream, data)
        if self.writer.blocked and self.proc is not None:
            self.proc.pause()  # the process blocks on write until JetStream catches up

    def _resume_reading(self) -> None:
        if self.proc is not None:
            self.proc.resume()

    # ------------------------------------------------------------------ input

    async def _on_control(self, msg: Msg) -> None:
        try:
            frame = m.unpack_session_control(msg.data)
        except msgspec.DecodeError:
            return
        self.last_attached = time.monotonic()
        if isinstance(frame, m.Resize):
            self.size = (frame.cols, frame.rows)  # also for a process not started yet
        proc = self.proc
        if isinstance(frame, m.SessionAttached) or proc is None:
            return
        if isinstance(frame, m.Resize):
            proc.resize(frame.cols, frame.rows)
            return
        self.last_activity = time.monotonic()
        if frame.data:
            proc.write(frame.data)  # held while the process is not reading; a refusal is logged
        if frame.eof and not self.spec.tty:  # a terminal's input has no end of its own
            proc.end_input()


def _describe(code: int | None, sig: int | None) -> str:
    if sig is not None:
        try:
            return f"signal {signal.Signals(sig).name}"
        except ValueError:
            return f"signal {sig}"
    return f"exit code {code}"


@dataclass
class Offer:
    """A yes to the controller, holding room and ports until its go."""

    record: m.SessionRecord  # as the controller will write it: starting here, next attempt
    ports: list[int]
    decided: asyncio.Future[bool] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())


class SessionManager:
    """The sessions of one node."""

    def __init__(self, node: str, nc: NatsClient, js: JetStreamContext, reporter: Reporter,
                 ledger: Ledger, capacity: int, ports: PortPool, grace: float,
                 base_env: Mapping[str, str], address: str,
                 on_change: Callable[[], None], layout: Layout | None = None,
                 ephemeral_uids: tuple[int, int] = (users.UID_FIRST, users.UID_LAST),
                 podman: containers.Podman | None = None,
                 container_mounts: tuple[str, ...] = (),
                 allowed_users: Collection[str] = ()) -> None:
        self.node = node
        self.trim_output: Callable[[str, int], Awaitable[None]] | None = None  # host sets it
        self.output_where: Callable[[str, int], Awaitable[OutputLast]] | None = None  # too
        self.allowed_users = allowed_users  # the agent's run_as
        self.nc = nc
        self.js = js
        self.reporter = reporter
        self.ledger = ledger
        self.capacity = capacity
        self.ports = ports
        self.grace = grace
        self.base_env = base_env
        self.address = address
        self.on_change = on_change
        self.layout = layout  # cgroups, if the node has them
        self.ephemeral_uids = ephemeral_uids  # what the network policy confines
        self.podman = podman  # None: this node runs no containers
        self.container_mounts = container_mounts  # where read-only mounts may come from
        self.sessions: dict[str, Session] = {}
        # Earlier attempts still ending here after a newer one of the same session was
        # placed on this node: no longer in ``sessions``, still the stop's to wait for.
        self.superseded: set[Session] = set()
        self.offers: dict[str, Offer] = {}
        self.reserved = 0
        self.draining = False
        self.stopping = False
        # Until the controllers have settled the records of this node's previous agent,
        # a new placement could be taken for a leftover: no offers are taken before.
        self.reconciled = False

    @property
    def live(self) -> int:
        return len(self.sessions) + self.reserved

    async def handle_start(self, req: m.SessionStart) -> m.SessionStartReply:
        """Say yes (reserving room and ports) or why not. Capacity is checked and reserved
        before any await, so concurrent starts can never overfill the node."""
        if self.stopping or self.draining:
            return m.SessionStartReply(ok=False, reason=f"node {self.node} is draining")
        if not self.reconciled:
            return m.SessionStartReply(ok=False, reason=f"node {self.node} is starting up "
                                       "(its previous sessions are not settled yet)")
        if self.live >= self.capacity:
            return m.SessionStartReply(ok=False, reason=f"node {self.node} is full")
        found = req.record
        if found is None or found.id != req.id:
            return m.SessionStartReply(ok=False, reason="the request carries no record: "
                                       "this agent needs a newer controller")
        if found.state != "pending":
            return m.SessionStartReply(ok=False, reason="session is not pending")
        if req.id in self.offers:
            return m.SessionStartReply(ok=False, reason="session is offered here already")
        spec = found.spec
        if m.spec_digest(spec) != req.digest:
            log.warning("session %s: the record's spec is not the one the controller "
                        "placed; refusing it", req.id)
            return m.SessionStartReply(ok=False, reason="session spec does not match")
        self.reserved += 1
        ports: list[int] = []
        try:
            if spec.user not in ("agent", "ephemeral"):
                try:
                    runas.resolve(spec.user, self.allowed_users)
                except runas.RunAsError as e:
                    return m.SessionStartReply(ok=False, reason=str(e))
            if spec.runtime == "container":
                why = await self._cannot_run(spec)
                if why:  # the scheduler tries the next node
                    return m.SessionStartReply(ok=False, reason=why)
            if spec.user == "ephemeral" and not users.can_create_users():
                spec = msgspec.structs.replace(spec, user="agent")
            if spec.ports:
                got = self.ports.allocate(spec.ports)
                if got is None:
                    return m.SessionStartReply(ok=False, reason=f"node {self.node} has no "
                                               f"{spec.ports} free port(s)")
                ports = got
            if self.stopping or self.draining or req.id in self.offers:
                return m.SessionStartReply(ok=False, reason=f"node {self.node} is draining")
            record = msgspec.structs.replace(
                found, state="starting", ports=ports, address=self.address, spec=spec,
                user=spec.user, requeued="", **sessionstate.placed(found, self.node))
            offer = Offer(record, ports)
            self.offers[req.id] = offer
            self.reserved += 1  # the offer's, until its go
            ports = []
            asyncio.create_task(self._await_go(offer))
            return m.SessionStartReply(ok=True, ports=offer.ports, address=self.address,
                                       user=spec.user)
        finally:
            self.reserved -= 1
            self.ports.release(ports)
            self.on_change()

    def handle_go(self, go: m.SessionGo) -> None:
        offer = self.offers.get(go.id)
        running = self.sessions.get(go.id)
        if running is not None and running.attempt == go.attempt:
            return  # a late go: we asked meanwhile, and were told it is ours
        if offer is not None and offer.record.attempt == go.attempt:
            if not offer.decided.done():
                offer.decided.set_result(go.go)
        elif go.go:  # a yes of a previous agent of this node: it does not run here
            asyncio.create_task(self._drop(go.id, go.attempt, "the node's agent restarted "
                                           "before it could start the session"))

    async def _drop(self, sid: str, attempt: int, why: str) -> None:
        await self.reporter.send(self.node, r.SessionDropped(session=sid, attempt=attempt,
                                                             why=why))

    async def _await_go(self, offer: Offer) -> None:
        sid, attempt = offer.record.id, offer.record.attempt
        try:
            try:
                go = await asyncio.wait_for(asyncio.shield(offer.decided), GO_TIMEOUT)
            except TimeoutError:  # the go was lost, or its controller died: ask
                if offer.decided.done():
                    go = offer.decided.result()
                else:
                    reply = await self.reporter.send(self.node, r.SessionsCheck({sid: attempt}))
                    go = reply is not None and reply.ok and sid not in reply.gone
        finally:
            self.offers.pop(sid, None)
            self.reserved -= 1
        if go and self.stopping:
            self.ports.release(offer.ports)
            await self._drop(sid, attempt, "the agent is stopping")
        elif go:
            earlier = self.sessions.get(sid)
            if earlier is not None:  # the fleet moved on from the copy that runs here
                earlier.fence(f"attempt {attempt} was placed on this node")
                self.superseded.add(earlier)
            session = Session(self, offer.record, offer.ports)
            self.sessions[sid] = session
            asyncio.create_task(self._run(session, after=earlier))
        else:
            self.ports.release(offer.ports)
        self.on_change()

    async def _cannot_run(self, spec: m.SessionSpec) -> str:
        """Why this node cannot run a container session, or ""."""
        if self.podman is None:
            return (f"node {self.node} cannot run containers (podman or runc missing, or "
                    "turned off)")
        assert spec.image is not None
        try:
            if await self.podman.image_exists(spec.image):
                return ""
        except containers.ContainerError as e:
            return f"node {self.node}: {e}"
        return (f"image {spec.image} is not on node {self.node}; images are never pulled: "
                "load it there with podman load or podman import")

    async def _run(self, session: Session, after: Session | None = None) -> None:
        try:
            if after is not None:  # never two copies of one session at once
                await after.done.wait()
            await session.run()
        finally:
            self.superseded.discard(session)
            if self.sessions.get(session.id) is session:  # not its next placement here
                del self.sessions[session.id]
            self.on_change()

    def handle_signal(self, req: m.SessionSignal) -> bool:
        session = self.sessions.get(req.id)
        if session is None:
            return False
        if req.kill:
            session.end(req.reason or "killed on request", reschedule=req.reschedule)
        elif session.proc is not None:
            session.proc.signal(req.signum)
        return True

    def end_all(self, reason: str) -> None:
        """End every session here; daemons with a restart policy go to another node."""
        for s in list(self.sessions.values()):
            s.end(reason, reschedule=True)

    async def stop(self, reason: str) -> None:
        """End every session (the agent is stopping)."""
        self.stopping = True
        self.end_all(reason)
        await asyncio.gather(*(s.done.wait() for s in [*self.sessions.values(),
                                                       *self.superseded]))
