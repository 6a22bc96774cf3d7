"""ManagementAPIsService against a real server: the same documents and messages as REST, proto3
zero values as "not given", and TorchServe's status codes for every kind of failure."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from flambeau.testing.fixtures import ServerProcess

S = grpc.StatusCode
TIMEOUT = 60
StartServer = Callable[..., ServerProcess]


@pytest.fixture(scope="module")
def server(start_server: StartServer) -> ServerProcess:
    return start_server(
        args=["--disable-token-auth", "--enable-model-api"],
        archives=[("1.0", "echo"), ("2.0", "echo2")],
    )


@pytest.fixture(scope="module")
def mgmt(server: ServerProcess, stubs: SimpleNamespace) -> Iterator[Any]:
    with grpc.insecure_channel(server.addresses["grpc_management"]) as channel:
        yield stubs.management_pb2_grpc.ManagementAPIsServiceStub(channel)


def call(mgmt: Any, stubs: SimpleNamespace, rpc: str, **fields: Any) -> str:
    message = getattr(stubs.management_pb2, f"{rpc}Request")(**fields)
    return str(getattr(mgmt, rpc)(message, timeout=TIMEOUT).msg)


def refused(mgmt: Any, stubs: SimpleNamespace, rpc: str, **fields: Any) -> tuple[Any, str]:
    with pytest.raises(grpc.RpcError) as info:
        call(mgmt, stubs, rpc, **fields)
    return info.value.code(), info.value.details()


def rest_json(server: ServerProcess, path: str) -> tuple[Any, str]:
    response = server.request("GET", "management", path)
    assert response.status == 200
    return response.json(), response.body.decode()


def test_model_lifecycle_mirrors_rest(
    server: ServerProcess, mgmt: Any, stubs: SimpleNamespace
) -> None:
    # proto3 defaults: no workers asked for, synchronous false.
    assert call(mgmt, stubs, "RegisterModel", url="echo.mar") == (
        'Model "echo" Version: 1.0 registered with 0 initial workers. '
        "Use scale workers API to add workers for the model."
    )
    assert call(mgmt, stubs, "RegisterModel", url="echo2.mar").startswith(
        'Model "echo" Version: 2.0 registered'
    )
    assert call(mgmt, stubs, "RegisterModel", url="echo.mar", model_name="other").startswith(
        'Model "other" Version: 1.0 registered'
    )
    assert refused(mgmt, stubs, "RegisterModel", url="echo.mar") == (
        S.ABORTED,
        "Model version 1.0 is already registered for model echo",
    )

    listing = call(mgmt, stubs, "ListModels")
    rest, rest_text = rest_json(server, "/models")
    assert json.loads(listing) == rest
    assert listing + "\n" == rest_text  # the same pretty document, without REST's newline
    assert [m["modelName"] for m in rest["models"]] == ["echo", "other"]
    assert json.loads(call(mgmt, stubs, "ListModels", limit=1)) == {
        "nextPageToken": "1",
        "models": [{"modelName": "echo", "modelUrl": "echo.mar"}],
    }
    second = json.loads(call(mgmt, stubs, "ListModels", limit=1, next_page_token=1))
    assert second["models"] == [{"modelName": "other", "modelUrl": "echo.mar"}]

    described = call(mgmt, stubs, "DescribeModel", model_name="echo")
    rest, rest_text = rest_json(server, "/models/echo")
    assert json.loads(described) == rest
    assert described + "\n" == rest_text
    assert [d["modelVersion"] for d in json.loads(described)] == ["1.0"]
    every = json.loads(call(mgmt, stubs, "DescribeModel", model_name="echo", model_version="all"))
    assert sorted(d["modelVersion"] for d in every) == ["1.0", "2.0"]

    assert call(mgmt, stubs, "SetDefault", model_name="echo", model_version="2.0") == (
        'Default version successfully updated for model "echo" to "2.0"'
    )
    urls = {
        m["modelName"]: m["modelUrl"] for m in json.loads(call(mgmt, stubs, "ListModels"))["models"]
    }
    assert urls == {"echo": "echo2.mar", "other": "echo.mar"}
    assert refused(mgmt, stubs, "UnregisterModel", model_name="echo") == (
        S.PERMISSION_DENIED,
        "Cannot remove default version for model echo",
    )

    # min_worker 0 means "not given" (1); synchronous waits for the worker.
    assert call(
        mgmt, stubs, "ScaleWorker", model_name="echo", model_version="1.0", synchronous=True
    ) == ("Workers scaled to 1 for model: echo, version: 1.0")
    one = json.loads(call(mgmt, stubs, "DescribeModel", model_name="echo", model_version="1.0"))
    assert (one[0]["minWorkers"], len(one[0]["workers"])) == (1, 1)
    custom = call(
        mgmt, stubs, "DescribeModel", model_name="echo", model_version="1.0", customized=True
    )
    assert json.loads(custom)[0]["customizedMetadata"]["describe"] == "True"
    assert refused(mgmt, stubs, "DescribeModel", model_name="echo", customized=True) == (
        S.INTERNAL,
        'Model "echo" has no worker to serve describe request. '
        "Please use scale workers API to add workers.",
    )
    assert (
        call(mgmt, stubs, "ScaleWorker", model_name="other", min_worker=0, max_worker=0)
        == "Processing worker updates..."
    )

    assert call(mgmt, stubs, "UnregisterModel", model_name="echo", model_version="1.0") == (
        'Model "echo" unregistered'
    )
    assert call(mgmt, stubs, "UnregisterModel", model_name="echo") == 'Model "echo" unregistered'
    assert call(mgmt, stubs, "UnregisterModel", model_name="other") == 'Model "other" unregistered'
    assert json.loads(call(mgmt, stubs, "ListModels")) == {"models": []}


@pytest.mark.parametrize(
    ("rpc", "fields", "code", "message"),
    [
        ("RegisterModel", {}, S.INVALID_ARGUMENT, "Parameter url is required."),
        (
            "RegisterModel",
            {"url": "echo.mar", "runtime": "java"},
            S.INVALID_ARGUMENT,
            "Invalid RuntimeType value: java",
        ),
        ("RegisterModel", {"url": "nowhere.mar"}, S.NOT_FOUND, "Model not found at: nowhere.mar"),
        ("DescribeModel", {"model_name": "nope"}, S.NOT_FOUND, "Model not found: nope"),
        ("DescribeModel", {}, S.INVALID_ARGUMENT, "Parameter model_name is required."),
        ("ScaleWorker", {"model_name": "nope"}, S.NOT_FOUND, "Model not found: nope"),
        ("ScaleWorker", {}, S.INVALID_ARGUMENT, "Parameter model_name is required."),
        (
            "SetDefault",
            {"model_name": "nope", "model_version": "1.0"},
            S.NOT_FOUND,
            "Model not found: nope",
        ),
        ("UnregisterModel", {"model_name": "nope"}, S.NOT_FOUND, "Model not found: nope"),
        ("UnregisterModel", {}, S.INVALID_ARGUMENT, "Parameter model_name is required."),
    ],
)
def test_errors_map_to_torchserve_status_codes(
    mgmt: Any,
    stubs: SimpleNamespace,
    rpc: str,
    fields: dict[str, Any],
    code: grpc.StatusCode,
    message: str,
) -> None:
    assert refused(mgmt, stubs, rpc, **fields) == (code, message)


def test_version_and_worker_errors(mgmt: Any, stubs: SimpleNamespace) -> None:
    call(mgmt, stubs, "RegisterModel", url="echo.mar", model_name="versions")
    try:
        assert refused(mgmt, stubs, "SetDefault", model_name="versions", model_version="9.9") == (
            S.NOT_FOUND,
            "Model version 9.9 does not exist for model versions",
        )
        assert refused(
            mgmt, stubs, "DescribeModel", model_name="versions", model_version="9.9"
        ) == (S.NOT_FOUND, "Model version: 9.9 does not exist for model: versions")
        assert refused(
            mgmt, stubs, "ScaleWorker", model_name="versions", min_worker=3, max_worker=2
        ) == (S.INVALID_ARGUMENT, "max_worker cannot be less than min_worker.")
    finally:
        call(mgmt, stubs, "UnregisterModel", model_name="versions")
