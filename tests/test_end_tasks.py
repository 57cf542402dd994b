"""A stop ends its background loops even when a cancel is swallowed (Python 3.11's
``wait_for`` returns a result that arrived in the same turn as the cancel)."""

from __future__ import annotations

import asyncio
import logging
import sys

import pytest

from shoal.system.tasks import end_tasks


async def _renewing_loop(replies: list[asyncio.Future[bool]], renewed: list[int]) -> None:
    """A lease loop as the controller's: wait for a reply under a timeout, sleep, again."""
    while True:
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        replies.append(fut)
        await asyncio.wait_for(fut, 5)
        renewed.append(1)
        await asyncio.sleep(0.01)


async def _started(replies: list[asyncio.Future[bool]]) -> None:
    while not replies:
        await asyncio.sleep(0)
    await asyncio.sleep(0)  # into wait_for's await


async def test_a_loop_whose_reply_came_with_the_cancel_is_ended() -> None:
    replies: list[asyncio.Future[bool]] = []
    renewed: list[int] = []
    task = asyncio.create_task(_renewing_loop(replies, renewed))
    await _started(replies)
    replies[-1].set_result(True)  # the reply and the stop's cancel in one turn
    task.cancel()
    if sys.version_info < (3, 12):  # what a cancel-then-gather stop met: it went on
        done, _ = await asyncio.wait([task], timeout=0.2)
        assert not done and renewed, "the cancel was not swallowed: this test shows nothing"
    await asyncio.wait_for(end_tasks([task], bound=5), 10)
    assert task.cancelled()


async def test_tasks_that_end_or_failed_are_waited_for_and_none_is_left(
        caplog: pytest.LogCaptureFixture) -> None:
    async def fails() -> None:
        raise RuntimeError("its own")

    failed = asyncio.create_task(fails())
    sleeper = asyncio.create_task(asyncio.sleep(60))
    await asyncio.sleep(0)
    await end_tasks([failed, sleeper, None])
    assert failed.done() and sleeper.cancelled()

    deaf = True

    async def stubborn() -> None:
        while True:
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                if not deaf:
                    raise

    never = asyncio.create_task(stubborn(), name="stubborn")
    await asyncio.sleep(0)
    with caplog.at_level(logging.ERROR):
        await end_tasks([never], bound=0.3)  # returns, says which
    assert not never.done() and "stubborn" in caplog.text
    deaf = False
    await end_tasks([never])
    assert never.cancelled()
