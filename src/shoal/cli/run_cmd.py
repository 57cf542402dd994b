"""``shoal run``: drive one fan-out run from the terminal.

This path is synchronous on purpose: a blocking WebSocket (``shoal.client.websocket``), a thread for
standard input, and signal handlers, without asyncio or aiohttp, because the whole command
is timed by its users (a new process per run) and those imports cost more than the run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import termios
import threading
import tty
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Protocol

from ..client.websocket import OP_BINARY, WebSocket
from ..errors import ConnectError, ProtocolError, error_for_status
from ..logic.outcome import summarize
from ..system.malloc import reuse_heap_for_bulk_io
from ..wire import messages as m
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


class _Sender:
    """Frames to the controller from several threads (stdin, signal handlers), one at a time."""

    def __init__(self, ws: WebSocket) -> None:
        self.ws = ws
        self.lock = threading.Lock()
        self.stdin_offset = 0

    def send(self, frame: m.ClientFrame) -> None:
        with self.lock:
            try:
                self.ws.send_binary(m.pack(frame))
            except OSError:
                pass  # the connection is gone; the reader reports it

    def stdin(self, data: bytes, eof: bool = False) -> None:
        self.send(m.StdinData(offset=self.stdin_offset, data=data, eof=eof))
        self.stdin_offset += len(data)


class Leg(Protocol):
    """One part of a run with its own transport: the controller's agents (``_AgentLeg``)
    or the CLI's own ssh connections (``shoal.ssh.fanout.SshLeg``). All methods but
    ``run`` are called from other threads."""

    @property
    def nodes(self) -> list[str]: ...

    def stdin(self, data: bytes, eof: bool = False) -> None: ...

    def signal(self, signum: int) -> None: ...

    def resize(self, cols: int, rows: int) -> None: ...

    def run(self, emit: Callable[[m.RunEvent], None]) -> None:
        """Blocks until every node of the leg has ended, passing on its events."""


def _pump_stdin(legs: list[Leg], chunk: int, fd: int | None = None,
                sent: Callable[[int], None] | None = None) -> None:
    """The CLI's stdin (or ``fd``) to every node; its end is passed on as EOF. ``sent``
    hears how many bytes each chunk was (the progress bar)."""
    fd = sys.stdin.fileno() if fd is None else fd
    while True:
        try:
            data = os.read(fd, chunk)
        except OSError:
            data = b""
        for leg in legs:
            leg.stdin(data, eof=not data)
        if sent is not None:
            sent(len(data))
        if not data:
            return


def _open(url: str, token: str, start: m.RunStart,
          ca: str = "") -> tuple[WebSocket, m.RunPlan]:
    ws_url = "ws" + url[4:] if url.startswith("http") else url
    ws = WebSocket.connect(ws_url.rstrip("/") + "/api/v1/run",
                           {"Authorization": f"Bearer {token}"}, ca=ca)
    ws.send_binary(m.pack(start))
    first = _next(ws)
    if isinstance(first, m.ErrorFrame):
        ws.close()
        raise error_for_status(first.status, first.message)
    if not isinstance(first, m.RunPlan):
        raise ProtocolError(f"expected a run plan, got {type(first).__name__}")
    return ws, first


def _next(ws: WebSocket) -> m.ServerFrame:
    msg = ws.receive()
    if msg is None:
        raise ConnectError("the controller closed the connection before the run ended")
    opcode, payload = msg
    if opcode != OP_BINARY:
        raise ProtocolError("expected a binary frame from the controller")
    return m.unpack_server_frame(payload)


class _AgentLeg:
    """The agent nodes of a run, through the controller's WebSocket."""

    def __init__(self, url: str, token: str, start: m.RunStart, ca: str = "") -> None:
        from ..client.endpoints import first_reachable  # url may list a cluster's controllers

        self.ws, self.plan = _open(first_reachable(url), token, start, ca)
        self.sender = _Sender(self.ws)

    @property
    def nodes(self) -> list[str]:
        return self.plan.nodes

    def stdin(self, data: bytes, eof: bool = False) -> None:
        self.sender.stdin(data, eof)

    def signal(self, signum: int) -> None:
        self.sender.send(m.SignalRun(signum=signum))

    def resize(self, cols: int, rows: int) -> None:
        self.sender.send(m.Resize(cols=cols, rows=rows))

    def run(self, emit: Callable[[m.RunEvent], None]) -> None:
        try:
            while True:
                ev = _next(self.ws)
                if isinstance(ev, m.RunDone):
                    return
                if isinstance(ev, m.ErrorFrame):
                    raise error_for_status(ev.status, ev.message)
                for one in ev.events if isinstance(ev, m.RunEvents) else (ev,):
                    if isinstance(one, m.Output | m.Exit | m.Unreachable | m.Skipped):
                        emit(one)
        finally:
            with self.sender.lock:
                self.ws.close()


def run_command(url: str, token: str, targets: m.Targets | None, spec: m.RunSpec, *,
                mode: str, progress: bool, connect_timeout: float, batch: int = 0,
                batch_percent: int = 0, fanout: int = 0, keep_going: bool = False,
                stdin_fd: int | None = None, printer: Printer | None = None,
                ssh: Leg | None = None, ca: str = "", progress_label: str = "gathering",
                progress_bytes: str = "") -> int:
    """Run and print; returns the exit status for the CLI. ``stdin_fd`` feeds the nodes'
    stdin from that file instead of the terminal's (``shoal copy``). ``ssh`` is the run's
    ssh hosts, run beside the agent nodes (``targets``; None: no agent nodes).
    ``progress`` shows a bar of nodes done on a terminal; ``progress_bytes`` adds the bytes
    of ``stdin_fd`` sent (``"stdin"``, once however many nodes) or of stdout received
    (``"stdout"``)."""
    if printer is None:
        printer = {"gather": Gathered, "json": JsonLines, "raw": Raw}.get(mode, Prefixed)()
    results: dict[str, m.Exit | m.Unreachable] = {}
    skipped: dict[str, str] = {}
    legs: list[Leg] = []
    if targets is not None:
        legs.append(_AgentLeg(url, token, m.RunStart(
            targets=targets, spec=spec, connect_timeout=connect_timeout, batch=batch,
            batch_percent=batch_percent, fanout=fanout, keep_going=keep_going), ca))
    if ssh is not None:
        legs.append(ssh)
    planned = [n for leg in legs for n in leg.nodes]
    interrupts = 0

    def on_interrupt(signum: int, frame: FrameType | None) -> None:
        nonlocal interrupts
        interrupts += 1
        if interrupts == 1:
            sys.stderr.write("\nshoal: sending SIGINT to every node; Ctrl-C again to kill\n")
        for leg in legs:
            leg.signal(signal.SIGINT if interrupts == 1 else signal.SIGKILL)

    def on_winch(signum: int, frame: FrameType | None) -> None:
        cols, rows = terminal_size()
        for leg in legs:
            leg.resize(cols, rows)

    upload = os.fstat(stdin_fd).st_size if progress_bytes == "stdin" and stdin_fd is not None \
        else None
    bar = _progress(len(planned), progress_label, progress_bytes, upload) if progress else None
    lock = threading.Lock()  # the legs' threads share one printer

    def emit(ev: m.RunEvent) -> None:
        with lock:
            if isinstance(ev, m.Output):
                reuse_heap_for_bulk_io()  # once, with the first output (ctypes: 1 ms to load)
                printer.output(ev)
                if bar is not None and progress_bytes == "stdout" and ev.stream == "stdout":
                    bar.add_bytes(len(ev.data))
            elif isinstance(ev, m.Exit | m.Unreachable):
                ev = printer.settle(ev)
                results[ev.node] = ev
                printer.exited(ev.node, ev)
                if bar is not None:
                    bar.advance()
            elif isinstance(ev, m.Skipped):
                skipped[ev.node] = ev.reason
                if bar is not None:
                    bar.advance()

    old_int = signal.signal(signal.SIGINT, on_interrupt) if mode != "raw" else None
    old_winch = signal.signal(signal.SIGWINCH, on_winch) if mode == "raw" else None
    if spec.tty or spec.stdin:
        threading.Thread(target=_pump_stdin, daemon=True,
                         args=(legs, 4096 if spec.tty else STDIN_CHUNK, stdin_fd,
                               bar.add_bytes if bar is not None and progress_bytes == "stdin"
                               else None)).start()
    errors: list[BaseException] = []

    def run_leg(leg: Leg) -> None:
        try:
            leg.run(emit)
        except BaseException as e:  # raised again in the main thread
            errors.append(e)

    others = [threading.Thread(target=run_leg, args=(leg,), daemon=True) for leg in legs[1:]]
    try:
        for t in others:
            t.start()
        if legs:
            legs[0].run(emit)
        for t in others:
            t.join()
        if errors:
            raise errors[0]
    finally:
        if bar is not None:
            bar.stop()
        if old_int is not None:
            signal.signal(signal.SIGINT, old_int)
        if old_winch is not None:
            signal.signal(signal.SIGWINCH, old_winch)
        printer.close()
    missing = [n for n in planned if n not in results and n not in skipped]
    outcome = summarize(results, missing, skipped)
    if outcome.summary and mode != "raw":
        sys.stderr.write(outcome.summary + "\n")
    return outcome.status


class _Bar:
    """Nodes done of the run's nodes and, for copies, bytes moved, on stderr (rich), gone
    when the run ends."""

    def __init__(self, total: int, label: str, bytes_label: str, total_bytes: int | None
                 ) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn

        self._progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                  TextColumn("{task.fields[done]}"),
                                  console=Console(stderr=True), transient=True)
        self._total = total
        self._nodes = 0
        self._task = self._progress.add_task(label, total=total, done=self._nodes_done())
        self._bytes = 0
        self._total_bytes = total_bytes
        self._bytes_task = None
        if bytes_label:
            self._bytes_task = self._progress.add_task(
                {"stdin": "sent", "stdout": "received"}[bytes_label], total=total_bytes,
                done=self._bytes_done())
        self._progress.start()

    def _nodes_done(self) -> str:
        return f"{self._nodes}/{self._total} nodes"

    def _bytes_done(self) -> str:
        of = f"/{_size(self._total_bytes)}" if self._total_bytes is not None else ""
        return f"{_size(self._bytes)}{of}"

    def advance(self) -> None:
        self._nodes += 1
        self._progress.update(self._task, advance=1, done=self._nodes_done())

    def add_bytes(self, n: int) -> None:
        if self._bytes_task is not None:
            self._bytes += n
            self._progress.update(self._bytes_task, advance=n, done=self._bytes_done())

    def stop(self) -> None:
        self._progress.stop()


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value, unit = n / 1024, "KiB"
    for bigger in ("MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.1f} {unit}"


def _progress(total: int, label: str = "gathering", bytes_label: str = "",
              total_bytes: int | None = None) -> _Bar | None:
    """A bar only on a terminal, and for a plain run only past one node."""
    if not sys.stderr.isatty() or (total <= 1 and not bytes_label):
        return None
    return _Bar(total, label, bytes_label, total_bytes)
