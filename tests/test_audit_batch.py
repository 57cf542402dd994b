"""The audit trail under concurrent writes (group commit, controller/audit.py): entries of
concurrent requests go as one JetStream atomic batch, all stored or none, and a batch whose
expected last sequence is stale stores nothing; bursts on two controllers at once keep one
intact chain, each created session in exactly one entry."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Iterator

import nats
import pytest

from fleet import Fleet
from shoal.client.aio import Client
from shoal.config import ControllerConfig, load
from shoal.natsio import streams

STREAM, SUBJECT = "test-batch", "test.batch"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    f = Fleet(tmp_path_factory.mktemp("auditbatch") / "home").start()
    try:
        yield f
    finally:
        f.stop()


def test_a_batch_is_stored_whole_or_not_at_all(fleet: Fleet) -> None:
    cfg = load(ControllerConfig, fleet.home / "controller.toml").nats

    async def go() -> None:
        nc = await nats.connect(cfg.url, user=cfg.user, password=cfg.password,
                                user_credentials=cfg.creds)
        js = nc.jetstream()
        try:
            assert await streams.ensure(js, STREAM, SUBJECT, replicas=1, max_age=3600)
            items = [f"m{i}".encode() for i in range(5)]
            assert await streams.append_batch(js, STREAM, SUBJECT, items, 0) == 5
            # Stale: another writer appended since sequence 0. Nothing of it is stored.
            assert await streams.append_batch(js, STREAM, SUBJECT, [b"x", b"y"], 0) is None
            assert await streams.append_after(js, STREAM, SUBJECT, b"single", 5) == 6
            assert await streams.append_batch(js, STREAM, SUBJECT, [b"a", b"b", b"c"], 6) == 9
            assert (await streams.bounds(js, STREAM))[1:] == (9, 9)
            stored = [(await streams.message_from(js, STREAM, SUBJECT, s)) for s in range(1, 10)]
            assert [d for _, d in stored if _] == [*items, b"single", b"a", b"b", b"c"]
            # Two batches racing from the same last sequence: exactly one wins.
            won = await asyncio.gather(
                streams.append_batch(js, STREAM, SUBJECT, [b"p1", b"p2"], 9),
                streams.append_batch(js, STREAM, SUBJECT, [b"q1", b"q2", b"q3"], 9))
            winners = [w for w in won if w is not None]
            assert len(winners) == 1 and winners[0] == (11 if won[0] else 12), won
            assert (await streams.bounds(js, STREAM))[1:] == (winners[0], winners[0])
        finally:
            await nc.close()

    asyncio.run(go())


def test_bursts_on_two_controllers_keep_one_chain(fleet: Fleet) -> None:
    _, second = fleet.controller()
    per_controller = 60

    async def burst(url: str) -> list[str]:
        async with Client(url, fleet.token, timeout=60) as client:
            records = await asyncio.gather(*(
                client.create_session({"command": ["true"]}) for _ in range(per_controller)))
        return [r.id for r in records]

    async def both() -> list[str]:
        ids = await asyncio.gather(burst(fleet.url), burst(second))
        return ids[0] + ids[1]

    created = asyncio.run(both())
    assert len(set(created)) == 2 * per_controller
    r = fleet.shoal("audit", "--verify")
    assert r.returncode == 0 and "intact" in r.stdout, r.stdout + r.stderr
    r = fleet.shoal("audit", "--limit", "10000", "--json")
    assert r.returncode == 0, r.stderr
    entries = json.loads(r.stdout)
    seen = Counter(t for e in entries if e["op"] == "sessions.create" for t in e["targets"]
                   if t in set(created))
    assert set(seen) == set(created) and set(seen.values()) == {1}, seen.most_common(3)
    writers = {e["controller"] for e in entries if e["op"] == "sessions.create"
               and e["targets"][0] in set(created)}
    assert len(writers) == 2, writers
    # And they did go in batches (each batch's messages carry its id).
    cfg = load(ControllerConfig, fleet.home / "controller.toml").nats

    async def batched() -> int:
        nc = await nats.connect(cfg.url, user=cfg.user, password=cfg.password,
                                user_credentials=cfg.creds)
        js = nc.jetstream()
        try:
            first, last, _ = await streams.bounds(js, "shoal-audit")
            found = 0
            for seq in range(first, last + 1):
                msg = await js.get_msg("shoal-audit", seq)
                found += bool(msg.headers and "Nats-Batch-Id" in msg.headers)
            return found
        finally:
            await nc.close()

    assert asyncio.run(batched()) > 0


def test_large_entries_go_in_several_batches(fleet: Fleet) -> None:
    """40 concurrent creates whose entries hold a 250 KB shell line each (10 MB in all, over
    the batch's byte budget): every one stored, the chain intact."""
    shell = "true #" + "x" * 250_000

    async def burst() -> list[str]:
        async with Client(fleet.url, fleet.token, timeout=60) as client:
            records = await asyncio.gather(*(
                client.create_session({"shell": shell}) for _ in range(40)))
        return [r.id for r in records]

    created = set(asyncio.run(burst()))
    assert len(created) == 40
    r = fleet.shoal("audit", "--verify")
    assert r.returncode == 0 and "intact" in r.stdout, r.stdout + r.stderr
    r = fleet.shoal("audit", "--limit", "10000", "--json")
    entries = [e for e in json.loads(r.stdout) if e["op"] == "sessions.create"
               and e["targets"] and e["targets"][0] in created]
    assert len(entries) == 40 and all(e["argv"] == [shell] for e in entries)
