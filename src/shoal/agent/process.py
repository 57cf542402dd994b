"""The agent's one process owner: a run (agent/runs.py) and a session (agent/sessions.py) are
policy on top of a ``Process``, which alone starts the command (argv, environment, cgroup,
ledger), reads its output with backpressure, feeds its input with backpressure, resizes its
terminal and ends it.

The contract, in the style of JupyterHub's Spawner (docs/architecture.md):

- ``start()`` spawns, or raises SpawnError having left nothing behind;
- ``poll()`` is None while the leader runs, else its exit status;
- ``stop(term_timeout, kill_timeout)`` SIGTERMs everything of it, SIGKILLs what is left after
  ``term_timeout`` and gives up (logged) ``kill_timeout`` later;
- ``wait()`` returns once the process has *ended*: the leader exited, what it left in the
  background had LEFTOVER_GRACE seconds and was then killed (its cgroup, or its group and
  what escaped it), and its output was read for at most DRAIN_LIMIT seconds. Never "EOF on
  the pipe": a setsid'd child holding the pty does not keep it alive;
- ``state()`` is what the ledger records (agent/ledger.py) for the next agent to end what
  a SIGKILLed one left.

(Over 400 lines: the contract, output, input and the end are one object's state, read
together; the mechanism below it is agent/procs.py.)

Over 400 lines: the whole life of a process (spawn, both pipes with backpressure, resize,
the end of its cgroup or group) in one class, so that runs and sessions share all of it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace

from ..wire import messages as m
from . import procs
from .cgroup_layout import Layout
from .cgroups import Unit
from .ledger import Ledger
from .procs import Child, RunAs, SpawnError, set_winsize, spawn

log = logging.getLogger(__name__)

READ_SIZE = 1 << 20  # per read of a pipe, at most (see read_size_for)
FRAME_OVERHEAD = 1024  # a message's fields besides the data, with room to spare
STDIN_LIMIT = 4 << 20  # input held for a process that is not reading (above a run's window)
LEFTOVER_GRACE = 1.0  # what the leader left in the background may finish for this long
DRAIN_LIMIT = 5.0  # reading the pipes once nothing runs, counted again while paused
KILL_TIMEOUT = 5.0  # after SIGKILL, how long to wait for the processes to be gone


def read_size_for(max_payload: int) -> int:
    """One read of a pipe is one message: below the connection's max_payload."""
    return max(4096, min(READ_SIZE, max_payload - FRAME_OVERHEAD))


def command_argv(shell: str | None, argv: list[str] | None) -> list[str]:
    return ["/bin/sh", "-c", shell] if shell is not None else list(argv or [])


def agent_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The agent's environment without its SHOAL_* settings (which may hold credentials):
    what every child's environment starts from. Made once, not per run (a tenth of a run's
    Python)."""
    return {k: v for k, v in environ.items() if not k.startswith("SHOAL_")}


def child_env(base: Mapping[str, str], tty: bool, *layers: Mapping[str, str]) -> dict[str, str]:
    """``base`` (``agent_env``), TERM for a terminal, then ``layers`` in order."""
    env = dict(base)
    if tty:
        env.setdefault("TERM", "xterm-256color")
    for layer in layers:
        env.update(layer)
    return env


@dataclass(frozen=True)
class Launch:
    """What to start. ``marker`` (KEY, value) is in the environment of every process of it:
    without a cgroup it is how what escaped the process group is found."""

    argv: list[str]
    env: Mapping[str, str]
    label: str  # "run X" / "session Y", for messages
    marker: tuple[str, str] | None = None
    cwd: str | None = None
    tty: bool = False
    cols: int = 80
    rows: int = 24
    stdin: bool = False
    run_as: RunAs | None = None  # who and with what limits; its cgroup comes from ``unit``
    unit: str | None = None  # the cgroup's name, on a node with cgroups
    limits: m.Limits | None = None


@dataclass(frozen=True)
class State:
    """What the ledger keeps of a started process (``c+ dir`` for its cgroup, else ``+ pid``
    and ``e+ KEY=value``), for the next agent to end what a SIGKILLed one left."""

    pid: int
    cgroup: tuple[str, ...] = ()
    marker: str = ""  # recorded only without a cgroup (the cgroup holds everything)


@dataclass(frozen=True)
class Ended:
    code: int | None  # exactly one of code and signal is set
    signal: int | None
    started: float
    limit: str = ""  # the cgroup limit that bit, or ""
    drained: bool = True  # False: output was still held open after the end, and closed


class Process:
    """One started command and everything it starts."""

    def __init__(self, launch: Launch, ledger: Ledger, layout: Layout | None,
                 on_output: Callable[[str, bytes], None], *, read_size: int = READ_SIZE,
                 on_input: Callable[[int, int], None] | None = None,
                 watch_at_wait: bool = False) -> None:
        self.launch = launch
        self.ledger = ledger
        self.layout = layout
        self.on_output = on_output  # (stream, data); the caller may pause() in it
        self.on_input = on_input  # (bytes written so far, bytes still held)
        self.read_size = read_size
        self.child: Child | None = None
        self._eof: dict[str, asyncio.Event] = {}
        self._small_pipes: set[int] = set()  # not grown yet (procs.grow_pipe)
        # The caller waits at once (a run): its pipes are watched from wait()'s first look
        # if the leader still runs then, else read once at its end, without the four epoll
        # calls of watching two pipes (most runs of a fan-out have ended by then).
        self._watch_at_wait = watch_at_wait
        self._watching = False  # the pipes' readers are (or may be) registered
        self._paused = False
        self._stdin: deque[bytes] = deque()
        self._held = 0  # bytes in _stdin
        self.written = 0  # input bytes the process has taken (or refused by closing it)
        self._stdin_eof = False
        self._writer_on = False
        self._stopping: asyncio.Task[None] | None = None
        self._stop_asked = False
        self._ended: Ended | None = None

    # ------------------------------------------------------------------ contract

    def start(self) -> int:
        """Spawn; returns the pid. Raises SpawnError, with no cgroup or ledger entry left."""
        self._spawn()
        return self._watch()

    async def start_off_loop(self) -> int:
        """``start``, with the cgroup made and the child spawned in a worker thread when
        nothing runs in the child before exec (``procs.vforks``): the event loop goes on
        answering while the kernel makes the cgroup and the child execs."""
        if procs.vforks(self.launch.run_as, self.launch.tty):
            spawning = asyncio.ensure_future(asyncio.to_thread(self._spawn))
            try:
                await asyncio.shield(spawning)
            except asyncio.CancelledError:
                # The thread goes on: wait for it, so that close() finds what it started.
                await asyncio.wait({spawning})
                if not spawning.cancelled():
                    spawning.exception()  # retrieved: the cancellation is what we raise
                raise
        else:
            self._spawn()
        return self._watch()

    def _spawn(self) -> None:
        ln = self.launch
        unit = self._make_unit()
        run_as = ln.run_as or RunAs()
        if unit is not None:
            run_as = replace(run_as, unit=unit) if ln.run_as is not None else RunAs(unit=unit)
        try:
            self.child = spawn(ln.argv, ln.env, cwd=ln.cwd, tty=ln.tty, cols=ln.cols,
                               rows=ln.rows, stdin=ln.stdin,
                               run_as=run_as if run_as != RunAs() else None)
        except SpawnError:
            self._drop_unit(unit)
            raise
        if unit is None:  # a unit is in the ledger: ending it ends all the child started
            self.ledger.add(self.child.pid)
        if ln.marker is not None:
            self.child.marker = f"{ln.marker[0]}={ln.marker[1]}".encode()
            if unit is None and self.child.marker.isascii() and b"\n" not in self.child.marker:
                self.ledger.add_marker(self.child.marker.decode())

    def _watch(self) -> int:
        assert self.child is not None
        for stream in self.child.out_fds:
            self._eof[stream] = asyncio.Event()
        if not self.child.tty:
            self._small_pipes.update(self.child.out_fds.values())
        if self.child.tty or not self._watch_at_wait:
            self._watch_pipes()
        return self.child.pid

    def _watch_pipes(self) -> None:
        if self._watching:
            return
        self._watching = True
        if not self._paused:
            self._add_readers()

    def _add_readers(self) -> None:
        assert self.child is not None
        loop = asyncio.get_running_loop()
        for stream, fd in self.child.out_fds.items():
            if not self._eof[stream].is_set():
                loop.add_reader(fd, self._on_readable, stream, fd)

    def _catch_up(self) -> None:
        """The leader has ended before its pipes were watched: read what they hold now, and
        watch only one that something in the background still holds open."""
        if self._watching:
            return
        assert self.child is not None
        for stream, fd in self.child.out_fds.items():
            for _ in range(16):  # bounded: a background writer may never let it run dry
                if self._paused or not self._on_readable(stream, fd):
                    break
        self._watch_pipes()

    def poll(self) -> int | None:
        """None while the leader runs, else its status (negative: the signal)."""
        return None if self.child is None else self.child.popen.poll()

    def state(self) -> State:
        assert self.child is not None
        unit = self.child.unit
        if unit is not None:
            return State(self.child.pid, tuple(unit.dirs))
        return State(self.child.pid, marker=self.child.marker.decode())

    @property
    def pid(self) -> int:
        assert self.child is not None
        return self.child.pid

    @property
    def started(self) -> float:
        assert self.child is not None
        return self.child.started

    @property
    def stopping(self) -> bool:
        """A stop was asked for (even once the leader had exited)."""
        return self._stop_asked

    def stop_soon(self, term_timeout: float, kill_timeout: float = KILL_TIMEOUT,
                  first: Callable[[], Awaitable[None]] | None = None) -> None:
        """Start stopping (``first``, e.g. a container stop, then ``stop``); once only."""
        self._stop_asked = True
        if self._stopping is not None or self.child is None or self.poll() is not None:
            return

        async def stopping() -> None:
            if first is not None:
                await first()
            assert self.child is not None
            await self.child.stop(term_timeout, kill_timeout)

        self._stopping = asyncio.create_task(stopping())

    async def stop(self, term_timeout: float, kill_timeout: float = KILL_TIMEOUT) -> None:
        self.stop_soon(term_timeout, kill_timeout)
        if self._stopping is not None:
            await asyncio.gather(self._stopping, return_exceptions=True)

    async def until_running(self) -> None:
        assert self.child is not None
        await self.child.until_running()

    async def wait(self, after_leader: Callable[[int | None, int | None], Awaitable[None]]
                   | None = None) -> Ended:
        """Until the process has ended (see the module's doc); ``after_leader`` runs once
        the leader has exited, before the rest is ended."""
        child = self.child
        assert child is not None
        if self._ended is not None:
            return self._ended
        if child.popen.poll() is None:
            self._watch_pipes()  # still running at the first look: its output streams
        code, sig = await child.wait()
        self._catch_up()
        if self._stopping is not None:  # a stop in progress owns the grace period
            await asyncio.gather(self._stopping, return_exceptions=True)
        if after_leader is not None:
            await after_leader(code, sig)
        await child.end_rest(LEFTOVER_GRACE, KILL_TIMEOUT)
        drained = await self._drain()
        if not drained:
            log.warning("%s: output still open after its processes ended; closing it",
                        self.launch.label)
        limit = child.unit.limit_reason() if child.unit is not None else ""
        self._release()
        self._ended = Ended(code, sig, child.started, limit, drained)
        return self._ended

    async def close(self) -> None:
        """After an error in the caller: kill whatever is left, release everything."""
        child = self.child
        if child is None or self._ended is not None:
            return
        await child.stop(0, KILL_TIMEOUT)
        if child.popen.poll() is not None:
            await child.wait()
        self._release()

    def _release(self) -> None:
        child = self.child
        assert child is not None
        loop = asyncio.get_running_loop()
        if self._watching:
            for fd in child.out_fds.values():
                loop.remove_reader(fd)
        if self._writer_on and child.stdin_fd is not None:
            loop.remove_writer(child.stdin_fd)
            self._writer_on = False
        child.close_fds()
        if child.unit is not None:
            # Orphans are reaped only when something outlived the leader: a look walks every
            # child of the agent, and a thousand sessions ending together made that quadratic.
            gone = self._remove_unit(child.unit, child.left_orphans, keep=child.found_empty)
            if gone:
                self.ledger.remove_cgroup(gone)
            return
        self.ledger.remove(child.pid)
        if child.marker:
            self.ledger.remove_marker(child.marker.decode())

    # ------------------------------------------------------------------ cgroup

    def _make_unit(self) -> Unit | None:
        if self.layout is None or self.launch.unit is None:
            return None
        unit = Unit(self.layout, self.launch.unit, self.launch.limits)
        if unit.take_spare():  # its directory is in the ledger since it was made
            return unit
        self.ledger.add_cgroup(unit.dirs)
        try:
            unit.create()
        except OSError as e:
            self.ledger.remove_cgroup(unit.dirs)
            raise SpawnError(f"cannot create the cgroup of {self.launch.label}: {e}",
                             126) from e
        return unit

    def _drop_unit(self, unit: Unit | None) -> None:
        gone = self._remove_unit(unit)
        if gone:
            self.ledger.remove_cgroup(gone)

    @staticmethod
    def _remove_unit(unit: Unit | None, orphans: bool = False, keep: bool = False) -> list[str]:
        """Remove the unit's cgroup, or, with ``keep`` (it was found empty once the leader
        ended), keep it for the node's next run; the directories removed (for the ledger)."""
        if unit is None:
            return []
        if orphans:
            procs.reap_orphans(unit.layout.base)
        if keep:
            return unit.retire()
        return unit.dirs if unit.remove() else []

    # ------------------------------------------------------------------ output

    def _on_readable(self, stream: str, fd: int) -> bool:
        """Read once; False when there is nothing more to read now (or ever: EOF)."""
        try:
            data = os.read(fd, self.read_size)
        except BlockingIOError:
            return False
        except OSError:  # EIO: the pty's other side closed
            data = b""
        if not data:
            if self._watching:
                asyncio.get_running_loop().remove_reader(fd)
            self._eof[stream].set()
            return False
        if len(data) >= min(procs.PIPE_DEFAULT, self.read_size) and fd in self._small_pipes:
            self._small_pipes.discard(fd)
            procs.grow_pipe(fd)  # the pipe was full: fewer, larger reads from now on
        self.on_output(stream, data)
        return True

    @property
    def paused(self) -> bool:
        return self._paused

    def pause(self) -> None:
        """Stop reading: the process blocks on a full pipe until ``resume``."""
        if self._paused or self.child is None:
            return
        self._paused = True
        loop = asyncio.get_running_loop()
        for stream, fd in self.child.out_fds.items():
            if not self._eof[stream].is_set():
                loop.remove_reader(fd)

    def resume(self) -> None:
        if not self._paused or self.child is None:
            return
        self._paused = False
        if self._watching:
            self._add_readers()

    async def _drain(self) -> bool:
        """Wait for EOF on every pipe. With nothing of the process left EOF comes once the
        pipes are empty; a descriptor held elsewhere (an escapee no cgroup holds) is given
        DRAIN_LIMIT seconds, counted again while paused, except once a stop was asked for
        (a store that takes nothing must not keep a kill open for ever)."""
        for _ in range(2):  # the common case: the pipes end with the process, their EOF
            if all(e.is_set() for e in self._eof.values()):  # read on this turn of the loop
                return True
            await asyncio.sleep(0)
        waiting = asyncio.gather(*(e.wait() for e in self._eof.values()))
        deadline = time.monotonic() + DRAIN_LIMIT
        while not waiting.done():
            try:
                await asyncio.wait_for(asyncio.shield(waiting), 0.5)
            except TimeoutError:
                if self._paused and not self._stop_asked:
                    deadline = time.monotonic() + DRAIN_LIMIT
                elif time.monotonic() > deadline:
                    waiting.add_done_callback(lambda f: f.cancelled() or f.exception())
                    waiting.cancel()
                    return False
        return True

    # ------------------------------------------------------------------ input

    @property
    def held(self) -> int:
        """Input bytes accepted and not yet taken by the process."""
        return self._held

    def write(self, data: bytes) -> bool:
        """Queue input; it is written as the process reads. Refused (False, logged) when
        the process has no input or STDIN_LIMIT bytes are already held: never dropped
        unsaid."""
        child = self.child
        if child is None or child.stdin_fd is None or self._stdin_eof:
            return False
        if self._held + len(data) > STDIN_LIMIT:
            log.warning("%s: %d input bytes refused: the process is not reading (%d held)",
                        self.launch.label, len(data), self._held)
            return False
        if data:
            self._stdin.append(data)
            self._held += len(data)
        self._flush()
        return True

    def end_input(self) -> None:
        """After what is held: close the pipe, or (a terminal) send the EOF character."""
        if self.child is None or self.child.stdin_fd is None:
            return
        self._stdin_eof = True
        self._flush()

    def _flush(self) -> None:
        child = self.child
        if child is None or child.stdin_fd is None:
            return
        fd = child.stdin_fd
        before = self.written
        while self._stdin:
            chunk = self._stdin[0]
            try:
                n = os.write(fd, chunk)
            except BlockingIOError:
                break
            except OSError:  # EPIPE: the process closed its input; the rest goes nowhere
                self.written += self._held
                self._stdin.clear()
                self._held = 0
                break
            self.written += n
            self._held -= n
            if n < len(chunk):
                self._stdin[0] = chunk[n:]
                break
            self._stdin.popleft()
        loop = asyncio.get_running_loop()
        if self._stdin and not self._writer_on:
            loop.add_writer(fd, self._flush)
            self._writer_on = True
        elif not self._stdin and self._writer_on:
            loop.remove_writer(fd)
            self._writer_on = False
        if not self._stdin and self._stdin_eof:
            self._stdin_eof = False
            if child.tty:  # a terminal has no end of input of its own
                try:
                    os.write(fd, b"\x04")
                except OSError:
                    pass
            else:
                os.close(fd)
                child.stdin_fd = None
        if self.on_input is not None and self.written != before:
            self.on_input(self.written, self._held)

    # ------------------------------------------------------------------ terminal, signals

    def resize(self, cols: int, rows: int) -> None:
        child = self.child
        if child is not None and child.tty and child.stdin_fd is not None:
            set_winsize(child.stdin_fd, cols, rows)
            child.signal_group(signal.SIGWINCH)

    def signal(self, sig: int) -> None:
        if self.child is not None:
            self.child.signal_group(sig)
