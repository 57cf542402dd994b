"""Starting and ending processes: each in its own session and process group (and, where the
node has cgroups, its own cgroup), with pipes or a pseudo-terminal, waited on through a pidfd
(no threads, no SIGCHLD handler).

The end of a process is the end of everything it started: with a cgroup, the cgroup being
empty (nothing forked, setsid'd or double-forked survives ``terminate`` or the leader's
exit); without one, its process group and every process that still carries its marker in
its environment (``escaped``: a setsid'd child that holds the pty). Never "EOF on the pipe":
a background process that holds the pipe or pty open does not keep it alive. The owner of a
started process, with its output, input and end, is agent/process.py.

(Over 400 lines: fork/exec with its confinement steps and the signalling of everything a
child started are one mechanism; splitting it would spread the order of the child's steps.)
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import logging
import os
import resource
import signal
import struct
import subprocess
import termios
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..system.process import die_with_parent, group_alive, kill_group, no_new_privileges
from . import sandbox
from .cgroups import Unit

log = logging.getLogger(__name__)

_leaders: set[int] = set()  # children we spawned and wait on ourselves (never reaped for us)
PIPE_SIZE = 1 << 20  # a bigger pipe means fewer, larger reads under heavy output
_F_SETPIPE_SZ = 1031


class SpawnError(Exception):
    """The command could not be started; ``code`` is the shell-style exit status to report."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _acquire_controlling_tty() -> None:
    # Runs in the child after setsid(): make the pty slave (fd 0) our controlling terminal.
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def set_winsize(fd: int, cols: int, rows: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _grow_pipe(fd: int) -> None:
    try:
        fcntl.fcntl(fd, _F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass  # capped by /proc/sys/fs/pipe-max-size for unprivileged users; fine either way


@dataclass
class Child:
    """A started process. ``pgid`` equals ``pid``: every child leads its own group."""

    popen: subprocess.Popen[bytes]
    stdin_fd: int | None  # write end of stdin (the pty master when tty)
    out_fds: dict[str, int]  # stream name -> read end
    tty: bool
    unit: Unit | None = None  # its cgroup, if the node has cgroups
    left_orphans: bool = False  # processes outlived the leader
    marker: bytes = b""  # KEY=value in the environment of all it starts (see ``escaped``)
    started: float = field(default_factory=time.time)

    @property
    def pid(self) -> int:
        return self.popen.pid

    async def wait(self) -> tuple[int | None, int | None]:
        """Wait for exit; returns (exit code, signal number), exactly one of them set."""
        if self.popen.returncode is None:
            loop = asyncio.get_running_loop()
            pidfd = os.pidfd_open(self.pid)
            done = loop.create_future()

            def exited() -> None:
                if not done.done():
                    done.set_result(None)

            loop.add_reader(pidfd, exited)
            try:
                if self.popen.poll() is None:
                    await done
            finally:
                loop.remove_reader(pidfd)
                os.close(pidfd)
            self.popen.wait()
        _leaders.discard(self.pid)
        rc = self.popen.returncode
        assert rc is not None
        return (rc, None) if rc >= 0 else (None, -rc)

    def signal_group(self, sig: int) -> bool:
        """Signal every process of the child: its cgroup, else its process group."""
        if self.unit is not None:
            self.unit.signal(sig)
            return True
        return kill_group(self.pid, sig)

    async def until_running(self, timeout: float = 10.0) -> None:
        """Until the command itself runs: on the fast path a tiny shell first joins the
        cgroup (which may wait for the kernel), and a signal sent meanwhile would reach
        that shell, not the command."""
        if self.unit is None:
            return
        deadline = time.monotonic() + timeout
        delay = 0.001
        while not self._in_unit() and time.monotonic() < deadline:
            await asyncio.sleep(delay)
            delay = min(0.02, delay * 2)

    def _in_unit(self) -> bool:
        assert self.unit is not None
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in "ZX":
                    return True  # it has already ended
            with open(f"/proc/{self.pid}/cgroup") as f:
                return f"/{self.unit.name}\n" in f.read()
        except (OSError, IndexError):
            return True

    async def end_rest(self, leftover: float, kill_timeout: float = 5.0) -> None:
        """The leader has exited: give what it left in the background ``leftover`` seconds,
        then kill it all (its cgroup; else its group and what escaped it, see ``escaped``).
        Returns when nothing of the child is left, or ``kill_timeout`` after the kill."""
        if self.unit is not None:
            await self.until_running()
            if self.unit.populated():
                self.left_orphans = True  # their zombies come to us: reap_orphans
                if not await self.unit.wait_empty(leftover):
                    await self._kill_unit(kill_timeout)
            return
        await self._wait_gone(leftover)
        await self._kill_all(kill_timeout)

    async def stop(self, term_timeout: float, kill_timeout: float = 5.0) -> None:
        """SIGTERM every process of the child; SIGKILL what is left after ``term_timeout``;
        returns when nothing is left, or ``kill_timeout`` after the SIGKILL (a process in
        uninterruptible sleep) with an error logged."""
        if self.unit is not None:
            await self.until_running()  # an empty unit may only mean "not joined yet"
            self.unit.signal(signal.SIGTERM)
            if not await self.unit.wait_empty(term_timeout):
                await self._kill_unit(kill_timeout)
            return
        self._signal_rest(signal.SIGTERM)
        await self._wait_gone(term_timeout)
        await self._kill_all(kill_timeout)

    async def _kill_unit(self, timeout: float) -> None:
        assert self.unit is not None
        deadline = time.monotonic() + timeout
        while True:
            self.unit.kill()
            if await self.unit.wait_empty(0.5):
                return
            if time.monotonic() >= deadline:
                log.error("pid %d: cgroup %s not empty %gs after SIGKILL", self.pid,
                          self.unit.name, timeout)
                return

    def _signal_rest(self, sig: int) -> list[int]:
        """Without a cgroup: signal the group and what escaped it; returns the escapees."""
        kill_group(self.pid, sig)
        others = escaped(self.marker, self.pid)
        for pid in others:
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        return others

    def _gone(self) -> bool:
        # The leader counts until reaped (its zombie keeps the group id).
        leader = self.popen.returncode is None and self.popen.poll() is None
        return not leader and not group_alive(self.pid) and not escaped(self.marker, self.pid)

    async def _wait_gone(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        delay = 0.005
        while not self._gone():
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(delay)
            delay = min(0.1, delay * 2)
        return True

    async def _kill_all(self, timeout: float) -> None:
        self._signal_rest(signal.SIGKILL)
        if not await self._wait_gone(timeout):
            log.error("pid %d: processes left %gs after SIGKILL", self.pid, timeout)

    def close_fds(self) -> None:
        fds = set(self.out_fds.values())
        if self.stdin_fd is not None:
            fds.add(self.stdin_fd)
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.out_fds.clear()
        self.stdin_fd = None


@dataclass(frozen=True)
class RunAs:
    """Who a child runs as, where, and what it may use (defaults: the agent's own user, no
    cgroup, no limits)."""

    uid: int | None = None
    gid: int | None = None
    groups: tuple[int, ...] = ()  # supplementary groups (a named user's; agent/runas.py)
    rlimits: tuple[tuple[int, int], ...] = ()  # (resource.RLIMIT_*, value)
    unit: Unit | None = None  # the cgroup it joins before exec (created by the caller)
    sandbox: sandbox.Sandbox | None = None  # private mounts and IPC (throwaway users)


def spawn(
    argv: list[str],
    env: Mapping[str, str],
    *,
    cwd: str | None = None,
    tty: bool = False,
    cols: int = 80,
    rows: int = 24,
    stdin: bool = False,
    run_as: RunAs | None = None,
) -> Child:
    """Start ``argv`` as is (never through a shell) in a new session.

    Raises SpawnError with code 127 when the command does not exist and 126 when it cannot
    be executed, as a shell would report them.
    """
    if run_as is not None and run_as.unit is not None and _joined_by_shell(run_as, tty):
        _check_executable(argv[0], env, cwd)
        argv = ["/bin/sh", "-c", _JOIN, "sh", *run_as.unit.procs_files, "--", *argv]
    extra = _popen_extras(run_as, tty, cwd)
    try:
        if tty:
            child = _spawn_pty(argv, env, cwd, cols, rows, extra)
        else:
            child = _spawn_pipes(argv, env, cwd, stdin, extra)
        child.unit = run_as.unit if run_as is not None else None
        _leaders.add(child.pid)
        return child
    except subprocess.SubprocessError as e:  # a confinement step failed in the child
        raise SpawnError(f"cannot confine {argv[0]}: {e}", 126) from e
    except FileNotFoundError as e:
        if cwd is not None and e.filename == cwd:
            raise SpawnError(f"no such directory: {cwd}", 1) from e
        raise SpawnError(f"command not found: {argv[0]}", 127) from e
    except PermissionError as e:
        raise SpawnError(f"permission denied: {argv[0]}", 126) from e
    except NotADirectoryError as e:
        raise SpawnError(f"not a directory: {e.filename}", 126) from e
    except OSError as e:
        if e.errno == errno.ENOEXEC:
            raise SpawnError(f"cannot execute {argv[0]}: exec format error", 126) from e
        raise SpawnError(f"cannot start {argv[0]}: {e.strerror}", 126) from e


def _popen_extras(run_as: RunAs | None, tty: bool, cwd: str | None) -> dict[str, Any]:
    """Popen arguments for confinement. Without a preexec function Popen can use vfork,
    which matters when starting a thousand processes at once; a cgroup needs one."""
    extra: dict[str, Any] = {}
    steps = _child_steps(run_as, tty, cwd)
    if run_as is not None and run_as.uid is not None and not _needs_root(run_as):
        extra.update(user=run_as.uid, group=run_as.gid, extra_groups=list(run_as.groups))
    if steps:
        def preexec() -> None:
            for step in steps:
                step()

        extra["preexec_fn"] = preexec
    return extra


def _needs_root(run_as: RunAs) -> bool:
    return run_as.unit is not None or run_as.sandbox is not None


def _child_steps(run_as: RunAs | None, tty: bool, cwd: str | None) -> list[Callable[[], None]]:
    """What the child does between fork and exec, in order. Steps that need root (joining
    the cgroup, mounting) come before the switch to the session's user, and the switch
    itself is the last but one; a new step (e.g. a network policy) goes where it needs."""
    steps: list[Callable[[], None]] = []
    if tty:
        steps.append(_acquire_controlling_tty)
    if run_as is None:
        return steps
    if run_as.unit is not None and not _joined_by_shell(run_as, tty):
        procs = run_as.unit.procs_files

        def join_cgroup() -> None:
            for path in procs:  # before exec: nothing it starts is ever outside
                fd = os.open(path, os.O_WRONLY)
                try:
                    os.write(fd, b"0")
                finally:
                    os.close(fd)

        steps.append(join_cgroup)
    if run_as.sandbox is not None:
        box = run_as.sandbox
        steps.append(lambda: sandbox.enter(box))
    if run_as.rlimits:
        limits = run_as.rlimits

        def set_limits() -> None:
            for res, value in limits:
                resource.setrlimit(res, (value, value))

        steps.append(set_limits)
    if run_as.uid is not None and _needs_root(run_as):
        uid, gid = run_as.uid, run_as.gid if run_as.gid is not None else run_as.uid
        groups = list(run_as.groups)

        def drop_privileges() -> None:
            os.setgroups(groups)
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            die_with_parent()  # a change of credentials cleared it
            if cwd is not None:
                os.chdir(cwd)  # again: a tmpfs may now be mounted over it
            if throwaway:
                no_new_privileges()

        throwaway = run_as.sandbox is not None
        steps.append(drop_privileges)
    elif run_as.unit is not None and not _joined_by_shell(run_as, tty):
        steps.append(die_with_parent)
    return steps


# Joins the cgroup files given before "--", then becomes the command after it.
_JOIN = 'for f do shift; [ "$f" = -- ] && break; echo 0 >"$f" || exit 126; done; exec "$@"'


def _joined_by_shell(run_as: RunAs, tty: bool) -> bool:
    """The fast path, for a process of the agent's own user with nothing else to do before
    exec: Popen can vfork (a preexec step forks the whole agent, and joining a cgroup may
    wait for an RCU grace period, both on the event loop), and a tiny /bin/sh joins the
    cgroup and execs the command, so the command and all it starts are inside from their
    first instruction. Its failure to start is checked here first, to report it as
    before."""
    return not (tty or run_as.uid is not None or run_as.rlimits or run_as.sandbox is not None)


def _check_executable(cmd: str, env: Mapping[str, str], cwd: str | None) -> None:
    """Raise the SpawnError that exec would give (as execvp searches PATH)."""
    if "/" in cmd:
        candidates = [cmd if os.path.isabs(cmd) or cwd is None else os.path.join(cwd, cmd)]
    else:
        candidates = [os.path.join(d or ".", cmd) for d in os.get_exec_path(dict(env))]
        if cwd is not None:
            candidates = [c if os.path.isabs(c) else os.path.join(cwd, c) for c in candidates]
    denied = False
    for path in candidates:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            try:
                with open(path, "rb") as f:
                    magic = f.read(4)
            except OSError:
                return
            if magic.startswith(b"#!") or magic == b"\x7fELF":
                return
            raise SpawnError(f"cannot execute {cmd}: exec format error", 126)
        denied = denied or os.path.exists(path)
    if cwd is not None and not os.path.isdir(cwd):
        raise SpawnError(f"no such directory: {cwd}", 1)
    if denied:
        raise SpawnError(f"permission denied: {cmd}", 126)
    raise SpawnError(f"command not found: {cmd}", 127)

def _spawn_pipes(argv: list[str], env: Mapping[str, str], cwd: str | None,
                 stdin: bool, extra: dict[str, Any]) -> Child:
    popen = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(env),
        cwd=cwd,
        start_new_session=True,  # own session and process group
        close_fds=True,
        **extra,
    )
    assert popen.stdout is not None and popen.stderr is not None
    out = {"stdout": os.dup(popen.stdout.fileno()), "stderr": os.dup(popen.stderr.fileno())}
    popen.stdout.close()
    popen.stderr.close()
    stdin_fd = None
    if popen.stdin is not None:
        stdin_fd = os.dup(popen.stdin.fileno())
        popen.stdin.close()
        os.set_blocking(stdin_fd, False)
    for fd in out.values():
        _grow_pipe(fd)
        os.set_blocking(fd, False)
    return Child(popen, stdin_fd, out, tty=False)


def _spawn_pty(argv: list[str], env: Mapping[str, str], cwd: str | None,
               cols: int, rows: int, extra: dict[str, Any]) -> Child:
    master, slave = os.openpty()
    try:
        set_winsize(master, cols, rows)
        popen = subprocess.Popen(
            argv,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
            close_fds=True,
            **extra,
        )
    except BaseException:
        os.close(master)
        raise
    finally:
        os.close(slave)
    os.set_blocking(master, False)
    return Child(popen, master, {"pty": master}, tty=True)


async def terminate(child: Child, grace: float) -> None:
    """SIGTERM every process of the child, then SIGKILL whatever is left after ``grace``.
    Returns when nothing of the child is left (bounded: ``Child.stop``)."""
    await child.stop(grace)


# --------------------------------------------------------------------------- orphans

_PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Orphans of our children are re-parented to us rather than to PID 1 (which may not
    reap them): they stay ours to reap."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return bool(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)


def reap_orphans(marker: str) -> int:
    """Reap zombies re-parented to us whose cgroup path holds ``marker`` (our units): never
    a child someone else waits on (our leaders, asyncio's, the embedded nats-server)."""
    me = os.getpid()
    n = 0
    try:
        tasks = os.listdir(f"/proc/{me}/task")
    except OSError:
        return 0
    for tid in tasks:
        try:
            with open(f"/proc/{me}/task/{tid}/children") as f:
                pids = [int(p) for p in f.read().split()]
        except (OSError, ValueError):
            continue
        for pid in pids:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
                if state != "Z" or pid in _leaders:
                    continue
                with open(f"/proc/{pid}/cgroup") as f:
                    if marker not in f.read():
                        continue
                os.waitpid(pid, os.WNOHANG)
                n += 1
            except (OSError, IndexError):
                continue
    return n


# --------------------------------------------------------------------------- escapees

def escaped(marker: bytes, pgid: int) -> list[int]:
    """Without a cgroup: live processes outside group ``pgid`` whose environment carries
    ``marker`` (every child of a run or session gets its id there). This finds a setsid'd
    or double-forked child; one that cleared its environment is not found (only a cgroup
    holds that). Costs a read of every process's environ: used only at the end."""
    if not marker:
        return []
    found = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        pid = int(entry)
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if fields[0] in "ZX" or int(fields[2]) == pgid:
                continue  # a zombie, or in the group (signalled as a group)
            with open(f"/proc/{pid}/environ", "rb") as f:
                if marker in f.read().split(b"\0"):
                    found.append(pid)
        except (OSError, IndexError, ValueError):
            continue
    return found
