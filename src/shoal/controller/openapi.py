"""The OpenAPI 3.1 document of the HTTP API, served at ``GET /api/v1/openapi.json``, made
from the operation table (operations.py): every route with an ``id`` is a path here.

Schemas come from the msgspec structs the handlers decode and encode
(``msgspec.json.schema_components``), so they cannot drift from the code; prose is in
openapi_text.py. ``tests/test_openapi.py`` compares the document with the routes the real
controller app registers.

WebSocket routes are documented as ``GET`` upgrades (``101``); their frame schemas are under
the ``x-websocket`` extension and their structs in ``components.schemas`` like the others.
"""

from __future__ import annotations

import functools
from typing import Any

import msgspec
from aiohttp import web

from .. import __version__
from ..wire import api as w
from .openapi_text import ERRORS, PATH_PARAMS, QUERY
from .operations import TABLE, Http, Operation, http_body, path_params

PREFIX = "/api/v1"
REF = "#/components/schemas/{name}"
_BODY_METHODS = ("POST", "PUT", "PATCH")


def _documented() -> list[tuple[Operation, Http]]:
    return [(op, h) for op in TABLE for h in op.http if h.id]


def documented_routes() -> set[tuple[str, str]]:
    return {(h.method, h.path) for _, h in _documented()}


def app_routes(app: web.Application, prefix: str = PREFIX) -> set[tuple[str, str]]:
    """``(method, path)`` of every route ``app`` serves under ``prefix`` (HEAD, which aiohttp
    adds to each GET, left out)."""
    found = set()
    for route in app.router.routes():
        path = route.resource.canonical if route.resource is not None else ""
        if path.startswith(prefix) and route.method not in ("HEAD", "*"):
            found.add((route.method, path))
    return found


def _ok_type(op: Operation, route: Http) -> Any:
    if route.ws is not None or route.status == 204:
        return None
    return route.ok if route.ok is not None else op.result


def _request_body(op: Operation, route: Http) -> Any:
    body = http_body(op, route) if route.method in _BODY_METHODS else None
    return body if body is not None and body.__struct_fields__ else None


def _path_params(path: str) -> list[dict[str, Any]]:
    return [{"name": n, "in": "path", "required": True, "schema": {"type": "string"},
             "description": PATH_PARAMS[n]} for n in path_params(path)]


def _error_responses(codes: tuple[int, ...]) -> dict[str, Any]:
    ref = {"$ref": REF.format(name="Error")}
    return {str(c): {"description": ERRORS[c], "content": {"application/json": {"schema": ref}}}
            for c in sorted({401, *codes})}


def _operation(op: Operation, route: Http, schemas: dict[Any, dict[str, Any]]
               ) -> dict[str, Any]:
    out: dict[str, Any] = {"operationId": route.id, "tags": [route.tag],
                           "summary": op.summary}
    if route.description:
        out["description"] = route.description
    params = _path_params(route.path) + [QUERY[q] for q in route.query]
    if params:
        out["parameters"] = params
    body = _request_body(op, route)
    if body is not None:
        out["requestBody"] = {"required": False, "description": "An empty body means `{}`.",
                              "content": {"application/json": {"schema": schemas[body]}}}
    responses: dict[str, Any] = {}
    ok = _ok_type(op, route)
    if route.ws is not None:
        client, server, encoding = route.ws
        out["x-websocket"] = {"encoding": encoding, "client": schemas[client],
                              "server": schemas[server]}
        responses["101"] = {"description": "Switching Protocols: the WebSocket is open."}
    elif ok is None:
        responses[str(route.status)] = {"description": "Done; no body."}
    else:
        responses[str(route.status)] = {
            "description": "Success.",
            "content": {route.media: {"schema": schemas[ok]}}}
    for code, text in (route.also or {}).items():
        responses[str(code)] = {**responses[str(route.status)], "description": text}
    out["responses"] = {**responses, **_error_responses(route.errors)}
    return out


@functools.cache
def document() -> dict[str, Any]:
    """The OpenAPI 3.1 document, as a dict ready for JSON."""
    types: list[Any] = [w.Error]
    for op, route in _documented():
        types += [t for t in (_ok_type(op, route), _request_body(op, route)) if t is not None]
        types += list(route.ws[:2]) if route.ws else []
    types = list(dict.fromkeys(types))
    refs, components = msgspec.json.schema_components(types, ref_template=REF)
    schemas = dict(zip(types, refs, strict=True))
    paths: dict[str, dict[str, Any]] = {}
    for op, route in _documented():
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(op, route, schemas)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "shoal controller API",
            "version": __version__,
            "description": "Nodes, sessions, services and fan-out runs. Every route needs "
                           "the token (`Authorization: Bearer TOKEN`, or the browser login "
                           "cookie with its CSRF header). Errors are "
                           "`{\"error\": message, \"status\": code}`. See docs/api.md.",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}, {"cookie": []}],
        "tags": [{"name": "nodes"}, {"name": "sessions"}, {"name": "runs"},
                 {"name": "services"}, {"name": "terminals"}, {"name": "meta"}],
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer",
                           "description": "The token from `$SHOAL_HOME/client.toml`."},
                "cookie": {"type": "apiKey", "in": "cookie", "name": "shoal_login",
                           "description": "A login session set by the `/?token=...` login "
                                          "link; holds no token. Every API request on it "
                                          "also needs the `X-Shoal-CSRF` header (the page "
                                          "gets it from the login redirect), and a state "
                                          "change needs the page's own `Origin` and a JSON "
                                          "body (else 415)."},
            },
        },
    }


@functools.cache
def _encoded() -> bytes:
    return msgspec.json.encode(document())


async def openapi_handler(request: web.Request) -> web.Response:
    return web.Response(body=_encoded(), content_type="application/json")
