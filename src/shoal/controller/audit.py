"""The audit trail: who did what, in the JetStream stream ``shoal-audit``.

Every state change (allowed or refused), every run and every attach is one entry: time,
user, token id, source address, operation, targets, the argv or spec digest, and the result.
Keystrokes are never recorded.

Entries form a hash chain: each carries the SHA-256 of its own content and the hash of the
entry before it. Several controllers append to the same chain: each publishes with
``Nats-Expected-Last-Sequence`` set to the last sequence it knows, so JetStream refuses the
write if another controller appended first; it then reloads the last entry and tries again.
Concurrent requests share the writes (group commit): the entries queued while one write is
on the wire go together as one JetStream atomic batch, chained in order, stored all or none,
the expected last sequence checked on the batch as a whole; each request still answers only
once its own entry is stored. ``verify`` walks the stream and names every entry that is
missing (a gap in the sequence), altered (its hash does not match) or out of chain.
Retention (``audit_retention``) ages the oldest entries out; the chain is checked from the
oldest one left.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import msgspec

from ..errors import ConflictError
from ..natsio import streams
from ..natsio.bus import NATS_ERRORS

if TYPE_CHECKING:
    from ..natsio.types import JetStreamContext

log = logging.getLogger(__name__)

STREAM = "shoal-audit"
SUBJECT = "shoal.audit"
ATTEMPTS = 50
# What an append can fail with: NATS away or slow, or too many controllers racing.
_FAILURES: tuple[type[BaseException], ...] = (*NATS_ERRORS, ConflictError)
MAX_SCAN = 1_000_000  # entries a query or verify walks at most
BATCH_BYTES = 4 << 20  # entries (encoded) in one atomic batch at most


class Entry(msgspec.Struct, frozen=True):
    time: float
    user: str
    token: str
    source: str
    op: str
    targets: list[str] = []
    argv: list[str] | None = None
    digest: str = ""  # of the argv (runs) or the spec (sessions)
    result: str = ""  # "ok", "refused: ...", "failed: ..."
    status: int = 0
    controller: str = ""
    prev: str = ""
    hash: str = ""


_encode = msgspec.json.Encoder().encode


def entry_hash(entry: Entry) -> str:
    body = _encode(msgspec.structs.replace(entry, hash=""))
    return hashlib.sha256(body).hexdigest()


def argv_digest(argv: list[str] | None, shell: str | None) -> str:
    return hashlib.sha256(msgspec.json.encode([argv, shell])).hexdigest()


class Problem(msgspec.Struct, frozen=True):
    seq: int
    what: str


class AuditLog:
    def __init__(self, instance: str = "") -> None:
        self.instance = instance
        self.js: JetStreamContext | None = None
        self._last: tuple[int, str] | None = None  # (stream's last sequence, its hash)
        self._lock = asyncio.Lock()
        self._queue: list[tuple[Entry, asyncio.Future[None]]] = []
        self._batches = False  # the server stores atomic batches (nats-server 2.12+)

    async def start(self, js: JetStreamContext, replicas: int, retention: float) -> None:
        self.js = js
        self._batches = await streams.ensure(js, STREAM, SUBJECT, replicas=replicas,
                                             max_age=retention)

    async def record(self, entry: Entry) -> None:
        """Append ``entry`` to the chain and return once it is stored; failures are logged,
        never raised (the request it records has happened already)."""
        try:
            await self._append(msgspec.structs.replace(entry, controller=self.instance))
        except _FAILURES as e:
            log.error("audit entry for %s by %s not written: %r", entry.op, entry.user, e)

    async def _append(self, entry: Entry) -> None:
        """Group commit: the entries of concurrent requests queue up while one write is on
        the wire, and the next writer stores all of them as one atomic batch (one chain
        link each, two round trips in all). Each caller still returns only once its own
        entry is stored, or with the error that kept it out."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((entry, done))
        async with self._lock:
            while not done.done():
                batch = self._queue[:streams.BATCH_MAX]
                del self._queue[:len(batch)]
                try:
                    await self._write([e for e, _ in batch])
                except BaseException as e:
                    for _, waiting in batch:
                        if isinstance(e, asyncio.CancelledError):
                            waiting.cancel()
                        elif not waiting.done():
                            waiting.set_exception(e)
                    if isinstance(e, asyncio.CancelledError):
                        raise
                else:
                    for _, waiting in batch:
                        if not waiting.done():
                            waiting.set_result(None)
        await done

    async def _write(self, entries: list[Entry]) -> None:
        if not self._batches:  # an older server: one entry, one append
            for entry in entries:
                await self._write_chain([entry])
            return
        # Batches of at most BATCH_BYTES (an entry can hold a long argv), in order.
        chunk: list[Entry] = []
        size = 0
        for entry in entries:
            n = len(_encode(entry)) + 200  # and its two hashes
            if chunk and size + n > BATCH_BYTES:
                await self._write_chain(chunk)
                chunk, size = [], 0
            chunk.append(entry)
            size += n
        await self._write_chain(chunk)

    async def _write_chain(self, entries: list[Entry]) -> None:
        """Chain ``entries`` after the last entry known and append them all, or none."""
        assert self.js is not None
        for _ in range(ATTEMPTS):
            if self._last is None:
                self._last = await self._load_last()
            seq, prev = self._last
            data = []
            for entry in entries:
                e = msgspec.structs.replace(entry, prev=prev)
                e = msgspec.structs.replace(e, hash=entry_hash(e))
                data.append(_encode(e))
                prev = e.hash
            new = await streams.append_batch(self.js, STREAM, SUBJECT, data, seq)
            if new is None:  # another controller was first
                self._last = None
                continue
            self._last = (new, prev)
            return
        raise ConflictError(f"audit: gave up after {ATTEMPTS} conflicting appends")

    async def _load_last(self) -> tuple[int, str]:
        assert self.js is not None
        _, last_seq, messages = await streams.bounds(self.js, STREAM)
        if not messages:
            return last_seq, ""
        data = await streams.last_message(self.js, STREAM, SUBJECT)
        if data is None:
            return last_seq, ""
        return last_seq, _decode(data).hash

    async def bounds(self) -> tuple[int, int]:
        """The stream's first and last sequence (last 0: nothing was ever written)."""
        assert self.js is not None
        first, last, _ = await streams.bounds(self.js, STREAM)
        return first, last

    async def entries(self, bounds: tuple[int, int] | None = None,
                      ) -> AsyncIterator[tuple[int, Entry | None]]:
        """(sequence, entry) from the oldest kept; entry None for undecodable data."""
        assert self.js is not None
        seq, last = bounds or await self.bounds()
        for _ in range(MAX_SCAN):
            if not last or seq > last:
                return
            found = await streams.message_from(self.js, STREAM, SUBJECT, seq)
            if found is None or found[0] > last:
                return
            at, data = found
            try:
                yield at, _decode(data)
            except msgspec.DecodeError:
                yield at, None
            seq = at + 1

    async def query(self, user: str | None, since: float | None,
                    limit: int) -> list[Entry]:
        out: list[Entry] = []
        async for _, e in self.entries():
            if e is None or (user and e.user != user) or (since and e.time < since):
                continue
            out.append(e)
        return out[-limit:]

    async def verify(self) -> tuple[int, list[Problem]]:
        """How many entries were checked, and what is wrong with the chain."""
        problems: list[Problem] = []
        prev: tuple[int, str] | None = None
        count = 0
        bounds = await self.bounds()
        async for seq, e in self.entries(bounds):
            count += 1
            if e is None:
                problems.append(Problem(seq, f"entry {seq} is not an audit entry (altered)"))
                prev = (seq, "")
                continue
            if entry_hash(e) != e.hash:
                problems.append(Problem(seq, f"entry {seq} ({e.op} by {e.user}) was altered: "
                                             "its hash does not match its content"))
            if prev is not None:
                if seq != prev[0] + 1:
                    gone = f"{prev[0] + 1}" if seq == prev[0] + 2 else f"{prev[0] + 1}-{seq - 1}"
                    problems.append(Problem(seq, f"entry {gone} was deleted (between entries "
                                                 f"{prev[0]} and {seq})"))
                elif e.prev != prev[1]:
                    problems.append(Problem(seq, f"entry {seq} ({e.op} by {e.user}) does not "
                                                 f"follow entry {prev[0]}: the chain was "
                                                 "rewritten"))
            prev = (seq, e.hash)
        last = bounds[1]
        if prev is not None and last > prev[0]:
            problems.append(Problem(last, f"entry {prev[0] + 1}"
                                          f"{'-' + str(last) if last > prev[0] + 1 else ''} "
                                          "was deleted (the newest)"))
        return count, problems


def _decode(data: bytes | None) -> Entry:
    return msgspec.json.decode(data or b"", type=Entry)


def now() -> float:
    return time.time()
