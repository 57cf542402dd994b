"""A per-node ledger of the process groups an agent started, so that the next start of an
agent that was SIGKILLed (or crashed) can end what the last one left behind.

The file is append-only (``+ pgid`` / ``- pgid``, ``u+ user`` / ``u- user``, ``c+ dir`` /
``c- dir`` for cgroups, ``e+ KEY=value`` / ``e- KEY=value`` for the environment marker of a
process started without a cgroup: what escaped its group is found by it, agent/procs.py
``escaped``). A listed cgroup is ours by construction (its directory is below
this agent's ``shoal.<tag>``) and is ended whole: this is what catches setsid'd and
double-forked leftovers, which no process group holds. A listed group
is acted on only if its leader still carries this node's ``SHOAL_NODE`` in its environment
(every child gets it), or, with the leader gone, if members of that group remain: a recycled
pid is never taken for ours. (Checking a start time instead would cost a /proc read per
spawn, as much as the spawn itself right after exec.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path

from ..system.process import group_alive, kill_group
from . import cgroups as cgroups_mod
from . import procs
from .cgroup_layout import Layout

log = logging.getLogger(__name__)


class Ledger:
    def __init__(self, path: Path, node: str) -> None:
        self.path = path
        self.node = node
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        path.parent.parent.chmod(0o700)
        self._open = False

    def open(self) -> None:
        # Start a fresh file: whatever the old one listed has been reaped by then.
        os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
        self._open = True

    def close(self) -> None:
        if self._open:
            self._open = False
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    def _append(self, line: str) -> None:
        # Opened per line, not held: an agent of 10,000 virtual nodes holding 10,000 ledger
        # fds doubles the cost of every spawn (each child copies and closes the fd table).
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    def add(self, pid: int) -> None:
        self._append(f"+ {pid}\n")

    def remove(self, pid: int, cgroups: list[str] | None = None) -> None:
        """``pid`` ended (and the ``cgroups`` it ran in are gone)."""
        self._append(f"- {pid}\n" + "".join(f"c- {d}\n" for d in cgroups or []))

    def add_user(self, name: str) -> None:
        self._append(f"u+ {name}\n")

    def remove_user(self, name: str) -> None:
        self._append(f"u- {name}\n")

    def add_cgroup(self, dirs: list[str]) -> None:
        self._append("".join(f"c+ {d}\n" for d in dirs))

    def remove_cgroup(self, dirs: list[str]) -> None:
        self._append("".join(f"c- {d}\n" for d in dirs))

    def add_marker(self, marker: str) -> None:
        self._append(f"e+ {marker}\n")

    def remove_marker(self, marker: str) -> None:
        self._append(f"e- {marker}\n")

    def markers(self) -> set[str]:
        """Environment markers of processes started without a cgroup, not yet ended."""
        found: set[str] = set()
        try:
            lines = self.path.read_text().split("\n")[:-1]
        except FileNotFoundError:
            return found
        for line in lines:
            if line.startswith(("e+ ", "e- ")) and "=" in line:
                (found.add if line[1] == "+" else found.discard)(line[3:])
        return found

    def leftovers(self) -> tuple[set[int], set[str]]:
        """Process groups and throwaway users a previous run did not clean up."""
        groups, names, _ = self.entries()
        return groups, names

    def entries(self) -> tuple[set[int], set[str], set[str]]:
        """Process groups, throwaway users and cgroups a previous run did not clean up."""
        groups: set[int] = set()
        names: set[str] = set()
        cgroups: set[str] = set()
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return groups, names, cgroups
        lines = text.split("\n")[:-1]  # a torn last line (no newline) after a crash: skip
        for line in lines:
            parts = line.split()
            if line.startswith(("c+ ", "c- ")):
                (cgroups.add if line[1] == "+" else cgroups.discard)(line[3:])
                continue
            try:
                if parts[0] == "+":
                    groups.add(int(parts[1]))
                elif parts[0] == "-":
                    groups.discard(int(parts[1]))
                elif parts[0] == "u+" and len(parts) == 2:
                    names.add(parts[1])
                elif parts[0] == "u-" and len(parts) == 2:
                    names.discard(parts[1])
            except (ValueError, IndexError):
                continue
        return groups, names, cgroups


def _ours(pgid: int, node: str) -> bool:
    """Is process group ``pgid`` still one this node started?"""
    try:
        with open(f"/proc/{pgid}/environ", "rb") as f:
            env = f.read()
    except FileNotFoundError:
        # The leader is gone; members of its group may remain. A pid that was reused cannot
        # lead our old group id, so any member of group pgid is ours.
        return group_alive(pgid)
    except OSError:
        return False
    return f"SHOAL_NODE={node}".encode() in env.split(b"\0")


async def reap_leftovers(ledger: Ledger, grace: float, layout: Layout | None = None) -> int:
    """End every cgroup, process group and throwaway user a previous agent left; returns
    how many cgroups and groups were found. Cgroups first: they hold everything the
    sessions started, and users are deleted only once nothing of theirs runs."""
    from . import users

    cgroups_mod.drop_spares(ledger.node)  # kept units are ours to end and remove too
    listed, names, cgroups = ledger.entries()
    dirs = {d for d in cgroups if _below_shoal(d)}
    if layout is not None:  # also what a lost or truncated ledger does not name
        for base in layout.base_dirs():
            with contextlib.suppress(OSError):
                dirs.update(os.path.join(base, e) for e in os.listdir(base)
                            if e.startswith(ledger.node + "."))
    found = [d for d in dirs if os.path.isdir(d)]
    if found:
        log.warning("ending %d cgroup(s) left by a previous agent", len(found))
        await cgroups_mod.end_dirs(sorted(found), grace)
        if layout is not None:
            procs.reap_orphans(layout.base)
    groups = [pgid for pgid in listed if _ours(pgid, ledger.node)]
    await _end_groups(groups, grace)
    await _end_escaped(ledger.markers(), grace)
    for name in names:
        if name.startswith(users.PREFIX):
            await users.remove(name)
    return len(groups) + len(found)


async def _end_escaped(markers: set[str], grace: float) -> None:
    """Without cgroups: what left its process group (setsid'd) and still carries the
    marker of a run or session of ours."""
    def found() -> list[int]:
        return [p for mk in markers for p in procs.escaped(mk.encode(), 0)]

    left = found()
    if not left:
        return
    log.warning("ending %d process(es) that left their group, left by a previous agent",
                len(left))
    for pid in left:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
    deadline = asyncio.get_running_loop().time() + grace
    while found() and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    for pid in found():
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def _below_shoal(d: str) -> bool:
    # Only ever a unit directory of ours: /sys/fs/cgroup/.../shoal.<tag>/<unit>
    parent = os.path.basename(os.path.dirname(d))
    return d.startswith("/sys/fs/cgroup/") and parent.startswith("shoal.") and ".." not in d


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
