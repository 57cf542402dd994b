"""The OpenAPI document: it covers exactly the routes the controller serves, its references
resolve, real answers of a real fleet have the shapes it gives, and the controller serves it
to token holders only."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import warnings
from typing import Any

import msgspec
import pytest
from aiohttp import web

from fleet import Fleet
from shoal.config import ControllerConfig
from shoal.controller import openapi
from shoal.controller.server import Controller
from shoal.wire import messages as m

DOC = openapi.document()
SCHEMAS: dict[str, Any] = DOC["components"]["schemas"]


def served_routes() -> set[tuple[str, str]]:
    """What the real controller app registers under /api/v1 (built, not started)."""
    with warnings.catch_warnings():  # the app uses str keys, which aiohttp now warns about
        warnings.simplefilter("ignore", web.NotAppKeyWarning)
        app = Controller(ControllerConfig(token="t")).app()
    return openapi.app_routes(app)


def doc_routes(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops}


def operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(method, path, op) for path, ops in doc["paths"].items()
            for method, op in ops.items()]


# ---------------------------------------------------------------------- the document itself


def test_every_served_route_is_documented_and_vice_versa() -> None:
    served = served_routes()
    assert ("GET", "/api/v1/run") in served and ("GET", "/api/v1/openapi.json") in served
    missing = sorted(served - openapi.documented_routes())
    extra = sorted(openapi.documented_routes() - served)
    assert not missing, f"routes the controller serves with no entry in openapi.ROUTES: {missing}"
    assert not extra, f"openapi.ROUTES documents routes nobody serves: {extra}"
    assert doc_routes(DOC) == served


def test_document_is_json_and_openapi_3_1() -> None:
    assert json.loads(json.dumps(DOC)) == DOC
    assert DOC["openapi"] == "3.1.0" and DOC["info"]["version"]
    bearer = DOC["components"]["securitySchemes"]["bearer"]
    assert (bearer["type"], bearer["scheme"]) == ("http", "bearer")
    assert {"bearer": []} in DOC["security"]


def test_every_ref_resolves() -> None:
    def refs(node: Any) -> list[str]:
        if isinstance(node, dict):
            found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
            return found + [r for v in node.values() for r in refs(v)]
        if isinstance(node, list):
            return [r for v in node for r in refs(v)]
        return []

    all_refs = refs(DOC)
    assert all_refs
    for ref in all_refs:
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in SCHEMAS, ref


def test_operations_are_complete() -> None:
    ids = [op["operationId"] for _, _, op in operations(DOC)]
    assert len(ids) == len(set(ids))
    for method, path, op in operations(DOC):
        declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
        in_path = {part[1:-1] for part in path.split("/") if part.startswith("{")}
        assert declared == in_path, (method, path)
        assert "401" in op["responses"], (method, path)
        for code, resp in op["responses"].items():
            if int(code) >= 400:
                schema = resp["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/Error"}, (method, path, code)
    assert SCHEMAS["Error"]["required"] == ["error", "status"]


def test_query_parameters() -> None:
    def query(method: str, path: str) -> set[str]:
        op = DOC["paths"][path][method]
        return {p["name"] for p in op.get("parameters", []) if p["in"] == "query"}

    assert query("get", "/api/v1/sessions") == {"state", "node", "name", "label"}
    assert query("get", "/api/v1/sessions/{id}/logs") == {"from", "tail", "follow"}
    assert query("get", "/api/v1/sessions/{id}/attach") == {"from", "tail"}
    state = next(p for p in DOC["paths"]["/api/v1/sessions"]["get"]["parameters"]
                 if p["name"] == "state")
    assert {"live", "running", "exited"} <= set(state["schema"]["enum"])


@pytest.mark.parametrize("struct", [m.SessionSpec, m.SessionRecord, m.NodeInfo, m.Limits,
                                    m.RunSpec, m.Targets])
def test_components_are_the_structs(struct: type[msgspec.Struct]) -> None:
    schema = SCHEMAS[struct.__name__]
    assert set(schema["properties"]) == {f.encode_name for f in msgspec.structs.fields(struct)}


def test_bodies_and_websockets_use_the_structs() -> None:
    create = DOC["paths"]["/api/v1/sessions"]["post"]
    assert create["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/SessionSpec"}
    assert create["responses"]["201"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/SessionRecord"}
    run = DOC["paths"]["/api/v1/run"]["get"]
    assert "101" in run["responses"] and run["x-websocket"]["encoding"] == "msgpack"
    tags = run["x-websocket"]["client"]["discriminator"]["mapping"]
    assert tags["start"] == "#/components/schemas/RunStart"


# ---------------------------------------------------------------------- against the fleet


def call(fleet: Fleet, method: str, path: str, body: Any = None,
         token: str | None = "") -> tuple[int, str, bytes]:
    headers = {"Authorization": f"Bearer {fleet.token if token == '' else token}"} \
        if token is not None else {}
    data = None if body is None else json.dumps(body).encode()
    if data is not None:
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(fleet.url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.headers.get_content_type(), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get_content_type(), e.read()


def conforms(value: Any, schema: dict[str, Any], where: str = "$") -> None:
    """Enough of JSON Schema for what msgspec emits; objects with ``properties`` are closed
    (an answer with a field the document does not list fails)."""
    if "$ref" in schema:
        return conforms(value, SCHEMAS[schema["$ref"].rsplit("/", 1)[1]], where)
    if "anyOf" in schema:
        if "discriminator" in schema:
            tag = schema["discriminator"]["propertyName"]
            assert isinstance(value, dict) and tag in value, where
            target = schema["discriminator"]["mapping"].get(value[tag])
            assert target is not None, f"{where}: unknown {tag}={value[tag]!r}"
            return conforms(value, {"$ref": target}, where)
        errors = []
        for option in schema["anyOf"]:
            try:
                return conforms(value, option, where)
            except AssertionError as e:
                errors.append(str(e))
        raise AssertionError(f"{where}: matches no option: {errors}")
    if "enum" in schema:
        assert value in schema["enum"], f"{where}: {value!r} not in {schema['enum']}"
    kinds: dict[str, type | tuple[type, ...]] = {
        "object": dict, "array": list, "string": str, "boolean": bool, "integer": int,
        "number": (int, float), "null": type(None)}
    if "type" in schema:
        expected = kinds[schema["type"]]
        assert isinstance(value, expected), f"{where}: {value!r} is not {schema['type']}"
        assert schema["type"] not in ("integer", "number") or not isinstance(value, bool), where
    if isinstance(value, dict) and "properties" in schema:
        extra = set(value) - set(schema["properties"])
        assert not extra, f"{where}: fields the document does not list: {extra}"
        missing = set(schema.get("required", [])) - set(value)
        assert not missing, f"{where}: required fields missing: {missing}"
        for k, v in value.items():
            conforms(v, schema["properties"][k], f"{where}.{k}")
    elif isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        for k, v in value.items():
            conforms(v, schema["additionalProperties"], f"{where}.{k}")
    if isinstance(value, list) and "items" in schema:
        for i, v in enumerate(value):
            conforms(v, schema["items"], f"{where}[{i}]")
    return None


def answer_schema(method: str, path: str, status: int, media: str) -> dict[str, Any]:
    response = DOC["paths"][path][method.lower()]["responses"][str(status)]
    return response["content"][media]["schema"]  # type: ignore[no-any-return]


def test_served_document_needs_the_token(fleet: Fleet) -> None:
    status, media, body = call(fleet, "GET", "/api/v1/openapi.json")
    assert (status, media) == (200, "application/json")
    served = json.loads(body)
    assert served == json.loads(json.dumps(DOC))
    assert doc_routes(served) == served_routes()
    for name in ("SessionSpec", "SessionRecord", "NodeInfo"):
        assert name in served["components"]["schemas"]
    for token in (None, "wrong"):
        status, media, body = call(fleet, "GET", "/api/v1/openapi.json", token=token)
        assert (status, media) == (401, "application/json")
        conforms(json.loads(body), answer_schema("GET", "/api/v1/openapi.json", 401,
                                                 "application/json"))


def test_real_answers_have_the_documented_shapes(fleet: Fleet) -> None:
    status, media, body = call(fleet, "GET", "/api/v1/nodes")
    assert status == 200
    conforms(json.loads(body), answer_schema("GET", "/api/v1/nodes", 200, media))

    path = "/api/v1/sessions"
    status, media, body = call(fleet, "POST", path,
                               {"command": ["sh", "-c", "echo out; echo err >&2"],
                                "labels": {"suite": "openapi"}})
    assert status == 201, body
    conforms(json.loads(body), answer_schema("POST", path, 201, media))
    sid = json.loads(body)["id"]
    deadline = time.monotonic() + 30
    while json.loads(call(fleet, "GET", f"{path}/{sid}")[2])["state"] not in \
            ("exited", "failed", "killed", "lost"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    status, media, body = call(fleet, "GET", f"{path}/{sid}")
    conforms(json.loads(body), answer_schema("GET", path + "/{id}", 200, media))
    status, media, body = call(fleet, "GET", f"{path}?label=suite=openapi&state=exited")
    assert status == 200 and [r["id"] for r in json.loads(body)] == [sid]
    conforms(json.loads(body), answer_schema("GET", path, 200, media))

    status, media, body = call(fleet, "GET", f"{path}/{sid}/logs")
    assert (status, media) == (200, "application/x-ndjson")
    lines = [json.loads(line) for line in body.splitlines()]
    assert [line["t"] for line in lines] == ["out", "out", "end"]
    for line in lines:
        conforms(line, answer_schema("GET", path + "/{id}/logs", 200, media))

    status, media, body = call(fleet, "POST", f"{path}/{sid}/signal", {"signal": "TERM"})
    assert status == 409
    conforms(json.loads(body), answer_schema("POST", path + "/{id}/signal", 409, media))
    status, media, body = call(fleet, "POST", f"{path}/{sid}/signal", {"signal": "NOPE"})
    assert status == 400
    status, media, body = call(fleet, "POST", path, {"command": ["true"], "bogus": 1})
    assert status == 422
    conforms(json.loads(body), answer_schema("POST", path, 422, media))

    assert call(fleet, "DELETE", f"{path}/{sid}")[0] == 204
    status, media, body = call(fleet, "GET", f"{path}/{sid}")
    assert status == 404
    conforms(json.loads(body), answer_schema("GET", path + "/{id}", 404, media))


def test_drain_answers_have_the_documented_shapes(fleet: Fleet) -> None:
    path = "/api/v1/nodes/node-2"
    try:
        status, media, body = call(fleet, "POST", path + "/drain", {})
        assert status == 200, body
        conforms(json.loads(body), answer_schema("POST", "/api/v1/nodes/{name}/drain", 200,
                                                 media))
    finally:
        status, media, body = call(fleet, "POST", path + "/undrain")
    assert status == 200, body
    conforms(json.loads(body), answer_schema("POST", "/api/v1/nodes/{name}/undrain", 200, media))
    fleet.wait_nodes(["node-2"])
    status, media, body = call(fleet, "GET", path)
    conforms(json.loads(body), answer_schema("GET", "/api/v1/nodes/{name}", 200, media))


def test_the_checks_can_fail() -> None:
    """Neither check above is vacuous: a new route, or an undocumented field, fails."""
    async def handler(request: web.Request) -> web.Response:
        return web.Response()

    app = web.Application()
    app.router.add_get("/api/v1/services/{name}/logs", handler)
    new = ("GET", "/api/v1/services/{name}/logs")
    assert openapi.app_routes(app) - openapi.documented_routes() == {new}
    error = {"$ref": "#/components/schemas/Error"}
    conforms({"error": "no", "status": 404}, error)
    with pytest.raises(AssertionError, match="does not list"):
        conforms({"error": "no", "status": 404, "detail": "?"}, error)
    with pytest.raises(AssertionError, match="missing"):
        conforms({"error": "no"}, error)
