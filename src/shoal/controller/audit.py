"""The audit trail: who did what, in the JetStream stream ``shoal-audit``.

Every state change (allowed or refused), every run and every attach is one entry: time,
user, token id, source address, operation, targets, the argv or spec digest, and the result.
Keystrokes are never recorded.

Entries form a hash chain: each carries the SHA-256 of its own content and the hash of the
entry before it. Several controllers append to the same chain: each publishes with
``Nats-Expected-Last-Sequence`` set to the last sequence it knows, so JetStream refuses the
write if another controller appended first; it then reloads the last entry and tries again.
``verify`` walks the stream and names every entry that is missing (a gap in the sequence),
altered (its hash does not match) or out of chain. Retention (``audit_retention``) ages the
oldest entries out; the chain is checked from the oldest one left.
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


def entry_hash(entry: Entry) -> str:
    body = msgspec.json.encode(msgspec.structs.replace(entry, hash=""))
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

    async def start(self, js: JetStreamContext, replicas: int, retention: float) -> None:
        self.js = js
        await streams.ensure(js, STREAM, SUBJECT, replicas=replicas, max_age=retention)

    async def record(self, entry: Entry) -> None:
        """Append ``entry`` to the chain; failures are logged, never raised (the request
        it records has happened already)."""
        try:
            await self._append(msgspec.structs.replace(entry, controller=self.instance))
        except _FAILURES as e:
            log.error("audit entry for %s by %s not written: %r", entry.op, entry.user, e)

    async def _append(self, entry: Entry) -> None:
        assert self.js is not None
        async with self._lock:
            for _ in range(ATTEMPTS):
                if self._last is None:
                    self._last = await self._load_last()
                seq, prev = self._last
                e = msgspec.structs.replace(entry, prev=prev)
                e = msgspec.structs.replace(e, hash=entry_hash(e))
                new = await streams.append_after(self.js, STREAM, SUBJECT,
                                                 msgspec.json.encode(e), seq)
                if new is None:  # another controller was first
                    self._last = None
                    continue
                self._last = (new, e.hash)
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
