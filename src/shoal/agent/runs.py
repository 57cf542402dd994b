"""One ``shoal run`` on one node: policy on top of the process owner (agent/process.py):
stream output with flow control, feed stdin with acknowledgements, obey control frames,
enforce the timeout and the controller's keepalive, report the exit.

Output flow control: the agent sends at most ``window`` bytes beyond what the controller has
acknowledged; past that it stops reading the pipe, so a slow reader makes the process block
on write (as under ssh) and the agent's memory stays bounded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection, Mapping
from typing import TYPE_CHECKING

from ..system.malloc import reuse_heap_for_bulk_io
from ..wire import messages as m
from ..wire import subjects
from . import runas
from .cgroup_layout import Layout, unit_name
from .ledger import Ledger
from .process import Launch, Process, child_env, command_argv, read_size_for
from .procs import RunAs, SpawnError

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient

log = logging.getLogger(__name__)

KEEPALIVE_LAPSE = 20.0  # no control frame for this long: the controller is gone, stop
STDIN_ACK_EVERY = 64 << 10


class Run:
    def __init__(self, nc: NatsClient, node: str, req: m.RunRequest, grace: float,
                 ledger: Ledger, layout: Layout | None = None,
                 allowed_users: Collection[str] = (),
                 on_exit: Callable[[m.Exit], None] | None = None) -> None:
        self.nc = nc
        self.on_exit = on_exit  # a batch's: gathers exits into RunBatchExited; else published
        self.on_done: Callable[[], None] | None = None  # once it has ended and reported
        self.allowed_users = allowed_users  # the agent's run_as
        self.node = node
        self.run_id = req.run_id
        self.spec = req.spec
        self.window = req.window
        self.read_size = read_size_for(nc.max_payload)  # one read, one Output message
        self.grace = grace
        self.ledger = ledger
        self.layout = layout
        self.events_subject = subjects.run_events(req.run_id, node)
        self.proc: Process | None = None
        self.sent = 0  # output bytes published, all streams
        self.acked = 0
        self.offsets: dict[str, int] = {}
        self._stdin_expected = 0
        self._stdin_acked = 0
        self._last_control = time.monotonic()
        self._end_reason = ""
        self._timed_out = False
        self.done = asyncio.Event()
        self._watchdog: asyncio.TimerHandle | None = None
        self._output_sent: asyncio.Task[None] | None = None  # the last Output's publish
        self._watch_from = 0.0
        reuse_heap_for_bulk_io()

    # ------------------------------------------------------------------ start and finish

    def start(self, base_env: Mapping[str, str]) -> m.RunAccepted | m.Exit:
        spec = self.spec
        try:
            user = self._named_user()
            env = child_env(base_env, spec.tty, user.env() if user is not None else {},
                            spec.env, {"SHOAL_NODE": self.node, "SHOAL_RUN_ID": self.run_id})
            run_as = RunAs(uid=user.uid, gid=user.gid, groups=user.groups) \
                if user is not None else None
            launch = Launch(command_argv(spec.shell, spec.argv), env, f"run {self.run_id}",
                            marker=("SHOAL_RUN_ID", self.run_id),
                            cwd=spec.cwd or (user.home if user is not None else None),
                            tty=spec.tty, cols=spec.cols, rows=spec.rows, stdin=spec.stdin,
                            run_as=run_as, unit=unit_name(self.node, "r", self.run_id))
            self.proc = Process(launch, self.ledger, self.layout, self._on_output,
                                read_size=self.read_size, on_input=self._on_input,
                                watch_at_wait=True)  # _supervise waits at once
            pid = self.proc.start()
        except SpawnError as e:
            now = time.time()
            self.done.set()
            return m.Exit(node=self.node, code=e.code, reason=str(e), started=now, ended=now)
        asyncio.create_task(self._supervise())
        return m.RunAccepted(node=self.node, pid=pid)

    def _named_user(self) -> runas.NamedUser | None:
        if self.spec.user is None:
            return None
        try:
            return runas.resolve(self.spec.user, self.allowed_users)
        except runas.RunAsError as e:
            raise SpawnError(str(e), 126) from e

    async def _supervise(self) -> None:
        proc = self.proc
        assert proc is not None
        self._watch_from = time.monotonic()
        if proc.poll() is None:  # a quick run of a fan-out has ended already: no timer
            self._watch()
        try:
            ended = await proc.wait()
        finally:
            if self._watchdog is not None:
                self._watchdog.cancel()
        if self._output_sent is not None:
            # Output read at the end (Process._catch_up) is still queued: the exit follows
            # it (publishes are queued in the order their tasks first run).
            await self._output_sent
        exit_ = m.Exit(node=self.node, code=ended.code, signal=ended.signal,
                       reason=self._end_reason, timed_out=self._timed_out,
                       started=ended.started, ended=time.time())
        if self.on_exit is not None:
            self.on_exit(exit_)
        else:
            await self._publish(exit_)
        self.done.set()
        if self.on_done is not None:
            self.on_done()

    def _watch(self) -> None:
        """Every second (or the timeout, when shorter): the timeout, and the controller's
        keepalive. A timer, not a task per run: 10,000 runs of `true` start 10,000."""
        period = 1.0 if self.spec.timeout is None else min(1.0, self.spec.timeout)
        self._watchdog = asyncio.get_running_loop().call_later(period, self._check)

    def _check(self) -> None:
        now = time.monotonic()
        if self.spec.timeout is not None and now - self._watch_from >= self.spec.timeout:
            self._timed_out = True
            self.end(f"timed out after {self.spec.timeout:g}s")
            return
        if now - self._last_control > KEEPALIVE_LAPSE:
            self.end("the controller went away")
            return
        self._watch()

    def end(self, reason: str) -> None:
        """Ask the process to stop: SIGTERM to all of it, SIGKILL after the grace period."""
        if self.proc is None or self.proc.stopping:
            return
        self._end_reason = reason
        self.proc.stop_soon(self.grace)

    # ------------------------------------------------------------------ output

    def _on_output(self, stream: str, data: bytes) -> None:
        offset = self.offsets.get(stream, 0)
        self.offsets[stream] = offset + len(data)
        self.sent += len(data)
        ev = m.Output(node=self.node, stream=stream, offset=offset, data=data)  # type: ignore[arg-type]
        self._output_sent = asyncio.create_task(self._publish(ev))
        if self.sent - self.acked >= self.window and self.proc is not None:
            self.proc.pause()  # the process blocks on a full pipe until the reader catches up

    def on_output_ack(self, ack: m.OutputAck) -> None:
        self.acked = max(self.acked, ack.consumed)
        self._last_control = time.monotonic()
        if self.proc is not None and self.sent - self.acked < self.window:
            self.proc.resume()

    async def _publish(self, ev: m.Output | m.Exit) -> None:
        try:
            await self.nc.publish(self.events_subject, m.pack(ev))
        except Exception as e:  # a closed connection while shutting down
            log.debug("cannot publish run event: %s", e)

    # ------------------------------------------------------------------ control

    def on_control(self, frame: m.RunControl) -> None:
        self._last_control = time.monotonic()
        proc = self.proc
        if proc is None:
            return
        if isinstance(frame, m.StdinData):
            self._on_stdin(proc, frame)
        elif isinstance(frame, m.Resize):
            proc.resize(frame.cols, frame.rows)
        elif isinstance(frame, m.SignalRun):
            proc.signal(frame.signum)
        elif isinstance(frame, m.Cancel):
            self.end(frame.reason)

    def _on_stdin(self, proc: Process, frame: m.StdinData) -> None:
        if frame.offset != self._stdin_expected:
            if frame.offset < self._stdin_expected:
                return  # a duplicate
            log.warning("run %s: stdin gap at %d (expected %d); closing stdin", self.run_id,
                        frame.offset, self._stdin_expected)
            frame = m.StdinData(offset=self._stdin_expected, data=b"", eof=True)
        if frame.data and not proc.write(frame.data):
            log.warning("run %s: stdin refused at %d; closing stdin", self.run_id, frame.offset)
            frame = m.StdinData(offset=self._stdin_expected, data=b"", eof=True)
        self._stdin_expected += len(frame.data)
        if frame.eof:
            proc.end_input()

    def _on_input(self, written: int, held: int) -> None:
        """Acknowledge what the process took: every STDIN_ACK_EVERY bytes, and when it has
        taken all (the controller holds back input beyond its window)."""
        if written - self._stdin_acked >= STDIN_ACK_EVERY or (
                not held and written != self._stdin_acked):
            self._stdin_acked = written
            ack = m.StdinAck(node=self.node, written=written)
            asyncio.create_task(self._publish_raw(subjects.run_stdin_ack(self.run_id, self.node),
                                                  m.pack(ack)))

    async def _publish_raw(self, subject: str, data: bytes) -> None:
        try:
            await self.nc.publish(subject, data)
        except Exception as e:
            log.debug("cannot publish: %s", e)
