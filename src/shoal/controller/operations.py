"""The operation table: every operation of the controller, declared once. From it come
the HTTP routes (routes.py), the NATS JSON API (nats_api.py), the OpenAPI document
(openapi.py), and the scope check's rules (scopes.py, access.py, auth.py).

An entry says what an operation is called (its NATS subject is ``shoal.api.<name>``),
what it takes (a request struct of wire/api.py or wire/messages.py, decoded once, the same
way on both transports), what it answers, the handler, its HTTP route(s), whether NATS
serves it, a summary, and the scope it needs with what it reaches (for restricted grants).

Kinds: ``call`` operations are plain request/answer and get generated handlers on both
transports. ``stream`` and ``websocket`` operations have an HTTP handler of their own (a
``call`` handler too when NATS serves them, e.g. ``sessions.logs`` pages instead of
following). ``page`` operations are the web UI's and other routes registered by their own
modules (``Http.where``); they are in the table for their scope and so that the drift test
sees every route. docs/architecture.md ("The operation table") says how to add one.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

import msgspec
from aiohttp import web

from ..wire import api as w
from ..wire import enrollment as we
from ..wire import messages as m
from ..wire import servicetypes as st
from . import api, enroll, openapi_text, run_ws, services_api, streams, tokens_api
from .apitokens import NewToken
from .audit import Entry as AuditEntry
from .context import Call
from .scopes import ANY, PUBLIC, Target

Kind = Literal["call", "stream", "websocket", "page"]
RawHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Handler = Callable[[Call, Any], Awaitable[Any]]


@dataclass(frozen=True)
class Http:
    """One HTTP route of an operation. ``id`` puts it in the OpenAPI document (with ``tag``,
    ``query`` parameter names of openapi_text.QUERY, the ``errors`` it answers besides 401,
    further success codes in ``also``). ``ok`` is the success body's type when it is not the
    operation's ``result``; ``view`` turns the result into the answer when plain JSON with
    ``status`` will not do. ``handler`` serves a stream or websocket; ``where`` names the
    module that registers a route itself."""

    method: str
    path: str
    id: str = ""
    tag: str = ""
    status: int = 200
    query: tuple[str, ...] = ()
    errors: tuple[int, ...] = ()
    also: dict[int, str] | None = None
    media: str = "application/json"
    ws: tuple[Any, Any, str] | None = None
    description: str = ""
    ok: Any = None
    view: Callable[[Any], web.StreamResponse] | None = None
    from_query: Callable[[Any], dict[str, Any]] | None = None
    handler: RawHandler | None = None
    where: str = ""


@dataclass(frozen=True)
class Operation:
    name: str
    summary: str
    scope: str
    target: Target = Target.NONE
    audit: bool = False  # recorded in the audit trail (every state change, run, attach)
    reads: bool = False  # only reads: state changes are audited even when refused
    request: type[Any] | None = None
    result: Any = None
    handler: Handler | None = None
    http: tuple[Http, ...] = ()
    nats: bool = False
    kind: Kind = "call"
    nats_view: Callable[[Any], Any] | None = None  # the NATS result, if not the handler's


def _w(name: str, summary: str, scope: str, target: Target = Target.NONE,
       **kw: Any) -> Operation:
    return Operation(name, summary, scope, target, audit=True, **kw)


def _r(name: str, summary: str, scope: str, target: Target = Target.NONE,
       **kw: Any) -> Operation:
    return Operation(name, summary, scope, target, reads=True, **kw)


def _json(status: int) -> Callable[[Any], web.StreamResponse]:
    return lambda result: api.ok(result, status)


def _created(result: w.SessionCreated | w.ServiceCreated) -> web.StreamResponse:
    body = result.session if isinstance(result, w.SessionCreated) else result.service
    return api.ok(body, 201 if result.created else 200)


def _page(result: w.NodesPage) -> web.StreamResponse:
    resp = api.ok(result.nodes)
    resp.headers["X-Total-Count"] = str(result.total)
    return resp


def _no_body(result: Any) -> web.StreamResponse:
    return web.Response(status=204)


T = openapi_text
N, S, SV, TK = "nodes", "sessions", "services", "tokens"

TABLE: tuple[Operation, ...] = (
    _r("nodes.list", "List the nodes", "read", request=w.NodesQuery, result=list[m.NodeInfo],
       handler=api.list_nodes, nats=True, nats_view=lambda page: page.nodes,
       http=(Http("GET", "/api/v1/nodes", "listNodes", N, view=_page,
                  query=("nodes", "node_state", "q", "node_limit", "after"), errors=(400, 422),
                  description=T.LIST_NODES),)),
    _r("fleet.summary", "Count the nodes (states, sessions, versions, labels)", "read",
       request=w.Empty, result=m.FleetSummary, handler=api.fleet_summary,
       http=(Http("GET", "/api/v1/fleet", "fleetSummary", N),)),
    _r("nodes.show", "Show one node", "read", request=w.Named, result=m.NodeInfo,
       handler=api.show_node, nats=True,
       http=(Http("GET", "/api/v1/nodes/{name}", "showNode", N, errors=(404,)),)),
    _w("nodes.drain", "Drain a node", "nodes", Target.NODE, request=w.DrainNode,
       result=w.DrainResult, handler=api.drain_node, nats=True,
       http=(Http("POST", "/api/v1/nodes/{name}/drain", "drainNode", N,
                  errors=(400, 404, 409, 422), description=T.DRAIN_NODE),)),
    _w("nodes.undrain", "Accept placements again", "nodes", Target.NODE, request=w.Named,
       result=w.UndrainResult, handler=api.undrain_node, nats=True,
       http=(Http("POST", "/api/v1/nodes/{name}/undrain", "undrainNode", N,
                  errors=(404, 409)),)),
    _w("nodes.forget", "Forget a node that is down", "nodes", Target.NODE, request=w.Named,
       handler=api.forget_node,
       http=(Http("DELETE", "/api/v1/nodes/{name}", "forgetNode", N, status=204,
                  view=_no_body, errors=(404, 409), description=T.FORGET_NODE),)),
    # Node identities (enroll.py, docs/security.md): a join token enrolls new nodes, so
    # making one is as strong as admin; enrolling needs no credential but the token.
    _w("nodes.join", "Create a join token that enrolls new nodes; shown once", "admin",
       request=we.NewJoinToken, result=we.JoinToken, handler=enroll.create_join_token,
       http=(Http("POST", "/api/v1/join-tokens", "createJoinToken", N, status=201,
                  errors=(400, 403, 409, 422), description=T.JOIN_TOKEN),)),
    _w("nodes.revoke", "Revoke a node's NATS credential, at once", "admin", request=w.Named,
       result=dict[str, Any], handler=enroll.revoke_node,
       http=(Http("POST", "/api/v1/nodes/{name}/revoke", "revokeNode", N,
                  errors=(403, 404, 409), description=T.REVOKE_NODE),)),
    _r("nodes.enroll", "Enroll a node with a join token (no bearer token)", PUBLIC,
       request=we.EnrollRequest, result=we.EnrollReply, handler=enroll.enroll_node,
       http=(Http("POST", "/api/v1/enroll", "enrollNode", N, status=201,
                  errors=(400, 409, 422), description=T.ENROLL_NODE),)),
    _w("sessions.create", "Create a session", "sessions", Target.SPEC, request=m.SessionSpec,
       result=w.SessionCreated, handler=api.create_session, nats=True,
       http=(Http("POST", "/api/v1/sessions", "createSession", S, status=201,
                  ok=m.SessionRecord, view=_created, errors=(400, 404, 422, 503, 504),
                  also={200: "A session with this `id` already exists; this is its record."},
                  description=T.CREATE_SESSION),)),
    _r("sessions.list", "List sessions", "read", request=w.ListSessions,
       result=list[m.SessionRecord], handler=api.list_sessions, nats=True,
       http=(Http("GET", "/api/v1/sessions", "listSessions", S, errors=(400, 422),
                  query=("state", "node", "name", "label"),
                  from_query=api.session_filters),)),
    _r("sessions.show", "Show one session", "read", request=w.SessionRef,
       result=m.SessionRecord, handler=api.show_session, nats=True,
       http=(Http("GET", "/api/v1/sessions/{id}", "showSession", S, errors=(404,)),)),
    _w("sessions.signal", "Send a signal", "sessions", Target.SESSION,
       request=w.SignalSession, result=m.SessionRecord, handler=api.signal_session,
       nats=True,
       http=(Http("POST", "/api/v1/sessions/{id}/signal", "signalSession", S,
                  errors=(400, 404, 409, 422), description=T.SIGNAL_SESSION),)),
    _w("sessions.kill", "Kill a session", "sessions", Target.SESSION, request=w.SessionRef,
       result=m.SessionRecord, handler=api.kill_session, nats=True,
       http=(Http("POST", "/api/v1/sessions/{id}/kill", "killSession", S, errors=(404,),
                  description=T.KILL_SESSION),)),
    _w("sessions.remove", "Remove a session", "sessions", Target.SESSION,
       request=w.SessionRef, result=w.Removed, handler=api.remove_session, nats=True,
       http=(Http("DELETE", "/api/v1/sessions/{id}", "removeSession", S, status=204,
                  view=_no_body, errors=(404, 504),
                  description="Kill it if it is still live, then delete its record and "
                              "output."),)),
    _r("sessions.logs", "Read a session's output", "logs", Target.SESSION, kind="stream",
       request=w.ReadLogs, result=list[w.StoredLog], handler=api.read_logs, nats=True,
       http=(Http("GET", "/api/v1/sessions/{id}/logs", "sessionLogs", S, ok=w.LogLine,
                  media="application/x-ndjson", query=("from", "tail", "follow"),
                  errors=(400, 404), description=T.LOGS, handler=streams.session_logs),)),
    _w("sessions.attach", "Attach a terminal (WebSocket)", "terminals", Target.SESSION,
       kind="websocket",
       http=(Http("GET", "/api/v1/sessions/{id}/attach", "attachSession", S,
                  query=("from", "tail"), errors=(400, 403, 404), description=T.ATTACH,
                  ws=(w.AttachClientText, w.AttachServerText, "json text + binary"),
                  handler=streams.attach_session),)),
    _w("run", "Run a command on many nodes (WebSocket)", "run", Target.RUN, kind="websocket",
       http=(Http("GET", "/api/v1/run", "run", "runs", errors=(403,), description=T.RUN,
                  ws=(m.ClientFrame, m.ServerFrame, "msgpack"), handler=run_ws.handle_run),)),
    _w("services.create", "Create a service", "services", request=st.ServiceSpec,
       result=w.ServiceCreated, handler=services_api.create_service, nats=True,
       http=(Http("POST", "/api/v1/services", "createService", SV, status=201,
                  ok=st.ServiceView, view=_created, errors=(400, 409, 422),
                  also={200: "The service exists with the same spec; this is its view."}),)),
    _r("services.list", "List services", "read", request=w.Empty,
       result=list[st.ServiceView], handler=services_api.list_services, nats=True,
       http=(Http("GET", "/api/v1/services", "listServices", SV),)),
    _r("services.show", "Show a service and its replicas", "read", request=w.Named,
       result=st.ServiceView, handler=services_api.show_service, nats=True,
       http=(Http("GET", "/api/v1/services/{name}", "showService", SV, errors=(400, 404)),)),
    _w("services.scale", "Change the number of replicas", "services",
       request=w.ScaleService, result=st.ServiceView, handler=services_api.scale_service,
       nats=True,
       http=(Http("POST", "/api/v1/services/{name}/scale", "scaleService", SV,
                  errors=(400, 404, 409, 422)),)),
    _w("services.drain", "Drain one replica or the whole service", "services",
       request=w.DrainService, result=st.ServiceView, handler=services_api.drain_service,
       nats=True,
       http=(Http("POST", "/api/v1/services/{name}/drain", "drainService", SV,
                  errors=(400, 404, 409, 422), description=T.DRAIN_SERVICE),)),
    _w("services.remove", "Remove a service", "services", request=w.RemoveService,
       result=w.Removed, handler=services_api.remove_service, nats=True,
       http=(Http("DELETE", "/api/v1/services/{name}", "removeService", SV, status=204,
                  view=_no_body, query=("deadline",), errors=(400, 404, 409, 422)),)),
    _r("services.best", "The replica a new client should use", "read", request=w.Named,
       result=st.Best, handler=services_api.best_replica, nats=True,
       http=(Http("GET", "/api/v1/services/{name}/best", "bestReplica", SV,
                  errors=(400, 404, 503)),)),
    _r("tokens.list", "List API tokens (never the tokens themselves)", "tokens",
       request=w.Empty, result=list[dict[str, Any]], handler=tokens_api.list_tokens,
       nats=True, http=(Http("GET", "/api/v1/tokens", "listTokens", TK, errors=(403,)),)),
    _w("tokens.create", "Create a token for a user; the answer holds it, once", "tokens",
       Target.GRANTS, request=NewToken, result=dict[str, Any],
       handler=tokens_api.create_token, nats=True,
       http=(Http("POST", "/api/v1/tokens", "createToken", TK, status=201,
                  errors=(400, 403, 422), description=T.CREATE_TOKEN),)),
    _w("tokens.revoke", "Revoke a token, on every controller within a second", "tokens",
       request=w.TokenRef, result=dict[str, Any], handler=tokens_api.revoke_token, nats=True,
       http=(Http("DELETE", "/api/v1/tokens/{id}", "revokeToken", TK,
                  errors=(400, 403, 404)),)),
    _r("audit.list", "Audit entries, oldest first", "admin", request=w.AuditQuery,
       result=list[AuditEntry], handler=tokens_api.list_audit, nats=True,
       http=(Http("GET", "/api/v1/audit", "listAudit", "audit",
                  query=("user", "since", "limit"), errors=(400, 403, 422)),)),
    _r("audit.verify", "Check the audit trail's hash chain", "admin", request=w.Empty,
       result=dict[str, Any], handler=tokens_api.verify_audit, nats=True,
       http=(Http("GET", "/api/v1/audit/verify", "verifyAudit", "audit", errors=(403,)),)),
    _r("whoami", "The user and scopes of the credential used", ANY, request=w.Empty,
       result=w.Whoami, handler=tokens_api.whoami, nats=True,
       http=(Http("GET", "/api/v1/whoami", "whoami", "meta"),)),
    Operation("logout", "End this browser's login", ANY, kind="page",
              http=(Http("POST", "/api/v1/logout", "logout", "meta", status=204,
                         errors=(403, 415), description=T.LOGOUT, where="logins.py"),)),
    Operation("login", "Log in with the link's token (recorded when it happens)", ANY,
              audit=True, kind="page"),
    _r("metrics", "Prometheus metrics", "read", kind="page",
       http=(Http("GET", "/metrics", where="metrics.py"),)),
    _r("openapi", "This document", ANY, kind="page",
       http=(Http("GET", "/api/v1/openapi.json", "openapi", "meta", ok=dict[str, Any],
                  where="routes.py"),)),
    _r("dashboard", "The dashboard page", "read", kind="page",
       http=(Http("GET", "/", where="terminals.py"),)),
    _r("terminal.pool", "The pool terminal page", "terminals", kind="page",
       http=(Http("GET", "/terminal", where="terminals.py"),)),
    _w("terminal.enter", "Open a pool terminal", "terminals", kind="page",
       http=(Http("POST", "/terminal", where="terminals.py"),)),
    _r("terminal.page", "A session's terminal page", "terminals", kind="page",
       http=(Http("GET", "/t/{id}", where="terminals.py"),)),
    _r("terminal.info", "Browser terminal settings", "terminals", kind="page",
       http=(Http("GET", "/api/v1/terminal/info", "terminalInfo", "terminals",
                  ok=w.TerminalInfo, where="terminals.py"),)),
    _r("health", "Health check for load balancers", PUBLIC, kind="page",
       http=(Http("GET", "/healthz", where="server.py"),
             Http("GET", "/robots.txt", where="terminals.py"))),
    _r("static", "The web UI's files", PUBLIC, kind="page",
       http=(Http("GET", "/static/", where="terminals.py"),)),
    _r("service.redirect", "To a service on the services listener", PUBLIC, kind="page",
       http=(Http("*", "/s/{name}", where="proxy.py"), Http("*", "/s/{name}/{tail}",
                                                           where="proxy.py"))),
)

OPS: dict[str, Operation] = {op.name: op for op in TABLE}
assert len(OPS) == len(TABLE), "an operation is declared twice"
# HTTP (method, route template) -> operation. HEAD is GET's.
HTTP: dict[tuple[str, str], str] = {(h.method, h.path): op.name for op in TABLE
                                    for h in op.http}
NATS_OPS: tuple[str, ...] = tuple(op.name for op in TABLE if op.nats)
NATS_OPS_MAP: dict[str, Operation] = {op.name: op for op in TABLE if op.nats}


def path_params(path: str) -> tuple[str, ...]:
    return tuple(part[1:-1] for part in path.split("/") if part.startswith("{"))


def route_key(method: str, template: str) -> tuple[str, str]:
    """A route as the table writes it, from aiohttp's (method, canonical template)."""
    method = "GET" if method == "HEAD" else method
    if template.startswith("/static"):
        return method, "/static/"
    return method, template.replace("{tail:.*}", "{tail}")


def http_op(method: str, template: str) -> str | None:
    """The operation of an HTTP route (its template as aiohttp gives it), or None."""
    method, path = route_key(method, template)
    return HTTP.get((method, path)) or HTTP.get(("*", path))


def table_markdown() -> str:
    """The table of docs/security.md (a test checks the doc has it verbatim)."""
    lines = ["| operation | scope | reaches | HTTP | NATS |", "|---|---|---|---|---|"]
    for op in TABLE:
        http = ", ".join(f"`{h.method} {h.path}`" for h in op.http) or "-"
        nats = f"`shoal.api.{op.name}`" if op.nats else "-"
        reach = "-" if op.target is Target.NONE else op.target.value
        lines.append(f"| {op.name} | {op.scope} | {reach} | {http} | {nats} |")
    return "\n".join(lines) + "\n"


@functools.cache
def _without(kind: type[Any], drop: frozenset[str]) -> type[Any]:
    """``kind`` without the fields in ``drop`` (those an HTTP route takes from its path),
    with the same types and constraints: what the JSON body or the query string holds."""
    fields: list[Any] = []
    for f in msgspec.structs.fields(kind):
        if f.name in drop:
            continue
        if f.required:
            fields.append((f.name, f.type))
        elif f.default is not msgspec.NODEFAULT:
            fields.append((f.name, f.type, f.default))
        else:
            fields.append((f.name, f.type, msgspec.field(default_factory=f.default_factory)))
    return msgspec.defstruct(kind.__name__ + "Body", fields, kw_only=True,
                             forbid_unknown_fields=True, module=kind.__module__)


def http_body(op: Operation, route: Http) -> type[Any] | None:
    """The struct of what an HTTP request carries besides its path (None: nothing)."""
    if op.request is None:
        return None
    names = set(op.request.__struct_fields__)
    drop = frozenset(path_params(route.path)) & names
    return _without(op.request, drop) if drop else op.request  # type: ignore[arg-type]
