"""The worker process's serving loop, run in a thread over a socket pair (no subprocess)."""

from __future__ import annotations

import json
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from flambeau.api import BatchResult, ModelLoadSpec, RequestInput, WorkerRequest
from flambeau.plugins.builtin.workers.frames import (
    KIND_INFER,
    KIND_RESULT,
    decode_result,
    encode_inference,
    encode_load,
    encode_shutdown,
)
from flambeau.plugins.builtin.workers.worker_main import (
    EXIT_LOAD_FAILED,
    EXIT_OK,
    EXIT_PROTOCOL,
    WorkerConnection,
    serve,
)

STUB = "workers_stub_service:StubService.load"
pytestmark = pytest.mark.timeout(30)


class Server:
    """The server's end of the pair, with ``serve`` running on a thread at the other end."""

    def __init__(self, factory: str) -> None:
        self.sock, worker_sock = socket.socketpair()
        self.exit_code: int | None = None

        def target() -> None:
            self.exit_code = serve(WorkerConnection(worker_sock, 1 << 20), factory)
            worker_sock.close()

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()

    def send(self, frame: bytes) -> None:
        self.sock.sendall(frame)

    def receive(self) -> tuple[int, BatchResult]:
        (length,) = struct.unpack(">I", self._exactly(4))
        body = self._exactly(length)
        return body[0], decode_result(body)

    def finish(self) -> int | None:
        self.thread.join(10)
        assert not self.thread.is_alive()
        self.sock.close()
        return self.exit_code

    def _exactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            assert chunk, "worker closed the connection"
            data += chunk
        return data


@pytest.fixture
def load_frame(make_model: Callable[..., Path]) -> Callable[..., bytes]:
    def make(source: str | None = None) -> bytes:
        model = make_model() if source is None else make_model(source)
        spec = ModelLoadSpec("echo", "1.0", str(model), "handler:handle")
        return encode_load(spec, {"worker_id": "w1", "max_response_bytes": 100})

    return make


def double(rid: str, *values: int) -> WorkerRequest:
    body = json.dumps({"op": "double", "x": list(values)}).encode()
    return WorkerRequest(rid, {}, [RequestInput("body", body, "application/json")])


def test_serve_answers_load_batches_and_shutdown(load_frame: Callable[..., bytes]) -> None:
    server = Server(STUB)
    server.send(load_frame())
    kind, loaded = server.receive()
    assert (kind, loaded.code, loaded.message) == (KIND_RESULT, 200, "loaded model echo")
    server.send(encode_inference([double("a", 1), double("b", 2, 3)]))
    kind, result = server.receive()
    assert kind == KIND_RESULT
    assert [json.loads(r.body) for r in result.responses] == [[2], [4, 6]]
    assert [m.name for m in result.metrics] == ["PredictionTime"]
    server.send(encode_shutdown())
    assert server.finish() == EXIT_OK


def test_a_malformed_but_delimited_frame_is_answered_and_serving_goes_on(
    load_frame: Callable[..., bytes],
) -> None:
    server = Server(STUB)
    server.send(load_frame())
    assert server.receive()[1].code == 200
    # Well delimited, but the batch inside claims a 1000-byte request id.
    bad_body = bytes([KIND_INFER]) + struct.pack(">II", 1, 1000) + b"x" * 20
    server.send(struct.pack(">I", len(bad_body)) + bad_body)
    _, answer = server.receive()
    assert answer.code == 500
    assert "Invalid inference frame" in answer.message
    server.send(struct.pack(">I", 1) + b"Z")  # unknown kind
    assert server.receive()[1].code == 500
    server.send(encode_inference([double("c", 5)]))
    assert json.loads(server.receive()[1].responses[0].body) == [10]
    server.sock.shutdown(socket.SHUT_WR)  # EOF also ends the worker cleanly
    assert server.finish() == EXIT_OK


def test_oversized_responses_are_replaced_by_an_error(load_frame: Callable[..., bytes]) -> None:
    server = Server(STUB)
    server.send(load_frame())
    server.receive()
    body = json.dumps({"op": "big", "n": 500}).encode()
    server.send(encode_inference([WorkerRequest("big", {}, [RequestInput("body", body)])]))
    (response,) = server.receive()[1].responses
    assert response.status == 500
    assert b"exceeds max_response_size (100 bytes)" in response.body
    server.send(encode_shutdown())
    assert server.finish() == EXIT_OK


def test_an_unreadable_length_prefix_ends_the_worker(load_frame: Callable[..., bytes]) -> None:
    server = Server(STUB)
    server.send(load_frame())
    server.receive()
    server.send(struct.pack(">I", 1 << 30))  # over the 1 MiB cap: cannot be skipped safely
    assert server.finish() == EXIT_PROTOCOL


def test_a_load_failure_is_answered_then_the_worker_exits(
    load_frame: Callable[..., bytes],
) -> None:
    server = Server(STUB)
    server.send(load_frame("raise ImportError('no such thing')\n"))
    kind, answer = server.receive()
    assert kind == KIND_RESULT
    assert answer.code == 500
    assert "no such thing" in answer.message
    assert server.finish() == EXIT_LOAD_FAILED


def test_a_bad_service_factory_is_a_load_failure(load_frame: Callable[..., bytes]) -> None:
    server = Server("no_such_module_anywhere:load")
    server.send(load_frame())
    _, answer = server.receive()
    assert answer.code == 500
    assert "no_such_module_anywhere" in answer.message
    assert server.finish() == EXIT_LOAD_FAILED
