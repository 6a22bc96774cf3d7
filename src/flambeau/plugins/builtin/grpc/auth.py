"""Authentication, authorization and access logging for every rpc of the gRPC listeners.

:class:`SecurityInterceptor` runs the same pipeline as REST (``server.security``): invocation
metadata become headers (``authorization: Bearer <key>``), the service's spec names the
listener and the permission, and a refusal ends the call with ``PERMISSION_DENIED`` and the
authenticator's message (TorchServe's token text). A method is closed unless its service was
registered through ``flambeau_grpc_services`` with a permission, or listed as public. Requests
that carry a ``model_name`` are also authorized per model, as REST authorizes the path's model.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any

import grpc
import grpc.aio

from flambeau.api import FlambeauError, GrpcServiceSpec, Identity
from flambeau.web import FORBIDDEN

access_log = logging.getLogger("flambeau.access")

UNREGISTERED = "This method was not registered through flambeau_grpc_services"

Check = Callable[[Any, grpc.aio.ServicerContext], Awaitable[None]]


class MetadataHeaders(Mapping[str, str]):
    """Invocation metadata as case-insensitive headers (binary ``-bin`` entries left out)."""

    def __init__(self, metadata: Sequence[tuple[str, Any]] | None) -> None:
        self._values: dict[str, str] = {}
        for key, value in metadata or ():
            if isinstance(value, str) and not key.endswith("-bin"):
                self._values.setdefault(key.lower(), value)

    def __getitem__(self, key: str) -> str:
        return self._values[key.lower()]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


def split_method(method: str) -> tuple[str, str]:
    """``/pkg.Service/Method`` -> (``pkg.Service``, ``Method``)."""
    service, _, name = method.lstrip("/").rpartition("/")
    return service, name


class SecurityInterceptor(grpc.aio.ServerInterceptor):
    """Refuses what the security pipeline refuses; wraps what it allows for per-model checks.

    ``services`` maps a full service name to its spec; the listener fills it while adding the
    services, after this interceptor was handed to ``grpc.aio.server``.
    """

    def __init__(self, security: Any, services: Mapping[str, GrpcServiceSpec]) -> None:
        self._security = security
        self._services = services

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: Any
    ) -> Any:
        handler = await continuation(details)
        if handler is None:  # unknown method: grpc answers UNIMPLEMENTED
            return None
        method: str = details.method
        service, name = split_method(method)
        spec = self._services.get(service)
        if spec is None:
            return refusing(handler, method, UNREGISTERED)
        if name in spec.public_methods or method in spec.public_methods:
            return observed(handler, method, None)
        if spec.permission is None:
            return refusing(handler, method, FORBIDDEN)
        headers = MetadataHeaders(details.invocation_metadata)
        try:
            identity = self._security.authenticate(spec.listener, headers, method)
        except FlambeauError as exc:
            return refusing(handler, method, exc.message)
        permission = spec.permission
        if not self._security.authorize(identity, permission, None):
            return refusing(handler, method, self._refusal_message(identity, spec.listener))

        async def check_model(request: Any, context: grpc.aio.ServicerContext) -> None:
            model = getattr(request, "model_name", None)
            if (
                isinstance(model, str)
                and model
                and not self._security.authorize(identity, permission, model)
            ):
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    self._refusal_message(identity, spec.listener),
                )

        return observed(handler, method, check_model)

    def _refusal_message(self, identity: Identity | None, listener: str) -> str:
        # The same refusal REST gives (flambeau.web.Security.refusal), as gRPC text.
        return str(self._security.refusal(identity, listener).message)


def refusing(handler: Any, method: str, message: str) -> Any:
    """A handler of ``handler``'s kind that ends every call with PERMISSION_DENIED (logged)."""

    async def deny(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, message)

    async def deny_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, message)
        yield None  # pragma: no cover - makes this an async generator, as grpc.aio expects

    return observed(
        _same_kind(handler, deny_stream if handler.response_streaming else deny), method, None
    )


def observed(handler: Any, method: str, check: Check | None) -> Any:
    """``handler`` with per-request checks (``check``) and one access-log line per call."""
    behavior = _behavior(handler)

    async def checked(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        async for request in requests:
            if check is not None:
                await check(request, context)
            yield request

    async def before(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if handler.request_streaming:
            return checked(request, context)
        if check is not None:
            await check(request, context)
        return request

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        started, finished = time.monotonic(), False
        try:
            result = behavior(await before(request, context), context)
            response = await result if inspect.isawaitable(result) else result
            finished = True
            return response
        finally:
            _log_access(context, method, started, finished)

    async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        started, finished = time.monotonic(), False
        try:
            result = behavior(await before(request, context), context)
            if inspect.isasyncgen(result):
                async with contextlib.aclosing(result) as responses:
                    async for response in responses:
                        yield response
            elif inspect.isawaitable(result):  # a handler writing with context.write()
                await result
            else:
                for response in result:
                    yield response
            finished = True
        finally:
            _log_access(context, method, started, finished)

    return _same_kind(handler, stream if handler.response_streaming else unary)


def _behavior(handler: Any) -> Callable[..., Any]:
    if handler.request_streaming:
        return handler.stream_stream if handler.response_streaming else handler.stream_unary
    return handler.unary_stream if handler.response_streaming else handler.unary_unary


def _same_kind(handler: Any, behavior: Callable[..., Any]) -> Any:
    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(bool(handler.request_streaming), bool(handler.response_streaming))]
    return make(
        behavior,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _log_access(context: Any, method: str, started: float, finished: bool) -> None:
    if not access_log.isEnabledFor(logging.INFO):
        return
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        status = code.name
    elif code in (None, 0):
        # No code set yet: the behavior returned (OK) or was interrupted (client gone, error).
        status = "OK" if finished else "CANCELLED"
    else:
        status = str(code)
    access_log.info(
        '%s "gRPC %s" %s %d',
        context.peer(),
        method,
        status,
        int(1000 * (time.monotonic() - started)),
    )
