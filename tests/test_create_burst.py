"""Concurrent creates on a real fleet: a kill that arrives while the session is still
starting (its output stream being opened, its process being spawned off the event loop)
ends it; a burst over the fleet's capacity never overfills a node."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator

import pytest

from fleet import Fleet
from shoal.client.aio import Client
from shoal.errors import RemoteTimeout

CAPACITY = 30


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    f = Fleet(tmp_path_factory.mktemp("burst") / "home",
              extra_args=("--capacity", str(CAPACITY))).start()
    try:
        yield f
    finally:
        f.stop()


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in "ZX"
    except (OSError, IndexError):
        return False


def test_a_kill_while_starting_ends_the_session(fleet: Fleet) -> None:
    async def create_and_kill(client: Client) -> tuple[str, str, int | None]:
        record = await client.create_session({"command": ["sleep", "300"]})
        await client.kill(record.id)  # at once: most are still starting
        try:
            final = await client.wait(record.id, timeout=30)
        except RemoteTimeout:
            final = await client.session(record.id)
        return final.id, final.state, final.pid

    async def go() -> list[tuple[str, str, int | None]]:
        async with Client(fleet.url, fleet.token, timeout=60) as client:
            out = []
            for _ in range(3):  # rounds of 20, within each node's capacity
                out += await asyncio.gather(*(create_and_kill(client) for _ in range(20)))
            return out

    ended = asyncio.run(go())
    states = Counter(state for _, state, _ in ended)
    assert states == {"killed": 60}, [e for e in ended if e[1] != "killed"][:5]
    left = [(sid, pid) for sid, _, pid in ended if pid and alive(pid)]
    assert not left, f"processes of killed sessions still run: {left[:5]}"
    for _, _, pid in ended:  # no stray `sleep 300` of these sessions either
        assert pid is None or not alive(pid)


def test_a_burst_over_capacity_fills_the_nodes_and_no_more(fleet: Fleet) -> None:
    """3 x capacity creates at once on 2 nodes of capacity 30: 60 run, the rest fail saying
    why; no node holds more than its capacity."""

    async def go() -> list[tuple[str, str, str]]:
        async with Client(fleet.url, fleet.token, timeout=60) as client:
            records = await asyncio.gather(*(
                client.create_session({"command": ["sleep", "60"]})
                for _ in range(3 * CAPACITY)))
            out = [(r.state, r.node or "", r.reason) for r in records]
            for r in records:
                if r.state not in ("failed",):
                    await client.kill(r.id)
            return out

    placed = asyncio.run(go())
    per_node = Counter(node for state, node, _ in placed if state != "failed")
    assert per_node == {"node-1": CAPACITY, "node-2": CAPACITY}, per_node
    failed = [reason for state, _, reason in placed if state == "failed"]
    assert len(failed) == CAPACITY and all("no node has room" in r for r in failed), failed[:3]
