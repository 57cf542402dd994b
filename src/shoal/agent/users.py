"""Throwaway Unix users for sessions (``user: ephemeral``): a private home (0700), no extra
groups, no sudo; removed with every process and file of theirs when the session ends."""

from __future__ import annotations

import asyncio
import os
import pwd
import secrets
import signal
import subprocess
from dataclasses import dataclass

import psutil

PREFIX = "shoal-"


class UserError(Exception):
    pass


@dataclass(frozen=True)
class EphemeralUser:
    name: str
    uid: int
    gid: int
    home: str


def can_create_users() -> bool:
    return os.geteuid() == 0


def create() -> EphemeralUser:
    if not can_create_users():
        raise UserError("the agent is not root, so it cannot create throwaway users")
    name = PREFIX + secrets.token_hex(4)
    r = subprocess.run(["useradd", "--create-home", "--user-group", "--shell", "/bin/bash",
                        "--comment", "shoal throwaway user", "--key", "UMASK=077", name],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise UserError(f"useradd failed: {r.stderr.strip()}")
    pw = pwd.getpwnam(name)
    os.chmod(pw.pw_dir, 0o700)
    return EphemeralUser(name, pw.pw_uid, pw.pw_gid, pw.pw_dir)


def _kill_all(uid: int) -> int:
    n = 0
    for p in psutil.process_iter(["uids"]):
        try:
            if p.info["uids"] and p.info["uids"].real == uid:
                p.send_signal(signal.SIGKILL)
                n += 1
        except psutil.Error:
            continue
    return n


async def remove(name: str) -> None:
    """Kill every process of the user, then delete the user, its group and its home."""
    try:
        uid = pwd.getpwnam(name).pw_uid
    except KeyError:
        return
    for _ in range(50):
        if not _kill_all(uid):
            break
        await asyncio.sleep(0.05)
    # Files it left in the shared temporary directories go too (its home goes with userdel).
    find = await asyncio.create_subprocess_exec(
        "find", "/tmp", "/var/tmp", "/dev/shm", "-xdev", "-user", str(uid), "-delete",
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    await find.wait()
    proc = await asyncio.create_subprocess_exec("userdel", "--remove", "--force", name,
                                                stdout=subprocess.DEVNULL,
                                                stderr=subprocess.DEVNULL)
    await proc.wait()


def leftovers() -> list[str]:
    """Throwaway users that exist now (after a crash, the next agent start removes them)."""
    return [p.pw_name for p in pwd.getpwall()
            if p.pw_name.startswith(PREFIX) and p.pw_gecos == "shoal throwaway user"]
