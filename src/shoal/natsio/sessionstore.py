"""Session records in the JetStream key-value bucket, changed only by compare-and-set.

Only controllers write records (agents report what happened, controller/reports.py); every
write reads the current revision, checks the transition against ``shoal.logic.sessionstate``
and updates only if nobody wrote in between (else it reads again). So two writers (two
controllers) can never both win, and a final state never changes.

A node's report is written with a *fence*, (attempt, node): the record's ``attempt`` goes up
by one at every placement, so a report from a copy that was given up and placed again (a
zombie back from a partition or a SIGSTOP) finds it changed and is refused (``Fenced``).

The store remembers the revision of what it last wrote or read of each record: most writes
follow one of its own (a node's report after the placement), and that saves their read.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec
import nats.js.errors

from ..errors import ConflictError
from ..logic import sessionstate
from ..logic.sessionstate import check_record, normalized
from ..system.tasks import end_tasks
from ..wire.messages import SessionRecord, SessionState
from .bus import mirror, through_elections, watch_bucket

if TYPE_CHECKING:
    from nats.js.kv import KeyValue

log = logging.getLogger(__name__)

_VALID_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_decode = msgspec.json.Decoder(SessionRecord).decode
_encode = msgspec.json.Encoder().encode

Change = Callable[[SessionRecord], SessionRecord | None]


class Fenced(Exception):
    """The record is no longer this placement's: a newer attempt (or none) owns it."""

    def __init__(self, message: str, record: SessionRecord) -> None:
        super().__init__(message)
        self.record = record


REMEMBERED = 8192  # records whose last revision the store keeps, at most


class SessionStore:
    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv
        # Our last write or read of a record: a write's first guess (a stale one fails and
        # reads again, so it only ever saves a read).
        self._recent: OrderedDict[str, tuple[SessionRecord, int]] = OrderedDict()

    def _remember(self, session_id: str, found: tuple[SessionRecord, int]) -> None:
        self._recent[session_id] = found
        self._recent.move_to_end(session_id)
        if len(self._recent) > REMEMBERED:
            self._recent.popitem(last=False)

    async def get(self, session_id: str) -> tuple[SessionRecord, int] | None:
        if not _VALID_ID.fullmatch(session_id):
            return None  # not a key this bucket can hold: no such session
        try:
            entry = await through_elections(lambda: self.kv.get(session_id),
                                            f"reading session {session_id}")
        except nats.js.errors.KeyNotFoundError:
            return None
        if entry.value is None or entry.revision is None:
            return None
        found = _decode(entry.value), entry.revision
        self._remember(session_id, found)
        return found

    async def create(self, record: SessionRecord) -> tuple[SessionRecord, bool]:
        """Store a new record; if the id exists, return the existing one (idempotency)."""
        data = _encode(record)
        attempts = 0

        async def once() -> None:
            nonlocal attempts
            attempts += 1
            self._remember(record.id, (record, await self.kv.create(record.id, data)))

        while True:
            attempts = 0
            try:
                await through_elections(once, f"creating session {record.id}")
                return record, True
            except nats.js.errors.KeyWrongLastSequenceError:
                found = await self.get(record.id)
                if found is not None:
                    # An earlier try of ours, stored though its answer was lost in a failover.
                    return found[0], attempts > 1 and found[0] == record
                # deleted in between: try again

    async def update(self, session_id: str, change: Change,
                     known: tuple[SessionRecord, int] | None = None) -> SessionRecord | None:
        """Apply ``change`` with compare-and-set; ``change`` returns None to leave it be."""
        found = await self.update_rev(session_id, change, known)
        return found[0] if found else None

    async def update_rev(self, session_id: str, change: Change,
                         known: tuple[SessionRecord, int] | None = None,
                         ) -> tuple[SessionRecord, int] | None:
        """``update``, also giving the new revision. ``known`` (a record and its revision
        just read) saves the first read; if it is stale, the write fails and we read.
        A change the lifecycle does not allow raises ``IllegalTransition`` (nothing is
        written); None means no record, or ``change`` chose to leave it be."""
        known = known or self._recent.pop(session_id, None)
        for _ in range(100):
            found = known or await self.get(session_id)
            known = None
            if found is None:
                return None
            current, rev = found
            new = change(current)
            if new is None:
                return None
            new = normalized(new)
            check_record(current, new)
            try:
                rev = await through_elections(
                    functools.partial(self.kv.update, session_id, _encode(new), last=rev),
                    f"writing session {session_id}")
                self._remember(session_id, (new, rev))
                return new, rev
            except nats.js.errors.KeyWrongLastSequenceError:
                continue
        raise ConflictError(f"session {session_id}: too many concurrent writers; try again")

    async def move(self, session_id: str, state: SessionState,
                   fence: tuple[int, str] | None = None,
                   known: tuple[SessionRecord, int] | None = None,
                   **fields: Any) -> SessionRecord | None:
        """Move to ``state`` and set ``fields``. With ``fence`` (attempt, node), only while
        the record is still that placement's; else raise ``Fenced``. None if the record has
        ended already (the first end wins); a move the lifecycle does not allow raises
        ``IllegalTransition``. ``known``: as for ``update``."""
        return await self.update(session_id, self._guarded(
            session_id, fence, None, None,
            lambda r: sessionstate.change(r, state, time.time(), **fields)), known)

    async def move_from(self, session_id: str, states: frozenset[SessionState],
                        state: SessionState, *, on_node: str | None = None,
                        **fields: Any) -> SessionRecord | None:
        """``move``, only while the record is in one of ``states`` (and, with ``on_node``,
        on that node): None if it has moved on meanwhile (an agent took it, it was placed
        elsewhere), which is what a caller acting on an older view wants."""
        return await self.update(session_id, self._guarded(
            session_id, None, states, on_node,
            lambda r: sessionstate.change(r, state, time.time(), **fields)))

    async def reschedule(self, session_id: str, why: str,
                         fence: tuple[int, str] | None = None,
                         known: tuple[SessionRecord, int] | None = None,
                         only_from: frozenset[SessionState] | None = None,
                         on_node: str | None = None,
                         output_bytes: int | None = None) -> SessionRecord | None:
        """The reschedule transition (``shoal.logic.sessionstate.reschedule``): back to
        pending, off its node, to be placed again at once. ``fence``, ``only_from`` and
        ``known`` as for ``move``; ``on_node``: only while the record is still on that node
        (the one seen lost)."""
        return await self.update(session_id, self._guarded(
            session_id, fence, only_from, on_node,
            lambda r: sessionstate.reschedule(r, why, output_bytes)), known)

    @staticmethod
    def _guarded(session_id: str, fence: tuple[int, str] | None,
                 only_from: frozenset[SessionState] | None, on_node: str | None,
                 change: Change) -> Change:
        def guarded(r: SessionRecord) -> SessionRecord | None:
            if fence is not None and (r.attempt, r.node) != fence:
                raise Fenced(f"session {session_id}: attempt {fence[0]} on {fence[1]} was "
                             f"replaced (the record is at attempt {r.attempt} on "
                             f"{r.node or 'no node'})", r)
            if only_from is not None and r.state not in only_from:
                return None
            if on_node is not None and r.node != on_node:
                return None  # placed elsewhere meanwhile: not the copy the caller saw
            try:
                return change(r)
            except sessionstate.Final:
                # The policy for a late writer: the first end wins (a kill racing the exit,
                # a node lost after its session ended). Said, not silently dropped.
                log.debug("session %s has already ended (%s); leaving it", session_id,
                          r.state)
                return None
        return guarded

    async def delete(self, session_id: str) -> None:
        self._recent.pop(session_id, None)
        try:
            await self.kv.purge(session_id)
        except nats.js.errors.KeyNotFoundError:
            pass


class SessionCache:
    """Every record, kept current by watching the bucket (for lists and the reconciler)."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv
        self.records: dict[str, SessionRecord] = {}
        # The replicas' records (spec.service set): the service pools look at these on
        # every change, and walking 9,000 ended sessions each time slowed a burst of creates.
        self.of_services: dict[str, SessionRecord] = {}
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self.changed = asyncio.Event()  # set on every change; a waiter clears it first

    async def start(self) -> None:
        self._task = asyncio.create_task(watch_bucket(self.kv, self._apply, self._ready.set,
                                                      "sessions"))
        try:
            await asyncio.wait_for(self._ready.wait(), 10)
        except TimeoutError:
            log.warning("sessions bucket slow to load; continuing")

    async def stop(self) -> None:
        await end_tasks([self._task])

    def _apply(self, key: str, value: bytes | None) -> None:
        if mirror(self.records, _decode, key, value):
            record = self.records.get(key)
            if record is not None and record.spec.service:
                self.of_services[key] = record
            else:
                self.of_services.pop(key, None)
            self.changed.set()
