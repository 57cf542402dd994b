"""Containment: a session is its cgroup. Nothing it forks, setsid's or double-forks outlives
it, throwaway users are never reused and leave nothing behind, limits bite and say so, and
a SIGKILLed agent leaves no session process once it is back. Real processes, real users."""

from __future__ import annotations

import asyncio
import os
import pwd
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from fleet import Fleet, processes_with_env, wait_running
from shoal.agent import cgroup_layout as cgroups
from shoal.agent import users
from shoal.client.aio import Client, LogChunk
from shoal.wire import messages as m

GRACE = 5.0  # the agent's default grace period between SIGTERM and SIGKILL

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="cgroups and users need root")


@pytest.fixture
async def client(fleet: Fleet) -> AsyncIterator[Client]:
    async with Client(fleet.url, fleet.token) as c:
        yield c


def _left(sid: str) -> list[psutil.Process]:
    return processes_with_env("SHOAL_SESSION_ID", sid)


def _of_uid(uid: int) -> list[int]:
    found = []
    for p in psutil.process_iter(["uids"]):
        try:
            if p.info["uids"] and uid in (p.info["uids"].real, p.info["uids"].effective):
                found.append(p.pid)
        except psutil.Error:
            continue
    return found


async def _output(client: Client, sid: str) -> bytes:
    return b"".join([e.data async for e in client.logs(sid) if isinstance(e, LogChunk)])


# --------------------------------------------------------------------------- pure layout

HYBRID = """\
30 25 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw
32 30 0:28 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory
33 30 0:29 / /sys/fs/cgroup/pids rw,nosuid - cgroup cgroup rw,pids
34 30 0:30 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid - cgroup cgroup rw,cpu,cpuacct
35 30 0:31 / /sys/fs/cgroup/freezer rw,nosuid - cgroup cgroup rw,freezer
"""
HYBRID_SELF = "6:freezer:/\n5:memory:/box/a\n4:pids:/\n3:cpu,cpuacct:/\n1:name=systemd:/\n0::/\n"


def test_hybrid_layout_tracks_in_v2_and_limits_in_v1() -> None:
    layout = cgroups.plan(HYBRID, HYBRID_SELF, (), "shoal.t")
    assert isinstance(layout, cgroups.Layout)
    assert layout.tracker is not None and layout.tracker.kind == "v2"
    assert layout.unit_dirs("n.s.x") == [
        "/sys/fs/cgroup/unified/shoal.t/n.s.x", "/sys/fs/cgroup/memory/box/a/shoal.t/n.s.x",
        "/sys/fs/cgroup/pids/shoal.t/n.s.x", "/sys/fs/cgroup/cpu,cpuacct/shoal.t/n.s.x"]
    assert layout.describe() == "v2+v1(cpu,memory,pids)"


def test_v2_only_layout_is_one_directory() -> None:
    info = "31 30 0:27 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
    layout = cgroups.plan(info, "0::/system.slice/shoal.service\n", ["memory", "pids", "cpu",
                                                                      "io"], "shoal.t")
    assert isinstance(layout, cgroups.Layout)
    assert layout.unit_dirs("u") == ["/sys/fs/cgroup/system.slice/shoal.service/shoal.t/u"]
    assert set(layout.limits) == {"memory", "pids", "cpu"}
    assert layout.describe() == "v2(cpu,memory,pids)"


def test_v1_only_uses_the_freezer_and_no_cgroups_says_why() -> None:
    v1 = "\n".join(line for line in HYBRID.splitlines() if "cgroup2" not in line)
    layout = cgroups.plan(v1, HYBRID_SELF, (), "b")
    assert isinstance(layout, cgroups.Layout) and layout.tracker is not None
    assert layout.tracker.mount == "/sys/fs/cgroup/freezer"
    nothing = cgroups.plan("25 1 0:1 / / rw - ext4 /dev/vda rw\n", HYBRID_SELF, (), "b")
    assert nothing == "no cgroup v2 mount and no v1 freezer hierarchy"


def test_a_mount_of_a_subtree_maps_paths_inside_it() -> None:
    info = "31 30 0:27 /kubepods/pod1 /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
    layout = cgroups.plan(info, "0::/kubepods/pod1/c\n", [], "s")
    assert isinstance(layout, cgroups.Layout)
    assert layout.base_dirs() == ["/sys/fs/cgroup/c/s"]
    outside = cgroups.plan(info, "0::/elsewhere\n", [], "s")
    assert isinstance(outside, str)


def test_limit_files_per_layout() -> None:
    lim = m.Limits(memory_mb=64, processes=10, cpu_weight=50)
    assert cgroups.limit_files("v2", "memory", lim) == [("memory.max", str(64 << 20)),
                                                         ("memory.swap.max", "0")]
    assert cgroups.limit_files("v1", "memory", lim)[0] == ("memory.limit_in_bytes",
                                                            str(64 << 20))
    assert cgroups.limit_files("v1", "pids", lim) == [("pids.max", "10")]
    assert cgroups.limit_files("v1", "cpu", lim) == [("cpu.shares", "512")]
    assert cgroups.limit_files("v2", "cpu", lim) == [("cpu.weight", "50")]
    assert cgroups.limit_files("v2", "memory", m.Limits()) == []
    assert cgroups.unit_name("n-1", "r", "a.b/c") == "n-1.r.a_b_c"
    # A unit is a bare tracking directory (and may be kept) exactly when no file is written.
    for one in (m.Limits(), m.Limits(memory_mb=64), m.Limits(processes=1),
                m.Limits(cpu_weight=5), m.Limits(cpu_seconds=3, open_files=20, file_size_mb=1)):
        assert cgroups.sets_cgroup_limit(one) == any(
            cgroups.limit_files(k, c, one) for k in ("v1", "v2")
            for c in cgroups.LIMIT_CONTROLLERS), one


def test_uids_come_from_a_persistent_allocator(tmp_path: Path) -> None:
    state = tmp_path / "uid"
    a, b = users.next_uid(state), users.next_uid(state)
    assert users.UID_FIRST <= a < b
    state.write_text("garbage")  # a damaged file restarts at the floor, never below
    assert users.next_uid(state) >= users.UID_FIRST


# --------------------------------------------------------------------------- on the fleet

@root_only
def test_nodes_show_their_cgroups(fleet: Fleet) -> None:
    nodes = fleet.nodes()
    assert nodes["node-1"]["cgroups"], nodes
    table = fleet.shoal("nodes", env={"COLUMNS": "200"})
    assert "cgroups" in table.stdout, table.stdout


@root_only
async def test_a_killed_terminal_with_a_setsid_child_ends_and_leaves_nothing(
        client: Client) -> None:
    rec = await wait_running(client, (await client.create_session(m.SessionSpec(
        shell="(setsid sleep 300 &); echo started; sleep 300", tty=True))).id)
    for _ in range(100):  # the background sleep has started
        if len(_left(rec.id)) >= 3:
            break
        await asyncio.sleep(0.05)
    await client.kill(rec.id)
    done = await client.wait(rec.id, timeout=GRACE + 10)
    assert done.state == "killed", done
    assert _left(rec.id) == []
    await client.remove(rec.id)


@root_only
async def test_exit_leaving_a_setsid_child_ends_the_session(client: Client) -> None:
    rec = await client.create_session(m.SessionSpec(
        shell="(setsid sleep 300 &); (setsid sh -c '(sleep 301 &)' &); sleep 0.3; exit 0",
        tty=True))
    done = await client.wait(rec.id, timeout=20)
    assert done.state == "exited" and done.exit_code == 0, done
    assert _left(rec.id) == []
    await client.remove(rec.id)


def _alive_with_arg(arg: str) -> list[int]:
    """Live processes (not zombies) whose command line holds ``arg``: found by /proc,
    whatever their environment says."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        if p.info["status"] != psutil.STATUS_ZOMBIE and arg in (p.info["cmdline"] or []):
            found.append(p.pid)
    return found


@root_only
async def test_shoal_session_kill_of_a_terminal_holding_a_setsid_sleep_ends_it_all(
        fleet: Fleet, client: Client) -> None:
    sleep = f"300.{int.from_bytes(os.urandom(3), 'big'):08d}"  # unique on this machine
    rec = await wait_running(client, (await client.create_session(m.SessionSpec(
        shell=f"(setsid sleep {sleep} &); echo started; sleep 300", tty=True))).id)
    for _ in range(200):
        if _alive_with_arg(sleep):
            break
        await asyncio.sleep(0.05)
    assert _alive_with_arg(sleep), "the setsid sleep never started: the test shows nothing"
    r = fleet.shoal("session", "kill", rec.id)
    assert r.returncode == 0, r.stderr
    done = await client.wait(rec.id, timeout=GRACE)  # final within the grace period
    assert done.state == "killed", done
    assert _alive_with_arg(sleep) == []
    assert _left(rec.id) == []
    await client.remove(rec.id)


@root_only
async def test_a_terminal_whose_leader_exits_ends_though_a_setsid_sleep_holds_it(
        client: Client) -> None:
    sleep = f"300.{int.from_bytes(os.urandom(3), 'big'):08d}"
    rec = await client.create_session(m.SessionSpec(
        shell=f"(setsid sleep {sleep} &); sleep 1; exit 0", tty=True))
    done = await client.wait(rec.id, timeout=GRACE + 10)
    assert done.state == "exited" and done.exit_code == 0, done
    assert _alive_with_arg(sleep) == []
    await client.remove(rec.id)


SURVIVOR = ("import os, time\n"
            "while True:\n"
            "    if os.fork():\n"
            "        os._exit(0)\n"
            "    time.sleep(0.003)\n")


@root_only
async def test_a_fork_and_exit_survivor_is_gone_and_the_user_deleted(client: Client) -> None:
    rec = await wait_running(client, (await client.create_session(m.SessionSpec(
        shell=f"setsid python3 -c '{SURVIVOR}' & sleep 1; echo ready; sleep 300",
        user="ephemeral"))).id)
    uid = pwd.getpwnam(rec.user).pw_uid
    for _ in range(100):
        if len(_of_uid(uid)) >= 3:
            break
        await asyncio.sleep(0.05)
    await client.kill(rec.id)
    await client.wait(rec.id, timeout=GRACE + 10)
    for _ in range(100):  # the user goes once the session has ended
        try:
            pwd.getpwnam(rec.user)
        except KeyError:
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError(f"{rec.user} still exists")
    await asyncio.sleep(0.5)  # a survivor would still be forking now
    assert _of_uid(uid) == []
    await client.remove(rec.id)


@root_only
async def test_uids_are_not_reused_across_throwaway_sessions(client: Client) -> None:
    uids = []
    for _ in range(2):
        rec = await client.create_session(m.SessionSpec(shell="id -u", user="ephemeral"))
        done = await client.wait(rec.id)
        uids.append(int((await _output(client, done.id)).decode().split()[0]))
        for _ in range(100):  # deleted before the next one is made
            try:
                pwd.getpwuid(uids[-1])
            except KeyError:
                break
            await asyncio.sleep(0.1)
        await client.remove(rec.id)
    assert uids[0] != uids[1], uids
    assert all(u >= users.UID_FIRST for u in uids)


@root_only
async def test_files_and_sysv_ipc_of_a_throwaway_user_are_gone(client: Client) -> None:
    script = ("touch /run/lock/shoal-left /dev/shm/shoal-left /var/tmp/shoal-left "
              "/tmp/shoal-left; ipcmk -M 4096 >/dev/null; echo wrote; "
              "touch /shoal-root-left 2>/dev/null || echo ro-root")
    rec = await client.create_session(m.SessionSpec(shell=script, user="ephemeral"))
    done = await client.wait(rec.id)
    out = await _output(client, done.id)
    assert b"wrote" in out and b"ro-root" in out, out
    uid = pwd.getpwnam(done.user).pw_uid if _exists(done.user) else None
    for _ in range(100):
        if not _exists(done.user):
            break
        await asyncio.sleep(0.1)
    for place in ("/run/lock", "/dev/shm", "/var/tmp", "/tmp"):
        assert not Path(place, "shoal-left").exists() or \
            Path(place, "shoal-left").stat().st_uid != uid, place
    assert not Path("/shoal-root-left").exists()
    if uid is not None:
        assert users.sysv_ipc_of(uid) == []
    await client.remove(rec.id)


def _exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


@root_only
async def test_sysv_ipc_left_in_the_host_namespace_is_removed() -> None:
    # users.remove also sweeps the host's IPC namespace (for a UID whose process got there).
    user = await asyncio.to_thread(users.create)
    proc = await asyncio.create_subprocess_exec("ipcmk", "-M", "4096", user=user.uid,
                                                group=user.gid, stdout=asyncio.subprocess.PIPE)
    await proc.communicate()
    assert users.sysv_ipc_of(user.uid), "ipcmk made no segment"
    assert await users.remove(user.name)
    assert users.sysv_ipc_of(user.uid) == []
    assert not _exists(user.name)


@root_only
async def test_a_memory_limit_bites_and_says_so(client: Client) -> None:
    rec = await client.create_session(m.SessionSpec(
        command=["python3", "-c", "b = b'x' * (400 << 20); print('survived')"],
        limits=m.Limits(memory_mb=64)))
    done = await client.wait(rec.id, timeout=30)
    assert done.state == "killed" and done.signal == signal.SIGKILL, done
    assert "out of memory" in done.reason and "64 MiB" in done.reason, done.reason
    assert b"survived" not in await _output(client, done.id)
    await client.remove(rec.id)


@root_only
async def test_a_file_size_limit_bites(client: Client) -> None:
    rec = await client.create_session(m.SessionSpec(
        shell="head -c 3000000 /dev/zero > /tmp/big; echo rc=$?; wc -c < /tmp/big",
        user="ephemeral", limits=m.Limits(file_size_mb=1)))
    done = await client.wait(rec.id, timeout=30)
    out = (await _output(client, done.id)).decode()
    assert f"rc={128 + signal.SIGXFSZ}" in out and "1048576" in out, out
    await client.remove(rec.id)


FORKER = ("import os, sys, time\n"
          "for i in range(40):\n"
          "    try:\n"
          "        if os.fork() == 0:\n"
          "            time.sleep(30)\n"
          "            os._exit(0)\n"
          "    except OSError as e:\n"
          "        print('fork failed after', i, e)\n"
          "        sys.exit(3)\n"
          "print('forked 40')\n")


@root_only
async def test_a_pids_limit_bites_and_says_so(client: Client) -> None:
    rec = await client.create_session(m.SessionSpec(
        command=["python3", "-c", FORKER], limits=m.Limits(processes=10)))
    done = await client.wait(rec.id, timeout=30)
    out = await _output(client, done.id)
    assert b"fork failed" in out, out
    assert done.state == "exited" and done.exit_code == 3, done
    assert "limit of 10 processes" in done.reason, done.reason
    assert _left(rec.id) == []
    await client.remove(rec.id)


def _keeper_of(agent_pid: int) -> psutil.Process:
    for child in psutil.Process(agent_pid).children():
        if "shoal.agent.keeper" in " ".join(child.cmdline()):
            return child
    raise AssertionError("the agent has no keeper")


async def _doomed_session(fleet: Fleet, client: Client, name: str) -> tuple[Any, m.SessionRecord]:
    agent = fleet.agent(name)
    rec = await wait_running(client, (await client.create_session(m.SessionSpec(
        shell="(setsid sleep 300 &); (setsid sh -c '(sleep 302 &)' &); sleep 300",
        node=name))).id)
    for _ in range(100):
        if len(_left(rec.id)) >= 3:
            break
        await asyncio.sleep(0.05)
    assert len(_left(rec.id)) >= 3
    return agent, rec


async def _until_gone(sid: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while _left(sid) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert _left(sid) == []


@root_only
async def test_a_sigkilled_agent_leaves_no_session_process_running(
        fleet: Fleet, client: Client) -> None:
    agent, rec = await _doomed_session(fleet, client, "doomed")
    agent.send_signal(signal.SIGKILL)
    agent.wait(10)
    await _until_gone(rec.id, GRACE + 15)  # its keeper ended them, no restart needed
    again = fleet.agent("doomed")
    again.send_signal(signal.SIGTERM)
    again.wait(30)
    await client.remove(rec.id)


@root_only
async def test_the_next_start_ends_what_an_agent_and_its_keeper_left(
        fleet: Fleet, client: Client) -> None:
    agent, rec = await _doomed_session(fleet, client, "doomed2")
    keeper = _keeper_of(agent.pid)
    keeper.kill()  # as if the machine's OOM killer took both
    agent.send_signal(signal.SIGKILL)
    agent.wait(10)
    await asyncio.sleep(1.0)
    assert _left(rec.id), "nothing was left to clean up: the test shows nothing"
    again = fleet.agent("doomed2")
    await _until_gone(rec.id, 20)
    again.send_signal(signal.SIGTERM)
    again.wait(30)
    await client.remove(rec.id)


def test_nodes_without_cgroups_say_so() -> None:
    from shoal.cli.tables import _isolation

    assert _isolation(m.NodeInfo(name="a", isolation=True, cgroups="v2")) == "users,cgroups"
    assert _isolation(m.NodeInfo(name="a", isolation=True)) == "users"
    assert "none" in _isolation(m.NodeInfo(name="a"))


@root_only
def test_an_agent_that_is_not_root_has_no_cgroups() -> None:
    import subprocess
    import sys

    r = subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
                        sys.executable, "-c",
                        "from shoal.agent import cgroups; print(cgroups.detect('x'))"],
                       capture_output=True, text=True, timeout=30)
    assert r.stdout.strip() == "the agent is not root", r


@root_only
async def test_a_process_stopped_as_soon_as_it_is_spawned_is_stopped(tmp_path: Path) -> None:
    # On the fast path a shell joins the cgroup first (which may wait for the kernel): a
    # stop that comes before must still reach the command, never find an "empty" unit.
    from shoal.agent import cgroups as cg
    from shoal.agent import procs

    layout = cg.detect("test" + os.urandom(4).hex())
    assert not isinstance(layout, str), layout
    units: list[cg.Unit] = []
    try:
        for i in range(5):
            unit = cg.Unit(layout, f"t.r.{i}")
            unit.create()
            units.append(unit)
            child = procs.spawn(["sh", "-c", "(setsid sleep 300 &); exec sleep 301"],
                                dict(os.environ), run_as=procs.RunAs(unit=unit))
            await procs.terminate(child, 1.0)
            code, sig = await asyncio.wait_for(child.wait(), 10)
            assert sig in (signal.SIGTERM, signal.SIGKILL), (code, sig)
            await child.end_rest(0)
            assert unit.pids() == []
            child.close_fds()
            assert unit.remove()
    finally:  # a failure leaves nothing running either
        for unit in units:
            await unit.kill_all()
            unit.remove()
        for d in layout.base_dirs():
            cg.remove_dir(d)
