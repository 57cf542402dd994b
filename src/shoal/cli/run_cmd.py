"""``shoal run``: drive one fan-out run from the terminal."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import termios
import tty
from collections.abc import Iterator

from .. import messages as m
from ..client import Client, RunConnection
from ..memtune import reuse_heap_for_bulk_io
from ..outcome import summarize
from .printers import Gathered, JsonLines, Prefixed, Printer, Raw

STDIN_CHUNK = 256 << 10


@contextlib.contextmanager
def raw_terminal(fd: int) -> Iterator[None]:
    old = termios.tcgetattr(fd)
    try:
        tty.setraw(fd, termios.TCSANOW)  # keep what was typed ahead
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, old)


def terminal_size() -> tuple[int, int]:
    try:
        size = os.get_terminal_size(sys.stdout.fileno())
        return size.columns, size.lines
    except OSError:
        return 80, 24


async def _pump_stdin(run: RunConnection) -> None:
    """The CLI's stdin to every node; its end is passed on as EOF."""
    loop = asyncio.get_running_loop()
    fd = sys.stdin.fileno()
    while True:
        data = await loop.run_in_executor(None, os.read, fd, STDIN_CHUNK)
        if not data:
            await run.send_stdin(b"", eof=True)
            return
        await run.send_stdin(data)


async def _pump_tty(run: RunConnection) -> None:
    """Keystrokes from the local terminal, read as they come (it is in raw mode)."""
    loop = asyncio.get_running_loop()
    fd = sys.stdin.fileno()
    queue: asyncio.Queue[bytes] = asyncio.Queue()

    def readable() -> None:
        try:
            queue.put_nowait(os.read(fd, 4096))
        except OSError:
            queue.put_nowait(b"")

    loop.add_reader(fd, readable)
    try:
        while True:
            data = await queue.get()
            if not data:
                await run.send_stdin(b"", eof=True)
                return
            await run.send_stdin(data)
    finally:
        loop.remove_reader(fd)


async def run_command(client: Client, targets: m.Targets, spec: m.RunSpec, *, mode: str,
                      progress: bool, connect_timeout: float) -> int:
    """Run and print; returns the exit status for the CLI."""
    reuse_heap_for_bulk_io()
    printer: Printer = {"gather": Gathered, "json": JsonLines, "raw": Raw}.get(mode, Prefixed)()
    results: dict[str, m.Exit | m.Unreachable] = {}
    loop = asyncio.get_running_loop()
    async with client.run(targets, spec, connect_timeout=connect_timeout) as run:
        assert run.plan is not None
        total = len(run.plan.nodes)
        interrupts = 0

        def on_interrupt() -> None:
            nonlocal interrupts
            interrupts += 1
            if interrupts == 1:
                sys.stderr.write("\nshoal: sending SIGINT to every node; Ctrl-C again to kill\n")
                asyncio.ensure_future(run.signal(signal.SIGINT))
            else:
                asyncio.ensure_future(run.signal(signal.SIGKILL))

        if mode != "raw":
            loop.add_signal_handler(signal.SIGINT, on_interrupt)
        else:
            loop.add_signal_handler(signal.SIGWINCH,
                                    lambda: asyncio.ensure_future(run.resize(*terminal_size())))
        feeder: asyncio.Task[None] | None = None
        if spec.tty:
            feeder = asyncio.create_task(_pump_tty(run))
        elif spec.stdin:
            feeder = asyncio.create_task(_pump_stdin(run))
        bar = _progress(total) if progress else None
        try:
            async for ev in run:
                if isinstance(ev, m.Output):
                    printer.output(ev)
                elif isinstance(ev, m.Exit | m.Unreachable):
                    results[ev.node] = ev
                    printer.exited(ev.node, ev)
                    if bar is not None:
                        bar.advance()
        finally:
            if bar is not None:
                bar.stop()
            if feeder is not None:
                feeder.cancel()
            loop.remove_signal_handler(signal.SIGINT)
            loop.remove_signal_handler(signal.SIGWINCH)
            printer.close()
        missing = [n for n in run.plan.nodes if n not in results]
    outcome = summarize(results, missing)
    if outcome.summary and mode != "raw":
        sys.stderr.write(outcome.summary + "\n")
    return outcome.status


class _Bar:
    def __init__(self, total: int) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self._progress = Progress(TextColumn("gathering"), BarColumn(), MofNCompleteColumn(),
                                  console=Console(stderr=True), transient=True)
        self._task = self._progress.add_task("nodes", total=total)
        self._progress.start()

    def advance(self) -> None:
        self._progress.advance(self._task)

    def stop(self) -> None:
        self._progress.stop()


def _progress(total: int) -> _Bar | None:
    return _Bar(total) if total > 1 and sys.stderr.isatty() else None
