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

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Iterable, Mapping
from http import HTTPStatus
from typing import Any, ClassVar

import tornado.httputil
import tornado.routing
import tornado.web

from flambeau.api import (
    FlambeauError,
    ForbiddenError,
    Identity,
    InternalServerError,
    MethodNotAllowedError,
    RouteSpec,
)
from flambeau.core.logs import REQUEST_ID
from flambeau.errors import METHOD_NOT_ALLOWED

log = logging.getLogger("flambeau.web")

FORBIDDEN = "Forbidden: this identity may not use this API"

_NO_CACHE_HEADERS = (
    ("Pragma", "no-cache"),
    ("Cache-Control", "no-cache; no-store, must-revalidate, private"),
    ("Expires", "Thu, 01 Jan 1970 00:00:00 UTC"),
)


def dumps_pretty(obj: Any) -> bytes:
    """TorchServe's JSON: 2-space indent, ``": "``, no ASCII escaping, trailing newline."""
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode()


class RequestBody:
    """A request body kept within ``max_request_size`` by TorchServe's rules, for both route
    bases: a declared length over the limit is refused before anything is read, a chunked body
    as soon as it passes the limit (both a bare 413, then the connection closes)."""

    __slots__ = ("_chunks", "_received", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._chunks: list[bytes] = []
        self._received = 0

    def declared_too_large(self, headers: Mapping[str, str]) -> bool:
        length = headers.get("Content-Length")
        return length is not None and length.isdigit() and int(length) > self.limit

    @property
    def connection_limit(self) -> int:
        """The limit for the HTTP connection: slack above ours, so that a chunked body passing
        it reaches :meth:`add` (and gets TorchServe's 413) before the connection's own check
        (a bare 400) sees it; nothing past the limit is kept."""
        return 2 * self.limit + 65536

    def add(self, chunk: bytes) -> bool:
        """Keep ``chunk``; False (and nothing kept) once the body passes the limit."""
        self._received += len(chunk)
        if self._received > self.limit:
            return False
        self._chunks.append(chunk)
        return True

    def join(self) -> bytes:
        """The whole body (joined once)."""
        if len(self._chunks) != 1:
            self._chunks = [b"".join(self._chunks)]
        return self._chunks[0]


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

    def admit(
        self, route: RouteSpec, headers: Mapping[str, str], path: str, resource: str | None
    ) -> Identity | None:
        """Authenticate and authorize one request to a non-public ``route``: the identity, or
        the refusal raised. A route that declares no permission is refused to everybody."""
        identity = self.authenticate(route.listener, headers, path)
        permission = route.permission
        if permission is None or not self.authorize(identity, permission, resource):
            raise self.refusal(identity, route.listener)
        return identity

    def refusal(self, identity: Identity | None, listener: str) -> FlambeauError:
        """The refusal the configured authenticator prefers (TorchServe: 400 token)."""
        for authenticator in self.authenticators:
            refusal = getattr(authenticator, "refusal", None)
            if refusal is not None:
                return refusal(identity, listener)
        return ForbiddenError(FORBIDDEN)


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
        self._body = RequestBody(int(kwargs.pop("max_request_size", 6553500)))
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
        if self._body.declared_too_large(self.request.headers):
            self._reject_too_large()
            return
        self.request.connection.set_max_body_size(  # type: ignore[union-attr]
            self._body.connection_limit
        )
        if self.route.public:
            return
        resource = self.path_kwargs.get("model_name") if self.path_kwargs else None
        self.identity = self.security.admit(
            self.route, self.request.headers, self.request.path, resource
        )

    def _reject_too_large(self) -> None:
        # TorchServe answers a bare 413 with no body and closes the connection.
        self.set_status(413)
        self.set_header("Connection", "close")
        self.finish()
        self.request.connection.close()  # type: ignore[union-attr]

    def data_received(self, chunk: bytes) -> None:
        if self._finished:
            return
        if not self._body.add(chunk):
            self._reject_too_large()

    @property
    def body(self) -> bytes:
        """The whole request body."""
        return self._body.join()

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
        self.server.observe_response(self.request, self.get_status())


class NotFoundHandler(ApiHandler):
    """The fallback: TorchServe's 404 ``ResourceNotFoundException`` for any unknown path."""

    def prepare(self) -> None:
        from flambeau.api import NotFoundError
        from flambeau.errors import RESOURCE_NOT_FOUND

        raise NotFoundError(RESOURCE_NOT_FOUND)


def reason_for(status: int, reason: str | None = None) -> str:
    """The given phrase; else the standard one (TorchServe sends an empty phrase, which
    Tornado cannot), else Netty's ``Server Error (N)`` for a code without one."""
    if reason:
        return reason
    if status in HTTPStatus._value2member_map_:
        return HTTPStatus(status).phrase
    kind = {1: "Informational", 2: "Success", 3: "Redirection", 4: "Client Error"}
    return f"{kind.get(status // 100, 'Server Error')} ({status})"


class _HttpDate:
    """The ``Date`` header, formatted once a second rather than per response."""

    second = -1
    value = ""

    @classmethod
    def now(cls) -> str:
        second = int(time.time())
        if second != cls.second:
            cls.second, cls.value = second, tornado.httputil.format_timestamp(second)
        return cls.value


class Endpoint(tornado.httputil.HTTPMessageDelegate):
    """A lean route for hot paths: Tornado's HTTP connection without a ``RequestHandler``.

    It does what :class:`ApiHandler` does for every route -- request id and TorchServe's
    headers, the body limit (413), authentication and authorization, errors as TorchServe's
    JSON, the access log and request metrics -- at a fraction of the cost: no handler object
    graph, no output transforms, no per-request coroutine until the body is in. Subclasses
    implement ``async handle()`` and answer with :meth:`send`, or :meth:`start` / :meth:`write`
    / :meth:`end` to stream. ``path_kwargs`` holds the pattern's named groups, decoded.
    Register it like any route: ``RouteSpec(pattern, MyEndpoint, permission=...)``.
    """

    METHODS: ClassVar[frozenset[str]] = frozenset({"GET", "POST", "PUT", "DELETE", "PATCH"})

    identity: Identity | None

    def __init__(
        self,
        request: tornado.httputil.HTTPServerRequest,
        path_kwargs: Mapping[str, bytes | None],
        *,
        route: RouteSpec,
        security: Security,
        server: Any,
        max_request_size: int = 6553500,
        **kwargs: Any,
    ) -> None:
        self.request = request
        self.connection: Any = request.connection
        self.route = route
        self.security = security
        self.server = server
        self._body = RequestBody(max_request_size)
        self.raw_path_kwargs = path_kwargs
        self.path_kwargs: dict[str, str | None] = {}
        self.identity = None
        self.request_id = str(uuid.uuid4())
        self.status = 200
        self.started = False
        self.finished = False
        self.setup(**kwargs)

    def setup(self, **kwargs: Any) -> None:
        """Receives the route spec's ``kwargs``."""
        if kwargs:
            raise TypeError(f"{type(self).__name__} got unexpected route kwargs {sorted(kwargs)}")

    async def handle(self) -> None:
        """Answer the request (the body is in :attr:`body`)."""
        raise NotImplementedError

    def on_connection_close(self) -> None:
        """The client went away before the answer was finished."""

    # -- HTTPMessageDelegate ------------------------------------------------------------

    def headers_received(
        self,
        start_line: tornado.httputil.RequestStartLine | tornado.httputil.ResponseStartLine,
        headers: tornado.httputil.HTTPHeaders,
    ) -> Awaitable[None] | None:
        REQUEST_ID.set(self.request_id)
        try:
            self._admit(headers)
        except FlambeauError as error:
            self.fail(error)
        except Exception:
            log.exception("request %s: unexpected error", self.request_id)
            self.fail(InternalServerError("Internal server error"))
        if not self.finished:
            self.connection.set_close_callback(self._closed)
        return None

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        if not self.finished and not self._body.add(chunk):
            self._reject_too_large()
        return None

    def finish(self) -> None:
        if self.finished:
            return
        task = asyncio.ensure_future(self._run())
        # Keep a reference: a bare task may be collected while it waits.
        self._task = task

    # -- answering ------------------------------------------------------------------------

    @property
    def body(self) -> bytes:
        """The whole request body."""
        return self._body.join()

    def send(
        self,
        status: int,
        body: bytes = b"",
        *,
        content_type: str | None = None,
        headers: Iterable[tuple[str, str]] = (),
        reason: str | None = None,
    ) -> None:
        """Answer in one piece."""
        if self.finished:
            return
        response = self._headers(content_type, headers)
        response["Content-Length"] = str(len(body))
        self._write_head(status, reason, response, body)
        self._end()

    def send_json(self, obj: Any, status: int = 200) -> None:
        self.send(status, dumps_pretty(obj), content_type="application/json")

    def start(
        self,
        status: int,
        *,
        content_type: str | None = None,
        headers: Iterable[tuple[str, str]] = (),
        reason: str | None = None,
    ) -> None:
        """Begin a streamed answer (chunked); :meth:`write` the parts, then :meth:`end`."""
        if self.started or self.finished:
            return
        self._write_head(status, reason, self._headers(content_type, headers), None)

    def write(self, chunk: bytes) -> None:
        if self.finished or not chunk:
            return
        self.connection.write(chunk).add_done_callback(_ignore_write_error)

    def end(self, chunk: bytes = b"") -> None:
        """Finish a streamed answer."""
        self.write(chunk)
        self._end()

    def fail(self, error: FlambeauError) -> None:
        """Answer with ``error``; when the answer has begun, cut the connection instead."""
        if self.finished:
            return
        if self.started:
            log.warning("request %s failed while streaming: %s", self.request_id, error.message)
            self.close()
            return
        self.render_error(error)

    def render_error(self, error: FlambeauError) -> None:
        """Render an error in this route's wire shape; override for other protocols."""
        self.send(error.status, dumps_pretty(error.to_json()), content_type="application/json")

    def close(self) -> None:
        """Drop the connection (the answer, if any, is abandoned)."""
        self._end()
        self.connection.close()

    # -- internals ------------------------------------------------------------------------

    def _admit(self, headers: tornado.httputil.HTTPHeaders) -> None:
        request = self.request
        if request.method not in self.METHODS:
            raise MethodNotAllowedError(METHOD_NOT_ALLOWED)
        if self._body.declared_too_large(headers):
            self._reject_too_large()
            return
        self.connection.set_max_body_size(self._body.connection_limit)
        try:
            self.path_kwargs = {
                name: None if value is None else value.decode()
                for name, value in self.raw_path_kwargs.items()
            }
        except UnicodeDecodeError:
            raise FlambeauError("Invalid unicode in the path", status=400) from None
        if self.route.public:
            return
        resource = self.path_kwargs.get("model_name")
        self.identity = self.security.admit(self.route, headers, request.path, resource)

    async def _run(self) -> None:
        try:
            await self.handle()
        except asyncio.CancelledError:
            self.close()
        except FlambeauError as error:
            log.debug("request %s failed: %s", self.request_id, error.message)
            self.fail(error)
        except Exception:
            log.exception("request %s: unexpected error", self.request_id)
            try:
                self.fail(InternalServerError("Internal server error"))
            except Exception:
                log.exception("request %s: the error answer failed too", self.request_id)
                self.close()

    def _headers(
        self, content_type: str | None, extra: Iterable[tuple[str, str]]
    ) -> tornado.httputil.HTTPHeaders:
        headers = tornado.httputil.HTTPHeaders()
        headers["Date"] = _HttpDate.now()
        headers["x-request-id"] = self.request_id
        for name, value in _NO_CACHE_HEADERS:
            headers[name] = value
        for name, value in getattr(self.server, "response_headers", ()):
            headers[name] = value
        if content_type:
            headers["Content-Type"] = content_type
        for name, value in extra:
            headers[name] = value
        return headers

    def _write_head(
        self,
        status: int,
        reason: str | None,
        headers: tornado.httputil.HTTPHeaders,
        body: bytes | None,
    ) -> None:
        self.started = True
        self.status = status
        line = tornado.httputil.ResponseStartLine("HTTP/1.1", status, reason_for(status, reason))
        self.connection.write_headers(line, headers, body).add_done_callback(_ignore_write_error)

    def _end(self) -> None:
        if self.finished:
            return
        self.finished = True
        self.connection.set_close_callback(None)
        if self.started:
            # Only an answered request is counted and logged (as ApiHandler's on_finish).
            self.connection.finish()
            self.server.observe_response(self.request, self.status)

    def _reject_too_large(self) -> None:
        # TorchServe answers a bare 413 with no body and closes the connection.
        if self.finished:
            return
        self.send(413, headers=(("Connection", "close"),))
        self.connection.close()

    def _closed(self) -> None:
        if not self.finished:
            self.finished = True
            self.on_connection_close()


def _ignore_write_error(future: asyncio.Future[None]) -> None:
    # A client that left before its answer: nothing to tell it, nothing worth a traceback.
    if not future.cancelled():
        future.exception()


class EndpointRouter(tornado.routing.Router):
    """The rule target that builds an :class:`Endpoint` for a matched request."""

    def __init__(self, endpoint: type[Endpoint], kwargs: Mapping[str, Any]) -> None:
        self.endpoint = endpoint
        self.kwargs = dict(kwargs)

    def find_handler(
        self, request: tornado.httputil.HTTPServerRequest, **kwargs: Any
    ) -> tornado.httputil.HTTPMessageDelegate | None:
        return self.endpoint(request, kwargs.get("path_kwargs") or {}, **self.kwargs)
