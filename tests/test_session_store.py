"""The session store against a real fleet: an illegal transition is refused with a typed
error (it used to be dropped silently, the writer none the wiser), a late writer to an
ended record is left alone, and a reschedule is a transition with its own field."""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec
import pytest

from fleet import Fleet, wait_running
from shoal.client.aio import Client
from shoal.config import ControllerConfig, load
from shoal.errors import IllegalTransition
from shoal.natsio import bus
from shoal.natsio.sessionstore import SessionStore
from shoal.wire import messages as m


@pytest.fixture
async def client(fleet: Fleet) -> AsyncIterator[Client]:
    async with Client(fleet.url, fleet.token) as c:
        yield c


@pytest.fixture
async def store(fleet: Fleet) -> AsyncIterator[SessionStore]:
    nc = await bus.connect(load(ControllerConfig, fleet.home / "controller.toml").nats, "test")
    try:
        yield SessionStore((await bus.open_buckets(nc)).sessions)
    finally:
        await bus.close(nc)


async def test_an_illegal_transition_raises_and_changes_nothing(
        client: Client, store: SessionStore) -> None:
    r = await client.create_session(m.SessionSpec(command=["sleep", "300"], restart="always"))
    try:
        running = await wait_running(client, r.id)
        # Back to pending without saying it is a reschedule: refused, loudly.
        with pytest.raises(IllegalTransition, match="only a reschedule"):
            await store.move(r.id, "pending", node="", reason="rescheduling: said in text")
        with pytest.raises(IllegalTransition, match="only a reschedule"):
            await store.update(r.id, lambda rec: msgspec.structs.replace(
                rec, state="pending", requeued="waiting"))
        written = await store.update(r.id, lambda rec: msgspec.structs.replace(
            rec, requeued="rescheduled"))
        assert written is not None and written.requeued == ""  # pending records carry it
        after = await client.session(r.id)
        assert (after.state, after.node, after.attempt) == ("running", running.node,
                                                           running.attempt)
    finally:
        await client.kill(r.id)
    ended = await client.wait(r.id)
    assert ended.state == "killed"
    # A late writer to an ended record is left alone (the first end wins), not an error.
    assert await store.move(r.id, "lost", reason="late") is None
    assert (await client.session(r.id)).state == "killed"


async def test_a_reschedule_is_its_own_transition(fleet: Fleet, client: Client,
                                                  store: SessionStore) -> None:
    r = await client.create_session(m.SessionSpec(command=["sleep", "300"], restart="always"))
    try:
        running = await wait_running(client, r.id)
        moved = await store.reschedule(r.id, "moved by a test", on_node=running.node)
        assert moved is not None
        assert (moved.state, moved.requeued, moved.node, moved.restarts) == (
            "pending", "rescheduled", "", running.restarts + 1)
        assert moved.reason == "rescheduling: moved by a test"
        # The field, not the reason, gets it placed again at once; taking it clears it.
        again = await wait_running(client, r.id)
        assert again.attempt == running.attempt + 1 and again.requeued == ""
    finally:
        await client.kill(r.id)


async def test_an_attempt_placed_where_its_earlier_one_runs_replaces_it(
        client: Client, store: SessionStore) -> None:
    """The finding: moved behind its agent's back and placed again on the same node, a
    session ran twice there (the earlier copy, no longer listed, was not ended even by the
    agent's stop: its cgroup base and a traceback were left at exit)."""
    import asyncio

    from fleet import processes_with_env

    r = await client.create_session(m.SessionSpec(command=["sleep", "300"], restart="always",
                                                  node="node-1"))
    try:
        running = await wait_running(client, r.id)
        assert len(processes_with_env("SHOAL_SESSION_ID", r.id)) == 1
        assert await store.reschedule(r.id, "moved by a test", on_node="node-1") is not None
        for _ in range(200):
            again = await client.session(r.id)
            if again.state == "running" and again.attempt > running.attempt:
                break
            await asyncio.sleep(0.05)
        assert (again.node, again.attempt) == ("node-1", running.attempt + 1), again
        copies = processes_with_env("SHOAL_SESSION_ID", r.id)
        for _ in range(200):
            if len(copies) == 1:
                break
            await asyncio.sleep(0.1)
            copies = processes_with_env("SHOAL_SESSION_ID", r.id)
        assert [p.pid for p in copies] == [again.pid]
    finally:
        await client.kill(r.id)
