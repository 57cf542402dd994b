"""The services operations (``/api/v1/services``, NATS ``services.*``; declared in
operations.py). Handlers are thin: check the name, call the service manager, return."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..wire import api as w
from ..wire import servicetypes as st
from .context import Call

if TYPE_CHECKING:
    from .services import ServiceManager


def _mgr(c: Call) -> ServiceManager:
    return c.ctl.services


async def create_service(c: Call, spec: st.ServiceSpec) -> w.ServiceCreated:
    record, created = await _mgr(c).create(spec)
    return w.ServiceCreated(service=_mgr(c).view(record), created=created)


async def list_services(c: Call, _: w.Empty) -> list[st.ServiceView]:
    return _mgr(c).views()


async def show_service(c: Call, r: w.Named) -> st.ServiceView:
    return _mgr(c).view(await _mgr(c).get(st.check_name(r.name)))


async def scale_service(c: Call, r: w.ScaleService) -> st.ServiceView:
    return _mgr(c).view(await _mgr(c).scale(st.check_name(r.name), r.replicas))


async def drain_service(c: Call, r: w.DrainService) -> st.ServiceView:
    record = await _mgr(c).drain(st.check_name(r.name), r.replica, r.deadline, r.wait)
    return _mgr(c).view(record)


async def remove_service(c: Call, r: w.RemoveService) -> w.Removed:
    await _mgr(c).get(st.check_name(r.name))
    await _mgr(c).remove(r.name, r.deadline)
    return w.Removed()


async def best_replica(c: Call, r: w.Named) -> st.Best:
    return _mgr(c).best(st.check_name(r.name))
