"""A leader lease in a key-value bucket: one holder at a time, kept by renewing it before it
runs out, taken over by anyone once it has (``LEASE`` seconds without renewal). Renewals and
takeovers are compare-and-set writes, so two contenders never both win."""

from __future__ import annotations

import time

import msgspec

from . import kv
from .kv import KeyValue

LEASE = 5.0  # seconds a lease lasts without renewal


class _Held(msgspec.Struct):
    holder: str
    until: float


class Lease:
    def __init__(self, bucket: KeyValue, key: str, holder: str, ttl: float = LEASE) -> None:
        self.kv = bucket
        self.key = key
        self.holder = holder
        self.ttl = ttl

    async def renew(self) -> bool:
        """Take or keep the lease; whether we hold it now. NATS failures raise (the caller
        counts itself not leader meanwhile)."""
        now = time.time()
        mine = msgspec.json.encode(_Held(holder=self.holder, until=now + self.ttl))
        found = await kv.get(self.kv, self.key)
        if found is None:
            return await kv.create(self.kv, self.key, mine) is not None
        try:
            held = msgspec.json.decode(found[0], type=_Held)
        except msgspec.DecodeError:
            return False  # not ours to overwrite: someone else's format
        if held.holder == self.holder or held.until < now:
            return await kv.update(self.kv, self.key, mine, found[1]) is not None
        return False

    async def release(self) -> None:
        """Hand over at once instead of after the lease runs out (if we still hold it)."""
        found = await kv.get(self.kv, self.key)
        if found is not None and msgspec.json.decode(found[0], type=_Held).holder == self.holder:
            await kv.delete(self.kv, self.key, last=found[1])
