"""Many virtual nodes on real agents: one heartbeat key per agent process, one run request
per agent process, and a node listing that pages, filters and summarises."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet import Fleet, wait_for
from shoal.client.aio import Client
from shoal.config import ControllerConfig, load
from shoal.errors import ValidationError
from shoal.logic.nodeset import natural_key
from shoal.natsio import bus
from shoal.wire import hostbeat, subjects
from shoal.wire import messages as m

V, W = 250, 3  # more than the table shows by default (200)
ALL = sorted([f"v-{i}" for i in range(1, V + 1)] + [f"w-{i}" for i in range(1, W + 1)],
             key=natural_key)


def _agent(fleet: Fleet, prefix: str, n: int) -> subprocess.Popen[str]:
    log = open(fleet.home / f"agent-{prefix}.log", "w")  # noqa: SIM115 - the child owns it
    p = fleet.spawn("agent", "--virtual", str(n), "--prefix", prefix, stdout=log,
                    stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    return p


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    # 250 virtual nodes in one process: more than one node credential names (64), so the
    # shared agent user (docs/operations.md, "Virtual fleets").
    f = Fleet(tmp_path_factory.mktemp("scale") / "home", agents=0,
              extra_args=("--shared-agent-user",)).start()
    try:
        _agent(f, "v-", V)
        _agent(f, "w-", W)
        f.wait_nodes([f"v-{V}", f"w-{W}", "v-1"], timeout=60)
        yield f
    finally:
        f.stop()


def _client(fleet: Fleet) -> Client:
    return Client(fleet.url, fleet.token)


async def _heartbeat_keys(home: Path) -> list[str]:
    nc = await bus.connect(load(ControllerConfig, home / "controller.toml").nats, "test")
    try:
        kv = await nc.jetstream().key_value(subjects.HEARTBEATS_BUCKET)
        return list(await kv.keys())
    finally:
        await bus.close(nc)


def test_each_agent_process_beats_under_one_key_not_one_per_node(big: Fleet) -> None:
    keys = asyncio.run(_heartbeat_keys(big.home))
    assert len(keys) == 2, keys  # 253 nodes, 2 processes, fewer than 1,000 nodes each
    assert all(hostbeat.is_host_key(k) for k in keys)
    nodes = big.nodes()
    assert sorted(nodes, key=natural_key) == ALL
    assert {n["state"] for n in nodes.values()} == {"ready"}
    assert len({n["pid"] for n in nodes.values()}) == 2


def test_a_run_on_every_virtual_node_reaches_each_once(big: Fleet) -> None:
    r = big.shoal("run", "-n", f"v-[1-{V}],w-[1-{W}]", "--", "sh", "-c", 'echo "$SHOAL_NODE"')
    assert r.returncode == 0, r.stderr[-2000:]
    assert "unreachable" not in r.stdout + r.stderr
    assert sorted(r.stdout.splitlines()) == sorted(f"{n}: {n}" for n in ALL)


def test_the_events_of_a_big_run_come_several_to_a_frame_each_once(big: Fleet) -> None:
    # The run WebSocket as any client sees it: what arrives together goes in one
    # RunEvents frame (a frame per exit cost the controller a send each), in order, once.
    from shoal.cli.run_cmd import _next, _open

    targets = m.Targets(nodes=f"v-[1-{V}],w-[1-{W}]")
    ws, plan = _open(big.url, big.token, m.RunStart(targets=targets,
                                                    spec=m.RunSpec(argv=["true"])))
    frames: list[m.ServerFrame] = []
    try:
        while not isinstance(frame := _next(ws), m.RunDone):
            frames.append(frame)
    finally:
        ws.close()
    assert sorted(plan.nodes) == sorted(ALL)
    grouped = [f for f in frames if isinstance(f, m.RunEvents)]
    assert grouped and len(frames) < 2 * len(ALL)  # one Started and one Exit each, apart
    events = [e for f in frames for e in (f.events if isinstance(f, m.RunEvents) else [f])]
    exits = [e.node for e in events if isinstance(e, m.Exit)]
    assert sorted(exits) == sorted(ALL)
    assert all(e.code == 0 for e in events if isinstance(e, m.Exit))


def test_a_batch_reports_each_node_that_cannot_start(big: Fleet) -> None:
    r = big.shoal("run", "-n", "v-[1-20]", "--", "/no/such/program")
    assert r.returncode != 0
    assert "exit 127: v-[1-20]" in r.stdout + r.stderr, r.stdout + r.stderr
    assert "unreachable" not in r.stdout + r.stderr


async def _batch(home: Path, lead: str, nodes: list[str]) -> tuple[m.RunBatchAck, set[str]]:
    """A RunBatch straight over NATS, as a controller sends it; the nodes reported started."""
    nc = await bus.connect(load(ControllerConfig, home / "controller.toml").nats, "test")
    started: set[str] = set()
    exited: set[str] = set()
    try:
        async def on_event(msg) -> None:  # type: ignore[no-untyped-def]
            ev = m.unpack_agent_event_frame(msg.data)
            if isinstance(ev, m.RunBatchStarted):
                started.update(n for n, _ in ev.started)
            elif isinstance(ev, m.RunBatchExited):  # gathered, on the lead's subject
                assert msg.subject == subjects.run_events("testbatch0000001", lead)
                exited.update(e.node for e in ev.exits)
            elif isinstance(ev, m.Exit):
                exited.add(ev.node)

        sub = await nc.subscribe(subjects.run_events("testbatch0000001"), cb=on_event)
        batch = m.RunBatch(run_id="testbatch0000001", spec=m.RunSpec(argv=["true"]),
                           nodes=nodes)
        reply = await nc.request(subjects.agent_runs(lead), m.pack(batch), timeout=10)
        ack = m.unpack(reply.data, m.RunBatchAck)
        mine = set(nodes) - set(ack.refused)
        for _ in range(200):
            if mine <= exited:
                break
            await asyncio.sleep(0.05)
        await sub.unsubscribe()
        assert exited == mine, f"exits from {exited}, expected {mine}"
        return ack, started
    finally:
        await bus.close(nc)


def test_an_agent_refuses_the_nodes_of_a_batch_it_does_not_serve(big: Fleet) -> None:
    # A controller with a stale view (the process restarted with other nodes) asks v-1's
    # process for w-1: the agent takes its own and names the other, which the run reports.
    ack, started = asyncio.run(_batch(big.home, "v-1", ["v-2", "w-1", "v-3", "v-2"]))
    assert ack.reason == "" and ack.refused == ["w-1"]
    assert started == {"v-2", "v-3"}


def test_node_pages_filters_and_summary(big: Fleet) -> None:
    async def go() -> None:
        async with _client(big) as c:
            seen = []
            totals = set()
            async for raw, total in c.node_pages_raw(page=60):
                seen += [n["name"] for n in json.loads(raw)]
                totals.add(total)
            assert seen == ALL and totals == {len(ALL)}
            assert [n.name for n in await c.nodes("v-[1-5],w-2")] == [
                "v-1", "v-2", "v-3", "v-4", "v-5", "w-2"]
            assert [n.name for n in await c.nodes(q="W-")] == ["w-1", "w-2", "w-3"]
            assert await c.nodes(state="down") == []
            page, headers = await c.request_raw(
                "GET", "/api/v1/nodes", params={"nodes": "v-[1-9]", "limit": "3", "after": "v-4"})
            assert [n["name"] for n in json.loads(page)] == ["v-5", "v-6", "v-7"]
            assert headers["X-Total-Count"] == "9"
            fleet = await c.fleet()
            assert fleet.nodes == len(ALL) and fleet.states["ready"] == len(ALL)
            assert fleet.agents == 2 and fleet.capacity > 0
            for params, text in [({"nodes": "v-[1-"}, "bad node set"),
                                 ({"state": "up"}, "state must be one of")]:
                with pytest.raises(ValidationError, match=text):
                    await c.request("GET", "/api/v1/nodes", params=params)

    asyncio.run(go())


def test_shoal_nodes_summarises_a_big_fleet_and_lists_on_request(big: Fleet) -> None:
    r = big.shoal("nodes")
    assert r.returncode == 0, r.stderr
    assert f"{len(ALL)} nodes" in r.stdout and "table is left out" in r.stderr
    assert "v-17 " not in r.stdout
    full = big.shoal("nodes", "--all")
    assert full.returncode == 0, full.stderr
    rows = full.stdout.splitlines()
    assert rows[0].split()[:2] == ["NAME", "STATE"] and len(rows) == len(ALL) + 1
    assert [row.split()[0] for row in rows[1:]] == ALL
    as_json = big.shoal("nodes", "--json")
    assert [n["name"] for n in json.loads(as_json.stdout)] == ALL
    some = big.shoal("nodes", "-n", "w-[1-3]", "--state", "ready")
    assert [row.split()[0] for row in some.stdout.splitlines()[1:]] == ["w-1", "w-2", "w-3"]
    summary = json.loads(big.shoal("nodes", "--summary", "--json").stdout)
    assert summary["nodes"] == len(ALL) and summary["states"]["down"] == 0
    bad = big.shoal("nodes", "-n", "v-[1-")
    assert bad.returncode != 0 and "bad node set" in bad.stderr


def test_a_stopping_agent_takes_its_nodes_down_at_once(big: Fleet) -> None:
    z = _agent(big, "z-", 5)
    big.wait_nodes([f"z-{i}" for i in range(1, 6)], timeout=30)
    before = asyncio.run(_heartbeat_keys(big.home))
    assert len(before) == 3
    z.terminate()
    assert z.wait(30) == 0
    # It deleted its key on the way out (rather than leave it to expire), so its nodes
    # are down now, not a TTL later.
    assert len(asyncio.run(_heartbeat_keys(big.home))) == 2
    wait_for(lambda: all(big.nodes()[f"z-{i}"]["state"] == "down" for i in range(1, 6)),
             timeout=30)
