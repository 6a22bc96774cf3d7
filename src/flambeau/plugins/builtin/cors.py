"""CORS response headers, as TorchServe sets them: off unless configured.

``cors_allowed_origin``, ``cors_allowed_methods`` and ``cors_allowed_headers`` each become an
``Access-Control-Allow-*`` header on every response of every listener (errors included), and
that is all: a pre-flight ``OPTIONS`` is routed like any other request, so with token
authorization on, browsers need the token there too (TorchServe behaves the same way).
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Any

from flambeau.api import ConfigError, hookimpl

HEADERS = (
    ("cors_allowed_origin", "Access-Control-Allow-Origin"),
    ("cors_allowed_methods", "Access-Control-Allow-Methods"),
    ("cors_allowed_headers", "Access-Control-Allow-Headers"),
)


def cors_headers(config: Any) -> tuple[tuple[str, str], ...]:
    """The configured CORS headers; a value with a line break is refused (header injection)."""
    headers = []
    for key, header in HEADERS:
        value = config.get_str(key).strip()
        if not value:
            continue
        if "\r" in value or "\n" in value:
            raise ConfigError(f"{key}: a header value cannot contain a line break")
        headers.append((header, value))
    return tuple(headers)


@hookimpl
def flambeau_configure(config: Any) -> None:
    cors_headers(config)


@hookimpl
def flambeau_lifespan(server: Any) -> AbstractAsyncContextManager[None] | None:
    # Runs while the server is assembled, before a request is read: every ApiHandler adds
    # ``server.response_headers`` to its response.
    headers = cors_headers(server.config)
    if headers:
        server.response_headers = (*getattr(server, "response_headers", ()), *headers)
    return None
