"""Terminal capabilities open one session and nothing else; throwaway users are isolated."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest

from fleet import Fleet, wait_running
from shoal.client.aio import Client, LogChunk
from shoal.logic import tokens
from shoal.wire import messages as m


@pytest.fixture
async def client(fleet: Fleet) -> AsyncIterator[Client]:
    async with fleet.client() as c:
        yield c


@pytest.mark.tls
async def test_a_terminal_token_opens_its_session_only(fleet: Fleet, client: Client) -> None:
    a = await client.create_session(m.SessionSpec(command=["cat"], tty=True))
    b = await client.create_session(m.SessionSpec(command=["cat"], tty=True))
    key = tokens.derive_key(fleet.token)
    link = tokens.issue(key, a.id, 60, time.time())
    jar = aiohttp.CookieJar(unsafe=True)  # keep cookies for 127.0.0.1, as a browser does
    async with fleet.http(cookie_jar=jar) as http, fleet.http() as other:
        async def status(path: str, client: aiohttp.ClientSession = http) -> int:
            async with client.get(fleet.url + path, allow_redirects=False) as r:
                return r.status

        # The link opens its own session's page once; the page then lives on a cookie.
        assert await status(f"/t/{b.id}?token={link}") == 401
        assert await status(f"/api/v1/sessions/{a.id}/attach?token={link}") == 401
        async with http.get(f"{fleet.url}/t/{a.id}?token={link}", allow_redirects=False) as r:
            assert r.status == 303, "the link trades itself for a cookie and an attach key"
            location = r.headers["Location"]
        assert location.startswith(f"/t/{a.id}#attach=") and "token" not in location
        attach = location.split("#attach=", 1)[1]
        assert await status(f"/t/{a.id}?token={link}", other) == 401, "a link works once"
        assert await status(f"/t/{a.id}") == 200, "the cookie carries on"
        assert await status(f"/t/{b.id}") == 401, "the cookie is for one session"
        assert await status("/api/v1/sessions") == 401
        assert await status(f"/api/v1/sessions/{a.id}") == 401
        expired = tokens.issue(key, a.id, -1, time.time())
        assert await status(f"/t/{a.id}?token={expired}", other) == 401
        forged = tokens.issue(tokens.derive_key("not the secret"), a.id, 60, time.time())
        assert await status(f"/t/{a.id}?token={forged}", other) == 401
        # The cookie alone does not open the socket: another port of this host receives it.
        with pytest.raises(aiohttp.WSServerHandshakeError) as e:
            await http.ws_connect(f"{fleet.url}/api/v1/sessions/{a.id}/attach")
        assert e.value.status == 401
        with pytest.raises(aiohttp.WSServerHandshakeError) as e:
            await http.ws_connect(f"{fleet.url}/api/v1/sessions/{a.id}/attach?attach={'0' * 64}")
        assert e.value.status == 401
        ws = await http.ws_connect(f"{fleet.url}/api/v1/sessions/{a.id}/attach?attach={attach}")
        hello = json.loads((await ws.receive()).data)
        assert hello["t"] == "hello" and hello["session"] == a.id
        await ws.close()
        with pytest.raises(aiohttp.WSServerHandshakeError) as e:
            await http.ws_connect(f"{fleet.url}/api/v1/sessions/{a.id}/attach?attach={attach}",
                                  headers={"Origin": "http://evil.example"})
        assert e.value.status == 403
    for s in (a, b):
        await client.remove(s.id)


async def test_throwaway_users_cannot_touch_each_other(client: Client) -> None:
    if os.geteuid() != 0:
        pytest.skip("throwaway users need an agent running as root")
    victim = await wait_running(client, (await client.create_session(
        m.SessionSpec(shell="touch ~/secret; sleep 60", user="ephemeral"))).id)
    assert victim.user.startswith("shoal-")
    home = f"/home/{victim.user}"
    assert oct(os.stat(home).st_mode & 0o777) == "0o700"
    attacker = await client.create_session(m.SessionSpec(
        shell=f"ls {home} 2>&1; cat {home}/secret 2>&1; kill -9 {victim.pid} 2>&1; id",
        user="ephemeral"))
    done = await client.wait(attacker.id)
    out = b"".join([e.data async for e in client.logs(done.id) if isinstance(e, LogChunk)])
    assert b"Permission denied" in out and b"Operation not permitted" in out
    assert b"groups=" in out and b"sudo" not in out and b"root" not in out
    assert (await client.session(victim.id)).state == "running"
    await client.remove(victim.id)
    await client.remove(done.id)
    for _ in range(100):
        if not os.path.exists(home):
            break
        await asyncio.sleep(0.1)
    assert not os.path.exists(home)
