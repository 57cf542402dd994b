"""The public Python API: ``shoal.__all__`` is exactly what the package offers, every name
imports, and ``SyncClient`` drives a real fleet."""

from __future__ import annotations

import subprocess
import sys
import time
import types
from collections.abc import Iterator

import pytest

import shoal
from fleet import Fleet
from shoal import (
    Client,
    LogChunk,
    LogEnd,
    LogEof,
    NotFoundError,
    RunSpec,
    SessionRecord,
    SessionSpec,
    SyncClient,
    Targets,
    ValidationError,
)
from shoal.wire import messages as m

# ---------------------------------------------------------------------- the names


def test_all_is_exactly_the_public_names() -> None:
    for name in shoal.__all__:
        getattr(shoal, name)  # load the lazy ones, so dir() below sees everything
    public = {name for name in dir(shoal) if not name.startswith("_")
              and not isinstance(getattr(shoal, name), types.ModuleType)}
    assert set(shoal.__all__) == public | {"__version__"}
    assert len(shoal.__all__) == len(set(shoal.__all__))
    assert shoal.__all__ == sorted(shoal.__all__, key=lambda n: (n.startswith("_"), n))


def test_each_name_imports_in_a_fresh_interpreter() -> None:
    lines = [f"from shoal import {name}" for name in shoal.__all__]
    code = "\n".join([*lines, "from shoal import *",
                      "assert sorted(k for k in dir() if not k.startswith('_')) == "
                      f"sorted({[n for n in shoal.__all__ if not n.startswith('_')]!r})"])
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_names_are_the_real_objects() -> None:
    from shoal import errors
    from shoal.client import aio as client
    from shoal.client import sync
    from shoal.logic import nodeset

    assert shoal.Client is client.Client and shoal.SyncClient is sync.SyncClient
    assert shoal.NodeSet is nodeset.NodeSet and shoal.SessionSpec is m.SessionSpec
    for name in ("ShoalError", "ConfigError", "ValidationError", "ConnectError", "AuthError",
                 "NotFoundError", "ConflictError", "NoCapacityError", "RemoteTimeout",
                 "ProtocolError", "Unavailable"):
        assert getattr(shoal, name) is getattr(errors, name)
        assert issubclass(getattr(shoal, name), shoal.ShoalError)
    assert isinstance(shoal.__version__, str) and shoal.__version__[0].isdigit()
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        shoal.nope  # noqa: B018


def test_messages_do_not_load_the_http_client() -> None:
    """The agent imports shoal.wire.messages: the public names load lazily."""
    code = "import sys, shoal.wire.messages; assert 'aiohttp' not in sys.modules, 'aiohttp loaded'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ---------------------------------------------------------------------- SyncClient


def test_sync_client_has_every_client_method() -> None:
    """SyncClient mirrors Client: a method added there and not here fails this."""
    public = {n for n in vars(Client) if not n.startswith("_")} - {"http"}
    assert public - set(dir(SyncClient)) == set()


@pytest.fixture
def sync(fleet: Fleet) -> Iterator[SyncClient]:
    with SyncClient(fleet.url, fleet.token) as c:
        yield c


def wait_state(c: SyncClient, sid: str, state: str, timeout: float = 15) -> SessionRecord:
    deadline = time.monotonic() + timeout
    while (r := c.session(sid)).state != state:
        assert time.monotonic() < deadline, f"{sid} is {r.state}, not {state}"
        time.sleep(0.05)
    return r


def test_sync_session_lifecycle(sync: SyncClient) -> None:
    r = sync.create_session(SessionSpec(shell="echo hello; echo oops >&2; exit 3",
                                        labels={"suite": "sync"}))
    assert isinstance(r, SessionRecord) and r.node in ("node-1", "node-2")
    r = sync.wait(r.id)
    assert (r.state, r.exit_code) == ("exited", 3)
    events = list(sync.logs(r.id))
    out = {s: b"".join(e.data for e in events if isinstance(e, LogChunk) and e.stream == s)
           for s in ("stdout", "stderr")}
    assert out == {"stdout": b"hello\n", "stderr": b"oops\n"}
    assert isinstance(events[-1], LogEnd) and events[-1].exit_code == 3
    ended = sync.sessions(state="exited")
    assert [s.id for s in ended if s.spec.labels.get("suite") == "sync"] == [r.id]
    assert r.id in [s.id for s in sync.sessions(node=r.node)]
    sync.remove(r.id)
    with pytest.raises(NotFoundError, match=r.id):
        sync.session(r.id)


def test_sync_signal_kill_and_errors(sync: SyncClient) -> None:
    r = sync.create_session(SessionSpec(shell="trap 'echo usr1' USR1; "
                                              "while true; do sleep 0.05; done"))
    wait_state(sync, r.id, "running")
    sync.signal(r.id, "USR1")
    deadline = time.monotonic() + 15
    while b"usr1" not in b"".join(e.data for e in sync.logs(r.id) if isinstance(e, LogChunk)):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    with pytest.raises(ValidationError, match="unknown signal"):
        sync.signal(r.id, "NOPE")
    sync.kill(r.id)
    r = sync.wait(r.id)
    assert (r.state, r.reason) == ("killed", "killed on request")
    sync.remove(r.id)
    with pytest.raises(NotFoundError):
        sync.kill(r.id)


def test_sync_follow_and_leave_early(sync: SyncClient) -> None:
    """A followed log is a generator: leaving the loop early closes the response, and the
    client goes on working."""
    r = sync.create_session(SessionSpec(shell="while true; do echo tick; sleep 0.05; done"))
    seen = b""
    logs = sync.logs(r.id, follow=True)
    for ev in logs:
        if isinstance(ev, LogChunk):
            seen += ev.data
            if seen.count(b"tick") >= 3:
                break
    logs.close()
    assert sync.kill(r.id).id == r.id
    final = list(sync.logs(r.id, follow=True))  # ends by itself once the session ended
    assert isinstance(final[-1], LogEnd) and final[-1].state == "killed"
    eof = list(sync.logs(r.id, start=final[-1].offset))
    assert len(eof) == 1 and isinstance(eof[0], LogEnd | LogEof)
    sync.remove(r.id)


def test_sync_run_and_nodes(sync: SyncClient) -> None:
    assert sorted(n.name for n in sync.nodes()) == ["node-1", "node-2"]
    assert sync.node("node-1").state == "ready"
    with sync.run(Targets(all=True), RunSpec(argv=["sh", "-c", "echo $SHOAL_NODE"])) as run:
        assert run.plan is not None and sorted(run.plan.nodes) == ["node-1", "node-2"]
        events = list(run)
    outputs = {e.node: e.data for e in events if isinstance(e, m.Output)}
    exits = {e.node: e.code for e in events if isinstance(e, m.Exit)}
    assert exits == {"node-1": 0, "node-2": 0}
    assert set(outputs) == {"node-1", "node-2"}
    with pytest.raises(NotFoundError), sync.run(Targets(nodes="nope-1"), RunSpec(argv=["true"])):
        pass


def test_sync_attach(sync: SyncClient) -> None:
    r = sync.create_session(SessionSpec(command=["cat"], tty=True))
    wait_state(sync, r.id, "running")
    out = b""
    with sync.attach(r.id) as att:
        for frame in att:
            if isinstance(frame, dict):
                assert frame["t"] == "hello"
                att.resize(100, 30)
                att.send(b"ping\r")
            else:
                out += frame
                if b"ping\r\nping" in out:
                    break
        assert att.offset == len(out)
    sync.kill(r.id)
    sync.remove(r.id)


def test_from_config_reads_shoal_home(fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("SHOAL_URL", "SHOAL_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SHOAL_HOME", str(fleet.home))
    with SyncClient.from_config() as c:
        assert c.url == fleet.url and isinstance(c.client, Client)
        assert len(c.nodes()) == 2
    with pytest.raises(RuntimeError, match="closed"):
        c.nodes()


async def test_sync_client_works_inside_a_running_loop(fleet: Fleet) -> None:
    """Its loop is its own (in a thread), so a notebook or an async program can use it."""
    with SyncClient(fleet.url, fleet.token) as c:
        assert len(c.nodes()) == 2
