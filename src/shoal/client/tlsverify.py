"""How the clients (the CLI, the Python client, ``shoal run``'s WebSocket) verify an
https:// controller: against the CA in client.toml (``ca``) or ``SHOAL_CA``, else the
system's CAs; and the one clear error when that fails. Standard library only: ``shoal run``
imports it on its fast path."""

from __future__ import annotations

import ssl

from ..errors import ConfigError, ConnectError

HINT = "pass the CA in client.toml (ca = \"/path/to/ca.pem\") or SHOAL_CA"


def client_context(ca: str = "") -> ssl.SSLContext:
    try:
        return ssl.create_default_context(cafile=ca or None)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"cannot load the CA file {ca!r} (client.toml ca or SHOAL_CA): "
                          f"{e}") from e


def certificate_error(url: str, e: BaseException) -> ConnectError | None:
    """The clear error for a certificate the client could not verify, else None."""
    found: BaseException | None = e
    while found is not None:
        # aiohttp's error is itself an ssl.CertificateError and carries the real one.
        inner = getattr(found, "certificate_error", None)
        if isinstance(inner, BaseException):
            found = inner
        elif isinstance(found, ssl.SSLCertVerificationError):
            break
        else:
            found = found.__cause__ or found.__context__
    if found is None:
        return None
    detail = getattr(found, "verify_message", "") or str(found)
    return ConnectError(f"certificate verify failed for the controller at {url}: {detail}; "
                        f"{HINT} (shoal up --tls writes it to $SHOAL_HOME/tls/ca.pem)")
