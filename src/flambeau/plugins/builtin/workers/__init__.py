"""The builtin ``process`` and ``thread`` worker backends (see :mod:`.plugin` for the hook).

This package module holds what both backends and the worker process share: the errors the
core sees from a worker, and how the model service is found. Importing it is cheap (no torch,
no asyncio), because the worker process imports it first thing.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Protocol

from flambeau.api import BatchResult, FlambeauError, MetricRecord, WorkerRequest

__all__ = [
    "DEFAULT_SERVICE_FACTORY",
    "SERVICE_FACTORY_ENV",
    "WORKER_DIED",
    "ModelServiceLike",
    "WorkerDiedError",
    "WorkerStartError",
    "died_status",
    "resolve_service_factory",
]

WORKER_DIED = "Worker died."  # TorchServe's literal; clients and tests match on it

# ``module:attr[.attr]`` of the callable that loads a model; the real path is the handler SDK.
DEFAULT_SERVICE_FACTORY = "flambeau.handler.service:ModelService.load"
# Test seam: names another factory with the same signature (``spec, *, send_intermediate``).
SERVICE_FACTORY_ENV = "FLAMBEAU_WORKER_SERVICE_FACTORY"


class WorkerDiedError(FlambeauError):
    """The worker went away while a batch was in flight, or is no longer usable.

    ``status`` is 507 when the process was killed by SIGKILL (exit code 137, usually the OOM
    killer), else 500; the message is TorchServe's ``Worker died.``.
    """

    error_type = "InternalServerException"

    def __init__(self, status: int = 500, *, exit_code: int | None = None) -> None:
        super().__init__(WORKER_DIED, status=status)
        self.exit_code = exit_code


class WorkerStartError(FlambeauError):
    """A worker that could not load its model: load error, crash, or startup timeout.

    ``status`` is the handler's load status (500, or 507 for out of memory); ``log_tail``
    holds the last lines the worker wrote, for the management API's error and the logs.
    """

    error_type = "InternalServerException"

    def __init__(self, message: str, *, status: int = 500, log_tail: str = "") -> None:
        super().__init__(message, status=status)
        self.log_tail = log_tail


def died_status(exit_code: int | None) -> int:
    """507 when the exit says SIGKILL (137 from a shell, -9 from Popen), else 500."""
    return 507 if exit_code in (137, -9) else 500


class ModelServiceLike(Protocol):
    """What a worker needs from a loaded model: the surface of the handler SDK's ModelService."""

    def predict(self, requests: list[WorkerRequest]) -> BatchResult: ...

    def drain_metrics(self) -> list[MetricRecord]: ...

    def close(self) -> None: ...


ServiceFactory = Callable[..., ModelServiceLike]


def resolve_service_factory(target: str | None = None) -> ServiceFactory:
    """Import the ``module:attr[.attr]`` callable that loads a model service.

    ``target`` None means :data:`DEFAULT_SERVICE_FACTORY`, the handler SDK's
    ``ModelService.load``; tests name a stand-in with the same signature.
    """
    target = target or DEFAULT_SERVICE_FACTORY
    module_name, sep, attr_path = target.partition(":")
    if not sep or not module_name or not attr_path:
        raise ValueError(f"service factory {target!r} is not of the form 'module:attr'")
    obj: Any = importlib.import_module(module_name)
    for attr in attr_path.split("."):
        obj = getattr(obj, attr)
    if not callable(obj):
        raise TypeError(f"service factory {target!r} is not callable")
    factory: ServiceFactory = obj
    return factory
