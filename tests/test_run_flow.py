"""Output flow control end to end: a reader that stops reading makes the remote process
block on its full pipe; no process on the way (agent, controller) buffers the rest."""

from __future__ import annotations

import subprocess
import time

import psutil

from fleet import SHOAL, Fleet, processes_with_env, wait_for

TOTAL = 200_000_000
PIECE = 64 * 1024  # LineSplitter's max_line: a stream without newlines prints in these pieces


def _written(p: psutil.Process) -> int:
    return p.io_counters().write_chars


def test_a_stalled_reader_blocks_the_process_not_the_agent(fleet: Fleet) -> None:
    agent = fleet.agent("flow-1")
    ctl = psutil.Process(fleet.up.pid) if fleet.up else None
    agent_rss0 = psutil.Process(agent.pid).memory_info().rss
    ctl_rss0 = ctl.memory_info().rss if ctl else 0
    run = subprocess.Popen([SHOAL, "run", "-n", "flow-1", "--", "head", "-c", str(TOTAL),
                            "/dev/zero"], env=fleet.env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
    try:
        head = wait_for(lambda: [p for p in processes_with_env("SHOAL_NODE", "flow-1")
                                 if p.name() == "head"])[0]
        # Nobody reads the CLI's stdout: once the credit window and the socket and pipe
        # buffers on the way are full, head must stop making progress.
        time.sleep(2.0)
        stalled = _written(head)
        time.sleep(1.0)
        assert _written(head) == stalled, "head kept writing with nobody reading"
        assert stalled < TOTAL // 2, f"{stalled} bytes left head with nobody reading"
        agent_growth = psutil.Process(agent.pid).memory_info().rss - agent_rss0
        assert agent_growth < 64 << 20, f"agent RSS grew by {agent_growth >> 20} MiB"
        if ctl is not None:
            ctl_growth = ctl.memory_info().rss - ctl_rss0
            assert ctl_growth < 96 << 20, f"controller RSS grew by {ctl_growth >> 20} MiB"
        # Now read it all: every byte arrives, in prefixed pieces.
        out, err = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 0, err
    pieces = -(-TOTAL // PIECE)
    assert len(out) == TOTAL + pieces * len(b"flow-1: \n")
    assert out.count(b"\n") == pieces
    assert out[:12] == b"flow-1: " + b"\0" * 4
    assert psutil.Process(agent.pid).memory_info().rss - agent_rss0 < 64 << 20
    agent.terminate()
    agent.wait(30)
