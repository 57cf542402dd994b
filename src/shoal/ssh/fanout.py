"""The ssh leg of a run: one asyncio loop, one asyncssh connection per host, concurrently.

It produces the events an agent run does (``Output`` with offsets per stream, ``Exit``,
``Unreachable``, ``Skipped``), so ``shoal run`` prints, gathers and sums ssh hosts with the
same printers and the same exit status. ``run`` blocks in whichever thread calls it; the
CLI's other threads (stdin, signal handlers) reach the loop through ``stdin``, ``signal``
and ``resize``, which are thread-safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal as signals
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncssh

from ..logic.nodeset import NodeSet
from ..wire import messages as m
from .connect import Connector, HostUnreachable
from .targets import Inventory, SshTarget, remote_command

Emit = Callable[[m.RunEvent], None]
READ_CHUNK = 64 << 10


def roll_slices(nodes: list[str], batch: int, percent: int) -> list[list[str]]:
    """``controller.fanout.Roll.slices`` (a test keeps them equal), without importing the
    controller's NATS stack into the CLI."""
    size = batch or (-(-len(nodes) * percent // 100) if percent else 0)
    size = max(1, size) if size else len(nodes) or 1
    return [nodes[i:i + size] for i in range(0, len(nodes), size)]


class HostIO:
    """What one host's work sees: the leg's stdin, signals and sizes, and its output."""

    def __init__(self, leg: SshLeg, target: SshTarget) -> None:
        self.leg = leg
        self.target = target
        self.offsets = {"stdout": 0, "stderr": 0, "pty": 0}
        self.procs: set[asyncssh.SSHClientProcess[bytes]] = set()

    def output(self, stream: m.Stream, data: bytes) -> None:
        self.leg.emit(m.Output(node=self.target.name, stream=stream,
                               offset=self.offsets[stream], data=data))
        self.offsets[stream] += len(data)


Work = Callable[[asyncssh.SSHClientConnection, HostIO], Awaitable[m.Exit]]


class SshLeg:
    """The ssh hosts of one run (or copy): ``work`` does each host's part on its
    connection and says how it ended."""

    def __init__(self, targets: list[SshTarget], work: Work, *, inventory: Inventory,
                 connect_timeout: float, known_hosts: Path | None = None,
                 accept_new: bool = False, batch: int = 0, batch_percent: int = 0,
                 fanout: int = 0, keep_going: bool = False, takes_stdin: bool = True) -> None:
        self.targets = targets
        self.work = work
        self.connector = Connector(inventory, connect_timeout, known_hosts=known_hosts,
                                   accept_new=accept_new)
        self.batch, self.percent = batch, batch_percent
        self.fanout, self.keep_going = fanout, keep_going
        self.loop = asyncio.new_event_loop()
        self.stdin_chunks: list[bytes] = []  # kept: a host that starts later gets all of it
        self.stdin_eof = False
        self.takes_stdin = takes_stdin  # a copy's hosts read the file, not the stdin pipe
        self.stdin_changed = asyncio.Event()
        self.hosts: dict[str, HostIO] = {}
        self.interrupts: list[int] = []
        self._emit: Emit | None = None

    @property
    def nodes(self) -> list[str]:
        return [t.name for t in self.targets]

    def emit(self, ev: m.RunEvent) -> None:
        assert self._emit is not None
        self._emit(ev)

    # ------------------------------------------------------------ from other threads

    def _call(self, fn: Callable[[], None]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the leg is over
            self.loop.call_soon_threadsafe(fn)

    def stdin(self, data: bytes, eof: bool = False) -> None:
        if not self.takes_stdin:
            return

        def feed() -> None:
            if data:
                self.stdin_chunks.append(data)
            self.stdin_eof = self.stdin_eof or eof
            self.stdin_changed.set()
            self.stdin_changed = asyncio.Event()
        self._call(feed)

    def signal(self, signum: int) -> None:
        def send() -> None:
            self.interrupts.append(signum)
            name = signals.Signals(signum).name.removeprefix("SIG")
            for host in self.hosts.values():
                for proc in host.procs:
                    with contextlib.suppress(OSError, asyncssh.Error):
                        proc.send_signal(name)
                        if signum == signals.SIGKILL:
                            proc.close()  # the server may not pass signals on
        self._call(send)

    def resize(self, cols: int, rows: int) -> None:
        def send() -> None:
            for host in self.hosts.values():
                for proc in host.procs:
                    with contextlib.suppress(OSError, asyncssh.Error):
                        proc.change_terminal_size(cols, rows)
        self._call(send)

    # ------------------------------------------------------------ the loop

    def run(self, emit: Emit) -> None:
        self._emit = emit
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._run_all())
        finally:
            self.connector.close()
            self.loop.run_until_complete(asyncio.sleep(0))
            self.loop.close()

    async def _run_all(self) -> None:
        width = self.fanout or len(self.targets) or 1
        gate = asyncio.Semaphore(width)
        failed: set[str] = set()
        halt = ""

        async def one(t: SshTarget) -> None:
            async with gate:
                if halt:
                    self.emit(m.Skipped(node=t.name, reason=halt))
                elif not await self._host(t):
                    failed.add(t.name)

        by_name = {t.name: t for t in self.targets}
        slices = roll_slices(self.nodes, self.batch, self.percent)
        for i, chunk in enumerate(slices):
            await asyncio.gather(*(one(by_name[n]) for n in chunk))
            bad = failed.intersection(chunk)
            if bad and not self.keep_going and i + 1 < len(slices) and not halt:
                halt = (f"not run (slice {i + 1} of {len(slices)} failed on"
                        f" {NodeSet(bad)}; --keep-going rolls on)")

    async def _host(self, t: SshTarget) -> bool:
        """One host, start to end; True if it exited 0."""
        io = self.hosts[t.name] = HostIO(self, t)
        try:
            conn = await self.connector.open(t)
        except HostUnreachable as e:
            self.emit(m.Unreachable(node=t.name, reason=e.reason))
            return False
        try:
            ev = await self.work(conn, io)
        except (OSError, asyncssh.Error) as e:
            reason = e.reason if isinstance(e, asyncssh.Error) else str(e)
            self.emit(m.Unreachable(node=t.name, reason=f"connection lost: {reason}"))
            return False
        finally:
            conn.close()
        self.emit(ev)
        return ev.code == 0 and ev.signal is None and not ev.timed_out

    async def stdin_from(self, index: int) -> tuple[list[bytes], bool]:
        """Stdin chunks from ``index`` on, waiting for some (or EOF) if there are none."""
        while len(self.stdin_chunks) <= index and not self.stdin_eof:
            await self.stdin_changed.wait()
        return self.stdin_chunks[index:], self.stdin_eof


def _signal_number(name: str) -> int | None:
    try:
        return int(signals.Signals["SIG" + name])
    except KeyError:
        return None


def command_work(spec: m.RunSpec) -> Work:
    """Run ``spec`` on each host, as an agent would."""
    command = remote_command(spec)

    async def work(conn: asyncssh.SSHClientConnection, io: HostIO) -> m.Exit:
        options: dict[str, object] = {}
        if spec.tty:
            options = {"term_type": os.environ.get("TERM") or "xterm-256color",
                       "term_size": (spec.cols, spec.rows)}
        started = time.time()
        proc: asyncssh.SSHClientProcess[bytes] = await conn.create_process(
            command, encoding=None, **options)
        io.procs.add(proc)

        async def pump(reader: asyncssh.SSHReader[bytes], stream: m.Stream) -> None:
            while data := await reader.read(READ_CHUNK):
                io.output(stream, data)

        async def feed() -> None:
            if spec.stdin:
                index = 0
                while True:
                    chunks, eof = await io.leg.stdin_from(index)
                    for chunk in chunks:
                        proc.stdin.write(chunk)
                        await proc.stdin.drain()
                    index += len(chunks)
                    if eof and index == len(io.leg.stdin_chunks):
                        break
            with contextlib.suppress(OSError, asyncssh.Error):
                proc.stdin.write_eof()

        feeder = asyncio.ensure_future(feed())
        timed_out = False
        try:
            async with asyncio.timeout(spec.timeout):
                await asyncio.gather(pump(proc.stdout, "pty" if spec.tty else "stdout"),
                                     pump(proc.stderr, "stderr"))
                await proc.wait_closed()
        except TimeoutError:
            timed_out = True
            with contextlib.suppress(OSError, asyncssh.Error):
                proc.send_signal("KILL")
            proc.close()
        finally:
            feeder.cancel()
            io.procs.discard(proc)
        ended = time.time()
        if timed_out:
            return m.Exit(node=io.target.name, timed_out=True, started=started, ended=ended,
                          reason=f"timed out after {spec.timeout:g}s")
        sig = proc.exit_signal
        if sig is not None:
            number = _signal_number(sig[0])
            return m.Exit(node=io.target.name, signal=number, started=started, ended=ended,
                          reason="" if number else f"ended by signal {sig[0]}")
        code = proc.exit_status
        if code is None or code < 0:
            return m.Exit(node=io.target.name, started=started, ended=ended,
                          reason="the server sent no exit status (connection closed?)")
        return m.Exit(node=io.target.name, code=code, started=started, ended=ended)

    return work
