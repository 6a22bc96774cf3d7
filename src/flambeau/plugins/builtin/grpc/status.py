"""flambeau's errors in gRPC's shape: status codes, aborts and in-band ``google.rpc.Status``.

HTTP statuses map to gRPC codes by TorchServe's table (``GRPCUtils.getGRPCStatusCode``, wire
spec §7.4). A :class:`~flambeau.api.FlambeauError` becomes an aborted call whose details are the
error's message and whose trailing metadata ``flambeau-error-type`` names TorchServe's exception
type; :func:`renders_errors` does that for every rpc of a servicer, and logs (but never reveals)
anything unexpected.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import grpc
import grpc.aio

from flambeau.api import FlambeauError

log = logging.getLogger("flambeau.grpc")

ERROR_TYPE_KEY = "flambeau-error-type"
INTERNAL_MESSAGE = "Internal server error"

_BY_HTTP_STATUS = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.ABORTED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    416: grpc.StatusCode.OUT_OF_RANGE,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    501: grpc.StatusCode.UNIMPLEMENTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}

F = TypeVar("F", bound=Callable[..., Any])


def grpc_code(http_status: int) -> grpc.StatusCode:
    """TorchServe's HTTP -> gRPC status map; other 2xx OK, 4xx FAILED_PRECONDITION, 5xx INTERNAL."""
    code = _BY_HTTP_STATUS.get(http_status)
    if code is not None:
        return code
    if 200 <= http_status < 300:
        return grpc.StatusCode.OK
    if 400 <= http_status < 500:
        return grpc.StatusCode.FAILED_PRECONDITION
    if 500 <= http_status < 600:
        return grpc.StatusCode.INTERNAL
    return grpc.StatusCode.UNKNOWN


async def abort(context: grpc.aio.ServicerContext, error: FlambeauError) -> NoReturn:
    """End the call with ``error``'s mapped code and message (raises ``grpc.aio.AbortError``)."""
    await context.abort(
        grpc_code(error.status),
        error.message,
        trailing_metadata=((ERROR_TYPE_KEY, error.error_type),),
    )
    raise AssertionError("unreachable: context.abort raises")  # pragma: no cover


def rpc_status(error: FlambeauError) -> Any:
    """``error`` as an in-band ``google.rpc.Status`` with an ``ErrorInfo`` naming its type."""
    from google.protobuf import any_pb2
    from google.rpc import error_details_pb2, status_pb2

    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason=error.error_type, domain="flambeau"))
    return status_pb2.Status(
        code=grpc_code(error.status).value[0], message=error.message, details=[detail]
    )


def internal_error(method: str) -> FlambeauError:
    """What the client sees of an unexpected exception (already logged with its traceback)."""
    log.exception("gRPC %s: unexpected error", method)
    return FlambeauError(INTERNAL_MESSAGE, status=500)


def renders_errors(method: F) -> F:
    """Servicer-method decorator: FlambeauErrors abort with their mapped code, others INTERNAL.

    Works for coroutine methods (unary responses) and async-generator methods (streamed
    responses); grpc.aio picks the calling convention from the function's kind, so the wrapper
    keeps it.
    """
    name = method.__qualname__
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                # aclosing: a client that goes away closes the inner generator at once.
                async with contextlib.aclosing(method(self, request, context)) as responses:
                    async for response in responses:
                        yield response
            except FlambeauError as exc:
                await abort(context, exc)
            except grpc.aio.AbortError:
                raise
            except Exception:
                await abort(context, internal_error(name))

        return stream  # type: ignore[return-value]

    @functools.wraps(method)
    async def unary(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except FlambeauError as exc:
            await abort(context, exc)
        except grpc.aio.AbortError:
            raise
        except Exception:
            await abort(context, internal_error(name))

    return unary  # type: ignore[return-value]
