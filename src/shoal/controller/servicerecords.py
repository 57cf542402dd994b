"""Service records in the ``shoal-services`` bucket: a mirror kept current by watching it,
and every change a compare-and-set (two controllers never both win a write)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import msgspec

from ..errors import ConflictError, NotFoundError
from ..natsio import kv
from ..natsio.bus import mirror, watch_bucket
from ..natsio.types import KeyValue
from ..system.tasks import end_tasks
from ..wire import servicetypes as st

log = logging.getLogger(__name__)

LEADER_KEY = "_leader"  # the services lease lives in the same bucket (keys with "_")

_decode = msgspec.json.Decoder(st.ServiceRecord).decode
_encode = msgspec.json.Encoder().encode


class ServiceRecords:
    def __init__(self, bucket: KeyValue) -> None:
        self.kv = bucket
        self.records: dict[str, st.ServiceRecord] = {}
        self.changed = asyncio.Event()  # set on every change; a waiter clears it first
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(
            watch_bucket(self.kv, self._apply, self._ready.set, "services"))
        try:
            await asyncio.wait_for(self._ready.wait(), 10)
        except TimeoutError:
            log.warning("services bucket slow to load; continuing")

    async def stop(self) -> None:
        await end_tasks([self._task])

    def _apply(self, key: str, value: bytes | None) -> None:
        if key.startswith("_"):
            return  # the leader lease
        if mirror(self.records, _decode, key, value):
            self.changed.set()

    def _set(self, name: str, record: st.ServiceRecord | None) -> None:
        if record is None:
            self.records.pop(name, None)
        else:
            self.records[name] = record
        self.changed.set()

    async def read(self, name: str) -> tuple[st.ServiceRecord, int] | None:
        found = await kv.get(self.kv, name)
        return None if found is None else (_decode(found[0]), found[1])

    async def get(self, name: str) -> st.ServiceRecord:
        st.check_name(name)
        found = await self.read(name)
        if found is None:
            raise NotFoundError(f"no service {name!r}; `shoal service list` shows them")
        return found[0]

    async def create(self, record: st.ServiceRecord) -> tuple[st.ServiceRecord, bool]:
        """Store a new record; the same spec again is a no-op, a different one a conflict."""
        if await kv.create(self.kv, record.name, _encode(record)) is not None:
            self._set(record.name, record)
            return record, True
        found = await self.read(record.name)
        if found is None:
            raise ConflictError(f"service {record.name} is being removed; try again")
        if found[0].spec != record.spec:
            raise ConflictError(f"service {record.name} exists with another spec; use "
                                "`shoal service scale` or remove it first")
        return found[0], False

    async def update(self, name: str,
                     change: Callable[[st.ServiceRecord], st.ServiceRecord | None],
                     ) -> st.ServiceRecord:
        """Apply ``change`` with compare-and-set (None: leave it be)."""
        for _ in range(100):
            found = await self.read(name)
            if found is None:
                raise NotFoundError(f"no service {name!r}; `shoal service list` shows them")
            new = change(found[0])
            if new is None:
                return found[0]
            if await kv.update(self.kv, name, _encode(new), found[1]) is not None:
                self._set(name, new)
                return new
        raise ConflictError(f"service {name}: too many concurrent changes; try again")

    async def remove(self, name: str) -> None:
        await kv.purge(self.kv, name)
        self._set(name, None)
