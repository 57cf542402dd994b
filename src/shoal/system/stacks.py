"""What a stuck process is waiting on: SIGUSR1 writes every asyncio task's await chain and
every thread's stack to stderr (the log), and the process goes on.

A hung stop or a request that never answers shows in the log as one quiet loop; Go's
SIGQUIT dump is what an operator would reach for, and asyncio has none. Task.print_stack
shows only a task's outermost coroutine, so the chain is walked here through ``cr_await``
down to the future it waits on.
"""

from __future__ import annotations

import asyncio
import faulthandler
import signal
import sys
import traceback
from collections.abc import Iterator
from types import FrameType
from typing import Any, TextIO


def _frames(awaitable: Any) -> Iterator[FrameType]:
    while awaitable is not None:
        frame = getattr(awaitable, "cr_frame", None) or getattr(awaitable, "gi_frame", None)
        if frame is not None:
            yield frame
        awaitable = getattr(awaitable, "cr_await", None) or getattr(awaitable, "gi_yieldfrom",
                                                                      None)


def describe_tasks(out: TextIO) -> int:
    """Write each task of the running loop, innermost await last; the count written."""
    tasks = sorted(asyncio.all_tasks(), key=lambda t: t.get_name())
    for task in tasks:
        out.write(f"--- task {task.get_name()}: {task!r:.200}\n")
        frames = [(f, f.f_lineno) for f in _frames(task.get_coro())]
        out.write("".join(traceback.StackSummary.extract(frames).format()))
    return len(tasks)


def dump() -> None:
    out = sys.stderr
    out.write("=== shoal: stacks (SIGUSR1)\n")
    count = describe_tasks(out)
    out.write(f"=== {count} task(s); threads:\n")
    out.flush()
    faulthandler.dump_traceback(file=out, all_threads=True)
    out.write("=== end of stacks\n")
    out.flush()


def dump_on_signal(loop: asyncio.AbstractEventLoop) -> None:
    loop.add_signal_handler(signal.SIGUSR1, dump)
