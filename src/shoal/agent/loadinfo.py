"""Sampling this machine's load for heartbeats."""

from __future__ import annotations

import os

import psutil

from ..wire.messages import Load


class LoadSampler:
    """CPU percent is measured between calls, so keep one sampler per process."""

    def __init__(self) -> None:
        psutil.cpu_percent(None)  # prime the interval measurement

    def sample(self) -> Load:
        return Load(
            load1=round(os.getloadavg()[0], 2),
            cpu_percent=round(psutil.cpu_percent(None), 1),
            mem_percent=round(psutil.virtual_memory().percent, 1),
        )
