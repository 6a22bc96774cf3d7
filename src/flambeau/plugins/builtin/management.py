"""TorchServe's REST management API: register, scale, describe, list, set-default, unregister.

Parameters, JSON shapes, status codes and messages follow TorchServe 0.12 (the wire spec,
§3); registering and unregistering answer 405 unless ``enable_model_api`` is on. The handlers
only translate HTTP to calls on the core's model manager, which gRPC shares.
"""

from __future__ import annotations

import json
from typing import Any

from flambeau.api import (
    BadRequestError,
    MethodNotAllowedError,
    RegisterParams,
    RequestInput,
    RouteSpec,
    ServiceUnavailableError,
    WorkerRequest,
    hookimpl,
)
from flambeau.errors import METHOD_NOT_ALLOWED
from flambeau.web import ApiHandler

MODEL = r"(?P<model_name>[^/]+)"
VERSION = r"(?P<version>[^/]+)"


def parse_int_param(value: str | None) -> int | None:
    """A query parameter as int; TorchServe treats non-integers as "not given"."""
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        return None


def parse_bool_param(value: str | None, default: bool) -> bool:
    if value is None or value == "":
        return default
    lowered = value.lower()
    if lowered in {"true", "false"}:
        return lowered == "true"
    raise BadRequestError(f"Invalid boolean value: {value}")


def model_api_enabled(server: Any) -> bool:
    return bool(server.config.get_bool("enable_model_api"))


def list_page(names: list[str], limit_raw: str | None, token_raw: str | None) -> tuple[list[str], str | None]:
    """TorchServe's pagination: ``limit`` 1..100 (else 100), ``next_page_token`` an offset."""
    limit = parse_int_param(limit_raw)
    if limit is None or limit > 100 or limit < 0:
        limit = 100
    offset = parse_int_param(token_raw) or 0
    offset = max(0, offset)
    end = offset + limit
    page = names[offset:end]
    return page, (str(end) if end <= len(names) else None)


def describe_version(mv: Any) -> dict[str, Any]:
    """The describe object, fields in TorchServe's order (absent ones omitted)."""
    s = mv.settings
    workers = mv.pool.describe()
    device_type = s.device_type or ("gpu" if any(w["gpu"] for w in workers) else "cpu")
    out: dict[str, Any] = {
        "modelName": mv.name,
        "modelVersion": mv.version,
        "modelUrl": mv.url,
        "runtime": mv.runtime,
        "minWorkers": s.min_workers,
        "maxWorkers": s.max_workers,
        "batchSize": s.batch_size,
        "maxBatchDelay": s.max_batch_delay_ms,
        "responseTimeout": s.response_timeout_s,
        "startupTimeout": s.startup_timeout_s,
        "maxRetryTimeoutInSec": s.max_retry_timeout_s,
        "clientTimeoutInMills": s.client_timeout_ms,
        "parallelType": s.parallel_type,
        "parallelLevel": s.parallel_level,
        "deviceType": device_type,
    }
    if s.device_ids:
        out["deviceIds"] = list(s.device_ids)
    out.update(
        {
            "continuousBatching": s.continuous_batching,
            "useJobTicket": s.use_job_ticket,
            "useVenv": s.use_venv,
            "stateful": s.stateful,
            "sequenceMaxIdleMSec": 0,
            "sequenceTimeoutMSec": 0,
            "maxNumSequence": 0,
            "maxSequenceJobQueueSize": 0,
            "loadedAtStartup": mv.loaded_at_startup,
            "workers": workers,
            "jobQueueStatus": mv.queue.snapshot(),
        }
    )
    return out


class ModelsHandler(ApiHandler):
    """``GET /models`` (list) and ``POST /models`` (register)."""

    async def get(self) -> None:
        models = self.server.models
        names = sorted(models.defaults)
        page, token = list_page(
            names,
            self.get_query_argument("limit", None),
            self.get_query_argument("next_page_token", None),
        )
        body: dict[str, Any] = {}
        if token is not None:
            body["nextPageToken"] = token
        body["models"] = [
            {"modelName": name, "modelUrl": models.get(name).url} for name in page
        ]
        self.send_json(body)

    async def post(self) -> None:
        if not model_api_enabled(self.server):
            raise MethodNotAllowedError(METHOD_NOT_ALLOWED)
        status, message = await self.server.models.register(self._register_params())
        self.send_status(message, status)

    def _register_params(self) -> RegisterParams:
        content_type = self.request.headers.get("Content-Type", "")
        if content_type.split(";")[0].strip().lower() == "application/json" and self.body:
            try:
                data = json.loads(self.body)
            except json.JSONDecodeError:
                raise BadRequestError("Invalid JSON body") from None
            if not isinstance(data, dict):
                raise BadRequestError("Invalid JSON body")
            values = {k: None if v is None else str(v).lower() if isinstance(v, bool) else str(v)
                      for k, v in data.items()}
        else:
            values = {k: self.get_query_argument(k) for k in self.request.query_arguments}
        url = values.get("url")
        if not url:
            raise BadRequestError("Parameter url is required.")
        return RegisterParams(
            url=url,
            model_name=values.get("model_name") or None,
            handler=values.get("handler") or None,
            runtime=values.get("runtime") or None,
            batch_size=parse_int_param(values.get("batch_size")),
            max_batch_delay=parse_int_param(values.get("max_batch_delay")),
            initial_workers=parse_int_param(values.get("initial_workers")),
            synchronous=parse_bool_param(values.get("synchronous"), True),
            response_timeout=parse_int_param(values.get("response_timeout")),
            startup_timeout=parse_int_param(values.get("startup_timeout")),
        )


class ModelHandler(ApiHandler):
    """``/models/{m}[/{v}]``: describe, scale, unregister."""

    async def get(self, model_name: str, version: str | None = None) -> None:
        models = self.server.models
        if version == "all":
            models.get(model_name)
            versions = models.models[model_name]
            self.send_json([describe_version(versions[v]) for v in versions])
            return
        mv = models.get(model_name, version)
        described = describe_version(mv)
        if self.get_query_argument("customized", "false").lower() == "true":
            described["customizedMetadata"] = await self._customized(mv)
        self.send_json([described])

    async def _customized(self, mv: Any) -> Any:
        if not mv.pool.slots:
            raise ServiceUnavailableError(
                f'Model "{mv.name}" has no worker to serve describe request. '
                "Please use scale workers API to add workers."
            )
        request = WorkerRequest(
            self.request_id, {"describe": "True"}, [RequestInput("body", b"", "")]
        )
        response = await self.server.models.predict(mv.name, mv.version, request)
        try:
            return json.loads(response.body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return response.body.decode("utf-8", "replace")

    async def put(self, model_name: str, version: str | None = None) -> None:
        version = version or self.get_query_argument("model_version", None)
        min_workers = parse_int_param(self.get_query_argument("min_worker", None))
        max_workers = parse_int_param(self.get_query_argument("max_worker", None))
        min_workers = 1 if min_workers is None else min_workers
        max_workers = min_workers if max_workers is None else max_workers
        synchronous = parse_bool_param(self.get_query_argument("synchronous", None), False)
        status, message = await self.server.models.scale(
            model_name, version, min_workers, max_workers, synchronous
        )
        self.send_status(message, status)

    async def delete(self, model_name: str, version: str | None = None) -> None:
        if not model_api_enabled(self.server):
            raise MethodNotAllowedError(METHOD_NOT_ALLOWED)
        self.send_status(await self.server.models.unregister(model_name, version))

    async def options(self, model_name: str, version: str | None = None) -> None:
        from flambeau.plugins.builtin.openapi import management_document

        self.server.models.get(model_name, version)
        self.send_json(management_document(self.server))


class SetDefaultHandler(ApiHandler):
    async def put(self, model_name: str, version: str) -> None:
        self.send_status(self.server.models.set_default(model_name, version))


class KServeReadinessHandler(ApiHandler):
    """``GET /v1/models/{m}``: ``{"name", "ready"}`` (on the management listener)."""

    async def get(self, model_name: str) -> None:
        mv = self.server.models.get(model_name)
        self.send_json({"name": mv.name, "ready": mv.pool.ready_count() > 0})


class ManagementDescriptionHandler(ApiHandler):
    async def options(self) -> None:
        from flambeau.plugins.builtin.openapi import management_document

        self.send_json(management_document(self.server))

    get = post = put = delete = patch = options


class ManagementRootHandler(ManagementDescriptionHandler):
    SUPPORTED_METHODS = ("OPTIONS",)  # type: ignore[assignment]


@hookimpl
def flambeau_routes(config: Any) -> list[RouteSpec]:
    def route(pattern: str, handler: type[ApiHandler], **kw: Any) -> RouteSpec:
        return RouteSpec(pattern, handler, listener="management", permission="management", **kw)

    return [
        route(r"/models/?", ModelsHandler),
        route(rf"/models/{MODEL}/{VERSION}/set-default/?", SetDefaultHandler),
        route(rf"/models/{MODEL}(?:/{VERSION})?/?", ModelHandler),
        route(rf"/v1/models/{MODEL}/?", KServeReadinessHandler),
        RouteSpec(r"/api-description/?", ManagementDescriptionHandler, listener="management", public=True),
        RouteSpec(r"/", ManagementRootHandler, listener="management", public=True),
    ]

