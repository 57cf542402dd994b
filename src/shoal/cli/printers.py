"""Output modes of ``shoal run``: small handlers over one event stream (like clush's).

``Prefixed`` prints live, each line as ``node: text``; ``Gathered`` groups identical outputs
(``--gather``); ``JsonLines`` prints one JSON object per node (``--json``); ``Raw`` passes
a single terminal through untouched (``--tty``).
"""

from __future__ import annotations

import sys
from typing import BinaryIO

import msgspec

from ..logic.gather import OutputGatherer
from ..logic.lines import LineSplitter, prefix_lines, safe_text
from ..logic.outcome import node_status
from ..wire import messages as m


class Printer:
    def __init__(self, out: BinaryIO | None = None, err: BinaryIO | None = None) -> None:
        self.out = out or sys.stdout.buffer
        self.err = err or sys.stderr.buffer

    def output(self, ev: m.Output) -> None:
        raise NotImplementedError

    def settle(self, result: m.Exit | m.Unreachable) -> m.Exit | m.Unreachable:
        """The node's result as counted: a printer that finishes work of its own when a
        node ends (``shoal rcopy`` placing a file) may fail it."""
        return result

    def exited(self, node: str, result: m.Exit | m.Unreachable) -> None:
        pass

    def close(self) -> None:
        self.out.flush()
        self.err.flush()


class Prefixed(Printer):
    def __init__(self, out: BinaryIO | None = None, err: BinaryIO | None = None) -> None:
        super().__init__(out, err)
        self._splitters: dict[tuple[str, str], LineSplitter] = {}
        self._prefixes: dict[str, bytes] = {}

    def _stream(self, stream: str) -> BinaryIO:
        return self.err if stream == "stderr" else self.out

    def output(self, ev: m.Output) -> None:
        key = (ev.node, ev.stream)
        splitter = self._splitters.get(key)
        if splitter is None:
            splitter = self._splitters[key] = LineSplitter()
        prefix = self._prefixes.get(ev.node)
        if prefix is None:
            prefix = self._prefixes[ev.node] = ev.node.encode("utf-8", errors="replace") + b": "
        rendered = splitter.render(ev.data, prefix)
        if rendered:
            f = self._stream(ev.stream)
            f.write(rendered)
            f.flush()

    def exited(self, node: str, result: m.Exit | m.Unreachable) -> None:
        for (n, stream), splitter in list(self._splitters.items()):
            if n != node:
                continue
            tail = splitter.flush()
            if tail:
                self._stream(stream).write(prefix_lines(node, [tail]))
            del self._splitters[(n, stream)]
        if isinstance(result, m.Unreachable):
            self.err.write(f"{node}: unreachable: {result.reason}\n".encode())
        elif result.reason:
            self.err.write(f"{node}: {result.reason}\n".encode())
        self.out.flush()
        self.err.flush()


class Gathered(Printer):
    """Standard output grouped by identical content; stderr stays live and prefixed."""

    def __init__(self, out: BinaryIO | None = None, err: BinaryIO | None = None) -> None:
        super().__init__(out, err)
        self._stdout = OutputGatherer()
        self._stderr = Prefixed(self.err, self.err)

    def output(self, ev: m.Output) -> None:
        if ev.stream == "stderr":
            self._stderr.output(ev)
        else:
            self._stdout.add(ev.node, ev.data)

    def exited(self, node: str, result: m.Exit | m.Unreachable) -> None:
        self._stderr.exited(node, result)
        if isinstance(result, m.Exit):
            self._stdout.finish(node)

    def close(self) -> None:
        for data, nodes in self._stdout.groups():
            header = f"{nodes} ({len(nodes)})"
            rule = "-" * min(max(len(header), 15), 78)
            self.out.write(f"{rule}\n{header}\n{rule}\n".encode())
            self.out.write(data if data.endswith(b"\n") or not data else data + b"\n")
        super().close()


class JsonLines(Printer):
    """One JSON object per node, printed when that node ends."""

    def __init__(self, out: BinaryIO | None = None, err: BinaryIO | None = None) -> None:
        super().__init__(out, err)
        self._buf: dict[tuple[str, str], bytearray] = {}

    def output(self, ev: m.Output) -> None:
        self._buf.setdefault((ev.node, ev.stream), bytearray()).extend(ev.data)

    def _take(self, node: str, stream: str) -> str:
        return safe_text(bytes(self._buf.pop((node, stream), b"")))

    def exited(self, node: str, result: m.Exit | m.Unreachable) -> None:
        record: dict[str, object] = {
            "node": node,
            "status": node_status(result),
            "stdout": self._take(node, "stdout") + self._take(node, "pty"),
            "stderr": self._take(node, "stderr"),
        }
        if isinstance(result, m.Unreachable):
            record.update(exit_code=None, signal=None, reachable=False, timed_out=False,
                          reason=result.reason)
        else:
            record.update(exit_code=result.code, signal=result.signal, reachable=True,
                          timed_out=result.timed_out, reason=result.reason,
                          started=result.started, ended=result.ended,
                          duration_s=round(result.ended - result.started, 6))
        self.out.write(msgspec.json.encode(record) + b"\n")
        self.out.flush()


class Raw(Printer):
    """A single interactive terminal: bytes straight through."""

    def output(self, ev: m.Output) -> None:
        (self.err if ev.stream == "stderr" else self.out).write(ev.data)
        self.out.flush()

    def exited(self, node: str, result: m.Exit | m.Unreachable) -> None:
        if isinstance(result, m.Unreachable):
            self.err.write(f"\r\n{node}: unreachable: {result.reason}\r\n".encode())
        elif result.reason:
            self.err.write(f"\r\n{node}: {result.reason}\r\n".encode())
