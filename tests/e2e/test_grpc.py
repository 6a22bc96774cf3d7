"""The demo model served over TorchServe's gRPC APIs end to end: a real server process with
token auth on, real worker processes, and client stubs compiled from our .proto files."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from google.protobuf import empty_pb2

from flambeau.plugins.builtin.grpc.stubs import load_stubs
from flambeau.testing.fixtures import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 120
ROWS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    workdir = tmp_path_factory.mktemp("grpc-e2e")
    store = workdir / "model_store"
    subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo" / "build.py"), str(store)],
        check=True,
        capture_output=True,
    )
    process = ServerProcess(
        workdir,
        model_store=store,
        args=[*plugin_flags(), "--enable-model-api"],
    )
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    stubs = load_stubs(tmp_path_factory.mktemp("stubs"))
    with (
        grpc.insecure_channel(server.addresses["grpc_inference"]) as inference,
        grpc.insecure_channel(server.addresses["grpc_management"]) as management,
    ):
        keys = server.keys
        yield SimpleNamespace(
            pb=stubs,
            inference=stubs.inference_pb2_grpc.InferenceAPIsServiceStub(inference),
            management=stubs.management_pb2_grpc.ManagementAPIsServiceStub(management),
            inference_key=(("authorization", f"Bearer {keys['inference']['key']}"),),
            management_key=(("authorization", f"Bearer {keys['management']['key']}"),),
        )


def plugin_flags() -> list[str]:
    """``-p`` for the plugins this test needs that no entry point registers yet."""
    registered = {ep.value.split(":")[0] for ep in metadata.entry_points(group="flambeau")}
    modules = ("flambeau.plugins.builtin.workers.plugin", "flambeau.plugins.builtin.grpc.plugin")
    return [flag for module in modules if module not in registered for flag in ("-p", module)]


def manage(client: Any, rpc: str, **fields: Any) -> str:
    request = getattr(client.pb.management_pb2, f"{rpc}Request")(**fields)
    call = getattr(client.management, rpc)
    return str(call(request, metadata=client.management_key, timeout=TIMEOUT).msg)


def rest(server: ServerProcess, method: str, listener: str, path: str, **kwargs: Any) -> Any:
    kind = "management" if listener == "management" else "inference"
    headers = {"Authorization": f"Bearer {server.keys[kind]['key']}", **kwargs.pop("headers", {})}
    response = server.request(method, listener, path, headers=headers, **kwargs)
    assert response.status == 200, response.body
    return response.json()


def test_demo_model_lifecycle_over_grpc(server: ServerProcess, client: Any) -> None:
    assert manage(client, "RegisterModel", url="demo.mar", synchronous=True) == (
        'Model "demo" Version: 1.0 registered with 1 initial workers'
    )
    assert json.loads(manage(client, "ListModels")) == {
        "models": [{"modelName": "demo", "modelUrl": "demo.mar"}]
    }
    described = json.loads(manage(client, "DescribeModel", model_name="demo"))
    assert described == rest(server, "GET", "management", "/models/demo")
    assert (described[0]["batchSize"], len(described[0]["workers"])) == (8, 1)

    request = client.pb.inference_pb2.PredictionsRequest(
        model_name="demo", input={"data": json.dumps(ROWS).encode()}
    )
    reply = client.inference.Predictions(request, metadata=client.inference_key, timeout=TIMEOUT)
    predicted = json.loads(reply.prediction)
    assert len(predicted) == len(ROWS)
    assert {row["label"] for row in predicted} <= {"setosa", "versicolor", "virginica"}
    assert all(abs(sum(row["probabilities"]) - 1) < 1e-5 for row in predicted)
    assert predicted == rest(
        server,
        "POST",
        "inference",
        "/predictions/demo",
        body=json.dumps(ROWS),
        headers={"Content-Type": "application/json"},
    )

    assert manage(client, "ScaleWorker", model_name="demo", min_worker=2, synchronous=True) == (
        "Workers scaled to 2 for model: demo"
    )
    described = json.loads(manage(client, "DescribeModel", model_name="demo"))
    assert len(described[0]["workers"]) == 2
    assert manage(client, "SetDefault", model_name="demo", model_version="1.0") == (
        'Default version successfully updated for model "demo" to "1.0"'
    )
    health = client.inference.Ping(
        empty_pb2.Empty(), metadata=client.inference_key, timeout=TIMEOUT
    ).health
    assert json.loads(health) == {"status": "Healthy"}

    assert manage(client, "UnregisterModel", model_name="demo") == 'Model "demo" unregistered'
    assert json.loads(manage(client, "ListModels")) == {"models": []}
    with pytest.raises(grpc.RpcError) as info:
        client.inference.Predictions(request, metadata=client.inference_key, timeout=TIMEOUT)
    assert (info.value.code(), info.value.details()) == (
        grpc.StatusCode.INTERNAL,
        "Model not found: demo",
    )


def test_calls_without_the_right_key_are_refused(client: Any) -> None:
    listing = client.pb.management_pb2.ListModelsRequest()
    for key in (None, client.inference_key):
        with pytest.raises(grpc.RpcError) as info:
            client.management.ListModels(listing, metadata=key, timeout=TIMEOUT)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert info.value.details().startswith("Token Authorization failed.")
    with pytest.raises(grpc.RpcError) as info:
        client.inference.Ping(empty_pb2.Empty(), metadata=client.management_key, timeout=TIMEOUT)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
