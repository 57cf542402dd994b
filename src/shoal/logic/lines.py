"""Line assembly for per-node output streams.

Chunks from the network split anywhere; ``LineSplitter`` turns them back into
whole lines so the output of different nodes never interleaves mid-line.
"""

from __future__ import annotations

__all__ = ["DEFAULT_MAX_LINE", "LineSplitter", "prefix_lines", "safe_text"]

Buffer = bytes | bytearray | memoryview

DEFAULT_MAX_LINE = 64 * 1024


class LineSplitter:
    """Split a byte stream into lines, bounding memory with ``max_line``.

    A line (newline included) of at most ``max_line`` bytes is emitted whole;
    longer lines are emitted in ``max_line``-byte pieces.  The decision depends
    only on the stream content, so any chunking of the input gives the same output.
    """

    def __init__(self, max_line: int = DEFAULT_MAX_LINE) -> None:
        if max_line < 1:
            raise ValueError(f"max_line must be positive, got {max_line}")
        self.max_line = max_line
        self._buf = bytearray()
        # Bytes at the start of _buf already known to hold no newline: avoids
        # rescanning a long partial line on every tiny chunk (quadratic cost).
        self._scanned = 0

    def feed(self, data: bytes) -> list[bytes]:
        """Add ``data``; return the complete lines (and full-size pieces) now available."""
        buf = self._buf
        buf += data
        lines: list[bytes] = []
        start = 0
        limit = self.max_line
        while True:
            nl = buf.find(b"\n", max(start, self._scanned), start + limit)
            if nl >= 0:
                lines.append(bytes(buf[start : nl + 1]))
                start = nl + 1
            elif len(buf) - start >= limit:
                lines.append(bytes(buf[start : start + limit]))
                start += limit
            else:
                break
        del buf[:start]
        self._scanned = len(buf)
        return lines

    def render(self, data: bytes, prefix: bytes) -> bytes:
        """Like ``feed``, but return what is now complete already rendered as
        ``prefix + line`` (a newline added to cut pieces), in one buffer.

        The same lines and pieces as ``feed``, found with a bulk search per ``max_line``
        bytes rather than per line, and copied once: the printer's hot path.
        """
        buf = self._buf
        limit = self.max_line
        n = len(data)
        out: list[Buffer] = []
        pos = 0
        if buf:
            # Complete the partial line held back from the previous chunk.
            need = limit - len(buf)
            nl = data.find(b"\n", 0, need)
            if nl >= 0:
                pos = nl + 1
            elif n >= need:
                pos = need
            else:
                buf += data
                self._scanned = len(buf)
                return b""
            buf += memoryview(data)[:pos]
            out += (prefix, bytes(buf))
            if nl < 0:
                out.append(b"\n")
            buf.clear()
        view = memoryview(data)
        nl_prefix = b"\n" + prefix
        while pos < n:
            # Every line in a run ending at the last newline within max_line bytes is whole.
            nl = data.rfind(b"\n", pos, pos + limit)
            if nl >= 0:
                out += (prefix, data[pos:nl].replace(b"\n", nl_prefix), b"\n")
                pos = nl + 1
            elif n - pos >= limit:
                out += (prefix, view[pos : pos + limit], b"\n")
                pos += limit
            else:
                break
        if pos < n:
            buf += view[pos:]
        self._scanned = len(buf)
        return b"".join(out)

    def flush(self) -> bytes | None:
        """Return the unterminated tail at end of stream, or None if there is none."""
        if not self._buf:
            return None
        tail = bytes(self._buf)
        self._buf.clear()
        self._scanned = 0
        return tail

    @property
    def pending(self) -> int:
        """Number of buffered bytes not yet returned."""
        return len(self._buf)


def prefix_lines(node: str, lines: list[bytes]) -> bytes:
    """Render ``node: line`` for each line, terminating any unterminated piece."""
    prefix = node.encode("utf-8", errors="replace") + b": "
    out = bytearray()
    for line in lines:
        out += prefix
        out += line
        if not line.endswith(b"\n"):
            out += b"\n"
    return bytes(out)


def safe_text(data: bytes) -> str:
    """Decode as UTF-8, replacing invalid bytes: binary output must never crash."""
    return data.decode("utf-8", errors="replace")
