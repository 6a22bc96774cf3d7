"""TorchServe's workflow REST API: ``/workflows`` (management) and ``/wfpredict`` (inference).

Parameters, JSON shapes and messages are TorchServe 0.12's (wire spec §5), widened with
versions (``/workflows/{n}/{v}``, ``/workflows/{n}/all``, ``.../set-default``,
``/wfpredict/{n}/{v}``) and scaling (``PUT /workflows/{n}``). Registering and unregistering
answer 405 unless ``enable_model_api`` is on, exactly like models: a workflow registration
fetches and runs archives, the same server-side request forgery surface.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from flambeau.api import (
    BadRequestError,
    MethodNotAllowedError,
    RouteSpec,
    ServiceUnavailableError,
    WorkerRequest,
)
from flambeau.errors import METHOD_NOT_ALLOWED
from flambeau.plugins.builtin.inference import parse_inputs
from flambeau.plugins.builtin.workflows.registry import RegisterWorkflowParams, WorkflowManager
from flambeau.web import ApiHandler

WORKFLOW = r"(?P<workflow_name>[^/]+)"
VERSION = r"(?P<version>[^/]+)"


def manager_of(server: Any) -> WorkflowManager:
    manager: WorkflowManager | None = getattr(server, "workflows", None)
    if manager is None:  # the listeners accept connections before lifespans have run
        raise ServiceUnavailableError("Workflows are not available yet")
    return manager


def int_param(value: Any) -> int | None:
    """TorchServe treats a non-integer parameter as not given."""
    if value is None or value == "" or isinstance(value, bool):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def bool_param(value: str | None, default: bool) -> bool:
    if value is None or value == "":
        return default
    lowered = value.lower()
    if lowered in {"true", "false"}:
        return lowered == "true"
    raise BadRequestError(f"Invalid boolean value: {value}")


def page(
    names: list[str], limit_raw: str | None, token_raw: str | None
) -> tuple[list[str], str | None]:
    """TorchServe's pagination: ``limit`` 0..100 (else 100), ``next_page_token`` an offset; the
    token is present when the page ends at or before the end of the list."""
    limit = int_param(limit_raw)
    if limit is None or limit > 100 or limit < 0:
        limit = 100
    offset = max(0, int_param(token_raw) or 0)
    end = offset + limit
    return names[offset:end], (str(end) if end <= len(names) else None)


def model_api_enabled(server: Any) -> bool:
    return bool(server.config.get_bool("enable_model_api"))


class WorkflowsHandler(ApiHandler):
    """``GET /workflows`` (list default versions) and ``POST /workflows`` (register)."""

    async def get(self) -> None:
        manager = manager_of(self.server)
        names, token = page(
            sorted(manager.defaults),
            self.get_query_argument("limit", None),
            self.get_query_argument("next_page_token", None),
        )
        body: dict[str, Any] = {}
        if token is not None:
            body["nextPageToken"] = token
        body["workflows"] = [
            {"workflowName": name, "workflowUrl": manager.get(name).url} for name in names
        ]
        self.send_json(body)

    async def post(self) -> None:
        if not model_api_enabled(self.server):
            raise MethodNotAllowedError(METHOD_NOT_ALLOWED)
        status, message = await manager_of(self.server).register(self._params())
        self.send_status(message, status)

    def _params(self) -> RegisterWorkflowParams:
        content_type = self.request.headers.get("Content-Type", "")
        values: dict[str, Any]
        if content_type.split(";")[0].strip().lower() == "application/json" and self.body:
            try:
                values = json.loads(self.body)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise BadRequestError("Invalid JSON body") from None
            if not isinstance(values, dict):
                raise BadRequestError("Invalid JSON body")
        else:
            values = {k: self.get_query_argument(k) for k in self.request.query_arguments}
        url = values.get("url")
        if not url or not isinstance(url, str):
            raise BadRequestError("Parameter url is required.")

        def text(key: str) -> str | None:
            value = values.get(key)
            return None if value is None or value == "" else str(value)

        return RegisterWorkflowParams(
            url=url,
            workflow_name=text("workflow_name"),
            workflow_version=text("workflow_version"),
            response_timeout=int_param(values.get("response_timeout")),
            startup_timeout=int_param(values.get("startup_timeout")),
        )


class WorkflowHandler(ApiHandler):
    """``/workflows/{n}[/{v}|/all]``: describe, scale, unregister."""

    async def get(self, workflow_name: str, version: str | None = None) -> None:
        manager = manager_of(self.server)
        if version == "all":
            manager.get(workflow_name)
            versions = manager.workflows[workflow_name].values()
            self.send_json([manager.describe(wv) for wv in versions])
            return
        self.send_json([manager.describe(manager.get(workflow_name, version))])

    async def put(self, workflow_name: str, version: str | None = None) -> None:
        version = version or self.get_query_argument("workflow_version", None)
        min_workers = int_param(self.get_query_argument("min_worker", None))
        max_workers = int_param(self.get_query_argument("max_worker", None))
        min_workers = 1 if min_workers is None else min_workers
        max_workers = min_workers if max_workers is None else max_workers
        synchronous = bool_param(self.get_query_argument("synchronous", None), False)
        status, message = await manager_of(self.server).scale(
            workflow_name, version, min_workers, max_workers, synchronous
        )
        self.send_status(message, status)

    async def delete(self, workflow_name: str, version: str | None = None) -> None:
        if not model_api_enabled(self.server):
            raise MethodNotAllowedError(METHOD_NOT_ALLOWED)
        self.send_status(await manager_of(self.server).unregister(workflow_name, version))


class WorkflowDefaultHandler(ApiHandler):
    """``PUT /workflows/{n}/{v}/set-default``."""

    async def put(self, workflow_name: str, version: str) -> None:
        self.send_status(manager_of(self.server).set_default(workflow_name, version))


class WorkflowPredictionHandler(ApiHandler):
    """``/wfpredict/{n}[/{v}]`` (any method, as TorchServe's inference routes)."""

    def setup(self, **kwargs: Any) -> None:
        super().setup(**kwargs)
        self._task: asyncio.Task[Any] | None = None

    def on_connection_close(self) -> None:
        # The client went away: stop the DAG, dropping node jobs that have not started yet.
        if self._task is not None and not self._task.done():
            self._task.cancel()

    async def post(self, workflow_name: str, version: str | None = None) -> None:
        manager = manager_of(self.server)
        request = self.request
        headers = dict(request.headers)
        headers.update({"explain": "False", "url_path": ""})
        work = WorkerRequest(
            self.request_id,
            headers,
            parse_inputs(request.headers.get("Content-Type", ""), self.body, request.headers),
        )
        self._task = asyncio.ensure_future(manager.predict(workflow_name, version or None, work))
        self.server.track_request(1)
        try:
            response = await self._task
        except asyncio.CancelledError:
            return
        finally:
            self.server.track_request(-1)
        self.set_status(response.status)
        self.set_header("Content-Type", response.content_type)
        self.finish(response.body)

    get = put = delete = patch = post


def routes() -> list[RouteSpec]:
    def management(pattern: str, handler: type[ApiHandler]) -> RouteSpec:
        return RouteSpec(pattern, handler, listener="management", permission="management")

    return [
        management(r"/workflows/?", WorkflowsHandler),
        management(rf"/workflows/{WORKFLOW}/{VERSION}/set-default/?", WorkflowDefaultHandler),
        management(rf"/workflows/{WORKFLOW}(?:/{VERSION})?/?", WorkflowHandler),
        RouteSpec(
            rf"/wfpredict/{WORKFLOW}(?:/{VERSION})?/?",
            WorkflowPredictionHandler,
            listener="inference",
            permission="inference",
        ),
    ]
