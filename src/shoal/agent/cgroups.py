"""Containment by cgroup: every run and session in a cgroup of its own, ended as a whole.

Two layouts, one module. On a v2-only machine (modern distributions) one directory holds a
unit: membership, ``cgroup.events`` (populated 0 = the unit has ended), ``cgroup.kill`` and
the limits (``memory.max``, ``pids.max``, ``cpu.weight``). On a hybrid machine the unit has
a directory in each hierarchy it needs: the v2 mount (or, without one, the v1 freezer) to
track and kill it, and the v1 memory, pids and cpu hierarchies for its limits.

Units live below the agent's own cgroup in each hierarchy (never moved out of whatever
confines the agent), under ``shoal.<tag>`` where the tag names the agent's state directory:
two fleets on one machine never see each other's units. The path logic is pure (``plan``);
the rest reads and writes cgroupfs.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from .. import messages as m

log = logging.getLogger(__name__)

LIMIT_CONTROLLERS = ("memory", "pids", "cpu")
_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
Kind = Literal["v1", "v2"]


# --------------------------------------------------------------------------- pure: layout

@dataclass(frozen=True)
class Hierarchy:
    kind: Kind
    mount: str  # where the hierarchy is mounted
    own: str  # the agent's cgroup inside it, as a directory ("/sys/fs/cgroup/memory/x")
    controllers: frozenset[str]  # for v1 the mount's own; for v2 what cgroup.controllers lists


@dataclass(frozen=True)
class Layout:
    """Which hierarchy does what for this agent. ``base`` is the subtree name below the
    agent's own cgroup (``shoal.<tag>``) where its units go."""

    base: str
    tracker: Hierarchy | None  # v2 (populated, kill) or v1 freezer (freeze and kill)
    limits: dict[str, Hierarchy] = field(default_factory=dict)  # controller -> hierarchy

    def hierarchies(self) -> list[Hierarchy]:
        out = [self.tracker] if self.tracker is not None else []
        for h in self.limits.values():
            if h not in out:
                out.append(h)
        return out

    def base_dirs(self) -> list[str]:
        return [os.path.join(h.own, self.base) for h in self.hierarchies()]

    def unit_dirs(self, name: str) -> list[str]:
        return [os.path.join(d, name) for d in self.base_dirs()]

    def describe(self) -> str:
        """For logs and ``shoal nodes``: ``v2`` or ``v2+v1(memory,pids,cpu)`` and so on."""
        if self.tracker is None:
            return ""
        parts: list[str] = ["v2" if self.tracker.kind == "v2" else "v1 freezer"]
        v1 = sorted(c for c, h in self.limits.items() if h.kind == "v1")
        v2 = sorted(c for c, h in self.limits.items() if h.kind == "v2")
        if v2:
            parts[0] += f"({','.join(v2)})"
        if v1:
            parts.append(f"v1({','.join(v1)})")
        return "+".join(parts)


def parse_mountinfo(text: str) -> tuple[str | None, dict[str, str], dict[str, str]]:
    """(v2 mount point, {v1 controller: mount point}, {mount point: root inside the
    hierarchy}) from /proc/self/mountinfo."""
    v2: str | None = None
    v1: dict[str, str] = {}
    roots: dict[str, str] = {}
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        root, point, fstype = _unescape(fields[3]), _unescape(fields[4]), tail[0]
        if fstype == "cgroup2" and v2 is None:
            v2 = point
            roots[point] = root
        elif fstype == "cgroup":
            for opt in tail[2].split(","):
                if opt in LIMIT_CONTROLLERS or opt == "freezer":
                    v1.setdefault(opt, point)
                    roots[point] = root
    return v2, v1, roots


def _unescape(s: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    return s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n") \
        .replace("\\134", "\\")


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """{controller: path} from /proc/<pid>/cgroup; the v2 path is under the key ``""``."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, ctrls, path = parts
        for c in ctrls.split(",") if ctrls else [""]:
            out.setdefault(c, path)
    return out


def _join(mount: str, root: str, path: str) -> str | None:
    """The directory of cgroup ``path`` in a hierarchy mounted at ``mount`` whose mount
    shows the subtree ``root``; None when the path is outside what is mounted."""
    if root not in ("", "/"):
        if path != root and not path.startswith(root.rstrip("/") + "/"):
            return None
        path = path[len(root):]
    return os.path.normpath(mount + "/" + path.lstrip("/")) if path.strip("/") else mount


def plan(mountinfo: str, proc_cgroup: str, v2_controllers: Iterable[str],
         base: str) -> Layout | str:
    """Decide the layout from what the kernel shows; a string says why there is none.
    ``v2_controllers`` are those the agent can enable below its own v2 cgroup."""
    v2_mount, v1_mounts, roots = parse_mountinfo(mountinfo)
    own = parse_proc_cgroup(proc_cgroup)
    v2: Hierarchy | None = None
    if v2_mount is not None and "" in own:
        d = _join(v2_mount, roots.get(v2_mount, "/"), own[""])
        if d is not None:
            v2 = Hierarchy("v2", v2_mount, d, frozenset(v2_controllers) & set(LIMIT_CONTROLLERS))
    v1: dict[str, Hierarchy] = {}
    for ctrl, point in v1_mounts.items():
        if ctrl in own:
            d = _join(point, roots.get(point, "/"), own[ctrl])
            if d is not None:
                v1[ctrl] = Hierarchy("v1", point, d, frozenset({ctrl}))
    tracker = v2 if v2 is not None else v1.get("freezer")
    if tracker is None:
        return "no cgroup v2 mount and no v1 freezer hierarchy"
    limits: dict[str, Hierarchy] = {}
    for ctrl in LIMIT_CONTROLLERS:
        if v2 is not None and ctrl in v2.controllers:
            limits[ctrl] = v2
        elif ctrl in v1:
            limits[ctrl] = v1[ctrl]
    return Layout(base, tracker, limits)


def unit_name(node: str, kind: str, ident: str) -> str:
    """``<node>.<kind>.<id>``: node names and ids have no dots, so ``<node>.`` prefixes
    exactly one node's units. Anything unusual in an id becomes ``_``."""
    safe = "".join(c if c in _SAFE else "_" for c in ident[:80])
    return f"{node}.{kind}.{safe}"


def cpu_shares(weight: int) -> int:
    """v2 cpu.weight (1..10000, default 100) as v1 cpu.shares (default 1024)."""
    return max(2, weight * 1024 // 100)


def limit_files(kind: Kind, controller: str, limits: m.Limits) -> list[tuple[str, str]]:
    """The files to write, in order, for ``limits`` in one controller."""
    out: list[tuple[str, str]] = []
    if controller == "memory" and limits.memory_mb:
        value = str(limits.memory_mb << 20)
        if kind == "v2":
            out += [("memory.max", value), ("memory.swap.max", "0")]
        else:
            out += [("memory.limit_in_bytes", value), ("memory.memsw.limit_in_bytes", value)]
    elif controller == "pids" and limits.processes:
        out.append(("pids.max", str(limits.processes)))
    elif controller == "cpu" and limits.cpu_weight:
        out.append(("cpu.weight", str(limits.cpu_weight)) if kind == "v2"
                   else ("cpu.shares", str(cpu_shares(limits.cpu_weight))))
    return out


def parse_keyed(text: str) -> dict[str, int]:
    """``key value`` lines (cgroup.events, memory.events, memory.oom_control, pids.events)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        k, _, v = line.partition(" ")
        with contextlib.suppress(ValueError):
            out[k] = int(v)
    return out


# --------------------------------------------------------------------------- I/O: detection

def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


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
            leaf = os.path.join(own, "agent")
            os.makedirs(leaf, exist_ok=True)
            for pid in _read(os.path.join(own, "cgroup.procs")).split():
                with contextlib.suppress(OSError):
                    _write(os.path.join(leaf, "cgroup.procs"), pid)
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
        return parse_keyed(_read(os.path.join(d, "cgroup.events"))).get("populated", 0) == 1
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


class Unit:
    """One run's or session's cgroup: a directory in the tracking hierarchy, and one in each
    hierarchy that sets one of its limits."""

    def __init__(self, layout: Layout, name: str, limits: m.Limits | None = None) -> None:
        assert layout.tracker is not None
        limits = limits or m.Limits()
        self.layout = layout
        self.name = name
        self.limits = limits
        self.tracker = os.path.join(layout.tracker.own, layout.base, name)
        self._writes: list[tuple[str, str]] = []  # (path, value)
        self.dirs = [self.tracker]
        for ctrl, h in layout.limits.items():
            d = os.path.join(h.own, layout.base, name)
            files = limit_files(h.kind, ctrl, limits)
            if files and d not in self.dirs:
                self.dirs.append(d)
            self._writes += [(os.path.join(d, f), v) for f, v in files]

    def create(self) -> None:
        """Make the directories and write the limits; raises OSError (all undone)."""
        made: list[str] = []
        try:
            for d in self.dirs:
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
