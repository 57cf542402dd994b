"""The PyCloud bridge against a real redis-server and a real fleet. The client here is written
only from PyCloud's README: publish JSON on ``year4000.pycloud.<verb>``, wait on
``year4000.pycloud.<verb>.<request id>``."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from fleet import Fleet, wait_for
from shoal.agent.containers import Podman
from shoal.bridges import pycloud_protocol as p
from test_containers import _rootfs_tar, needs_podman, podman  # noqa: F401 - the fixture

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None,
                                reason="needs redis-server (scripts/test-deps.sh installs it)")

PREFIX = "year4000.pycloud"


# ---------------------------------------------------------------------- parts


class RedisServer:
    """A private redis-server on a free loopback port, no persistence."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), "--daemonize", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        r = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 20
        while True:
            try:
                r.ping()
                break
            except redis.ConnectionError:
                assert self.proc.poll() is None, "redis-server exited"
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        r.close()
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PyCloudClient:
    """What a PyCloud user's service does, per PyCloud's README."""

    def __init__(self, url: str) -> None:
        self.r = redis.Redis.from_url(url)

    def call(self, verb: str, payload: dict[str, Any] | bytes, rid: str,
             timeout: float = 45) -> dict[str, Any]:
        ps = self.r.pubsub(ignore_subscribe_messages=True)
        ps.subscribe(f"{PREFIX}.{verb}.{rid}")
        try:
            # Subscribed before publishing, or the answer could come first.
            assert _next(ps, 10, kind="subscribe") is not None
            body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            self.r.publish(f"{PREFIX}.{verb}", body)
            msg = _next(ps, timeout)
            assert msg is not None, f"no answer to {verb} {rid} in {timeout}s"
            return json.loads(msg["data"])  # type: ignore[no-any-return]
        finally:
            ps.close()

    def create(self, script: str, rid: str | None = None) -> dict[str, Any]:
        rid = rid or uuid.uuid4().hex
        return self.call("create", {"id": rid, "script": script}, rid)

    def status(self, session: str) -> dict[str, Any]:
        rid = uuid.uuid4().hex
        return self.call("status", {"id": rid, "session": session}, rid)

    def remove(self, session: str) -> dict[str, Any]:
        rid = uuid.uuid4().hex
        return self.call("remove", {"id": rid, "session": session}, rid)

    def close(self) -> None:
        self.r.close()


def _next(ps: Any, timeout: float, kind: str = "message") -> dict[str, Any] | None:
    deadline = time.monotonic() + timeout
    ps.ignore_subscribe_messages = kind != "subscribe"
    while time.monotonic() < deadline:
        msg = ps.get_message(timeout=0.5)
        if msg is not None and msg["type"] == kind:
            return msg  # type: ignore[no-any-return]
    return None


def start_bridge(fleet: Fleet, url: str, name: str) -> tuple[subprocess.Popen[str], Path]:
    log_path = fleet.home / f"bridge-{name}.log"
    log = open(log_path, "w")  # noqa: SIM115 - the child owns it
    proc = fleet.spawn("bridge", "pycloud", "--redis", url, "--name", name, "-v",
                       stdout=log, stderr=subprocess.STDOUT)
    log.close()
    wait_for(lambda: "listening on" in log_path.read_text() or proc.poll() is not None, 30)
    assert proc.poll() is None, log_path.read_text()
    return proc, log_path


def stop_bridge(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.terminate()
        proc.wait(30)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def bridge(fleet: Fleet, redis_server: RedisServer) -> Iterator[Path]:
    proc, log_path = start_bridge(fleet, redis_server.url, "bridge-a")
    try:
        yield log_path
    finally:
        stop_bridge(proc)
        assert proc.returncode == 0, log_path.read_text()


@pytest.fixture
def cloud(redis_server: RedisServer, bridge: Path) -> Iterator[PyCloudClient]:
    c = PyCloudClient(redis_server.url)
    try:
        yield c
    finally:
        c.close()


def record(fleet: Fleet, sid: str) -> dict[str, Any] | None:
    r = fleet.shoal("session", "show", sid)
    return json.loads(r.stdout) if r.returncode == 0 else None


# ---------------------------------------------------------------------- the protocol


def test_create_status_remove(fleet: Fleet, cloud: PyCloudClient) -> None:
    created = cloud.create("sleep 300")
    assert set(created) == {"cloud", "id"}, created
    sid = created["id"]
    assert created["cloud"] in fleet.nodes()  # the node that runs it
    wait_for(lambda: (record(fleet, sid) or {}).get("state") == "running", 30)

    assert cloud.status(sid) == {"cloud": created["cloud"], "id": sid, "status": True}

    removed = cloud.remove(sid)
    assert removed == {"cloud": created["cloud"], "id": sid, "status": False}
    assert record(fleet, sid) is None  # gone from shoal too: the process ended, record removed
    assert cloud.status(sid)["status"] is False


def test_status_is_false_once_the_script_exits(fleet: Fleet, cloud: PyCloudClient) -> None:
    # A multi-line shell script, as PyCloud runs them.
    created = cloud.create("x=20\necho \"out $((x + 1))\"\nexit 3\n")
    sid = created["id"]
    wait_for(lambda: (record(fleet, sid) or {}).get("state") == "exited", 30)
    assert cloud.status(sid) == {"cloud": created["cloud"], "id": sid, "status": False}
    assert record(fleet, sid)["exit_code"] == 3  # type: ignore[index]
    logs = fleet.shoal("logs", sid)
    assert logs.stdout == "out 21\n", logs


def test_same_request_id_twice_is_one_session(fleet: Fleet, cloud: PyCloudClient,
                                              redis_server: RedisServer) -> None:
    rid = uuid.uuid4().hex
    first = cloud.create("sleep 300", rid)
    # The claim expires after its TTL; a repeat past it still lands on the same session.
    r = redis.Redis.from_url(redis_server.url)
    assert r.delete(f"shoal:pycloud:claim:{PREFIX}.create:{rid}") == 1
    r.close()
    again = cloud.create("sleep 300", rid)
    assert again["id"] == first["id"]
    assert cloud.remove(first["id"])["status"] is False


def test_two_bridges_answer_each_request_once(fleet: Fleet, redis_server: RedisServer,
                                              bridge: Path) -> None:
    second, second_log = start_bridge(fleet, redis_server.url, "bridge-b")
    r = redis.Redis.from_url(redis_server.url)
    ps = r.pubsub()
    try:
        requests: list[tuple[str, str, dict[str, Any]]] = []
        for i in range(8):
            rid = f"twice-{i}-{uuid.uuid4().hex[:8]}"
            requests.append(("create", rid, {"id": rid, "script": "true"}))
        for i in range(8):
            rid = f"twice-st-{i}-{uuid.uuid4().hex[:8]}"
            requests.append(("status", rid, {"id": rid, "session": "pycloud-nosuchsession"}))
        rid = f"twice-bad-{uuid.uuid4().hex[:8]}"
        requests.append(("create", rid, {"id": rid, "script": 5}))
        ps.subscribe(*[f"{PREFIX}.{verb}.{rid}" for verb, rid, _ in requests])
        for _ in requests:
            assert _next(ps, 10, kind="subscribe") is not None
        for verb, _, body in requests:
            r.publish(f"{PREFIX}.{verb}", json.dumps(body))

        # Both bridges have decided on every request (answered it, or seen it claimed) ...
        logs = [bridge, second_log]
        marks = [f"pycloud {verb} {rid}:" for verb, rid, _ in requests]
        wait_for(lambda: all(mark in log.read_text() for mark in marks for log in logs), 45)
        # ... and a PING on the subscriber's connection comes back after anything they sent.
        got: dict[str, list[dict[str, Any]]] = {}
        ps.ping()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            msg = ps.get_message(timeout=0.5)
            if msg is None:
                continue
            if msg["type"] == "pong":
                break
            if msg["type"] == "message":
                got.setdefault(msg["channel"].decode(), []).append(json.loads(msg["data"]))
        else:
            raise AssertionError("no PONG")
        counts = {f"{PREFIX}.{verb}.{rid}": len(got.get(f"{PREFIX}.{verb}.{rid}", []))
                  for verb, rid, _ in requests}
        assert set(counts.values()) == {1}, counts
        for verb, rid, _ in requests[:8]:
            assert "id" in got[f"{PREFIX}.{verb}.{rid}"][0], got
        assert all(msgs[0]["status"] is False for ch, msgs in got.items() if ".status." in ch)
    finally:
        ps.close()
        r.close()
        stop_bridge(second)
    assert second.returncode == 0, second_log.read_text()


# ---------------------------------------------------------------------- bad requests


BAD = [
    ("create", b'{"id": "bad-json", "script": "echo', "bad-json", "not JSON"),
    ("create", json.dumps({"id": "bad-extra", "script": "true", "extra": 1}).encode(),
     "bad-extra", "unknown field `extra`"),
    ("create", json.dumps({"id": "bad-big", "script": "x" * 300_000}).encode(), "bad-big",
     "the limit is"),
    ("create", json.dumps({"id": "bad-type", "script": 5}).encode(), "bad-type",
     "Expected `str`"),
    ("create", json.dumps({"id": "bad-missing"}).encode(), "bad-missing",
     "missing required field `script`"),
    ("create", json.dumps({"id": "bad-empty", "script": ""}).encode(), "bad-empty",
     "length >= 1"),
    ("create", json.dumps({"id": "bad-port", "script": "year4000/pycloud\n{\"port\": 0}"})
     .encode(), "bad-port", "port number 1-65535"),
    ("status", json.dumps({"id": "bad-list", "session": ["s"]}).encode(), "bad-list",
     "Expected `str`"),
    ("status", json.dumps(["not", "an", "object"]).encode(), None, None),
    ("remove", b"\xff\xfe garbage", None, None),
]


@pytest.mark.parametrize(("verb", "payload", "rid", "expect"), BAD,
                         ids=[b[2] or f"{b[0]}-no-id-{i}" for i, b in enumerate(BAD)])
def test_bad_payloads_get_an_error_reply(cloud: PyCloudClient, bridge: Path, verb: str,
                                         payload: bytes, rid: str | None,
                                         expect: str | None) -> None:
    if rid is None:
        # No request id: nowhere to answer; the bridge logs it and goes on serving.
        cloud.r.publish(f"{PREFIX}.{verb}", payload)
        wait_for(lambda: "no request id in it" in bridge.read_text(), 20)
    else:
        rid = f"{rid}-{uuid.uuid4().hex[:8]}"
        payload = payload.replace(rid.rsplit("-", 1)[0].encode(), rid.encode(), 1)
        reply = cloud.call(verb, payload, rid)
        assert set(reply) == {"cloud", "error"}, reply
        assert expect in reply["error"], reply
        wait_for(lambda: f"pycloud {verb} {rid}: " in bridge.read_text(), 20)  # logged too
    # The bridge is still up and answering.
    assert cloud.status("pycloud-nosuchsession")["status"] is False


def test_session_ids_cannot_reach_other_api_paths(fleet: Fleet, cloud: PyCloudClient) -> None:
    """The session id becomes part of an API path: ``../nodes/node-1`` would be a DELETE on a
    node (forgetting it). It is refused as not being a session id."""
    reply = cloud.remove("../nodes/node-1")
    assert "session" in reply.get("error", ""), reply
    assert fleet.nodes()["node-1"]["state"] == "ready"
    reply = cloud.status("..%2Fnodes%2Fnode-1")
    assert "error" in reply, reply


def test_only_pycloud_sessions_can_be_seen_or_removed(fleet: Fleet,
                                                      cloud: PyCloudClient) -> None:
    """Whoever can publish on Redis may end what the bridge started, not the fleet's other
    sessions (a service replica, someone's terminal)."""
    made = fleet.shoal("session", "create", "--", "sleep", "300")
    assert made.returncode == 0, made.stderr
    sid = made.stdout.strip()
    try:
        wait_for(lambda: (record(fleet, sid) or {}).get("state") == "running", 30)
        assert cloud.status(sid)["status"] is False
        assert cloud.remove(sid)["status"] is False
        assert (record(fleet, sid) or {}).get("state") == "running"
    finally:
        fleet.shoal("session", "rm", sid)


WEB_IMAGE = "localhost/shoal-test-web:1"


@needs_podman
def test_a_docker_script_starts_a_container_reachable_on_its_port(
        fleet: Fleet, cloud: PyCloudClient, podman: Podman, tmp_path: Path,  # noqa: F811
        ) -> None:
    """PyCloud's Docker script: the image on the first line (its own command: a web server on
    port 80), docker-py options after it; the container's port 80 is published on a port the
    node allocates. Only one node has the image: the others refuse and placement moves on."""
    subprocess.run([*podman.base(), "import", "--change",
                    'CMD ["httpd", "-f", "-p", "80", "-h", "/www"]', "-", WEB_IMAGE],
                   input=_rootfs_tar(), check=True, capture_output=True, timeout=120)
    assert podman.root is not None and podman.runroot is not None
    agent = fleet.agent("pyc-podman", env={"SHOAL_PODMAN_ROOT": podman.root,
                                           "SHOAL_PODMAN_RUNROOT": podman.runroot})
    try:
        reply = cloud.create(f'{WEB_IMAGE}\n{{\n    "port": 80\n}}\n')
        assert "error" not in reply, reply
        sid = reply["id"]
        assert reply["cloud"] == "pyc-podman"
        rec = wait_for(lambda: (r := record(fleet, sid)) and r["state"] == "running" and r, 30)
        assert rec["spec"]["image"] == WEB_IMAGE and rec["spec"]["container_ports"] == [80]
        [port] = rec["ports"]
        body = wait_for(lambda: _get(f"http://127.0.0.1:{port}/"), 30)
        assert body == b"hello from a container\n"
        assert cloud.status(sid)["status"] is True
        assert cloud.remove(sid)["status"] is False  # PyCloud: no longer live
        wait_for(lambda: (record(fleet, sid) or {}).get("state") in ("killed", None), 30)
        # The container is gone; the freed port may already serve another fleet's process.
        assert _get(f"http://127.0.0.1:{port}/") != b"hello from a container\n"
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(30)


def _get(url: str) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return bytes(r.read())
    except OSError:
        return None


def test_bridge_rides_out_a_redis_restart(fleet: Fleet, tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis").start()
    proc, log_path = start_bridge(fleet, server.url, "bridge-r")
    try:
        server.stop()
        wait_for(lambda: "reconnecting" in log_path.read_text(), 30)
        server.start()  # same port
        wait_for(lambda: log_path.read_text().count("listening on") >= 2, 30)
        c = PyCloudClient(server.url)
        try:
            assert c.status("pycloud-nosuchsession")["status"] is False
        finally:
            c.close()
    finally:
        stop_bridge(proc)
        server.stop()
    assert proc.returncode == 0, log_path.read_text()


def test_bad_flags_fail_clearly(fleet: Fleet) -> None:
    r = fleet.shoal("bridge", "pycloud", "--redis", "http://127.0.0.1:1")
    assert r.returncode == 2 and "--redis" in r.stderr, r
    r = fleet.shoal("bridge", "pycloud", "--redis", "redis://127.0.0.1:1", "-l", "nolabel")
    assert r.returncode == 2 and "key=value" in r.stderr, r
    r = fleet.shoal("bridge", "pycloud")
    assert r.returncode == 2 and "--redis" in r.stderr, r


# ---------------------------------------------------------------------- pure parts


def test_parse_recovers_the_reply_channel() -> None:
    ok = p.parse("create", f"{PREFIX}.create", b'{"id": "r1", "script": "true"}')
    assert isinstance(ok, p.Request) and ok.reply_channel == f"{PREFIX}.create.r1"
    bad = p.parse("status", f"{PREFIX}.status", b'{"id": "r2", "session": "a/b"}')
    assert isinstance(bad, p.BadRequest) and bad.reply_channel == f"{PREFIX}.status.r2"
    cut = p.parse("create", f"{PREFIX}.create", b'{"id" : "r3", "scr')
    assert isinstance(cut, p.BadRequest) and cut.reply_channel == f"{PREFIX}.create.r3"
    spaced = p.parse("create", f"{PREFIX}.create", b'{"id": "has space", "script": "true"}')
    assert isinstance(spaced, p.BadRequest) and spaced.reply_channel is None
    assert p.verb_of(f"{PREFIX}.rank") is None


def test_docker_scripts_are_told_from_shell_scripts() -> None:
    found = p.container_script('year4000/pycloud\n{\n  "port": 80\n}')
    assert found == p.ContainerScript("year4000/pycloud", 80, {"port": 80})
    assert p.container_script("localhost:5000/a/b:1.2\n{}") is not None
    assert p.container_script("echo hi\n{}") is None  # "echo hi" is no image name
    assert p.container_script("sleep 1\necho {") is None
    assert p.container_script("true") is None
    with pytest.raises(ValueError, match="port"):
        p.container_script('img\n{"port": "80"}')
    assert p.session_id_for("a") == p.session_id_for("a") != p.session_id_for("b")
