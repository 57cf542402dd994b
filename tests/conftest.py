from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# CPython 3.11 keeps one AST-constructor recursion counter per interpreter (python/cpython
# #106905): an ast.parse run by a finalizer or another thread in the middle of another one
# fails that one with "SystemError: AST constructor recursion depth mismatch". The first
# @given test to shrink or target imports this module lazily, which pytest's assertion
# rewriting parses, late in a session that has left garbage and threads about (CI failed
# on it twice). Imported here, it is parsed before any test has run.
import hypothesis.internal.conjecture.optimiser  # noqa: F401
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fleet import TLS, Fleet  # noqa: E402

# Fixtures that give a test a fleet (or a browser for it) and honour the ``tls`` marker: a
# test marked ``@pytest.mark.tls`` runs twice, ``[plain]`` and ``[tls]``, and in ``[tls]``
# every one of these it uses is on TLS (``shoal up --tls``: HTTPS, mutual-TLS NATS).
TLS_FIXTURES = ("fleet", "pool", "browser")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "tls: run a second time, [tls], against fleets started with `shoal up "
                   "--tls` (HTTPS, mutual-TLS NATS); `-k 'not tls'` leaves that out")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.definition.get_closest_marker("tls") is None:
        return
    names = [n for n in TLS_FIXTURES if n in metafunc.fixturenames]
    assert names, f"{metafunc.function.__name__} is marked tls but uses no fleet"
    # The plain variant's parameter is None: the cache key of the unparametrized tests of
    # the module, so they all share the one plain fleet (pytest keys a fixture on its param).
    metafunc.parametrize(names, [(None,) * len(names), (TLS,) * len(names)], indirect=True,
                         ids=["plain", TLS])


def _is_tls(item: pytest.Item) -> bool:
    callspec = getattr(item, "callspec", None)
    return callspec is not None and TLS in callspec.params.values()


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> Iterator[None]:
    """In a module with [tls] variants: its tests in the order written, then the [tls] ones
    (pytest's own reordering would pull the [plain] ones forward). Each fleet starts once,
    the plain one is done with before the TLS one starts."""
    written = {item.nodeid: i for i, item in enumerate(items)}
    yield
    modules = {_module(item) for item in items if _is_tls(item)}
    if not modules:
        return
    now = {item.nodeid: i for i, item in enumerate(items)}
    first: dict[str, int] = {}
    for item in items:
        first.setdefault(_module(item), now[item.nodeid])

    def key(item: pytest.Item) -> tuple[int, bool, int]:
        module = _module(item)
        if module not in modules:
            return first[module], False, now[item.nodeid]
        return first[module], _is_tls(item), written[item.nodeid]

    items.sort(key=key)


def _module(item: pytest.Item) -> str:
    return item.nodeid.split("::")[0]


def wants_tls(request: pytest.FixtureRequest) -> bool:
    """Whether this fleet fixture is being asked for its TLS variant."""
    return getattr(request, "param", None) == TLS


@pytest.fixture(scope="session")
def test_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One CA and server key for the TLS fleets of the session (``shoal up --tls`` reuses a
    fleet's tls/ while it is good): the browser is told that one server key up front."""
    from shoal import pki

    d = tmp_path_factory.mktemp("pki") / "tls"
    pki.fleet_pki(d, pki.server_names(), ("controller", "agent"))
    return d


def start_fleet(request: pytest.FixtureRequest, name: str, env: dict[str, str] | None = None,
                **kw: Any) -> Fleet:
    """A started fleet under a fresh home (``env``: more for its processes); on TLS if the
    test asks for its [tls] variant. The fleet fixtures of TLS_FIXTURES start theirs here."""
    factory: pytest.TempPathFactory = request.getfixturevalue("tmp_path_factory")
    home = factory.mktemp(name) / "home"
    if wants_tls(request):
        kw.update(tls=True, pki=request.getfixturevalue("test_pki"))
    f = Fleet(home, **kw)
    f.env.update(env or {})
    return f.start()


@pytest.fixture(scope="module")
def fleet(request: pytest.FixtureRequest) -> Iterator[Fleet]:
    """A local fleet (``shoal up --agents 2``) shared by the tests of one module."""
    f = start_fleet(request, "fleet")
    try:
        yield f
    finally:
        f.stop()


@pytest.fixture(autouse=True)
def _tls_variant_is_tls(request: pytest.FixtureRequest) -> None:
    """A [tls] test whose fleet is not on TLS would pass for nothing: refuse it."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is None or TLS not in callspec.params.values():
        return
    for name in TLS_FIXTURES:
        if name in request.fixturenames:
            value = request.getfixturevalue(name)
            if isinstance(value, Fleet):
                assert value.url.startswith("https://") and value.ca, f"{name} is not TLS"
