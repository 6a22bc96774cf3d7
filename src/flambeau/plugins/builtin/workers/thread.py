"""The ``thread`` worker backend: the handler runs inside the server process, on its own thread.

Lowest latency (no frames, no copies), at the price of isolation: a crashing handler takes the
server with it, and a hung one cannot be killed. Each worker owns a single-thread executor, so
its handler always runs on the same thread (thread-local state, CUDA streams, OpenMP settings).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import psutil

from flambeau.api import BatchResult, MetricRecord, WorkerRequest, WorkerResponse, WorkerSpec
from flambeau.plugins.builtin.workers import (
    ModelServiceLike,
    WorkerDiedError,
    WorkerStartError,
    resolve_service_factory,
)

__all__ = ["ThreadWorker", "ThreadWorkerBackend"]

log = logging.getLogger(__name__)


class ThreadWorker:
    """One model instance on a dedicated thread of the server (implements ``api.Worker``).

    ``pid`` is the server's own and ``memory_usage()`` the server's RSS: a thread has no
    memory of its own. ``WorkerSpec.env`` and ``python`` do not apply (one process, one
    environment); ``cpu_affinity`` pins the worker thread (Linux); ModelService applies
    ``intra_op_threads``, which in one process is process-wide. A cancelled ``infer()`` retires the
    worker; its thread finishes the batch unseen.
    """

    def __init__(self, spec: WorkerSpec, *, service_factory: str | None = None) -> None:
        self.worker_id = spec.worker_id
        self.device = spec.device
        self.spec = spec
        self._service_factory = service_factory
        self._state = "new"  # new | starting | ready | broken | stopped
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._service: ModelServiceLike | None = None
        self._busy = False
        self._on_partial: Callable[[list[WorkerResponse]], None] | None = None
        self._partial_metrics: list[MetricRecord] = []

    @property
    def pid(self) -> int | None:
        return os.getpid()

    def is_alive(self) -> bool:
        return self._state == "ready"

    def memory_usage(self) -> int:
        return int(psutil.Process().memory_info().rss)

    async def start(self) -> None:
        """Load the model on the worker's thread; raises :class:`WorkerStartError` on failure."""
        if self._state != "new":
            raise RuntimeError(f"worker {self.worker_id} was already started")
        self._state = "starting"
        self._loop = asyncio.get_running_loop()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"flambeau-{self.worker_id}")
        load = self.spec.load
        future = self._loop.run_in_executor(self._executor, self._load)
        try:
            self._service = await asyncio.wait_for(future, self.spec.startup_timeout_s)
        except TimeoutError as exc:
            self._abandon()
            raise WorkerStartError(
                f"Worker {self.worker_id} for model {load.model_name} did not load within "
                f"{self.spec.startup_timeout_s:g} s",
                status=500,
            ) from exc
        except Exception as exc:
            self._abandon()
            status = getattr(exc, "status", None)
            # The SDK's HandlerLoadError message already names handler, model and cause.
            raise WorkerStartError(
                str(exc) or f"Failed to load model {load.model_name}: {type(exc).__name__}",
                status=status if isinstance(status, int) and status >= 400 else 500,
            ) from exc
        except BaseException:
            self._abandon()
            raise
        self._state = "ready"

    async def infer(
        self,
        requests: Sequence[WorkerRequest],
        on_partial: Callable[[list[WorkerResponse]], None] | None = None,
    ) -> BatchResult:
        """Run ``predict`` on the worker's thread; partial chunks reach ``on_partial`` in order."""
        if self._busy:
            raise RuntimeError(f"worker {self.worker_id} already has a batch in flight")
        if self._state != "ready" or self._loop is None or self._executor is None:
            raise WorkerDiedError(500)
        self._busy = True
        self._on_partial = on_partial
        self._partial_metrics = []
        batch = list(requests)
        try:
            result = await self._loop.run_in_executor(self._executor, self._predict, batch)
        except asyncio.CancelledError:
            # The thread cannot be stopped; its late partials must not reach the next batch.
            self._state = "broken"
            raise
        finally:
            self._busy = False
            self._on_partial = None
        if self._partial_metrics:
            result.metrics = [*self._partial_metrics, *result.metrics]
        return result

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Close the service on its thread (waiting at most ``timeout_s``) and let it go.

        A thread cannot be killed: after a cancelled batch, ``close()`` is queued behind it
        and runs whenever the handler returns.
        """
        if self._state == "stopped":
            return
        idle = self._state == "ready" and not self._busy
        self._state = "stopped"
        executor, service, loop = self._executor, self._service, self._loop
        if executor is None or loop is None:
            return
        if service is not None:
            close = loop.run_in_executor(executor, self._close_quietly, service)
            if idle:
                try:
                    await asyncio.wait_for(close, timeout_s)
                except TimeoutError:
                    log.warning("worker %s: close() took over %g s", self.worker_id, timeout_s)
        executor.shutdown(wait=False)

    # -- on the worker thread ---------------------------------------------------------------

    def _load(self) -> ModelServiceLike:
        spec = self.spec
        if spec.cpu_affinity and hasattr(os, "sched_setaffinity"):
            # pid 0 is the calling thread on Linux: this pins the worker thread alone.
            try:
                os.sched_setaffinity(0, spec.cpu_affinity)
            except OSError as exc:
                log.warning("worker %s: cannot set CPU affinity: %s", self.worker_id, exc)
        factory = resolve_service_factory(self._service_factory)
        return factory(spec.load, send_intermediate=self._send_intermediate)

    def _close_quietly(self, service: ModelServiceLike) -> None:
        try:
            service.close()
        except Exception:
            log.exception("worker %s: close() failed", self.worker_id)

    def _predict(self, batch: list[WorkerRequest]) -> BatchResult:
        service = self._service
        if service is None:
            return BatchResult(code=500, message="Worker stopped")
        try:
            result = service.predict(batch)
            extra = service.drain_metrics()
        except Exception as exc:  # the SDK should not raise; the server must not die of it
            log.exception("worker %s: predict raised", self.worker_id)
            code = 507 if isinstance(exc, MemoryError) else 500
            return BatchResult(code=code, message=f"Prediction failed: {exc}")
        if extra:
            result.metrics = [*result.metrics, *extra]
        return result

    def _send_intermediate(self, partial: BatchResult) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        # FIFO with the final result's hand-over, which also goes through call_soon_threadsafe.
        loop.call_soon_threadsafe(self._deliver_partial, partial)

    # -- on the event loop ------------------------------------------------------------------

    def _deliver_partial(self, partial: BatchResult) -> None:
        if not self._busy or self._state != "ready":
            return
        if partial.metrics:
            self._partial_metrics.extend(partial.metrics)
        if partial.code != 200:
            # A chunk the SDK could not build; the final result still decides the batch.
            log.warning("worker %s: streamed chunk failed: %s", self.worker_id, partial.message)
        callback = self._on_partial
        if callback is not None and partial.responses:
            try:
                callback(partial.responses)
            except Exception:
                log.exception("worker %s: on_partial callback failed", self.worker_id)

    def _abandon(self) -> None:
        self._state = "broken"
        if self._executor is not None:
            # A load that never returns keeps its thread; at least nothing new is queued.
            self._executor.shutdown(wait=False, cancel_futures=True)


class ThreadWorkerBackend:
    """Creates :class:`ThreadWorker` objects; ``service_factory`` is the test seam."""

    def __init__(self, *, service_factory: str | None = None) -> None:
        self.service_factory = service_factory

    def create_worker(self, spec: WorkerSpec) -> ThreadWorker:
        return ThreadWorker(spec, service_factory=self.service_factory)
