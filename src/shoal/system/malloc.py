"""glibc malloc settings for processes that move bulk output (``shoal run``).

Output travels in chunks of up to a few MiB. With glibc's defaults each such buffer is
either its own mmap or comes from heap memory that is handed back to the kernel as soon as
it is freed, so every chunk pays page faults on fresh memory: measured, that was most of the
CLI's system time at 1 GiB/s. Keeping buffers below ``MMAP_MAX`` on the heap and letting the
heap keep up to ``TRIM_AT`` bytes free makes them reuse warm pages instead.
"""

from __future__ import annotations

import sys

MMAP_MAX = 8 << 20
TRIM_AT = 32 << 20
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_done = False


def reuse_heap_for_bulk_io() -> None:
    """Apply the settings once per process; a no-op where mallopt is unavailable."""
    global _done
    if _done:
        return
    _done = True
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, MMAP_MAX)
    mallopt(_M_TRIM_THRESHOLD, TRIM_AT)
