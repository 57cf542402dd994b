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
import stat
import struct
import subprocess
import termios
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..system.process import SPAWNING, die_with_parent, group_alive, kill_group, no_new_privileges
from . import sandbox
from .cgroups import Unit

log = logging.getLogger(__name__)

_leaders: set[int] = set()  # children we spawned and wait on ourselves (never reaped for us)
# Held from fork until the child is in _leaders (spawns may run in worker threads), while the
# agent is carried into a unit, and by reap_orphans: it never reaps a child that is ours but
# not listed yet.
_spawning = SPAWNING
PIPE_SIZE = 1 << 20  # a bigger pipe means fewer, larger reads under heavy output
PIPE_DEFAULT = 1 << 16  # what the kernel gives a new pipe; a read this big: grow it
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


def grow_pipe(fd: int) -> None:
    """Give a busy writer's pipe PIPE_SIZE (done once a read finds it full: most commands
    never write that much, and each fcntl costs a syscall)."""
    try:
        fcntl.fcntl(fd, _F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass  # capped by /proc/sys/fs/pipe-max-size for unprivileged users; fine either way


class Leader(Protocol):
    """What a Child keeps of its leader: Popen's, or ``Spawned``'s for one posix_spawn'd."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    def poll(self) -> int | None: ...

    def wait(self) -> int: ...


class Spawned:
    """A leader started with os.posix_spawn, reaped as Popen reaps (returncode negative for
    a signal; a child reaped by someone else counts as 0, as Popen has it)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def _reap(self, flags: int) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, flags)
            except ChildProcessError:
                pid, status = self.pid, 0
            if pid == self.pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def poll(self) -> int | None:
        return self._reap(os.WNOHANG)

    def wait(self) -> int:
        rc = self._reap(0)
        assert rc is not None
        return rc


@dataclass
class Child:
    """A started process. ``pgid`` equals ``pid``: every child leads its own group."""

    popen: Leader
    stdin_fd: int | None  # write end of stdin (the pty master when tty)
    out_fds: dict[str, int]  # stream name -> read end
    tty: bool
    unit: Unit | None = None  # its cgroup, if the node has cgroups
    left_orphans: bool = False  # processes outlived the leader
    found_empty: bool = False  # its unit had nothing left when the leader ended
    by_shell: bool = False  # a shell joins the unit before it execs the command
    marker: bytes = b""  # KEY=value in the environment of all it starts (see ``escaped``)
    started: float = field(default_factory=time.time)

    @property
    def pid(self) -> int:
        return self.popen.pid

    async def wait(self) -> tuple[int | None, int | None]:
        """Wait for exit; returns (exit code, signal number), exactly one of them set."""
        # Polled first: in a fan-out most have exited by now (no pidfd, no epoll calls).
        if self.popen.returncode is None and self.popen.poll() is None:
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
        if self.unit is None or not self.by_shell:
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
            else:
                self.found_empty = True
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
    plain = not tty and (run_as is None or _joined_by_shell(run_as, tty))
    extra = {} if plain else _popen_extras(run_as, tty, cwd)  # no step: nothing to build
    try:
        # The lock also keeps a worker thread's spawn (or useradd) from starting while the
        # agent is carried into another unit: it would be created in that unit.
        with _spawning:
            # The unit the child joins without a step of its own: carried in, else by sh.
            unit = run_as.unit if run_as is not None and plain else None
            carried = _carry_into(unit) if unit is not None else None
            by_shell = carried is None and unit is not None
            if carried is None:
                _go_home()  # a child not carried is created where the agent belongs
                if unit is not None:
                    _check_executable(argv[0], env, cwd)
                    argv = ["/bin/sh", "-c", _JOIN, "sh", *unit.procs_files, "--", *argv]
            spawned = False
            try:
                if tty:
                    child = _spawn_pty(argv, env, cwd, cols, rows, extra)
                elif not extra and cwd is None:
                    child = _posix_spawn_pipes(argv, env, stdin)
                else:
                    child = _spawn_pipes(argv, env, cwd, stdin, extra)
                spawned = True
            finally:
                global _away
                if carried is not None:
                    # In a batch the agent stays until the next spawn takes it into the next
                    # unit; never in a unit whose spawn failed (it is removed at once).
                    _away = carried if _batching and spawned else None
                    if _away is None:
                        _carry_back(carried)
            _leaders.add(child.pid)
        child.unit = run_as.unit if run_as is not None else None
        child.by_shell = by_shell
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


def vforks(run_as: RunAs | None, tty: bool) -> bool:
    """Whether nothing runs in the child before exec (Popen can vfork): such a child holds
    no parent-death signal bound to the spawning thread, so it may be spawned from a worker
    thread (the GIL is released while vfork waits for the exec)."""
    return not _child_steps(run_as, tty, None)


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


_carry_off = ""  # why the agent no longer carries children into their cgroups


def _carry_into(unit: Unit) -> Unit | None:
    """The fastest way into a cgroup from the first instruction: the agent itself moves
    into the unit, spawns (the child is created there) and moves back, all in one
    synchronous step of the event loop under SPAWNING (no other coroutine runs, no worker
    thread creates a process, nothing can signal or kill the unit meanwhile). Two writes to
    cgroup.procs instead of a /bin/sh exec, which cost as much as the command itself
    (`true`: 0.5 ms of the 1.1). Only for a unit that is
    just its tracking directory and sets no limit (the agent must never count against a
    run's memory or process limit). None: join it with the shell."""
    if _carry_off or unit.limited or len(unit.dirs) != 1 or unit.layout.tracker is None:
        return None
    try:
        _join(unit.procs_files[0])
    except OSError as e:
        log.debug("cannot carry a child into %s (%s): joined by the shell", unit.name, e)
        return None
    return unit


_batching = False  # inside ``batch()``
_away: Unit | None = None  # the unit the agent stayed in after carrying a child there
_found: dict[tuple[str, str], str] = {}  # (command, PATH) -> the file, within a batch


@contextlib.contextmanager
def batch(found: dict[tuple[str, str], str] | None = None) -> Iterator[None]:
    """Spawns in one synchronous step of the event loop (the runs of a fan-out batch): the
    agent goes from one child's unit straight into the next one's, one cgroup write per
    child instead of two, and back where it belongs at the end; a command is looked up in
    PATH once (once per ``found``, given for the slices of one request). Nothing may await
    inside, and no other thread spawns meanwhile (SPAWNING is held)."""
    global _batching, _found
    with _spawning:
        _batching = True
        _found = found if found is not None else {}
        try:
            yield
        finally:
            _batching = False
            _found = {}
            _go_home()


def _go_home() -> None:
    global _away
    if _away is not None:
        unit, _away = _away, None
        _carry_back(unit)


def _carry_back(unit: Unit) -> None:
    global _carry_off
    assert unit.layout.tracker is not None
    home = os.path.join(unit.layout.tracker.own, "cgroup.procs")
    for _ in range(3):
        try:
            _join(home)
            return
        except OSError as e:
            err = e
    # Left inside, the agent would end with the unit: say so, and never carry again.
    _carry_off = f"cannot return to {home}: {err}"
    log.error("the agent is stuck in cgroup %s (%s); children join their cgroups with a "
              "shell from now on", unit.name, _carry_off)


def _join(procs_file: str) -> None:
    fd = os.open(procs_file, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, b"0")  # this process, every thread of it
    finally:
        os.close(fd)


# Joins the cgroup files given before "--", then becomes the command after it.
_JOIN = 'for f do shift; [ "$f" = -- ] && break; echo 0 >"$f" || exit 126; done; exec "$@"'


def _joined_by_shell(run_as: RunAs, tty: bool) -> bool:
    """The fast path, for a process of the agent's own user with nothing else to do before
    exec: no preexec step (which forks the whole agent), the spawn can vfork. The agent
    carries the child into its cgroup (``_carry_into``), or, for a cgroup with limits, a
    tiny /bin/sh joins it and execs the command, so the command and all it starts are
    inside from their first instruction. The shell's failure to start the command is
    checked here first, to report it as before."""
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
        try:
            st = os.stat(path)
        except (OSError, ValueError):
            continue
        if stat.S_ISREG(st.st_mode) and os.access(path, os.X_OK):
            if _runnable(path, (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)):
                return
            raise SpawnError(f"cannot execute {cmd}: exec format error", 126)
        denied = True
    if cwd is not None and not os.path.isdir(cwd):
        raise SpawnError(f"no such directory: {cwd}", 1)
    if denied:
        raise SpawnError(f"permission denied: {cmd}", 126)
    raise SpawnError(f"command not found: {cmd}", 127)

_MAGIC_CACHE = 256
_magic: dict[tuple[str, tuple[int, int, int, int]], bool] = {}


def _runnable(path: str, version: tuple[int, int, int, int]) -> bool:
    """Does the file start as exec takes it (a #! line or ELF)? Remembered per version of
    the file (device, inode, mtime, size): a batch of 10,000 runs of one command reads it
    once."""
    key = (path, version)
    found = _magic.get(key)
    if found is None:
        try:
            with open(path, "rb") as f:
                magic = f.read(4)
        except OSError:
            return True  # exec reports what it finds
        found = magic.startswith(b"#!") or magic == b"\x7fELF"
        if len(_magic) >= _MAGIC_CACHE:
            _magic.clear()
        _magic[key] = found
    return found


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
        os.set_blocking(fd, False)
    return Child(popen, stdin_fd, out, tty=False)


def _posix_spawn_pipes(argv: list[str], env: Mapping[str, str], stdin: bool) -> Child:
    """The common case (no terminal, directory, user or step before exec) without Popen:
    os.posix_spawn (a vfork in glibc) costs the agent half of Popen's time per process, most
    of it Popen encoding the environment in Python. Popen's close_fds is had by every
    other descriptor of ours being close-on-exec (``_close_on_exec_all``)."""
    _close_on_exec_all()
    path = _resolve(argv[0], env)
    fds: list[int] = []
    try:
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        fds += (out_r, out_w)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        fds += (err_r, err_w)
        actions: list[tuple[Any, ...]] = []
        stdin_fd = None
        if stdin:
            in_r, stdin_fd = os.pipe2(os.O_CLOEXEC)
            fds += (in_r, stdin_fd)
            actions.append((os.POSIX_SPAWN_DUP2, in_r, 0))
        else:
            actions.append((os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0))
        actions += [(os.POSIX_SPAWN_DUP2, out_w, 1), (os.POSIX_SPAWN_DUP2, err_w, 2)]
        pid = os.posix_spawn(path, argv, env, file_actions=actions, setsid=True,
                             setsigdef=_RESTORED)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    for fd in fds:
        if fd not in (out_r, err_r, stdin_fd):
            os.close(fd)
    out = {"stdout": out_r, "stderr": err_r}
    for fd in out.values():  # a read end's only status flag: one fcntl, not set_blocking's two
        fcntl.fcntl(fd, fcntl.F_SETFL, os.O_NONBLOCK)
    if stdin_fd is not None:
        os.set_blocking(stdin_fd, False)
    return Child(Spawned(pid), stdin_fd, out, tty=False)


def _resolve(cmd: str, env: Mapping[str, str]) -> str:
    """The file exec runs for ``cmd``: searched in the child's PATH, as Popen searches
    (posix_spawnp would search the agent's)."""
    if "/" in cmd:
        return cmd
    if _batching:
        key = (cmd, env.get("PATH", ""))
        if key not in _found:
            _found[key] = _search(cmd, env)
        return _found[key]
    return _search(cmd, env)


def _search(cmd: str, env: Mapping[str, str]) -> str:
    denied: str | None = None
    for d in os.get_exec_path(dict(env)):
        path = os.path.join(d or ".", cmd)
        if os.path.isfile(path):
            if os.access(path, os.X_OK):
                return path
            denied = denied or path
    if denied is not None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), denied)
    raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), cmd)


_all_cloexec = False
# Python ignores these; Popen gives its children their defaults back (restore_signals).
_RESTORED = (signal.SIGPIPE, signal.SIGXFSZ)


def _close_on_exec_all() -> None:
    """Once: mark every descriptor above 2 close-on-exec. Those Python opens already are
    (PEP 446); this catches any the agent inherited, which a posix_spawn'd child would
    otherwise inherit in turn."""
    global _all_cloexec
    if _all_cloexec:
        return
    for entry in os.listdir("/proc/self/fd"):
        fd = int(entry)
        if fd > 2:
            with contextlib.suppress(OSError):
                os.set_inheritable(fd, False)
    _all_cloexec = True


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
                with _spawning:
                    if pid in _leaders:  # spawned a moment ago by a worker thread
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
