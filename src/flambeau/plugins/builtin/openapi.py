"""OpenAPI 3.0.1 documents for the inference, management and metrics APIs.

Served by ``OPTIONS /`` and ``/api-description`` on each listener (TorchServe's behaviour), and
per model by ``OPTIONS /predictions/{model}`` and ``OPTIONS /models/{model}``. Built from small
tables so that each operation is declared once; ``info.version`` is the server's version.
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
_ANY = {"description": "The handler's answer, with its status and content type"}


def _param(
    name: str, where: str, description: str, kind: str = "string", required: bool = False
) -> dict[str, Any]:
    return {
        "in": where,
        "name": name,
        "description": description,
        "required": required or where == "path",
        "schema": {"type": kind},
    }


def _op(
    operation_id: str,
    summary: str,
    params: list[dict[str, Any]],
    *,
    body: bool = False,
    codes: tuple[str, ...] = ("400", "404", "500", "503"),
) -> dict[str, Any]:
    responses: dict[str, Any] = {"200": _ANY if body else _STATUS}
    responses.update(dict.fromkeys(codes, _ERROR))
    op: dict[str, Any] = {
        "operationId": operation_id,
        "description": summary,
        "parameters": params,
        "responses": responses,
    }
    if body:
        op["requestBody"] = {
            "description": "Input data: any media type, or form fields (multipart/urlencoded)",
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
    predict_v = _op(
        "version_predictions", "Run a prediction on a version", [MODEL, VERSION], body=True
    )
    explain = _op("explanations", "Explain a prediction", [MODEL], body=True)
    explain_v = _op("version_explanations", "Explain on a version", [MODEL, VERSION], body=True)
    invoke = _op(
        "invocations",
        "SageMaker style: the model comes from model_name (parameter or form field)",
        [_param("model_name", "query", "Name of the model")],
        body=True,
    )
    return _doc(
        "TorchServe-compatible Inference API",
        {
            "/": {"options": _op("apiDescription", "This document", [], codes=())},
            "/ping": {"get": _op("ping", "Health of the server and its models", [])},
            "/predictions/{model_name}": {"post": predict},
            "/predictions/{model_name}/{model_version}": {"post": predict_v},
            "/explanations/{model_name}": {"post": explain},
            "/explanations/{model_name}/{model_version}": {"post": explain_v},
            "/invocations": {"post": invoke},
            "/models/{model_name}/invoke": {"post": predict},
            "/{model_name}/predict": {"post": predict},
        },
    )


def _register_params() -> list[dict[str, Any]]:
    return [
        _param("url", "query", "Archive name in the model store, or an allowed URL", required=True),
        _param("model_name", "query", "Override the manifest's model name"),
        _param("handler", "query", "Override the manifest's handler"),
        _param("runtime", "query", "python, python3 or LSP"),
        _param("batch_size", "query", "Server-side batch size", "integer"),
        _param("max_batch_delay", "query", "Maximum batch delay in ms", "integer"),
        _param("initial_workers", "query", "Workers to start", "integer"),
        _param("synchronous", "query", "Wait for the workers (default true)", "boolean"),
        _param("response_timeout", "query", "Seconds a worker may take per batch", "integer"),
        _param("startup_timeout", "query", "Seconds a worker may take to load", "integer"),
    ]


def _scale_params() -> list[dict[str, Any]]:
    return [
        _param("min_worker", "query", "Minimum workers (default 1)", "integer"),
        _param("max_worker", "query", "Maximum workers (default min_worker)", "integer"),
        _param("synchronous", "query", "Wait for the workers (default false)", "boolean"),
    ]


def _model_paths() -> dict[str, Any]:
    customized = _param("customized", "query", "Ask the handler for its metadata", "boolean")
    return {
        "/models/{model_name}": {
            "get": _op("describeModel", "Describe the default version", [MODEL, customized]),
            "put": _op("setAutoScale", "Scale workers", [MODEL, *_scale_params()]),
            "delete": _op("unregisterModel", "Unregister the default version", [MODEL]),
        },
        "/models/{model_name}/{model_version}": {
            "get": _op("describeModelVersion", "Describe a version (or all)", [MODEL, VERSION]),
            "put": _op(
                "setAutoScaleVersion", "Scale a version", [MODEL, VERSION, *_scale_params()]
            ),
            "delete": _op("unregisterModelVersion", "Unregister a version", [MODEL, VERSION]),
        },
        "/models/{model_name}/{model_version}/set-default": {
            "put": _op("setDefault", "Make this version the default", [MODEL, VERSION]),
        },
    }


def management_document(server: Any) -> dict[str, Any]:
    paging = [
        _param("limit", "query", "Page size (0-100, default 100)", "integer"),
        _param("next_page_token", "query", "Offset of the page", "integer"),
    ]
    return _doc(
        "TorchServe-compatible Management API",
        {
            "/": {"options": _op("apiDescription", "This document", [], codes=())},
            "/models": {
                "get": _op("listModels", "List registered models", paging),
                "post": _op("registerModel", "Register a model archive", _register_params()),
            },
            **_model_paths(),
            "/v1/models/{model_name}": {
                "get": _op("modelReady", "KServe v1 readiness: name and ready", [MODEL]),
            },
        },
    )


def metrics_document(server: Any) -> dict[str, Any]:
    names = _param("name[]", "query", "Only these metric families")
    return _doc(
        "TorchServe-compatible Metrics API",
        {"/metrics": {"get": _op("metrics", "Prometheus text exposition 0.0.4", [names])}},
    )


def model_inference_document(model: str, server: Any = None) -> dict[str, Any]:
    predict = _op(f"predictions_{model}", f"Run a prediction on {model}", [], body=True)
    predict_v = _op(
        f"version_predictions_{model}", f"Run {model} at a version", [VERSION], body=True
    )
    return _doc(
        f"Inference API of {model}",
        {
            f"/predictions/{model}": {"post": predict},
            f"/predictions/{model}/{{model_version}}": {"post": predict_v},
        },
    )


def model_management_document(model: str) -> dict[str, Any]:
    """The management operations of one model, its name filled into the paths."""
    paths: dict[str, Any] = {}
    for path, ops in _model_paths().items():
        for op in ops.values():
            op["parameters"] = [p for p in op["parameters"] if p["name"] != "model_name"]
        paths[path.replace("{model_name}", model)] = ops
    return _doc(f"Management API of {model}", paths)


def document_for(listener: str, server: Any) -> dict[str, Any]:
    build = {
        "inference": inference_document,
        "management": management_document,
        "metrics": metrics_document,
    }[listener]
    return build(server)
