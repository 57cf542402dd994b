"""Container sessions end to end: a real fleet whose agent runs `runtime = "container"`
sessions with real podman and runc, in a private image store holding an image built here,
offline (tests/test_containers.py's busybox image)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from fleet import Fleet, wait_for, wait_running
from shoal.agent.containers import Podman
from shoal.client.aio import Client, LogChunk
from shoal.errors import NotFoundError, ValidationError
from shoal.wire import messages as m
from shoal.wire import servicetypes as st
from test_containers import IMAGE, needs_podman, podman  # noqa: F401 - the fixture

pytestmark = needs_podman
CNODE = "cnode"  # runs containers
PNODE = "pnode"  # podman turned off


def agent_env(pod: Podman, mounts: Path) -> dict[str, str]:
    assert pod.root is not None and pod.runroot is not None
    return {"SHOAL_PODMAN_ROOT": pod.root, "SHOAL_PODMAN_RUNROOT": pod.runroot,
            "SHOAL_CONTAINER_MOUNTS": str(mounts)}


@pytest.fixture(scope="module")
def mounts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mounts")


@pytest.fixture(scope="module")
def cfleet(tmp_path_factory: pytest.TempPathFactory, podman: Podman,  # noqa: F811
           mounts: Path) -> Iterator[Fleet]:
    f = Fleet(tmp_path_factory.mktemp("cfleet") / "home", agents=0).start()
    try:
        f.agent(CNODE, env=agent_env(podman, mounts))
        f.agent(PNODE, env={"SHOAL_PODMAN": ""})
        yield f
    finally:
        f.stop()


@pytest.fixture
async def client(cfleet: Fleet) -> AsyncIterator[Client]:
    async with Client(cfleet.url, cfleet.token) as c:
        yield c


def cspec(**kw: Any) -> m.SessionSpec:
    return m.SessionSpec(runtime="container", image=IMAGE, **kw)


async def output(client: Client, sid: str, stream: str = "stdout") -> bytes:
    return b"".join(c.data for c in [e async for e in client.logs(sid)]
                    if isinstance(c, LogChunk) and c.stream == stream)


def containers(pod: Podman) -> list[str]:
    out = subprocess.run([*pod.base(), "ps", "--all", "--format", "{{.Names}}"],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    return [n for n in out.split() if n.startswith(f"shoal-{CNODE}")]


def test_nodes_say_which_can_run_containers(cfleet: Fleet) -> None:
    nodes = cfleet.nodes()
    assert nodes[CNODE]["containers"] is True
    assert nodes[PNODE]["containers"] is False
    assert "turned off" in nodes[PNODE]["containers_reason"]
    table = cfleet.shoal("nodes").stdout
    assert re.search(r"cnode .* podman ", table) and not re.search(r"pnode .* podman ", table)


async def test_output_is_byte_exact_and_the_container_removed(
        client: Client, mounts: Path, podman: Podman) -> None:  # noqa: F811
    blob = bytes(range(256)) + os.urandom(300_000) + b"\r\n\x00no newline"
    (mounts / "blob").write_bytes(blob)
    r = await client.create_session(cspec(
        command=["sh", "-c", "cat /data/blob; echo err >&2; exit 7"],
        mounts=[m.Mount(source=str(mounts), target="/data")]))
    assert r.node == CNODE  # placement: the other node cannot run containers
    r = await client.wait(r.id)
    assert (r.state, r.exit_code) == ("exited", 7), (r, await output(client, r.id, "stderr"))
    assert await output(client, r.id) == blob
    assert await output(client, r.id, "stderr") == b"err\n"
    assert containers(podman) == []


async def test_shell_and_env_and_the_session_variables(client: Client) -> None:
    r = await client.wait((await client.create_session(cspec(
        shell='echo "$GREETING $SHOAL_SESSION_ID"; pwd', env={"GREETING": "hi"},
        cwd="/www"))).id)
    assert r.state == "exited" and r.exit_code == 0, r
    assert await output(client, r.id) == f"hi {r.id}\n/www\n".encode()


async def test_memory_limit_bites(client: Client) -> None:
    grow = 'x=$(head -c 100000000 /dev/zero | tr "\\0" a); echo survived ${#x}'
    r = await client.wait((await client.create_session(cspec(
        shell=grow, limits=m.Limits(memory_mb=32)))).id)
    assert (r.state, r.exit_code) == ("killed", 137), r
    assert "out of memory" in r.reason and "32 MiB" in r.reason
    assert b"survived" not in await output(client, r.id)


async def test_network_none_cannot_reach_the_nodes_nats(client: Client, cfleet: Fleet) -> None:
    found = re.search(r"NATS at nats://127\.0\.0\.1:(\d+)", cfleet.log.read_text())
    assert found, cfleet.log.read_text()
    probe = f"nc -w 3 127.0.0.1 {found.group(1)} </dev/null; echo rc=$?"
    r = await client.wait((await client.create_session(cspec(shell=probe))).id)
    assert await output(client, r.id) == b"rc=1\n"
    # The same probe as a process on the same node reaches it (the check above can fail).
    r = await client.wait((await client.create_session(m.SessionSpec(
        command=["/bin/busybox", "sh", "-c", probe], node=CNODE))).id)
    reached = await output(client, r.id)
    assert reached.startswith(b"INFO {") and reached.endswith(b"rc=0\n"), reached


async def test_attach_with_a_tty_and_resize(client: Client) -> None:
    r = await client.create_session(cspec(
        tty=True, cols=91, rows=27, shell="stty size; while read x; do stty size; done"))
    await wait_running(client, r.id)
    seen = b""
    async with client.attach(r.id, start=0) as att:
        async def until(token: bytes) -> None:
            nonlocal seen
            async for frame in att:
                if isinstance(frame, bytes):
                    seen += frame
                    if token in seen:
                        return

        await asyncio.wait_for(until(b"27 91"), 30)
        await att.resize(123, 41)
        for _ in range(60):  # the resize and the keystroke travel apart: ask until it shows
            await att.send(b"\r")
            try:
                await asyncio.wait_for(until(b"41 123"), 0.5)
                break
            except TimeoutError:
                pass
        assert b"41 123" in seen, seen
    await client.kill(r.id)
    assert (await client.wait(r.id)).state == "killed"


async def test_kill_ends_the_container(client: Client, podman: Podman) -> None:  # noqa: F811
    r = await client.create_session(cspec(command=["sleep", "1000"]))
    await wait_running(client, r.id)
    assert wait_for(lambda: containers(podman) == [f"shoal-{CNODE}-{r.id}"], 30)
    await client.kill(r.id)
    r = await client.wait(r.id)
    assert (r.state, r.reason) == ("killed", "killed on request")
    assert containers(podman) == []


async def test_bad_container_specs_are_refused(client: Client) -> None:
    with pytest.raises(ValidationError, match="needs an image"):
        await client.create_session(m.SessionSpec(runtime="container", command=["true"]))
    with pytest.raises(ValidationError, match="reaches the node's own network"):
        await client.create_session(cspec(network="host"))
    with pytest.raises(ValidationError, match="need a network"):
        await client.create_session(cspec(container_ports=[80]))
    with pytest.raises(ValidationError, match="runtime"):
        await client.create_session(m.SessionSpec(command=["true"], image=IMAGE))
    # A node without podman: a clear failure, nothing started.
    r = await client.wait((await client.create_session(cspec(node=PNODE))).id)
    assert r.state == "failed" and "can run containers" in r.reason, r
    # A mount from outside what the agent allows, an image the node does not have.
    r = await client.wait((await client.create_session(cspec(
        mounts=[m.Mount(source="/etc", target="/x")]))).id)
    assert r.state == "failed" and "not under a directory this agent allows" in r.reason, r
    r = await client.wait((await client.create_session(m.SessionSpec(
        runtime="container", image="localhost/no-such:1"))).id)
    assert r.state == "failed" and "never pulled" in r.reason, r


async def test_a_sigkilled_agent_leaves_a_container_the_next_start_removes(
        cfleet: Fleet, client: Client, podman: Podman, mounts: Path) -> None:  # noqa: F811
    name = "cdead"
    agent = cfleet.agent(name, env=agent_env(podman, mounts))
    r = await client.create_session(cspec(
        shell='trap "" TERM; while true; do sleep 1; done', node=name))
    await wait_running(client, r.id)
    container = f"shoal-{name}-{r.id}"

    def listed() -> list[str]:  # running or not
        out = subprocess.run([*podman.base(), "ps", "--all", "--format", "{{.Names}}"],
                             capture_output=True, text=True, timeout=60).stdout
        return out.split()

    assert wait_for(lambda: container in listed(), 30)
    agent.send_signal(signal.SIGKILL)
    agent.wait(10)
    await asyncio.sleep(2)  # the keeper is ending the podman client
    assert container in listed()  # a container outlives its client: only its name ends it
    again = cfleet.agent(name, env=agent_env(podman, mounts))
    try:
        assert wait_for(lambda: container not in listed(), 20)
    finally:
        again.send_signal(signal.SIGTERM)
        again.wait(30)


async def test_a_service_of_container_replicas(
        cfleet: Fleet, client: Client, podman: Podman) -> None:  # noqa: F811
    """Two replicas, each a container serving its own session id over HTTP on port 80,
    published on the port the node allocates; traffic through the services listener reaches
    both, and removing the service removes the containers."""
    serve = ('mkdir /tmp/w && echo "$SHOAL_SESSION_ID" > /tmp/w/index.html && '
             'exec httpd -f -p "$PORT" -h /tmp/w')
    await client.create_service(st.ServiceSpec(
        name="cweb", runtime="container", image=IMAGE, shell=serve, container_ports=[80],
        network="podman", replicas=2, check="http:/", interval=0.2, timeout=0.5))
    try:
        view = None
        for _ in range(300):
            view = await client.service("cweb")
            if view.up == 2 and len(view.replicas) == 2:
                break
            await asyncio.sleep(0.1)
        assert view is not None and view.up == 2, view
        assert {r.node for r in view.replicas} == {CNODE}  # the only node that runs them
        ids = {r.id for r in view.replicas}
        assert sorted(containers(podman)) == sorted(f"shoal-{CNODE}-{i}" for i in ids)
        seen: set[str] = set()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            for _ in range(60):
                async with http.get(f"{cfleet.services_url}/s/cweb/") as resp:
                    assert resp.status == 200, await resp.text()
                    seen.add((await resp.text()).strip())
                if seen == ids:
                    break
        assert seen == ids
    finally:
        await client.remove_service("cweb", deadline=0)
    assert wait_for(lambda: containers(podman) == [], 30), containers(podman)


async def test_bad_container_services_are_refused(client: Client) -> None:
    with pytest.raises(ValidationError, match="needs container_ports"):
        await client.create_service(st.ServiceSpec(name="cbad", runtime="container",
                                                   image=IMAGE))
    # The replicas' session rules hold for services too.
    with pytest.raises(ValidationError, match="need a network"):
        await client.create_service(st.ServiceSpec(name="cbad", runtime="container",
                                                   image=IMAGE, container_ports=[80]))
    with pytest.raises(ValidationError, match="needs an image"):
        await client.create_service(st.ServiceSpec(name="cbad", runtime="container",
                                                   container_ports=[80], network="podman"))
    with pytest.raises(ValidationError, match="runtime"):
        await client.create_service(st.ServiceSpec(name="cbad", command=["true"],
                                                   image=IMAGE))
    with pytest.raises(NotFoundError):
        await client.service("cbad")


async def test_the_cli_creates_container_sessions_and_services(
        cfleet: Fleet, client: Client, mounts: Path) -> None:
    """`--image`, `--container-port`, `--network` and `--mount` on `session create` and
    `service create`: the same specs the API takes."""
    (mounts / "hello.txt").write_text("from the host\n")
    r = cfleet.shoal("session", "create", "--json", "--image", IMAGE, "--mount",
                     f"{mounts}:/data", "--", "cat", "/data/hello.txt")
    assert r.returncode == 0, r.stderr
    sid = msgspec.json.decode(r.stdout, type=m.SessionRecord).id

    def ended() -> m.SessionRecord | None:
        shown = cfleet.shoal("session", "show", "--json", sid)
        rec = msgspec.json.decode(shown.stdout, type=m.SessionRecord)
        return rec if rec.state == "exited" else None

    rec = wait_for(ended, 60)
    assert rec.node == CNODE and rec.spec.runtime == "container"
    assert rec.spec.mounts == [m.Mount(source=str(mounts), target="/data")]
    assert await output(client, sid) == b"from the host\n"
    # One allocated port per container port, and a network to publish on by default.
    r = cfleet.shoal("session", "create", "--json", "--image", IMAGE, "--container-port", "80",
                     "--shell", "exec httpd -f -p 80 -h /tmp")
    assert r.returncode == 0, r.stderr
    web = msgspec.json.decode(r.stdout, type=m.SessionRecord)
    assert (web.spec.container_ports, web.spec.ports, web.spec.network) == ([80], 1, "podman")
    await client.kill(web.id)
    r = cfleet.shoal("service", "create", "--json", "cliweb", "--image", IMAGE,
                     "--container-port", "80", "--network", "podman", "--replicas", "0",
                     "--shell", "exec httpd -f -p 80 -h /tmp")
    assert r.returncode == 0, r.stderr
    try:
        spec = (await client.service("cliweb")).spec
        assert (spec.runtime, spec.image, spec.container_ports) == ("container", IMAGE, [80])
    finally:
        await client.remove_service("cliweb", deadline=0)
    # Container options without an image say what is missing and create nothing.
    r = cfleet.shoal("session", "create", "--container-port", "80", "--", "true")
    assert r.returncode == 2 and "add --image IMAGE" in r.stderr, r.stderr
    r = cfleet.shoal("session", "create", "--image", IMAGE, "--mount", "nocolon", "--", "true")
    assert r.returncode == 2 and "SOURCE:TARGET" in r.stderr, r.stderr
