"""The agent's process owner (agent/process.py), driven directly: no NATS, real processes,
with and without a cgroup. Input is buffered, bounded and never lost; output pauses and
resumes; a stop is SIGTERM then SIGKILL, each with its own timeout; the end of a process
is the end of everything it started, even a setsid'd child that holds the terminal."""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from shoal.agent import cgroups, process, procs
from shoal.agent.cgroup_layout import Layout
from shoal.agent.ledger import Ledger, reap_leftovers
from shoal.agent.process import Ended, Launch, Process
from shoal.wire import messages as m

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="cgroups need root")


@pytest.fixture(params=["no-cgroup", pytest.param("cgroup", marks=root_only)])
def layout(request: pytest.FixtureRequest) -> Iterator[Layout | None]:
    if request.param == "no-cgroup":
        yield None
        return
    found = cgroups.detect("test" + os.urandom(4).hex())
    assert not isinstance(found, str), found
    try:
        yield found
    finally:
        cgroups.drop_spares()
        for d in found.base_dirs():
            cgroups.remove_dir(d)


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    led = Ledger(tmp_path / "ledgers" / "n.ledger", "n")
    led.open()
    yield led
    led.close()


class Owned:
    """A Process with its output collected."""

    def __init__(self, launch: Launch, ledger: Ledger, layout: Layout | None,
                 watch_at_wait: bool = False) -> None:
        self.out: dict[str, bytearray] = {}
        self.reads = 0
        self.pause_after: int | None = None
        self.proc = Process(launch, ledger, layout, self._on_output,
                            watch_at_wait=watch_at_wait)

    def _on_output(self, stream: str, data: bytes) -> None:
        self.out.setdefault(stream, bytearray()).extend(data)
        self.reads += 1
        if self.pause_after is not None and self.reads >= self.pause_after:
            self.proc.pause()

    def text(self, stream: str) -> str:
        return bytes(self.out.get(stream, b"")).decode(errors="replace")

    async def until_output(self, stream: str, needle: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.text(stream):
            assert time.monotonic() < deadline, f"no {needle!r} in {self.text(stream)!r}"
            await asyncio.sleep(0.02)


_n = 0


def launch(argv: list[str], **kw: object) -> Launch:
    global _n
    _n += 1
    key = f"t{os.getpid()}-{_n}-{os.urandom(3).hex()}"
    env = {**os.environ, "SHOAL_TEST_PROC": key, "SHOAL_NODE": "n"}
    return Launch(argv, env, f"test {key}", marker=("SHOAL_TEST_PROC", key),
                  unit=f"n.t.{key}", **kw)  # type: ignore[arg-type]


@pytest.fixture
async def owned(ledger: Ledger, layout: Layout | None) -> AsyncIterator[list[Owned]]:
    made: list[Owned] = []
    yield made
    for o in made:  # a failed test leaves nothing running either
        await o.proc.close()


def start(made: list[Owned], ln: Launch, ledger: Ledger, layout: Layout | None) -> Owned:
    o = Owned(ln, ledger, layout)
    o.proc.start()
    made.append(o)
    return o


def alive_with_arg(arg: str) -> list[int]:
    """Live processes (not zombies) whose command line holds ``arg``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in "ZX":
                    continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if arg.encode() in f.read().split(b"\0"):
                    found.append(int(entry))
        except (OSError, IndexError):
            continue
    return found


def unique_sleep() -> str:
    """A sleep of ~300 s that no other process has on its command line."""
    return f"300.{int.from_bytes(os.urandom(3), 'big'):08d}"


# --------------------------------------------------------------------------- input

SLOW_SHA = ("import hashlib, sys, time\n"
            "h, n = hashlib.sha256(), 0\n"
            "while True:\n"
            "    b = sys.stdin.buffer.read1(4096)\n"
            "    if not b: break\n"
            "    h.update(b); n += len(b); time.sleep(0.0005)\n"
            "print(n, h.hexdigest(), flush=True)\n")


async def test_input_to_a_slow_reader_is_held_and_none_is_lost(
        owned: list[Owned], ledger: Ledger, layout: Layout | None) -> None:
    o = start(owned, launch(["python3", "-c", SLOW_SHA], stdin=True), ledger, layout)
    sent = hashlib.sha256()
    total = 0
    most_held = 0
    for i in range(48):  # 3 MiB at once: far more than a pipe holds
        chunk = bytes([i]) * (64 << 10)
        assert o.proc.write(chunk)
        sent.update(chunk)
        total += len(chunk)
        most_held = max(most_held, o.proc.held)
    assert most_held > 0, "every write went straight through: nothing was held"
    assert most_held <= process.STDIN_LIMIT
    o.proc.end_input()
    ended = await asyncio.wait_for(o.proc.wait(), 60)
    assert ended.code == 0, (ended, o.text("stderr"))
    assert o.text("stdout").split() == [str(total), sent.hexdigest()]
    assert o.proc.written == total and o.proc.held == 0


WAIT_THEN_SHA = 'while [ ! -e "$1" ]; do sleep 0.02; done; exec sha256sum'


async def test_input_is_bounded_and_a_refusal_is_said_not_dropped(
        owned: list[Owned], ledger: Ledger, layout: Layout | None, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    go = tmp_path / "go"
    o = start(owned, launch(["sh", "-c", WAIT_THEN_SHA, "sh", str(go)], stdin=True),
              ledger, layout)
    accepted = hashlib.sha256()
    chunk = b"x" * (256 << 10)
    with caplog.at_level(logging.WARNING, logger="shoal.agent.process"):
        for _ in range(process.STDIN_LIMIT // len(chunk) + 8):
            if not o.proc.write(chunk):
                break
            accepted.update(chunk)
            assert o.proc.held <= process.STDIN_LIMIT
        else:
            raise AssertionError("input beyond STDIN_LIMIT was taken")
    assert any("refused" in r.getMessage() for r in caplog.records), caplog.records
    assert o.proc.held <= process.STDIN_LIMIT
    go.touch()  # now it reads: everything accepted arrives, in order
    o.proc.end_input()
    ended = await asyncio.wait_for(o.proc.wait(), 60)
    assert ended.code == 0
    assert o.text("stdout").split()[0] == accepted.hexdigest()


# --------------------------------------------------------------------------- output

WRITER = ("import os, sys\n"
          "for _ in range(16): os.write(1, b'y' * (512 << 10))\n"
          "os.write(2, b'wrote all\\n')\n")


async def test_paused_output_blocks_the_writer_and_resume_delivers_all(
        owned: list[Owned], ledger: Ledger, layout: Layout | None) -> None:
    o = Owned(launch(["python3", "-c", WRITER]), ledger, layout)
    owned.append(o)
    o.pause_after = 1
    o.proc.start()
    for _ in range(100):
        if o.proc.paused:
            break
        await asyncio.sleep(0.02)
    assert o.proc.paused
    reads = o.reads
    await asyncio.sleep(1.0)
    # 8 MiB cannot fit in the pipe: paused, the writer is blocked and nothing is read.
    assert o.proc.poll() is None
    assert o.reads == reads and "wrote all" not in o.text("stderr")
    o.pause_after = None
    o.proc.resume()
    ended = await asyncio.wait_for(o.proc.wait(), 60)
    assert ended.code == 0 and ended.drained
    assert len(o.out["stdout"]) == 16 * (512 << 10)
    assert o.text("stderr") == "wrote all\n"


async def test_output_left_by_a_leader_that_ended_before_its_pipes_were_watched_is_all_read(
        owned: list[Owned], ledger: Ledger, layout: Layout | None) -> None:
    # A run's pipes are watched from its first wait() (watch_at_wait): a leader that has
    # ended by then has its output read at its end (Process._catch_up). Paused in the
    # middle of that (backpressure), the rest comes with resume; a background writer that
    # keeps a pipe open is read as it writes.
    async def ended_unwatched(argv: list[str], pause_after: int | None = None,
                              read_size: int | None = None) -> Owned:
        o = Owned(launch(argv), ledger, layout, watch_at_wait=True)
        o.pause_after = pause_after
        if read_size is not None:
            o.proc.read_size = read_size
        owned.append(o)
        o.proc.start()
        assert o.proc.child is not None
        while o.proc.child.popen.poll() is None:
            await asyncio.sleep(0.002)
        return o

    quick = await ended_unwatched(["sh", "-c", "echo out; echo err >&2"])
    ended = await asyncio.wait_for(quick.proc.wait(), 30)
    assert (quick.text("stdout"), quick.text("stderr"), ended.drained) == ("out\n", "err\n", True)

    o = await ended_unwatched(["sh", "-c", "head -c 30000 /dev/zero | tr '\\0' x; printf y >&2"],
                              pause_after=1, read_size=4096)
    waiting = asyncio.ensure_future(o.proc.wait())
    for _ in range(100):
        if o.proc.paused:
            break
        await asyncio.sleep(0.02)
    assert o.proc.paused and o.reads == 1 and not waiting.done()
    o.pause_after = None
    o.proc.resume()
    ended = await asyncio.wait_for(waiting, 30)
    assert ended.drained and o.text("stdout") == "x" * 30000 and o.text("stderr") == "y"

    late = await ended_unwatched(["sh", "-c", "(sleep 0.3; echo late) & echo early"])
    ended = await asyncio.wait_for(late.proc.wait(), 30)
    assert late.text("stdout") == "early\nlate\n", late.text("stdout")

    # Still running at the first wait(): watched from then on, its output read as it comes.
    live = Owned(launch(["sh", "-c", "echo first; read x; echo second"], stdin=True), ledger,
                 layout, watch_at_wait=True)
    owned.append(live)
    live.proc.start()
    waiting = asyncio.ensure_future(live.proc.wait())
    await live.until_output("stdout", "first")
    live.proc.write(b"go\n")
    ended = await asyncio.wait_for(waiting, 30)
    assert ended.code == 0 and live.text("stdout") == "first\nsecond\n"


# --------------------------------------------------------------------------- stop

IGNORES_TERM = ("import signal, time\n"
                "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                "print('ready', flush=True)\n"
                "time.sleep(300)\n")


async def test_stop_is_sigterm_then_sigkill_after_its_timeout(
        owned: list[Owned], ledger: Ledger, layout: Layout | None) -> None:
    o = start(owned, launch(["python3", "-c", IGNORES_TERM]), ledger, layout)
    await o.until_output("stdout", "ready")
    began = time.monotonic()
    await asyncio.wait_for(o.proc.stop(term_timeout=0.5, kill_timeout=5.0), 30)
    assert time.monotonic() - began >= 0.5  # SIGKILL only once the TERM timeout ran out
    ended = await asyncio.wait_for(o.proc.wait(), 30)
    assert ended.signal == signal.SIGKILL, ended

    polite = start(owned, launch(["sleep", "300"]), ledger, layout)
    await polite.proc.until_running()
    await asyncio.wait_for(polite.proc.stop(term_timeout=30.0), 30)
    assert (await polite.proc.wait()).signal == signal.SIGTERM


async def test_state_is_what_the_ledger_holds_until_the_end(
        owned: list[Owned], ledger: Ledger, layout: Layout | None) -> None:
    o = start(owned, launch(["sleep", "300"]), ledger, layout)
    state = o.proc.state()
    groups, _, dirs = ledger.entries()
    # In a cgroup, the cgroup is what the next agent ends; else the group and the marker
    # (what escapes the group is found by it).
    assert set(state.cgroup) <= dirs and bool(state.cgroup) == (layout is not None)
    assert (state.pid in groups) == (layout is None)
    assert ledger.markers() == ({state.marker} if layout is None else set())
    assert bool(state.marker) == (layout is None)
    await o.proc.stop(5.0)
    await o.proc.wait()
    groups, users, dirs = ledger.entries()
    assert (groups, users, ledger.markers()) == (set(), set(), set())
    # All the ledger still names is the cgroup kept for the node's next run, empty.
    assert dirs <= set(state.cgroup) and not any(cgroups.populated(d) for d in dirs)


async def test_the_next_agent_ends_what_escaped_the_group_from_the_ledger(
        owned: list[Owned], ledger: Ledger, layout: Layout | None) -> None:
    # As after a SIGKILLed agent: nothing of it ended the process, the ledger says what.
    sleep = unique_sleep()
    o = start(owned, launch(["sh", "-c", f"(setsid sleep {sleep} &); echo started; sleep 300"]),
              ledger, layout)
    await o.until_output("stdout", "started")
    for _ in range(200):
        if alive_with_arg(sleep):
            break
        await asyncio.sleep(0.02)
    assert alive_with_arg(sleep)
    assert await reap_leftovers(ledger, 1.0, layout) >= 1
    assert alive_with_arg(sleep) == []


# --------------------------------------------------------------------------- the end

async def _ended_with_nothing_left(o: Owned, sleep: str, how: str) -> Ended:
    await o.until_output("pty", "started")
    for _ in range(200):
        if alive_with_arg(sleep):
            break
        await asyncio.sleep(0.02)
    assert alive_with_arg(sleep), "the background sleep never started: the test shows nothing"
    if how == "stop":
        await asyncio.wait_for(o.proc.stop(term_timeout=5.0), 30)
    ended = await asyncio.wait_for(o.proc.wait(), 30)
    assert alive_with_arg(sleep) == []
    return ended


async def test_a_stopped_terminal_with_a_setsid_child_ends_and_leaves_nothing(
        owned: list[Owned], ledger: Ledger, layout: Layout | None) -> None:
    sleep = unique_sleep()
    o = start(owned, launch(["sh", "-c", f"(setsid sleep {sleep} &); echo started; sleep 300"],
                            tty=True, stdin=True), ledger, layout)
    ended = await _ended_with_nothing_left(o, sleep, "stop")
    assert ended.signal == signal.SIGTERM


async def test_a_terminal_whose_leader_exits_ends_despite_a_setsid_child(
        owned: list[Owned], ledger: Ledger, layout: Layout | None) -> None:
    sleep = unique_sleep()
    o = start(owned, launch(["sh", "-c", f"(setsid sleep {sleep} &); echo started; "
                                         "sleep 0.5; exit 3"], tty=True, stdin=True),
              ledger, layout)
    ended = await _ended_with_nothing_left(o, sleep, "exit")
    assert ended.code == 3


# --------------------------------------------------------------------------- spawn

async def test_a_child_is_in_its_cgroup_from_the_start_and_the_agent_stays_out(
        owned: list[Owned], ledger: Ledger, layout: Layout | None) -> None:
    # The agent carries a child into its unit (procs._carry_into): the command's own first
    # read of /proc/self/cgroup names the unit, what it forks at once is ended with it, and
    # the agent is back where it was.
    mine = Path("/proc/self/cgroup").read_text()
    sleep = unique_sleep()
    o = start(owned, launch(["sh", "-c", f"cat /proc/self/cgroup; setsid sleep {sleep} &"]),
              ledger, layout)
    assert Path("/proc/self/cgroup").read_text() == mine
    ended = await asyncio.wait_for(o.proc.wait(), 30)
    assert ended.code == 0, (ended, o.text("stderr"))
    if layout is not None:
        assert f"/{o.proc.launch.unit}\n" in o.text("stdout"), o.text("stdout")
    assert not alive_with_arg(sleep)
    assert Path("/proc/self/cgroup").read_text() == mine


async def test_a_batch_starts_each_child_in_its_own_cgroup_and_the_agent_ends_home(
        owned: list[Owned], ledger: Ledger, layout: Layout | None) -> None:
    # procs.batch: the agent goes from one child's unit straight into the next (one cgroup
    # write per child). Each command still starts in its own unit, one that fails to start
    # leaves no unit (the agent is never left in it), and the agent ends where it was.
    mine = Path("/proc/self/cgroup").read_text()
    with procs.batch():
        batch = [start(owned, launch(["sh", "-c", "cat /proc/self/cgroup"]), ledger, layout)
                 for _ in range(3)]
        failed = launch(["shoal-test-no-such-command"])
        with pytest.raises(procs.SpawnError, match="command not found"):
            Process(failed, ledger, layout, lambda stream, data: None).start()
        batch.append(start(owned, launch(["sh", "-c", "cat /proc/self/cgroup"]), ledger,
                           layout))
    assert Path("/proc/self/cgroup").read_text() == mine
    for o in batch:
        ended = await asyncio.wait_for(o.proc.wait(), 30)
        assert ended.code == 0, (ended, o.text("stderr"))
        if layout is not None:
            assert f"/{o.proc.launch.unit}\n" in o.text("stdout"), o.text("stdout")
    if layout is not None:
        assert layout.tracker is not None
        assert failed.unit is not None
        assert not list(Path(layout.tracker.own).rglob(failed.unit))


async def test_an_emptied_cgroup_is_kept_for_the_node_s_next_run_and_no_other(
        owned: list[Owned], ledger: Ledger, layout: Layout | None) -> None:
    # Making and removing a cgroup costs the kernel more than a run of `true` (see
    # cgroups._spares): the unit of a run that left nothing behind is kept, empty, for the
    # node's next run. One that left a process behind, or that sets a limit, is removed;
    # at most SPARES_PER_NODE are kept; drop_spares removes them.
    if layout is None:
        pytest.skip("needs cgroups")
    assert layout.tracker is not None
    base = Path(layout.tracker.own) / layout.base

    def units() -> set[str]:
        return {d.name for d in base.iterdir() if d.is_dir() and d.name.startswith("n.")}

    async def run(argv: list[str], **kw: object) -> Owned:
        o = start(owned, launch(argv, **kw), ledger, layout)
        ended = await asyncio.wait_for(o.proc.wait(), 30)
        assert ended.code == 0, (ended, o.text("stderr"))
        return o

    first = await run(["sh", "-c", "cat /proc/self/cgroup"])
    kept = first.proc.launch.unit
    assert units() == {kept} and not cgroups.populated(str(base / kept))
    second = await run(["sh", "-c", "cat /proc/self/cgroup"])
    assert f"/{kept}\n" in second.text("stdout")  # in the kept unit, not a new one
    assert units() == {kept}

    # Something outlived the leader: ended with its unit, which is not kept.
    sleep = unique_sleep()
    await run(["sh", "-c", f"setsid sleep {sleep} &"])
    assert not alive_with_arg(sleep) and units() == set()

    # A unit with a limit is made for its run (never a kept one) and removed after it.
    await run(["true"])
    assert len(units()) == 1
    limited = await run(["sh", "-c", "cat /proc/self/cgroup"], limits=m.Limits(processes=50))
    assert f"/{limited.proc.launch.unit}\n" in limited.text("stdout")
    assert len(units()) == 1 and limited.proc.launch.unit not in units()

    # Many at once: each in its own unit; no more than SPARES_PER_NODE are kept.
    many = [start(owned, launch(["sh", "-c", "cat /proc/self/cgroup; sleep 0.3"]), ledger,
                  layout) for _ in range(5)]
    for o in many:
        assert (await asyncio.wait_for(o.proc.wait(), 30)).code == 0
    assert len({o.text("stdout") for o in many}) == 5
    assert len(units()) == cgroups.SPARES_PER_NODE

    # A kept unit removed behind the agent's back (by a keeper, say) is not used.
    for name in units():
        (base / name).rmdir()
    again = await run(["sh", "-c", "cat /proc/self/cgroup"])
    assert f"/{again.proc.launch.unit}\n" in again.text("stdout")
    cgroups.drop_spares("n")
    assert units() == set()


@root_only
def test_a_keeper_whose_agent_died_ends_its_units_and_removes_the_bases_it_emptied() -> None:
    """The finding: every SIGKILLed agent whose keeper ended its units left its empty
    ``shoal.<tag>`` directories in each hierarchy (14 in each after one run of the suite)."""
    import subprocess

    from shoal.agent import keeper

    found = cgroups.detect("test" + os.urandom(4).hex())
    assert not isinstance(found, str), found
    sleeper: subprocess.Popen[bytes] | None = None
    try:
        other = cgroups.Unit(found, "other.u1")  # a live agent's of the same state directory
        other.create()
        mine = cgroups.Unit(found, "n.u1", m.Limits(memory_mb=64))  # in a v1 hierarchy too
        mine.create()
        sleeper = subprocess.Popen(["sleep", "300"])
        for f in mine.procs_files:
            with open(f, "w") as out:
                out.write(str(sleeper.pid))
        for expect_bases in (True, False):
            k = keeper.start(0.5, ["n"], found.base_dirs())
            assert k.stdin is not None
            k.stdin.close()  # EOF without "stop": its agent died
            assert k.wait(30) == 0
            assert not any(os.path.exists(d) for d in mine.dirs)
            assert [os.path.isdir(d) for d in found.base_dirs()] == [
                expect_bases and d == os.path.dirname(other.tracker) for d in found.base_dirs()]
            other.remove()  # that agent stopped too: the next keeper finds the base empty
        assert sleeper.wait(10) == -signal.SIGTERM
    finally:
        if sleeper is not None and sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()
        for d in found.base_dirs():
            for unit in ("other.u1", "n.u1"):
                cgroups.remove_dir(os.path.join(d, unit))
            cgroups.remove_dir(d)


async def test_a_busy_writer_s_pipe_grows_and_a_quiet_one_s_does_not(
        owned: list[Owned], ledger: Ledger, layout: Layout | None) -> None:
    # Growing a pipe to procs.PIPE_SIZE costs a syscall per stream: done once a read finds
    # the pipe full, never for a command that writes a line.
    get_pipe_size = 1032  # F_GETPIPE_SZ
    busy = start(owned, launch([sys.executable, "-c", "import sys\n"
                                "sys.stdout.buffer.write(b'x' * (4 << 20)); sys.stdout.flush()\n"
                                "sys.stdin.read()"], stdin=True), ledger, layout)
    quiet = start(owned, launch(["sh", "-c", "echo hi; read x"], stdin=True), ledger, layout)
    await busy.until_output("stdout", "x" * 100)
    await quiet.until_output("stdout", "hi")
    deadline = time.monotonic() + 20
    while len(busy.out.get("stdout", b"")) < 4 << 20:
        assert time.monotonic() < deadline, len(busy.out.get("stdout", b""))
        await asyncio.sleep(0.02)
    assert busy.proc.child is not None and quiet.proc.child is not None
    assert fcntl.fcntl(busy.proc.child.out_fds["stdout"], get_pipe_size) == procs.PIPE_SIZE
    assert fcntl.fcntl(quiet.proc.child.out_fds["stdout"], get_pipe_size) == procs.PIPE_DEFAULT
    for o in (busy, quiet):
        await o.proc.stop(5.0)
        await o.proc.wait()


async def test_a_child_gets_default_signal_dispositions(
        owned: list[Owned], ledger: Ledger, layout: Layout | None) -> None:
    # Python ignores SIGPIPE and SIGXFSZ; as Popen does, a child gets their defaults back
    # (`yes | head` must end by SIGPIPE).
    o = start(owned, launch(["grep", "^SigIgn", "/proc/self/status"]), ledger, layout)
    ended = await asyncio.wait_for(o.proc.wait(), 30)
    assert ended.code == 0, (ended, o.text("stderr"))
    ignored = int(o.text("stdout").split()[1], 16)
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):
        assert not ignored & (1 << (sig - 1)), (sig, o.text("stdout"))


SPAWN_WITH_AN_INHERITABLE_FD = """
import asyncio, json, os, sys
from pathlib import Path
from shoal.agent.ledger import Ledger
from shoal.agent.process import Launch, Process
fd = os.dup2(os.open("/dev/null", os.O_RDONLY), 100)  # inheritable, above what ls opens
out = bytearray()
async def main():
    led = Ledger(Path(sys.argv[1]) / "n.ledger", "n")
    led.open()
    p = Process(Launch(["ls", "/proc/self/fd"], dict(os.environ), "t"), led, None,
                lambda stream, data: out.extend(data) if stream == "stdout" else None)
    p.start()
    await p.wait()
asyncio.run(main())
print(fd, json.dumps(sorted(int(x) for x in out.split())))
"""


async def test_a_child_inherits_no_descriptor_of_the_agent(tmp_path: Path) -> None:
    # Popen's close_fds, without Popen: a descriptor the agent inherited (inheritable) does
    # not reach the processes it starts.
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SPAWN_WITH_AN_INHERITABLE_FD, str(tmp_path),
        stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0
    fd, seen = out.decode().split(" ", 1)
    assert int(fd) == 100 and 100 not in json.loads(seen), out
