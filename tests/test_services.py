"""Services end to end on a real 2-node fleet: replicas of tests/replica_server.py (an HTTP
server on $PORT answering with its session id), probes, choice, redirect, proxy, drain."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from fleet import Fleet, processes_with_env
from shoal.client.aio import Client
from shoal.errors import NoCapacityError, NotFoundError
from shoal.wire import servicetypes as st

REPLICA = [sys.executable, str(Path(__file__).with_name("replica_server.py"))]
FAST = {"interval": 0.2, "timeout": 0.5}  # short probe intervals keep the suite quick


@pytest.fixture
async def client(fleet: Fleet) -> AsyncIterator[Client]:
    async with Client(fleet.url, fleet.token) as c:
        yield c


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain client: service traffic needs no shoal token."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
        yield s


async def wait_up(client: Client, name: str, n: int, timeout: float = 30) -> st.ServiceView:
    deadline = time.monotonic() + timeout
    while True:
        view = await client.service(name)
        if view.up == n and len(view.replicas) == n:
            return view
        if time.monotonic() > deadline:
            raise AssertionError(f"service {name} not {n} up: {view}")
        await asyncio.sleep(0.1)


async def get_name(http: aiohttp.ClientSession, url: str) -> str:
    async with http.get(url) as resp:
        assert resp.status == 200, await resp.text()
        return (await resp.text()).strip()


def replica_pid(sid: str) -> int:
    procs = [p for p in processes_with_env("SHOAL_SESSION_ID", sid)
             if "replica_server.py" in " ".join(p.info["cmdline"] or [])]
    assert len(procs) == 1, procs
    return procs[0].pid


async def test_redirect_every_replica_gets_traffic(client: Client, http: aiohttp.ClientSession,
                                                   fleet: Fleet) -> None:
    await client.create_service(st.ServiceSpec(name="web", command=REPLICA, replicas=3,
                                               check="http:/health", **FAST))
    view = await wait_up(client, "web", 3)
    assert {r.node for r in view.replicas} == {"node-1", "node-2"}, "replicas spread"
    counts = collections.Counter([await get_name(http, f"{fleet.services_url}/s/web/")
                                  for _ in range(90)])
    assert set(counts) == {r.id for r in view.replicas}, counts
    # The redirect itself: 307 to the replica, path and query kept.
    async with http.get(f"{fleet.services_url}/s/web/a/b?c=d", allow_redirects=False) as resp:
        assert resp.status == 307
        location = resp.headers["Location"]
        assert location.endswith("/a/b?c=d")
    best = await client.best("web")
    assert best.replica in counts and best.url == f"http://{best.host}:{best.port}/"
    assert await get_name(http, best.url) == best.replica
    r = fleet.shoal("best", "web")
    assert r.returncode == 0, r.stderr
    host, port = r.stdout.strip().rsplit(":", 1)
    assert await get_name(http, f"http://{host}:{port}/") in counts


async def test_hung_replica_leaves_rotation_and_comes_back(client: Client,
                                                           http: aiohttp.ClientSession) -> None:
    view = await wait_up(client, "web", 3)
    victim = view.replicas[0]
    pid = replica_pid(victim.id)
    os.kill(pid, signal.SIGSTOP)  # connect still works (the kernel accepts), answers do not
    stopped = time.monotonic()
    try:
        spec = view.spec
        window = spec.fall * spec.interval + spec.timeout
        while (await client.service("web")).replicas[0].health != "down":
            assert time.monotonic() - stopped < window + 5, "left the rotation in time"
            await asyncio.sleep(0.05)
        chosen = collections.Counter([(await client.best("web")).replica for _ in range(100)])
        assert victim.id not in chosen and len(chosen) == 2, chosen
    finally:
        os.kill(pid, signal.SIGCONT)
    await wait_up(client, "web", 3)


async def test_dead_replica_is_replaced_and_scale(client: Client, fleet: Fleet) -> None:
    view = await wait_up(client, "web", 3)
    victim = view.replicas[1].id
    await client.kill(victim)  # ends for good: the service starts another
    await client.wait(victim)
    view = await wait_up(client, "web", 3)
    assert victim not in {r.id for r in view.replicas}
    await client.scale_service("web", 1)
    view = await wait_up(client, "web", 1)
    r = fleet.shoal("service", "scale", "web", "2")
    assert r.returncode == 0, r.stderr
    await wait_up(client, "web", 2)
    r = fleet.shoal("service", "list", "--json")
    assert [s["name"] for s in json.loads(r.stdout)] == ["web"]
    r = fleet.shoal("service", "show", "web")
    assert r.returncode == 0 and "web: 2 of 2 up" in r.stdout, r.stdout
    r = fleet.shoal("service", "rm", "web", "--deadline", "5")
    assert r.returncode == 0, r.stderr
    with pytest.raises(NotFoundError):
        await client.service("web")
    assert not [s for s in await client.sessions() if s.spec.service == "web"]


async def test_slow_replica_gets_fewer_requests(client: Client, http: aiohttp.ClientSession,
                                                fleet: Fleet) -> None:
    await client.create_service(st.ServiceSpec(name="api", command=REPLICA, replicas=3,
                                               check="http:/health", proxy=True, **FAST))
    view = await wait_up(client, "api", 3)
    slow = view.replicas[0]
    await get_name(http, f"http://{slow.host}:{slow.port}/delay?ms=60")
    await asyncio.sleep(0.5)  # a probe or two see it
    counts: collections.Counter[str] = collections.Counter()

    async def worker(n: int) -> None:
        for _ in range(n):
            counts[await get_name(http, f"{fleet.services_url}/s/api/")] += 1

    await asyncio.gather(*(worker(75) for _ in range(4)))
    await get_name(http, f"http://{slow.host}:{slow.port}/delay?ms=0")
    assert sum(counts.values()) == 300
    fast = [counts[r.id] for r in view.replicas[1:]]
    assert counts[slow.id] * 4 < min(fast), counts


async def test_drain_lets_in_flight_finish_and_sends_no_new(
        client: Client, http: aiohttp.ClientSession, fleet: Fleet) -> None:
    await wait_up(client, "api", 3)
    async with http.get(f"{fleet.services_url}/s/api/slow?ms=2000") as slow:
        assert slow.status == 200
        target = (await slow.content.readline()).decode().strip()
        await client.drain_service("api", replica=target, deadline=30)
        names = collections.Counter([await get_name(http, f"{fleet.services_url}/s/api/")
                                     for _ in range(40)])
        assert target not in names, names
        assert (await slow.content.read()) == b"done\n"
    view = await wait_up(client, "api", 3)
    assert target not in {r.id for r in view.replicas}
    record = await client.session(target)
    assert record.state == "killed" and "drained" in record.reason


async def test_proxy_1000_requests_with_a_replica_killed(
        client: Client, http: aiohttp.ClientSession, fleet: Fleet) -> None:
    view = await wait_up(client, "api", 3)
    victim = view.replicas[0].id
    pid = replica_pid(victim)
    statuses: collections.Counter[int] = collections.Counter()
    done = 0

    async def worker() -> None:
        nonlocal done
        while done < 1000:
            done += 1
            if done == 300:
                os.kill(pid, signal.SIGKILL)
            async with http.get(f"{fleet.services_url}/s/api/x") as resp:
                await resp.read()
                statuses[resp.status] += 1

    await asyncio.gather(*(worker() for _ in range(10)))
    assert statuses == {200: sum(statuses.values())} and sum(statuses.values()) >= 1000
    await wait_up(client, "api", 3)  # restarted in place (restart=always)
    assert (await client.session(victim)).restarts >= 1


async def test_proxy_websocket_and_post(client: Client, http: aiohttp.ClientSession,
                                        fleet: Fleet) -> None:
    view = await wait_up(client, "api", 3)
    ids = {r.id for r in view.replicas}
    async with http.ws_connect(f"{fleet.services_url}/s/api/ws") as ws:
        await ws.send_str("hello")
        reply = await ws.receive_str()
        who, _, text = reply.partition(": ")
        assert who in ids and text == "hello"
    async with http.post(f"{fleet.services_url}/s/api/upload", data=b"x" * 5000) as resp:
        assert resp.status == 200 and (await resp.text()).endswith(" got 5000\n")
        assert resp.headers["X-Shoal-Replica"] in ids
    # The proxy needs no token (test_service_origin.py shows what reaches a replica).
    async with http.get(f"{fleet.services_url}/s/api/") as resp:
        assert resp.status == 200
    await client.remove_service("api", deadline=5)


async def test_no_healthy_replica_is_503_at_once(client: Client, http: aiohttp.ClientSession,
                                                 fleet: Fleet) -> None:
    await client.create_service(st.ServiceSpec(name="mute", command=["sleep", "600"],
                                               replicas=1, **FAST))
    start = time.monotonic()
    for path in ("/s/mute/", "/s/mute"):
        async with http.get(fleet.url + path) as resp:
            body = await resp.json()
            assert resp.status == 503 and "no healthy replica" in body["error"], body
    with pytest.raises(NoCapacityError, match="no healthy replica"):
        await client.best("mute")
    assert time.monotonic() - start < 5
    await client.drain_service("mute")
    async with http.get(fleet.services_url + "/s/mute/") as resp:
        assert resp.status == 503 and "drained" in (await resp.json())["error"]
    await client.remove_service("mute", deadline=0)


async def test_bad_names_and_specs_get_4xx(fleet: Fleet, http: aiohttp.ClientSession) -> None:
    ok_spec: dict[str, Any] = {"name": "ok-one", "command": ["true"], "replicas": 0}
    cases: list[tuple[str, str, Any, int]] = [
        ("POST", "/api/v1/services", b"{nope", 400),
        ("POST", "/api/v1/services", {**ok_spec, "name": "Bad_Name"}, 422),
        ("POST", "/api/v1/services", {**ok_spec, "name": "-x"}, 422),
        ("POST", "/api/v1/services", {**ok_spec, "name": "x" * 64}, 422),
        ("POST", "/api/v1/services", {"name": "x"}, 400),
        ("POST", "/api/v1/services", {**ok_spec, "shell": "true"}, 400),
        ("POST", "/api/v1/services", {**ok_spec, "check": "udp"}, 400),
        ("POST", "/api/v1/services", {**ok_spec, "check": "http:nopath"}, 400),
        ("POST", "/api/v1/services", {**ok_spec, "check": "http:/a b"}, 400),
        ("POST", "/api/v1/services", {**ok_spec, "replicas": -1}, 422),
        ("POST", "/api/v1/services", {**ok_spec, "replicas": 5000}, 422),
        ("POST", "/api/v1/services", {**ok_spec, "interval": 0}, 422),
        ("POST", "/api/v1/services", {**ok_spec, "rise": 0}, 422),
        ("POST", "/api/v1/services", {**ok_spec, "user": "no such/user"}, 400),
        ("POST", "/api/v1/services", {**ok_spec, "surprise": 1}, 422),
        ("GET", "/api/v1/services/Bad_Name", None, 400),
        ("GET", "/api/v1/services/nope", None, 404),
        ("GET", "/api/v1/services/nope/best", None, 404),
        ("POST", "/api/v1/services/nope/scale", {"replicas": 2}, 404),
        ("POST", "/api/v1/services/nope/drain", {}, 404),
        ("DELETE", "/api/v1/services/nope", None, 404),
        ("GET", "/s/nope/", None, 404),
        ("GET", "/s/Bad_Name/", None, 400),
    ]
    headers = {"Authorization": f"Bearer {fleet.token}"}
    async with http.post(fleet.url + "/api/v1/services", json=ok_spec, headers=headers) as r:
        assert r.status == 201, await r.text()
    cases += [
        ("POST", "/api/v1/services", {**ok_spec, "replicas": 2}, 409),
        ("POST", "/api/v1/services/ok-one/scale", {"replicas": -3}, 400),
        ("POST", "/api/v1/services/ok-one/scale", {"count": 3}, 422),
        ("POST", "/api/v1/services/ok-one/drain", {"replica": "nope"}, 404),
        ("POST", "/api/v1/services/ok-one/drain", {"deadline": -1}, 400),
        ("DELETE", "/api/v1/services/ok-one?deadline=soon", None, 400),
    ]
    for method, path, body, status in cases:
        kw: dict[str, Any] = {"data": body} if isinstance(body, bytes) else {"json": body}
        async with http.request(method, fleet.url + path, headers=headers, **kw) as resp:
            assert resp.status == status, (method, path, body, await resp.text())
            err = await resp.json()
            assert err["status"] == status and len(err["error"]) > 10, err
    async with http.post(fleet.url + "/api/v1/services", json=ok_spec, headers=headers) as r:
        assert r.status == 200, "the same spec again is a no-op"
    async with http.get(fleet.url + "/api/v1/services") as r:
        assert r.status == 401, "the API still needs the token"
    r2 = fleet.shoal("service", "create", "Bad_Name", "--", "true")
    assert r2.returncode == 2 and "bad service name" in r2.stderr
    r2 = fleet.shoal("service", "create", "x", "--check", "udp", "--", "true")
    assert r2.returncode == 2 and "bad check" in r2.stderr
    r2 = fleet.shoal("best", "nope")
    assert r2.returncode == 1 and "no service" in r2.stderr
    async with http.delete(fleet.url + "/api/v1/services/ok-one", headers=headers) as r:
        assert r.status == 204


async def test_nats_api_services(fleet: Fleet) -> None:
    import nats

    from shoal.config import ControllerConfig, load

    cfg = load(ControllerConfig, fleet.home / "controller.toml")
    nc = await nats.connect(cfg.nats.url, user=cfg.nats.user, password=cfg.nats.password,
                            user_credentials=cfg.nats.creds)
    try:
        async def call(op: str, body: dict[str, Any]) -> dict[str, Any]:
            msg = await nc.request(f"shoal.api.services.{op}", json.dumps(body).encode(),
                                   timeout=10)
            return json.loads(msg.data)  # type: ignore[no-any-return]

        spec = {"name": "natsy", "command": REPLICA, "replicas": 1, "interval": 0.2}
        reply = await call("create", spec)
        assert reply["ok"] and reply["result"]["created"], reply
        assert (await call("create", {**spec, "name": "BAD"}))["status"] == 422
        deadline = time.monotonic() + 30
        while not (reply := await call("best", {"name": "natsy"}))["ok"]:
            assert time.monotonic() < deadline, reply
            await asyncio.sleep(0.1)
        assert reply["result"]["port"] > 0
        assert [s["name"] for s in (await call("list", {}))["result"]] == ["natsy"]
        assert (await call("scale", {"name": "natsy", "replicas": 2}))["ok"]
        assert (await call("show", {"name": "nope"}))["status"] == 404
        assert (await call("remove", {"name": "natsy", "deadline": 0}))["ok"]
    finally:
        await nc.close()


async def test_probes_are_bounded_and_read_http_status() -> None:
    """No fleet: a listener that accepts and never answers fails the HTTP probe at the
    timeout; a refused port fails at once; a 500 fails; a 200 passes."""
    from shoal.controller.probes import ProbeSpec, probe

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(2)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await reader.readline()
        status = b"200 OK" if b" /ok " in line else b"500 Oops"
        writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    hung = await asyncio.start_server(mute, "127.0.0.1", 0)
    good = await asyncio.start_server(answer, "127.0.0.1", 0)
    hport = hung.sockets[0].getsockname()[1]
    gport = good.sockets[0].getsockname()[1]
    try:
        start = time.monotonic()
        r = await probe(ProbeSpec("127.0.0.1", hport, "http", "/", timeout=0.3))
        assert not r.ok and "no answer within 0.3s" in r.error
        assert time.monotonic() - start < 2
        assert (await probe(ProbeSpec("127.0.0.1", hport, "tcp", timeout=0.3))).ok
        assert (await probe(ProbeSpec("127.0.0.1", gport, "http", "/ok"))).ok
        r = await probe(ProbeSpec("127.0.0.1", gport, "http", "/bad"))
        assert not r.ok and "HTTP 500" in r.error
        hung.close()
        r = await probe(ProbeSpec("127.0.0.1", hport, "tcp", timeout=0.3))
        assert not r.ok and r.error
    finally:
        hung.close()
        good.close()
