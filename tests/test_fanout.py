"""Fan-out as clush and pdsh users know it, end to end on a real fleet: node groups
(groups file and labels), -x/-X, rolling batches, fan-out width; and ``shoal nodeset``."""

from __future__ import annotations

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
