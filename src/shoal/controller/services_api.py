"""Services in the HTTP API (``/api/v1/services``) and the NATS API (``services.*``), and the
controller's ``/s/NAME/`` redirect to the services listener. Handlers are thin: decode, call
the service manager, encode."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import msgspec
from aiohttp import web

from ..errors import ValidationError
from ..wire import servicetypes as st
from .api import api_errors, body, ok
from .proxy import add_redirect_routes

if TYPE_CHECKING:
    from .server import Controller
    from .services import ServiceManager


class ScaleBody(msgspec.Struct, forbid_unknown_fields=True):
    replicas: int


class ServiceDrainBody(msgspec.Struct, forbid_unknown_fields=True):
    replica: str | None = None
    deadline: float | None = None
    wait: bool = False


class RemoveBody(msgspec.Struct, forbid_unknown_fields=True):
    deadline: float | None = None


def _mgr(request: web.Request) -> ServiceManager:
    return request.app["controller"].services  # type: ignore[no-any-return]


def _name(request: web.Request) -> str:
    return st.check_name(request.match_info["name"])


def _deadline(value: float | None) -> float | None:
    if value is not None and not 0 <= value <= 86400:
        raise ValidationError("deadline must be between 0 and 86400 seconds")
    return value


@api_errors
async def create_service(request: web.Request) -> web.Response:
    spec = await body(request, st.ServiceSpec)
    mgr = _mgr(request)
    record, created = await mgr.create(spec)
    return ok(mgr.view(record), 201 if created else 200)


@api_errors
async def list_services(request: web.Request) -> web.Response:
    return ok(_mgr(request).views())


@api_errors
async def show_service(request: web.Request) -> web.Response:
    mgr = _mgr(request)
    return ok(mgr.view(await mgr.get(_name(request))))


@api_errors
async def scale_service(request: web.Request) -> web.Response:
    name = _name(request)
    req = await body(request, ScaleBody)
    mgr = _mgr(request)
    return ok(mgr.view(await mgr.scale(name, req.replicas)))


@api_errors
async def drain_service(request: web.Request) -> web.Response:
    name = _name(request)
    req = await body(request, ServiceDrainBody)
    mgr = _mgr(request)
    record = await mgr.drain(name, req.replica, _deadline(req.deadline), req.wait)
    return ok(mgr.view(record))


@api_errors
async def remove_service(request: web.Request) -> web.Response:
    name = _name(request)
    raw = request.query.get("deadline")
    try:
        deadline = float(raw) if raw is not None else None
    except ValueError as e:
        raise ValidationError(f"query parameter deadline must be a number, not {raw!r}") from e
    mgr = _mgr(request)
    await mgr.get(name)
    await mgr.remove(name, _deadline(deadline))
    return web.Response(status=204)


@api_errors
async def best_replica(request: web.Request) -> web.Response:
    return ok(_mgr(request).best(_name(request)))


def add_service_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/api/v1/services", create_service)
    r.add_get("/api/v1/services", list_services)
    r.add_get("/api/v1/services/{name}", show_service)
    r.add_delete("/api/v1/services/{name}", remove_service)
    r.add_post("/api/v1/services/{name}/scale", scale_service)
    r.add_post("/api/v1/services/{name}/drain", drain_service)
    r.add_get("/api/v1/services/{name}/best", best_replica)
    add_redirect_routes(app)


# ---------------------------------------------------------------------- NATS

class _Name(msgspec.Struct, forbid_unknown_fields=True):
    name: str


class _Scale(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    replicas: int


class _Drain(ServiceDrainBody, forbid_unknown_fields=True):
    name: str = ""


class _Remove(RemoveBody, forbid_unknown_fields=True):
    name: str = ""


def service_ops(ctl: Controller) -> dict[str, Callable[[bytes], Awaitable[Any]]]:
    """The ``services.*`` operations of the NATS API."""
    def decode(kind: type[Any], data: bytes) -> Any:
        return msgspec.json.decode(data or b"{}", type=kind)

    def mgr() -> ServiceManager:
        return ctl.services

    async def create(d: bytes) -> Any:
        record, created = await mgr().create(decode(st.ServiceSpec, d))
        return {"service": mgr().view(record), "created": created}

    async def list_(d: bytes) -> Any:
        return mgr().views()

    async def show(d: bytes) -> Any:
        return mgr().view(await mgr().get(decode(_Name, d).name))

    async def scale(d: bytes) -> Any:
        req = decode(_Scale, d)
        st.check_name(req.name)
        return mgr().view(await mgr().scale(req.name, req.replicas))

    async def drain(d: bytes) -> Any:
        req = decode(_Drain, d)
        st.check_name(req.name)
        return mgr().view(await mgr().drain(req.name, req.replica, _deadline(req.deadline),
                                            req.wait))

    async def remove(d: bytes) -> Any:
        req = decode(_Remove, d)
        await mgr().get(req.name)
        await mgr().remove(req.name, _deadline(req.deadline))
        return {"removed": True}

    async def best(d: bytes) -> Any:
        return mgr().best(decode(_Name, d).name)

    return {"services.create": create, "services.list": list_, "services.show": show,
            "services.scale": scale, "services.drain": drain, "services.remove": remove,
            "services.best": best}
