"""shoal: run commands, daemons, browser terminals and small services across a fleet.

The public Python API is what ``__all__`` lists (docs/python-client.md):

    from shoal import SyncClient, SessionSpec

    with SyncClient.from_config() as c:
        record = c.wait(c.create_session(SessionSpec(command=["uname", "-a"])).id)

Names are imported on first use, so ``import shoal.wire.messages`` (the agent, the CLI) does not
pay for the HTTP client.
"""

import importlib as _importlib
import typing as _typing

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "Client": "client.aio",
    "LogChunk": "client.aio",
    "LogEnd": "client.aio",
    "LogEof": "client.aio",
    "LogTruncated": "client.aio",
    "SyncClient": "client.sync",
    "NodeSet": "logic.nodeset",
    "Limits": "wire.messages",
    "NodeInfo": "wire.messages",
    "RunSpec": "wire.messages",
    "SessionRecord": "wire.messages",
    "SessionSpec": "wire.messages",
    "Targets": "wire.messages",
    "AuthError": "errors",
    "ConfigError": "errors",
    "ConflictError": "errors",
    "ConnectError": "errors",
    "NoCapacityError": "errors",
    "NotFoundError": "errors",
    "ProtocolError": "errors",
    "RemoteTimeout": "errors",
    "ShoalError": "errors",
    "Unavailable": "errors",
    "ValidationError": "errors",
}

__all__ = [
    "AuthError",
    "Client",
    "ConfigError",
    "ConflictError",
    "ConnectError",
    "Limits",
    "LogChunk",
    "LogEnd",
    "LogEof",
    "LogTruncated",
    "NoCapacityError",
    "NodeInfo",
    "NodeSet",
    "NotFoundError",
    "ProtocolError",
    "RemoteTimeout",
    "RunSpec",
    "SessionRecord",
    "SessionSpec",
    "ShoalError",
    "SyncClient",
    "Targets",
    "Unavailable",
    "ValidationError",
    "__version__",
]

if _typing.TYPE_CHECKING:
    from .client.aio import Client, LogChunk, LogEnd, LogEof, LogTruncated
    from .client.sync import SyncClient
    from .errors import (
        AuthError,
        ConfigError,
        ConflictError,
        ConnectError,
        NoCapacityError,
        NotFoundError,
        ProtocolError,
        RemoteTimeout,
        ShoalError,
        Unavailable,
        ValidationError,
    )
    from .logic.nodeset import NodeSet
    from .wire.messages import Limits, NodeInfo, RunSpec, SessionRecord, SessionSpec, Targets


def __getattr__(name: str) -> _typing.Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'shoal' has no attribute {name!r}")
    value = getattr(_importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # once imported, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
