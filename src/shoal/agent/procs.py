"""Starting and ending processes: each in its own session and process group, with pipes or
a pseudo-terminal, waited on through a pidfd (no threads, no SIGCHLD handler, no zombies).
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
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

from ..procutil import kill_group

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
        rc = self.popen.returncode
        assert rc is not None
        return (rc, None) if rc >= 0 else (None, -rc)

    def signal_group(self, sig: int) -> bool:
        return kill_group(self.pid, sig)

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
    """Who a child runs as, and what it may use (None: the agent's own user, no limits)."""

    uid: int | None = None
    gid: int | None = None
    rlimits: tuple[tuple[int, int], ...] = ()  # (resource.RLIMIT_*, value)


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
    extra = _popen_extras(run_as, tty)
    try:
        if tty:
            return _spawn_pty(argv, env, cwd, cols, rows, extra)
        return _spawn_pipes(argv, env, cwd, stdin, extra)
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


def _popen_extras(run_as: RunAs | None, tty: bool) -> dict[str, Any]:
    """Popen arguments for user switching and limits. Without a preexec function Popen can
    use vfork, which matters when starting a thousand processes at once."""
    extra: dict[str, Any] = {}
    steps: list[Callable[[], None]] = []
    if tty:
        steps.append(_acquire_controlling_tty)
    if run_as is not None:
        if run_as.uid is not None:
            extra.update(user=run_as.uid, group=run_as.gid, extra_groups=[])
        if run_as.rlimits:
            limits = run_as.rlimits

            def set_limits() -> None:
                for res, value in limits:
                    resource.setrlimit(res, (value, value))

            steps.append(set_limits)
    if steps:
        def preexec() -> None:
            for step in steps:
                step()

        extra["preexec_fn"] = preexec
    return extra


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
    """SIGTERM the child's whole group, then SIGKILL whatever is left after ``grace``."""
    if not child.signal_group(signal.SIGTERM):
        return
    try:
        await asyncio.wait_for(asyncio.shield(child.wait()), grace)
    except TimeoutError:
        pass
    # Members of the group may outlive the leader (or ignore SIGTERM): end them all.
    child.signal_group(signal.SIGKILL)
