"""The REST inference API against a real server whose models are loaded at start-up.

Class, module-function and handler_factory handlers answer with the numbers the model gives
when called directly here; the probe handler (no torch) shows what reaches a handler and what
comes back from it: inputs, headers, status, content type, streamed chunks.
"""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from flambeau.testing.fixtures import Response, ServerProcess

ROWS = [[0.1, 0.2, 0.3, 0.4], [1.0, -1.0, 0.5, 2.0], [3.0, 0.0, 0.0, -2.0], [0.0, 0.0, 0.0, 0.0]]
MAX_REQUEST = 65536
QUEUE_SIZE = 2  # probe_queue's model-config jobQueueSize


@pytest.fixture(scope="module")
def cpus(e2e: Any) -> int:
    with e2e.cpus_limited(2) as count:
        return int(count)


@pytest.fixture(scope="module")
def server(
    module_server: Any, sources: Any, e2e: Any, tmp_path_factory: Any, cpus: int
) -> ServerProcess:
    store = tmp_path_factory.mktemp("store")
    e2e.store_with(sources, store, "probe", "probe_queue", "linear_class", "linear_fn", "factory")
    # The server counts the CPUs it may use for the start-up default: pin it to `cpus`.
    with e2e.cpus_limited(cpus):
        return module_server(
            model_store=store,
            args=[
                "--models",
                "probe.mar",
                "probe_queue.mar",
                "linear_class=linear_class.mar",
                "linear_fn.mar",
                "factory.mar",
            ],
            config={"max_request_size": str(MAX_REQUEST)},
        )


def error(response: Response) -> tuple[int, str, str]:
    body = response.json()
    return response.status, body["type"], body["message"]


def test_startup_models(server: ServerProcess, e2e: Any, cpus: int) -> None:
    listed = e2e.api(server, "GET", "/models").json()["models"]
    assert [m["modelName"] for m in listed] == [
        "factory",
        "linear_class",
        "linear_fn",
        "probe",
        "probe_queue",
    ]
    probe = e2e.describe(server, "probe")
    assert probe["loadedAtStartup"] is True
    # No model-config, no default_workers_per_model, no GPU: one worker per usable CPU.
    assert probe["minWorkers"] == cpus
    assert [w["status"] for w in probe["workers"]] == ["READY"] * cpus
    assert e2e.describe(server, "linear_class")["minWorkers"] == 1  # model-config wins
    assert e2e.describe(server, "factory")["batchSize"] == 4
    assert server.request("GET", "inference", "/ping").json() == {"status": "Healthy"}


@pytest.mark.parametrize("model", ["linear_class", "linear_fn"])
def test_class_and_function_handlers_match_the_model(
    server: ServerProcess, e2e: Any, sources: Any, model: str
) -> None:
    expected = sources.expected(ROWS)
    for row, want in zip(ROWS, expected, strict=True):
        answer = e2e.predict(server, f"/predictions/{model}", row)
        assert answer.status == 200
        assert answer.json() == pytest.approx(want, abs=1e-6)


def test_handler_factory_batches_and_matches_the_model(
    server: ServerProcess, e2e: Any, sources: Any
) -> None:
    expected = sources.expected(ROWS)
    answers: dict[int, Response] = {}

    def send(index: int) -> None:
        answers[index] = e2e.predict(server, "/predictions/factory", ROWS[index])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(ROWS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index, want in enumerate(expected):
        assert answers[index].status == 200
        assert answers[index].json()["scores"] == pytest.approx(want, abs=1e-6)


def test_customized_describe_of_a_class_handler(server: ServerProcess, e2e: Any) -> None:
    described = e2e.api(server, "GET", "/models/linear_class?customized=true").json()[0]
    assert described["customizedMetadata"] == {"kind": "class handler", "outputs": 3}


def _multipart(boundary: str) -> bytes:
    return (
        f"--{boundary}\r\n"
        'Content-Disposition: form-data; name="data"; filename="a.bin"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
        "file-bytes\r\n"
        f"--{boundary}\r\n"
        'Content-Disposition: form-data; name="meta"\r\n\r\n'
        "plain field\r\n"
        f"--{boundary}--\r\n"
    ).encode()


def test_form_multipart_and_body_inputs(server: ServerProcess, e2e: Any) -> None:
    multipart = e2e.predict(
        server,
        "/predictions/probe",
        _multipart("XyZ"),
        headers={"Content-Type": "multipart/form-data; boundary=XyZ"},
    )
    assert multipart.json()["inputs"] == {
        "meta": {"value": "plain field", "content-type": ""},
        "data": {"value": "file-bytes", "content-type": "application/octet-stream"},
    }
    form = e2e.predict(
        server,
        "/predictions/probe",
        "a=1&b=two",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert form.json()["inputs"] == {
        "a": {"value": "1", "content-type": ""},
        "b": {"value": "two", "content-type": ""},
    }
    as_json = e2e.predict(server, "/predictions/probe", {"x": [1, 2]})
    assert as_json.json()["inputs"] == {
        "body": {"value": {"x": [1, 2]}, "content-type": "application/json"}
    }
    text = e2e.predict(
        server, "/predictions/probe", "hé", headers={"Content-Type": "text/plain; charset=utf-8"}
    )
    assert text.json()["inputs"] == {"body": {"value": "hé", "content-type": "text/plain"}}


def test_headers_url_path_and_explain_reach_the_handler(server: ServerProcess, e2e: Any) -> None:
    plain = e2e.predict(server, "/predictions/probe", b"x", headers={"X-Probe": "hi"}).json()
    assert (plain["x-probe"], plain["url_path"], plain["explain"]) == ("hi", "", "False")
    extra = e2e.predict(server, "/predictions/probe/1.0/extra/seg", b"x").json()
    assert extra["url_path"] == "extra/seg"
    assert e2e.predict(server, "/explanations/probe", b"x").json()["explain"] == "True"
    # The HTTP method is not checked on inference routes (TorchServe's behaviour).
    assert e2e.predict(server, "/predictions/probe", method="GET").json()["model"] == "probe"


def test_handler_sets_status_reason_headers_and_content_type(
    server: ServerProcess, e2e: Any
) -> None:
    answer = e2e.predict(
        server,
        "/predictions/probe",
        b"x",
        headers={
            "x-status": "201",
            "x-reason": "Made",
            "x-content-type": "text/x-probe",
            "x-set-header": "X-From-Handler=yes",
        },
    )
    assert (answer.status, answer.reason) == (201, "Made")
    assert answer.header("Content-Type") == "text/x-probe"
    assert answer.header("X-From-Handler") == "yes"
    assert answer.header("x-request-id")
    plain = e2e.predict(server, "/predictions/probe", b"x")
    assert (plain.status, plain.reason) == (200, "OK")
    odd = e2e.predict(server, "/predictions/probe", b"x", headers={"x-status": "599"})
    assert (odd.status, odd.reason) == (599, "Server Error (599)")


def test_request_too_large(server: ServerProcess, e2e: Any) -> None:
    answer = e2e.predict(server, "/predictions/probe", b"x" * (MAX_REQUEST + 1))
    assert answer.status == 413
    assert answer.body == b""
    assert e2e.predict(server, "/predictions/probe", b"x" * 1000).status == 200


def test_full_queue_answers_503(server: ServerProcess, e2e: Any, tmp_path: Path) -> None:
    info = e2e.describe(server, "probe_queue")
    assert info["jobQueueStatus"] == {"remainingCapacity": QUEUE_SIZE, "pendingRequests": 0}
    workers = info["minWorkers"]
    answers: list[Response] = []

    def send(headers: dict[str, str]) -> None:
        answers.append(e2e.predict(server, "/predictions/probe_queue", b"x", headers=headers))

    marks = [tmp_path / f"busy{i}" for i in range(workers)]
    busy = [
        threading.Thread(target=send, args=({"x-sleep": "1.5", "x-mark": str(mark)},))
        for mark in marks
    ]
    for thread in busy:
        thread.start()
    e2e.wait_for(lambda: all(m.exists() for m in marks), what="every worker to be busy")
    queued = [threading.Thread(target=send, args=({},)) for _ in range(QUEUE_SIZE)]
    for thread in queued:
        thread.start()
    e2e.wait_for(
        lambda: (
            e2e.describe(server, "probe_queue")["jobQueueStatus"]
            == {"remainingCapacity": 0, "pendingRequests": QUEUE_SIZE}
        ),
        what="a full queue",
    )
    assert error(e2e.predict(server, "/predictions/probe_queue", b"x")) == (
        503,
        "ServiceUnavailableException",
        'Model "probe_queue" has no worker to serve inference request. Please use scale workers '
        "API to add workers. If this is a sequence inference, please check if it is closed, or "
        "expired; or exceeds maxSequenceJobQueueSize",
    )
    for thread in busy + queued:
        thread.join()
    assert [a.status for a in answers] == [200] * (workers + QUEUE_SIZE)


def _raw_chunks(url: str, path: str, headers: dict[str, str]) -> tuple[str, list[bytes]]:
    """Send one request on a raw socket; return the response head and its chunks as sent."""
    parts = urlsplit(url)
    lines = [f"POST {path} HTTP/1.1", f"Host: {parts.netloc}", "Content-Length: 1"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\nx").encode())
        stream = sock.makefile("rb")
        head = []
        while (line := stream.readline()) not in (b"\r\n", b""):
            head.append(line.decode().strip())
        chunks = []
        while True:
            size = int(stream.readline().strip(), 16)
            data = stream.read(size)
            stream.readline()
            if size == 0:
                break
            chunks.append(data)
    return "\n".join(head), chunks


def test_streaming_sends_chunks_in_order(server: ServerProcess) -> None:
    head, chunks = _raw_chunks(server.url("inference"), "/predictions/probe", {"x-stream": "3"})
    assert head.startswith("HTTP/1.1 200")
    assert "transfer-encoding: chunked" in head.lower()
    assert "ts_stream_next: true" in head.lower()
    assert chunks == [b"chunk0;", b"chunk1;", b"chunk2;", b"done"]


def test_routing_errors_and_descriptions(server: ServerProcess, e2e: Any) -> None:
    assert error(e2e.predict(server, "/predictions/nope", b"x")) == (
        404,
        "ModelNotFoundException",
        "Model not found: nope",
    )
    assert error(e2e.predict(server, "/predictions/probe/9.9", b"x")) == (
        404,
        "ModelVersionNotFoundException",
        "Model version: 9.9 does not exist for model: probe",
    )
    assert error(e2e.predict(server, "/predictions", b"x")) == (
        404,
        "ResourceNotFoundException",
        "Requested resource is not found, please refer to API document.",
    )
    not_allowed = (
        405,
        "MethodNotAllowedException",
        "Requested method is not allowed, please refer to API document.",
    )
    # Model API control is off on this server.
    assert error(e2e.api(server, "POST", "/models?url=probe.mar&model_name=x")) == not_allowed
    assert error(e2e.api(server, "DELETE", "/models/probe")) == not_allowed
    assert error(server.request("GET", "inference", "/")) == not_allowed
    doc = server.request("OPTIONS", "inference", "/").json()
    assert "/predictions/{model_name}" in doc["paths"]
    assert server.request("GET", "inference", "/api-description").json() == doc
    model_doc = server.request("OPTIONS", "inference", "/predictions/probe").json()
    assert "/predictions/probe" in model_doc["paths"]


def test_sagemaker_and_legacy_routes(server: ServerProcess, e2e: Any) -> None:
    invoked = e2e.predict(server, "/invocations?model_name=probe", b"x").json()
    assert invoked["model"] == "probe"
    assert invoked["inputs"]["model_name"] == {"value": "probe", "content-type": ""}
    assert (
        e2e.predict(server, "/models/probe/invoke?k=v", b"x").json()["inputs"]["k"]["value"] == "v"
    )
    assert e2e.predict(server, "/probe/predict", b"x").json()["model"] == "probe"
    assert e2e.predict(server, "/probe/1.0/predict", b"x").json()["model"] == "probe"
    # Five models were loaded at start-up, so /invocations cannot guess.
    assert error(e2e.predict(server, "/invocations", b"x")) == (
        400,
        "BadRequestException",
        "Parameter model_name is required.",
    )


def test_a_bad_request_leaves_the_others_serving(server: ServerProcess, e2e: Any) -> None:
    assert error(e2e.predict(server, "/predictions/probe", b"x", headers={"x-fail": "1"})) == (
        503,
        "InternalServerException",
        "Prediction failed",
    )
    garbage = e2e.predict(
        server,
        "/predictions/linear_class",
        b"not json",
        headers={"Content-Type": "application/json"},
    )
    assert error(garbage) == (503, "InternalServerException", "Prediction failed")
    assert e2e.predict(server, "/predictions/linear_class", ROWS[0]).status == 200
    assert e2e.predict(server, "/predictions/probe", b"x").status == 200
    assert json.loads(server.request("GET", "inference", "/ping").body) == {"status": "Healthy"}


def test_models_all_loads_every_archive_and_directory(
    module_server: Any, sources: Any, e2e: Any, tmp_path: Path
) -> None:
    store = e2e.store_with(sources, tmp_path / "store", "probe", "probe_dir")
    (store / ".hidden.mar").write_bytes(b"never opened")
    (store / "notes.txt").write_text("not an archive")
    # The models= JSON of config.properties sets start-up settings per model and version.
    per_model = {"probe": {"1.0": {"minWorkers": 0, "batchSize": 5}}}
    per_model["probe_dir"] = {"1.0": {"minWorkers": 0}}
    started = module_server(
        model_store=store, config={"models": json.dumps(per_model)}, args=["--models", "all"]
    )
    listed = e2e.api(started, "GET", "/models").json()["models"]
    assert listed == [
        {"modelName": "probe", "modelUrl": "probe.mar"},
        {"modelName": "probe_dir", "modelUrl": "probe_dir"},
    ]
    probe = e2e.describe(started, "probe")
    assert (probe["minWorkers"], probe["batchSize"], probe["loadedAtStartup"]) == (0, 5, True)
    started.stop()
