"""InferenceAPIsService against a real server with a real worker: predictions, both streaming
rpcs, error statuses, and messages larger than gRPC's 4 MB default."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from google.protobuf import empty_pb2
from google.rpc import error_details_pb2

from flambeau.testing.fixtures import ServerProcess

S = grpc.StatusCode
TIMEOUT = 60
MB = 1024 * 1024
StartServer = Callable[..., ServerProcess]


@pytest.fixture(scope="module")
def server(start_server: StartServer) -> ServerProcess:
    return start_server(
        config={"load_models": "echo.mar", "default_workers_per_model": "1"},
        args=["--disable-token-auth"],
        archives=[("1.0", "echo")],
    )


@pytest.fixture(scope="module")
def stub(server: ServerProcess, stubs: SimpleNamespace) -> Iterator[Any]:
    limit = 16 * MB  # the client's own 4 MB receive default would hide the server's limits
    options = [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]
    with grpc.insecure_channel(server.addresses["grpc_inference"], options=options) as channel:
        yield stubs.inference_pb2_grpc.InferenceAPIsServiceStub(channel)


def request(stubs: SimpleNamespace, model: str = "echo", **inputs: bytes | str) -> Any:
    data = {k: v.encode() if isinstance(v, str) else v for k, v in inputs.items()}
    return stubs.inference_pb2.PredictionsRequest(model_name=model, input=data)


def answer(response: Any) -> dict[str, Any]:
    return dict(json.loads(response.prediction))


def test_addresses_are_in_the_ready_file(server: ServerProcess) -> None:
    for name in ("grpc_inference", "grpc_management"):
        host, _, port = server.addresses[name].rpartition(":")
        assert host == "127.0.0.1"
        assert int(port) > 0
    assert server.addresses["grpc_inference"] != server.addresses["grpc_management"]


def test_ping_reports_health_as_pretty_json(stub: Any) -> None:
    health = stub.Ping(empty_pb2.Empty(), timeout=TIMEOUT).health
    assert health == '{\n  "status": "Healthy"\n}'


def test_each_map_entry_is_a_named_input(stub: Any, stubs: SimpleNamespace) -> None:
    got = answer(stub.Predictions(request(stubs, data="abc", extra=b"\x00\x01"), timeout=TIMEOUT))
    assert got["sizes"] == {"data": 3, "extra": 2}
    assert got["version"] == "1.0"
    assert got["sequence"] is None
    versioned = stubs.inference_pb2.PredictionsRequest(
        model_name="echo", model_version="1.0", input={"data": b"x"}
    )
    assert answer(stub.Predictions(versioned, timeout=TIMEOUT))["sizes"] == {"data": 1}


def test_stream_predictions_sends_one_message_per_partial(
    stub: Any, stubs: SimpleNamespace
) -> None:
    responses = stub.StreamPredictions(request(stubs, op="stream", n="3"), timeout=TIMEOUT)
    assert [r.prediction for r in responses] == [b"chunk0", b"chunk1", b"chunk2", b"done"]
    # Unary Predictions of a streaming handler answers the whole body, as REST does.
    whole = stub.Predictions(request(stubs, op="stream", n="2"), timeout=TIMEOUT)
    assert whole.prediction == b"chunk0chunk1done"


def test_stream_predictions2_keeps_sequences_and_reports_errors_in_band(
    stub: Any, stubs: SimpleNamespace
) -> None:
    pb2 = stubs.inference_pb2
    messages = [
        request(stubs, data="a"),
        request(stubs, model="missing", data="b"),
        request(stubs, data="c", ts_request_sequence_end="true"),
        request(stubs, data="d"),
        pb2.PredictionsRequest(model_name="echo", sequence_id="client-seq", input={"x": b"1"}),
        pb2.PredictionsRequest(model_name="echo", input={"op": b"stream", "n": b"2"}),
    ]
    responses = list(stub.StreamPredictions2(iter(messages), timeout=TIMEOUT))
    assert len(responses) == 8
    first, failed, ended, fresh, given, *streamed = responses
    invented = first.sequence_id
    assert invented.startswith("ts-seq-")
    assert answer(first)["sequence"] == invented
    assert answer(first)["start"] == "true"

    assert failed.sequence_id == invented
    assert failed.HasField("status")
    assert not failed.prediction
    assert (failed.status.code, failed.status.message) == (
        S.INTERNAL.value[0],
        "Model not found: missing",
    )
    info = error_details_pb2.ErrorInfo()
    assert failed.status.details[0].Unpack(info)
    assert info.reason == "ModelNotFoundException"

    assert ended.sequence_id == invented
    assert (answer(ended)["start"], answer(ended)["end"]) == (None, "true")
    assert not ended.HasField("status")
    # After the end of a sequence the next message starts a new one.
    assert fresh.sequence_id.startswith("ts-seq-")
    assert fresh.sequence_id != invented
    assert answer(fresh)["start"] == "true"
    assert given.sequence_id == "client-seq"
    assert answer(given)["start"] == "true"
    assert [(r.sequence_id, r.prediction) for r in streamed] == [
        ("client-seq", b"chunk0"),
        ("client-seq", b"chunk1"),
        ("client-seq", b"done"),
    ]


@pytest.mark.parametrize(
    ("model", "version", "inputs", "code", "message"),
    [
        ("", "", {"data": "x"}, S.INTERNAL, "Parameter model_name is required."),
        ("missing", "", {"data": "x"}, S.INTERNAL, "Model not found: missing"),
        (
            "echo",
            "9.9",
            {"data": "x"},
            S.INTERNAL,
            "Model version: 9.9 does not exist for model: echo",
        ),
        (
            "echo",
            "",
            {"op": "fail", "code": "503", "message": "Busy"},
            S.UNAVAILABLE,
            "Busy",
        ),
        ("echo", "", {"op": "fail", "code": "404", "message": "No row"}, S.NOT_FOUND, "No row"),
        (
            "echo",
            "",
            {"op": "fail", "code": "507", "message": "Out of memory"},
            S.INTERNAL,
            "Out of memory",
        ),
        ("echo", "", {"op": "fail", "code": "409", "message": "Clash"}, S.ABORTED, "Clash"),
        (
            "echo",
            "",
            {"op": "status", "code": "429", "phrase": "Slow down"},
            S.RESOURCE_EXHAUSTED,
            "Slow down",
        ),
    ],
)
def test_errors_map_to_torchserve_status_codes(
    stub: Any,
    stubs: SimpleNamespace,
    model: str,
    version: str,
    inputs: dict[str, str],
    code: grpc.StatusCode,
    message: str,
) -> None:
    data = {k: v.encode() for k, v in inputs.items()}
    bad = stubs.inference_pb2.PredictionsRequest(
        model_name=model, model_version=version, input=data
    )
    for call in (stub.Predictions, lambda r, **kw: list(stub.StreamPredictions(r, **kw))):
        with pytest.raises(grpc.RpcError) as info:
            call(bad, timeout=TIMEOUT)
        assert (info.value.code(), info.value.details()) == (code, message)
    # Nothing else was disturbed: the same worker answers the next request.
    assert answer(stub.Predictions(request(stubs, data="ok"), timeout=TIMEOUT))["sizes"] == {
        "data": 2
    }


def test_error_type_travels_in_trailing_metadata(stub: Any, stubs: SimpleNamespace) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.Predictions(request(stubs, model="missing"), timeout=TIMEOUT)
    assert ("flambeau-error-type", "ModelNotFoundException") in [
        (m.key, m.value) for m in info.value.trailing_metadata()
    ]


def test_messages_beyond_grpc_default_4mb_follow_max_request_size(
    stub: Any, stubs: SimpleNamespace
) -> None:
    big = b"\x01" * (5 * MB)  # over gRPC's 4 MB default, under max_request_size (6553500)
    assert answer(stub.Predictions(request(stubs, data=big), timeout=TIMEOUT))["sizes"] == {
        "data": 5 * MB
    }
    reply = stub.Predictions(request(stubs, op="big", n=str(5 * MB)), timeout=TIMEOUT)
    assert len(reply.prediction) == 5 * MB
    with pytest.raises(grpc.RpcError) as info:
        stub.Predictions(request(stubs, data=b"\x01" * (7 * MB)), timeout=TIMEOUT)
    assert info.value.code() == S.RESOURCE_EXHAUSTED
    assert stub.Ping(empty_pb2.Empty(), timeout=TIMEOUT).health.endswith('"Healthy"\n}')


def wait_for(path: Path) -> None:
    """Until a handler running in a worker process has written ``path``."""
    deadline = time.monotonic() + TIMEOUT
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def test_a_call_whose_client_gave_up_is_dropped_before_it_runs(
    stub: Any, stubs: SimpleNamespace, tmp_path: Path
) -> None:
    first, dropped = tmp_path / "first", tmp_path / "dropped"
    busy = stub.Predictions.future(
        request(stubs, op="sleep", seconds="1", marker=str(first)), timeout=TIMEOUT
    )
    wait_for(first)  # the only worker is busy: the next call waits in the queue
    with pytest.raises(grpc.RpcError) as info:
        stub.Predictions(request(stubs, op="sleep", seconds="0", marker=str(dropped)), timeout=0.3)
    assert info.value.code() == S.DEADLINE_EXCEEDED
    assert busy.result().prediction == b"slept"
    # The queue is FIFO: once a later call is answered, the dropped one would have run by now.
    assert answer(stub.Predictions(request(stubs, data="x"), timeout=TIMEOUT))["sizes"]
    assert not dropped.exists()


def test_sigterm_lets_calls_in_flight_finish_then_stops(
    start_server: StartServer, stubs: SimpleNamespace, tmp_path: Path
) -> None:
    server = start_server(
        config={"load_models": "echo.mar", "default_workers_per_model": "1"},
        args=["--disable-token-auth"],
        archives=[("1.0", "echo")],
    )
    address = server.addresses["grpc_inference"]
    marker = tmp_path / "running"
    with grpc.insecure_channel(address) as channel:
        stub = stubs.inference_pb2_grpc.InferenceAPIsServiceStub(channel)
        slow = request(stubs, op="sleep", seconds="1", marker=str(marker))
        in_flight = stub.Predictions.future(slow, timeout=TIMEOUT)
        wait_for(marker)  # the handler has the request: now stop the server
        assert server.stop() == 0
        assert in_flight.result().prediction == b"slept"
    with grpc.insecure_channel(address) as channel:
        stub = stubs.inference_pb2_grpc.InferenceAPIsServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Ping(empty_pb2.Empty(), timeout=5)
    assert info.value.code() == S.UNAVAILABLE


def test_a_busy_port_fails_the_start_with_a_clear_error(start_server: StartServer) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(
            RuntimeError, match=rf"grpc_inference_port: cannot listen on 127\.0\.0\.1:{port}"
        ):
            start_server(config={"grpc_inference_port": str(port)}, args=["--disable-token-auth"])
