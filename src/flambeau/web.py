"""The base class of every HTTP route, builtin or third-party.

:class:`ApiHandler` is a Tornado ``RequestHandler`` that receives its dependencies through
``initialize(**kwargs)`` and does, before the route's own method runs, what every route must:
the TorchServe response headers, a request id, the body-size limit (413), authentication and
authorization (a route is closed unless its spec says ``public``), and errors rendered as
TorchServe's ``{"code", "type", "message"}`` JSON. What is logged stays apart from what the
client sees: unexpected exceptions are logged with their traceback and answered with a 500
that reveals nothing. Example::

    class Hello(ApiHandler):
        async def get(self) -> None:
            self.send_json({"hello": self.identity.name if self.identity else None})
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Mapping
from typing import Any

import tornado.web

from flambeau.api import (
    FlambeauError,
    Identity,
    InternalServerError,
    MethodNotAllowedError,
    RouteSpec,
)
from flambeau.core.logs import REQUEST_ID
from flambeau.errors import METHOD_NOT_ALLOWED

log = logging.getLogger("flambeau.web")

_NO_CACHE_HEADERS = (
    ("Pragma", "no-cache"),
    ("Cache-Control", "no-cache; no-store, must-revalidate, private"),
    ("Expires", "Thu, 01 Jan 1970 00:00:00 UTC"),
)


def dumps_pretty(obj: Any) -> bytes:
    """TorchServe's JSON: 2-space indent, ``": "``, no ASCII escaping, trailing newline."""
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode()


class Security:
    """What the core hands every route: the authentication and authorization pipeline."""

    def __init__(self, authenticators: list[Any], authorizer: Any) -> None:
        self.authenticators = authenticators
        self.authorizer = authorizer

    def authenticate(self, listener: str, headers: Mapping[str, str], path: str) -> Identity | None:
        for authenticator in self.authenticators:
            identity = authenticator.authenticate(listener, headers, path)
            if identity is not None:
                return identity
        return None

    def authorize(self, identity: Identity | None, permission: str, resource: str | None) -> bool:
        return bool(self.authorizer.authorize(identity, permission, resource))


@tornado.web.stream_request_body
class ApiHandler(tornado.web.RequestHandler):
    """Base of every route; see the module docstring. Subclasses define ``get``/``post``/..."""

    route: RouteSpec
    security: Security
    server: Any
    identity: Identity | None
    request_id: str

    def initialize(self, **kwargs: Any) -> None:
        self.route = kwargs.pop("route")
        self.security = kwargs.pop("security")
        self.server = kwargs.pop("server")
        self._max_body = int(kwargs.pop("max_request_size", 6553500))
        self._chunks: list[bytes] = []
        self._received = 0
        self.identity = None
        # Tornado set the default headers before the server was known; add the server's now.
        self._set_server_headers()
        self.setup(**kwargs)

    def setup(self, **kwargs: Any) -> None:
        """Receives the route spec's ``kwargs``; override instead of ``initialize``."""
        if kwargs:
            raise TypeError(f"{type(self).__name__} got unexpected route kwargs {sorted(kwargs)}")

    def set_default_headers(self) -> None:
        # Called by Tornado before ``initialize`` and again when an error clears the response:
        # the request keeps the one id that its log lines carry.
        if not hasattr(self, "request_id"):
            self.request_id = str(uuid.uuid4())
            REQUEST_ID.set(self.request_id)
        self.set_header("x-request-id", self.request_id)
        for name, value in _NO_CACHE_HEADERS:
            self.set_header(name, value)
        self.clear_header("Server")
        self.clear_header("Content-Type")
        self._set_server_headers()

    def _set_server_headers(self) -> None:
        """Headers every response carries by configuration (CORS), precomputed by plugins as
        ``server.response_headers``."""
        server = getattr(self, "server", None)
        for name, value in getattr(server, "response_headers", ()):
            self.set_header(name, value)

    def compute_etag(self) -> None:
        # API responses are dynamic; hashing every body would only cost time.
        return None

    @property
    def listener(self) -> str:
        return self.route.listener

    def prepare(self) -> None:
        # Synchronous on purpose: Tornado skips the awaiting machinery for a plain return.
        length = self.request.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) > self._max_body:
            self._reject_too_large()
            return
        # Slack above the limit so that a chunked body passing it reaches data_received (and
        # gets TorchServe's 413) before Tornado's own check (a bare 400) sees it; nothing past
        # the limit is kept, and the connection closes once the 413 is sent.
        self.request.connection.set_max_body_size(  # type: ignore[union-attr]
            2 * self._max_body + 65536
        )
        if self.route.public:
            return
        headers = self.request.headers
        self.identity = self.security.authenticate(self.listener, headers, self.request.path)
        permission = self.route.permission
        resource = self.path_kwargs.get("model_name") if self.path_kwargs else None
        # A route that declares no permission is refused to everybody: closed by default.
        if permission is None or not self.security.authorize(self.identity, permission, resource):
            self.security_refused()

    def security_refused(self) -> None:
        """Raise the refusal the configured authenticator prefers (TorchServe: 400 token)."""
        for authenticator in self.security.authenticators:
            refusal = getattr(authenticator, "refusal", None)
            if refusal is not None:
                raise refusal(self.identity, self.listener)
        from flambeau.api import ForbiddenError

        raise ForbiddenError("Forbidden: this identity may not use this API")

    def _reject_too_large(self) -> None:
        # TorchServe answers a bare 413 with no body and closes the connection.
        self.set_status(413)
        self.set_header("Connection", "close")
        self.finish()
        self.request.connection.close()  # type: ignore[union-attr]

    def data_received(self, chunk: bytes) -> None:
        if self._finished:
            return
        self._received += len(chunk)
        if self._received > self._max_body:
            # Only a chunked body gets here (a Content-Length over the limit was refused in
            # prepare): answer TorchServe's bare 413 and stop reading.
            self._reject_too_large()
            return
        self._chunks.append(chunk)

    @property
    def body(self) -> bytes:
        """The whole request body (joined once, lazily)."""
        if len(self._chunks) != 1:
            self._chunks = [b"".join(self._chunks)]
        return self._chunks[0]

    def send_json(self, obj: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(dumps_pretty(obj))

    def send_status(self, message: str, status: int = 200) -> None:
        self.send_json({"status": message}, status)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc_info = kwargs.get("exc_info")
        error = exc_info[1] if exc_info else None
        if isinstance(error, tornado.web.HTTPError) and not isinstance(error, FlambeauError):
            if status_code == 405:
                error = MethodNotAllowedError(METHOD_NOT_ALLOWED)
            else:
                error = FlambeauError(error.log_message or self._reason, status=status_code)
        if not isinstance(error, FlambeauError):
            error = InternalServerError("Internal server error")
        self.render_error(error)

    def render_error(self, error: FlambeauError) -> None:
        """Render an error in this route's wire shape; override for other protocols."""
        self.set_status(error.status, reason=None)
        self.set_header("Content-Type", "application/json")
        self.finish(dumps_pretty(error.to_json()))

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if isinstance(value, FlambeauError):
            log.debug("request %s failed: %s", getattr(self, "request_id", "-"), value.message)
            return
        if isinstance(value, tornado.web.HTTPError):
            return
        log.error(
            "request %s: unexpected error",
            getattr(self, "request_id", "-"),
            exc_info=(typ, value, tb),
        )

    def _handle_request_exception(self, e: BaseException) -> None:
        if isinstance(e, FlambeauError):
            if self._finished:
                return
            self.log_exception(type(e), e, e.__traceback__)
            self.clear()
            self.set_default_headers()
            self.render_error(e)
            return
        super()._handle_request_exception(e)

    def on_finish(self) -> None:
        self.server.observe_response(self)


class NotFoundHandler(ApiHandler):
    """The fallback: TorchServe's 404 ``ResourceNotFoundException`` for any unknown path."""

    def prepare(self) -> None:
        from flambeau.api import NotFoundError
        from flambeau.errors import RESOURCE_NOT_FOUND

        raise NotFoundError(RESOURCE_NOT_FOUND)
