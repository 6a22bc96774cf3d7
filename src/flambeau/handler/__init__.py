"""The worker-side handler SDK: Context, BaseHandler, handler_factory, ModelService.

Everything here runs inside a worker (a spawned process or a thread of the server) and is
compatible with TorchServe handlers. Names are imported lazily, so ``import flambeau.handler``
does not import torch. See docs/handlers.md.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flambeau.handler.base_handler import BaseHandler
    from flambeau.handler.context import Context, RequestProcessor
    from flambeau.handler.errors import HandlerLoadError, HandlerOutOfMemoryError
    from flambeau.handler.factory import FactoryHandler, handler_factory
    from flambeau.handler.metrics import Dimension, MetricsCache, MetricTypes
    from flambeau.handler.service import ModelService
    from flambeau.handler.utils import PredictionException, send_intermediate_predict_response

__all__ = [
    "BaseHandler",
    "Context",
    "Dimension",
    "FactoryHandler",
    "HandlerLoadError",
    "HandlerOutOfMemoryError",
    "MetricTypes",
    "MetricsCache",
    "ModelService",
    "PredictionException",
    "RequestProcessor",
    "handler_factory",
    "send_intermediate_predict_response",
]

_EXPORTS = {
    "BaseHandler": "flambeau.handler.base_handler",
    "Context": "flambeau.handler.context",
    "RequestProcessor": "flambeau.handler.context",
    "HandlerLoadError": "flambeau.handler.errors",
    "HandlerOutOfMemoryError": "flambeau.handler.errors",
    "FactoryHandler": "flambeau.handler.factory",
    "handler_factory": "flambeau.handler.factory",
    "Dimension": "flambeau.handler.metrics",
    "MetricsCache": "flambeau.handler.metrics",
    "MetricTypes": "flambeau.handler.metrics",
    "ModelService": "flambeau.handler.service",
    "PredictionException": "flambeau.handler.utils",
    "send_intermediate_predict_response": "flambeau.handler.utils",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(__all__)
