"""A JetStream stream used as an append-only log with optimistic concurrency (the audit
chain): ensure it, append only after a known last sequence, read it back by sequence.
nats-py's errors are translated here: a lost race is None or False, a missing message
None; other NATS failures come out as ``NATS_ERRORS`` (``shoal.natsio.bus``)."""

from __future__ import annotations

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig

WRONG_LAST_SEQUENCE = 10071  # JetStream's error code for a failed expected-last-sequence


async def ensure(js: JetStreamContext, name: str, subject: str, *, replicas: int,
                 max_age: float) -> None:
    """Create the stream (file storage, direct gets allowed) unless it exists."""
    try:
        await js.stream_info(name)
    except nats.js.errors.NotFoundError:
        await js.add_stream(StreamConfig(name=name, subjects=[subject],
                                         storage=StorageType.FILE, num_replicas=replicas,
                                         max_age=max_age, allow_direct=True))


async def append_after(js: JetStreamContext, name: str, subject: str, data: bytes,
                       last: int) -> int | None:
    """Append ``data`` if the stream's last sequence is still ``last``; the new sequence,
    or None if another writer appended first (reload and try again)."""
    try:
        ack = await js.publish(subject, data, stream=name,
                               headers={"Nats-Expected-Last-Sequence": str(last)})
    except nats.js.errors.APIError as e:
        if e.err_code == WRONG_LAST_SEQUENCE:
            return None
        raise
    return ack.seq


async def bounds(js: JetStreamContext, name: str) -> tuple[int, int, int]:
    """(first sequence, last sequence, messages kept) of the stream."""
    info = await js.stream_info(name)
    return info.state.first_seq, info.state.last_seq, info.state.messages


async def last_message(js: JetStreamContext, name: str, subject: str) -> bytes | None:
    try:
        msg = await js.get_last_msg(name, subject)
    except nats.js.errors.NotFoundError:
        return None
    return msg.data or b""


async def message_from(js: JetStreamContext, name: str, subject: str,
                       seq: int) -> tuple[int, bytes] | None:
    """The first message on ``subject`` at or after ``seq``: (its sequence, its data);
    None past the end."""
    try:
        msg = await js.get_msg(name, seq, subject=subject, next=True)
    except nats.js.errors.NotFoundError:
        return None
    if msg.seq is None:
        return None
    return msg.seq, msg.data or b""
