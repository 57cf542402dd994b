"""Service traffic on an origin of its own, and what a replica may see of it: a hostile
replica page cannot read the API with the operator's login; no shoal credential reaches a
replica; the target goes through byte for byte; hop-by-hop and forged forwarding headers
are dropped; a replica record forged with the agent credential gets no traffic."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import msgspec
import nats
import pytest
from aiohttp import web
from playwright.sync_api import Browser, sync_playwright

from fleet import Fleet
from shoal.client.aio import Client
from shoal.config import ControllerConfig, load
from shoal.natsio import bus
from shoal.wire import messages as m
from shoal.wire import servicetypes as st
from shoal.wire.subjects import SESSIONS_BUCKET
from test_browser import ARGS, CHROMIUM
from test_services import wait_up

ECHO = [sys.executable, str(Path(__file__).with_name("echo_replica.py"))]
FAST = {"interval": 0.2, "timeout": 0.5}


@pytest.fixture(scope="module")
def echo(fleet: Fleet) -> Iterator[Fleet]:
    """The fleet with service ``echo`` (one proxied echo_replica.py) up."""
    async def setup() -> None:
        async with Client(fleet.url, fleet.token) as c:
            await c.create_service(st.ServiceSpec(name="echo", command=ECHO, replicas=1,
                                                  check="http:/health", proxy=True, **FAST))
            await wait_up(c, "echo", 1)

    asyncio.run(setup())
    yield fleet
    r = fleet.shoal("service", "rm", "echo", "--deadline", "0")
    assert r.returncode == 0, r.stderr


@pytest.fixture
async def client(fleet: Fleet) -> AsyncIterator[Client]:
    async with Client(fleet.url, fleet.token) as c:
        yield c


async def raw_get(base: str, target: str, headers: list[tuple[str, str]] = [],  # noqa: B006
                  ) -> tuple[int, list[tuple[str, str]], bytes]:
    """One HTTP/1.1 GET written by hand: the target and headers exactly as given."""
    url = urlsplit(base)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    lines = [f"GET {target} HTTP/1.1", f"Host: {url.netloc}", *[f"{k}: {v}" for k, v in headers]]
    if not any(k.lower() == "connection" for k, _ in headers):
        lines.append("Connection: close")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parsed = [(k.strip(), v.strip()) for k, v in (h.split(":", 1) for h in header_lines)]
    return int(status_line.split()[1]), parsed, body


async def seen_by_replica(fleet: Fleet, target: str,
                          headers: list[tuple[str, str]] = []) -> dict[str, Any]:  # noqa: B006
    status, _, body = await raw_get(fleet.services_url, target, headers)
    assert status == 200, body
    seen: dict[str, Any] = json.loads(body)
    return seen


def header_names(seen: dict[str, Any]) -> set[str]:
    return {k.lower() for k, _ in seen["headers"]}


def header(seen: dict[str, Any], name: str) -> list[str]:
    return [v for k, v in seen["headers"] if k.lower() == name.lower()]


# ---------------------------------------------------------------------- the origin


def test_a_replica_page_cannot_read_the_api_with_the_operators_login(echo: Fleet) -> None:
    fleet = echo
    assert os.path.exists(CHROMIUM), "chromium is missing: scripts/test-deps.sh installs it"
    with sync_playwright() as p:
        browser: Browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS,
                                             headless=True)
        try:
            page = browser.new_page()
            page.goto(f"{fleet.url}/?token={fleet.token}")  # the operator logs in
            page.wait_for_function("window.shoalLogin && window.shoalLogin.csrf() !== ''")
            nodes = page.evaluate("fetch('/api/v1/nodes', {headers: shoalLogin.headers()})"
                                  ".then(r => r.text())")
            assert "node-1" in nodes, "the browser holds a working login"
            # The operator opens a service link on the controller; the replica's page runs.
            page.goto(f"{fleet.url}/s/echo/page?api={fleet.url}")
            page.wait_for_function("document.title === 'done'", timeout=20000)
            out = page.locator("#out").inner_text()
            assert "node-1" not in out and "node-2" not in out, out
            assert "blocked" in out, out  # the controller's API is another origin
            assert urlsplit(page.url).port != urlsplit(fleet.url).port, page.url
        finally:
            browser.close()


async def test_the_controller_only_redirects_service_paths(echo: Fleet) -> None:
    fleet = echo
    status, headers, _ = await raw_get(fleet.url, "/s/echo/a%3Fb%3D1?x=%2F")
    location = dict((k.lower(), v) for k, v in headers).get("location")
    assert status == 307 and location == f"{fleet.services_url}/s/echo/a%3Fb%3D1?x=%2F"
    assert urlsplit(fleet.services_url).port != urlsplit(fleet.url).port
    # Nothing but services on the services listener.
    status, _, body = await raw_get(fleet.services_url, "/api/v1/nodes",
                                    [("Authorization", f"Bearer {fleet.token}")])
    assert status == 404 and b"node-1" not in body


async def test_the_services_listener_answers_only_for_its_names(echo: Fleet) -> None:
    url = urlsplit(echo.services_url)
    for host, expected in ((f"evil.example:{url.port}", 421), (url.netloc, 200)):
        reader, writer = await asyncio.open_connection(url.hostname, url.port)
        writer.write(f"GET /s/echo/x HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
                     .encode())
        data = await asyncio.wait_for(reader.read(), 30)
        writer.close()
        assert int(data.split(b" ", 2)[1]) == expected, data[:300]


# ---------------------------------------------------------------------- what a replica sees


async def test_no_shoal_credential_reaches_a_replica(echo: Fleet) -> None:
    fleet = echo
    seen = await seen_by_replica(fleet, "/s/echo/x", [
        ("Authorization", f"Bearer {fleet.token}"),
        ("Cookie", f"shoal_token={fleet.token}; app=1; shoal_t_s-abc=cap; "
                   "shoal_login=x; __Host-shoal_session=y; other=2"),
    ])
    assert "authorization" not in header_names(seen), seen
    assert header(seen, "Cookie") == ["app=1; other=2"], seen
    assert fleet.token not in json.dumps(seen)
    # A replica cannot plant a shoal cookie (cookies are per host, so it would reach the
    # controller); its own cookies go through.
    _, answer, _ = await raw_get(fleet.services_url, "/s/echo/x")
    cookies = [v for k, v in answer if k.lower() == "set-cookie"]
    assert cookies == ["app=1; Path=/"], answer


@pytest.mark.parametrize("tail", [
    "/a%3Fb%3D1",
    "/%252e%252e%252f",
    "/x/%2e%2e/%2F/y%41%7e?q=%20+&z=%3D&w=a%26b",
    "/double//slashes//",  # (http.server folds a leading "//" itself)
    "/?only=query",
])
async def test_the_target_reaches_the_replica_byte_for_byte(echo: Fleet, tail: str) -> None:
    seen = await seen_by_replica(echo, "/s/echo" + tail)
    assert seen["target"] == tail


async def test_hop_by_hop_headers_are_dropped_both_ways(echo: Fleet) -> None:
    seen = await seen_by_replica(echo, "/s/echo/hop", [
        ("Connection", "close, X-Client-Hop"), ("X-Client-Hop", "secret"),
        ("Keep-Alive", "timeout=5"), ("TE", "trailers"), ("Proxy-Authorization", "Basic x"),
        ("X-Kept", "yes"),
    ])
    names = header_names(seen)
    assert not names & {"x-client-hop", "keep-alive", "te", "proxy-authorization"}, seen
    assert header(seen, "X-Kept") == ["yes"]
    _, answer, _ = await raw_get(echo.services_url, "/s/echo/hop")
    assert "x-replica-hop" not in {k.lower() for k, _ in answer}, answer


async def test_a_spoofed_x_forwarded_for_is_replaced(echo: Fleet) -> None:
    seen = await seen_by_replica(echo, "/s/echo/xff", [
        ("X-Forwarded-For", "6.6.6.6"), ("X-Forwarded-Host", "evil.example"),
        ("X-Forwarded-Proto", "https"), ("Forwarded", "for=6.6.6.6"), ("X-Real-IP", "6.6.6.6"),
    ])
    assert header(seen, "X-Forwarded-For") == ["127.0.0.1"], seen
    assert header(seen, "X-Forwarded-Host") == [urlsplit(echo.services_url).netloc]
    assert header(seen, "X-Forwarded-Proto") == ["http"]
    assert header(seen, "X-Forwarded-Prefix") == ["/s/echo"]
    assert not header_names(seen) & {"forwarded", "x-real-ip"}, seen


# ---------------------------------------------------------------------- forged records


async def _planting_kv(fleet: Fleet) -> tuple[nats.aio.client.Client, Any]:
    """The sessions bucket through the controllers' own NATS credential: no agent
    credential reaches it any more (test_node_identity, test_nats_security), so a forged
    record can only come from a holder of that one, and the seal still stops it."""
    nc = await bus.connect(load(ControllerConfig, fleet.home / "controller.toml").nats, "test")
    return nc, await nc.jetstream().key_value(SESSIONS_BUCKET)


async def test_a_forged_replica_gets_no_traffic(echo: Fleet, client: Client) -> None:
    fleet = echo
    hits: list[str] = []

    async def rogue_answer(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(text="ok\n" if request.path == "/health" else "rogue\n")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", rogue_answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    real = await wait_up(client, "echo", 1)
    nc, kv = await _planting_kv(fleet)
    try:
        # Written past the controllers' code: a running replica of echo at the rogue's port.
        spec = m.SessionSpec(id="echo-forged", command=["true"], service="echo", ports=1,
                             restart="always", labels={"shoal.service": "echo"})
        forged = m.SessionRecord(id="echo-forged", spec=spec, state="running", node="node-1",
                                 ports=[port], address="127.0.0.1", created=time.time(),
                                 started=time.time(), seal="0" * 64)
        await kv.put("echo-forged", msgspec.json.encode(forged))
        await asyncio.sleep(2)  # several syncs and probe intervals
        for _ in range(30):
            _, _, body = await raw_get(fleet.services_url, "/s/echo/who")
            assert b"rogue" not in body and json.loads(body)["target"] == "/who", body
        assert hits == [], "the forged replica was probed or got traffic"
        view = await client.service("echo")
        assert [r.id for r in view.replicas] == [r.id for r in real.replicas], view
        # The terminal path refuses a forged record too.
        async with aiohttp.ClientSession() as http:
            with pytest.raises(aiohttp.WSServerHandshakeError) as e:
                await http.ws_connect(f"{fleet.url}/api/v1/sessions/echo-forged/attach",
                                      headers={"Authorization": f"Bearer {fleet.token}"})
            assert e.value.status == 409
    finally:
        await kv.delete("echo-forged")
        await nc.close()
        await runner.cleanup()
