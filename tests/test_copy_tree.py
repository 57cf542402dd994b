"""``shoal copy -r``: a directory tree to many nodes, one tar stream, modes, mtimes and
symlinks kept, checked by the sha256 of a canonical listing at each end."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from fleet import Fleet
from shoal.logic import treecopy


def make_tree(root: Path) -> Path:
    src = root / "app"
    (src / "bin").mkdir(parents=True)
    (src / "conf.d").mkdir()
    (src / "bin" / "run").write_text("#!/bin/sh\necho run\n")
    (src / "bin" / "run").chmod(0o750)
    (src / "conf.d" / "a b.conf").write_bytes(os.urandom(5000))
    (src / "empty").mkdir()
    (src / "current").symlink_to("bin")
    (src / "passwd").symlink_to("/etc/passwd")  # kept as a link: never followed
    (src / "conf.d").chmod(0o700)
    for i, p in enumerate(sorted(src.rglob("*"), reverse=True)):
        if not p.is_symlink():
            os.utime(p, (1_600_000_000 + i, 1_600_000_000 + i))
    os.utime(src, (1_500_000_000, 1_500_000_000))
    return src


def test_a_tree_arrives_whole_with_modes_mtimes_and_links(fleet: Fleet, tmp_path: Path) -> None:
    src = make_tree(tmp_path)
    for n in ("node-1", "node-2"):
        (tmp_path / n).mkdir()
    r = fleet.shoal("copy", "-r", "-n", "node-[1-2]", str(src), f"{tmp_path}/{{node}}/")
    assert r.returncode == 0, r.stderr
    want = treecopy.listing(src)
    for n in ("node-1", "node-2"):
        got = tmp_path / n / "app"
        assert treecopy.listing(got) == want
        assert os.readlink(got / "passwd") == "/etc/passwd"
        assert stat.S_IMODE((got / "bin" / "run").stat().st_mode) == 0o750
        assert got.stat().st_mtime == 1_500_000_000
    # again, onto the tree that is there: replaced whole, nothing left beside it
    (src / "bin" / "new").write_text("new\n")
    (tmp_path / "node-1" / "app" / "stale").write_text("old")
    r = fleet.shoal("copy", "-r", "-n", "node-1", str(src), f"{tmp_path}/node-1")
    assert r.returncode == 0, r.stderr
    assert treecopy.listing(tmp_path / "node-1" / "app") == treecopy.listing(src)
    assert sorted(p.name for p in (tmp_path / "node-1").iterdir()) == ["app"]


def test_tree_failures_are_named_and_change_nothing(fleet: Fleet, tmp_path: Path) -> None:
    src = make_tree(tmp_path)
    (tmp_path / "node-1").mkdir()
    (tmp_path / "node-2").mkdir()
    (tmp_path / "node-2" / "app").write_text("a file")
    r = fleet.shoal("copy", "-r", "-n", "node-[1-2]", str(src), f"{tmp_path}/{{node}}")
    assert r.returncode != 0
    assert "app exists and is not a directory" in r.stderr, r.stderr
    assert (tmp_path / "node-2" / "app").read_text() == "a file"
    assert treecopy.listing(tmp_path / "node-1" / "app") == treecopy.listing(src)
    r = fleet.shoal("copy", "-r", "-n", "node-1", str(src), f"{tmp_path}/missing/x")
    assert r.returncode != 0 and "no such directory" in r.stderr
    assert not list(tmp_path.glob("**/.shoal-copy.*"))


def test_bad_trees_are_refused_before_anything_is_sent(fleet: Fleet, tmp_path: Path) -> None:
    src = make_tree(tmp_path)
    dest = tmp_path / "dest"
    dest.mkdir()
    r = fleet.shoal("copy", "-r", "-n", "node-1", str(src / "bin" / "run"), str(dest))
    assert r.returncode == 2 and "is not a directory" in r.stderr
    r = fleet.shoal("copy", "-n", "node-1", str(src), str(dest))
    assert r.returncode == 2 and "copy -r" in r.stderr
    os.mkfifo(src / "fifo")
    r = fleet.shoal("copy", "-r", "-n", "node-1", str(src), str(dest))
    assert r.returncode == 2 and "not a file, directory or symlink" in r.stderr, r.stderr
    (src / "fifo").unlink()
    r = fleet.shoal("copy", "-r", "--max-size", "4K", "-n", "node-1", str(src), str(dest))
    assert r.returncode == 2 and "over --max-size" in r.stderr, r.stderr
    assert list(dest.iterdir()) == []
