"""Durable session output in a JetStream stream, addressable by byte offset.

A session's output is stored under the name of the node that wrote it,
``shoal.out.<id>.<node>``, as msgpack ``Chunk``s whose offsets count the session's bytes
across its streams and its attempts (output stored before node names, under
``shoal.out.<id>``, is read as before). A node's credential may publish only under its own
names, and readers believe a chunk only from the node of its attempt (``logic/outputtrust``),
so a node can never pass output off as another node's session's. After the last chunk the
agent writes an end marker (stream ``end``). A per-session cap keeps the newest bytes: when
a session has written more than the cap, its oldest chunks are purged, and a reader that
asks for them is told so (``Truncated``) before it gets what is still kept.

Writers keep at most ``window`` bytes unacknowledged by JetStream, and all the writers of a
process together at most their ``OutputBudget``: past either they report ``blocked`` and the
agent stops reading the process's pipe. Output is never handed to nats-py while the
connection is down or not answering (its reconnect buffer would keep a copy per retry), so
an outage of any length costs at most the budget.

Pool terminals (ids starting with ``t_``, given only by the terminal pool) write to a stream
of their own, ``shoal-terminal-output`` on ``shoal.tout.<id>.<node>``, with its own byte limit:
anonymous visitors filling it evict only each other's output, never other sessions' logs.
The id alone says which stream, so agents and readers need nothing else to find it.

Fencing: each placement of a session (an *attempt*, the record's ``attempt``) begins its
output with a marker chunk (stream ``attempt``, carrying the attempt number), and publishes
every chunk with ``Nats-Expected-Last-Subject-Sequence`` set to the stream sequence of its
own previous chunk, counted over the session's subjects of every node
(``Nats-Expected-Last-Subject-Sequence-Subject: shoal.out.<id>.*``). So once a newer attempt
has written its marker, on any node, a chunk of an older one is refused by JetStream (wrong
last sequence). The writer then asks where the output stands (``where``: the controllers,
as a node credential may not read the stream): a newer attempt's chunk there means it is
``fenced`` and stops; a chunk readers do not believe (another node's, published under its
own name) is stepped over. A zombie can never splice output into a newer attempt's, and a
stolen credential cannot stop another node's writer by publishing.

Over 400 lines: the writer (windows, fencing by attempt) and the reader (offsets,
truncation, resume) of one stream format belong together.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
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

from ..errors import Unavailable
from ..logic import outputtrust
from ..system.tasks import end_tasks
from ..wire.reports import OutputLast
from .bus import NATS_ERRORS

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
ATTEMPT = "attempt"  # marker: the chunks after it are of attempt ``epoch``
WRONG_LAST_SEQUENCE = 10071  # JetStream's error code for a failed expected-last-sequence
STORE_FULL = 10047  # JetStream's "insufficient resources" (the store's disk is full)
MERGE_UP_TO = 1 << 20  # bytes per stored chunk when several are waiting
ACK_TIMEOUT = 5.0
# While NATS answers but will not store a chunk (errors, no acknowledgement), it is retried
# for this long, then dropped; while NATS is away a writer waits for it without limit.
STORE_GIVE_UP = 120.0
OUTPUT_BUDGET = 64 << 20  # output held unstored by one process (all its sessions)


def is_terminal(session_id: str) -> bool:
    return session_id.startswith(TERMINAL_PREFIX)


def stream_of(session_id: str) -> str:
    return TERMINAL_STREAM if is_terminal(session_id) else STREAM


def _kind(session_id: str) -> str:
    return "tout" if is_terminal(session_id) else "out"


def subject(session_id: str, node: str = outputtrust.LEGACY) -> str:
    """Where ``node`` stores the session's output (no node: the old one-token subject)."""
    if node == outputtrust.LEGACY:
        return f"shoal.{_kind(session_id)}.{session_id}"
    return f"shoal.{_kind(session_id)}.{session_id}.{node}"


def every_node(session_id: str) -> str:
    """The session's output subjects of every node (not the old one-token subject)."""
    return f"shoal.{_kind(session_id)}.{session_id}.*"


def both_shapes(session_id: str) -> list[str]:
    """Every subject the session's output may be stored under: each node's, and the old
    one-token subject."""
    return [every_node(session_id), subject(session_id)]


def node_of(subj: str) -> str:
    """The node a chunk was published by, from its subject ("" for the old shape)."""
    parts = subj.split(".", 3)
    return parts[3] if len(parts) == 4 else outputtrust.LEGACY


def node_subjects(node: str) -> list[str]:
    """What the credential of ``node`` may publish output on."""
    return [f"shoal.out.*.{node}", f"shoal.tout.*.{node}"]


# Both shapes: output stored before node names stays in the stream, readable.
STREAM_SUBJECTS = {STREAM: ["shoal.out.*", "shoal.out.*.*"],
                   TERMINAL_STREAM: ["shoal.tout.*", "shoal.tout.*.*"]}


class Chunk(msgspec.Struct, frozen=True, array_like=True):
    stream: str  # stdout, stderr, pty, "end", or "attempt"
    offset: int
    data: bytes
    epoch: int = 0  # the attempt that wrote it (0: written before attempts existed)


class Fenced(Exception):
    """A newer attempt of the session owns the output now: this writer may not write."""


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
    for name, limit in ((STREAM, max_bytes), (TERMINAL_STREAM, terminal_bytes)):
        subjects = STREAM_SUBJECTS[name]
        config = StreamConfig(name=name, subjects=subjects, storage=StorageType.FILE,
                              max_bytes=limit, discard=DiscardPolicy.OLD,
                              max_msg_size=4 << 20, num_replicas=replicas)
        try:
            info = await js.stream_info(name)
        except nats.js.errors.NotFoundError:
            await js.add_stream(config=config)
            continue
        stored = info.config
        if sorted(stored.subjects or []) != sorted(subjects) or (
                name == TERMINAL_STREAM and stored.max_bytes != limit):
            # Made before node names (or the terminal limit changed): keep the stream and
            # its other settings, cover both subject shapes.
            await js.update_stream(config=dataclasses.replace(
                stored, subjects=subjects,
                max_bytes=limit if name == TERMINAL_STREAM else stored.max_bytes))


class OutputBudget:
    """Bytes of output a process holds unstored, across all its writers; writers block while
    it is spent and are woken (``on_unblock``) when storing gives some back."""

    def __init__(self, limit: int = OUTPUT_BUDGET) -> None:
        self.limit = limit
        self.held = 0
        self._waiting: set[OutputWriter] = set()

    @property
    def spent(self) -> bool:
        return self.held >= self.limit

    def take(self, writer: OutputWriter, size: int) -> None:
        self.held += size
        if self.spent:
            self._waiting.add(writer)

    def give(self, size: int) -> None:
        self.held -= size
        if not self.spent and self._waiting:
            waiting, self._waiting = self._waiting, set()
            for w in waiting:
                w.check_unblocked()


PROCESS_BUDGET = OutputBudget()  # the default: one budget for every writer of this process


class OutputWriter:
    """Appends a session's output to the stream, in order, with bounded buffered bytes.

    One publisher task sends chunks one at a time and waits for each acknowledgement, so a
    retry after a NATS outage can never store chunks out of order (a lost acknowledgement
    may store one twice; readers skip what they have by offset). Chunks that pile up while
    it waits are merged, so a fast writer costs few round trips. No NATS error ends the
    task: it waits for NATS to come back (``flush`` returns once it has stored everything).
    """

    def __init__(self, js: JetStreamContext, session_id: str, node: str,
                 cap: int = DEFAULT_CAP, window: int = 8 << 20, start_offset: int = 0,
                 budget: OutputBudget = PROCESS_BUDGET,
                 trim: Callable[[str, int], Awaitable[None]] | None = None,
                 where: Callable[[str, int], Awaitable[OutputLast]] | None = None) -> None:
        self.js = js
        # How to drop chunks before a sequence: purge ourselves, or (a node credential may
        # not purge the shared stream) ask the controllers with ``trim(session, keep)``.
        self.trim = trim
        # Where the stored output stands: read it ourselves, or (a node credential may not
        # read the stream) ask the controllers with ``where(session, epoch)``, which raises
        # ``Fenced`` when that attempt is no longer the session's.
        self.where = where
        self.session_id = session_id
        self.node = node
        self.stream = stream_of(session_id)
        self.subject = subject(session_id, node)
        self.cap = cap
        self.window = window
        self.budget = budget
        self.offset = start_offset  # next byte's offset
        self.inflight = 0  # bytes written here and not yet stored
        self._queue: deque[Chunk] = deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._kept: deque[tuple[int, int]] = deque()  # (end offset, stream seq) of chunks
        self._trimming: asyncio.Task[None] | None = None  # one trim in flight at most
        self._was_blocked = False
        self.on_unblock: Callable[[], None] | None = None
        self.on_fenced: Callable[[], None] | None = None
        self.failed: BaseException | None = None
        self.epoch = 0
        self._last_seq: int | None = None  # our last stored chunk's sequence, once begun
        self.fenced = False

    @property
    def blocked(self) -> bool:
        return self.inflight >= self.window or self.budget.spent

    async def begin(self, epoch: int) -> None:
        """Start attempt ``epoch``: store its marker after whatever the stream holds (so the
        offsets go on from the last byte stored, by any attempt), and from then on accept
        only a stream whose last chunk of this session is our own. Retries while NATS is
        away or another writer raced us (a zombie's late chunk: ours goes after it)."""
        self.epoch = epoch
        while True:
            try:
                last = await self._where()
                offset = last.end
                marker = Chunk(ATTEMPT, offset, b"", epoch)
                ack = await self.js.publish(self.subject, _encode(marker), timeout=ACK_TIMEOUT,
                                            headers=self._expect(last.seq))
            except Fenced:
                self._fence()
                return
            except nats.js.errors.APIError as e:
                if e.err_code != WRONG_LAST_SEQUENCE:
                    log.warning("%s: cannot begin attempt %d: %s; retrying", self.subject,
                                epoch, describe_store_error(e))
                    await asyncio.sleep(1.0)
                continue
            except NATS_ERRORS:
                await self._wait_for_nats()
                continue
            self.offset = offset
            self._last_seq = int(ack.seq)
            return

    def abandon(self) -> None:
        """Drop what is held and stop (the session was fenced: nothing of it may land)."""
        held = self.inflight
        self._queue.clear()
        self.inflight = 0
        self.budget.give(held)
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self._idle.set()

    def write(self, stream: str, data: bytes) -> None:
        """Queue a chunk (synchronous: called from a pipe's reader callback)."""
        if self.fenced:
            return
        self._queue.append(Chunk(stream, self.offset, data, self.epoch))
        self.offset += len(data)
        self.inflight += len(data)
        self.budget.take(self, len(data))
        if self.blocked:
            self._was_blocked = True
        self._idle.clear()
        self._wake.set()
        if self._task is None:
            self._task = asyncio.create_task(self._run())

    def check_unblocked(self) -> None:
        """Tell the owner (``on_unblock``) once a blocked writer may take output again."""
        if self.blocked:
            self.budget.take(self, 0)  # wait for the budget again
            return
        if self._was_blocked:
            self._was_blocked = False
            if self.on_unblock is not None:
                self.on_unblock()

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
        if len(parts) == 1:
            return first
        return Chunk(first.stream, first.offset, b"".join(parts), first.epoch)

    async def _run(self) -> None:
        while True:
            if not self._queue:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            chunk = self._next()
            try:
                seq = await self._store(chunk)
            except Fenced:
                self._task = None
                self._fence()
                return
            except Exception as e:  # never let the publisher die: flush() would hang for ever
                log.exception("%s: storing output failed: %s", self.subject, e)
                seq = None
                self.failed = e
            size = len(chunk.data)
            self.inflight -= size
            self.budget.give(size)
            if seq is not None and size:
                self._kept.append((chunk.offset + size, seq))
                self._enforce_cap()
            self.check_unblocked()

    def _fence(self) -> None:
        log.warning("%s: attempt %d is fenced (a newer attempt writes this output); "
                    "stopping", self.subject, self.epoch)
        self.fenced = True
        if self.on_fenced is not None:
            self.on_fenced()
        self.abandon()

    def _expect(self, seq: int) -> dict[str, str]:
        """Headers that store a chunk only if the session's last one, on any node, is
        ``seq``."""
        return {EXPECTED_LAST: str(seq), EXPECTED_LAST_SUBJECT: every_node(self.session_id)}

    async def _where(self) -> OutputLast:
        """Where the stored output stands (retrying while NATS is away); raises ``Fenced``
        if the controllers say this attempt is no longer the session's."""
        tries = 0
        while True:
            try:
                if self.where is not None:
                    return await self.where(self.session_id, self.epoch)
                return await last_output(self.js, self.session_id, None)
            except NATS_ERRORS as e:
                tries += 1
                log.log(logging.WARNING if tries == 1 else logging.DEBUG,
                        "%s: cannot learn where the stored output stands (%s%s); retrying "
                        "until it can", self.subject, _describe(e),
                        ": is a controller of this version running?"
                        if self.where is not None else "")
                await self._wait_for_nats()
                await asyncio.sleep(min(5.0, 0.5 * tries))

    async def _store(self, chunk: Chunk) -> int | None:
        """Publish until JetStream acknowledges; the stream sequence, or None if given up.

        A retry (or a first attempt while disconnected) first waits until NATS answers a
        ping, so a retry never queues another copy of the chunk in nats-py's reconnect
        buffer; only the time NATS answers and still refuses the chunk counts towards
        ``STORE_GIVE_UP``.
        """
        data = _encode(chunk)
        refused_for = 0.0
        attempt = 0
        while True:
            if attempt or not self.js._nc.is_connected:  # noqa: SLF001
                await self._wait_for_nats()
            attempt += 1
            began = time.monotonic()
            try:
                if self._last_seq is None:
                    # publish_async costs less per message than publish (measured with 200
                    # terminals); waiting on it keeps the chunks strictly in order.
                    fut = await self.js.publish_async(self.subject, data)
                    ack = await asyncio.wait_for(fut, ACK_TIMEOUT)
                else:
                    # Fenced: nats-py 2.16's publish_async cannot report a refusal (its
                    # reply handler raises instead of failing the future: a timeout).
                    ack = await self.js.publish(self.subject, data, timeout=ACK_TIMEOUT,
                                                headers=self._expect(self._last_seq))
                    self._last_seq = int(ack.seq)
                return int(ack.seq)
            except NATS_ERRORS as e:
                if isinstance(e, nats.errors.OutboundBufferLimitError):
                    _forget_failed_publish(self.js)
                if isinstance(e, nats.js.errors.APIError) \
                        and e.err_code == WRONG_LAST_SEQUENCE:
                    seq = await self._after_refusal(chunk)
                    if seq is not None:
                        return seq
                    attempt = 0  # not a failure: publish again after what is there
                    continue
                why = describe_store_error(e)
                refused_for += time.monotonic() - began
                if refused_for >= STORE_GIVE_UP:
                    break
                log.warning("%s: output publish failed (%s); retry %d", self.subject, why,
                            attempt)
                await asyncio.sleep(min(2.0, 0.1 * attempt))
        log.error("%s: dropped %d bytes of output (offset %d) that NATS would not store for "
                  "%gs: %s", self.subject, len(chunk.data), chunk.offset, STORE_GIVE_UP, why)
        self.failed = RuntimeError(f"could not store output: {why}")
        return None

    async def _after_refusal(self, chunk: Chunk) -> int | None:
        """After a publish refused for the last sequence: the sequence of ``chunk`` if it is
        the last believed one (an earlier try was stored and its acknowledgement lost);
        None to publish again after what is there now (a chunk readers do not believe, such
        as another node's under its own name); raises ``Fenced`` if a newer attempt wrote.
        """
        last = await self._where()
        if last.epoch > self.epoch:
            raise Fenced
        if (last.node, last.epoch, last.stream, last.offset, last.end) == (
                self.node, self.epoch, chunk.stream, chunk.offset,
                chunk.offset + len(chunk.data)):
            self._last_seq = last.seq
            return last.chunk_seq
        self._last_seq = last.seq
        return None

    async def _wait_for_nats(self) -> None:
        """Return once the connection is up and the server answers a ping."""
        nc = self.js._nc  # noqa: SLF001
        waited = False
        while True:
            if nc.is_closed:
                raise nats.errors.ConnectionClosedError
            if nc.is_connected:
                try:
                    await nc.flush(timeout=int(ACK_TIMEOUT))
                    if waited:
                        log.info("%s: NATS is back; storing output again", self.subject)
                    return
                except NATS_ERRORS:
                    pass
            if not waited:
                log.warning("%s: NATS is away; holding %d bytes of output until it is back",
                            self.subject, self.inflight)
                waited = True
            await asyncio.sleep(0.25)

    def _enforce_cap(self) -> None:
        """Drop whole chunks that end before the newest ``cap`` bytes, in the background
        (the publisher goes on storing): one trim in flight, the next one covering whatever
        came meanwhile, and ``close`` waits for the last."""
        if (self._trimming is not None and not self._trimming.done()) or not self._kept:
            return
        oldest_allowed = self.offset - self.cap
        drop_seq = 0
        while self._kept and self._kept[0][0] <= oldest_allowed:
            drop_seq = self._kept.popleft()[1]
        if drop_seq:
            self._trimming = asyncio.create_task(self._trim(drop_seq + 1))

    async def _trim(self, keep: int) -> None:
        try:
            if self.trim is not None:  # the controllers purge, and answer once done
                await self.trim(self.session_id, keep)
            else:
                await trim_before(self.js, self.session_id, keep)
        except Exception as e:
            log.warning("output purge failed: %s", e)

    async def _trimmed(self, timeout: float | None) -> None:
        """The cap, applied to everything stored (the trim in flight, then one more)."""
        for _ in range(2):
            if self._trimming is not None:
                await asyncio.wait([self._trimming], timeout=timeout)
            self._enforce_cap()

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything written is stored; False if ``timeout`` ran out first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def close(self, end_marker: bool = True, timeout: float | None = None) -> None:
        """Flush, write the end marker (unless the output goes on elsewhere), stop. With
        ``timeout``, what is still unstored then (a store that is full, or NATS away) is
        dropped, said in the log, and the writer stops anyway."""
        if end_marker:
            self.write(END, b"")
        if not await self.flush(timeout):
            log.error("%s: dropped %d bytes of output that could not be stored in %gs "
                      "(is the JetStream store full? see nats-server's log)", self.subject,
                      self.inflight, timeout)
            self.abandon()
        if not self.fenced:
            await self._trimmed(timeout if timeout is not None else ACK_TIMEOUT)
        await end_tasks([self._task])
        self._task = None


EXPECTED_LAST = "Nats-Expected-Last-Subject-Sequence"
# nats-server 2.11+: the subject (a wildcard here) the expected last sequence is counted on.
EXPECTED_LAST_SUBJECT = "Nats-Expected-Last-Subject-Sequence-Subject"


async def _last_msg(js: JetStreamContext, stream: str,
                    subj: str) -> tuple[int, str, Chunk | None]:
    """(sequence, subject, chunk) of the last message on ``subj`` (a wildcard may match
    several); (0, "", None) when there is none."""
    try:
        msg = await js.get_last_msg(stream, subj)
    except nats.js.errors.NotFoundError:
        return 0, "", None
    return int(msg.seq or 0), msg.subject or "", _decode_or_none(msg.data)


def _decode_or_none(data: bytes | None) -> Chunk | None:
    """The chunk, or None for what is not one (a node's junk under its own name)."""
    try:
        return _decode(data) if data else None
    except msgspec.DecodeError:
        return None


def _describe_last(seq: int, chunk_seq: int, subj: str, chunk: Chunk) -> OutputLast:
    return OutputLast(seq=seq, end=chunk.offset + len(chunk.data), chunk_seq=chunk_seq,
                      node=node_of(subj), epoch=chunk.epoch, stream=chunk.stream,
                      offset=chunk.offset)


async def last_output(js: JetStreamContext, session_id: str,
                      nodes: Sequence[str] | None) -> OutputLast:
    """Where the session's stored output stands, judged by ``nodes`` (the node of each
    attempt, ``attempt_nodes``; None believes every chunk). Usually one request: the last
    chunk of any node, when it is the latest attempt's; else the last of each node that ran
    an attempt, and the old subject's, the latest believed of which wins."""
    stream = stream_of(session_id)
    seq, subj, chunk = await _last_msg(js, stream, every_node(session_id))
    if chunk is not None and outputtrust.from_its_node(nodes, node_of(subj), chunk.epoch) \
            and (nodes is None or chunk.epoch == len(nodes)):  # the latest attempt's
        return _describe_last(seq, seq, subj, chunk)
    believed: list[tuple[int, str, Chunk]] = []
    named = sorted(set(nodes or ()) - {outputtrust.LEGACY}) if seq else []  # none stored
    for n in [outputtrust.LEGACY, *named]:
        one_seq, one_subj, one = await _last_msg(js, stream, subject(session_id, n))
        if one is not None and outputtrust.from_its_node(nodes, n, one.epoch):
            believed.append((one_seq, one_subj, one))
    if not believed:
        return OutputLast(seq=seq)
    # Readers drop a chunk of an attempt once a later attempt's has come: the latest wins.
    chunk_seq, subj, chunk = max(believed, key=lambda b: (b[2].epoch, b[0]))
    return _describe_last(seq, chunk_seq, subj, chunk)


def describe_store_error(e: BaseException) -> str:
    """A NATS error said plainly; a full store says so, with what is left of it."""
    if isinstance(e, nats.js.errors.APIError) and e.err_code == STORE_FULL:
        return f"the JetStream store is full ({e.description or 'insufficient resources'})"
    if isinstance(e, (TimeoutError, nats.errors.TimeoutError)):
        # A store whose disk is full does not refuse a write: it never acknowledges it
        # (nats-server logs "no space left on device"). A ping still answers.
        return (f"JetStream did not acknowledge in {ACK_TIMEOUT:g}s: the JetStream store may "
                "be full (see nats-server's log for \"no space left on device\")")
    return str(e) or type(e).__name__


def _forget_failed_publish(js: JetStreamContext) -> None:
    """nats-py 2.16's publish_async registers its future and takes a slot of its pending
    semaphore before publishing, and leaks both when the publish raises: after 4000 such
    failures every publish_async waits for ever. The failed one is the newest entry."""
    futures = js._publish_async_futures  # noqa: SLF001
    if futures:
        newest = next(reversed(futures.values()))
        if not newest.done():
            newest.cancel()  # its done-callback releases the slot and forgets it


async def end_offset(js: JetStreamContext, session_id: str,
                     nodes: Sequence[str] | None) -> int:
    """The offset after the last stored byte of a session that readers believe (0 if
    none); ``nodes`` as for ``last_output``."""
    return (await last_output(js, session_id, nodes)).end


async def _last_seq(js: JetStreamContext, session_id: str) -> int:
    """The stream sequence of the session's last message of either subject shape."""
    stream = stream_of(session_id)
    return max([(await _last_msg(js, stream, subj))[0] for subj in both_shapes(session_id)])


async def trim_before(js: JetStreamContext, session_id: str, keep: int) -> None:
    """Drop the session's stored output (every node's, and the old subject's) before stream
    sequence ``keep``: its output cap."""
    stream = stream_of(session_id)
    for subj in both_shapes(session_id):
        await js.purge_stream(stream, subject=subj, seq=keep)


STORE_WRITE_ERROR = 10051  # JetStream's "stream store failed" (its disk refused a write)


async def purge(js: JetStreamContext, session_id: str, strict: bool = False) -> None:
    """Delete a session's stored output. With ``strict``, a failure raises ``Unavailable``
    saying what to do; else it is logged."""
    try:
        for subj in both_shapes(session_id):
            await js.purge_stream(stream_of(session_id), subject=subj)
    except Exception as e:
        log.warning("could not purge output of %s: %s", session_id, e)
        if not strict:
            return
        if isinstance(e, nats.js.errors.APIError) and e.err_code == STORE_WRITE_ERROR:
            # nats-server keeps a stream's write error until it restarts: nothing of that
            # stream can be written, or purged, before then.
            raise Unavailable(f"cannot purge the output of {session_id}: the JetStream store "
                              f"is full and the output stream refuses every write since "
                              f"({e.description}); free space on nats-server's store_dir, "
                              "restart nats-server, then run this again") from None
        raise Unavailable(f"cannot purge the output of {session_id}: "
                          f"{describe_store_error(e)}; nothing was removed, try again") from None


class OutputReadError(Unavailable):
    """Reading a session's output stopped at byte ``offset`` (everything before it was
    delivered): NATS did not answer for ``READ_GIVE_UP`` seconds. Resume from ``offset``."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(message)
        self.offset = offset


READ_GIVE_UP = 15.0  # seconds of NATS failing in a row before a reader gives up
STALL_CHECK = 2.0  # seconds of empty fetches before a reader asks the stream if it is behind


async def read(js: JetStreamContext, session_id: str, start: int = 0, *, follow: bool = False,
               is_over: Callable[[], Awaitable[bool]] | None = None,
               batch: int = 32, give_up: float = READ_GIVE_UP, attempts: bool = False,
               nodes: Callable[[], Awaitable[Sequence[str]]] | None = None,
               ) -> AsyncIterator[Chunk | Truncated]:
    """Chunks from byte ``start`` on (the first one sliced to begin exactly there).

    Without ``follow`` it stops at the end of what is stored; with it, it waits for more
    until the end marker, or until ``is_over()`` says the session ended without one (node
    lost). Every NATS error is handled here: the reader subscribes again after the last
    message it saw (its consumer lives in memory and does not survive a NATS restart) and
    goes on, and it subscribes again too when its consumer gives nothing while the stream
    holds more (the consumer died with its server); only after ``give_up`` seconds of
    failures in a row does it raise
    ``OutputReadError`` with the offset it reached. With ``attempts``, the marker chunk
    (stream ``attempt``, no data, ``epoch`` set) that begins each attempt is yielded too.

    ``nodes()`` gives the node of each attempt (``attempt_nodes`` of the record, read again
    when a chunk names an attempt it does not know yet): a chunk counts only if its node
    ran its attempt (``outputtrust``). Without it every chunk counts (tests, tools).
    """
    nc = js._nc  # noqa: SLF001 - to see reconnects, after which the consumer may be gone
    position = start
    seq = 0  # stream sequence of the last message seen
    sub: JetStreamContext.PullSubscription | None = None
    reconnects = -1
    failing_since: float | None = None
    quiet_since: float | None = None  # since when fetches have come back empty
    trust: outputtrust.Trust | None = None if nodes is not None else outputtrust.Trust(None)
    try:
        while True:
            try:
                if trust is None:
                    assert nodes is not None
                    trust = outputtrust.Trust(await nodes())
                if sub is None or nc.stats["reconnects"] != reconnects:
                    await _unsubscribe(sub)
                    reconnects = nc.stats["reconnects"]
                    sub = await _subscribe(js, session_id, seq)
                try:
                    msgs = await sub.fetch(batch, timeout=0.5 if follow else 0.2)
                except TimeoutError:  # nats-py's and asyncio's: nothing new yet
                    msgs = []
                decoded = [(msg, _decode_or_none(msg.data)) for msg in msgs]
                if nodes is not None and any(c is not None and not trust.knows(c.epoch)
                                             for _, c in decoded):
                    # A newer attempt (or a forged epoch: one read per batch, no more).
                    trust.nodes = await nodes()
                over = False
                if msgs:
                    quiet_since = None
                else:
                    now = time.monotonic()
                    quiet_since = quiet_since or now
                    ended = not follow or (is_over is not None and await is_over())
                    stalled = now - quiet_since >= STALL_CHECK
                    if ended or stalled:
                        if seq >= await _last_seq(js, session_id):
                            over = ended
                        elif stalled:
                            # The stream holds more than our consumer gives: it died with
                            # its server (an ephemeral consumer is not moved) and its pull
                            # requests go unanswered. Only a new one reads on.
                            log.info("reading %s: the consumer gives nothing after seq %d "
                                     "but the stream has more; subscribing again",
                                     session_id, seq)
                            await _unsubscribe(sub)
                            sub = None
                            quiet_since = None
                failing_since = None
            except NATS_ERRORS as e:
                now = time.monotonic()
                failing_since = failing_since or now
                if now - failing_since >= give_up:
                    raise OutputReadError(f"NATS did not answer for {give_up:g}s "
                                          f"({_describe(e)})", position) from e
                log.info("reading %s: %s; subscribing again after seq %d", session_id,
                         _describe(e), seq)
                await _unsubscribe(sub)
                sub = None
                await asyncio.sleep(0.5)
                continue
            for msg, chunk in decoded:
                seq = max(seq, msg.metadata.sequence.stream)
                if chunk is None or not trust.accept(node_of(msg.subject), chunk.epoch):
                    continue  # not a chunk, or not from the node of its attempt
                if chunk.stream == END:
                    return
                if chunk.stream == ATTEMPT:
                    if attempts and chunk.offset >= position:
                        yield chunk
                    continue
                end = chunk.offset + len(chunk.data)
                if end <= position:
                    continue
                if chunk.offset > position:  # purged by the cap before we got there
                    yield Truncated(position, chunk.offset)
                    position = chunk.offset
                skip = position - chunk.offset
                yield Chunk(chunk.stream, position, chunk.data[skip:] if skip else chunk.data,
                            chunk.epoch)
                position = end
            if over:
                return
    finally:
        await _unsubscribe(sub)


async def _subscribe(js: JetStreamContext, session_id: str,
                     after: int) -> JetStreamContext.PullSubscription:
    """An ephemeral pull consumer of the session's subject from stream sequence
    ``after`` + 1 (from the start when 0)."""
    if after:
        config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                                opt_start_seq=after + 1)
    else:
        config = ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
    config.ack_policy = AckPolicy.NONE
    config.inactive_threshold = 60.0
    config.mem_storage = True
    config.filter_subjects = both_shapes(session_id)
    return await js.pull_subscribe("", stream=stream_of(session_id), config=config)


async def _unsubscribe(sub: JetStreamContext.PullSubscription | None) -> None:
    if sub is None:
        return
    try:
        await sub.unsubscribe()
    except Exception:  # a connection already gone has nothing to unsubscribe
        pass


def _describe(e: BaseException) -> str:
    """An error's text, never empty (nats-py's timeouts have none)."""
    return str(e) or type(e).__name__
