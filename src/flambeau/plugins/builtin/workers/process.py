"""The ``process`` worker backend: one spawned interpreter per worker, frames over a Unix socket.

The server listens on a socket in a private temporary directory (mode 0700), spawns
``worker_main`` with that path, accepts its one connection, then exchanges whole-batch frames
(:mod:`.frames`). The worker's stdout/stderr are pumped into ``<log_dir>/model_log.log``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import socket
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psutil

import flambeau
from flambeau.api import (
    BadRequestError,
    BatchResult,
    MetricRecord,
    PayloadTooLargeError,
    WorkerRequest,
    WorkerResponse,
    WorkerSpec,
)
from flambeau.plugins.builtin.workers import WorkerDiedError, WorkerStartError, died_status
from flambeau.plugins.builtin.workers.frames import (
    DEFAULT_MAX_FRAME_BYTES,
    KIND_PARTIAL,
    PREFIX_SIZE,
    FrameError,
    decode_result,
    encode_inference,
    encode_load,
    encode_shutdown,
)
from flambeau.plugins.builtin.workers.protocols import FrameProtocol, OutputPump

__all__ = ["WORKER_MODULE", "ProcessWorker", "ProcessWorkerBackend"]

log = logging.getLogger(__name__)

WORKER_MODULE = "flambeau.plugins.builtin.workers.worker_main"
DEFAULT_MAX_REQUEST_BYTES = 6553500  # TorchServe's max_request_size
_FRAME_SLACK = 1 << 20  # ids, headers and metrics around the bodies of a batch
_LOG_TAIL_LINES = 40
_ERROR_TAIL_LINES = 15
_SOCKET_PATH_MAX = 100  # sun_path is 108 bytes on Linux, 104 on macOS
DEFAULT_BATCHES_IN_FLIGHT = 2

_T = TypeVar("_T")


def _frame_cap(per_item: int, batch_size: int) -> int:
    if per_item <= 0:
        return DEFAULT_MAX_FRAME_BYTES
    return min(per_item * max(batch_size, 1) + _FRAME_SLACK, DEFAULT_MAX_FRAME_BYTES)


@dataclass(slots=True, eq=False)
class _Sent:
    """A frame the worker has been sent and not yet answered (answers come back in order)."""

    future: asyncio.Future[BatchResult]
    on_partial: Callable[[list[WorkerResponse]], None] | None = None
    partial_metrics: list[MetricRecord] = field(default_factory=list)


class ProcessWorker:
    """One model instance in its own OS process (implements :class:`flambeau.api.Worker`).

    Life cycle: ``start()`` once, ``infer()`` up to ``max_in_flight`` batches at a time,
    ``stop()`` (idempotent). The worker answers frames in the order it got them, so a batch sent
    while another runs waits in the socket and starts the moment the first ends: the worker
    never sleeps between batches under load, and the server writes to a worker that is
    already awake. A cancelled ``infer()`` (the pool's response timeout) leaves the worker
    unusable; the pool must then call ``stop()``, which kills the process without waiting.
    """

    def __init__(
        self,
        spec: WorkerSpec,
        *,
        log_dir: str | None = None,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        env_blacklist: str = "",
        service_factory: str | None = None,
        max_in_flight: int = DEFAULT_BATCHES_IN_FLIGHT,
    ) -> None:
        self.worker_id = spec.worker_id
        self.device = spec.device
        self.spec = spec
        self._log_dir = spec.log_dir or log_dir or "logs"
        self._env_blacklist = re.compile(env_blacklist) if env_blacklist else None
        self._service_factory = service_factory
        batch = spec.load.batch_size
        self._max_request_frame = _frame_cap(max_request_bytes, batch)
        self._max_response_frame = _frame_cap(spec.max_response_bytes, batch)
        self._log_name = f"W-{spec.worker_id}-{spec.load.model_name}_{spec.load.model_version}"

        self._state = "new"  # new | starting | ready | broken | stopping | stopped
        self._loop: asyncio.AbstractEventLoop | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._ps: psutil.Process | None = None
        self._exit_task: asyncio.Task[int] | None = None
        self._pumps: list[OutputPump] = []
        self._background: set[asyncio.Task[Any]] = set()
        self._transport: asyncio.Transport | None = None
        self.max_in_flight = max(1, max_in_flight)
        self._sent: deque[_Sent] = deque()
        self._stop_task: asyncio.Task[None] | None = None
        self._log_fd: int | None = None
        self._tail: deque[str] = deque(maxlen=_LOG_TAIL_LINES)

    # -- Worker protocol --------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def exit_code(self) -> int | None:
        return self._proc.returncode if self._proc is not None else None

    @property
    def log_tail(self) -> list[str]:
        """The last lines the worker wrote to stdout/stderr (newest last)."""
        return list(self._tail)

    def is_alive(self) -> bool:
        return self._state == "ready" and self._proc is not None and self._proc.returncode is None

    def memory_usage(self) -> int:
        """Resident set size of the worker process in bytes; 0 when it is not running."""
        if self._proc is None or self._proc.returncode is not None:
            return 0
        try:
            if self._ps is None:
                self._ps = psutil.Process(self._proc.pid)
            return int(self._ps.memory_info().rss)
        except psutil.Error:
            return 0

    async def start(self) -> None:
        """Spawn the process and load the model; raises :class:`WorkerStartError` on failure."""
        if self._state != "new":
            raise RuntimeError(f"worker {self.worker_id} was already started")
        self._state = "starting"
        loop = self._loop = asyncio.get_running_loop()
        deadline = loop.time() + self.spec.startup_timeout_s
        try:
            await self._spawn_and_load(loop, deadline)
        except BaseException:
            # Cancelled or failed: never leave a half-started process behind.
            self._stop_task = asyncio.ensure_future(self._shutdown(1.0, graceful=False))
            await asyncio.shield(self._stop_task)
            raise
        if self._state == "starting":  # not if it died in the instant after answering
            self._state = "ready"
        log.info("worker %s started (pid %s)", self._log_name, self.pid)

    async def infer(
        self,
        requests: Sequence[WorkerRequest],
        on_partial: Callable[[list[WorkerResponse]], None] | None = None,
    ) -> BatchResult:
        """Send one batch and wait for its result; streaming chunks go to ``on_partial``."""
        if len(self._sent) >= self.max_in_flight:
            raise RuntimeError(f"worker {self.worker_id} already has {len(self._sent)} in flight")
        transport = self._transport
        if not self.is_alive() or transport is None or transport.is_closing():
            raise WorkerDiedError(died_status(self.exit_code), exit_code=self.exit_code)
        try:
            frame = encode_inference(requests)
        except FrameError as exc:
            raise BadRequestError(str(exc)) from exc
        if len(frame) - PREFIX_SIZE > self._max_request_frame:
            raise PayloadTooLargeError(
                f"Batch of {len(frame)} bytes exceeds the worker frame limit "
                f"({self._max_request_frame} bytes)"
            )
        assert self._loop is not None
        sent = _Sent(self._loop.create_future(), on_partial)
        self._sent.append(sent)
        transport.write(frame)
        try:
            return await sent.future
        except asyncio.CancelledError:
            # The answer may still come and would be taken for the next batch's: retire.
            if self._state == "ready":
                self._state = "broken"
            raise
        finally:
            # Answered frames left the queue in _on_frame; a cancelled or failed one leaves here.
            if sent in self._sent:
                self._sent.remove(sent)

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Shut the worker down and reap it: shutdown frame, then SIGTERM, then SIGKILL.

        Safe to call in any state and more than once; concurrent calls share one shutdown.
        """
        if self._stop_task is None:
            graceful = self._state == "ready" and not self._sent
            self._stop_task = asyncio.ensure_future(self._shutdown(timeout_s, graceful=graceful))
        # Shielded: a caller that gives up waiting must not abandon the reaping half-way.
        await asyncio.shield(self._stop_task)

    # -- start-up ---------------------------------------------------------------------------

    async def _spawn_and_load(self, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        spec = self.spec
        tmpdir = _private_tmpdir()
        path = os.path.join(tmpdir, "worker.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(path)
            listener.listen(1)
            listener.setblocking(False)
            self._open_model_log()
            await self._spawn(loop, path)
            conn, _ = await self._before_deadline(loop.sock_accept(listener), deadline)
        finally:
            listener.close()
            # The path only served the rendezvous; removing it means nobody else can connect.
            with contextlib.suppress(OSError):
                os.unlink(path)
            with contextlib.suppress(OSError):
                os.rmdir(tmpdir)

        protocol = FrameProtocol(
            self._on_frame,
            self._on_protocol_error,
            self._on_connection_lost,
            self._max_response_frame,
        )
        transport, _ = await loop.create_unix_connection(lambda: protocol, sock=conn)
        self._transport = transport
        load = _Sent(loop.create_future())
        self._sent.append(load)
        worker = {
            "worker_id": spec.worker_id,
            "device": spec.device,
            "cpu_affinity": list(spec.cpu_affinity),
            "max_response_bytes": spec.max_response_bytes,
        }
        transport.write(encode_load(spec.load, worker))
        try:
            result = await self._before_deadline(load.future, deadline)
        finally:
            self._sent.clear()
        if result.code != 200:
            # The worker exits after a failed load; let it finish writing its traceback.
            await self._wait_exit(2.0)
            await self._drain_pumps(1.0)
            raise WorkerStartError(
                result.message or f"Failed to load model {spec.load.model_name}",
                status=result.code,
                log_tail=self._tail_text(),
            )

    async def _spawn(self, loop: asyncio.AbstractEventLoop, socket_path: str) -> None:
        # Our own pipes rather than asyncio's: Process.wait() also waits for its pipes to
        # close, which never happens while a process the handler started still holds them.
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *self._command(socket_path),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out_w,
                stderr=err_w,
                cwd=self.spec.load.model_dir,
                env=self._environment(),
                # Its own session: a Ctrl-C meant for the server does not hit the workers.
                start_new_session=True,
            )
        except OSError as exc:
            os.close(out_r)
            os.close(err_r)
            raise WorkerStartError(f"Cannot start worker {self._log_name}: {exc}") from exc
        finally:
            os.close(out_w)
            os.close(err_w)
        self._exit_task = loop.create_task(self._watch_exit(self._proc))
        for fd, name, level in ((out_r, "stdout", "INFO "), (err_r, "stderr", "WARN ")):
            prefix = f" [{level}] {self._log_name}-{name} MODEL_LOG - "
            pump = OutputPump(prefix, self._write_lines, loop.create_future())
            self._pumps.append(pump)
            await loop.connect_read_pipe(pump.itself, os.fdopen(fd, "rb", 0))

    async def _before_deadline(
        self, aw: Coroutine[Any, Any, _T] | asyncio.Future[_T], deadline: float
    ) -> _T:
        """Await ``aw`` unless the process exits or the startup deadline passes first."""
        assert self._loop is not None
        assert self._exit_task is not None
        task = asyncio.ensure_future(aw)
        remaining = max(deadline - self._loop.time(), 0.0)
        try:
            done, _ = await asyncio.wait(
                {task, self._exit_task}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            if not task.done():
                task.cancel()
        if task in done:
            error = task.exception()
            if error is None:
                return task.result()
            if not isinstance(error, WorkerDiedError):
                raise error
        status = 500
        if self._exit_task.done():
            await self._drain_pumps(1.0)
            what = f"exited with code {self._exit_task.result()}"
            status = died_status(self._exit_task.result())
        elif task in done:
            what = "broke the connection"
        else:
            what = f"did not load within {self.spec.startup_timeout_s:g} s"
        load = self.spec.load
        tail = self._tail_text()
        raise WorkerStartError(
            f"Worker {self.worker_id} for model {load.model_name} {what}."
            + (f" Last worker output:\n{tail}" if tail else ""),
            status=status,
            log_tail=tail,
        )

    def _command(self, socket_path: str) -> list[str]:
        cmd = [
            self.spec.python or sys.executable,
            "-m",
            WORKER_MODULE,
            "--socket",
            socket_path,
            "--worker-id",
            self.worker_id,
            "--max-frame-bytes",
            str(self._max_request_frame),
        ]
        if self._service_factory:
            cmd += ["--service-factory", self._service_factory]
        return cmd

    def _environment(self) -> dict[str, str]:
        blacklist = self._env_blacklist
        env = {k: v for k, v in os.environ.items() if not (blacklist and blacklist.fullmatch(k))}
        env.update(self.spec.env)
        # Unbuffered, so a worker's last words reach model_log.log even when it is killed.
        env.setdefault("PYTHONUNBUFFERED", "1")
        python = self.spec.python
        if python and os.path.realpath(python) != os.path.realpath(sys.executable):
            # Another interpreter (a per-model venv) must still find flambeau when the server
            # runs from a source checkout; an installed flambeau is on its own site path.
            root = Path(flambeau.__file__).resolve().parent.parent
            if not {"site-packages", "dist-packages"} & set(root.parts):
                parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
                env["PYTHONPATH"] = os.pathsep.join([*parts, str(root)])
        return env

    # -- frames from the worker -------------------------------------------------------------

    def _on_frame(self, body: bytes) -> None:
        try:
            result = decode_result(body)
        except FrameError as exc:
            self._on_protocol_error(exc)
            return
        sent = self._sent[0] if self._sent else None
        if sent is None or sent.future.done():
            # After a cancelled batch the late answer lands here; the worker is retired anyway.
            log.warning("worker %s: frame with no batch in flight, dropped", self._log_name)
            return
        if body[0] == KIND_PARTIAL:
            if result.metrics:
                sent.partial_metrics.extend(result.metrics)
            if result.code != 200:
                # A chunk the SDK could not build; the final result still decides the batch.
                log.warning("worker %s: streamed chunk failed: %s", self._log_name, result.message)
            callback = sent.on_partial
            if callback is not None and result.responses:
                try:
                    callback(result.responses)
                except Exception:
                    log.exception("worker %s: on_partial callback failed", self._log_name)
            return
        # decode_result accepts only partial and result frames: this is the result.
        if sent.partial_metrics:
            result.metrics = [*sent.partial_metrics, *result.metrics]
        # The answer is the oldest frame's: the next one in the queue is now running.
        self._sent.popleft()
        sent.future.set_result(result)

    def _on_protocol_error(self, exc: Exception) -> None:
        log.error("worker %s: protocol error, retiring it: %s", self._log_name, exc)
        self._retire()
        self._fail_pending(WorkerDiedError(500, exit_code=self.exit_code))
        if self._transport is not None:
            self._transport.abort()

    def _on_connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._retire()
        if any(not sent.future.done() for sent in self._sent):
            # The exit code usually follows the EOF within milliseconds; it tells 500 from 507.
            task = asyncio.ensure_future(self._fail_after_exit(1.0))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _fail_after_exit(self, grace_s: float) -> None:
        await self._wait_exit(grace_s)
        self._fail_pending(WorkerDiedError(died_status(self.exit_code), exit_code=self.exit_code))

    def _fail_pending(self, error: Exception) -> None:
        for sent in self._sent:
            if not sent.future.done():
                sent.future.set_exception(error)

    def _retire(self) -> None:
        if self._state in ("ready", "starting"):
            self._state = "broken"

    # -- process supervision ----------------------------------------------------------------

    async def _watch_exit(self, proc: asyncio.subprocess.Process) -> int:
        code = await proc.wait()
        if self._state not in ("stopping", "stopped"):
            log.warning("worker %s (pid %s) exited with code %s", self._log_name, proc.pid, code)
        self._retire()
        status = 500 if self._state in ("stopping", "stopped") else died_status(code)
        self._fail_pending(WorkerDiedError(status, exit_code=code))
        return code

    async def _wait_exit(self, timeout_s: float) -> bool:
        if self._exit_task is None:
            return True
        if not self._exit_task.done() and timeout_s > 0:
            await asyncio.wait({self._exit_task}, timeout=timeout_s)
        return self._exit_task.done()

    async def _shutdown(self, timeout_s: float, *, graceful: bool) -> None:
        self._state = "stopping"
        proc = self._proc
        descendants: list[psutil.Process] = []
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(psutil.Error):
                descendants = psutil.Process(proc.pid).children(recursive=True)
            transport = self._transport
            if transport is not None:
                if graceful:
                    transport.write(encode_shutdown())
                # Closing also tells a worker that missed the shutdown frame to exit (EOF).
                transport.close()
            exited = graceful and await self._wait_exit(timeout_s / 2)
            if not exited:
                self._signal(proc, signal.SIGTERM)
                grace = timeout_s / 2 if graceful else min(timeout_s, 1.0)
                exited = await self._wait_exit(grace)
            if not exited:
                log.warning("worker %s did not stop, killing it", self._log_name)
                self._signal(proc, signal.SIGKILL)
                if not await self._wait_exit(5.0):
                    log.error("worker %s (pid %s) survived SIGKILL", self._log_name, proc.pid)
        # Processes the handler started would outlive the worker: psutil's is_running()
        # compares start times, so a recycled pid is never hit.
        for child in descendants:
            with contextlib.suppress(psutil.Error):
                if child.is_running():
                    child.kill()
        await self._drain_pumps(1.0)
        self._fail_pending(WorkerDiedError(500, exit_code=self.exit_code))
        if self._transport is not None:
            self._transport.abort()
            self._transport = None
        if self._log_fd is not None:
            os.close(self._log_fd)
            self._log_fd = None
        self._state = "stopped"
        log.info("worker %s stopped (exit code %s)", self._log_name, self.exit_code)

    @staticmethod
    def _signal(proc: asyncio.subprocess.Process, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)

    # -- worker output ----------------------------------------------------------------------

    def _open_model_log(self) -> None:
        try:
            os.makedirs(self._log_dir, exist_ok=True)
            path = os.path.join(self._log_dir, "model_log.log")
            # O_APPEND: every worker writes whole lines with one write(); no shared handle.
            self._log_fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            log.warning("cannot open model log in %s: %s", self._log_dir, exc)

    def _write_lines(self, prefix: str, lines: list[bytes]) -> None:
        now = time.time()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now))
        stamp += f",{int(now * 1000) % 1000:03d}"
        out = []
        for raw in lines:
            text = raw.decode("utf-8", "replace").rstrip("\r")
            self._tail.append(text)
            out.append(f"{stamp}{prefix}{text}\n")
        if self._log_fd is not None and out:
            try:
                os.write(self._log_fd, "".join(out).encode("utf-8"))
            except OSError as exc:
                log.warning("cannot write model log: %s", exc)

    async def _drain_pumps(self, timeout_s: float) -> None:
        """Wait for the worker's last output, then stop reading whatever is left."""
        pending = [p.done for p in self._pumps if not p.done.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout_s)
        for pump in self._pumps:
            pump.close()

    def _tail_text(self) -> str:
        return "\n".join(list(self._tail)[-_ERROR_TAIL_LINES:])


def _private_tmpdir() -> str:
    # mkdtemp creates the directory with mode 0700: only this user can reach the socket.
    tmpdir = tempfile.mkdtemp(prefix="flambeau-w-")
    if len(os.path.join(tmpdir, "worker.sock").encode()) > _SOCKET_PATH_MAX:
        os.rmdir(tmpdir)
        tmpdir = tempfile.mkdtemp(prefix="flambeau-w-", dir="/tmp")
    return tmpdir


@dataclass(frozen=True, slots=True, kw_only=True)
class ProcessWorkerBackend:
    """Creates :class:`ProcessWorker` objects (implements :class:`flambeau.api.WorkerBackend`).

    Plain keyword arguments, so tests need no server: ``max_request_bytes`` sizes the frame
    limit (TorchServe's ``max_request_size``), ``env_blacklist`` is a regex of server
    environment variables workers must not inherit (``blacklist_env_vars``), ``log_dir`` is
    used when a WorkerSpec has none, ``service_factory`` (``module:attr``) replaces the
    handler SDK's loader, for tests, and ``max_in_flight`` is how many batches a worker is sent
    before it answers the first (``worker_batches_in_flight``; 1 is TorchServe's one at a time).
    """

    log_dir: str | None = None
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    env_blacklist: str = ""
    service_factory: str | None = None
    max_in_flight: int = DEFAULT_BATCHES_IN_FLIGHT

    @classmethod
    def from_config(cls, config: Any, log_dir: str | None) -> ProcessWorkerBackend:
        """Build from the core's config (TorchServe config.properties keys)."""
        return cls(
            log_dir=log_dir,
            max_request_bytes=config.get_int("max_request_size", DEFAULT_MAX_REQUEST_BYTES),
            env_blacklist=config.get_str("blacklist_env_vars", "") or "",
            max_in_flight=config.get_int("worker_batches_in_flight", DEFAULT_BATCHES_IN_FLIGHT),
        )

    def create_worker(self, spec: WorkerSpec) -> ProcessWorker:
        return ProcessWorker(
            spec,
            log_dir=self.log_dir,
            max_request_bytes=self.max_request_bytes,
            env_blacklist=self.env_blacklist,
            service_factory=self.service_factory,
            max_in_flight=self.max_in_flight,
        )
