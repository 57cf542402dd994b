"""Fan-out as clush and pdsh users know it, end to end on a real fleet: node groups
(groups file and labels), -x/-X, rolling batches, fan-out width; and ``shoal nodeset``."""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet import SHOAL, Fleet

GROUPS = "local:\n  odd: 'node-[1-4/2]'\n  even: 'node-[2,4]'\n  all: 'node-[1-4]'\n"


@pytest.fixture(scope="module")
def fleet4(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    home = tmp_path_factory.mktemp("fanout") / "home"
    home.mkdir(parents=True)
    (home / "groups.yaml").write_text(GROUPS)
    f = Fleet(home, agents=4)
    f.env["SHOAL_GROUPS"] = str(home / "groups.yaml")  # the controller reads it too
    f.start()
    f.agent("gpu-1", "-l", "group=gpu,rack9", "-l", "role=train")
    try:
        yield f
    finally:
        f.stop()


def nodes_of(stdout: str) -> set[str]:
    return {line.split(":", 1)[0] for line in stdout.splitlines() if ":" in line}


def test_groups_from_file_and_labels(fleet4: Fleet) -> None:
    r = fleet4.shoal("run", "-g", "odd", "--", "true")
    assert r.returncode == 0, r.stderr
    r = fleet4.shoal("run", "-n", "@all!@odd,@gpu", "--", "echo", "hi")
    assert (r.returncode, nodes_of(r.stdout)) == (0, {"node-2", "node-4", "gpu-1"}), r.stderr
    r = fleet4.shoal("run", "-n", "@role=train", "--", "echo", "hi")
    assert nodes_of(r.stdout) == {"gpu-1"}
    r = fleet4.shoal("run", "--all", "-X", "even", "-x", "gpu-1", "--", "echo", "hi")
    assert nodes_of(r.stdout) == {"node-1", "node-3"}


def test_bad_node_sets_are_named_and_nothing_runs(fleet4: Fleet, tmp_path: Path) -> None:
    mark = tmp_path / "ran"
    for spec, fragment in [("@nope", "unknown group @nope"),
                           ("node-[1-044]", "padding length mismatch"),
                           ("node-[1-2][3]", "illegal reopening"),
                           ("node-[1-1000000]", "unknown node(s): node-[5-1000000]")]:
        r = fleet4.shoal("run", "-n", spec, "--", "touch", str(mark))
        assert r.returncode != 0 and fragment in r.stderr, (spec, r.stderr)
    assert not mark.exists()


def _order_cmd(log: Path, fail_on: str = "") -> str:
    # flock keeps each append whole; the node that is told to fail does so after logging
    return (f"flock {log} sh -c 'echo $SHOAL_NODE >> {log}';"
            f" [ \"$SHOAL_NODE\" != '{fail_on}' ]")


def test_batches_run_one_slice_after_another(fleet4: Fleet, tmp_path: Path) -> None:
    log = tmp_path / "order"
    r = fleet4.shoal("run", "-n", "node-[1-4]", "--batch", "1", "--shell", _order_cmd(log))
    assert r.returncode == 0, r.stderr
    assert log.read_text().split() == ["node-1", "node-2", "node-3", "node-4"]


def test_batch_stops_after_a_failed_slice_and_names_the_rest(fleet4: Fleet,
                                                             tmp_path: Path) -> None:
    log = tmp_path / "order"
    r = fleet4.shoal("run", "-n", "node-[1-4]", "--batch", "50%",
                     "--shell", _order_cmd(log, fail_on="node-2"))
    assert r.returncode == 1
    assert sorted(log.read_text().split()) == ["node-1", "node-2"]
    assert "exit 1: node-2" in r.stderr
    assert "not run (slice 1 of 2 failed on node-2; --keep-going rolls on): node-[3-4]" \
        in r.stderr
    log.unlink()
    r = fleet4.shoal("run", "-n", "node-[1-4]", "--batch", "2", "--keep-going",
                     "--shell", _order_cmd(log, fail_on="node-2"))
    assert r.returncode == 1 and "not run" not in r.stderr
    assert sorted(log.read_text().split()) == ["node-1", "node-2", "node-3", "node-4"]


def test_fanout_bounds_how_many_run_at_once(fleet4: Fleet, tmp_path: Path) -> None:
    """Each node joins a directory, notes how many are in it, stays a moment, leaves."""
    room = tmp_path / "room"
    room.mkdir()
    seen = tmp_path / "seen"
    cmd = (f"touch {room}/$SHOAL_NODE; ls {room} | wc -l >> {seen}; sleep 0.3;"
           f" rm {room}/$SHOAL_NODE")
    r = fleet4.shoal("run", "-n", "node-[1-4]", "--fanout", "2", "--shell", cmd)
    assert r.returncode == 0, r.stderr
    counts = [int(x) for x in seen.read_text().split()]
    assert len(counts) == 4 and max(counts) <= 2
    # Without the bound they are all in at once: a barrier of four is passed.
    barrier = (f"touch {room}/$SHOAL_NODE; i=0; while [ $(ls {room} | wc -l) -lt 4 ]; do"
               f" i=$((i+1)); [ $i -gt 600 ] && exit 9; sleep 0.05; done")
    r = fleet4.shoal("run", "-n", "node-[1-4]", "--shell", barrier)
    assert r.returncode == 0, r.stderr


def test_batch_flags_are_checked(fleet4: Fleet) -> None:
    for args, fragment in [(["--batch", "0"], "--batch '0'"), (["--batch", "120%"], "120%"),
                           (["--batch", "x"], "--batch 'x'"), (["--keep-going"], "--batch"),
                           (["--batch", "2", "--stdin"], "does not combine")]:
        r = fleet4.shoal("run", "--all", *args, "--", "true", input="")
        assert r.returncode != 0 and fragment in r.stderr, (args, r.stderr)


def nodeset(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([SHOAL, "nodeset", *args], capture_output=True, text=True,
                          input=stdin, timeout=30)


def test_nodeset_command(tmp_path: Path) -> None:
    assert nodeset("node1-ib0", "node2-ib0", "node3-ib0").stdout == "node[1-3]-ib0\n"
    assert nodeset("-c", "artcore[2-32000]-ib0").stdout == "31999\n"
    assert nodeset("-e", "n[1-10/3]").stdout == "n1 n4 n7 n10\n"
    assert nodeset("-e", "-S", ",", "x[1-2]y[3-4]", "-x", "x1y3").stdout == "x1y4,x2y3,x2y4\n"
    assert nodeset("-i", "n[2-9]", "n[1-5]").stdout == "n[2-5]\n"
    assert nodeset("-", stdin="n1 n2\nn3\n").stdout == "n[1-3]\n"
    bad = nodeset("n[1-044]")
    assert bad.returncode == 2 and "padding length mismatch" in bad.stderr
    groups = tmp_path / "groups.yaml"
    groups.write_text(GROUPS)
    assert nodeset("--groups", str(groups), "-l").stdout.split() == ["@all", "@even", "@odd"]
    assert nodeset("--groups", str(groups), "@all!@odd").stdout == "node-[2,4]\n"
    assert "@odd node-[1,3]" in nodeset("--groups", str(groups), "-ll").stdout


# --- shoal copy / rcopy ------------------------------------------------------------------

NODES = ["node-1", "node-2", "node-3", "node-4"]


def sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_copy_to_many_nodes_keeps_bytes_mode_and_mtime(fleet4: Fleet, tmp_path: Path) -> None:
    src = tmp_path / "payload.bin"
    src.write_bytes(os.urandom(5 << 20))
    src.chmod(0o640)
    os.utime(src, (1_600_000_000, 1_600_000_000))
    for n in NODES:
        (tmp_path / n).mkdir()
    r = fleet4.shoal("cp", "-n", "node-[1-4]", str(src), f"{tmp_path}/{{node}}/copy.bin")
    assert r.returncode == 0, r.stderr
    for n in NODES:
        got = tmp_path / n / "copy.bin"
        assert sha(got) == sha(src)
        assert stat.S_IMODE(got.stat().st_mode) == 0o640
        assert int(got.stat().st_mtime) == 1_600_000_000
    # A directory as destination: the file keeps its name; an old file is replaced whole.
    r = fleet4.shoal("copy", "-n", "node-[1-2]", str(src), f"{tmp_path}/{{node}}")
    assert r.returncode == 0, r.stderr
    assert sha(tmp_path / "node-1" / "payload.bin") == sha(src)
    assert not list(tmp_path.glob("*/.shoal-copy.*"))
    # The destination is data, never shell text.
    odd = "a b;$(touch pwned)`touch pwned2`"
    r = fleet4.shoal("copy", "-n", "node-1", str(src), f"{tmp_path}/node-1/{odd}")
    assert r.returncode == 0, r.stderr
    assert sha(tmp_path / "node-1" / odd) == sha(src)
    assert not list(tmp_path.rglob("pwned*")) and not Path("pwned").exists()


def test_copy_failures_are_named_and_the_others_done(fleet4: Fleet, tmp_path: Path) -> None:
    src = tmp_path / "big"
    src.write_bytes(os.urandom(1 << 20))
    for n in ("node-1", "node-2", "node-4"):
        (tmp_path / n).mkdir()
    full = tmp_path / "node-2"
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(full)], check=True)
    try:
        r = fleet4.shoal("copy", "-n", "node-[1-4]", str(src), f"{tmp_path}/{{node}}/f")
        assert r.returncode != 0
        assert "No space left on device" in r.stderr and "node-2:" in r.stderr
        assert f"node-3: no such directory: {tmp_path}/node-3" in r.stderr
        assert "2 ok" in r.stderr, r.stderr
        assert sha(tmp_path / "node-1" / "f") == sha(src) == sha(tmp_path / "node-4" / "f")
        assert list(full.iterdir()) == []  # the partial temporary file was removed
    finally:
        subprocess.run(["umount", str(full)], check=True)


def test_copy_bad_input_is_refused_before_anything_runs(fleet4: Fleet, tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.write_bytes(b"x" * 2000)
    for args, fragment in [
        (["-n", "node-1", str(tmp_path / "missing"), "/tmp/x"], "cannot read"),
        (["-n", "node-1", str(tmp_path), "/tmp/x"], "not a regular file"),
        (["-n", "node-1", "--max-size", "1K", str(small), str(tmp_path / "d")], "over --max-size"),
        (["-n", "node-1", "--max-size", "lots", str(small), str(tmp_path / "d")], "--max-size"),
        (["-n", "nope-9", str(small), str(tmp_path / "d")], "unknown node"),
    ]:
        r = fleet4.shoal("copy", *args)
        assert r.returncode != 0 and fragment in r.stderr, (args, r.stderr)
    assert not (tmp_path / "d").exists()


def test_rcopy_gathers_one_file_per_node(fleet4: Fleet, tmp_path: Path) -> None:
    for i, n in enumerate(NODES):
        (tmp_path / n).mkdir()
        if n != "node-3":
            f = tmp_path / n / "app.log"
            f.write_bytes(os.urandom(100_000 * (i + 1)))
            f.chmod(0o600 + i)
    (tmp_path / "node-4" / "app.log").write_bytes(b"")  # empty files arrive too
    out = tmp_path / "gathered"
    out.mkdir()
    r = fleet4.shoal("rcopy", "-n", "node-[1-4]", f"{tmp_path}/{{node}}/app.log", str(out))
    assert r.returncode == 2, r.stderr
    assert f"node-3: not a regular file: {tmp_path}/node-3/app.log" in r.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "app.log.node-1", "app.log.node-2", "app.log.node-4"]
    for n in NODES:
        if n == "node-3":
            continue
        got, orig = out / f"app.log.{n}", tmp_path / n / "app.log"
        assert got.read_bytes() == orig.read_bytes()
        assert got.stat().st_mode == orig.stat().st_mode
    r = fleet4.shoal("rcp", "-n", "node-1", "--max-size", "1K", f"{tmp_path}/node-1/app.log",
                     str(tmp_path / "gathered"))
    assert r.returncode != 0 and "over the --max-size" in r.stderr
    r = fleet4.shoal("rcopy", "-n", "node-1", "/etc/hostname", str(tmp_path / "no-dir"))
    assert r.returncode == 2 and "is not a directory" in r.stderr
