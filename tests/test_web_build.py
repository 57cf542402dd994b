"""The packaging of the web UI: xterm.js is fetched with npm by hatch_build.py at build time.

Builds once per module (about 10 s, needs the npm registry or a warm cache): a wheel straight
from the tree (what ``pip install .`` does), an sdist, and a wheel from that sdist (a clean
tree without node_modules, what ``python -m build`` and PyPI users get). pip and hatchling come
from the locked environment (no build isolation), so the build uses the locked backend.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from shoal import web

ROOT = Path(__file__).resolve().parent.parent
VENDOR = ["xterm.js", "xterm.css", "addon-fit.js"]
PAGES = ["terminal.html", "terminal.js", "terminal.css", "login.js",
         "dashboard.html", "dashboard.js", "dashboard.css"]
WHEEL_FILES = [f"shoal/web/static/vendor/{name}" for name in VENDOR] + \
              [f"shoal/web/static/{name}" for name in PAGES] + ["shoal/web/__init__.py"]


@dataclass
class Built:
    tree_wheel: Path
    sdist: Path
    sdist_wheel: Path


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> None:
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=180)
    out = f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{out}"


def _one(directory: Path, pattern: str) -> Path:
    found = sorted(directory.glob(pattern))
    assert len(found) == 1, f"expected one {pattern} in {directory}, got {found}"
    return found[0]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    tmp = tmp_path_factory.mktemp("webbuild")
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    # 1. pip install . builds the wheel from the tree
    _run([*pip, "-w", str(tmp / "tree"), str(ROOT)], cwd=tmp)
    # 2. the sdist, built by hatchling itself
    _run([sys.executable, "-m", "hatchling", "build", "-t", "sdist", "-d", str(tmp / "sdist")],
         cwd=ROOT)
    sdist = _one(tmp / "sdist", "shoal-*.tar.gz")
    # 3. a wheel from the sdist: no node_modules there, so the hook runs npm ci
    _run([*pip, "-w", str(tmp / "from-sdist"), str(sdist)], cwd=tmp)
    return Built(tree_wheel=_one(tmp / "tree", "shoal-*.whl"), sdist=sdist,
                 sdist_wheel=_one(tmp / "from-sdist", "shoal-*.whl"))


def _check_wheel(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        missing = [name for name in WHEEL_FILES if name not in names]
        assert not missing, f"{wheel.name} lacks {missing}"
        xterm = zf.read("shoal/web/static/vendor/xterm.js")
        assert len(xterm) > 100_000 and b"Terminal" in xterm
        assert b".xterm" in zf.read("shoal/web/static/vendor/xterm.css")
        assert b"FitAddon" in zf.read("shoal/web/static/vendor/addon-fit.js")
        assert not [n for n in names if "node_modules" in n]


def test_wheel_from_tree_ships_web_files(built: Built) -> None:
    _check_wheel(built.tree_wheel)


def test_sdist_has_web_sources_not_build_output(built: Built) -> None:
    with tarfile.open(built.sdist) as tf:
        names = {name.split("/", 1)[1] for name in tf.getnames() if "/" in name}
    for name in ["hatch_build.py", "web/package.json", "web/package-lock.json",
                 *(f"src/shoal/web/static/{page}" for page in PAGES)]:
        assert name in names, f"the sdist lacks {name}"
    assert not [n for n in names if "node_modules" in n or "static/vendor" in n]


def test_wheel_from_sdist_ships_web_files(built: Built) -> None:
    _check_wheel(built.sdist_wheel)


def test_build_without_npm_says_install_it(built: Built, tmp_path: Path) -> None:
    with tarfile.open(built.sdist) as tf:
        tf.extractall(tmp_path, filter="data")
    src = _one(tmp_path, "shoal-*")
    empty = tmp_path / "bin"
    empty.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "hatchling", "build", "-t", "wheel", "-d", str(tmp_path / "out")],
        cwd=src, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PATH": str(empty)})
    assert proc.returncode != 0
    assert "install node.js and npm" in (proc.stderr + proc.stdout).lower()


def test_static_dir_in_this_install(built: Built) -> None:
    # the editable install shares the tree the first build vendored into
    static = web.static_dir()
    assert static == web.STATIC_DIR
    for name in VENDOR:
        assert (static / "vendor" / name).is_file()


def test_static_dir_explains_missing_vendor(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "vendor").mkdir()
    (tmp_path / "vendor" / "xterm.js").write_text("")
    monkeypatch.setattr(web, "STATIC_DIR", tmp_path)
    with pytest.raises(RuntimeError, match=r"reinstall shoal: pip install \.") as info:
        web.static_dir()
    assert "addon-fit.js" in str(info.value) and "xterm.css" in str(info.value)
