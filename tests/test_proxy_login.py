"""Login through a trusted reverse proxy (controller/proxyauth.py): a proxy that has
authenticated a person names them in ``X-Remote-User``; the controller believes it only from
an address in ``trusted_proxies``.

The proxy here is a real HTTP reverse proxy (aiohttp, in a thread of the test) that connects
to the controller from 127.0.0.2, the one trusted address; everything else in the tests,
browser and forgers alike, connects from 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from playwright.sync_api import Browser

from fleet import Fleet
from shoal.config import ControllerConfig
from shoal.controller.proxyauth import ProxyAuth
from shoal.errors import ConfigError
from test_browser import browser  # noqa: F401 - the fixture: the same chromium

HEADER = "X-Remote-User"
PROXY_ADDRESS = "127.0.0.2"
HOP = {"connection", "keep-alive", "transfer-encoding", "te", "upgrade", "content-length",
       "content-encoding", "host"}
# Configured: carol may create sessions; anyone else the proxy names gets the default, read.
PROXY_ENV = {"SHOAL_TRUSTED_PROXIES": PROXY_ADDRESS, "SHOAL_PROXY_USER_HEADER": HEADER,
             "SHOAL_PROXY_USERS": "carol=read sessions"}


class AuthProxy:
    """A reverse proxy that says who its user is: it drops any X-Remote-User a client sent
    and sets its own (``user``; None: nobody logged in at the proxy)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.user: str | None = None
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.url = ""

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() not in HOP and k.lower() != HEADER.lower()}
        headers["Host"] = request.host  # as nginx's proxy_set_header Host $host
        headers["X-Forwarded-For"] = request.remote or ""
        if self.user is not None:
            headers[HEADER] = self.user
        async with self.session.request(request.method, self.upstream + str(request.rel_url),
                                        headers=headers, data=await request.read(),
                                        allow_redirects=False) as up:
            resp = web.Response(status=up.status, body=await up.read())
            for k, v in up.headers.items():
                if k.lower() not in HOP:
                    resp.headers.add(k, v)
            return resp

    async def _start(self) -> None:
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(
            local_addr=(PROXY_ADDRESS, 0)))
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    async def _stop(self) -> None:
        await self.session.close()
        await self.runner.cleanup()

    def __enter__(self) -> AuthProxy:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def controller_url(fleet: Fleet) -> Iterator[str]:
    """One more controller of the fleet, with proxy login on."""
    p, url = fleet.controller(env=PROXY_ENV)
    try:
        yield url
    finally:
        p.terminate()
        p.wait(30)


@pytest.fixture
def proxy(controller_url: str) -> Iterator[AuthProxy]:
    with AuthProxy(controller_url) as p:
        yield p


async def _log_in(http: aiohttp.ClientSession, url: str) -> str:
    """Open the dashboard through ``url``; the login's CSRF token from the redirect."""
    async with http.get(url + "/", allow_redirects=False) as r:
        assert r.status == 302, await r.text()
        return r.headers["Location"].split("#csrf=", 1)[1]


def _audit(fleet: Fleet, user: str) -> list[dict[str, Any]]:
    r = fleet.shoal("audit", "--user", user, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


async def test_a_forged_user_header_is_ignored_from_an_untrusted_peer(
        controller_url: str, proxy: AuthProxy) -> None:
    """A client that reaches the controller directly and names itself in the header gets
    nothing: no login, 401 on the API, for any user name (admin too)."""
    for user in ("carol", "admin"):
        forged = {HEADER: user}
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            async with http.get(controller_url + "/", headers=forged,
                                allow_redirects=False) as r:
                assert r.status == 401 and "Set-Cookie" not in r.headers
            for path in ("/api/v1/whoami", "/api/v1/sessions"):
                async with http.get(controller_url + path, headers=forged) as r:
                    assert r.status == 401, path
            async with http.post(controller_url + "/api/v1/sessions", headers=forged,
                                 json={"command": ["true"]}) as r:
                assert r.status == 401


async def test_the_header_alone_does_not_open_the_api(proxy: AuthProxy) -> None:
    """From the trusted proxy too, the API needs the login's CSRF token: the proxy adds the
    header to a cross-site request as well, as a browser adds a cookie."""
    proxy.user = "carol"
    async with aiohttp.ClientSession() as http:  # no cookies: each request on its own
        async with http.get(proxy.url + "/api/v1/whoami") as r:
            assert r.status == 401
        async with http.post(proxy.url + "/api/v1/sessions", json={"command": ["true"]}) as r:
            assert r.status == 401


async def test_a_proxy_user_gets_the_configured_scopes(fleet: Fleet, controller_url: str,
                                                       proxy: AuthProxy) -> None:
    proxy.user = "alice"  # nobody configured her: the default, read
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar) as http:
        csrf = await _log_in(http, proxy.url)
        api = {"X-Shoal-CSRF": csrf, "Origin": proxy.url}
        async with http.get(proxy.url + "/api/v1/whoami", headers=api) as r:
            me = await r.json()
            assert (me["user"], me["token"], me["scopes"]) == ("alice", "proxy", ["read"])
        async with http.post(proxy.url + "/api/v1/sessions", headers=api,
                             json={"command": ["true"]}) as r:
            assert r.status == 403 and "'sessions' scope" in (await r.json())["error"]
        # Around the proxy, the same cookie and CSRF token open nothing.
        async with http.get(controller_url + "/api/v1/whoami",
                            headers={"X-Shoal-CSRF": csrf}) as r:
            assert r.status == 401
        # The proxy now names someone else (alice logged out there): her login is over.
        proxy.user = "mallory"
        async with http.get(proxy.url + "/api/v1/whoami", headers=api) as r:
            assert r.status == 401
        proxy.user = None
        async with http.get(proxy.url + "/", allow_redirects=False) as r:
            assert r.status == 401
    entries = _audit(fleet, "alice")
    assert [(e["op"], e["token"], e["status"]) for e in entries] == [
        ("login", "proxy", 302), ("sessions.create", "proxy", 403)]
    assert {e["source"] for e in entries} == {"127.0.0.1"}  # the browser's, from the proxy


def test_the_browser_logs_in_through_the_proxy(fleet: Fleet, proxy: AuthProxy,
                                               browser: Browser) -> None:  # noqa: F811
    """The dashboard shows the proxy's user with her configured scopes; what she does is
    audited as hers."""
    proxy.user = "carol"
    context = browser.new_context(bypass_csp=True)  # for the string predicates only
    page = context.new_page()
    page.goto(proxy.url + "/")
    assert page.url.startswith(proxy.url) and "csrf" not in page.url
    page.wait_for_function("document.getElementById('who').textContent.includes('carol')",
                           timeout=20000)
    assert page.locator("#who").inner_text() == "carol (read sessions)"
    page.wait_for_function("window.shoalDashboard && window.shoalDashboard.nodes().length >= 2",
                           timeout=20000)
    status = page.evaluate("""async () => (await fetch("/api/v1/sessions", {method: "POST",
        headers: {"Content-Type": "application/json", "X-Shoal-CSRF": window.shoalLogin.csrf()},
        body: JSON.stringify({name: "by-carol", command: ["true"]})})).status""")
    assert status == 201
    context.close()
    entries = _audit(fleet, "carol")
    created = [e for e in entries if e["op"] == "sessions.create"]
    assert created and created[-1]["token"] == "proxy" and created[-1]["result"] == "ok"
    assert any(e["op"] == "login" for e in entries)


def test_settings_that_cannot_work_are_clear_errors() -> None:
    assert ProxyAuth.from_config(ControllerConfig(token="t")) is None  # off by default
    with pytest.raises(ConfigError, match="trusted_proxies is empty"):
        ProxyAuth.from_config(ControllerConfig(token="t", proxy_user_header=HEADER))
    with pytest.raises(ConfigError, match="proxy_user_scopes / proxy_users"):
        ProxyAuth.from_config(ControllerConfig(
            token="t", proxy_user_header=HEADER, trusted_proxies=[PROXY_ADDRESS],
            proxy_users={"bob": ["nonsense"]}))
