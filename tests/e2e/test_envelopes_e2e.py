"""Envelopes and the Open Inference Protocol against a real server, over loopback.

One server process for the module, with three real archives: ``vertex`` and ``seldon`` (a
torch Linear(4, 3) behind a TorchServe-style BaseHandler, with ``envelope: json`` and
``envelope: seldon``) and ``tensors`` (a function handler for KServe v2 rows). Clients are
the real ones: tritonclient http and grpc, generated stubs of TorchServe's package, and plain
HTTP for the Vertex, Seldon, KServe v1 and SageMaker shapes.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import socket
import threading
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from flambeau.testing.fixtures import ServerProcess

MODELS = Path(__file__).resolve().parent / "envelope_models"
PLUGINS = (
    "flambeau.envelopes.plugin",
    "flambeau.plugins.builtin.oip.plugin",
    "flambeau.plugins.builtin.sagemaker",
    "flambeau.plugins.builtin.grpc.plugin",
)


def _linear_class() -> type[torch.nn.Module]:
    spec = importlib.util.spec_from_file_location("linear_model", MODELS / "linear_model.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    linear_class: type[torch.nn.Module] = module.Linear43
    return linear_class


def plugin_args() -> list[str]:
    provided = {ep.value.split(":")[0] for ep in entry_points(group="flambeau")}
    args = [arg for module in PLUGINS if module not in provided for arg in ("-p", module)]
    return [*args, "--disable-token-auth"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def archive(store: Path, work: Path, name: str, config: str, handler: str, **files: str) -> None:
    from flambeau.archiver.cli import archive_main

    (work / f"{name}.yaml").write_text(config)
    argv = ["--model-name", name, "-v", "1.0", "--handler", str(MODELS / handler)]
    argv += ["-c", str(work / f"{name}.yaml"), "--export-path", str(store), "-f"]
    for flag, path in files.items():
        argv += [f"--{flag.replace('_', '-')}", path]
    assert archive_main(argv) == 0


@pytest.fixture(scope="module")
def linear() -> torch.nn.Module:
    torch.manual_seed(0)
    return _linear_class()().eval()


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, linear: torch.nn.Module
) -> Iterator[ServerProcess]:
    work = tmp_path_factory.mktemp("envelopes")
    store = work / "store"
    store.mkdir()
    torch.save(linear.state_dict(), work / "linear.pt")
    one = "minWorkers: 1\nmaxWorkers: 1\n"
    for name, envelope in (("vertex", "json"), ("seldon", "seldon")):
        files = {
            "model_file": str(MODELS / "linear_model.py"),
            "serialized_file": str(work / "linear.pt"),
        }
        archive(store, work, name, f"{one}envelope: {envelope}\n", "linear_handler.py", **files)
    tensors = f"{one}batchSize: 8\nmaxBatchDelay: 150\nenvelope: json\n"
    tensors += "oip:\n  inputs: [{name: x, datatype: FP32, shape: [-1, 3]}]\n"
    archive(store, work, "tensors", tensors, "tensor_handler.py")
    process = ServerProcess(
        work,
        model_store=store,
        config={
            "ts_open_inference_protocol": "true",
            "load_models": "all",
            # Its own port: on a shared one, management's /models/{m}/{version} is routed
            # before SageMaker's /models/{m}/invoke (the core orders routes by plugin).
            "management_address": f"http://127.0.0.1:{_free_port()}",
        },
        args=plugin_args(),
        timeout=120,
    )
    yield process
    process.stop()


def post_json(server: ServerProcess, path: str, document: Any) -> tuple[int, Any]:
    response = server.request(
        "POST",
        "inference",
        path,
        body=json.dumps(document),
        headers={"Content-Type": "application/json"},
    )
    return response.status, response.json()


def expected(linear: torch.nn.Module, rows: list[list[float]]) -> list[list[float]]:
    with torch.inference_mode():
        return linear(torch.tensor(rows, dtype=torch.float32)).tolist()


def assert_close(got: Any, want: Any) -> None:
    # Same weights, same torch: only the batch composition may move the last float32 bits.
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-6)


ROWS = [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [-1.0, 0.5, 0.0, 2.0]]


# ---------------------------------------------------------------- Vertex, Seldon, KServe v1


def test_vertex_instances_get_the_model_numbers(
    server: ServerProcess, linear: torch.nn.Module
) -> None:
    status, answer = post_json(server, "/models/vertex/invoke", {"instances": ROWS})
    assert status == 200
    assert set(answer) == {"predictions"}
    assert_close(answer["predictions"], expected(linear, ROWS))
    # The model's envelope applies on TorchServe's own route too, errors included.
    status, same = post_json(server, "/predictions/vertex", {"instances": ROWS})
    assert status == 200
    assert_close(same["predictions"], expected(linear, ROWS))
    status, refused = post_json(server, "/predictions/vertex", {"not": "instances"})
    assert status == 400
    assert set(refused) == {"error"}
    # SageMaker's /invocations picks the model from the query string.
    status, again = post_json(server, "/invocations?model_name=vertex", {"instances": ROWS[:1]})
    assert status == 200
    assert_close(again["predictions"], expected(linear, ROWS[:1]))


def test_seldon_messages_get_the_model_numbers(
    server: ServerProcess, linear: torch.nn.Module
) -> None:
    want = expected(linear, ROWS)
    message = {"data": {"names": ["a", "b", "c", "d"], "ndarray": ROWS}, "meta": {"puid": "p1"}}
    status, answer = post_json(server, "/models/seldon/invoke", message)
    assert status == 200
    assert answer["data"]["names"] == ["t:0", "t:1", "t:2"]
    assert_close(answer["data"]["ndarray"], want)
    assert answer["meta"]["puid"] == "p1"
    assert answer["meta"]["requestPath"] == {"seldon": "1.0"}
    flat = [v for row in ROWS for v in row]
    tensor = {"data": {"tensor": {"shape": [3, 4], "values": flat}}}
    status, answer = post_json(server, "/models/seldon/invoke", tensor)
    assert status == 200
    assert answer["data"]["tensor"]["shape"] == [3, 3]
    assert_close(answer["data"]["tensor"]["values"], [v for row in want for v in row])


def test_kserve_v1_predict_and_explain(server: ServerProcess, linear: torch.nn.Module) -> None:
    status, answer = post_json(server, "/v1/models/vertex:predict", {"instances": ROWS[:2]})
    assert status == 200
    assert_close(answer["predictions"], expected(linear, ROWS[:2]))
    row = {"name": "x", "shape": [1], "datatype": "INT64", "data": [41]}
    status, answer = post_json(server, "/v1/models/tensors:explain", {"instances": [row]})
    assert status == 200
    assert answer["explanations"][0]["data"] == [42]


def test_handler_sees_torchserve_rows(server: ServerProcess) -> None:
    instances = [[1, 2], "text", {"b64": base64.b64encode(b"\x00\x01").decode()}]
    status, answer = post_json(server, "/models/tensors/invoke", {"instances": instances})
    assert status == 200
    # The echo handler returns each row as it got it: bare instances, not {"body": ...}.
    assert answer["predictions"] == [{"echo": [1, 2]}, {"echo": "text"}, {"echo_b64": "AAE="}]


# ---------------------------------------------------------------- Open Inference Protocol


def test_oip_rest_health_and_metadata(server: ServerProcess) -> None:
    assert server.request("GET", "inference", "/v2/health/live").json() == {"live": True}
    assert server.request("GET", "inference", "/v2/health/ready").json() == {"ready": True}
    meta = server.request("GET", "inference", "/v2").json()
    assert meta["name"] == "flambeau"
    assert "binary_tensor_data" in meta["extensions"]
    model = server.request("GET", "inference", "/v2/models/tensors/versions/1.0").json()
    assert model["versions"] == ["1.0"]
    assert model["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}]
    ready = server.request("GET", "inference", "/v2/models/tensors/ready")
    assert (ready.status, ready.json()) == (200, {"name": "tensors", "ready": True})
    missing = server.request("GET", "inference", "/v2/models/nope/ready")
    assert (missing.status, missing.json()) == (404, {"error": "Model not found: nope"})


def _triton_inputs(module: Any, binary: bool) -> list[Any]:
    floats = np.array([[0.5, -1.25, 3.0], [2.0, 0.0, -7.5]], dtype=np.float32)
    ints = np.array([1, -2, 2**40], dtype=np.int64)
    texts = np.array([b"hello", "wörld".encode()], dtype=np.object_)
    inputs = []
    for name, value, datatype in (
        ("F", floats, "FP32"),
        ("I", ints, "INT64"),
        ("S", texts, "BYTES"),
    ):
        item = module.InferInput(name, list(value.shape), datatype)
        if binary is None:
            item.set_data_from_numpy(value)
        else:
            item.set_data_from_numpy(value, binary_data=binary)
        inputs.append(item)
    return inputs


def _check_triton_result(result: Any) -> None:
    f = result.as_numpy("OUT_F")
    assert f.dtype == np.float32
    assert f.tolist() == [[1.0, -2.5, 6.0], [4.0, 0.0, -15.0]]
    i = result.as_numpy("OUT_I")
    assert i.dtype == np.int64
    assert i.tolist() == [2, -1, 2**40 + 1]
    s = result.as_numpy("OUT_S")
    assert [v.decode() if isinstance(v, bytes) else v for v in s.tolist()] == ["HELLO", "WÖRLD"]


def test_tritonclient_http_round_trips_fp32_int64_bytes(server: ServerProcess) -> None:
    import tritonclient.http as httpclient

    url = server.url("inference").removeprefix("http://")
    client = httpclient.InferenceServerClient(url=url)
    try:
        assert client.is_server_live()
        assert client.is_server_ready()
        assert client.is_model_ready("tensors")
        assert client.get_model_metadata("tensors")["name"] == "tensors"
        for binary in (True, False):
            outputs = [
                httpclient.InferRequestedOutput(n, binary_data=binary)
                for n in ("OUT_F", "OUT_I", "OUT_S")
            ]
            inputs = _triton_inputs(httpclient, binary)
            result = client.infer("tensors", inputs, outputs=outputs, request_id="t-1")
            _check_triton_result(result)
            assert result.get_response()["id"] == "t-1"
    finally:
        client.close()


def test_tritonclient_grpc_round_trips_fp32_int64_bytes(server: ServerProcess) -> None:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url=server.url("grpc_inference"))
    try:
        assert client.is_server_live()
        assert client.is_server_ready()
        assert client.is_model_ready("tensors")
        assert client.get_model_metadata("tensors").name == "tensors"
        outputs = [grpcclient.InferRequestedOutput(n) for n in ("OUT_F", "OUT_I", "OUT_S")]
        result = client.infer("tensors", _triton_inputs(grpcclient, None), outputs=outputs)
        _check_triton_result(result)
        assert result.get_response().model_version == "1.0"
    finally:
        client.close()


def test_torchserve_package_with_typed_contents(server: ServerProcess) -> None:
    import grpc

    from flambeau.plugins.builtin.oip._generated import open_inference_grpc_pb2 as pb
    from flambeau.plugins.builtin.oip._generated import open_inference_grpc_pb2_grpc as pb_grpc

    with grpc.insecure_channel(server.url("grpc_inference")) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerLive(pb.ServerLiveRequest()).live
        request = pb.ModelInferRequest(model_name="tensors", id="ts-1")
        item = request.inputs.add(name="x", datatype="FP64", shape=[2])
        item.contents.fp64_contents.extend([1.5, -2.0])
        answer = stub.ModelInfer(request, timeout=30)
    assert answer.id == "ts-1"
    assert not answer.raw_output_contents  # typed contents in, typed contents out
    (out,) = answer.outputs
    assert (out.name, out.datatype, list(out.shape)) == ("x", "FP64", [2])
    assert list(out.contents.fp64_contents) == [3.0, -4.0]


def test_every_request_of_a_batch_is_served(server: ServerProcess) -> None:
    answers: dict[int, Any] = {}

    def call(k: int) -> None:
        document = {"inputs": [{"name": "x", "shape": [1], "datatype": "INT32", "data": [k]}]}
        answers[k] = post_json(server, "/v2/models/tensors/infer", document)

    threads = [threading.Thread(target=call, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(answers) == [0, 1, 2, 3]
    for k, (status, answer) in answers.items():
        assert status == 200
        (out,) = answer["outputs"]
        assert (out["datatype"], out["data"]) == ("INT32", [k + 1])
    # With maxBatchDelay 150 ms the four requests met in one handler call at least twice.
    assert max(a["outputs"][0]["parameters"]["batch_rows"] for _, a in answers.values()) > 1


# ---------------------------------------------------------------- malformed payloads


def _worker_pid(server: ServerProcess, model: str) -> int:
    return int(
        server.request("GET", "management", f"/models/{model}").json()[0]["workers"][0]["pid"]
    )


JSON_TYPE = {"Content-Type": "application/json"}


def _v2(*inputs: dict[str, Any]) -> bytes:
    return json.dumps({"inputs": list(inputs)}).encode()


def _truncated_binary() -> tuple[bytes, dict[str, str]]:
    header = _v2(
        {"name": "x", "shape": [4], "datatype": "FP32", "parameters": {"binary_data_size": 16}}
    )
    return header + b"\x00" * 8, {"Inference-Header-Content-Length": str(len(header))}


MALFORMED = [
    # (path, body, headers, status, top-level key of the protocol's error)
    (
        "/v2/models/tensors/infer",
        _v2({"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3]}),
        {},
        400,
        "error",
    ),
    (
        "/v2/models/tensors/infer",
        _v2({"name": "x", "shape": [1], "datatype": "FP128", "data": [1]}),
        {},
        400,
        "error",
    ),
    (
        "/v2/models/tensors/infer",
        _v2({"name": "x", "shape": [1], "datatype": "INT8", "data": ["1"]}),
        {},
        400,
        "error",
    ),
    ("/v2/models/tensors/infer", *_truncated_binary(), 400, "error"),
    ("/v2/models/tensors/infer", b'{"inputs": [', {}, 400, "error"),
    ("/v2/models/nope/infer", b"{}", {}, 404, "error"),
    ("/models/vertex/invoke", b'{"rows": []}', JSON_TYPE, 400, "error"),
    ("/models/vertex/invoke", b'{"instances": [{"b64": "***"}]}', JSON_TYPE, 400, "error"),
    ("/models/vertex/invoke", b'{"instances": [[1, 2]]}', JSON_TYPE, 503, "error"),
    (
        "/models/seldon/invoke",
        b'{"data": {"tensor": {"shape": [2], "values": [1]}}}',
        JSON_TYPE,
        400,
        "status",
    ),
    ("/models/seldon/invoke", b'{"strData": "not numbers"}', JSON_TYPE, 503, "status"),
]


@pytest.mark.parametrize(("path", "body", "headers", "status", "shape"), MALFORMED)
def test_malformed_payloads_get_the_protocol_error(
    server: ServerProcess,
    path: str,
    body: bytes,
    headers: dict[str, str],
    status: int,
    shape: str,
) -> None:
    pid = _worker_pid(server, "tensors")
    response = server.request("POST", "inference", path, body=body, headers=headers)
    assert response.status == status, response.body
    assert set(response.json()) == {shape}
    if shape == "status":
        assert response.json()["status"]["status"] == "FAILURE"
    # Nothing else is disturbed: the same worker still answers.
    document = {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}]}
    assert post_json(server, "/v2/models/tensors/infer", document)[0] == 200
    assert _worker_pid(server, "tensors") == pid


def test_grpc_malformed_tensors_are_invalid_argument(server: ServerProcess) -> None:
    import grpc

    from flambeau.plugins.builtin.oip._generated import grpc_predict_v2_pb2 as pb
    from flambeau.plugins.builtin.oip._generated import grpc_predict_v2_pb2_grpc as pb_grpc

    with grpc.insecure_channel(server.url("grpc_inference")) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        truncated = pb.ModelInferRequest(model_name="tensors", raw_input_contents=[b"\x00" * 6])
        truncated.inputs.add(name="x", datatype="FP32", shape=[2])
        wrong_shape = pb.ModelInferRequest(model_name="tensors")
        wrong_shape.inputs.add(
            name="x", datatype="INT64", shape=[3]
        ).contents.int64_contents.extend([1])
        for request, code in (
            (truncated, grpc.StatusCode.INVALID_ARGUMENT),
            (wrong_shape, grpc.StatusCode.INVALID_ARGUMENT),
            (pb.ModelInferRequest(model_name="nope"), grpc.StatusCode.NOT_FOUND),
        ):
            with pytest.raises(grpc.RpcError) as caught:
                stub.ModelInfer(request, timeout=30)
            assert caught.value.code() == code
        good = pb.ModelInferRequest(
            model_name="tensors", raw_input_contents=[np.float32([1, 2]).tobytes()]
        )
        good.inputs.add(name="x", datatype="FP32", shape=[2])
        answer = stub.ModelInfer(good, timeout=30)
    assert np.frombuffer(answer.raw_output_contents[0], dtype=np.float32).tolist() == [2.0, 4.0]


# ---------------------------------------------------------------- switches


def test_oip_switch_and_unknown_envelope(tmp_path_factory: pytest.TempPathFactory) -> None:
    work = tmp_path_factory.mktemp("oip-off")
    store = work / "store"
    store.mkdir()
    off = ServerProcess(work, model_store=store, args=plugin_args())
    try:
        # As in TorchServe: without the switch, health and metadata are 404 (TorchServe's
        # shape), while /v2 inference is routed (the protocol's shape).
        assert off.request("GET", "inference", "/v2/health/live").json()["code"] == 404
        missing = off.request("POST", "inference", "/v2/models/m/infer", body=b"{}")
        assert (missing.status, missing.json()) == (404, {"error": "Model not found: m"})
    finally:
        off.stop()
    with pytest.raises(RuntimeError, match="service_envelope: unknown envelope 'nope'"):
        ServerProcess(
            work,
            model_store=store,
            config={"service_envelope": "nope"},
            args=plugin_args(),
        )
