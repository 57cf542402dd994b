"""A per-node ledger of the process groups an agent started, so that the next start of an
agent that was SIGKILLed (or crashed) can end what the last one left behind.

The file is append-only (``+ pgid create_time`` / ``- pgid``); an entry is acted on only if
a process with that pid *and* that creation time still exists, so a recycled pid is safe.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path

from ..procutil import group_alive, kill_group

log = logging.getLogger(__name__)


class Ledger:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        path.parent.parent.chmod(0o700)
        self._fd = -1

    def open(self) -> None:
        # Start a fresh file: whatever the old one listed has been reaped by then.
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    def add(self, pid: int) -> None:
        started = start_ticks(pid)
        if started is None:
            return  # already gone
        os.write(self._fd, f"+ {pid} {started}\n".encode())

    def remove(self, pid: int) -> None:
        os.write(self._fd, f"- {pid}\n".encode())

    def add_user(self, name: str) -> None:
        os.write(self._fd, f"u+ {name}\n".encode())

    def remove_user(self, name: str) -> None:
        os.write(self._fd, f"u- {name}\n".encode())

    def leftovers(self) -> tuple[dict[int, float], set[str]]:
        """Process groups and throwaway users a previous run did not clean up."""
        live: dict[int, float] = {}
        names: set[str] = set()
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return live, names
        for line in text.splitlines():
            parts = line.split()
            try:
                if parts[0] == "+" and len(parts) == 3:
                    live[int(parts[1])] = float(parts[2])
                elif parts[0] == "-" and len(parts) == 2:
                    live.pop(int(parts[1]), None)
                elif parts[0] == "u+" and len(parts) == 2:
                    names.add(parts[1])
                elif parts[0] == "u-" and len(parts) == 2:
                    names.discard(parts[1])
            except (ValueError, IndexError):
                continue  # a torn last line after a crash
        return live, names


def start_ticks(pid: int) -> int | None:
    """When a process started, in clock ticks since boot (field 22 of /proc/PID/stat):
    with the pid, it names one process for good. Read directly: it is on the path of every
    process the agent starts."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    return int(stat[stat.rindex(b")") + 2:].split()[19])


def _ours(pgid: int, started: float) -> bool:
    """Is process group ``pgid`` still the one we started?"""
    leader = start_ticks(pgid)
    if leader is not None:
        return leader == started
    # The leader is gone; members of its group may remain. A pid that was reused cannot
    # lead our old group id, so any member of group pgid is ours.
    return group_alive(pgid)


async def reap_leftovers(ledger: Ledger, grace: float) -> int:
    """End every process group and remove every throwaway user a previous agent left;
    returns how many groups were found."""
    from . import users

    listed, names = ledger.leftovers()
    groups = [pgid for pgid, created in listed.items() if _ours(pgid, created)]
    await _end_groups(groups, grace)
    for name in names:
        if name.startswith(users.PREFIX):
            await users.remove(name)
    return len(groups)


async def _end_groups(groups: list[int], grace: float) -> None:
    if not groups:
        return
    log.warning("ending %d process group(s) left by a previous agent", len(groups))
    for pgid in groups:
        kill_group(pgid, signal.SIGTERM)
    deadline = asyncio.get_running_loop().time() + grace
    while any(group_alive(g) for g in groups) and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    for pgid in groups:
        kill_group(pgid, signal.SIGKILL)
