"""What the OpenAPI document says in prose: descriptions, query parameters, error codes.
Types, routes and summaries come from the operation table (operations.py)."""

from __future__ import annotations

from typing import Any

from ..wire import messages as m


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

LIST_NODES = ("In natural order of names. The `X-Total-Count` header says how many nodes "
              "match the filters; page with `limit` and `after` (the last name of the "
              "previous page).")
DRAIN_NODE = ("Stop new placements on the node. With `deadline` (seconds), sessions still "
              "running then are killed (daemons with a restart policy start again "
              "elsewhere); with `wait`, answer only once none is left.")
FORGET_NODE = ("Removes a decommissioned node from the registry. A node that is up cannot "
               "be forgotten (409); one that comes back registers again.")
CREATE_SESSION = ("Give exactly one of `command` (argv) or `shell`. With an `id`, creating "
                  "is idempotent. A session no node can take is answered with state "
                  "`failed` and the reason.")
SIGNAL_SESSION = ("`signal` is a name (`TERM`, `SIGUSR1`) or a number 1-64. The answer is "
                  "the record as it was when the signal was sent.")
KILL_SESSION = ("End the session (reason `killed on request`). Killing a session that has "
                "ended answers its record unchanged.")
DRAIN_SERVICE = ("With `replica`, that replica takes no new clients and is replaced; "
                 "without, the whole service stops (scale it to start it again).")
CREATE_TOKEN = ("`scopes` are grants such as `read`, `run:env=dev`, `run:web-[1-4]`, "
                "`sessions:own`; `expires` is seconds from now (none: never). A token can "
                "only grant what it holds itself (docs/security.md).")
LOGOUT = ("Ends the login session the `shoal_login` cookie names, on every controller, and "
          "clears the cookie. With a bearer token it does nothing (the token stays valid).")

LOGS = """Newline-delimited JSON, one object per line (`t` tells them apart): `out` lines carry
base64 `data` from byte `offset` of the output, `truncated` lines say which bytes the output
cap dropped, and the last line is `end` (the session has ended and everything was sent) or
`eof` (no `follow`: this is all there is for now; resume with `from=offset`)."""

ATTACH = """WebSocket. Output is replayed from `from`, then streamed live.

Server -> client: binary frames are raw output bytes; text frames are JSON `hello` (first),
`truncated`, and `exit` (last; then the server closes). Client -> server: binary frames are
input bytes for the session's stdin or terminal; text frames are JSON `{"t":"resize","cols":
C,"rows":R}` or `{"t":"eof"}`. Before the upgrade, errors are JSON (403 for a foreign
`Origin` or a terminal link for another session, 404 for an unknown session). Besides the
API token, this route accepts a terminal link's credential for this one session (`?token=`
or its cookie). While attached, the session's `detach_timeout` does not run."""

RUN = """WebSocket; one fan-out run per connection. Every frame is binary msgpack, tagged by
`t` (bytes fields are msgpack bin, not base64). The client sends `start` (RunStart) first,
within 10 s; the server answers `plan` (the run id and the selected nodes) or `error` and
closes. Then the server streams `started`, `out`, `exit` and `unreachable` events until
`done`. The client may send `stdin`, `resize`, `signal` and `cancel` at any time; closing
the socket cancels the run on every node."""

JOIN_TOKEN = """Needs `admin`. `uses`: how many node names it may enroll; `labels` and `name` are
bound into the credentials it yields (docs/security.md, node identities). 409 when the fleet
has no node identities."""

ENROLL_NODE = """The join token in the body is the proof. Sends the node's public nkey and names;
answers its user JWT. 400 says what is wrong with the token (unknown, expired, used up); 409
for a name already enrolled."""

REVOKE_NODE = """Needs `admin`. The servers close its connection and refuse its credential from
then on; its sessions are handled as for a lost node."""
