"""Followers under no fault and under a controller SIGKILL: every byte the session wrote
(its own ground-truth file) reaches every `shoal logs -f`, exactly once and in order, and an
attached terminal comes back and ends with the session's own exit status."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from faultkit import counter, finish, wait_file_lines
from fleet import SHOAL, Fleet, Terminal


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    f = Fleet(tmp_path_factory.mktemp("faults") / "home", agents=2).start()
    try:
        yield f
    finally:
        f.stop()


def _create(fleet: Fleet, *args: str, env: dict[str, str] | None = None) -> str:
    r = fleet.shoal("session", "create", *args, env=env)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_ten_followers_get_every_byte(fleet: Fleet, tmp_path: Path) -> None:
    """The finding: with no fault at all, 4 to 7 of 10 `logs -f` ended early with `reading
    the output failed: ; resume from 0` (a bare asyncio timeout out of nats-py's fetch)."""
    truths = [tmp_path / f"truth-{i}" for i in range(10)]
    sids = [_create(fleet, "--shell", counter(t, 24, 0.5)) for t in truths]
    followers = [fleet.spawn("logs", "-f", sid, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE) for sid in sids]
    for truth, p in zip(truths, followers, strict=True):
        code, out, err = finish(p)
        assert (code, err) == (0, ""), err
        assert out == truth.read_text()
        assert out.count("\n") == 24


def test_controller_sigkill_under_followers_and_an_attach(fleet: Fleet, tmp_path: Path) -> None:
    """The finding: after a controller SIGKILL, `logs -f` died with an aiohttp traceback and
    `session attach` printed `session None` and exited 0 while the session still ran."""
    from faultkit import free_port

    port = free_port()
    ctl, url = fleet.controller(port)
    env = {"SHOAL_URL": url}
    truths = [tmp_path / f"truth-{i}" for i in range(3)]
    sids = [_create(fleet, "--shell", counter(t, 60, 0.2), env=env) for t in truths]
    term_truth = tmp_path / "term-truth"
    tty = _create(fleet, "--tty", "--shell",
                  counter(term_truth, 60, 0.2, tag="tline") + "; exit 7", env=env)
    outs = [tmp_path / f"out-{i}" for i in range(3)]
    followers = []
    for sid, out in zip(sids, outs, strict=True):
        with open(out, "w") as f:
            followers.append(fleet.spawn("logs", "-f", sid, env=env, stdout=f,
                                         stderr=subprocess.PIPE))
    term = Terminal([SHOAL, "session", "attach", tty], env={**fleet.env, **env})
    try:
        term.read_until(b"tline-5\r\n")
        for out in outs:  # every follower is under way
            wait_file_lines(out, 5)
        ctl.send_signal(signal.SIGKILL)
        ctl.wait()
        time.sleep(2.0)  # the sessions write on with no controller
        ctl, _ = fleet.controller(port)
        for truth, out, p in zip(truths, outs, followers, strict=True):
            code, _, err = finish(p)
            assert code == 0, err
            # Resumed at the byte printed: none lost, none twice.
            assert out.read_text() == truth.read_text()
            assert "reconnecting to resume at byte" in err
            assert "Traceback" not in err
        assert term.proc.wait(45) == 7  # reconnected, and ended with the session's status
        seen = term.read_until(b"session exited").decode(errors="replace")
        for i in range(1, 61):
            assert len(re.findall(rf"tline-{i}\r\n", seen)) == 1, f"tline-{i} in {seen!r}"
        assert "reconnecting" in seen and "session None" not in seen
    finally:
        term.close()
        ctl.send_signal(signal.SIGTERM)
        ctl.wait(20)


def test_attach_that_cannot_get_back_exits_non_zero(fleet: Fleet) -> None:
    """With no controller to come back to, attach gives up with a message that says where
    to resume, and a non-zero status, never 0 while the session runs."""
    from faultkit import free_port

    port = free_port()
    ctl, url = fleet.controller(port)
    env = {"SHOAL_URL": url}
    sid = _create(fleet, "--tty", "--", "sleep", "60", env=env)
    # A short reconnect budget keeps the case quick; the default is a minute.
    term = Terminal([SHOAL, "session", "attach", sid],
                    env={**fleet.env, **env, "SHOAL_RECONNECT_FOR": "3"})
    try:
        time.sleep(1.0)
        ctl.send_signal(signal.SIGKILL)
        ctl.wait()
        assert term.proc.wait(30) == 1
        seen = term.read_until(b"resume from byte").decode(errors="replace")
        assert "could not get it back" in seen and "session None" not in seen
        r = fleet.shoal("session", "show", sid)
        assert '"running"' in r.stdout  # it ran on all along
    finally:
        term.close()
        fleet.shoal("session", "rm", sid)
