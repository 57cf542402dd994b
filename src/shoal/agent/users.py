"""Throwaway Unix users for sessions (``user: ephemeral``), done like systemd's
``DynamicUser=``: a UID never handed out twice on this machine, a private home (0700), no
extra groups, no sudo. The session's processes run in a private view (agent/sandbox.py)
and its cgroup; when it ends, every process of the UID is gone *before* the user is
deleted, then its SysV IPC objects and its files in the shared writable places go too.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import pwd
import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path

import psutil

from ..errors import UserError as UserError  # re-exported: callers catch users.UserError
from ..logic.agentsettings import THROWAWAY_PREFIX

PREFIX = THROWAWAY_PREFIX
COMMENT = "shoal throwaway user"
# Far above login.defs' UID_MAX and the usual /etc/subuid blocks. One allocator per machine
# (every agent shares it), so a UID is never reused whichever agent made the last user.
UID_FIRST = 1_900_000_000
UID_LAST = 1_999_999_999
ALLOCATOR = Path("/var/lib/shoal/throwaway-uid")
SWEPT = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
_SYSVIPC = {"shm": ("-m", "shmid"), "msg": ("-q", "msqid"), "sem": ("-s", "semid")}


@dataclass(frozen=True)
class EphemeralUser:
    name: str
    uid: int
    gid: int
    home: str


def can_create_users() -> bool:
    return os.geteuid() == 0


def _taken(uid: int) -> bool:
    import grp

    for lookup in (pwd.getpwuid, grp.getgrgid):
        try:
            lookup(uid)
            return True
        except KeyError:
            pass
    return False


def next_uid(path: Path = ALLOCATOR, first: int = UID_FIRST, last_uid: int = UID_LAST) -> int:
    """The next UID of the machine-wide allocator in ``first``-``last_uid`` (the agent's
    ``ephemeral_uids``, which its network policy matches): strictly after every one it gave
    out, skipping any that exist already. Held under an exclusive lock, written before use."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        text = os.pread(fd, 64, 0).decode(errors="replace").strip()
        last = int(text) if text.isdigit() else first - 1
        uid = max(last + 1, first)
        while _taken(uid):
            uid += 1
        if uid > last_uid:
            raise UserError(f"no throwaway UIDs left in {first}-{last_uid} "
                            f"(see {path}; widen ephemeral_uids in agent.toml)")
        data = f"{uid}\n".encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)
        return uid
    finally:
        os.close(fd)


def create(uids: tuple[int, int] = (UID_FIRST, UID_LAST)) -> EphemeralUser:
    if not can_create_users():
        raise UserError("the agent is not root, so it cannot create throwaway users")
    name = PREFIX + secrets.token_hex(4)
    uid = next_uid(ALLOCATOR, *uids)
    for argv in (["groupadd", "--gid", str(uid), name],
                 ["useradd", "--uid", str(uid), "--gid", str(uid), "--no-log-init",
                  "--create-home", "--shell", "/bin/bash", "--comment", COMMENT,
                  "--key", "UMASK=077", name]):
        r = subprocess.run(argv, capture_output=True, text=True)
        if r.returncode != 0:
            subprocess.run(["groupdel", name], capture_output=True)
            raise UserError(f"{argv[0]} failed: {r.stderr.strip()}")
    pw = pwd.getpwnam(name)
    os.chmod(pw.pw_dir, 0o700)
    return EphemeralUser(name, pw.pw_uid, pw.pw_gid, pw.pw_dir)


def _has_processes(uid: int) -> bool:
    # Zombies do not count: they run nothing, and their reaper (the agent) is not the uid.
    for p in psutil.process_iter(["uids", "status"]):
        with contextlib.suppress(psutil.Error):
            if p.info["uids"] and uid in (p.info["uids"].real, p.info["uids"].effective) \
                    and p.info["status"] != psutil.STATUS_ZOMBIE:
                return True
    return False


async def kill_all(uid: int) -> bool:
    """End every process of ``uid``, atomically: ``kill(-1, SIGKILL)`` from a process of
    that uid signals all of them at once, so a fork-and-exit loop cannot outrun it.
    Returns False if processes remain (the user must then not be deleted)."""
    for _ in range(20):
        if not _has_processes(uid):
            return True
        proc = await asyncio.create_subprocess_exec(
            "kill", "-s", "KILL", "--", "-1", user=uid, group=uid, extra_groups=[],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        await proc.wait()
        await asyncio.sleep(0.02)
    return not _has_processes(uid)


def sysv_ipc_of(uid: int, root: str = "/proc/sysvipc") -> list[tuple[str, int]]:
    """(ipcrm flag, id) of every SysV IPC object owned or created by ``uid``."""
    found: list[tuple[str, int]] = []
    for kind, (flag, id_col) in _SYSVIPC.items():
        try:
            lines = Path(root, kind).read_text().splitlines()
            head = lines[0].split()
            cols = [head.index(id_col), head.index("uid"), head.index("cuid")]
        except (OSError, IndexError, ValueError):
            continue
        for line in lines[1:]:
            f = line.split()
            with contextlib.suppress(ValueError, IndexError):
                if uid in (int(f[cols[1]]), int(f[cols[2]])):
                    found.append((flag, int(f[cols[0]])))
    return found


def _tmpfs_mounts() -> list[str]:
    out = []
    with contextlib.suppress(OSError), open("/proc/self/mounts") as f:
        for line in f:
            dev, point, fstype, opts, *_ = line.split()
            if fstype in ("tmpfs", "ramfs") and "rw" in opts.split(",") \
                    and not point.startswith(("/sys", "/proc")):
                out.append(point.replace("\\040", " "))
    return out


async def remove(name: str) -> bool:
    """Kill every process of the user, remove its IPC objects and files, then delete the
    user, its group and its home. False (and the user kept, to be retried at the next
    agent start) if its processes could not all be ended."""
    try:
        uid = pwd.getpwnam(name).pw_uid
    except KeyError:
        return True
    if not await kill_all(uid):
        return False
    for flag, ident in sysv_ipc_of(uid):
        await _quiet("ipcrm", flag, str(ident))
    places = sorted({p for p in (*SWEPT, *_tmpfs_mounts()) if os.path.isdir(p)})
    await _quiet("find", *places, "-xdev", "-user", str(uid), "-delete")
    await _quiet("userdel", "--remove", "--force", name)
    await _quiet("groupdel", name)
    return True


async def _quiet(*argv: str) -> None:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.DEVNULL,
                                                stderr=subprocess.DEVNULL)
    await proc.wait()


def leftovers() -> list[str]:
    """Throwaway users that exist now (after a crash, the next agent start removes them)."""
    return [p.pw_name for p in pwd.getpwall()
            if p.pw_name.startswith(PREFIX) and p.pw_gecos == COMMENT]

