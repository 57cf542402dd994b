"""Run as another user (``shoal run --user``, a session's ``user``) on a real fleet, with
real Unix users this module creates and removes: only users the agent's ``run_as`` lists,
with their uid, groups, home and login environment, inside the run's cgroup."""

from __future__ import annotations

import grp
import os
import pwd
import re
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from fleet import Fleet, wait_for
from shoal import config as c

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")

TAG = secrets.token_hex(3)
DEPLOY, OTHER, GROUP = f"rdeploy{TAG}", f"rother{TAG}", f"rgrp{TAG}"


@pytest.fixture(scope="module")
def users() -> Iterator[None]:
    subprocess.run(["groupadd", GROUP], check=True)
    try:
        for name in (DEPLOY, OTHER):
            subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", name],
                           check=True)
        subprocess.run(["usermod", "-aG", GROUP, DEPLOY], check=True)
        yield
    finally:
        for name in (DEPLOY, OTHER):
            subprocess.run(["pkill", "-KILL", "-u", name], capture_output=True)
            subprocess.run(["userdel", "--remove", "--force", name], capture_output=True)
        subprocess.run(["groupdel", GROUP], capture_output=True)


def _agent_config(fleet: Fleet, run_as: list[str]) -> Path:
    base = c.load(c.AgentConfig, fleet.home / "agent.toml")
    path = fleet.home / f"agent-{'-'.join(run_as) or 'none'}.toml"
    c.save(path, msgspec.structs.replace(base, run_as=run_as))
    return path


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, users: None) -> Iterator[Fleet]:
    """node-1, node-2 (no run_as), ra-1 (run_as = [DEPLOY]), ra-root (run_as = [root])."""
    f = Fleet(tmp_path_factory.mktemp("runas") / "home").start()
    try:
        f.agent("ra-1", "--config", str(_agent_config(f, [DEPLOY])))
        f.agent("ra-root", "--config", str(_agent_config(f, ["root"])))
        yield f
    finally:
        f.stop()


def lines_of(stdout: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in stdout.splitlines():
        node, _, text = line.partition(": ")
        out.setdefault(node, []).append(text)
    return out


PROBE = 'id -u; id -g; id -G; echo "$HOME $USER $LOGNAME $SHELL"; pwd'


def test_an_allowed_user_runs_with_its_ids_groups_and_home(fleet: Fleet) -> None:
    pw = pwd.getpwnam(DEPLOY)
    r = fleet.shoal("run", "-n", "ra-1", "--user", DEPLOY, "--shell", PROBE)
    assert r.returncode == 0, r.stderr
    uid, gid, groups, env, cwd = lines_of(r.stdout)["ra-1"]
    assert (int(uid), int(gid)) == (pw.pw_uid, pw.pw_gid)
    assert set(map(int, groups.split())) == {pw.pw_gid, grp.getgrnam(GROUP).gr_gid}
    assert env == f"{pw.pw_dir} {DEPLOY} {DEPLOY} /bin/sh"
    assert cwd == pw.pw_dir


def test_a_node_that_does_not_allow_the_user_refuses_and_the_others_run(fleet: Fleet) -> None:
    shared = Path(tempfile.mkdtemp(prefix="shoal-runas-"))  # root's pytest dir is 0700
    shared.chmod(0o777)
    mark = shared / "ran"
    r = fleet.shoal("run", "-n", "ra-1,node-1", "--user", DEPLOY, "--shell",
                    f'id -un; touch {mark}.$SHOAL_NODE')
    assert r.returncode != 0
    assert lines_of(r.stdout).get("ra-1") == [DEPLOY], r.stdout
    assert "node-1" not in lines_of(r.stdout)
    assert re.search(rf"node-1.*user '{DEPLOY}' is not allowed on this node.*run_as",
                     r.stderr), r.stderr
    try:
        assert (shared / "ran.ra-1").exists() and not (shared / "ran.node-1").exists()
    finally:
        shutil.rmtree(shared)


def test_users_not_listed_and_root_are_refused_unless_listed(fleet: Fleet) -> None:
    for user in (OTHER, "root"):
        r = fleet.shoal("run", "-n", "ra-1", "--user", user, "--", "id", "-u")
        assert r.returncode != 0 and "ra-1" not in lines_of(r.stdout), r.stdout
        assert f"user '{user}' is not allowed" in r.stderr, r.stderr
    r = fleet.shoal("run", "-n", "ra-root", "--user", "root", "--", "id", "-u")
    assert (r.returncode, lines_of(r.stdout).get("ra-root")) == (0, ["0"]), r.stderr
    r = fleet.shoal("run", "-n", "ra-root", "--user", "no-such-user1", "--", "true")
    assert r.returncode != 0 and "not allowed" in r.stderr


def test_bad_user_names_are_refused_before_anything_runs(fleet: Fleet) -> None:
    for bad in ("Root", "a b", "x" * 40, "../etc"):
        r = fleet.shoal("run", "-n", "ra-1", "--user", bad, "--", "true")
        assert r.returncode == 2 and "bad run request" in r.stderr, (bad, r.stderr)
    r = fleet.shoal("run", "-H", "localhost", "--user", DEPLOY, "--", "true")
    assert r.returncode == 2 and "-H NAME@HOST" in r.stderr


def test_what_it_leaves_behind_ends_with_the_run(fleet: Fleet) -> None:
    uid = pwd.getpwnam(DEPLOY).pw_uid
    r = fleet.shoal("run", "-n", "ra-1", "--user", DEPLOY, "--shell",
                    "setsid sleep 300 </dev/null >/dev/null 2>&1 & echo started")
    assert r.returncode == 0, r.stderr

    def none_left() -> bool:
        p = subprocess.run(["pgrep", "-u", str(uid)], capture_output=True)
        return p.returncode == 1

    assert wait_for(none_left, timeout=20)


def test_a_session_runs_as_an_allowed_user_and_is_refused_elsewhere(fleet: Fleet) -> None:
    r = fleet.shoal("session", "create", "--node", "ra-1", "--user", DEPLOY, "--json",
                    "--", "sh", "-c", "id -un; echo $HOME")
    assert r.returncode == 0, r.stderr
    sid = msgspec.json.decode(r.stdout)["id"]

    def ended() -> bool:
        got = fleet.shoal("session", "show", sid)
        return '"exited"' in got.stdout

    assert wait_for(ended, timeout=20), fleet.shoal("session", "show", sid).stdout
    logs = fleet.shoal("logs", sid)
    assert logs.stdout.split() == [DEPLOY, pwd.getpwnam(DEPLOY).pw_dir], logs
    r = fleet.shoal("session", "create", "--node", "node-1", "--user", DEPLOY, "--json",
                    "--", "true")
    deadline = time.monotonic() + 20
    text = r.stdout + r.stderr
    while "not allowed" not in text and time.monotonic() < deadline and r.returncode == 0:
        sid = msgspec.json.decode(r.stdout)["id"]
        text = fleet.shoal("session", "show", sid).stdout
        time.sleep(0.2)
    assert "not allowed on this node" in text, text


def test_the_tokens_node_restriction_still_applies(fleet: Fleet) -> None:
    r = fleet.shoal("token", "create", "--user", "ops", "--scope", "run:node-1",
                    "--expires", "1h")
    assert r.returncode == 0, r.stderr
    r = fleet.shoal("run", "-n", "ra-1", "--user", DEPLOY, "--", "id", "-un",
                    env={"SHOAL_TOKEN": r.stdout.strip()})
    assert r.returncode != 0 and DEPLOY not in r.stdout
    assert "may reach" in r.stderr or "forbidden" in r.stderr, r.stderr


def test_run_as_setting_is_checked() -> None:
    for bad, fragment in [(["a b"], "not a Unix user name"),
                          (["shoal-1234"], "throwaway")]:
        with pytest.raises(msgspec.ValidationError, match=fragment):
            msgspec.convert({"run_as": bad}, c.AgentConfig)
