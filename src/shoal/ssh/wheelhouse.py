"""The wheels ``shoal agent install`` ships: this machine's shoal and its runtime dependencies,
taken from the environment this command runs in (targets need no internet, and get exactly
the versions this machine runs).

shoal itself: an editable install (a checkout) is built with ``pip wheel --no-deps
--no-build-isolation`` (reproducible: the same tree gives the same bytes); an installed one is
repacked like the others. Every other distribution is repacked from what is installed: the
files its RECORD lists (less bytecode and the installer's own notes), scripts back under
``NAME.data/scripts`` (console-script wrappers left out, the target's pip writes its own), the
WHEEL file's tags kept, a fresh RECORD, fixed timestamps: the same install gives the same
bytes, so a second ``agent install`` sees the same hashes and changes nothing.

Built wheels are kept in ``$XDG_CACHE_HOME/shoal/wheels`` (default ``~/.cache``), keyed by
the sha256 of their inputs (a distribution's RECORD; shoal's source files), so a second run
does not pack 20 MB again.

The closure is every installed distribution that shoal's requirements reach (extras followed,
markers left to the target's pip: one not installed here is not needed here either), plus pip,
which the target runs from its wheel to install the rest offline.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from importlib import metadata
from pathlib import Path, PurePosixPath

from ..errors import ConfigError

_REQ_RE = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?")
_EXTRA_RE = re.compile(r"""extra\s*==\s*['"]([^'"]+)['"]""")
_SKIP_INFO = {"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"}
_EPOCH = (1980, 1, 1, 0, 0, 0)


@dataclass(frozen=True)
class Wheel:
    name: str  # the file name
    path: Path
    sha256: str
    project: str  # canonical project name


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _escape(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name)


def _requirements(dist: metadata.Distribution, extras: set[str]) -> list[tuple[str, set[str]]]:
    out = []
    for line in dist.requires or []:
        req, _, marker = line.partition(";")
        found = _REQ_RE.match(req)
        if not found:
            continue
        wanted = set(_EXTRA_RE.findall(marker))
        if wanted and not wanted & extras:
            continue  # an extra nobody asked for
        sub = {e.strip() for e in (found.group(2) or "").split(",") if e.strip()}
        out.append((canonical(found.group(1)), sub))
    return out


def closure(root: str = "shoal") -> list[metadata.Distribution]:
    """The installed distributions ``root`` needs, ``root`` first."""
    seen: dict[str, metadata.Distribution] = {}
    extras: dict[str, set[str]] = {}
    todo: list[tuple[str, set[str]]] = [(canonical(root), set())]
    while todo:
        name, want = todo.pop()
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            if name == canonical(root):
                raise ConfigError(f"{root} is not installed in {sys.prefix}") from None
            continue  # a requirement of another platform or Python
        new = want - extras.get(name, set())
        if name in seen and not new:
            continue
        seen[name] = dist
        extras[name] = extras.get(name, set()) | want
        todo.extend(_requirements(dist, extras[name]))
    return list(seen.values())


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(
        b"=").decode()


def _tag(wheel_text: str) -> str:
    """The compressed tag set of a WHEEL file (``py3-none-a.b``)."""
    tags = [line.split(":", 1)[1].strip() for line in wheel_text.splitlines()
            if line.startswith("Tag:")]
    if not tags:
        return "py3-none-any"
    parts = [t.split("-") for t in tags]
    return "-".join(".".join(dict.fromkeys(p[i] for p in parts)) for i in range(3))


def repack(dist: metadata.Distribution, out_dir: Path) -> Path:
    """An installed distribution back into a wheel (see the module's docstring)."""
    name, version = dist.metadata["Name"], dist.version
    files = dist.files or []
    info = next((f.parts[0] for f in files if f.parts[0].endswith(".dist-info")), None)
    if info is None:
        raise ConfigError(f"{name} {version} has no RECORD: reinstall it with pip")
    site = Path(str(dist.locate_file(""))).resolve()
    prefix = Path(sys.prefix).resolve()
    wrappers = {ep.name for ep in dist.entry_points
                if ep.group in ("console_scripts", "gui_scripts")}
    data_dir = f"{_escape(name)}-{version}.data"
    entries: dict[str, tuple[bytes, int]] = {}
    for f in files:
        if f.suffix == ".pyc" or "__pycache__" in f.parts:
            continue
        if f.parts[0] == info and len(f.parts) == 2 and f.name in _SKIP_INFO:
            continue
        src = (site / str(f)).resolve()
        if not src.is_file():
            continue
        data = src.read_bytes()
        if str(f).startswith(".."):
            rel = PurePosixPath(src.relative_to(prefix).as_posix())
            if rel.parts[0] == "bin":
                if rel.name in wrappers:
                    continue
                if data.startswith(b"#!") and b"python" in data.split(b"\n", 1)[0]:
                    data = b"#!python\n" + data.split(b"\n", 1)[1]
                arc = f"{data_dir}/scripts/{rel.name}"
            else:
                arc = f"{data_dir}/data/{rel.as_posix()}"
        else:
            arc = PurePosixPath(str(f)).as_posix()
        entries[arc] = (data, src.stat().st_mode & 0o777)
    tag = _tag(entries.get(f"{info}/WHEEL", (b"", 0))[0].decode())
    record = "".join(f"{arc},{_record_hash(d)},{len(d)}\n" for arc, (d, _) in
                     sorted(entries.items())) + f"{info}/RECORD,,\n"
    entries[f"{info}/RECORD"] = (record.encode(), 0o644)
    path = out_dir / f"{_escape(name)}-{version}-{tag}.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        # dist-info last, as wheels are written
        for arc in sorted(entries, key=lambda a: (a.startswith(info), a)):
            data, mode = entries[arc]
            zi = zipfile.ZipInfo(arc, _EPOCH)
            zi.external_attr = (0o100000 | (mode or 0o644)) << 16
            zi.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(zi, data)
    return path


def _editable_source(dist: metadata.Distribution) -> Path | None:
    text = dist.read_text("direct_url.json")
    if not text:
        return None
    info = json.loads(text)
    if not info.get("dir_info", {}).get("editable"):
        return None
    url = str(info.get("url", ""))
    return Path(url.removeprefix("file://")) if url.startswith("file://") else None


def build_shoal(dist: metadata.Distribution, out_dir: Path) -> Path:
    source = _editable_source(dist)
    if source is None:
        return repack(dist, out_dir)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "-q", "-w", str(out_dir), str(source)],
        capture_output=True, text=True)
    built = sorted(out_dir.glob("shoal-*.whl"))
    if done.returncode != 0 or len(built) != 1:
        raise ConfigError(f"cannot build shoal's wheel from {source}: "
                          f"{(done.stderr or done.stdout).strip()[-2000:]}")
    return built[0]


def _wheel(path: Path, project: str) -> Wheel:
    return Wheel(path.name, path, hashlib.sha256(path.read_bytes()).hexdigest(), project)


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "shoal" / "wheels"


_SOURCE_FILES = ("pyproject.toml", "hatch_build.py", "README.md", "LICENSE")


def _inputs_key(dist: metadata.Distribution) -> str:
    """What the wheel is made of: shoal's source tree (editable), else the RECORD."""
    h = hashlib.sha256(f"{dist.metadata['Name']} {dist.version} {sys.prefix}".encode())
    source = _editable_source(dist)
    if source is None:
        h.update((dist.read_text("RECORD") or "").encode())
        return h.hexdigest()[:32]
    paths = [source / f for f in _SOURCE_FILES] + sorted((source / "src").rglob("*"))
    for p in paths:
        if p.is_file() and "__pycache__" not in p.parts:
            h.update(f"{p.relative_to(source)}\0".encode())
            h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()[:32]


def _cached(dist: metadata.Distribution, make: Callable[[Path], Path]) -> Wheel:
    slot = cache_dir() / _inputs_key(dist)
    found = sorted(slot.glob("*.whl")) if slot.is_dir() else []
    if len(found) != 1:
        slot.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=slot.parent))
        try:
            make(tmp)
            shutil.rmtree(slot, ignore_errors=True)
            os.replace(tmp, slot)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        found = sorted(slot.glob("*.whl"))
    return _wheel(found[0], canonical(dist.metadata["Name"]))


def collect() -> list[Wheel]:
    """shoal's wheel first, then its dependencies', then pip's (paths in the cache)."""
    dists = closure("shoal")
    wheels = [_cached(dists[0], partial(build_shoal, dists[0]))]
    wheels += [_cached(dist, partial(repack, dist)) for dist in dists[1:]]
    try:
        pip = metadata.distribution("pip")
    except metadata.PackageNotFoundError:
        raise ConfigError("agent install needs pip in the environment shoal runs from "
                          f"({sys.prefix}): install it there (python -m ensurepip)") from None
    wheels.append(_cached(pip, partial(repack, pip)))
    return wheels
