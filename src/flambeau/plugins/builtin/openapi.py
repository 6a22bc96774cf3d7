"""OpenAPI 3.0.1 documents for the inference, management and metrics APIs.

Served by ``OPTIONS /`` and ``/api-description`` on each listener (TorchServe's behaviour), and
per model by ``OPTIONS /predictions/{model}``. Built from small tables so that each operation
is declared once.
"""

from __future__ import annotations

from typing import Any

from flambeau import __version__

_ERROR = {
    "description": "Error",
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["code", "type", "message"],
                "properties": {
                    "code": {"type": "integer"},
                    "type": {"type": "string"},
                    "message": {"type": "string"},
                },
            }
        }
    },
}
_STATUS = {
    "description": "OK",
    "content": {
        "application/json": {
            "schema": {"type": "object", "properties": {"status": {"type": "string"}}}
        }
    },
}


def _param(name: str, where: str, description: str, kind: str = "string", required: bool = False) -> dict[str, Any]:
    return {
        "in": where,
        "name": name,
        "description": description,
        "required": required or where == "path",
        "schema": {"type": kind},
    }


def _op(operation_id: str, summary: str, params: list[dict[str, Any]], *, body: bool = False) -> dict[str, Any]:
    op: dict[str, Any] = {
        "operationId": operation_id,
        "description": summary,
        "parameters": params,
        "responses": {"200": _STATUS, "400": _ERROR, "404": _ERROR, "500": _ERROR, "503": _ERROR},
    }
    if body:
        op["requestBody"] = {
            "description": "Input data; any media type, or form fields (multipart/urlencoded)",
            "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}},
        }
    return op


def _doc(title: str, paths: dict[str, Any]) -> dict[str, Any]:
    return {
        "openapi": "3.0.1",
        "info": {"title": title, "description": f"flambeau {title}", "version": __version__},
        "paths": paths,
    }


MODEL = _param("model_name", "path", "Name of the model")
VERSION = _param("model_version", "path", "Version of the model")


def inference_document(server: Any) -> dict[str, Any]:
    predict = _op("predictions", "Run a prediction on the default version", [MODEL], body=True)
    predict_v = _op("version_predictions", "Run a prediction on a version", [MODEL, VERSION], body=True)
    explain = _op("explanations", "Explain a prediction", [MODEL], body=True)
    return _doc(
        "TorchServe-compatible Inference API",
        {
            "/": {"options": _op("apiDescription", "This document", [])},
            "/ping": {"get": _op("ping", "Health of the server and its models", [])},
            "/predictions/{model_name}": {"post": predict},
            "/predictions/{model_name}/{model_version}": {"post": predict_v},
            "/explanations/{model_name}": {"post": explain},
        },
    )


def management_document(server: Any) -> dict[str, Any]:
    register_params = [
        _param("url", "query", "Archive name in the model store, or an allowed URL", required=True),
        _param("model_name", "query", "Override the manifest's model name"),
        _param("handler", "query", "Override the manifest's handler"),
        _param("runtime", "query", "python, python3 or LSP"),
        _param("batch_size", "query", "Server-side batch size", "integer"),
        _param("max_batch_delay", "query", "Maximum batch delay in ms", "integer"),
        _param("initial_workers", "query", "Workers to start", "integer"),
        _param("synchronous", "query", "Wait for the workers", "boolean"),
        _param("response_timeout", "query", "Seconds a worker may take per batch", "integer"),
        _param("startup_timeout", "query", "Seconds a worker may take to load", "integer"),
    ]
    scale_params = [
        MODEL,
        _param("min_worker", "query", "Minimum workers", "integer"),
        _param("max_worker", "query", "Maximum workers", "integer"),
        _param("synchronous", "query", "Wait for the workers", "boolean"),
    ]
    paging = [
        _param("limit", "query", "Page size (max 100)", "integer"),
        _param("next_page_token", "query", "Offset of the page", "integer"),
    ]
    return _doc(
        "TorchServe-compatible Management API",
        {
            "/": {"options": _op("apiDescription", "This document", [])},
            "/models": {
                "get": _op("listModels", "List registered models", paging),
                "post": _op("registerModel", "Register a model archive", register_params),
            },
            "/models/{model_name}": {
                "get": _op("describeModel", "Describe the default version", [MODEL]),
                "put": _op("setAutoScale", "Scale workers", scale_params),
                "delete": _op("unregisterModel", "Unregister the default version", [MODEL]),
            },
            "/models/{model_name}/{model_version}": {
                "get": _op("describeModelVersion", "Describe a version", [MODEL, VERSION]),
                "put": _op("setAutoScaleVersion", "Scale a version", [*scale_params, VERSION]),
                "delete": _op("unregisterModelVersion", "Unregister a version", [MODEL, VERSION]),
            },
            "/models/{model_name}/{model_version}/set-default": {
                "put": _op("setDefault", "Make this version the default", [MODEL, VERSION]),
            },
        },
    )


def metrics_document(server: Any) -> dict[str, Any]:
    names = _param("name[]", "query", "Only these metric families")
    return _doc(
        "TorchServe-compatible Metrics API",
        {"/metrics": {"get": _op("metrics", "Prometheus text exposition 0.0.4", [names])}},
    )


def model_inference_document(model: str, server: Any) -> dict[str, Any]:
    predict = _op(f"predictions_{model}", f"Run a prediction on {model}", [], body=True)
    return _doc(f"Inference API of {model}", {f"/predictions/{model}": {"post": predict}})


def document_for(listener: str, server: Any) -> dict[str, Any]:
    build = {
        "inference": inference_document,
        "management": management_document,
        "metrics": metrics_document,
    }[listener]
    return build(server)
