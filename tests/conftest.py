from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fleet import Fleet  # noqa: E402


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """A local fleet (``shoal up --agents 2``) shared by the tests of one module."""
    f = Fleet(tmp_path_factory.mktemp("fleet") / "home").start()
    try:
        yield f
    finally:
        f.stop()
