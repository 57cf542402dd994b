"""Durable session output in a JetStream stream, addressable by byte offset.

Every session has one subject, ``shoal.out.<id>``, holding msgpack ``OutputChunk``s whose
offsets count the session's bytes across its streams. After the last chunk the agent writes
an end marker (stream ``end``). A per-session cap keeps the newest bytes: when a session has
written more than the cap, its oldest chunks are purged, and a reader that asks for them is
told so (``Truncated``) before it gets what is still kept.

Writers keep at most ``window`` bytes unacknowledged by JetStream: past that they report
``blocked`` and the agent stops reading the process's pipe.

Pool terminals (ids starting with ``t_``, given only by the terminal pool) write to a stream
of their own, ``shoal-terminal-output`` on ``shoal.tout.<id>``, with its own byte limit:
anonymous visitors filling it evict only each other's output, never other sessions' logs.
The id alone says which stream, so agents and readers need nothing else to find it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec
import nats.errors
import nats.js.errors
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    StorageType,
    StreamConfig,
)

if TYPE_CHECKING:
    from nats.js import JetStreamContext

log = logging.getLogger(__name__)

STREAM = "shoal-output"
TERMINAL_STREAM = "shoal-terminal-output"
TERMINAL_PREFIX = "t_"  # session ids of pool terminals; no other session may use it
DEFAULT_CAP = 256 << 20
DEFAULT_BYTES = 8 << 30
DEFAULT_TERMINAL_BYTES = 1 << 30
END = "end"
MERGE_UP_TO = 1 << 20  # bytes per stored chunk when several are waiting
ACK_TIMEOUT = 5.0
STORE_ATTEMPTS = 60  # about 100 s of retries before output is dropped


def is_terminal(session_id: str) -> bool:
    return session_id.startswith(TERMINAL_PREFIX)


def stream_of(session_id: str) -> str:
    return TERMINAL_STREAM if is_terminal(session_id) else STREAM


def subject(session_id: str) -> str:
    return f"shoal.{'tout' if is_terminal(session_id) else 'out'}.{session_id}"


class Chunk(msgspec.Struct, frozen=True, array_like=True):
    stream: str  # stdout, stderr, pty, or "end"
    offset: int
    data: bytes


@dataclass(frozen=True)
class Truncated:
    """Bytes ``start``..``end`` were dropped by the cap; reading resumes at ``end``."""

    start: int
    end: int


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(Chunk).decode


async def ensure_stream(js: JetStreamContext, max_bytes: int = DEFAULT_BYTES,
                        replicas: int = 1,
                        terminal_bytes: int = DEFAULT_TERMINAL_BYTES) -> None:
    """Create the output streams if missing; the terminal stream's limit follows the
    setting (a controller started with a new ``terminal_output_bytes`` applies it)."""
    for name, subjects, limit in ((STREAM, ["shoal.out.*"], max_bytes),
                                  (TERMINAL_STREAM, ["shoal.tout.*"], terminal_bytes)):
        config = StreamConfig(name=name, subjects=subjects, storage=StorageType.FILE,
                              max_bytes=limit, discard=DiscardPolicy.OLD,
                              max_msg_size=4 << 20, num_replicas=replicas)
        try:
            info = await js.stream_info(name)
        except nats.js.errors.NotFoundError:
            await js.add_stream(config=config)
            continue
        if name == TERMINAL_STREAM and info.config.max_bytes != limit:
            await js.update_stream(config=config)


class OutputWriter:
    """Appends a session's output to the stream, in order, with bounded buffered bytes.

    One publisher task sends chunks one at a time and waits for each acknowledgement, so a
    retry after a NATS outage can never store chunks out of order (a lost acknowledgement
    may store one twice; readers skip what they have by offset). Chunks that pile up while
    it waits are merged, so a fast writer costs few round trips.
    """

    def __init__(self, js: JetStreamContext, session_id: str, cap: int = DEFAULT_CAP,
                 window: int = 8 << 20, start_offset: int = 0) -> None:
        self.js = js
        self.stream = stream_of(session_id)
        self.subject = subject(session_id)
        self.cap = cap
        self.window = window
        self.offset = start_offset  # next byte's offset
        self.inflight = 0  # bytes written here and not yet stored
        self._queue: deque[Chunk] = deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._kept: deque[tuple[int, int]] = deque()  # (end offset, stream seq) of chunks
        self._purging = False
        self.on_unblock: Callable[[], None] | None = None
        self.failed: BaseException | None = None

    @property
    def blocked(self) -> bool:
        return self.inflight >= self.window

    def write(self, stream: str, data: bytes) -> None:
        """Queue a chunk (synchronous: called from a pipe's reader callback)."""
        self._queue.append(Chunk(stream, self.offset, data))
        self.offset += len(data)
        self.inflight += len(data)
        self._idle.clear()
        self._wake.set()
        if self._task is None:
            self._task = asyncio.create_task(self._run())

    def _next(self) -> Chunk:
        """The first queued chunk, merged with those after it of the same stream."""
        first = self._queue.popleft()
        parts = [first.data]
        size = len(first.data)
        while (self._queue and self._queue[0].stream == first.stream != END
               and size + len(self._queue[0].data) <= MERGE_UP_TO):
            nxt = self._queue.popleft()
            parts.append(nxt.data)
            size += len(nxt.data)
        return first if len(parts) == 1 else Chunk(first.stream, first.offset, b"".join(parts))

    async def _run(self) -> None:
        while True:
            if not self._queue:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            chunk = self._next()
            seq = await self._store(chunk)
            size = len(chunk.data)
            was_blocked = self.blocked
            self.inflight -= size
            if seq is not None and size:
                self._kept.append((chunk.offset + size, seq))
                await self._enforce_cap()
            if was_blocked and not self.blocked and self.on_unblock is not None:
                self.on_unblock()

    async def _store(self, chunk: Chunk) -> int | None:
        """Publish until JetStream acknowledges; the stream sequence, or None if given up."""
        data = _encode(chunk)
        for attempt in range(1, STORE_ATTEMPTS + 1):
            try:
                # publish_async costs less per message than publish (measured with 200
                # terminals); waiting on it keeps the chunks strictly in order.
                fut = await self.js.publish_async(self.subject, data)
                ack = await asyncio.wait_for(fut, ACK_TIMEOUT)
                return int(ack.seq)
            except (nats.errors.TimeoutError, nats.errors.ConnectionClosedError,
                    nats.errors.NoRespondersError, nats.js.errors.Error, TimeoutError) as e:
                # NATS restarting or a partition: keep it, the process waits meanwhile.
                log.warning("output publish failed (%s); retry %d", e, attempt)
                await asyncio.sleep(min(2.0, 0.1 * attempt))
        log.error("%s: dropped %d bytes of output that NATS would not take", self.subject,
                  len(chunk.data))
        self.failed = RuntimeError("could not store output")
        return None

    async def _enforce_cap(self) -> None:
        if self._purging or not self._kept:
            return
        oldest_allowed = self.offset - self.cap
        drop_seq = 0
        # Purge whole chunks that end before the newest ``cap`` bytes.
        while self._kept and self._kept[0][0] <= oldest_allowed:
            drop_seq = self._kept.popleft()[1]
        if not drop_seq:
            return
        self._purging = True
        try:
            await self.js.purge_stream(self.stream, subject=self.subject, seq=drop_seq + 1)
        except Exception as e:
            log.warning("output purge failed: %s", e)
        finally:
            self._purging = False

    async def flush(self) -> None:
        await self._idle.wait()

    async def close(self, end_marker: bool = True) -> None:
        """Flush, write the end marker (unless the output goes on elsewhere), stop."""
        if end_marker:
            self.write(END, b"")
        await self.flush()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None


async def end_offset(js: JetStreamContext, session_id: str) -> int:
    """The offset after the last stored byte of a session (0 if none)."""
    try:
        msg = await js.get_last_msg(stream_of(session_id), subject(session_id))
    except nats.js.errors.NotFoundError:
        return 0
    if msg.data is None:
        return 0
    chunk = _decode(msg.data)
    return chunk.offset + len(chunk.data)


async def purge(js: JetStreamContext, session_id: str) -> None:
    try:
        await js.purge_stream(stream_of(session_id), subject=subject(session_id))
    except Exception as e:
        log.warning("could not purge output of %s: %s", session_id, e)


async def read(js: JetStreamContext, session_id: str, start: int = 0, *, follow: bool = False,
               is_over: Callable[[], Awaitable[bool]] | None = None,
               batch: int = 32) -> AsyncIterator[Chunk | Truncated]:
    """Chunks from byte ``start`` on (the first one sliced to begin exactly there).

    Without ``follow`` it stops at what is stored now; with it, it waits for more until the
    end marker, or until ``is_over()`` says the session ended without one (node lost).
    """
    sub = await js.pull_subscribe(
        subject(session_id), stream=stream_of(session_id),
        config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE,
                              inactive_threshold=60.0, mem_storage=True))
    position = start
    try:
        while True:
            try:
                msgs = await sub.fetch(batch, timeout=0.5 if follow else 0.2)
            except nats.errors.TimeoutError:
                msgs = []
            for msg in msgs:
                chunk = _decode(msg.data)
                if chunk.stream == END:
                    return
                end = chunk.offset + len(chunk.data)
                if end <= position:
                    continue
                if chunk.offset > position:  # purged by the cap before we got there
                    yield Truncated(position, chunk.offset)
                    position = chunk.offset
                skip = position - chunk.offset
                yield Chunk(chunk.stream, position, chunk.data[skip:] if skip else chunk.data)
                position = end
            if msgs:
                continue
            if not follow:
                return
            if is_over is not None and await is_over():
                return
    finally:
        try:
            await sub.unsubscribe()
        except Exception:
            pass
