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


# --- rcopy -r: a tree back from each node, as LOCALDIR/NAME.node -----------------------

def test_rcopy_gathers_one_tree_per_node(fleet: Fleet, tmp_path: Path) -> None:
    for n in ("node-1", "node-2"):
        (tmp_path / n).mkdir()
        make_tree(tmp_path / n)
    suid = tmp_path / "node-2" / "app" / "bin" / "tool"
    suid.write_text("x")
    suid.chmod(0o4755)  # arrives, its set-user-id bit dropped (the files are ours now)
    os.link(suid, tmp_path / "node-2" / "app" / "tool-again")  # a hard link inside: kept
    out = tmp_path / "out"
    out.mkdir()
    r = fleet.shoal("rcopy", "-r", "-n", "node-[1-2]", f"{tmp_path}/{{node}}/app", str(out))
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["app.node-1", "app.node-2"]
    got = out / "app.node-1"
    assert treecopy.listing(got) == treecopy.listing(tmp_path / "node-1" / "app")
    assert os.readlink(got / "passwd") == "/etc/passwd"  # a link, never followed
    assert stat.S_IMODE((got / "bin" / "run").stat().st_mode) == 0o750
    assert stat.S_IMODE((got / "conf.d").stat().st_mode) == 0o700
    assert got.stat().st_mtime == 1_500_000_000
    tool = out / "app.node-2" / "bin" / "tool"
    assert stat.S_IMODE(tool.stat().st_mode) == 0o755
    assert tool.stat().st_ino == (out / "app.node-2" / "tool-again").stat().st_ino
    # again: each tree replaced whole, nothing left beside them
    (got / "stale").write_text("old")
    (tmp_path / "node-1" / "app" / "new").write_text("new")
    r = fleet.shoal("rcopy", "-r", "-n", "node-1", f"{tmp_path}/node-1/app", str(out))
    assert r.returncode == 0, r.stderr
    assert treecopy.listing(got) == treecopy.listing(tmp_path / "node-1" / "app")
    assert sorted(p.name for p in out.iterdir()) == ["app.node-1", "app.node-2"]


def test_rcopy_tree_failures_are_named_and_the_others_done(fleet: Fleet,
                                                          tmp_path: Path) -> None:
    (tmp_path / "node-1").mkdir()
    make_tree(tmp_path / "node-1")
    (tmp_path / "node-2").mkdir()
    out = tmp_path / "out"
    out.mkdir()
    r = fleet.shoal("rcopy", "-r", "-n", "node-[1-2]", f"{tmp_path}/{{node}}/app", str(out))
    assert r.returncode == 2, r.stderr
    assert f"node-2: not a directory: {tmp_path}/node-2/app" in r.stderr
    assert "exit 2: node-2" in r.stderr and "1 ok" in r.stderr, r.stderr
    assert [p.name for p in out.iterdir()] == ["app.node-1"]
    # a fifo on the node: refused there, named, nothing left here
    (tmp_path / "node-2" / "app").mkdir()
    os.mkfifo(tmp_path / "node-2" / "app" / "pipe")
    r = fleet.shoal("rcopy", "-r", "-n", "node-2", f"{tmp_path}/node-2/app", str(out))
    assert r.returncode == 3 and "(a device, fifo or socket): pipe" in r.stderr, r.stderr
    r = fleet.shoal("rcopy", "-r", "--max-size", "4K", "-n", "node-1",
                    f"{tmp_path}/node-1/app", str(out))
    assert r.returncode == 3 and "over the --max-size of 4096" in r.stderr, r.stderr
    assert [p.name for p in out.iterdir()] == ["app.node-1"]
    r = fleet.shoal("rcopy", "-r", "-n", "node-1", "/etc", str(tmp_path / "missing"))
    assert r.returncode == 2 and "one tree per node" in r.stderr


def _tar(path: Path, *members: tuple[str, bytes | str | None, int]) -> Path:
    """A tar stream a hostile node could send: (name, content | link target, type)."""
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name, data, kind in members:
            info = tarfile.TarInfo(name)
            info.type = bytes([kind])
            info.mode = 0o644
            if isinstance(data, bytes):
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                info.linkname = data or ""
                tar.addfile(info)
    return path


def test_unpack_refuses_what_would_reach_outside_the_tree(tmp_path: Path) -> None:
    """rcopy -r unpacks what a node sent: a stream that is not one our script would make
    (links out, devices, names twice, paths out) is refused, nothing written outside."""
    import tarfile

    victim = tmp_path / "victim"
    victim.write_text("keep")
    reg, lnk, sym, chr_ = (ord(t) for t in (tarfile.REGTYPE, tarfile.LNKTYPE,
                                            tarfile.SYMTYPE, tarfile.CHRTYPE))
    cases = {
        "hard link out": [("./h", str(victim), lnk), ("./h", b"owned", reg)],
        "hard link up": [("./h", "../victim", lnk)],
        "through a symlink": [("./s", str(tmp_path), sym), ("./s/victim", b"owned", reg)],
        "dot-dot": [("../victim", b"owned", reg)],
        "device": [("./null", None, chr_)],
        "named twice": [("./f", b"a", reg), ("./f", b"owned", reg)],
    }
    for what, members in cases.items():
        dest = tmp_path / what
        dest.mkdir()
        try:
            treecopy.unpack(_tar(tmp_path / f"{what}.tar", *members), dest)
        except treecopy.TreeError as e:
            assert "refused" in str(e), (what, e)
        else:
            raise AssertionError(f"{what}: unpacked")
        assert victim.read_text() == "keep", what
        assert not (dest / "null").exists()
