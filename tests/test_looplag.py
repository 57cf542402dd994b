"""The agent's "was I away?" test for self-fencing (agent/looplag.py): a coroutine waiting
on NATS for longer than the node TTL is not away; a loop that did not run at all is."""

from __future__ import annotations

import asyncio
import os
import signal
import time

from shoal.agent.looplag import LoopLag


async def test_a_long_wait_is_not_being_away() -> None:
    lag = LoopLag()
    lag.start()
    try:
        await asyncio.sleep(3)  # as a heartbeat put waits out its deadline
        assert lag.take() < 3
    finally:
        lag.stop()


async def test_a_loop_that_did_not_run_was_away() -> None:
    lag = LoopLag()
    lag.start()
    try:
        await asyncio.sleep(0.3)
        time.sleep(1.5)  # the loop is blocked, as when the process is stopped
        assert lag.take() >= 1.5  # counted before the ticker even wakes
        await asyncio.sleep(0.5)
        assert lag.take() < 1.5  # and once
    finally:
        lag.stop()


async def test_a_stopped_process_is_seen_after_it_continues() -> None:
    lag = LoopLag()
    lag.start()
    try:
        await asyncio.sleep(0.3)
        child = os.fork()
        if child == 0:  # stop the parent for a while, then continue it
            time.sleep(0.2)
            os.kill(os.getppid(), signal.SIGSTOP)
            time.sleep(1.5)
            os.kill(os.getppid(), signal.SIGCONT)
            os._exit(0)
        await asyncio.sleep(3)
        os.waitpid(child, 0)
        assert lag.take() >= 1.5
    finally:
        lag.stop()
