"""One ``shoal run`` on one node: spawn, stream output with flow control, feed stdin, obey
control frames, enforce the timeout, report the exit.

Output flow control: the agent sends at most ``window`` bytes beyond what the controller has
acknowledged; past that it stops reading the pipe, so a slow reader makes the process block
on write (as under ssh) and the agent's memory stays bounded.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections import deque
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING

from ..system.malloc import reuse_heap_for_bulk_io
from ..wire import messages as m
from ..wire import subjects
from . import procs, runas
from .cgroup_layout import Layout, unit_name
from .cgroups import Unit
from .ledger import Ledger
from .procs import Child, RunAs, SpawnError, set_winsize, spawn, terminate

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient

log = logging.getLogger(__name__)

READ_SIZE = 1 << 20  # per read of a pipe, and so per Output message (also < max_payload)
FRAME_OVERHEAD = 1024  # an Output's fields besides data, with room to spare
KEEPALIVE_LAPSE = 20.0  # no control frame for this long: the controller is gone, stop
STDIN_ACK_EVERY = 64 << 10
LEFTOVER_GRACE = 1.0  # seconds background children may keep writing after the leader exits


def command_argv(spec: m.RunSpec) -> list[str]:
    if spec.shell is not None:
        return ["/bin/sh", "-c", spec.shell]
    assert spec.argv is not None
    return list(spec.argv)


def child_env(base: Mapping[str, str], spec: m.RunSpec, node: str, run_id: str) -> dict[str, str]:
    # The agent's own SHOAL_* settings (which may hold credentials) never reach a child.
    env = {k: v for k, v in base.items() if not k.startswith("SHOAL_")}
    if spec.tty:
        env.setdefault("TERM", "xterm-256color")
    env.update(spec.env)
    env["SHOAL_NODE"] = node
    env["SHOAL_RUN_ID"] = run_id
    return env


class Run:
    def __init__(self, nc: NatsClient, node: str, req: m.RunRequest, grace: float,
                 ledger: Ledger, layout: Layout | None = None,
                 allowed_users: Collection[str] = ()) -> None:
        self.nc = nc
        self.allowed_users = allowed_users  # the agent's run_as
        self.node = node
        self.run_id = req.run_id
        self.spec = req.spec
        self.window = req.window
        self.read_size = max(4096, min(READ_SIZE, nc.max_payload - FRAME_OVERHEAD))
        self.grace = grace
        self.ledger = ledger
        self.layout = layout
        self.events_subject = subjects.run_events(req.run_id, node)
        self.child: Child | None = None
        self.sent = 0  # output bytes published, all streams
        self.acked = 0
        self.offsets: dict[str, int] = {}
        self._paused: set[str] = set()
        self._eof: dict[str, asyncio.Event] = {}
        self._stdin_buf: deque[bytes] = deque()
        self._stdin_expected = 0
        self._stdin_written = 0
        self._stdin_acked = 0
        self._stdin_eof = False
        self._writer_on = False
        self._last_control = time.monotonic()
        self._end_reason = ""
        self._timed_out = False
        self._ending: asyncio.Task[None] | None = None
        self.done = asyncio.Event()
        reuse_heap_for_bulk_io()

    # ------------------------------------------------------------------ start and finish

    def start(self, base_env: Mapping[str, str]) -> m.RunAccepted | m.Exit:
        spec = self.spec
        unit = None
        try:
            env = child_env(base_env, spec, self.node, self.run_id)
            user = self._named_user()
            cwd = spec.cwd
            if user is not None:
                env.update({k: v for k, v in user.env().items() if k not in spec.env})
                cwd = cwd or user.home
            if self.layout is not None:
                unit = Unit(self.layout, unit_name(self.node, "r", self.run_id))
                self.ledger.add_cgroup(unit.dirs)
                try:
                    unit.create()
                except OSError as e:
                    raise SpawnError(f"cannot create the run's cgroup: {e}", 126) from e
            as_user = RunAs(uid=user.uid, gid=user.gid, groups=user.groups, unit=unit) \
                if user is not None else RunAs(unit=unit) if unit is not None else None
            self.child = spawn(command_argv(spec), env, cwd=cwd, tty=spec.tty,
                               cols=spec.cols, rows=spec.rows, stdin=spec.stdin,
                               run_as=as_user)
        except SpawnError as e:
            self._drop_unit(unit)
            now = time.time()
            self.done.set()
            return m.Exit(node=self.node, code=e.code, reason=str(e), started=now, ended=now)
        self.ledger.add(self.child.pid)
        loop = asyncio.get_running_loop()
        for stream, fd in self.child.out_fds.items():
            self.offsets[stream] = 0
            self._eof[stream] = asyncio.Event()
            loop.add_reader(fd, self._on_readable, stream, fd)
        asyncio.create_task(self._supervise())
        return m.RunAccepted(node=self.node, pid=self.child.pid)

    def _named_user(self) -> runas.NamedUser | None:
        if self.spec.user is None:
            return None
        try:
            return runas.resolve(self.spec.user, self.allowed_users)
        except runas.RunAsError as e:
            raise SpawnError(str(e), 126) from e

    async def _supervise(self) -> None:
        child = self.child
        assert child is not None
        watchdog = asyncio.create_task(self._watchdog())
        try:
            code, sig = await child.wait()
            if self._ending is not None:  # a stop in progress owns the grace period
                await asyncio.gather(self._ending, return_exceptions=True)
            # A run ends with its leader: what it left in the background (setsid'd or not)
            # gets a short grace, then is killed; then the pipes hold only what was written.
            await child.end_rest(LEFTOVER_GRACE)
            await self._drain()
        finally:
            watchdog.cancel()
            if self._ending is not None:
                await asyncio.gather(self._ending, return_exceptions=True)
        self._close()
        self._drop_unit(child.unit, child.left_orphans)
        reason = self._end_reason
        exit_ = m.Exit(node=self.node, code=code, signal=sig, reason=reason,
                       timed_out=self._timed_out, started=child.started, ended=time.time())
        await self._publish(exit_)
        self.ledger.remove(child.pid)
        self.done.set()

    async def _drain(self) -> None:
        await procs.drain(self._eof.values(), lambda: bool(self._paused))

    def _drop_unit(self, unit: Unit | None, orphans: bool = False) -> None:
        if unit is not None:
            if orphans:
                procs.reap_orphans(unit.layout.base)
            if unit.remove():
                self.ledger.remove_cgroup(unit.dirs)

    async def _watchdog(self) -> None:
        start = time.monotonic()
        while True:
            await asyncio.sleep(1.0 if self.spec.timeout is None else min(1.0, self.spec.timeout))
            now = time.monotonic()
            if self.spec.timeout is not None and now - start >= self.spec.timeout:
                self._timed_out = True
                self.end(f"timed out after {self.spec.timeout:g}s")
                return
            if now - self._last_control > KEEPALIVE_LAPSE:
                self.end("the controller went away")
                return

    def end(self, reason: str) -> None:
        """Ask the process to stop: SIGTERM to its group, SIGKILL after the grace period."""
        if self.child is None or self._ending is not None:
            return
        self._end_reason = reason
        self._ending = asyncio.create_task(terminate(self.child, self.grace))

    def _close(self) -> None:
        if self.child is None:
            return
        loop = asyncio.get_running_loop()
        for fd in list(self.child.out_fds.values()):
            loop.remove_reader(fd)
        if self._writer_on and self.child.stdin_fd is not None:
            loop.remove_writer(self.child.stdin_fd)
        self.child.close_fds()

    # ------------------------------------------------------------------ output

    def _on_readable(self, stream: str, fd: int) -> None:
        try:
            data = os.read(fd, self.read_size)
        except BlockingIOError:
            return
        except OSError:  # EIO: the pty's other side closed
            data = b""
        if not data:
            asyncio.get_running_loop().remove_reader(fd)
            self._eof[stream].set()
            return
        offset = self.offsets[stream]
        self.offsets[stream] = offset + len(data)
        self.sent += len(data)
        ev = m.Output(node=self.node, stream=stream, offset=offset, data=data)  # type: ignore[arg-type]
        asyncio.create_task(self._publish(ev))
        if self.sent - self.acked >= self.window:
            # Stop reading: the process blocks on a full pipe until the reader catches up.
            asyncio.get_running_loop().remove_reader(fd)
            self._paused.add(stream)

    def on_output_ack(self, ack: m.OutputAck) -> None:
        self.acked = max(self.acked, ack.consumed)
        self._last_control = time.monotonic()
        if self._paused and self.sent - self.acked < self.window and self.child is not None:
            loop = asyncio.get_running_loop()
            for stream in self._paused:
                fd = self.child.out_fds.get(stream)
                if fd is not None and not self._eof[stream].is_set():
                    loop.add_reader(fd, self._on_readable, stream, fd)
            self._paused.clear()

    async def _publish(self, ev: m.Output | m.Exit) -> None:
        try:
            await self.nc.publish(self.events_subject, m.pack(ev))
        except Exception as e:  # a closed connection while shutting down
            log.debug("cannot publish run event: %s", e)

    # ------------------------------------------------------------------ control

    def on_control(self, frame: m.RunControl) -> None:
        self._last_control = time.monotonic()
        child = self.child
        if child is None:
            return
        if isinstance(frame, m.StdinData):
            self._on_stdin(frame)
        elif isinstance(frame, m.Resize):
            if child.tty and child.stdin_fd is not None:
                set_winsize(child.stdin_fd, frame.cols, frame.rows)
                child.signal_group(signal.SIGWINCH)
        elif isinstance(frame, m.SignalRun):
            child.signal_group(frame.signum)
        elif isinstance(frame, m.Cancel):
            self.end(frame.reason)

    def _on_stdin(self, frame: m.StdinData) -> None:
        child = self.child
        assert child is not None
        if frame.offset != self._stdin_expected:
            if frame.offset < self._stdin_expected:
                return  # a duplicate
            log.warning("run %s: stdin gap at %d (expected %d); closing stdin", self.run_id,
                        frame.offset, self._stdin_expected)
            frame = m.StdinData(offset=self._stdin_expected, data=b"", eof=True)
        self._stdin_expected += len(frame.data)
        if frame.data:
            self._stdin_buf.append(frame.data)
        if frame.eof:
            self._stdin_eof = True
        self._flush_stdin()

    def _flush_stdin(self) -> None:
        child = self.child
        if child is None or child.stdin_fd is None:
            return
        fd = child.stdin_fd
        while self._stdin_buf:
            chunk = self._stdin_buf[0]
            try:
                n = os.write(fd, chunk)
            except BlockingIOError:
                break
            except OSError:  # EPIPE: the process closed its stdin; discard the rest
                self._stdin_buf.clear()
                self._stdin_written = self._stdin_expected
                break
            self._stdin_written += n
            if n < len(chunk):
                self._stdin_buf[0] = chunk[n:]
                break
            self._stdin_buf.popleft()
        loop = asyncio.get_running_loop()
        if self._stdin_buf and not self._writer_on:
            loop.add_writer(fd, self._flush_stdin)
            self._writer_on = True
        elif not self._stdin_buf and self._writer_on:
            loop.remove_writer(fd)
            self._writer_on = False
        if not self._stdin_buf and self._stdin_eof and not child.tty:
            os.close(fd)
            child.stdin_fd = None
        elif not self._stdin_buf and self._stdin_eof and child.tty:
            # A terminal has no separate end of input: send the EOF character instead.
            try:
                os.write(fd, b"\x04")
            except OSError:
                pass
            self._stdin_eof = False
        if self._stdin_written - self._stdin_acked >= STDIN_ACK_EVERY or (
            not self._stdin_buf and self._stdin_written != self._stdin_acked
        ):
            self._stdin_acked = self._stdin_written
            ack = m.StdinAck(node=self.node, written=self._stdin_written)
            asyncio.create_task(self._publish_raw(subjects.run_stdin_ack(self.run_id, self.node),
                                                  m.pack(ack)))

    async def _publish_raw(self, subject: str, data: bytes) -> None:
        try:
            await self.nc.publish(subject, data)
        except Exception as e:
            log.debug("cannot publish: %s", e)
