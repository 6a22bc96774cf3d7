"""The worker process's serving loop, run in a thread over a socket pair (no subprocess)."""

from __future__ import annotations

import json
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import cast

import pytest

from flambeau.api import BatchResult, ModelLoadSpec, RequestInput, WorkerRequest
from flambeau.plugins.builtin.workers.frames import (
    KIND_INFER,
    KIND_RESULT,
    FrameError,
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


class ScriptedSocket:
    """Hands the stream out in the given pieces, at most one per receive call, and records
    how many bytes each call asked for (the most it could have allocated)."""

    def __init__(self, *pieces: bytes) -> None:
        self.pieces = [piece for piece in pieces if piece]
        self.requested: list[int] = []

    def _take(self, n: int) -> bytes:
        self.requested.append(n)
        if not self.pieces:
            return b""
        piece = self.pieces.pop(0)
        if len(piece) > n:
            self.pieces.insert(0, piece[n:])
        return piece[:n]

    def recv_into(self, buffer: memoryview) -> int:
        data = self._take(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def recv(self, n: int) -> bytes:
        return self._take(n)


def connection(sock: ScriptedSocket, buffer_bytes: int = 1 << 16) -> WorkerConnection:
    return WorkerConnection(cast(socket.socket, sock), 1 << 20, buffer_bytes=buffer_bytes)


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def test_small_frames_cost_one_receive_and_may_share_it() -> None:
    sock = ScriptedSocket(frame(b"Ione") + frame(b"Itwo"))
    conn = connection(sock)
    assert [conn.read_frame(), conn.read_frame(), conn.read_frame()] == [b"Ione", b"Itwo", None]
    assert len(sock.requested) == 2  # one receive for both frames, one to see the end


def test_frames_split_anywhere_are_reassembled() -> None:
    stream = frame(b"I" + bytes(range(20))) + frame(b"S")
    for cut in range(1, len(stream)):
        conn = connection(ScriptedSocket(stream[:cut], stream[cut:]), buffer_bytes=24)
        assert [conn.read_frame(), conn.read_frame(), conn.read_frame()] == [
            b"I" + bytes(range(20)),
            b"S",
            None,
        ], cut


def test_many_frames_through_a_small_buffer_byte_by_byte() -> None:
    bodies = [b"I" + bytes([i]) * i for i in range(1, 12)]
    stream = b"".join(frame(body) for body in bodies)
    conn = connection(ScriptedSocket(*(stream[i : i + 1] for i in range(len(stream)))), 16)
    assert [conn.read_frame() for _ in bodies] == bodies
    assert conn.read_frame() is None


def test_frames_larger_than_the_buffer_are_received_in_bounded_pieces() -> None:
    big = b"I" + bytes(range(256)) * 4
    sock = ScriptedSocket(frame(big) + frame(b"Ismall"))
    conn = connection(sock, buffer_bytes=64)
    assert conn.read_frame() == big
    assert conn.read_frame() == b"Ismall"
    assert conn.read_frame() is None
    assert max(sock.requested) <= 64


def test_a_length_prefix_alone_allocates_nothing_for_the_frame() -> None:
    sock = ScriptedSocket(struct.pack(">I", 1 << 20) + b"I")
    conn = connection(sock, buffer_bytes=64)
    with pytest.raises(FrameError, match="closed after"):
        conn.read_frame()
    assert max(sock.requested) <= 64


@pytest.mark.parametrize(
    ("stream", "error"),
    [
        (b"\x00\x00", "closed after 2 of 4 bytes"),
        (frame(b"Ibody")[:-2], "closed after 7 of 9 bytes"),
        (struct.pack(">I", (1 << 20) + 1), "exceeds the 1048576-byte limit"),
        (struct.pack(">I", 0), "too small"),
    ],
    ids=["short-prefix", "short-body", "over-the-cap", "empty"],
)
def test_unreadable_streams_are_frame_errors(stream: bytes, error: str) -> None:
    with pytest.raises(FrameError, match=error):
        connection(ScriptedSocket(stream)).read_frame()


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
