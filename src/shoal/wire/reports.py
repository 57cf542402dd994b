"""What an agent reports to the controllers on its own subjects (``shoal.report.<node>.*``),
for them to apply after checking that the record names that node."""

from __future__ import annotations

from msgspec import Struct


class OutputTrim(Struct, frozen=True):
    """Drop the session's stored output before stream sequence ``keep`` (its output cap)."""

    session: str
    keep: int
