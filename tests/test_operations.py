"""The operation table (shoal.controller.operations) is the API: the HTTP routes the real
controller app serves, the NATS operations it answers and the OpenAPI document's paths are
exactly the table's; and the same bad request is refused the same way on both transports
(one struct, one check, one error map), changing nothing."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp import web

from fleet import Fleet
from shoal.config import ControllerConfig, load
from shoal.controller import openapi, operations, scopes
from shoal.controller.nats_api import NatsApi
from shoal.controller.server import Controller


def _controller() -> tuple[Controller, web.Application]:
    with warnings.catch_warnings():  # the app uses str keys, which aiohttp now warns about
        warnings.simplefilter("ignore", web.NotAppKeyWarning)
        ctl = Controller(ControllerConfig(token="t"))
        return ctl, ctl.app()


def served(app: web.Application) -> set[tuple[str, str]]:
    """Every (method, route) the app serves, as the table writes routes (HEAD is GET's)."""
    found = set()
    for route in app.router.routes():
        if route.method == "HEAD" or route.resource is None:
            continue
        found.add(operations.route_key(route.method, route.resource.canonical))
    return found


def table_routes() -> set[tuple[str, str]]:
    return {(h.method, h.path) for op in operations.TABLE for h in op.http}


# ---------------------------------------------------------------------- drift


def test_http_routes_are_exactly_the_table() -> None:
    _, app = _controller()
    routes = served(app)
    assert routes - table_routes() == set(), "served, but no operation declares them"
    assert table_routes() - routes == set(), "declared, but nobody serves them"
    declared = [(h.method, h.path) for op in operations.TABLE for h in op.http]
    assert len(declared) == len(set(declared)), "a route belongs to two operations"


def test_nats_ops_are_exactly_the_table() -> None:
    ctl, _ = _controller()
    assert set(NatsApi(ctl).ops) == {op.name for op in operations.TABLE if op.nats}
    for op in operations.TABLE:
        if op.nats:  # decoded into a struct and handled the same way as over HTTP
            assert op.request is not None and op.handler is not None, op.name


def test_openapi_paths_are_exactly_the_table() -> None:
    doc = openapi.document()
    in_doc = {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops}
    documented = {(h.method, h.path) for op in operations.TABLE for h in op.http if h.id}
    assert in_doc == documented
    summaries = {op.summary for op in operations.TABLE}
    for ops in doc["paths"].values():
        for entry in ops.values():
            assert entry["summary"] in summaries


def test_every_operation_is_complete_and_scoped() -> None:
    for op in operations.TABLE:
        assert op.scope in scopes.SCOPES or op.scope in (scopes.PUBLIC, scopes.ANY), op.name
        assert scopes.OPS[op.name] is op  # the scope check reads the same entry
        for route in op.http:
            if op.kind == "call":  # generated: a handler and a request struct
                assert op.handler is not None and op.request is not None, op.name
            elif not route.where:  # streams and websockets bring their own HTTP handler
                assert route.handler is not None, (op.name, route.path)
            for name in operations.path_params(route.path):
                if op.request is not None and op.kind == "call":
                    assert name in op.request.__struct_fields__, (op.name, name)


def test_the_drift_checks_can_fail() -> None:
    """A route added beside the table, or an operation missing from the app, is seen."""
    _, app = _controller()

    async def handler(request: web.Request) -> web.Response:
        return web.Response()

    app.router.add_get("/api/v1/sessions/{id}/secret", handler)
    assert served(app) - table_routes() == {("GET", "/api/v1/sessions/{id}/secret")}
    bare = web.Application()
    bare.router.add_get("/api/v1/nodes", handler)
    assert ("GET", "/api/v1/fleet") in table_routes() - served(bare)


# ---------------------------------------------------------------------- both transports


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """Nodes with no capacity: nothing a request here could start ever runs."""
    f = Fleet(tmp_path_factory.mktemp("ops") / "home", agents=1,
              extra_args=("--capacity", "0")).start()
    try:
        yield f
    finally:
        f.stop()


def http(fleet: Fleet, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    headers = {"Authorization": f"Bearer {fleet.token}", "Content-Type": "application/json"}
    req = urllib.request.Request(fleet.url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


async def nats(fleet: Fleet, op: str, body: Any) -> dict[str, Any]:
    import nats as nats_py

    cfg = load(ControllerConfig, fleet.home / "controller.toml").nats
    nc = await nats_py.connect(cfg.url, user=cfg.user, password=cfg.password,
                               user_credentials=cfg.creds)
    try:
        msg = await nc.request(f"shoal.api.{op}", json.dumps(body).encode(), timeout=10)
        return json.loads(msg.data)  # type: ignore[no-any-return]
    finally:
        await nc.close()


def sessions(fleet: Fleet) -> list[str]:
    status, listing = http(fleet, "GET", "/api/v1/sessions")
    assert status == 200, listing
    return sorted(r["id"] for r in listing)


@pytest.mark.parametrize("deadline", [86400.5, -1, 1e12])
async def test_drain_deadline_out_of_range_is_refused_on_both(fleet: Fleet,
                                                              deadline: float) -> None:
    status, answer = http(fleet, "POST", "/api/v1/nodes/node-1/drain", {"deadline": deadline})
    reply = await nats(fleet, "nodes.drain", {"name": "node-1", "deadline": deadline})
    assert status == 400 and "deadline must be between 0 and 86400" in answer["error"], answer
    assert not reply["ok"], reply
    assert (reply["status"], reply["error"]) == (status, answer["error"])
    # Nothing changed: the node still takes work.
    assert http(fleet, "GET", "/api/v1/nodes/node-1")[1]["state"] == "ready"


@pytest.mark.parametrize(("spec", "says"), [
    ({"command": ["echo", "a\0b"]}, "command[1] holds a NUL byte"),
    ({"shell": "echo a\0b"}, "shell holds a NUL byte"),
    ({"command": ["env"], "env": {"BAD=NAME": "x"}}, "env name 'BAD=NAME'"),
    ({"command": ["env"], "env": {"1UP": "x"}}, "env name '1UP'"),
    ({"command": ["env"], "env": {"OK": "a\0b"}}, "env OK: the value holds a NUL byte"),
    ({"command": ["true"], "shell": "true"}, "give exactly one of command"),
    ({}, "give exactly one of command"),
    ({"command": ["pwd"], "cwd": "relative/dir"}, "cwd 'relative/dir': give an absolute"),
])
async def test_bad_spec_is_refused_on_both_with_the_same_message(
        fleet: Fleet, spec: dict[str, Any], says: str) -> None:
    before = sessions(fleet)
    status, answer = http(fleet, "POST", "/api/v1/sessions", spec)
    reply = await nats(fleet, "sessions.create", spec)
    assert status == 400 and says in answer["error"], answer
    assert not reply["ok"], reply
    assert (reply["status"], reply["error"]) == (status, answer["error"])
    assert sessions(fleet) == before, "a refused spec creates nothing"


async def test_bad_service_spec_is_refused_on_both(fleet: Fleet) -> None:
    spec = {"name": "nul-svc", "command": ["sleep", "1\0"]}
    status, answer = http(fleet, "POST", "/api/v1/services", spec)
    reply = await nats(fleet, "services.create", spec)
    assert status == 400 and "command[1] holds a NUL byte" in answer["error"], answer
    assert (reply["status"], reply["error"]) == (status, answer["error"])
    assert http(fleet, "GET", "/api/v1/services/nul-svc")[0] == 404


async def test_schema_errors_are_the_same_on_both(fleet: Fleet) -> None:
    """msgspec's own refusals (a bound, an unknown field) read the same on both too."""
    for spec in ({"command": []}, {"command": ["true"], "surprise": 1},
                 {"command": ["true"], "cols": 0}):
        status, answer = http(fleet, "POST", "/api/v1/sessions", spec)
        reply = await nats(fleet, "sessions.create", spec)
        assert status == 422, answer
        assert (reply["status"], reply["error"]) == (status, answer["error"])
    status, answer = http(fleet, "POST", "/api/v1/sessions/nope/signal", {"signal": "NOPE"})
    reply = await nats(fleet, "sessions.signal", {"id": "nope", "signal": "NOPE"})
    assert (reply["status"], reply["error"]) == (status, answer["error"])


async def test_nats_replies_are_typed(fleet: Fleet) -> None:
    reply = await nats(fleet, "nodes.list", {})
    assert reply["ok"] and [n["name"] for n in reply["result"]] == ["node-1"], reply
    assert reply["controller"]
    reply = await nats(fleet, "nodes.show", {"name": "nope"})
    assert set(reply) == {"ok", "status", "error"} and reply["status"] == 404, reply
    status, answer = http(fleet, "GET", "/api/v1/nodes/nope")
    assert (reply["status"], reply["error"]) == (status, answer["error"])


# ---------------------------------------------------------------------- one error map


def test_one_error_map_for_both_servers() -> None:
    import msgspec
    import nats.errors
    import nats.js.errors

    from shoal import errors
    from shoal.controller import replies

    cases: list[tuple[BaseException, int, float | None]] = [
        (errors.ValidationError("no"), 400, None),
        (errors.NotFoundError("no"), 404, None),
        (errors.NoReplicaError("no"), 503, None),
        (errors.Unavailable("later", 4.6), 503, 5),
        (msgspec.ValidationError("Expected `int`"), 422, None),
        (msgspec.DecodeError("truncated"), 400, None),
        (TimeoutError(), 504, 2),
        (nats.errors.ConnectionClosedError(), 503, 2),
        (nats.js.errors.InvalidKeyError(), 400, None),  # a request's name, not a NATS outage
        (RuntimeError("bug"), 500, None),
    ]
    for e, status, retry in cases:
        f = replies.failure(e)
        assert (f.status, f.retry_after) == (status, retry), (e, f)
        assert replies.status_of(e) == status
        assert replies.nats_error(e).status == status and replies.nats_error(e).error == f.message
        resp = replies.error_response(e)
        assert resp.status == status
        assert (resp.headers.get("Retry-After") is None) == (retry is None)
        assert json.loads(resp.body) == {"error": f.message, "status": status}  # type: ignore[arg-type]
        back = errors.error_for_status(status, f.message, retry)  # the client's one map
        assert back.message == f.message
        assert isinstance(back, errors.Unavailable) == (status == 503 and retry is not None)
        assert isinstance(back, errors.ValidationError) == (status in (400, 422))


def test_every_error_shoal_raises_is_in_the_tree() -> None:
    from shoal import errors
    from shoal.agent import users
    from shoal.agent.ports import PortPool

    for kind in (errors.NoReplicaError, users.UserError):
        assert issubclass(kind, errors.ShoalError)
    for bad in ("abc", "70000-80000", "300-200", "0"):
        with pytest.raises(errors.ConfigError, match="port"):
            PortPool.parse(bad)
    assert PortPool.parse("20000-20009").last == 20009
