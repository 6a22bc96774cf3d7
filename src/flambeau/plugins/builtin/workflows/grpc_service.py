"""Workflow predictions over gRPC: ``flambeau.workflow.WorkflowInferenceService``.

The service is contributed through the ``flambeau_grpc_services`` hook and runs on the gRPC
inference listener; ``WorkflowPredictions`` is ``POST /wfpredict`` as an rpc. Each entry of
the request's ``input`` map is one named input (no content type, as TorchServe's
``Predictions``); invocation metadata travel as request headers. Errors become gRPC statuses
with TorchServe's HTTP-to-gRPC map and the REST error's message. grpc is imported only when the
service is added to a server.
"""

from __future__ import annotations

import uuid
from typing import Any

from flambeau.api import FlambeauError, RequestInput, WorkerRequest

SERVICE = "flambeau.workflow.WorkflowInferenceService"


# TorchServe's GRPCUtils.getGRPCStatusCode, by HTTP status.
class WorkflowServicer:
    """The servicer; ``server`` is the flambeau server (its ``workflows`` manager)."""

    def __init__(self, server: Any) -> None:
        self.server = server

    async def WorkflowPredictions(self, request: Any, context: Any) -> Any:
        import grpc

        from flambeau.plugins.builtin.grpc.status import grpc_code
        from flambeau.plugins.builtin.workflows._generated import flambeau_workflow_pb2 as pb2

        manager = getattr(self.server, "workflows", None)
        if manager is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "Workflows are not available yet")
            return None  # abort raises; this keeps type checkers informed
        if not request.workflow_name:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "Parameter workflow_name is required."
            )
        headers = {
            key: value
            for key, value in (context.invocation_metadata() or ())
            if isinstance(value, str)
        }
        work = WorkerRequest(
            str(uuid.uuid4()),
            headers,
            [RequestInput(name, value) for name, value in request.input.items()],
        )
        try:
            response = await manager.predict(
                request.workflow_name, request.workflow_version or None, work
            )
        except FlambeauError as exc:
            await context.abort(grpc_code(exc.status), exc.message)
        return pb2.WorkflowPredictionResponse(
            prediction=response.body, content_type=response.content_type
        )


def add_to_server(grpc_server: Any, flambeau_server: Any) -> None:
    """Register the servicer on a ``grpc.aio.Server`` (the ``GrpcServiceSpec`` callback)."""
    from flambeau.plugins.builtin.workflows._generated import flambeau_workflow_pb2_grpc

    flambeau_workflow_pb2_grpc.add_WorkflowInferenceServiceServicer_to_server(
        WorkflowServicer(flambeau_server), grpc_server
    )
