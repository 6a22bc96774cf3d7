"""The ``process`` worker: a fresh interpreter that loads one model and serves batches.

Started by :class:`~.process.ProcessWorker` as ``python -m
flambeau.plugins.builtin.workers.worker_main --socket PATH --worker-id ID``; it connects to the
server's Unix socket, answers the load frame, then answers inference frames until the socket
closes or a shutdown frame arrives. It uses plain blocking sockets: it has one thing to do.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import struct
import sys
import threading
from collections.abc import Sequence
from typing import Any

from flambeau.api import BatchResult, ModelLoadSpec, WorkerRequest, WorkerResponse
from flambeau.plugins.builtin.workers import (
    SERVICE_FACTORY_ENV,
    ModelServiceLike,
    resolve_service_factory,
)
from flambeau.plugins.builtin.workers.frames import (
    DEFAULT_MAX_FRAME_BYTES,
    KIND_INFER,
    KIND_SHUTDOWN,
    PREFIX_SIZE,
    FrameError,
    check_frame_length,
    decode_inference,
    decode_load,
    encode_result,
    frame_kind,
)

__all__ = ["WorkerConnection", "main", "serve"]

_PREFIX = struct.Struct(">I")
# Frames up to this size are read through the reusable receive buffer.
_RECV_BUFFER = 1 << 16

log = logging.getLogger("flambeau.worker")

EXIT_OK = 0
EXIT_LOAD_FAILED = 1
EXIT_PROTOCOL = 2


class WorkerConnection:
    """Blocking frame I/O on the worker's end of the socket.

    Reads go through one reusable receive buffer, so a small frame (and often the next one
    with it) costs a single ``recv_into`` rather than one ``recv`` for the length prefix and
    another for the body. A frame too large for the buffer is received in pieces as its bytes
    arrive: a length prefix alone never allocates the frame.

    Sends are locked because a handler may stream partial responses from a thread of its own
    while the main thread is about to send the final result.
    """

    def __init__(
        self, sock: socket.socket, max_frame_bytes: int, *, buffer_bytes: int = _RECV_BUFFER
    ) -> None:
        self._sock = sock
        self._max = max_frame_bytes
        self._send_lock = threading.Lock()
        self._buf = bytearray(max(buffer_bytes, PREFIX_SIZE))
        self._view = memoryview(self._buf)
        # The received but unread bytes are self._buf[self._start:self._end].
        self._start = 0
        self._end = 0

    def read_frame(self) -> bytes | None:
        """The next frame body (kind byte first), or None at a clean end of stream."""
        if self._end - self._start < PREFIX_SIZE and not self._fill(PREFIX_SIZE, eof_ok=True):
            return None
        (length,) = _PREFIX.unpack_from(self._buf, self._start)
        check_frame_length(length, self._max)
        size = PREFIX_SIZE + length
        if size > len(self._buf):
            return self._read_large(length)
        if self._end - self._start < size:
            self._fill(size, eof_ok=False)
        body_start = self._start + PREFIX_SIZE
        self._start += size
        return self._view[body_start : self._start].tobytes()

    def send(self, frame: bytes) -> None:
        with self._send_lock:
            self._sock.sendall(frame)

    def close(self) -> None:
        self._sock.close()

    def _fill(self, n: int, *, eof_ok: bool) -> bool:
        """Receive until ``n`` (at most the buffer size) unread bytes are buffered.

        False at end of stream when nothing is buffered and ``eof_ok``; a stream that ends
        anywhere else raises :class:`FrameError`.
        """
        if self._start == self._end:
            self._start = self._end = 0
        elif self._start + n > len(self._buf):  # move the unread tail to the front for room
            unread = self._end - self._start
            self._buf[:unread] = self._buf[self._start : self._end]
            self._start, self._end = 0, unread
        while self._end - self._start < n:
            got = self._sock.recv_into(self._view[self._end :])
            if not got:
                buffered = self._end - self._start
                if buffered == 0 and eof_ok:
                    return False
                raise FrameError(f"connection closed after {buffered} of {n} bytes")
            self._end += got
        return True

    def _read_large(self, length: int) -> bytes:
        # What is buffered already belongs to this frame: the buffer is smaller than it.
        chunks = [self._view[self._start + PREFIX_SIZE : self._end].tobytes()]
        got = len(chunks[0])
        self._start = self._end = 0
        while got < length:
            # recv(n) allocates n bytes before it knows how many arrived: keep n small.
            chunk = self._sock.recv(min(length - got, len(self._buf)))
            if not chunk:
                raise FrameError(f"connection closed after {got} of {length} bytes")
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)


def _apply_worker_settings(spec: ModelLoadSpec, worker: dict[str, Any]) -> None:
    # Affinity first: torch sizes its thread pools from the CPUs it may run on.
    cpus = [int(c) for c in worker.get("cpu_affinity") or ()]
    if cpus and hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, cpus)
        except OSError as exc:
            log.warning("could not set CPU affinity %s: %s", cpus, exc)
    # The torch thread count (spec.intra_op_threads) is ModelService.load's to apply.


def _limit_response_sizes(result: BatchResult, max_bytes: int) -> BatchResult:
    """Replace bodies over ``max_response_size`` by an error, before they cross the socket."""
    if max_bytes <= 0:
        return result
    for i, resp in enumerate(result.responses):
        if len(resp.body) > max_bytes:
            message = (
                f"Response of {len(resp.body)} bytes exceeds max_response_size ({max_bytes} bytes)"
            )
            log.error("request %s: %s", resp.request_id, message)
            result.responses[i] = WorkerResponse(
                resp.request_id, 500, "Internal Server Error", "text/plain", {}, message.encode()
            )
    return result


def _error_result(code: int, message: str) -> BatchResult:
    return BatchResult(code=code, message=message)


def _failure_status(exc: BaseException) -> int:
    # The SDK's HandlerLoadError carries its own status (500, or 507 for OOM).
    status = getattr(exc, "status", None)
    if isinstance(status, int) and status >= 400:
        return status
    return 507 if isinstance(exc, MemoryError) else 500


def _predict(service: ModelServiceLike, batch: list[WorkerRequest], max_bytes: int) -> bytes:
    try:
        result = service.predict(batch)
        # Metrics emitted during predict; drained after it so they ride on the final frame.
        extra = service.drain_metrics()
        if extra:
            result.metrics = [*result.metrics, *extra]
        return encode_result(_limit_response_sizes(result, max_bytes))
    except Exception as exc:  # the SDK should not raise; never die for it
        log.exception("predict failed")
        return encode_result(_error_result(_failure_status(exc), f"Prediction failed: {exc}"))


def serve(conn: WorkerConnection, factory_target: str | None) -> int:
    """Load the model named by the first frame, then answer frames; returns the exit code."""
    body = conn.read_frame()
    if body is None:
        log.error("server closed the connection before the load frame")
        return EXIT_PROTOCOL
    try:
        spec, worker = decode_load(body)
    except FrameError as exc:
        conn.send(encode_result(_error_result(500, f"Invalid load frame: {exc}")))
        return EXIT_PROTOCOL
    max_response = int(worker.get("max_response_bytes") or 0)

    def send_intermediate(partial: BatchResult) -> None:
        conn.send(encode_result(_limit_response_sizes(partial, max_response), partial=True))

    try:
        _apply_worker_settings(spec, worker)
        factory = resolve_service_factory(factory_target)
        service = factory(spec, send_intermediate=send_intermediate)
    except BaseException as exc:  # a load failure is answered, whatever it is
        log.exception("loading model %s failed", spec.model_name)
        status = _failure_status(exc)
        message = str(exc) or type(exc).__name__
        conn.send(encode_result(_error_result(status, message)))
        return EXIT_LOAD_FAILED
    conn.send(encode_result(_error_result(200, f"loaded model {spec.model_name}")))
    log.info("worker %s loaded model %s", worker.get("worker_id", ""), spec.model_name)

    try:
        while True:
            try:
                body = conn.read_frame()
            except FrameError as exc:
                # The stream cannot be resynchronised after a bad prefix or a short read.
                log.error("unreadable frame, exiting: %s", exc)
                return EXIT_PROTOCOL
            if body is None:
                return EXIT_OK
            try:
                kind = frame_kind(body)
                if kind == KIND_SHUTDOWN:
                    return EXIT_OK
                if kind != KIND_INFER:
                    raise FrameError(f"unexpected frame kind 0x{kind:02x} after load")
                batch = decode_inference(body)
            except FrameError as exc:
                # The frame was delimited correctly, so the stream is intact: answer and go on.
                log.error("bad inference frame: %s", exc)
                conn.send(encode_result(_error_result(500, f"Invalid inference frame: {exc}")))
                continue
            conn.send(_predict(service, batch, max_response))
    finally:
        try:
            service.close()
        except Exception:  # exiting anyway; the traceback goes to model_log
            log.exception("closing the model service failed")


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="flambeau-worker", description=__doc__)
    parser.add_argument("--socket", required=True, help="Unix socket path the server listens on")
    parser.add_argument("--worker-id", default="", help="name used in log lines")
    parser.add_argument(
        "--service-factory",
        default=os.environ.get(SERVICE_FACTORY_ENV) or None,
        help="module:attr of the model service loader (default: the handler SDK)",
    )
    parser.add_argument(
        "--max-frame-bytes",
        type=int,
        default=DEFAULT_MAX_FRAME_BYTES,
        help="largest frame accepted from the server",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    # As TorchServe's worker: log records go to stdout, which the server copies to model_log.
    logging.basicConfig(stream=sys.stdout, format="%(message)s", level=logging.INFO)
    print(f"[PID]{os.getpid()}", flush=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(args.socket)
    except OSError as exc:
        log.error("cannot connect to %s: %s", args.socket, exc)
        return EXIT_PROTOCOL
    conn = WorkerConnection(sock, args.max_frame_bytes)
    print(f"Torch worker started. worker_id={args.worker_id}", flush=True)
    try:
        return serve(conn, args.service_factory)
    except (FrameError, OSError) as exc:
        log.error("worker %s stopping: %s", args.worker_id, exc)
        return EXIT_PROTOCOL
    finally:
        conn.close()


if __name__ == "__main__":
    sys.exit(main())
