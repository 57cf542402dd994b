"""``shoal run`` end to end: a real ``shoal up``, real agents, real processes."""

from __future__ import annotations

import json
import os
import signal
import time

import psutil
import pytest

from fleet import SHOAL, Fleet, Terminal, wait_for


def lines(text: str) -> list[str]:
    return text.splitlines()


@pytest.mark.tls
def test_argv_is_passed_as_is(fleet: Fleet) -> None:
    r = fleet.shoal("run", "--all", "--", "printf", "%s\\n", "a b", "c")
    assert r.returncode == 0, r.stderr
    for node in ("node-1", "node-2"):
        mine = [ln for ln in lines(r.stdout) if ln.startswith(f"{node}: ")]
        assert mine == [f"{node}: a b", f"{node}: c"]


def test_a_command_sees_none_of_the_agent_s_settings(fleet: Fleet) -> None:
    # The agent runs with SHOAL_* settings (SHOAL_HOME here; a NATS password or credentials
    # file elsewhere): a command gets only its run's own SHOAL_NODE and SHOAL_RUN_ID.
    r = fleet.shoal("run", "-n", "node-1", "--", "env")
    assert r.returncode == 0, r.stderr
    names = {ln.split(": ", 1)[1].split("=", 1)[0] for ln in lines(r.stdout) if "=" in ln}
    assert "PATH" in names
    assert {n for n in names if n.startswith("SHOAL_")} == {"SHOAL_NODE", "SHOAL_RUN_ID"}


def test_shell_is_explicit(fleet: Fleet) -> None:
    r = fleet.shoal("run", "-n", "node-1", "--shell", "echo one two | wc -w")
    assert (r.returncode, r.stdout.strip()) == (0, "node-1: 2")
    # Without --shell, a pipe is just an argument.
    r = fleet.shoal("run", "-n", "node-1", "--", "echo", "a", "|", "wc")
    assert r.stdout.strip() == "node-1: a | wc"


@pytest.mark.tls
def test_stdout_and_stderr_are_separate(fleet: Fleet) -> None:
    r = fleet.shoal("run", "-n", "node-1", "--shell", "echo out; echo err >&2")
    assert r.stdout == "node-1: out\n"
    assert "node-1: err\n" in r.stderr


@pytest.mark.tls
@pytest.mark.parametrize(("argv", "status"), [
    (["true"], 0),
    (["sh", "-c", "exit 3"], 3),
    (["no-such-command-xyz"], 127),
])
def test_exit_status(fleet: Fleet, argv: list[str], status: int) -> None:
    r = fleet.shoal("run", "--all", "--", *argv)
    assert r.returncode == status, r.stderr
    if status:
        assert f"exit {status}: node-[1-2]" in r.stderr
    if status == 127:
        assert "node-1: command not found: no-such-command-xyz" in r.stderr


def test_largest_exit_code_wins(fleet: Fleet) -> None:
    r = fleet.shoal("run", "--all", "--shell", 'case $SHOAL_NODE in node-1) exit 4;; esac; exit 9')
    assert r.returncode == 9
    assert "exit 4: node-1; exit 9: node-2" in r.stderr


@pytest.mark.tls
def test_stdin_reaches_every_node_with_its_end(fleet: Fleet) -> None:
    r = fleet.shoal("run", "--all", "--stdin", "--", "sort", input="3\n1\n2\n")
    assert r.returncode == 0, r.stderr
    for node in ("node-1", "node-2"):
        assert [ln for ln in lines(r.stdout) if ln.startswith(node)] == [
            f"{node}: 1", f"{node}: 2", f"{node}: 3"]


@pytest.mark.tls
def test_large_stdin_is_byte_exact(fleet: Fleet) -> None:
    data = os.urandom(3 << 20)
    r = fleet.shoal("run", "--all", "--stdin", "--json", "--", "sha256sum", input=data)
    assert r.returncode == 0, r.stderr
    import hashlib

    digest = hashlib.sha256(data).hexdigest()
    for row in map(json.loads, r.stdout.splitlines()):
        assert row["stdout"].split()[0] == digest


def test_gather_groups_identical_output(fleet: Fleet) -> None:
    r = fleet.shoal("run", "--all", "--gather", "--", "echo", "same")
    assert r.returncode == 0
    assert "node-[1-2] (2)" in r.stdout
    assert r.stdout.count("same") == 1
    r = fleet.shoal("run", "--all", "--gather", "--shell", "echo $SHOAL_NODE")
    assert "node-1 (1)" in r.stdout and "node-2 (1)" in r.stdout


@pytest.mark.tls
def test_json_one_object_per_node(fleet: Fleet) -> None:
    r = fleet.shoal("run", "--all", "--json", "--shell", "echo hi; echo oops >&2; exit 2")
    assert r.returncode == 2
    rows = {row["node"]: row for row in map(json.loads, r.stdout.splitlines())}
    assert set(rows) == {"node-1", "node-2"}
    for row in rows.values():
        assert (row["stdout"], row["stderr"], row["exit_code"], row["signal"]) == (
            "hi\n", "oops\n", 2, None)
        assert row["duration_s"] >= 0


@pytest.mark.tls
def test_timeout_ends_and_names_the_nodes(fleet: Fleet) -> None:
    r = fleet.shoal("run", "--all", "--timeout", "0.5", "--", "sleep", "30", timeout=20)
    assert r.returncode == 255
    assert "timed out: node-[1-2]" in r.stderr


@pytest.mark.tls
def test_binary_output_never_crashes(fleet: Fleet) -> None:
    for mode in ([], ["--gather"], ["--json"]):
        r = fleet.shoal("run", "--all", *mode, "--shell",
                        "head -c 20000 /dev/urandom; printf '\\377\\376\\n'", input=b"")
        assert r.returncode == 0, r.stderr


def test_lines_are_never_interleaved(fleet: Fleet) -> None:
    script = "i=0; while [ $i -lt 2000 ]; do echo $SHOAL_NODE-line-$i-xxxxxxxxxxxxxxxxxxxx; " \
             "i=$((i+1)); done"
    r = fleet.shoal("run", "--all", "--shell", script)
    assert r.returncode == 0
    out = lines(r.stdout)
    assert len(out) == 4000
    for ln in out:
        node, _, text = ln.partition(": ")
        assert text.startswith(f"{node}-line-") and text.endswith("x" * 20)


def test_selection_errors(fleet: Fleet) -> None:
    r = fleet.shoal("run", "-n", "nope-9", "--", "true")
    assert r.returncode != 0 and "unknown node(s): nope-9" in r.stderr
    r = fleet.shoal("run", "--all", "-x", "node-[1-2]", "--", "true")
    assert r.returncode != 0 and "matched no node" in r.stderr
    r = fleet.shoal("run", "--", "true")
    assert r.returncode != 0 and "no targets" in r.stderr
    r = fleet.shoal("run", "-n", "node[1-", "--", "true")
    assert r.returncode != 0 and "bad node set" in r.stderr
    r = fleet.shoal("run", "--all")
    assert r.returncode == 2 and "give a command" in r.stderr


def test_nodeset_and_exclusion(fleet: Fleet) -> None:
    r = fleet.shoal("run", "-n", "node-[1-2]", "-x", "node-2", "--", "echo", "x")
    assert r.stdout == "node-1: x\n"


@pytest.mark.tls
def test_labels_and_unreachable_and_down(fleet: Fleet) -> None:
    agent = fleet.agent("edge-1", "-l", "zone=edge")
    r = fleet.shoal("run", "-l", "zone=edge", "--", "echo", "edge")
    assert r.stdout == "edge-1: edge\n"
    os.killpg(agent.pid, signal.SIGKILL)
    agent.wait()
    # Named explicitly while its agent is dead: unreachable, 255, named in the summary.
    r = fleet.shoal("run", "-n", "edge-1,node-1", "--", "true")
    assert r.returncode == 255
    assert "unreachable: edge-1" in r.stderr
    fleet.wait_nodes(["edge-1"], state="down", timeout=10)


@pytest.mark.tls
def test_tty_program(fleet: Fleet) -> None:
    """An interactive terminal: stty sees the size, a resize reaches it, Ctrl-C too."""
    import time

    term = Terminal([SHOAL, "run", "-t", "-n", "node-1", "--", "bash", "--norc", "--noprofile",
                     "-i"], fleet.env, rows=30, cols=100)
    try:
        term.read_until(b"bash")  # the remote prompt
        term.write(b"stty size; tty\r")
        term.read_until(b"30 100")
        term.read_until(b"/dev/pts/")
        term.resize(40, 120)
        # The new size travels CLI -> controller -> agent apart from the keystrokes: ask
        # again until it has arrived (on a loaded machine that may take more than a moment).
        deadline = time.monotonic() + 30
        while True:
            term.write(b"stty size\r")
            try:
                term.read_until(b"40 120", timeout=1.0)
                break
            except AssertionError:
                assert time.monotonic() < deadline, "the resize never reached the terminal"
        term.write(b"sleep 100\r")
        time.sleep(0.5)
        term.write(b"\x03")
        term.write(b"echo after-$?\r")
        term.read_until(b"after-130")
        term.write(b"exit 7\r")
        assert term.proc.wait(15) == 7
    finally:
        term.close()


def test_run_processes_are_gone_after_the_run(fleet: Fleet) -> None:
    # A duration no other process on this machine uses: another fleet's sleeps don't count.
    marker = f"300.{os.getpid()}{time.monotonic_ns() % 10**6:06d}"
    r = fleet.shoal("run", "--all", "--shell", f"sleep {marker} & echo started")
    assert r.returncode == 0
    # The agent ends the whole process group once the leader exits and output is done.
    assert "started" in r.stdout
    wait_for(lambda: not [p for p in psutil.process_iter(["cmdline"])
                          if marker in (p.info.get("cmdline") or [])])


def test_progress_bar_on_a_terminal(fleet: Fleet) -> None:
    term = Terminal([SHOAL, "run", "--all", "--gather", "--", "sleep", "1"], fleet.env)
    try:
        term.read_until(b"gathering")
        term.read_until(b"node-[1-2] (2)")
        assert term.proc.wait(15) == 0
    finally:
        term.close()
