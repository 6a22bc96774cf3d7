"""TorchServe's ``ManagementAPIsService`` over the same model-manager calls as REST.

Every rpc answers a ``ManagementResponse`` whose ``msg`` is the text REST puts in ``status``,
or for describe and list the same pretty JSON document REST returns. proto3 zero values mean
"not given" (so ``synchronous`` defaults to false, and ``min_worker: 0`` means the default 1,
as in TorchServe). Registering and unregistering answer ``PERMISSION_DENIED`` "Model API
disabled" unless ``enable_model_api`` is on; other errors map by §7.4 (``NOT_FOUND``,
``INVALID_ARGUMENT``, ``INTERNAL``, ...).
"""

from __future__ import annotations

import json
from typing import Any

import grpc.aio

from flambeau.api import BadRequestError, FlambeauError, RegisterParams, ServiceUnavailableError
from flambeau.plugins.builtin.grpc._generated import management_pb2, management_pb2_grpc
from flambeau.plugins.builtin.grpc.status import renders_errors
from flambeau.plugins.builtin.management import model_api_enabled

MODEL_API_DISABLED = "Model API disabled"


def pretty(document: Any) -> str:
    """TorchServe's pretty JSON (Gson: 2-space indent, no ASCII escaping, no trailing newline)."""
    return json.dumps(document, indent=2, ensure_ascii=False)


def given(value: int) -> int | None:
    """A proto3 integer: zero or negative means "not given"."""
    return value if value > 0 else None


def register_params(request: Any) -> RegisterParams:
    """A ``RegisterModelRequest`` as the model manager's parameters."""
    if not request.url:
        raise BadRequestError("Parameter url is required.")
    return RegisterParams(
        url=request.url,
        model_name=request.model_name or None,
        handler=request.handler or None,
        runtime=request.runtime or None,
        batch_size=given(request.batch_size),
        max_batch_delay=given(request.max_batch_delay),
        initial_workers=given(request.initial_workers),
        synchronous=request.synchronous,
        response_timeout=given(request.response_timeout),
        startup_timeout=given(request.startup_timeout),
    )


def required_model_name(request: Any) -> str:
    if not request.model_name:
        raise BadRequestError("Parameter model_name is required.")
    return str(request.model_name)


class ManagementServicer:
    """The six rpcs of ``org.pytorch.serve.grpc.management.ManagementAPIsService``."""

    def __init__(self, server: Any) -> None:
        self._server = server

    def _check_model_api(self) -> None:
        if not model_api_enabled(self._server):
            raise FlambeauError(MODEL_API_DISABLED, status=403, error_type="ModelException")

    @renders_errors
    async def DescribeModel(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        name = required_model_name(request)
        version = request.model_version or None
        models = self._server.models
        if version == "all":
            described = [models.describe(mv) for mv in models.versions_of(name)]
        else:
            mv = models.get(name, version)
            entry = models.describe(mv)
            if request.customized:
                metadata = await self._customized(mv)
                if metadata is not None:
                    entry["customizedMetadata"] = metadata
            described = [entry]
        return management_pb2.ManagementResponse(msg=pretty(described))

    async def _customized(self, mv: Any) -> Any:
        try:
            return await self._server.models.describe_customized(mv)
        except ServiceUnavailableError as exc:
            # TorchServe's gRPC answers INTERNAL when no worker can describe the model.
            raise FlambeauError(exc.message, status=500, error_type=exc.error_type) from None

    @renders_errors
    async def ListModels(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        listing = self._server.models.list_models(
            request.limit or None, request.next_page_token or None
        )
        return management_pb2.ManagementResponse(msg=pretty(listing))

    @renders_errors
    async def RegisterModel(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self._check_model_api()
        _, message = await self._server.models.register(register_params(request))
        return management_pb2.ManagementResponse(msg=message)

    @renders_errors
    async def ScaleWorker(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        name = required_model_name(request)
        min_workers = given(request.min_worker) or 1
        max_workers = given(request.max_worker) or min_workers
        _, message = await self._server.models.scale(
            name, request.model_version or None, min_workers, max_workers, request.synchronous
        )
        return management_pb2.ManagementResponse(msg=message)

    @renders_errors
    async def SetDefault(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        name = required_model_name(request)
        message = self._server.models.set_default(name, request.model_version)
        return management_pb2.ManagementResponse(msg=message)

    @renders_errors
    async def UnregisterModel(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self._check_model_api()
        name = required_model_name(request)
        message = await self._server.models.unregister(name, request.model_version or None)
        return management_pb2.ManagementResponse(msg=message)


def add_management_service(grpc_server: Any, server: Any) -> None:
    """The ``GrpcServiceSpec.add_to_server`` of the management service."""
    management_pb2_grpc.add_ManagementAPIsServiceServicer_to_server(
        ManagementServicer(server), grpc_server
    )
