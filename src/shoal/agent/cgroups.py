"""Containment by cgroup: every run and session in a cgroup of its own, ended as a whole.

Two layouts, one module. On a v2-only machine (modern distributions) one directory holds a
unit: membership, ``cgroup.events`` (populated 0 = the unit has ended), ``cgroup.kill`` and
the limits (``memory.max``, ``pids.max``, ``cpu.weight``). On a hybrid machine the unit has
a directory in each hierarchy it needs: the v2 mount (or, without one, the v1 freezer) to
track and kill it, and the v1 memory, pids and cpu hierarchies for its limits.

Units live below the agent's own cgroup in each hierarchy (never moved out of whatever
confines the agent), under ``shoal.<tag>`` where the tag names the agent's state directory:
two fleets on one machine never see each other's units. The path logic is pure
(agent/cgroup_layout.py); this module reads and writes cgroupfs.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import time

from ..wire import messages as m
from .cgroup_layout import (
    LIMIT_CONTROLLERS,
    Layout,
    limit_files,
    parse_keyed,
    plan,
    sets_cgroup_limit,
)

log = logging.getLogger(__name__)



# --------------------------------------------------------------------------- I/O: detection

def _read(path: str) -> str:
    # Three syscalls; open() takes nine (fstat, isatty, lseek...) and a text layer, and this
    # is read at the end of every run (cgroup.events).
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks).decode()


def _write(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def detect(tag: str) -> Layout | str:
    """This machine's layout for an agent whose units go under ``shoal.<tag>``; creates the
    base directories (and enables v2 controllers below them). A string says why not."""
    if os.geteuid() != 0:
        return "the agent is not root"
    try:
        mountinfo, own = _read("/proc/self/mountinfo"), _read("/proc/self/cgroup")
    except OSError as e:
        return f"cannot read the process's cgroups: {e}"
    base = f"shoal.{tag}"
    first = plan(mountinfo, own, (), base)
    if isinstance(first, str):
        return first
    wanted: list[str] = []
    if first.tracker is not None and first.tracker.kind == "v2":
        try:
            offered = _read(os.path.join(first.tracker.own, "cgroup.controllers")).split()
        except OSError:
            offered = []
        wanted = [c for c in LIMIT_CONTROLLERS if c in offered]
    enabled = _enable_v2(first.tracker.own, base, wanted) if wanted else []  # type: ignore[union-attr]
    if enabled:
        # Enabling may have moved the agent into a leaf: read its cgroups again.
        found = plan(_read("/proc/self/mountinfo"), _read("/proc/self/cgroup"), enabled, base)
        if isinstance(found, str):
            return found
        layout = found
    else:
        layout = first
    try:
        for d in layout.base_dirs():
            os.makedirs(d, exist_ok=True)
    except OSError as e:
        return f"cannot create {base} cgroups: {e.strerror}"
    return layout


def _enable_v2(own: str, base: str, ctrls: list[str]) -> list[str]:
    """Enable ``ctrls`` for the children of ``own/base``. A non-root cgroup with processes
    cannot pass controllers down, so the agent's processes first move to ``own/agent``."""
    line = " ".join("+" + c for c in ctrls)
    try:
        try:
            _write(os.path.join(own, "cgroup.subtree_control"), line)
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise
            others = {int(p) for p in _read(os.path.join(own, "cgroup.procs")).split()}
            others.discard(os.getpid())
            if others:  # never move processes that are not ours (a login session, say)
                log.warning("cgroup %s holds other processes too: no cgroup limits; give the "
                            "agent a cgroup of its own (systemd: Delegate=yes)", own)
                return []
            leaf = os.path.join(own, "agent")
            os.makedirs(leaf, exist_ok=True)
            _write(os.path.join(leaf, "cgroup.procs"), str(os.getpid()))
            _write(os.path.join(own, "cgroup.subtree_control"), line)
        os.makedirs(os.path.join(own, base), exist_ok=True)
        _write(os.path.join(own, base, "cgroup.subtree_control"), line)
    except OSError as e:
        log.warning("cgroup v2 controllers %s not available below %s: %s", ctrls, own, e)
        return []
    return ctrls


# --------------------------------------------------------------------------- I/O: units

def _pids(d: str) -> list[int]:
    try:
        return [int(p) for p in _read(os.path.join(d, "cgroup.procs")).split()]
    except (OSError, ValueError):
        return []


def populated(d: str) -> bool:
    """Has the cgroup at ``d`` any process left (v2: cgroup.events; v1: cgroup.procs)?"""
    try:
        return "populated 1" in _read(os.path.join(d, "cgroup.events"))
    except FileNotFoundError:
        return bool(_pids(d)) if os.path.isdir(d) else False
    except OSError:
        return False


def signal_all(d: str, sig: int) -> None:
    for pid in _pids(d):
        with contextlib.suppress(OSError):
            os.kill(pid, sig)


def kill_now(d: str) -> None:
    """SIGKILL every process of the cgroup at ``d`` at once: ``cgroup.kill`` (v2), else
    freeze, kill each, thaw (v1 freezer: nothing can fork in between), else kill each."""
    if os.path.exists(os.path.join(d, "cgroup.kill")):
        with contextlib.suppress(FileNotFoundError):
            _write(os.path.join(d, "cgroup.kill"), "1")
        return
    state = os.path.join(d, "freezer.state")
    if os.path.exists(state):
        try:
            _write(state, "FROZEN")
            for _ in range(200):
                if _read(state).strip() == "FROZEN":
                    break
                time.sleep(0.005)
            signal_all(d, signal.SIGKILL)
        finally:
            with contextlib.suppress(OSError):
                _write(state, "THAWED")
        return
    signal_all(d, signal.SIGKILL)


async def wait_empty(d: str, timeout: float) -> bool:
    """Wait until nothing is left in the cgroup at ``d``; False after ``timeout``."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while populated(d):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(delay)
        delay = min(0.05, delay * 2)
    return True


def remove_dir(d: str) -> bool:
    try:
        os.rmdir(d)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


async def end_dirs(dirs: list[str], grace: float) -> None:
    """End what a cgroup of ours still holds (leftovers of a previous agent), remove it."""
    for d in dirs:
        signal_all(d, signal.SIGTERM)
    for d in dirs:
        await wait_empty(d, grace)
    for d in dirs:
        for _ in range(100):
            kill_now(d)
            if await wait_empty(d, 0.1):
                break
        for _ in range(50):
            if remove_dir(d):
                break
            await asyncio.sleep(0.02)


# Emptied units kept for their node's next run, by node and parent directory. Making a cgroup
# and removing it cost the kernel about 95 us of CPU (mkdir creates some twenty files, rmdir
# takes them down), more than all else a run of `true` asks of the agent; an empty cgroup
# holds about 9 KiB of kernel memory. Only a bare tracking directory is kept: no limit file
# to reset, and nothing in it (its leader ended and nothing was left behind). The keeper,
# the next agent's ``reap_leftovers`` and ``drop_spares`` remove what is kept.
SPARES_PER_NODE = 2
_spares: dict[str, dict[str, list[str]]] = {}  # node -> parent -> directories


def drop_spares(node: str | None = None) -> None:
    """Remove the kept units of ``node`` (of every node if None)."""
    for name in list(_spares) if node is None else [node]:
        for dirs in _spares.pop(name, {}).values():
            for d in dirs:
                remove_dir(d)


class Unit:
    """One run's or session's cgroup: a directory in the tracking hierarchy, and one in each
    hierarchy that sets one of its limits. A unit with no limit may be a kept one of the
    same node (``_spares``): its directory then bears the name of the run that made it."""

    def __init__(self, layout: Layout, name: str, limits: m.Limits | None = None) -> None:
        assert layout.tracker is not None
        limits = limits or m.Limits()
        self.layout = layout
        self.name = name
        self.limits = limits
        self._parent = os.path.join(layout.tracker.own, layout.base)  # of every unit
        self.tracker = os.path.join(self._parent, name)
        self._writes: list[tuple[str, str]] = []  # (path, value)
        self.dirs = [self.tracker]
        if not sets_cgroup_limit(limits):
            return  # the common case (a run): just the tracking directory
        for ctrl, h in layout.limits.items():
            d = os.path.join(h.own, layout.base, name)
            files = limit_files(h.kind, ctrl, limits)
            if files and d not in self.dirs:
                self.dirs.append(d)
            self._writes += [(os.path.join(d, f), v) for f, v in files]

    def _kept(self) -> list[str] | None:
        """The node's kept units where this one's directory goes; None if it cannot be one."""
        if self._writes or len(self.dirs) != 1:
            return None
        node = self.name.partition(".")[0]
        return _spares.setdefault(node, {}).setdefault(self._parent, [])

    def take_spare(self) -> bool:
        """Become a kept unit of the node, if there is one (then ``create`` is not needed)."""
        kept = self._kept()
        while kept:
            d = kept.pop()
            if os.path.isdir(d):  # not removed meanwhile (by reap_leftovers, say)
                self.tracker = d
                self.dirs = [d]
                self.name = os.path.basename(d)
                return True
        return False

    def create(self) -> None:
        """Make the directories and write the limits; raises OSError (all undone)."""
        made: list[str] = []
        try:
            for d in self.dirs:
                try:
                    os.mkdir(d)
                except FileNotFoundError:
                    # Another agent of this state directory stopped and removed the base it
                    # found empty: make it again (with its v2 controllers), once.
                    detect(self.layout.base.removeprefix("shoal."))
                    os.mkdir(d)
                made.append(d)
            for path, value in self._writes:
                try:
                    _write(path, value)
                except FileNotFoundError:
                    if not path.endswith(("memory.memsw.limit_in_bytes", "memory.swap.max")):
                        raise  # swap accounting is optional; the limit itself is not
        except OSError:
            for d in made:
                remove_dir(d)
            raise

    @property
    def limited(self) -> bool:
        """Does any of its directories set a limit?"""
        return bool(self._writes)

    @property
    def procs_files(self) -> tuple[str, ...]:
        """What a child writes "0" into, before exec, to join the unit."""
        return tuple(os.path.join(d, "cgroup.procs") for d in self.dirs)

    def pids(self) -> list[int]:
        return _pids(self.tracker)

    def populated(self) -> bool:
        return populated(self.tracker)

    def signal(self, sig: int) -> None:
        signal_all(self.tracker, sig)

    def kill(self) -> None:
        kill_now(self.tracker)

    async def wait_empty(self, timeout: float) -> bool:
        return await wait_empty(self.tracker, timeout)

    async def stop(self, grace: float) -> None:
        """SIGTERM to every process of the unit, then kill whatever is left after
        ``grace``; returns when the unit is empty."""
        self.signal(signal.SIGTERM)
        if not await self.wait_empty(grace):
            await self.kill_all()

    async def kill_all(self) -> None:
        while True:
            self.kill()
            if await self.wait_empty(0.5):
                return

    def _events(self, controller: str, v2: str, v1: str) -> dict[str, int]:
        h = self.layout.limits.get(controller)
        if h is None or os.path.join(h.own, self.layout.base, self.name) not in self.dirs:
            return {}
        d = os.path.join(h.own, self.layout.base, self.name)
        try:
            return parse_keyed(_read(os.path.join(d, v2 if h.kind == "v2" else v1)))
        except OSError:
            return {}

    def limit_reason(self) -> str:
        """What limit bit, if one did: read once the unit is empty, before ``remove``."""
        if self.limits.memory_mb and self._events("memory", "memory.events",
                                                  "memory.oom_control").get("oom_kill", 0):
            return (f"out of memory: the kernel's OOM killer ended a process at the "
                    f"{self.limits.memory_mb} MiB limit")
        if self.limits.processes and self._events("pids", "pids.events", "pids.events").get(
                "max", 0):
            return f"the limit of {self.limits.processes} processes was reached (fork failed)"
        return ""

    def remove(self) -> bool:
        return all([remove_dir(d) for d in self.dirs])

    def retire(self) -> list[str]:
        """The unit is known to be empty: keep it for the node's next run, else remove it.
        Returns the directories removed (for the ledger): none when kept."""
        kept = self._kept()
        if kept is not None and len(kept) < SPARES_PER_NODE:
            kept.append(self.tracker)
            return []
        return self.dirs if self.remove() else []
