"""A long NATS outage under an output writer (the unit reproduction of the finding): nats-py's
reconnect buffer fills up and raises OutboundBufferLimitError, which used to kill the
writer's publisher task and leave ``flush()`` waiting for ever. Now the writer holds its
output within one budget, blocks, and stores every byte, in order, once NATS is back."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import nats.errors
import pytest
from nats.aio.client import Client as NatsClient

from shoal.natsio import outputlog
from shoal.natsio.natsd import NatsServer, NatsUsers, free_port

RECONNECT_BUFFER = 256 << 10  # nats-py's pending_size, small so that the outage fills it


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[NatsServer]:
    server = NatsServer(tmp_path / "nats", NatsUsers.generate(), port=free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def _connect(server: NatsServer) -> NatsClient:
    nc = await nats.connect(server.url, user="controller",
                            password=server.users.controller_password,
                            pending_size=RECONNECT_BUFFER, reconnect_time_wait=0.2,
                            max_reconnect_attempts=-1)
    await outputlog.ensure_stream(nc.jetstream())
    return nc


async def _stored(nc: NatsClient, sid: str) -> bytes:
    got = b""
    async for item in outputlog.read(nc.jetstream(), sid):
        assert isinstance(item, outputlog.Chunk)
        assert item.offset == len(got)
        got += item.data
    return got


async def _close(nc: NatsClient) -> None:
    try:
        await nc.close()
    except ConnectionResetError:  # the server went first
        pass


def _kill(server: NatsServer) -> None:
    assert server.proc is not None
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait()


async def test_a_full_reconnect_buffer_does_not_kill_the_writer(
        nats_server: NatsServer) -> None:
    nc = await _connect(nats_server)
    js = nc.jetstream()
    budget = outputlog.OutputBudget(2 << 20)
    writer = outputlog.OutputWriter(js, "outage", "n1", window=1 << 20, budget=budget)
    unblocked = asyncio.Event()
    writer.on_unblock = unblocked.set
    expected = b"".join(b"before-%d\n" % i for i in range(100))
    writer.write("stdout", expected)
    await asyncio.wait_for(writer.flush(), 10)
    try:
        _kill(nats_server)
        while nc.is_connected:
            await asyncio.sleep(0.05)
        # Other traffic (heartbeats, records) fills nats-py's reconnect buffer: the real error.
        with pytest.raises(nats.errors.OutboundBufferLimitError):
            for _ in range(RECONNECT_BUFFER // 1024 + 2):
                await nc.publish("shoal.filler", b"x" * 1024)
        # Its own publish_async leaks a semaphore slot and a future on this error.
        with pytest.raises(nats.errors.OutboundBufferLimitError):
            await js.publish_async("shoal.out.other", b"x" * 4096)
        assert js.publish_async_pending() == 1
        outputlog._forget_failed_publish(js)
        await asyncio.sleep(0)  # its done-callback runs on the next turn of the loop
        assert js.publish_async_pending() == 0
        # The session writes on during the outage: 3 MiB, past its window and the budget.
        for i in range(3 * 1024):
            line = b"during-%06d-" % i + b"y" * 1009 + b"\n"
            expected += line
            writer.write("stdout", line)
        assert writer.blocked and budget.spent  # the agent stops reading the pipe
        flushing = asyncio.ensure_future(writer.flush())
        await asyncio.sleep(1.5)
        assert writer._task is not None and not writer._task.done()  # alive, waiting
        assert not flushing.done()  # nothing stored yet, so not flushed
        assert nc.pending_data_size <= RECONNECT_BUFFER  # output never went into it
        nats_server.start()
        await asyncio.wait_for(flushing, 30)  # NATS is back: it stores everything
        assert writer.failed is None
        assert unblocked.is_set() and not writer.blocked and budget.held == 0
        assert await _stored(nc, "outage") == expected  # every byte, once, in order
    finally:
        await writer.close(end_marker=False)
        await _close(nc)


async def test_one_budget_blocks_every_writer_of_the_process(nats_server: NatsServer) -> None:
    nc = await _connect(nats_server)
    js = nc.jetstream()
    budget = outputlog.OutputBudget(1 << 20)
    a = outputlog.OutputWriter(js, "budget-a", "n1", budget=budget)
    b = outputlog.OutputWriter(js, "budget-b", "n1", budget=budget)
    b_unblocked = asyncio.Event()
    b.on_unblock = b_unblocked.set
    try:
        _kill(nats_server)
        while nc.is_connected:
            await asyncio.sleep(0.05)
        a.write("stdout", b"a" * (1 << 20))  # a alone spends the whole budget
        b.write("stdout", b"b")
        assert a.blocked and b.blocked  # so b is held too, though its own window is empty
        nats_server.start()
        await asyncio.wait_for(asyncio.gather(a.flush(), b.flush()), 30)
        assert b_unblocked.is_set() and budget.held == 0
        assert await _stored(nc, "budget-b") == b"b"
    finally:
        await a.close(end_marker=False)
        await b.close(end_marker=False)
        await _close(nc)
