"""Key-value buckets with compare-and-set, nats-py's errors translated: a missing key is
None, a lost compare-and-set is None (the caller reads again), so the modules above never
catch a NATS type. Other NATS failures (away, no leader) come out as ``NATS_ERRORS``
(``shoal.natsio.bus``), as from every call of this package."""

from __future__ import annotations

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

__all__ = ["KeyValue", "create", "delete", "ensure", "get", "keys", "purge", "update"]


async def ensure(js: JetStreamContext, bucket: str, *, replicas: int = 1,
                 ttl: float | None = None, history: int = 1, memory: bool = False) -> KeyValue:
    """Bind ``bucket``, creating it if missing (file storage unless ``memory``)."""
    try:
        return await js.key_value(bucket)
    except nats.js.errors.BucketNotFoundError:
        return await js.create_key_value(config=KeyValueConfig(
            bucket=bucket, ttl=ttl, history=history, replicas=replicas,
            storage=StorageType.MEMORY if memory else StorageType.FILE))


async def get(kv: KeyValue, key: str) -> tuple[bytes, int] | None:
    """The value and revision of ``key``; None if it has none (never made, deleted,
    purged or expired)."""
    try:
        entry = await kv.get(key)
    except nats.js.errors.KeyNotFoundError:  # the deleted ones too (KeyDeletedError)
        return None
    if not entry.value or entry.revision is None:
        return None
    return entry.value, entry.revision


async def create(kv: KeyValue, key: str, value: bytes) -> int | None:
    """Store ``value`` under a new ``key``; its revision, or None if the key exists."""
    try:
        return await kv.create(key, value)
    except nats.js.errors.KeyWrongLastSequenceError:
        return None


async def update(kv: KeyValue, key: str, value: bytes, last: int) -> int | None:
    """Replace ``key`` if it is still at revision ``last``; the new revision, or None if
    someone wrote in between (read again and decide again)."""
    try:
        return await kv.update(key, value, last=last)
    except nats.js.errors.KeyWrongLastSequenceError:
        return None


async def delete(kv: KeyValue, key: str, last: int | None = None) -> bool:
    """Delete ``key`` (only at revision ``last`` if given); False if it moved on."""
    try:
        await kv.delete(key, last=last)
    except nats.js.errors.KeyWrongLastSequenceError:
        return False
    return True


async def purge(kv: KeyValue, key: str) -> None:
    """Drop ``key`` and its history; a missing key is fine."""
    try:
        await kv.purge(key)
    except nats.js.errors.KeyNotFoundError:
        pass


async def keys(kv: KeyValue) -> list[str]:
    """Every key that has a value; none is an empty list."""
    try:
        return list(await kv.keys())
    except nats.js.errors.NoKeysError:
        return []
