"""The OpenAPI 3.1 document of the HTTP API, served at ``GET /api/v1/openapi.json``.

Schemas come from the msgspec structs the handlers decode and encode
(``msgspec.json.schema_components``), so they cannot drift from the code. What the code does
not say as a type (query parameters, status codes, prose) is in ``ROUTES``: one entry per
``(method, path)``. Adding a route is one entry there; ``tests/test_openapi.py`` compares
``ROUTES`` with the routes the real controller app registers and fails on any difference.

WebSocket routes are documented as ``GET`` upgrades (``101``); their frame schemas are under
the ``x-websocket`` extension and their structs in ``components.schemas`` like the others.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Literal

import msgspec
from aiohttp import web

from .. import __version__
from ..client.aio import LogChunk, LogEnd, LogEof, LogError, LogTruncated
from ..wire import messages as m
from ..wire import servicetypes as st
from ..wire.enrollment import EnrollReply, EnrollRequest, JoinToken, NewJoinToken
from .api import DrainBody, SignalBody
from .apitokens import NewToken
from .audit import Entry as AuditEntry
from .services_api import ScaleBody, ServiceDrainBody

PREFIX = "/api/v1"
REF = "#/components/schemas/{name}"


# ------------------------------------------------------------------ shapes with no struct
# The handlers build these as dicts; the structs here exist only to describe them.


class Error(msgspec.Struct):
    """Every 4xx/5xx answer of the API (``auth.error_json``)."""

    error: str
    status: int


class DrainResult(msgspec.Struct):
    """``POST /nodes/{name}/drain``: ``remaining`` lists the sessions still live there."""

    node: str
    draining: Literal[True]
    remaining: list[str]


class UndrainResult(msgspec.Struct):
    node: str
    draining: Literal[False]


class TerminalInfo(msgspec.Struct):
    """``GET /terminal/info``: whether ``/terminal`` is open to anyone, and a warning when
    some nodes cannot isolate terminals (they would run as the agent's user)."""

    public: bool
    warning: str | None


class AttachHello(msgspec.Struct, tag="hello", tag_field="t"):
    """First frame: the session, its state, and the byte offset output resumes from."""

    session: str
    offset: int
    state: m.SessionState


class AttachTruncated(msgspec.Struct, tag="truncated", tag_field="t",
                      rename={"start": "from", "end": "to"}):
    """Bytes ``from``..``to`` were dropped by the output cap; output resumes at ``to``."""

    start: int
    end: int


class AttachExit(msgspec.Struct, tag="exit", tag_field="t"):
    """Last frame: how the session ended. The server closes the socket after it."""

    state: m.SessionState
    code: int | None
    signal: int | None
    reason: str


class AttachError(msgspec.Struct, tag="error", tag_field="t"):
    """Server -> client, last instead of exit: the output could not be read on; reconnect
    with ``from=offset`` (the offset after the last byte sent)."""

    status: int
    offset: int
    message: str


class AttachResize(msgspec.Struct, tag="resize", tag_field="t"):
    """Client -> server: the terminal size changed."""

    cols: int
    rows: int


class AttachEof(msgspec.Struct, tag="eof", tag_field="t"):
    """Client -> server: close the session's stdin."""


LogLine = LogChunk | LogTruncated | LogEnd | LogEof | LogError
AttachServerText = AttachHello | AttachTruncated | AttachExit | AttachError
AttachClientText = AttachResize | AttachEof


# ------------------------------------------------------------------ parameters

def _query(name: str, schema: dict[str, Any], description: str, *,
           array: bool = False) -> dict[str, Any]:
    param: dict[str, Any] = {"name": name, "in": "query", "required": False,
                             "description": description, "schema": schema}
    if array:
        param.update(schema={"type": "array", "items": schema}, style="form", explode=True)
    return param


_FLAG = {"type": "string", "enum": ["true", "false", "1", "0", "yes", "no", ""]}
_STATES = sorted({"live", *m.SessionState.__args__})  # type: ignore[attr-defined]

QUERY: dict[str, dict[str, Any]] = {
    "from": _query("from", {"type": "integer", "minimum": 0, "default": 0},
                   "Byte offset in the session's output to start from."),
    "tail": _query("tail", {"type": "integer", "minimum": 0},
                   "Start this many bytes before the end of what is stored (instead of from)."),
    "follow": _query("follow", {**_FLAG, "default": "false"},
                     "Keep the response open and stream new output until the session ends. "
                     "`?follow` alone means true."),
    "state": _query("state", {"type": "string", "enum": _STATES},
                    "Only sessions in this state; `live` is pending, starting or running."),
    "node": _query("node", {"type": "string"}, "Only sessions placed on this node."),
    "name": _query("name", {"type": "string"}, "Only sessions with this name."),
    "deadline": _query("deadline", {"type": "number", "minimum": 0, "maximum": 86400},
                       "Seconds the replicas get to finish before they are killed."),
    "nodes": _query("nodes", {"type": "string", "maxLength": 65536},
                    "A node set, e.g. `web[1-8],db2`: only these nodes."),
    "node_state": _query("state", {"type": "string", "enum": ["ready", "draining", "down"]},
                         "Only nodes in this state."),
    "q": _query("q", {"type": "string", "maxLength": 256},
                "Only nodes with this text (any case) in the name, address, hostname or a "
                "`key=value` label."),
    "node_limit": _query("limit", {"type": "integer", "minimum": 0, "maximum": 100000},
                         "At most this many nodes (0: no limit up to 100,000)."),
    "after": _query("after", {"type": "string"},
                    "Start after this name (natural order): the last name of the previous "
                    "page."),
    "user": _query("user", {"type": "string"}, "Only entries of this user."),
    "since": _query("since", {"type": "number"}, "Only entries from this Unix time on."),
    "limit": _query("limit", {"type": "integer", "minimum": 1, "maximum": 10000,
                              "default": 1000}, "At most this many (the newest)."),
    "label": _query("label", {"type": "string", "pattern": "^[^=]+=.*$"},
                    "`key=value`; repeat for several labels (all must match).", array=True),
}

PATH_PARAMS: dict[str, str] = {
    "name": "A node name (`/nodes`) or a service name (`/services`).",
    "id": "A session id (`s-...` unless the creator chose one), or a token id (`/tokens`).",
}


# ------------------------------------------------------------------ routes


@dataclass(frozen=True)
class Route:
    """One operation. ``ok`` is the type of the success body (``None``: no body); ``status``
    its code. ``errors`` are the 4xx/5xx codes it answers with besides 401. A WebSocket
    route has ``ws=(client frame type, server frame type, encoding)`` and answers 101."""

    id: str
    tag: str
    summary: str
    ok: Any = None
    status: int = 200
    body: Any = None
    query: tuple[str, ...] = ()
    errors: tuple[int, ...] = ()
    also: dict[int, str] | None = None  # further success codes and what they mean
    media: str = "application/json"
    ws: tuple[Any, Any, str] | None = None
    description: str = ""


_LOGS = """Newline-delimited JSON, one object per line (`t` tells them apart): `out` lines carry
base64 `data` from byte `offset` of the output, `truncated` lines say which bytes the output
cap dropped, and the last line is `end` (the session has ended and everything was sent) or
`eof` (no `follow`: this is all there is for now; resume with `from=offset`)."""

_ATTACH = """WebSocket. Output is replayed from `from`, then streamed live.

Server -> client: binary frames are raw output bytes; text frames are JSON `hello` (first),
`truncated`, and `exit` (last; then the server closes). Client -> server: binary frames are
input bytes for the session's stdin or terminal; text frames are JSON `{"t":"resize","cols":
C,"rows":R}` or `{"t":"eof"}`. Before the upgrade, errors are JSON (403 for a foreign
`Origin` or a terminal link for another session, 404 for an unknown session). Besides the
API token, this route accepts a terminal link's credential for this one session (`?token=`
or its cookie). While attached, the session's `detach_timeout` does not run."""

_RUN = """WebSocket; one fan-out run per connection. Every frame is binary msgpack, tagged by
`t` (bytes fields are msgpack bin, not base64). The client sends `start` (RunStart) first,
within 10 s; the server answers `plan` (the run id and the selected nodes) or `error` and
closes. Then the server streams `started`, `out`, `exit` and `unreachable` events until
`done`. The client may send `stdin`, `resize`, `signal` and `cancel` at any time; closing
the socket cancels the run on every node."""

ROUTES: dict[tuple[str, str], Route] = {
    ("GET", "/api/v1/nodes"): Route(
        "listNodes", "nodes", "List the nodes", ok=list[m.NodeInfo],
        query=("nodes", "node_state", "q", "node_limit", "after"), errors=(400,),
        description="In natural order of names. The `X-Total-Count` header says how many "
                    "nodes match the filters; page with `limit` and `after` (the last name "
                    "of the previous page)."),
    ("GET", "/api/v1/fleet"): Route(
        "fleetSummary", "nodes", "Count the nodes (states, sessions, versions, labels)",
        ok=m.FleetSummary),
    ("GET", "/api/v1/nodes/{name}"): Route(
        "showNode", "nodes", "Show one node", ok=m.NodeInfo, errors=(404,)),
    ("POST", "/api/v1/nodes/{name}/drain"): Route(
        "drainNode", "nodes", "Drain a node", ok=DrainResult, body=DrainBody,
        errors=(400, 404, 409, 422),
        description="Stop new placements on the node. With `deadline` (seconds), sessions "
                    "still running then are killed (daemons with a restart policy start "
                    "again elsewhere); with `wait`, answer only once none is left."),
    ("POST", "/api/v1/nodes/{name}/undrain"): Route(
        "undrainNode", "nodes", "Accept placements again", ok=UndrainResult,
        errors=(404, 409)),
    ("DELETE", "/api/v1/nodes/{name}"): Route(
        "forgetNode", "nodes", "Forget a node that is down", status=204, errors=(404, 409),
        description="Removes a decommissioned node from the registry. A node that is up "
                    "cannot be forgotten (409); one that comes back registers again."),
    ("POST", "/api/v1/sessions"): Route(
        "createSession", "sessions", "Create a session", ok=m.SessionRecord, status=201,
        body=m.SessionSpec, errors=(400, 404, 422, 503, 504),
        also={200: "A session with this `id` already exists; this is its record."},
        description="Give exactly one of `command` (argv) or `shell`. With an `id`, creating "
                    "is idempotent. A session no node can take is answered with state "
                    "`failed` and the reason."),
    ("GET", "/api/v1/sessions"): Route(
        "listSessions", "sessions", "List sessions", ok=list[m.SessionRecord],
        query=("state", "node", "name", "label"), errors=(400,)),
    ("GET", "/api/v1/sessions/{id}"): Route(
        "showSession", "sessions", "Show one session", ok=m.SessionRecord, errors=(404,)),
    ("DELETE", "/api/v1/sessions/{id}"): Route(
        "removeSession", "sessions", "Remove a session", status=204, errors=(404, 504),
        description="Kill it if it is still live, then delete its record and output."),
    ("POST", "/api/v1/sessions/{id}/signal"): Route(
        "signalSession", "sessions", "Send a signal", ok=m.SessionRecord, body=SignalBody,
        errors=(400, 404, 409, 422),
        description="`signal` is a name (`TERM`, `SIGUSR1`) or a number 1-64. The answer is "
                    "the record as it was when the signal was sent."),
    ("POST", "/api/v1/sessions/{id}/kill"): Route(
        "killSession", "sessions", "Kill a session", ok=m.SessionRecord, errors=(404,),
        description="End the session (reason `killed on request`). Killing a session that "
                    "has ended answers its record unchanged."),
    ("GET", "/api/v1/sessions/{id}/logs"): Route(
        "sessionLogs", "sessions", "Read a session's output", ok=LogLine,
        media="application/x-ndjson", query=("from", "tail", "follow"), errors=(400, 404),
        description=_LOGS),
    ("GET", "/api/v1/sessions/{id}/attach"): Route(
        "attachSession", "sessions", "Attach a terminal (WebSocket)", query=("from", "tail"),
        ws=(AttachClientText, AttachServerText, "json text + binary"), errors=(400, 403, 404),
        description=_ATTACH),
    ("GET", "/api/v1/run"): Route(
        "run", "runs", "Run a command on many nodes (WebSocket)",
        ws=(m.ClientFrame, m.ServerFrame, "msgpack"), errors=(403,), description=_RUN),
    ("POST", "/api/v1/services"): Route(
        "createService", "services", "Create a service", ok=st.ServiceView, status=201,
        body=st.ServiceSpec, errors=(400, 409, 422),
        also={200: "The service exists with the same spec; this is its view."}),
    ("GET", "/api/v1/services"): Route(
        "listServices", "services", "List services", ok=list[st.ServiceView]),
    ("GET", "/api/v1/services/{name}"): Route(
        "showService", "services", "Show a service and its replicas", ok=st.ServiceView,
        errors=(400, 404)),
    ("DELETE", "/api/v1/services/{name}"): Route(
        "removeService", "services", "Remove a service", status=204, query=("deadline",),
        errors=(400, 404, 409)),
    ("POST", "/api/v1/services/{name}/scale"): Route(
        "scaleService", "services", "Change the number of replicas", ok=st.ServiceView,
        body=ScaleBody, errors=(400, 404, 409, 422)),
    ("POST", "/api/v1/services/{name}/drain"): Route(
        "drainService", "services", "Drain one replica or the whole service",
        ok=st.ServiceView, body=ServiceDrainBody, errors=(400, 404, 409, 422),
        description="With `replica`, that replica takes no new clients and is replaced; "
                    "without, the whole service stops (scale it to start it again)."),
    ("GET", "/api/v1/services/{name}/best"): Route(
        "bestReplica", "services", "The replica a new client should use", ok=st.Best,
        errors=(400, 404, 503)),
    ("GET", "/api/v1/terminal/info"): Route(
        "terminalInfo", "terminals", "Browser terminal settings", ok=TerminalInfo),
    ("POST", "/api/v1/logout"): Route(
        "logout", "meta", "End this browser's login", status=204, errors=(403, 415),
        description="Ends the login session the `shoal_login` cookie names, on every "
                    "controller, and clears the cookie. With a bearer token it does nothing "
                    "(the token stays valid)."),
    ("GET", "/api/v1/openapi.json"): Route(
        "openapi", "meta", "This document", ok=dict[str, Any]),
    ("GET", "/api/v1/whoami"): Route(
        "whoami", "meta", "The user and scopes of the credential used", ok=dict[str, Any]),
    ("GET", "/api/v1/tokens"): Route(
        "listTokens", "tokens", "List API tokens (never the tokens themselves)",
        ok=list[dict[str, Any]], errors=(403,)),
    ("POST", "/api/v1/tokens"): Route(
        "createToken", "tokens", "Create a token for a user; the answer holds it, once",
        ok=dict[str, Any], status=201, body=NewToken, errors=(400, 403, 422),
        description="`scopes` are grants such as `read`, `run:env=dev`, `run:web-[1-4]`, "
                    "`sessions:own`; `expires` is seconds from now (none: never). A token "
                    "can only grant what it holds itself (docs/security.md)."),
    ("DELETE", "/api/v1/tokens/{id}"): Route(
        "revokeToken", "tokens", "Revoke a token, on every controller within a second",
        ok=dict[str, Any], errors=(400, 403, 404)),
    ("POST", "/api/v1/join-tokens"): Route(
        "createJoinToken", "nodes", "Create a join token that enrolls new nodes; shown once",
        ok=JoinToken, status=201, body=NewJoinToken, errors=(400, 403, 409, 422),
        description="Needs `admin`. `uses`: how many node names it may enroll; `labels` and "
                    "`name` are bound into the credentials it yields (docs/security.md, node "
                    "identities). 409 when the fleet has no node identities."),
    ("POST", "/api/v1/enroll"): Route(
        "enrollNode", "nodes", "Enroll a node with a join token (no bearer token)",
        ok=EnrollReply, status=201, body=EnrollRequest, errors=(400, 409, 422),
        description="The join token in the body is the proof. Sends the node's public nkey "
                    "and names; answers its user JWT. 400 names what is wrong with the token "
                    "(unknown, expired, used up); 409 for a name already enrolled."),
    ("POST", "/api/v1/nodes/{name}/revoke"): Route(
        "revokeNode", "nodes", "Revoke a node's NATS credential, at once",
        ok=dict[str, Any], errors=(403, 404, 409),
        description="Needs `admin`. The servers close its connection and refuse its "
                    "credential from then on; its sessions are handled as for a lost node."),
    ("GET", "/api/v1/audit"): Route(
        "listAudit", "audit", "Audit entries, oldest first", ok=list[AuditEntry],
        query=("user", "since", "limit"), errors=(400, 403)),
    ("GET", "/api/v1/audit/verify"): Route(
        "verifyAudit", "audit", "Check the audit trail's hash chain", ok=dict[str, Any],
        errors=(403,)),
}

ERRORS = {
    400: "The request is malformed (bad JSON, bad query parameter, bad signal).",
    401: "Missing or wrong token.",
    403: "Refused: the token lacks the scope the operation needs or may not reach its "
         "nodes or session (the message names the scope and what is outside), a browser "
         "request on the login cookie without the `X-Shoal-CSRF` header "
         "or from a foreign Origin, a WebSocket from a foreign Origin, or a terminal "
         "credential for another session.",
    404: "No such node, session or service.",
    409: "The request contradicts the current state (e.g. signalling an ended session).",
    415: "A browser state change on the login cookie whose body is not "
         "`Content-Type: application/json`.",
    422: "The body is JSON but does not match the schema (type, bounds, unknown field).",
    503: "No node has room, or no replica can take a client now; with Retry-After: NATS is "
         "unreachable or the controller is catching up after a NATS outage (nothing changed).",
    504: "NATS or an agent did not answer in time (the message says which); Retry-After.",
}


# ------------------------------------------------------------------ the document


def documented_routes() -> set[tuple[str, str]]:
    return set(ROUTES)


def app_routes(app: web.Application, prefix: str = PREFIX) -> set[tuple[str, str]]:
    """``(method, path)`` of every route ``app`` serves under ``prefix`` (HEAD, which aiohttp
    adds to each GET, left out)."""
    found = set()
    for route in app.router.routes():
        path = route.resource.canonical if route.resource is not None else ""
        if path.startswith(prefix) and route.method not in ("HEAD", "*"):
            found.add((route.method, path))
    return found


def _path_params(path: str) -> list[dict[str, Any]]:
    names = [part[1:-1] for part in path.split("/") if part.startswith("{")]
    return [{"name": n, "in": "path", "required": True, "schema": {"type": "string"},
             "description": PATH_PARAMS[n]} for n in names]


def _error_responses(codes: tuple[int, ...]) -> dict[str, Any]:
    ref = {"$ref": REF.format(name="Error")}
    return {str(c): {"description": ERRORS[c], "content": {"application/json": {"schema": ref}}}
            for c in sorted({401, *codes})}


def _operation(route: Route, schemas: dict[Any, dict[str, Any]], path: str) -> dict[str, Any]:
    op: dict[str, Any] = {"operationId": route.id, "tags": [route.tag],
                          "summary": route.summary}
    if route.description:
        op["description"] = route.description
    params = _path_params(path) + [QUERY[q] for q in route.query]
    if params:
        op["parameters"] = params
    if route.body is not None:
        op["requestBody"] = {"required": False, "description": "An empty body means `{}`.",
                             "content": {"application/json": {"schema": schemas[route.body]}}}
    responses: dict[str, Any] = {}
    if route.ws is not None:
        client, server, encoding = route.ws
        op["x-websocket"] = {"encoding": encoding, "client": schemas[client],
                             "server": schemas[server]}
        responses["101"] = {"description": "Switching Protocols: the WebSocket is open."}
    elif route.ok is None:
        responses[str(route.status)] = {"description": "Done; no body."}
    else:
        responses[str(route.status)] = {
            "description": "Success.",
            "content": {route.media: {"schema": schemas[route.ok]}}}
    for code, text in (route.also or {}).items():
        responses[str(code)] = {**responses[str(route.status)], "description": text}
    op["responses"] = {**responses, **_error_responses(route.errors)}
    return op


@functools.cache
def document() -> dict[str, Any]:
    """The OpenAPI 3.1 document, as a dict ready for JSON."""
    types: list[Any] = [Error]
    for route in ROUTES.values():
        types += [t for t in (route.ok, route.body) if t is not None]
        types += list(route.ws[:2]) if route.ws else []
    types = list(dict.fromkeys(types))
    refs, components = msgspec.json.schema_components(types, ref_template=REF)
    schemas = dict(zip(types, refs, strict=True))
    paths: dict[str, dict[str, Any]] = {}
    for (method, path), route in ROUTES.items():
        paths.setdefault(path, {})[method.lower()] = _operation(route, schemas, path)
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
