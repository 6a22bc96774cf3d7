"""TorchServe's REST management API: register, scale, describe, list, set-default, unregister.

Parameters, JSON shapes, status codes and messages follow TorchServe 0.12 (the wire spec, §3,
and docs/api.md); registering and unregistering answer 405 unless ``enable_model_api`` is on.
The handlers only translate HTTP into calls on the core's model manager, which gRPC shares.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from flambeau.api import (
    BadRequestError,
    MethodNotAllowedError,
    RegisterParams,
    RouteSpec,
    hookimpl,
)
from flambeau.errors import METHOD_NOT_ALLOWED
from flambeau.web import ApiHandler

MODEL = r"(?P<model_name>[^/]+)"
VERSION = r"(?P<version>[^/]+)"


def parse_int_param(value: Any) -> int | None:
    """An integer parameter; like TorchServe, anything that is not an integer is "not given"."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    try:
        return int(str(value).strip())
    except ValueError:
        return None


def parse_bool_param(value: Any, default: bool) -> bool:
    """Java's ``Boolean.parseBoolean``: only ``true`` (any case) is true; absent is ``default``."""
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() == "true"


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = value if isinstance(value, str) else json.dumps(value)
    return text or None


def register_params(values: Mapping[str, Any]) -> RegisterParams:
    """Register parameters from the query string or a JSON body (same snake_case keys)."""
    if values.get("url") is None:
        raise BadRequestError("Parameter url is required.")
    url = values["url"] if isinstance(values["url"], str) else str(values["url"])
    return RegisterParams(
        url=url,
        model_name=_text(values.get("model_name")),
        handler=_text(values.get("handler")),
        runtime=_text(values.get("runtime")),
        batch_size=parse_int_param(values.get("batch_size")),
        max_batch_delay=parse_int_param(values.get("max_batch_delay")),
        initial_workers=parse_int_param(values.get("initial_workers")),
        synchronous=parse_bool_param(values.get("synchronous"), True),
        response_timeout=parse_int_param(values.get("response_timeout")),
        startup_timeout=parse_int_param(values.get("startup_timeout")),
    )


def model_api_enabled(server: Any) -> bool:
    return bool(server.config.get_bool("enable_model_api"))


class ManagementHandler(ApiHandler):
    """Shared helpers: the first value of each query parameter."""

    def query(self, name: str) -> str | None:
        values = self.request.query_arguments.get(name)
        return values[0].decode("utf-8", "replace") if values else None

    def require_model_api(self) -> None:
        if not model_api_enabled(self.server):
            raise MethodNotAllowedError(METHOD_NOT_ALLOWED)


class ModelsHandler(ManagementHandler):
    """``GET /models`` (list) and ``POST /models`` (register)."""

    async def get(self) -> None:
        limit = parse_int_param(self.query("limit"))
        token = parse_int_param(self.query("next_page_token"))
        self.send_json(self.server.models.list_models(limit, token))

    async def post(self) -> None:
        self.require_model_api()
        status, message = await self.server.models.register(register_params(self._values()))
        self.send_status(message, status)

    def _values(self) -> Mapping[str, Any]:
        media_type = self.request.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if media_type == "application/json" and self.body.strip():
            try:
                data = json.loads(self.body)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise BadRequestError("Invalid JSON body") from None
            if not isinstance(data, dict):
                raise BadRequestError("Invalid JSON body")
            return data
        return {name: self.query(name) for name in self.request.query_arguments}


class ModelHandler(ManagementHandler):
    """``/models/{m}[/{v}]``: describe, scale, unregister; ``/all`` describes every version."""

    async def get(self, model_name: str, version: str | None = None) -> None:
        models = self.server.models
        if version == "all":
            self.send_json([models.describe(mv) for mv in models.versions_of(model_name)])
            return
        mv = models.get(model_name, version)
        described = models.describe(mv)
        if parse_bool_param(self.query("customized"), False):
            metadata = await models.describe_customized(mv)
            if metadata is not None:
                described["customizedMetadata"] = metadata
        self.send_json([described])

    async def put(self, model_name: str, version: str | None = None) -> None:
        version = version or self.query("model_version") or None
        min_workers = parse_int_param(self.query("min_worker"))
        min_workers = 1 if min_workers is None else min_workers
        max_workers = parse_int_param(self.query("max_worker"))
        max_workers = min_workers if max_workers is None else max_workers
        synchronous = parse_bool_param(self.query("synchronous"), False)
        status, message = await self.server.models.scale(
            model_name, version, min_workers, max_workers, synchronous
        )
        self.send_status(message, status)

    async def delete(self, model_name: str, version: str | None = None) -> None:
        self.require_model_api()
        version = version or self.query("model_version") or None
        self.send_status(await self.server.models.unregister(model_name, version))

    async def options(self, model_name: str, version: str | None = None) -> None:
        from flambeau.plugins.builtin.openapi import model_management_document

        mv = self.server.models.get(model_name, None if version == "all" else version)
        self.send_json(model_management_document(mv.name))


class SetDefaultHandler(ManagementHandler):
    """``PUT /models/{m}/{v}/set-default``."""

    async def put(self, model_name: str, version: str) -> None:
        self.send_status(self.server.models.set_default(model_name, version))


class KServeReadinessHandler(ManagementHandler):
    """``GET /v1/models/{m}``: ``{"name", "ready"}`` (KServe v1, on the management listener)."""

    async def get(self, model_name: str) -> None:
        mv = self.server.models.get(model_name)
        self.send_json({"name": mv.name, "ready": mv.pool.ready_count() > 0})


class ManagementDescriptionHandler(ApiHandler):
    """Any method on ``/api-description``: the management API's OpenAPI document."""

    async def options(self) -> None:
        from flambeau.plugins.builtin.openapi import management_document

        self.send_json(management_document(self.server))

    get = post = put = delete = patch = options


class ManagementRootHandler(ManagementDescriptionHandler):
    """``/``: only OPTIONS is defined (TorchServe answers 405 to anything else)."""

    SUPPORTED_METHODS = ("OPTIONS",)


@hookimpl
def flambeau_routes(config: Any) -> list[RouteSpec]:
    def route(pattern: str, handler: type[ApiHandler]) -> RouteSpec:
        return RouteSpec(pattern, handler, listener="management", permission="management")

    return [
        route(r"/models/?", ModelsHandler),
        route(rf"/models/{MODEL}/{VERSION}/set-default/?", SetDefaultHandler),
        route(rf"/models/{MODEL}(?:/{VERSION})?/?", ModelHandler),
        route(rf"/v1/models/{MODEL}/?", KServeReadinessHandler),
        RouteSpec(
            r"/api-description/?", ManagementDescriptionHandler, listener="management", public=True
        ),
        RouteSpec(r"/", ManagementRootHandler, listener="management", public=True),
    ]
