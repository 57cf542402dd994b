"""PyCloud's Redis protocol as pure code: request channels and payloads in, typed requests or a
clear error out, and the JSON replies. No I/O here; ``bridges/pycloud.py`` does the Redis and
the fleet.

PyCloud (github.com/Year4000/PyCloud, README "API Messaging Channel"):

- a client publishes JSON on ``year4000.pycloud.create`` ``{"id": R, "script": S}`` and reads the
  answer on ``year4000.pycloud.create.R``: ``{"cloud": C, "id": SESSION}``;
- ``year4000.pycloud.status`` and ``.remove`` take ``{"id": R, "session": SESSION}`` and answer
  on ``<channel>.R`` with ``{"cloud": C, "id": SESSION, "status": true|false}``;
- a script whose first line is an image name and the rest a JSON object runs that image, its
  ``port`` mapped to a port PyCloud allocates.

What shoal adds is written in docs/pycloud.md: errors are answered too, as
``{"cloud": C, "error": MESSAGE}`` (with ``id`` and ``status: false`` when the request named a
session), on the request's reply channel whenever a request id can be found in the payload.
"""

from __future__ import annotations

import hashlib
import re
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from ..wire import messages as m

DEFAULT_PREFIX = "year4000.pycloud"
Verb = Literal["create", "status", "remove"]
VERBS: tuple[Verb, ...] = ("create", "status", "remove")

# A script is at most what a shell session takes; the rest of the cap is the JSON around it.
MAX_SCRIPT = 262_144
MAX_PAYLOAD = MAX_SCRIPT + 4096

# A request id names a reply channel and a claim key: printable, no spaces, bounded.
RequestId = Annotated[str, Meta(min_length=1, max_length=200, pattern=r"^[!-~]+$")]
Script = Annotated[str, Meta(min_length=1, max_length=MAX_SCRIPT)]


class CreateRequest(Struct, frozen=True, forbid_unknown_fields=True):
    id: RequestId
    script: Script


class SessionRequest(Struct, frozen=True, forbid_unknown_fields=True):
    """A status or remove request. ``session`` must be a shoal session id: it becomes part of
    an API path, so nothing else (``..``, ``/``) may pass."""

    id: RequestId
    session: m.SessionId


class Reply(Struct, frozen=True, omit_defaults=True):
    cloud: str
    id: str | None = None
    status: bool | None = None
    error: str | None = None


class Request(Struct, frozen=True):
    verb: Verb
    reply_channel: str
    body: CreateRequest | SessionRequest


class BadRequest(Struct, frozen=True):
    """A payload that cannot be served; ``reply_channel`` is None when no request id could be
    read from it (then there is nowhere to answer, only the log)."""

    verb: Verb
    reply_channel: str | None
    request_id: str | None
    message: str


class ContainerScript(Struct, frozen=True):
    """A PyCloud Docker script: the image on the first line, a JSON object after it."""

    image: str
    port: int | None
    options: dict[str, Any]


class _Envelope(Struct):
    id: Any = None


_ID_IN_TEXT = re.compile(rb'"id"\s*:\s*"([!-~]{1,200}?)"')
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_IMAGE = re.compile(
    rf"^(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*(?::[0-9]+)?/)?{_COMPONENT}(?:/{_COMPONENT})*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[0-9a-f]{64})?$")
_Decoder = msgspec.json.Decoder[CreateRequest] | msgspec.json.Decoder[SessionRequest]
_DECODERS: dict[str, _Decoder] = {
    "create": msgspec.json.Decoder(CreateRequest),
    "status": msgspec.json.Decoder(SessionRequest),
    "remove": msgspec.json.Decoder(SessionRequest),
}
_reply_encoder = msgspec.json.Encoder()


def request_channels(prefix: str = DEFAULT_PREFIX) -> list[str]:
    return [f"{prefix}.{verb}" for verb in VERBS]


def verb_of(channel: str, prefix: str = DEFAULT_PREFIX) -> Verb | None:
    for verb in VERBS:
        if channel == f"{prefix}.{verb}":
            return verb
    return None


def parse(verb: Verb, channel: str, payload: bytes) -> Request | BadRequest:
    """One message from a request channel, validated; never raises."""
    rid = _request_id(payload)
    reply = f"{channel}.{rid}" if rid is not None else None
    if len(payload) > MAX_PAYLOAD:
        return BadRequest(verb, reply, rid, f"the payload is {len(payload)} bytes; the limit is "
                                            f"{MAX_PAYLOAD} (a script of at most {MAX_SCRIPT})")
    try:
        body = _DECODERS[verb].decode(payload)
    except msgspec.ValidationError as e:
        fields = '"id" and "script"' if verb == "create" else '"id" and "session"'
        return BadRequest(verb, reply, rid, f"bad {verb} request: {e}; send a JSON object "
                                            f"with exactly {fields}")
    except msgspec.DecodeError as e:
        return BadRequest(verb, reply, rid, f"bad {verb} request: not JSON ({e})")
    assert reply is not None  # a valid body has a valid id, which _request_id found
    return Request(verb, reply, body)


def _request_id(payload: bytes) -> str | None:
    """The request id, to answer even a request that is otherwise bad. From the JSON when it
    decodes (unknown and oversized fields are skipped, not copied), else from the text."""
    found: Any = None
    try:
        found = msgspec.json.decode(payload, type=_Envelope).id
    except (msgspec.DecodeError, msgspec.ValidationError):
        match = _ID_IN_TEXT.search(payload[:MAX_PAYLOAD])
        found = bytes(match.group(1)).decode() if match else None
    try:
        return msgspec.convert(found, RequestId)
    except msgspec.ValidationError:
        return None


def container_script(script: str) -> ContainerScript | None:
    """The script as a Docker script, or None when it is a shell script. It is one when its
    first line is an image reference and the rest is a JSON object (a shell script is neither).
    Raises ``ValueError`` for a Docker script with a bad ``port``."""
    first, _, rest = script.partition("\n")
    image = first.strip()
    if not _IMAGE.match(image) or not rest.strip().startswith("{"):
        return None
    try:
        options = msgspec.json.decode(rest)
    except msgspec.DecodeError:
        return None
    if not isinstance(options, dict):
        return None
    port = options.get("port")
    if port is not None and (not isinstance(port, int) or isinstance(port, bool)
                             or not 1 <= port <= 65535):
        raise ValueError(f"the Docker script's port is {port!r}; give a port number 1-65535")
    return ContainerScript(image=image, port=port, options=options)


def session_id_for(request_id: str) -> str:
    """The shoal session id a create request makes: the same request id always names the same
    session, so a repeated request returns the first session instead of starting a second."""
    return "pycloud-" + hashlib.sha256(request_id.encode()).hexdigest()[:24]


def encode_reply(reply: Reply) -> bytes:
    return _reply_encoder.encode(reply)
