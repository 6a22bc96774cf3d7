"""``flambeau.workflow.WorkflowInferenceService`` on a real grpc.aio server, real grpc client.

The service is added exactly as the gRPC listener adds hook-contributed services (through the
``GrpcServiceSpec`` the plugin returns), to a grpc.aio server on the in-process server's loop.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from workflow_support import InProcessServer, write_war

from flambeau.plugins.builtin.grpc.status import grpc_code
from flambeau.plugins.builtin.workflows import plugin
from flambeau.plugins.builtin.workflows._generated import (
    flambeau_workflow_pb2 as pb2,
)
from flambeau.plugins.builtin.workflows._generated import (
    flambeau_workflow_pb2_grpc as pb2_grpc,
)

HANDLER = """
import json

def start(data, context):
    if data is None:
        return None
    return [json.loads(row["body"]) for row in data]

def check(data, context):
    if data is None:
        return None
    if any(json.loads(row["body"]).get("explode") for row in data):
        raise RuntimeError("boom")
    return [{"checked": json.loads(row["body"])} for row in data]
"""


@pytest.fixture(scope="module")
def stub(inproc: InProcessServer) -> Iterator[Any]:
    specs = plugin.flambeau_grpc_services(inproc.server.config)
    assert [(s.name, s.listener, s.permission) for s in specs] == [
        ("workflow", "inference", "inference")
    ]

    async def start() -> tuple[Any, int]:
        server = grpc.aio.server()
        for spec in specs:
            spec.add_to_server(server, inproc.server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    grpc_server, port = inproc.call(start())
    write_war(inproc.store, "g", "models:\n  retry-attempts: 0\ndag:\n  start: [check]\n", HANDLER)
    assert inproc.register("url=g.war").status == 200
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield pb2_grpc.WorkflowInferenceServiceStub(channel)
    channel.close()
    inproc.call(grpc_server.stop(None))


def test_workflow_predictions_runs_the_dag(stub: Any) -> None:
    request = pb2.WorkflowPredictionsRequest(workflow_name="g", input={"body": b'{"a": 1}'})
    response = stub.WorkflowPredictions(request, timeout=30)
    assert json.loads(response.prediction) == {"checked": {"a": 1}}
    assert response.content_type == "application/json"
    versioned = stub.WorkflowPredictions(
        pb2.WorkflowPredictionsRequest(
            workflow_name="g", workflow_version="1.0", input={"body": b"{}"}
        ),
        timeout=30,
    )
    assert json.loads(versioned.prediction) == {"checked": {}}


@pytest.mark.parametrize(
    ("request_kwargs", "code", "message"),
    [
        (
            {"workflow_name": "g", "input": {"body": b'{"explode": true}'}},
            grpc.StatusCode.INTERNAL,
            "Failed to execute workflow Node after 1 attempts : "
            "Error executing check (503 Prediction failed)",
        ),
        ({"workflow_name": "nope"}, grpc.StatusCode.NOT_FOUND, "Workflow not found: nope"),
        (
            {"workflow_name": "g", "workflow_version": "9"},
            grpc.StatusCode.NOT_FOUND,
            "Workflow version: 9 does not exist for workflow: g",
        ),
        ({}, grpc.StatusCode.INVALID_ARGUMENT, "Parameter workflow_name is required."),
    ],
)
def test_errors_become_grpc_statuses(
    stub: Any, request_kwargs: dict[str, Any], code: grpc.StatusCode, message: str
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.WorkflowPredictions(pb2.WorkflowPredictionsRequest(**request_kwargs), timeout=30)
    assert info.value.code() == code
    assert info.value.details() == message


def test_http_to_grpc_status_map_is_torchserves() -> None:
    assert [grpc_code(s).name for s in (200, 400, 404, 409, 418, 500, 503, 507, 99)] == [
        "OK",
        "INVALID_ARGUMENT",
        "NOT_FOUND",
        "ABORTED",
        "FAILED_PRECONDITION",
        "INTERNAL",
        "UNAVAILABLE",
        "INTERNAL",
        "UNKNOWN",
    ]
