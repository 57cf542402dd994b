"""Session output under the writing node's name (``shoal.out.<id>.<node>``), against a real
nats-server: fencing across nodes, what readers believe, and output stored under the old
one-token subject before the upgrade (docs/security.md, "Session output")."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import msgspec
import nats
import pytest
from nats.aio.client import Client as NatsClient
from nats.js.api import StorageType, StreamConfig
from nats.js.client import JetStreamContext

from shoal.logic import outputtrust
from shoal.natsio import outputlog
from shoal.natsio.natsd import NatsServer, NatsUsers, free_port

Chunk = outputlog.Chunk


@pytest.fixture
async def nc(tmp_path: Path) -> AsyncIterator[NatsClient]:
    server = NatsServer(tmp_path / "nats", NatsUsers.generate(), port=free_port())
    server.start()
    client = await nats.connect(server.url, user="controller",
                                password=server.users.controller_password)
    try:
        yield client
    finally:
        await client.close()
        server.stop()


def _nodes(*names: str) -> Callable[[], Awaitable[list[str]]]:
    async def nodes() -> list[str]:
        return list(names)
    return nodes


async def _read(nc: NatsClient, sid: str, nodes: list[str] | None) -> list[Chunk]:
    got: list[Chunk] = []
    async for item in outputlog.read(nc.jetstream(), sid, attempts=True,
                                     nodes=None if nodes is None else _nodes(*nodes)):
        assert isinstance(item, Chunk), item
        got.append(item)
    return got


def _text(chunks: list[Chunk]) -> bytes:
    return b"".join(c.data for c in chunks)


async def _forge(nc: NatsClient, subj: str, chunk: Chunk) -> None:
    """What a node could publish under its own name without any fencing header."""
    await nc.jetstream().publish(subj, msgspec.msgpack.encode(chunk))


async def _written(js: JetStreamContext, sid: str, node: str, epoch: int,
                   data: bytes) -> outputlog.OutputWriter:
    """A writer of ``sid`` on ``node`` that began attempt ``epoch`` and stored ``data``."""
    await outputlog.ensure_stream(js)
    writer = outputlog.OutputWriter(js, sid, node)
    await writer.begin(epoch)
    writer.write("stdout", data)
    assert await writer.flush(10)
    return writer


async def test_a_zombie_on_another_node_is_fenced_by_the_newer_attempt(nc: NatsClient) -> None:
    js = nc.jetstream()
    old = await _written(js, "s1", "node-a", 1, b"one ")
    new = outputlog.OutputWriter(js, "s1", "node-b")
    await new.begin(2)  # on another node, so under another subject
    assert new.offset == 4
    old.write("stdout", b"zombie ")
    assert await old.flush(10)
    assert old.fenced
    new.write("stdout", b"two")
    await new.close(timeout=10)
    assert not new.fenced
    chunks = await _read(nc, "s1", ["node-a", "node-b"])
    assert _text(chunks) == b"one two"
    assert [c.epoch for c in chunks if c.stream == outputlog.ATTEMPT] == [1, 2]


async def test_a_forged_chunk_under_another_nodes_name_is_not_read_and_stops_no_writer(
        nc: NatsClient) -> None:
    """node-a publishes (under its own name, as its credential allows) into the output of a
    session node-b runs: readers drop it, and node-b's writer steps over it."""
    js = nc.jetstream()
    await outputlog.ensure_stream(js)
    writer = outputlog.OutputWriter(js, "s2", "node-b")

    async def where(sid: str, epoch: int) -> outputlog.OutputLast:
        return await outputlog.last_output(js, sid, ["node-a", "node-b"])
    writer.where = where
    await writer.begin(2)
    writer.write("stdout", b"real ")
    assert await writer.flush(10)
    forged = outputlog.subject("s2", "node-a")
    await _forge(nc, forged, Chunk("stdout", 5, b"FORGED ", 2))
    await _forge(nc, forged, Chunk(outputlog.ATTEMPT, 5, b"", 3))
    await _forge(nc, forged, Chunk("stdout", 5, b"FORGED ", 1))  # an attempt it did run
    await _forge(nc, forged, Chunk(outputlog.END, 5, b"", 2))
    await nc.jetstream().publish(forged, b"not a chunk")  # last: what the writer meets
    writer.write("stdout", b"output")
    await writer.close(timeout=10)
    assert not writer.fenced
    assert _text(await _read(nc, "s2", ["node-a", "node-b"])) == b"real output"
    # Where the output stands is judged the same way.
    assert await outputlog.end_offset(js, "s2", ["node-a", "node-b"]) == 11


async def test_output_stored_under_the_old_subject_is_still_read(nc: NatsClient) -> None:
    """A stream made before node names, holding old-shape chunks: ensure_stream widens its
    subjects, keeps its data and limits, and a new attempt's output goes on after it."""
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name=outputlog.STREAM, subjects=["shoal.out.*"],
                                     storage=StorageType.FILE, max_bytes=1 << 30))
    await js.add_stream(StreamConfig(name=outputlog.TERMINAL_STREAM,
                                     subjects=["shoal.tout.*"], storage=StorageType.FILE))
    legacy = outputlog.subject("s3")
    assert legacy == "shoal.out.s3"
    await _forge(nc, legacy, Chunk(outputlog.ATTEMPT, 0, b"", 1))
    await _forge(nc, legacy, Chunk("stdout", 0, b"before ", 1))
    await outputlog.ensure_stream(js)
    info = await js.stream_info(outputlog.STREAM)
    assert sorted(info.config.subjects or []) == ["shoal.out.*", "shoal.out.*.*"]
    assert info.config.max_bytes == 1 << 30 and info.state.messages == 2
    writer = outputlog.OutputWriter(js, "s3", "node-b")
    await writer.begin(2)
    assert writer.offset == 7
    writer.write("stdout", b"after")
    await writer.close(timeout=10)
    for nodes in (["", "node-b"], None):
        chunks = await _read(nc, "s3", nodes)
        assert _text(chunks) == b"before after"
        assert [c.epoch for c in chunks if c.stream == outputlog.ATTEMPT] == [1, 2]
    # Resuming by offset across the two shapes.
    rest = [c async for c in outputlog.read(js, "s3", 3, nodes=_nodes("", "node-b"))]
    assert _text([c for c in rest if isinstance(c, Chunk)]) == b"ore after"
    await outputlog.purge(js, "s3", strict=True)
    assert (await js.stream_info(outputlog.STREAM)).state.messages == 0


async def test_the_cap_trims_every_nodes_output_of_the_session(nc: NatsClient) -> None:
    js = nc.jetstream()
    await outputlog.ensure_stream(js)
    first = outputlog.OutputWriter(js, "s4", "node-a", cap=1000)
    await first.begin(1)
    first.write("stdout", b"a" * 600)
    await first.close(end_marker=False, timeout=10)
    second = outputlog.OutputWriter(js, "s4", "node-b", cap=1000)
    await second.begin(2)
    for _ in range(4):
        second.write("stdout", b"b" * 400)
        assert await second.flush(10)
    await second.close(timeout=10)
    items = [i async for i in outputlog.read(js, "s4", nodes=_nodes("node-a", "node-b"))]
    assert isinstance(items[0], outputlog.Truncated)
    data = _text([i for i in items if isinstance(i, Chunk)])
    assert b"a" not in data and 1000 <= len(data) < 2200


def test_trust_is_by_the_node_of_each_attempt_and_never_goes_back() -> None:
    trust = outputtrust.Trust(["node-a", "node-b"])
    assert trust.accept(outputtrust.LEGACY, 1)  # stored before node names
    assert trust.accept("node-a", 1)
    assert not trust.accept("node-b", 1)  # attempt 1 ran on node-a
    assert not trust.accept("node-a", 2)
    assert not trust.accept("node-a", 0)
    assert not trust.accept("node-a", 3) and not trust.knows(3)
    assert trust.accept("node-b", 2)
    assert not trust.accept("node-a", 1)  # a later attempt has written: attempt 1 is over


async def test_a_writer_the_controllers_disown_is_fenced(nc: NatsClient) -> None:
    """With a node credential the writer asks the controllers where output stands; their
    "not your attempt" (the record moved on) fences it, at its start or at a refusal."""
    js = nc.jetstream()
    await outputlog.ensure_stream(js)
    owner = {"s5": 1}

    async def where(sid: str, epoch: int) -> outputlog.OutputLast:
        if owner[sid] != epoch:
            raise outputlog.Fenced(f"attempt {epoch} of {sid} is not node-a's")
        return await outputlog.last_output(js, sid, ["node-a", "node-b"][:owner[sid]])
    zombie = outputlog.OutputWriter(js, "s5", "node-a", where=where)
    told: list[str] = []
    zombie.on_fenced = lambda: told.append("fenced")
    await zombie.begin(1)
    zombie.write("stdout", b"one ")
    assert await zombie.flush(10)
    owner["s5"] = 2
    newer = outputlog.OutputWriter(js, "s5", "node-b", where=where)
    await newer.begin(2)
    zombie.write("stdout", b"zombie")
    assert await zombie.flush(10)
    assert zombie.fenced and told == ["fenced"]
    late = outputlog.OutputWriter(js, "s5", "node-a", where=where)
    await late.begin(1)  # a copy that starts only now: fenced before it writes anything
    assert late.fenced
    late.write("stdout", b"late")
    await newer.close(timeout=10)
    assert _text(await _read(nc, "s5", ["node-a", "node-b"])) == b"one "


async def test_a_follower_whose_consumer_vanishes_reads_on_to_the_end(nc: NatsClient) -> None:
    """A follower's ephemeral consumer lives on one server; when that server is killed the
    consumer is gone and its pull requests go unanswered, while the stream (replicated) holds
    on. Deleting the consumer does the same here. The follower must notice and read every
    byte to the end marker, not wait forever, nor stop once the session is over."""
    js = nc.jetstream()
    writer = await _written(js, "s6", "node-a", 1, b"before ")
    over = False

    async def is_over() -> bool:
        return over

    got: list[Chunk] = []

    async def follow() -> None:
        async for item in outputlog.read(js, "s6", follow=True, is_over=is_over,
                                         nodes=_nodes("node-a")):
            assert isinstance(item, Chunk)
            got.append(item)

    reader = asyncio.create_task(follow())
    for _ in range(200):
        if _text(got) == b"before ":
            break
        await asyncio.sleep(0.05)
    assert _text(got) == b"before "
    stream = outputlog.stream_of("s6")
    consumers = await js.consumers_info(stream)
    assert len(consumers) == 1
    await js.delete_consumer(stream, consumers[0].name)
    writer.write("stdout", b"after")
    await writer.close(timeout=10)
    over = True  # the record says the session ended
    await asyncio.wait_for(reader, 20)
    assert _text(got) == b"before after"
