"""Public terminals' output lives in a stream of its own: however much anonymous visitors
print, the stored output of other sessions stays."""

from __future__ import annotations

from collections.abc import Iterator

import aiohttp
import nats
import pytest

from conftest import start_fleet
from fleet import Fleet
from shoal.client.aio import Client, LogChunk, LogTruncated
from shoal.config import ControllerConfig, load
from shoal.errors import ValidationError
from shoal.natsio import bus, outputlog
from shoal.wire import messages as m

TERMINAL_BYTES = 4 << 20
TERMINAL_CAP = 1 << 20


@pytest.fixture(scope="module")
def pool(request: pytest.FixtureRequest) -> Iterator[Fleet]:
    f = start_fleet(request, "pool", agents=1, extra_args=("--public-terminals",),
                    env={"SHOAL_TERMINAL_OUTPUT_BYTES": str(TERMINAL_BYTES),
                         "SHOAL_TERMINAL_OUTPUT_CAP": str(TERMINAL_CAP)})
    try:
        yield f
    finally:
        f.stop()


async def _controller_nc(fleet: Fleet) -> nats.aio.client.Client:
    # controller.toml: its NATS password, and its client certificate on a TLS fleet
    return await bus.connect(load(ControllerConfig, fleet.home / "controller.toml").nats,
                             "test")


async def _stored(client: Client, sid: str) -> tuple[int, bool]:
    """Bytes of a session's output still readable, and whether any were dropped."""
    size, truncated = 0, False
    async for event in client.logs(sid):
        if isinstance(event, LogChunk):
            size += len(event.data)
        elif isinstance(event, LogTruncated):
            truncated = True
    return size, truncated


@pytest.mark.tls
async def test_public_terminal_output_cannot_evict_other_sessions_output(pool: Fleet) -> None:
    async with pool.client() as client:
        normal = await client.create_session(m.SessionSpec(
            shell="head -c 300000 /dev/urandom | base64 -w 76"))
        normal = await client.wait(normal.id)
        assert normal.state == "exited" and normal.output_bytes > 400_000
        assert await _stored(client, normal.id) == (normal.output_bytes, False)

        # The shared stream as good as full: what anyone adds now pushes out the oldest.
        nc = await _controller_nc(pool)
        try:
            js = nc.jetstream()
            info = await js.stream_info("shoal-output")
            info.config.max_bytes = info.state.bytes + (256 << 10)
            await js.update_stream(config=info.config)

            # An anonymous visitor prints about 6 MB in a public terminal.
            jar = aiohttp.CookieJar(unsafe=True)
            async with pool.http(cookie_jar=jar) as http:
                async with http.post(pool.url + "/terminal", json={}) as r:
                    assert r.status == 201, await r.text()
                    sid, url = (await r.json())["session"], (await r.json())["url"]
                async with http.get(pool.url + url, allow_redirects=False) as r:
                    assert r.status == 303  # to the page, the attach key in the fragment
                    key = r.headers["Location"].split("#attach=", 1)[1]
                async with http.ws_connect(
                        f"{pool.url}/api/v1/sessions/{sid}/attach?attach={key}") as ws:
                    sent = False
                    async for msg in ws:
                        if msg.type == aiohttp.WSMsgType.BINARY and not sent:  # the prompt
                            sent = True
                            await ws.send_bytes(
                                b"head -c 4500000 /dev/zero | base64 -w 100; exit\n")
                        if msg.type == aiohttp.WSMsgType.TEXT and '"t":"exit"' in msg.data:
                            break
            done = await client.wait(sid, timeout=60)
            assert done.output_bytes > 6_000_000, done

            assert await _stored(client, normal.id) == (normal.output_bytes, False), \
                "the terminal's output evicted another session's stored output"
            # The terminals' own stream is bounded, and so is each terminal in it.
            terminals = await js.stream_info("shoal-terminal-output")
            assert terminals.config.max_bytes == TERMINAL_BYTES
            assert terminals.state.bytes <= TERMINAL_BYTES
            kept, truncated = await _stored(client, sid)
            # (the cap drops whole chunks: up to one chunk more than the cap stays)
            assert truncated and kept <= TERMINAL_CAP + outputlog.MERGE_UP_TO, kept
        finally:
            await nc.close()


async def test_terminal_ids_are_kept_for_the_pool(pool: Fleet) -> None:
    async with pool.client() as client:
        with pytest.raises(ValidationError, match="kept for the terminal pool"):
            await client.create_session(m.SessionSpec(id="t_mine", command=["true"]))
        assert [s for s in await client.sessions() if s.id == "t_mine"] == []
