"""The controller's web surface: browser logins (a session id in the cookie, a CSRF token on
every API call, Origin and JSON on state changes, logout), the Host check, security headers,
and the public terminal line's fairness (bad tickets, per-client cap, rate limit first)."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest

from fleet import Fleet


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    # unsafe=True keeps cookies for 127.0.0.1, as a browser does
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:
        yield s


async def log_in(http: aiohttp.ClientSession, url: str, token: str) -> tuple[str, str]:
    """Open the login link as a browser would; returns (cookie value, CSRF token)."""
    async with http.get(f"{url}/?token={token}", allow_redirects=False) as r:
        assert r.status == 302, await r.text()
        location = r.headers["Location"]
    assert "token" not in location
    found = re.fullmatch(r"/#csrf=([0-9a-f]+)", location)
    assert found, location
    cookie = {c.key: c.value for c in http.cookie_jar}
    assert set(cookie) == {"shoal_login"}, cookie
    return cookie["shoal_login"], found.group(1)


def names(fleet: Fleet) -> set[str]:
    r = fleet.shoal("session", "list", "--json")
    assert r.returncode == 0, r.stderr
    return {s["name"] for s in json.loads(r.stdout)}


async def test_the_cookie_is_a_login_not_the_token(fleet: Fleet,
                                                   http: aiohttp.ClientSession) -> None:
    cookie, csrf = await log_in(http, fleet.url, fleet.token)
    assert cookie != fleet.token and fleet.token not in cookie
    async with aiohttp.ClientSession() as bare:
        async with bare.get(f"{fleet.url}/api/v1/nodes",
                            headers={"Authorization": f"Bearer {cookie}"}) as r:
            assert r.status == 401, "the cookie's value is no bearer token"
        # Replaying the cookie alone (what a listener on another port receives) opens nothing
        async with bare.get(f"{fleet.url}/api/v1/sessions",
                            headers={"Cookie": f"shoal_login={cookie}"}) as r:
            assert r.status == 403
    async with http.get(f"{fleet.url}/", allow_redirects=False) as r:
        assert r.status == 200, "pages need only the cookie"
    async with http.get(f"{fleet.url}/api/v1/nodes") as r:
        assert r.status == 403 and "X-Shoal-CSRF" in (await r.json())["error"]
    async with http.get(f"{fleet.url}/api/v1/nodes", headers={"X-Shoal-CSRF": csrf}) as r:
        assert r.status == 200
    async with http.get(f"{fleet.url}/api/v1/nodes", headers={"X-Shoal-CSRF": "0" * 64}) as r:
        assert r.status == 403


async def test_state_changes_need_csrf_origin_and_json(fleet: Fleet,
                                                       http: aiohttp.ClientSession) -> None:
    _, csrf = await log_in(http, fleet.url, fleet.token)
    own = {"Origin": fleet.url}
    spec = json.dumps({"name": "", "command": ["true"]})

    async def create(name: str, headers: dict[str, str], ctype: str) -> tuple[int, Any]:
        body = spec.replace('"name": ""', f'"name": "{name}"')
        async with http.post(f"{fleet.url}/api/v1/sessions", data=body,
                             headers={"Content-Type": ctype, **headers}) as r:
            return r.status, await r.json()

    status, answer = await create("no-csrf", own, "application/json")
    assert status == 403 and "X-Shoal-CSRF" in answer["error"]
    status, answer = await create("foreign", {**own, "X-Shoal-CSRF": csrf,
                                              "Origin": "http://127.0.0.1:1"},
                                  "application/json")
    assert status == 403 and "Origin" in answer["error"]
    status, answer = await create("no-origin", {"X-Shoal-CSRF": csrf}, "application/json")
    assert status == 403
    status, answer = await create("text", {**own, "X-Shoal-CSRF": csrf}, "text/plain")
    assert status == 415 and "application/json" in answer["error"]
    status, answer = await create("form", {**own, "X-Shoal-CSRF": csrf},
                                  "application/x-www-form-urlencoded")
    assert status == 415
    assert not names(fleet) & {"no-csrf", "foreign", "no-origin", "text", "form"}
    # All three together: the dashboard's own request works (also without Origin, on
    # the word of Sec-Fetch-Site).
    status, answer = await create("web-ok", {**own, "X-Shoal-CSRF": csrf}, "application/json")
    assert status == 201, answer
    status, answer = await create("web-ok-2", {"Sec-Fetch-Site": "same-origin",
                                               "X-Shoal-CSRF": csrf}, "application/json")
    assert status == 201, answer
    # Bearer clients are unchanged: no Origin, no CSRF.
    async with aiohttp.ClientSession() as bare:
        async with bare.post(f"{fleet.url}/api/v1/sessions", data=spec.replace(
                '"name": ""', '"name": "bearer-ok"'),
                headers={"Authorization": f"Bearer {fleet.token}"}) as r:
            assert r.status == 201, await r.text()
    assert {"web-ok", "web-ok-2", "bearer-ok"} <= names(fleet)


async def test_a_cookie_websocket_needs_csrf_and_our_origin(
        fleet: Fleet, http: aiohttp.ClientSession) -> None:
    _, csrf = await log_in(http, fleet.url, fleet.token)
    url = fleet.url.replace("http", "ws") + "/api/v1/run"
    for query, origin in (("", fleet.url), (f"?csrf={csrf}", "http://127.0.0.1:1"),
                          (f"?csrf={csrf}", None)):
        with pytest.raises(aiohttp.WSServerHandshakeError) as e:
            await http.ws_connect(url + query, headers={"Origin": origin} if origin else {})
        assert e.value.status == 403, (query, origin)
    ws = await http.ws_connect(f"{url}?csrf={csrf}", headers={"Origin": fleet.url})
    await ws.close()


async def test_logout_ends_the_login_on_every_controller(
        fleet: Fleet, http: aiohttp.ClientSession) -> None:
    other, other_url = fleet.controller()
    try:
        cookie, csrf = await log_in(http, fleet.url, fleet.token)
        headers = {"X-Shoal-CSRF": csrf}
        for url in (fleet.url, other_url):  # the login is in a bucket every controller reads
            async with http.get(f"{url}/api/v1/nodes", headers=headers) as r:
                assert r.status == 200
        async with http.post(f"{other_url}/api/v1/logout", data="{}", headers={
                **headers, "Origin": other_url, "Content-Type": "application/json"}) as r:
            assert r.status == 204
        async with aiohttp.ClientSession() as bare:
            for url in (fleet.url, other_url):
                async with bare.get(f"{url}/api/v1/nodes", headers={
                        **headers, "Cookie": f"shoal_login={cookie}"}) as r:
                    assert r.status == 401, "the login is over"
    finally:
        other.terminate()
        other.wait(30)


async def test_host_check(fleet: Fleet) -> None:
    port = fleet.url.rsplit(":", 1)[1]
    auth = {"Authorization": f"Bearer {fleet.token}"}
    async with aiohttp.ClientSession() as bare:
        for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.nip.io", ""):
            for method, path in (("GET", "/api/v1/nodes"), ("POST", "/terminal"),
                                 ("GET", "/"), ("GET", "/s/anything/")):
                async with bare.request(method, fleet.url + path,
                                        headers={**auth, "Host": host}) as r:
                    assert r.status == 421, (host, path, r.status)
                    assert "allowed_hosts" in (await r.json())["error"]
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST", f"[::1]:{port}",
                     "127.0.0.2"):
            async with bare.get(fleet.url + "/api/v1/nodes",
                                headers={**auth, "Host": host}) as r:
                assert r.status == 200, host


async def test_security_headers_on_every_answer(fleet: Fleet) -> None:
    auth = {"Authorization": f"Bearer {fleet.token}"}
    async with aiohttp.ClientSession() as bare:
        for path, headers, status in (("/", auth, 200), ("/terminal", auth, 200),
                                      ("/", {}, 401), ("/api/v1/nodes", auth, 200),
                                      ("/api/v1/nope", auth, 404), ("/nope", auth, 404),
                                      ("/static/dashboard.js", {}, 200)):
            async with bare.get(fleet.url + path, headers=headers) as r:
                assert r.status == status, path
                csp = r.headers.get("Content-Security-Policy", "")
                assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp, path
                assert r.headers.get("X-Content-Type-Options") == "nosniff", path
                assert r.headers.get("Referrer-Policy") == "no-referrer", path


# ---------------------------------------------------------------------- the terminal line


@pytest.fixture(scope="module")
def line(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """One slot, public terminals, one terminal a minute per client; clients told apart by
    X-Forwarded-For from a trusted proxy (127.0.0.1, i.e. the test)."""
    f = Fleet(tmp_path_factory.mktemp("line") / "home", agents=1,
              extra_args=("--capacity", "1", "--public-terminals"))
    f.env.update(SHOAL_TERMINAL_RATE="1", SHOAL_TRUSTED_PROXIES="127.0.0.1")
    f.start()
    try:
        yield f
    finally:
        f.stop()


async def enter(url: str, client: str, ticket: str = "") -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{url}/terminal", json={"ticket": ticket} if ticket else {},
                          headers={"X-Forwarded-For": client}) as r:
            return r.status, await r.json()


async def test_bad_tickets_are_4xx(line: Fleet) -> None:
    async with aiohttp.ClientSession() as s:
        for body in ('{"ticket": "<b>x"}', '{"ticket": "a.b"}', '{"ticket": 5}', "[",
                     '{"ticket": "' + "a" * 65 + '"}'):
            async with s.post(f"{line.url}/terminal", data=body,
                              headers={"Content-Type": "application/json"}) as r:
                assert 400 <= r.status < 500, (body, r.status, await r.text())
                assert "error" in await r.json()
        async with s.post(f"{line.url}/terminal", data={"ticket": "<b>x"}) as r:
            assert r.status == 400


async def test_a_rate_limited_visitor_leaves_the_line(line: Fleet) -> None:
    status, a = await enter(line.url, "10.0.0.1")
    assert status == 201, a
    # The slot is taken and 10.0.0.1 has used its one terminal of the minute: it gets no
    # place in line at all, so the next visitor is first.
    status, again = await enter(line.url, "10.0.0.1")
    assert status == 429 and again["state"] == "limited"
    status, b = await enter(line.url, "10.0.0.2")
    assert status == 503 and b["position"] == 1, b
    # A ticket this pool never issued holds no place: a fresh one comes back.
    status, made_up = await enter(line.url, "10.0.0.9", ticket="my-own-ticket")
    assert status == 503 and made_up["ticket"] != "my-own-ticket" and made_up["position"] == 2
    assert line.shoal("session", "kill", a["session"]).returncode == 0
    for _ in range(120):  # the waiting visitor polls, and is first in line all along
        status, b = await enter(line.url, "10.0.0.2", b["ticket"])
        if status == 201:
            break
        assert status == 503 and b["position"] == 1, b
        await asyncio.sleep(0.25)
    assert status == 201, b
    line.shoal("session", "kill", b["session"])


async def test_one_client_holds_a_few_places_only(line: Fleet) -> None:
    status, a = await enter(line.url, "10.0.1.1")
    if status == 201:  # take the slot, so that everyone after waits
        hold = a["session"]
    else:
        hold = ""
    tickets = []
    for _ in range(4):
        status, w = await enter(line.url, "2001:db8:1:2::10")
        assert status == 503 and w["state"] == "waiting", w
        tickets.append(w["ticket"])
    # Another address in the same IPv6 /64 is the same client.
    status, w = await enter(line.url, "2001:db8:1:2:ffff::1")
    assert status == 429 and "places in line" in w["message"], w
    # Polling with a ticket it holds still works; another /64 is someone else.
    status, w = await enter(line.url, "2001:db8:1:2::10", tickets[0])
    assert status == 503 and w["ticket"] == tickets[0]
    status, w = await enter(line.url, "2001:db8:1:3::10")
    assert status == 503 and w["state"] == "waiting"
    if hold:
        line.shoal("session", "kill", hold)


async def test_the_waiting_page_is_escaped_and_under_the_csp(line: Fleet) -> None:
    status, a = await enter(line.url, "10.0.2.1")
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{line.url}/terminal", data={"ticket": ""},
                          headers={"X-Forwarded-For": "10.0.2.2"}) as r:
            assert r.status == 503 and r.content_type == "text/html"
            assert "script-src 'self'" in r.headers["Content-Security-Policy"]
            page = await r.text()
    found = re.search(r'name=ticket value="([A-Za-z0-9_-]+)"', page)
    assert found, page
    if status == 201:
        line.shoal("session", "kill", a["session"])
