"""The batch-queue primitive: one bounded FIFO of inference jobs per model version.

Every job's future is resolved exactly once: with a response, with an error, or by the
client going away (cancelled). Jobs whose client disconnected, and jobs older than the model's
client timeout, are dropped when popped, before they reach a worker. How jobs are grouped into
batches is not decided here but by a batching strategy plugin (:class:`flambeau.api.Batcher`),
which sees only ``pop_nowait``, ``wait_nonempty`` and ``now``.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from flambeau.api import (
    FlambeauError,
    Job,
    RequestTimeoutError,
    ServiceUnavailableError,
    WorkerRequest,
    WorkerResponse,
)

PartialCallback = Callable[[WorkerResponse], None]


class InferenceJob:
    """One request waiting for (or being run by) a worker."""

    __slots__ = ("deadline", "enqueued_at", "future", "on_partial", "request", "started_at")

    def __init__(
        self,
        request: WorkerRequest,
        future: asyncio.Future[WorkerResponse],
        *,
        enqueued_at: float,
        deadline: float | None = None,
        on_partial: PartialCallback | None = None,
    ) -> None:
        self.request = request
        self.future = future
        self.enqueued_at = enqueued_at
        self.deadline = deadline
        self.on_partial = on_partial
        self.started_at = 0.0

    def is_cancelled(self) -> bool:
        return self.future.done()

    def succeed(self, response: WorkerResponse) -> None:
        if not self.future.done():
            self.future.set_result(response)

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)


class JobQueue:
    """A bounded FIFO with an event for waiters. ``clock`` is injectable for tests."""

    def __init__(
        self, capacity: int, *, clock: Callable[[], float] = time.monotonic, name: str = ""
    ) -> None:
        self.capacity = capacity
        self.name = name
        self._clock = clock
        self._jobs: deque[InferenceJob] = deque()
        self._nonempty = asyncio.Event()
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._jobs)

    @property
    def remaining_capacity(self) -> int:
        return max(0, self.capacity - len(self._jobs))

    def now(self) -> float:
        return self._clock()

    def put(self, job: InferenceJob) -> None:
        """Enqueue without blocking; a full queue is a 503 (TorchServe's behaviour)."""
        if len(self._jobs) >= self.capacity:
            raise ServiceUnavailableError(f"Model {self.name} job queue is full")
        self._jobs.append(job)
        self._nonempty.set()

    def pop_nowait(self) -> InferenceJob | None:
        """The oldest live job, dropping cancelled and expired ones on the way."""
        jobs = self._jobs
        while jobs:
            job = jobs.popleft()
            if job.future.done():
                self.dropped += 1
                continue
            if job.deadline is not None and self._clock() > job.deadline:
                self.dropped += 1
                job.fail(RequestTimeoutError("Request timed out before a worker could take it"))
                continue
            if not jobs:
                self._nonempty.clear()
            return job
        self._nonempty.clear()
        return None

    def requeue(self, jobs: Sequence[Job]) -> None:
        """Put popped jobs back at the front in their order (may exceed capacity briefly)."""
        self._jobs.extendleft(reversed([job for job in jobs if isinstance(job, InferenceJob)]))
        if self._jobs:
            self._nonempty.set()

    async def wait_nonempty(self, timeout: float | None) -> bool:
        """Wait until a job is queued; False if ``timeout`` seconds passed first."""
        if self._jobs:
            return True
        try:
            if timeout is None:
                await self._nonempty.wait()
            else:
                await asyncio.wait_for(self._nonempty.wait(), timeout)
        except TimeoutError:
            return bool(self._jobs)
        return True

    def fail_all(self, error: FlambeauError) -> int:
        """Fail every queued job (unregister); returns how many there were."""
        count = 0
        while self._jobs:
            self._jobs.popleft().fail(error)
            count += 1
        self._nonempty.clear()
        return count

    def snapshot(self) -> dict[str, Any]:
        return {"remainingCapacity": self.remaining_capacity, "pendingRequests": len(self._jobs)}
