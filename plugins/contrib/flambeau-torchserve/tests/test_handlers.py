"""TorchServe handlers, packed by the real torch-model-archiver, served by ``torchserve``.

One server for the module, started as a TorchServe user would (``torchserve --start`` with
token authorization on, the default since 0.11.1) and stopped by the last test. The archives
hold handlers written for TorchServe: a BaseHandler subclass with an eager model (metrics,
label mapping, PredictionException), a module function, a streaming function and a class
that sets its own status and headers.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from flambeau.testing.fixtures import Response, http_request

from models import HANDLERS, expected_tiny, write_tiny_files
from support import (
    Ports,
    compat_command,
    compat_env,
    find_real_archiver,
    kill_leftover,
    post_chunked,
    run,
    write_config,
)

JSON_TYPE = {"Content-Type": "application/json"}


@dataclass(frozen=True, slots=True)
class Served:
    workdir: Path
    env: dict[str, str]
    ports: Ports
    start_stdout: str
    start_stderr: str

    def keys(self) -> dict[str, str]:
        data = json.loads((self.workdir / "key_file.json").read_text())
        return {kind: data[kind]["key"] for kind in ("inference", "management")}

    def request(
        self, method: str, listener: str, path: str, body: bytes | str | None = None, **headers: str
    ) -> Response:
        auth = {"Authorization": f"Bearer {self.keys()[listener]}"}
        return http_request(
            self.ports.url(listener), method, path, body=body, headers=auth | headers
        )


def _archive(real: Path, workdir: Path, *args: str) -> None:
    result = run([str(real), *args, "--export-path", "model_store"], workdir, compat_env(workdir))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    real, why = find_real_archiver()
    if real is None:
        pytest.skip(why)
    workdir = tmp_path_factory.mktemp("torchserve")
    for handler in HANDLERS.glob("*.py"):
        shutil.copy(handler, workdir)
    files = write_tiny_files(workdir)
    (workdir / "model_store").mkdir()
    _archive(
        real, workdir, "--model-name", "classifier", "--version", "1.0",
        "--model-file", "tiny_model.py", "--serialized-file", files["weights"].name,
        "--extra-files", files["labels"].name, "--handler", "classifier_handler.py",
    )  # fmt: skip
    for name, handler in (
        # The real archiver takes a function entry point only without ".py" (it appends it).
        ("function", "function_handler:predict"),
        ("streaming", "streaming_handler.py"),
        ("status", "status_handler.py"),
    ):
        _archive(real, workdir, "--model-name", name, "--version", "1.0", "--handler", handler)
    ports = Ports.pick()
    write_config(workdir / "ts.properties", ports)
    env = compat_env(workdir)
    start = run(
        [
            compat_command("torchserve"), "--start", "--ncs", "--ts-config", "ts.properties",
            "--model-store", "model_store", "--ppath", "jars",
            "--models", "tiny=classifier.mar", "function.mar", "streaming.mar", "status.mar",
        ],
        workdir,
        env,
    )  # fmt: skip
    try:
        assert start.returncode == 0, start.stdout + start.stderr
        yield Served(workdir, env, ports, start.stdout, start.stderr)
    finally:
        kill_leftover(env)


def test_start_prints_torchserves_line_and_notes_ignored_flags(served: Served) -> None:
    assert served.start_stdout == "Model server started.\n"
    assert "--plugins-path: Java plugins do not apply" in served.start_stderr


def test_class_handler_answers_what_its_model_computes(served: Served) -> None:
    values = [0.5, -1.0, 2.0, 0.25]
    response = served.request(
        "POST",
        "inference",
        "/predictions/tiny",
        json.dumps(values),
        **JSON_TYPE,
    )
    assert response.status == 200, response.body
    answer = response.json()
    expected = expected_tiny(values)
    assert set(answer) == set(expected)
    for label, probability in expected.items():
        assert answer[label] == pytest.approx(probability, rel=1e-5)


def test_prediction_exception_sets_status_and_message_and_spares_the_worker(
    served: Served,
) -> None:
    refused = served.request("POST", "inference", "/predictions/tiny", "[1, 2]", **JSON_TYPE)
    assert refused.status == 422
    assert refused.json()["message"] == "expected a JSON list of 4 numbers"
    again = served.request("POST", "inference", "/predictions/tiny", "[1, 2, 3, 4]", **JSON_TYPE)
    assert again.status == 200


def test_function_handler_gets_decoded_text_and_its_context(served: Served) -> None:
    response = served.request(
        "POST", "inference", "/predictions/function", "hello", **{"Content-Type": "text/plain"}
    )
    assert response.status == 200, response.body
    assert response.json() == {
        "model": "function",
        "echo": "HELLO",
        "batch_size": 1,
        "has_request_id": True,
    }


def test_streaming_handler_sends_one_http_chunk_per_intermediate_response(
    served: Served,
) -> None:
    status, _headers, chunks = post_chunked(
        served.ports.url("inference"),
        "/predictions/streaming",
        b"the quick brown fox",
        {"Authorization": f"Bearer {served.keys()['inference']}", "Content-Type": "text/plain"},
    )
    assert status == 200
    assert chunks == [b"the ", b"quick ", b"brown ", b"fox"]


def test_handler_sets_status_reason_headers_and_content_type(served: Served) -> None:
    response = served.request("POST", "inference", "/predictions/status", "x")
    assert (response.status, response.reason, response.body) == (201, "Created", b"created")
    assert response.header("X-Compat-Handler") == "status"
    assert response.header("Content-Type") == "text/plain"


def test_token_authorization_is_on_as_in_torchserve(served: Served) -> None:
    response = http_request(
        served.ports.url("inference"), "POST", "/predictions/function", body="x"
    )
    assert response.status == 400
    assert "Token Authorization failed" in response.json()["message"]


def test_management_api_lists_the_archives_models(served: Served) -> None:
    response = served.request("GET", "management", "/models")
    assert response.status == 200
    assert sorted(m["modelName"] for m in response.json()["models"]) == [
        "function",
        "status",
        "streaming",
        "tiny",
    ]


def test_second_start_is_refused_while_running(served: Served) -> None:
    again = run(
        [compat_command("torchserve"), "--start", "--model-store", "model_store"],
        served.workdir,
        served.env,
    )
    assert (again.returncode, again.stdout) == (
        1,
        "TorchServe is already running, please use torchserve --stop to stop TorchServe.\n",
    )


def test_stop_prints_torchserves_line_and_removes_key_and_pid_files(served: Served) -> None:
    # Last test of the module: it stops the shared server.
    pid_file = Path(served.env["TMPDIR"]) / ".model_server.pid"
    assert pid_file.exists()
    assert (served.workdir / "key_file.json").exists()
    stop = run([compat_command("torchserve"), "--stop"], served.workdir, served.env)
    assert (stop.returncode, stop.stdout) == (0, "TorchServe has stopped.\n")
    assert not (served.workdir / "key_file.json").exists()
    assert not pid_file.exists()
    with pytest.raises(ConnectionRefusedError):
        http_request(served.ports.url("inference"), "GET", "/ping", timeout=5)
