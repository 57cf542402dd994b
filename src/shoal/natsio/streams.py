"""A JetStream stream used as an append-only log with optimistic concurrency (the audit
chain): ensure it, append only after a known last sequence (one message, or several as one
atomic batch), read it back by sequence.
nats-py's errors are translated here: a lost race is None or False, a missing message
None; other NATS failures come out as ``NATS_ERRORS`` (``shoal.natsio.bus``)."""

from __future__ import annotations

import dataclasses
import json
import secrets
from typing import NoReturn

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig

WRONG_LAST_SEQUENCE = 10071  # JetStream's error code for a failed expected-last-sequence
BATCH_MAX = 256  # messages in one atomic batch (the server's own limit is 1000)


async def ensure(js: JetStreamContext, name: str, subject: str, *, replicas: int,
                 max_age: float) -> bool:
    """Create the stream (file storage, direct gets allowed) unless it exists, with atomic
    batches allowed (turned on for a stream made before). Whether the server keeps them
    (2.12 and later): an older one drops the setting, and ``append_batch`` must not be used,
    as it would store a batch's messages one by one, unchecked."""
    try:
        info = await js.stream_info(name)
    except nats.js.errors.NotFoundError:
        info = await js.add_stream(StreamConfig(
            name=name, subjects=[subject], storage=StorageType.FILE, num_replicas=replicas,
            max_age=max_age, allow_direct=True, allow_atomic=True))
    if info.config.allow_atomic:
        return True
    info = await js.update_stream(dataclasses.replace(info.config, allow_atomic=True))
    return bool(info.config.allow_atomic)


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


async def append_batch(js: JetStreamContext, name: str, subject: str, items: list[bytes],
                       last: int) -> int | None:
    """Append ``items`` (at most BATCH_MAX) as one JetStream atomic batch, all stored or none,
    if the stream's last sequence is still ``last``: the sequence of the last item, the
    others right before it; None if another writer appended first (nothing was stored).
    One round trip whatever the count: everything is sent, then the answers to the batch's
    start and to its commit are read. Only on a stream ``ensure`` found allows atomic
    batches."""
    if len(items) == 1:
        return await append_after(js, name, subject, items[0], last)
    assert 1 < len(items) <= BATCH_MAX
    nc = js._nc  # noqa: SLF001 (nats-py has no atomic batch publish of its own)
    timeout = js._timeout  # noqa: SLF001
    batch = secrets.token_hex(16)

    def headers(seq: int) -> dict[str, str]:
        return {"Nats-Batch-Id": batch, "Nats-Batch-Sequence": str(seq)}

    # One inbox for the start's answer (empty, or an error) and the commit's (the ack), both
    # awaited once everything is sent: one round trip. The server handles our messages in
    # the order sent, so the start is known before the rest arrives.
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, max_msgs=2)
    try:
        await nc.publish(subject, items[0], reply=inbox, headers={
            **headers(1), "Nats-Expected-Stream": name,
            "Nats-Expected-Last-Sequence": str(last)})
        for seq, data in enumerate(items[1:-1], start=2):
            await nc.publish(subject, data, headers=headers(seq))
        await nc.publish(subject, items[-1], reply=inbox, headers={
            **headers(len(items)), "Nats-Batch-Commit": "1", "Nats-Expected-Stream": name})
        first = await sub.next_msg(timeout)
        if first.data:  # the start was refused: its error says why (batches off, ...)
            _raise_api_error(first.data)
        commit = await sub.next_msg(timeout)
    finally:
        await sub.unsubscribe()
    answer = json.loads(commit.data)
    if "error" in answer:
        if answer["error"].get("err_code") == WRONG_LAST_SEQUENCE:
            return None
        _raise_api_error(commit.data)
    return int(answer["seq"])


def _raise_api_error(data: bytes) -> NoReturn:
    """Raise the nats-py error for a JetStream error answer (as ``js.publish`` would)."""
    answer = json.loads(data)
    error = answer.get("error") if isinstance(answer, dict) else None
    nats.js.errors.APIError.from_error(error or {"code": 500, "description": str(answer)})
    raise nats.js.errors.APIError(description=str(answer))  # from_error always raises


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
