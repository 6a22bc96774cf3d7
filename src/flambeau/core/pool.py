"""Worker supervision: the workers of one model version, fed from its job queue.

Each worker slot runs one loop: start a worker through the chosen backend, then repeatedly ask
the batching strategy for a batch, run it with the response timeout, and resolve every job.
A worker that takes more than one batch at a time (``max_in_flight``, the ``process`` backend's
``worker_batches_in_flight``) is also sent a full, already queued batch while it runs one, when
no other worker is idle; that batch's response timeout starts when the one ahead of it ends.
A worker that dies or overruns its timeout is killed, its in-flight jobs fail with TorchServe's
``Worker died.``, and it is started again after a Fibonacci backoff (0, 1, 1, 2, 3, 5 ... s)
while inside ``maxRetryTimeoutInSec``. Scaling down retires the newest slots after their
current batch, so no queued request is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from flambeau.api import (
    Batcher,
    BatchResult,
    FlambeauError,
    InternalServerError,
    MetricRecord,
    Worker,
    WorkerBackend,
    WorkerResponse,
    WorkerSpec,
)
from flambeau.core.batching import InferenceJob, JobQueue

log = logging.getLogger("flambeau.workers")

WORKER_DIED = "Worker died."


@dataclass(frozen=True, slots=True)
class PoolSettings:
    batch_size: int = 1
    max_batch_delay_s: float = 0.1
    response_timeout_s: float = 120.0
    startup_timeout_s: float = 120.0
    max_retry_timeout_s: float = 300.0


@dataclass(slots=True)
class WorkerSlot:
    """One worker position; survives restarts of the worker behind it."""

    worker_id: str
    status: str = "STARTING"
    worker: Worker | None = None
    start_time: float = field(default_factory=time.time)
    retired: bool = False
    failures: int = 0
    first_failure: float | None = None
    last_error: str = ""
    task: asyncio.Task[None] | None = None
    # The strategy's pending next_batch: cancelling it is safe (strategies requeue), unlike
    # a batch that the worker holds.
    waiting: asyncio.Future[list[Any]] | None = None
    running: set[asyncio.Future[bool]] = field(default_factory=set)
    batch_ended: asyncio.Future[None] | None = None
    worker_lost: bool = False
    started: asyncio.Future[bool] | None = None

    @property
    def busy(self) -> bool:
        """Whether the worker holds a batch of this slot's."""
        return bool(self.running)


class _Ahead:
    """The batches one worker holds, oldest first; only the oldest runs, so only its response
    timeout is armed. ``head_since`` is when the oldest started running."""

    __slots__ = ("deadlines", "head_since")

    def __init__(self) -> None:
        self.deadlines: deque[asyncio.Timeout] = deque()
        self.head_since = 0.0


def fibonacci_backoff(attempt: int) -> float:
    a, b = 0, 1
    for _ in range(attempt):
        a, b = b, a + b
    return float(min(a, 1597))


class WorkerPool:
    """Supervises the workers of one model version."""

    def __init__(
        self,
        *,
        name: str,
        queue: JobQueue,
        backend: WorkerBackend,
        batcher: Batcher,
        settings: PoolSettings,
        make_spec: Callable[[str], WorkerSpec],
        next_worker_id: Callable[[], str],
        on_metrics: Callable[[Sequence[MetricRecord]], None] | None = None,
        on_batch: Callable[[int, float, float], None] | None = None,
        release: Callable[[WorkerSpec], None] | None = None,
        device_usage: Callable[[Sequence[int]], Mapping[int, str]] | None = None,
    ) -> None:
        self.name = name
        self.queue = queue
        self.backend = backend
        self.batcher = batcher
        self.settings = settings
        self._make_spec = make_spec
        self._next_worker_id = next_worker_id
        self._on_metrics = on_metrics
        self._on_batch = on_batch
        self._release = release
        self._device_usage = device_usage or (lambda indices: {})
        self.slots: list[WorkerSlot] = []
        self._specs: dict[str, WorkerSpec] = {}

    # ---------------------------------------------------------------- scaling

    @property
    def target(self) -> int:
        return sum(1 for s in self.slots if not s.retired)

    async def scale(self, count: int, *, wait: bool = True) -> bool:
        """Grow or shrink to ``count`` workers; with ``wait``, True iff every new one started."""
        live = [s for s in self.slots if not s.retired]
        waiters: list[asyncio.Future[bool]] = []
        for _ in range(count - len(live)):
            slot = WorkerSlot(self._next_worker_id())
            slot.started = asyncio.get_running_loop().create_future()
            waiters.append(slot.started)
            slot.task = asyncio.create_task(self._run(slot), name=f"{self.name}-{slot.worker_id}")
            self.slots.append(slot)
        retiring = live[count:] if count < len(live) else []
        for slot in retiring:
            self._retire(slot)
        if not wait:
            return True
        results = await asyncio.gather(*waiters) if waiters else []
        if retiring:
            await asyncio.gather(*(s.task for s in retiring if s.task), return_exceptions=True)
        return all(results)

    def _retire(self, slot: WorkerSlot) -> None:
        slot.retired = True
        slot.status = "UNLOADING"
        # Waiting for a batch is safe to cancel (strategies requeue); running one is not.
        if slot.waiting is not None:
            slot.waiting.cancel()

    async def stop(self, timeout_s: float = 30.0) -> None:
        for slot in self.slots:
            self._retire(slot)
        tasks = [s.task for s in self.slots if s.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout_s)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        self.slots.clear()

    # ---------------------------------------------------------------- health and describe

    def healthy_count(self) -> int:
        now = time.time()
        healthy = 0
        for slot in self.slots:
            if slot.retired:
                continue
            if slot.status == "READY":
                healthy += 1
            elif (
                slot.first_failure is not None
                and now - slot.first_failure < self.settings.max_retry_timeout_s
            ):
                # A worker that died recently still counts while it is being retried.
                healthy += 1
        return healthy

    def ready_count(self) -> int:
        return sum(1 for s in self.slots if s.status == "READY" and not s.retired)

    def describe(self) -> list[dict[str, Any]]:
        """TorchServe's worker rows; a GPU worker's ``gpuUsage`` is what the device plugin
        reports for its GPU (NVML readings in nvidia-smi's words, as TorchServe has them)."""
        gpu_ids = {
            slot.worker_id: int(slot.worker.device.partition(":")[2] or 0)
            for slot in self.slots
            if slot.worker is not None and slot.worker.device.startswith("cuda")
        }
        usage = self._device_usage(sorted(set(gpu_ids.values()))) if gpu_ids else {}
        rows = []
        for slot in self.slots:
            worker = slot.worker
            gpu_id = gpu_ids.get(slot.worker_id)
            rows.append(
                {
                    "id": slot.worker_id,
                    "startTime": format_time(slot.start_time),
                    "status": slot.status if slot.status != "STARTING" else "UNLOADING",
                    "memoryUsage": worker.memory_usage() if worker else 0,
                    "pid": (worker.pid or -1) if worker else -1,
                    "gpu": gpu_id is not None,
                    "gpuUsage": usage.get(gpu_id, "N/A") if gpu_id is not None else "N/A",
                }
            )
        return rows

    # ---------------------------------------------------------------- the slot loop

    async def _run(self, slot: WorkerSlot) -> None:
        try:
            while not slot.retired:
                worker = await self._start_worker(slot)
                if worker is None:
                    if slot.retired or not self._may_retry(slot):
                        break
                    await asyncio.sleep(fibonacci_backoff(slot.failures))
                    continue
                try:
                    await self._serve(slot, worker)
                finally:
                    slot.worker = None
                    slot.status = "UNLOADING"
                    await self._stop_worker(slot, worker)
                if not slot.retired:
                    self._note_failure(slot, WORKER_DIED)
                    if not self._may_retry(slot):
                        break
                    await asyncio.sleep(fibonacci_backoff(slot.failures - 1))
        finally:
            if slot.status != "FAILED":
                slot.status = "STOPPED"
            self._resolve_started(slot, False)
            if slot.retired and slot in self.slots:
                self.slots.remove(slot)

    def _may_retry(self, slot: WorkerSlot) -> bool:
        if slot.first_failure is None:
            return True
        if time.time() - slot.first_failure < self.settings.max_retry_timeout_s:
            return True
        slot.status = "FAILED"
        log.error(
            "%s worker %s: giving up after %d failures", self.name, slot.worker_id, slot.failures
        )
        return False

    def _note_failure(self, slot: WorkerSlot, reason: str) -> None:
        slot.failures += 1
        slot.last_error = reason
        if slot.first_failure is None:
            slot.first_failure = time.time()
        slot.status = "STARTING"

    @staticmethod
    def _resolve_started(slot: WorkerSlot, ok: bool) -> None:
        if slot.started is not None and not slot.started.done():
            slot.started.set_result(ok)

    async def _start_worker(self, slot: WorkerSlot) -> Worker | None:
        slot.status = "STARTING"
        try:
            # Placement can fail (no GPU memory left): a start failure like any other.
            spec = self._make_spec(slot.worker_id)
        except Exception as exc:
            message = exc.message if isinstance(exc, FlambeauError) else f"{exc!r}"
            log.error("%s worker %s cannot be placed: %s", self.name, slot.worker_id, message)
            self._note_failure(slot, message)
            self._resolve_started(slot, False)
            return None
        self._specs[slot.worker_id] = spec
        worker = self.backend.create_worker(spec)
        try:
            await asyncio.wait_for(worker.start(), self.settings.startup_timeout_s + 5)
        except asyncio.CancelledError:
            await self._stop_worker(slot, worker)
            raise
        except Exception as exc:
            message = exc.message if isinstance(exc, FlambeauError) else f"{exc!r}"
            if isinstance(exc, asyncio.TimeoutError):
                message = f"no answer within startup timeout {self.settings.startup_timeout_s}s"
            log.error("%s worker %s failed to start: %s", self.name, slot.worker_id, message)
            await self._stop_worker(slot, worker)
            self._note_failure(slot, message)
            self._resolve_started(slot, False)
            return None
        slot.worker = worker
        slot.status = "READY" if not slot.retired else "UNLOADING"
        slot.start_time = time.time()
        slot.first_failure = None
        self._resolve_started(slot, True)
        log.info(
            "%s worker %s ready (pid %s, %s)", self.name, slot.worker_id, worker.pid, worker.device
        )
        return worker

    async def _stop_worker(self, slot: WorkerSlot, worker: Worker) -> None:
        with contextlib.suppress(Exception):
            await worker.stop()
        spec = self._specs.pop(slot.worker_id, None)
        if spec is not None and self._release is not None:
            self._release(spec)

    async def _serve(self, slot: WorkerSlot, worker: Worker) -> None:
        """Feed one worker until it is lost or the slot retires.

        An idle worker waits for the batching strategy's next batch. A worker that takes more
        than one batch at a time is also sent, while it runs one, a full batch that is already
        queued, provided no other worker of the pool is idle: pipelining never takes work from
        an idle worker and never makes a batch smaller than waiting would have.
        """
        slot.worker_lost = False
        ahead = _Ahead()
        depth = max(1, int(getattr(worker, "max_in_flight", 1)))
        loop = asyncio.get_running_loop()
        while not slot.retired and not slot.worker_lost:
            if not slot.running:
                batch = await self._next_batch(slot)
                if batch:
                    self._launch(slot, worker, batch, ahead)
            while len(slot.running) < depth and self._may_pipeline(slot):
                self._launch(slot, worker, self._full_batch_nowait(), ahead)
            if slot.running and not slot.worker_lost:
                slot.batch_ended = loop.create_future()
                await slot.batch_ended
        if slot.retired and not slot.worker_lost and slot.running:
            # Retiring: the batches the worker holds finish before it stops.
            await asyncio.gather(*slot.running, return_exceptions=True)

    async def _next_batch(self, slot: WorkerSlot) -> list[InferenceJob]:
        """The strategy's next batch of live jobs; empty when cancelled by a retire."""
        settings = self.settings
        waiting: asyncio.Future[list[Any]] = asyncio.ensure_future(
            self.batcher.next_batch(self.queue, settings.batch_size, settings.max_batch_delay_s)
        )
        slot.waiting = waiting
        try:
            batch: list[InferenceJob] = await waiting
        except asyncio.CancelledError:
            if slot.retired:
                return []
            raise
        finally:
            slot.waiting = None
        return [job for job in batch if not job.future.done()]

    def _may_pipeline(self, slot: WorkerSlot) -> bool:
        if slot.worker_lost or len(self.queue) < self.settings.batch_size:
            return False
        return not any(
            not other.running and other.worker is not None and not other.retired
            for other in self.slots
            if other is not slot
        )

    def _full_batch_nowait(self) -> list[InferenceJob]:
        batch: list[InferenceJob] = []
        while len(batch) < self.settings.batch_size:
            job = self.queue.pop_nowait()
            if job is None:
                break
            batch.append(job)
        return batch

    def _launch(
        self, slot: WorkerSlot, worker: Worker, batch: list[InferenceJob], ahead: _Ahead
    ) -> None:
        if not batch:
            return
        task = asyncio.ensure_future(self._run_batch(worker, batch, ahead))
        slot.running.add(task)

        def ended(task: asyncio.Future[bool]) -> None:
            slot.running.discard(task)
            alive = not task.cancelled() and task.exception() is None and task.result()
            if alive:
                # A worker that served a batch is healthy again: the next crash restarts at
                # once.
                slot.failures = 0
            else:
                slot.worker_lost = True
            if slot.batch_ended is not None and not slot.batch_ended.done():
                slot.batch_ended.set_result(None)

        task.add_done_callback(ended)

    async def _run_batch(self, worker: Worker, batch: list[InferenceJob], ahead: _Ahead) -> bool:
        """Run one batch; False when the worker must be replaced."""
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        for job in batch:
            job.started_at = started
        by_id = {job.request.request_id: job for job in batch}

        def on_partial(responses: list[WorkerResponse]) -> None:
            for response in responses:
                job = by_id.get(response.request_id)
                if job is not None and job.on_partial is not None:
                    job.on_partial(response)

        timeout_s = self.settings.response_timeout_s
        try:
            # asyncio.timeout arms one timer; wait_for would also wrap infer in a Task per batch.
            # A batch queued behind another is armed when that one ends (below).
            async with asyncio.timeout(None) as deadline:
                if not ahead.deadlines:
                    deadline.reschedule(loop.time() + timeout_s)
                    ahead.head_since = started
                ahead.deadlines.append(deadline)
                try:
                    result = await worker.infer([job.request for job in batch], on_partial)
                finally:
                    # Handler time counts from when this batch started running, not from send.
                    ran_from = ahead.head_since if ahead.deadlines[0] is deadline else started
                    ahead.deadlines.remove(deadline)
                    if ahead.deadlines and ahead.deadlines[0].when() is None:
                        ahead.deadlines[0].reschedule(loop.time() + timeout_s)
                        ahead.head_since = time.monotonic()
        except TimeoutError:
            log.error("%s worker %s: response timeout, killing it", self.name, worker.worker_id)
            self._fail(batch, InternalServerError(WORKER_DIED))
            return False
        except FlambeauError as exc:
            self._fail(batch, exc)
            return worker.is_alive()
        except Exception as exc:
            log.exception("%s worker %s failed", self.name, worker.worker_id)
            self._fail(batch, InternalServerError(WORKER_DIED))
            del exc
            return False
        self._resolve(batch, result)
        if self._on_batch is not None:
            queued = sum(started - job.enqueued_at for job in batch) / len(batch)
            self._on_batch(len(batch), queued, time.monotonic() - ran_from)
        if result.metrics and self._on_metrics is not None:
            self._on_metrics(result.metrics)
        return True

    @staticmethod
    def _fail(batch: list[InferenceJob], error: FlambeauError) -> None:
        for job in batch:
            job.fail(error)

    def _resolve(self, batch: list[InferenceJob], result: BatchResult) -> None:
        if result.code != 200:
            error = FlambeauError(result.message or "Prediction failed", status=result.code)
            self._fail(batch, error)
            return
        responses = result.responses
        if len(responses) != len(batch):
            self._fail(batch, FlambeauError("number of batch response mismatched", status=503))
            return
        by_id = {r.request_id: r for r in responses}
        for index, job in enumerate(batch):
            response = by_id.get(job.request.request_id, responses[index])
            job.succeed(response)


def format_time(epoch: float) -> str:
    """TorchServe's date format: local time with a literal ``Z``."""
    base = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(epoch))
    return f"{base}.{int(epoch * 1000) % 1000:03d}Z"
