"""Batching strategies on a manual clock, the job queue primitive, and exactly-once resolution."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import pytest

from flambeau.api import (
    BatchResult,
    RequestTimeoutError,
    ServiceUnavailableError,
    WorkerRequest,
    WorkerResponse,
    WorkerSpec,
)
from flambeau.core.batching import InferenceJob, JobQueue
from flambeau.core.pool import PoolSettings, WorkerPool
from flambeau.plugins.builtin.batching import EagerBatcher, TorchServeBatcher


class ManualClock:
    """Virtual time: waiters wake when ``advance`` passes their deadline."""

    def __init__(self) -> None:
        self.now = 0.0
        self.waiters: list[tuple[float, asyncio.Future[bool]]] = []

    def __call__(self) -> float:
        return self.now

    async def advance(self, seconds: float) -> None:
        self.now += seconds
        for deadline, fut in list(self.waiters):
            if deadline <= self.now and not fut.done():
                fut.set_result(False)
        await settle()


class ManualQueue(JobQueue):
    """The real queue with ``wait_nonempty`` driven by the manual clock instead of wall time."""

    def __init__(self, capacity: int, clock: ManualClock) -> None:
        super().__init__(capacity, clock=clock)
        self.clock = clock
        self._wakers: list[asyncio.Future[bool]] = []

    def put(self, job: InferenceJob) -> None:
        super().put(job)
        for fut in self._wakers:
            if not fut.done():
                fut.set_result(True)
        self._wakers.clear()

    async def wait_nonempty(self, timeout: float | None) -> bool:
        if len(self):
            return True
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._wakers.append(fut)
        if timeout is not None:
            self.clock.waiters.append((self.clock.now + timeout, fut))
        return await fut


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


def make_job(queue: JobQueue, n: int) -> InferenceJob:
    fut: asyncio.Future[WorkerResponse] = asyncio.get_running_loop().create_future()
    return InferenceJob(WorkerRequest(f"r{n}"), fut, enqueued_at=queue.now())


def ids(batch: Sequence[object]) -> list[str]:
    return [job.request.request_id for job in batch]  # type: ignore[attr-defined]


async def test_torchserve_batch_forms_at_size() -> None:
    clock = ManualClock()
    queue = ManualQueue(100, clock)
    task = asyncio.create_task(TorchServeBatcher().next_batch(queue, 3, 0.1))
    await settle()
    for n in range(5):
        queue.put(make_job(queue, n))
    await settle()
    assert task.done()
    assert ids(task.result()) == ["r0", "r1", "r2"]  # never more than the batch size
    assert len(queue) == 2


async def test_torchserve_batch_forms_at_delay_measured_from_first_job() -> None:
    clock = ManualClock()
    queue = ManualQueue(100, clock)
    task = asyncio.create_task(TorchServeBatcher().next_batch(queue, 8, 0.1))
    await clock.advance(5.0)  # idle time before the first job does not count
    queue.put(make_job(queue, 0))
    await settle()
    await clock.advance(0.05)
    queue.put(make_job(queue, 1))
    await settle()
    assert not task.done()
    await clock.advance(0.049)
    assert not task.done()
    await clock.advance(0.002)
    assert task.done()
    assert ids(task.result()) == ["r0", "r1"]


async def test_eager_never_waits_for_more() -> None:
    clock = ManualClock()
    queue = ManualQueue(100, clock)
    queue.put(make_job(queue, 0))
    queue.put(make_job(queue, 1))
    batch = await EagerBatcher().next_batch(queue, 8, 10.0)
    assert ids(batch) == ["r0", "r1"]
    task = asyncio.create_task(EagerBatcher().next_batch(queue, 8, 10.0))
    await settle()
    assert not task.done()  # waits for a first job, then takes what is there
    queue.put(make_job(queue, 2))
    await settle()
    assert ids(task.result()) == ["r2"]


async def test_cancelled_jobs_are_skipped() -> None:
    clock = ManualClock()
    queue = ManualQueue(100, clock)
    jobs = [make_job(queue, n) for n in range(4)]
    for job in jobs:
        queue.put(job)
    jobs[1].future.cancel()  # the client went away
    batch = await EagerBatcher().next_batch(queue, 8, 0)
    assert ids(batch) == ["r0", "r2", "r3"]
    assert queue.dropped == 1


async def test_cancelling_a_strategy_mid_batch_requeues_its_jobs() -> None:
    clock = ManualClock()
    queue = ManualQueue(100, clock)
    queue.put(make_job(queue, 0))
    queue.put(make_job(queue, 1))
    task = asyncio.create_task(TorchServeBatcher().next_batch(queue, 8, 1.0))
    await settle()
    assert len(queue) == 0
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [queue.pop_nowait().request.request_id for _ in range(2)] == ["r0", "r1"]  # type: ignore[union-attr]


async def test_full_queue_is_503_and_expired_jobs_time_out() -> None:
    clock = ManualClock()
    queue = ManualQueue(2, clock)
    queue.put(make_job(queue, 0))
    late = make_job(queue, 1)
    late.deadline = 1.0
    queue.put(late)
    with pytest.raises(ServiceUnavailableError):
        queue.put(make_job(queue, 2))
    await clock.advance(2.0)
    assert queue.pop_nowait().request.request_id == "r0"  # type: ignore[union-attr]
    assert queue.pop_nowait() is None
    with pytest.raises(RequestTimeoutError):
        late.future.result()


class FlakyWorker:
    """An in-process worker that dies on every third batch; counts what it ran."""

    device = "cpu"
    pid = None

    def __init__(self, spec: WorkerSpec, log: list[str]) -> None:
        self.worker_id = spec.worker_id
        self.log = log
        self.alive = True

    async def start(self) -> None:
        await asyncio.sleep(0)

    async def infer(
        self,
        requests: Sequence[WorkerRequest],
        on_partial: Callable[[list[WorkerResponse]], None] | None = None,
    ) -> BatchResult:
        await asyncio.sleep(0.001)
        self.log.append(f"batch{len(requests)}")
        if len(self.log) % 3 == 0:
            self.alive = False
            raise RuntimeError("worker crashed")
        return BatchResult(
            responses=[WorkerResponse(r.request_id, body=r.request_id.encode()) for r in requests]
        )

    async def stop(self, timeout_s: float = 10.0) -> None:
        self.alive = False

    def is_alive(self) -> bool:
        return self.alive

    def memory_usage(self) -> int:
        return 0


async def test_every_future_is_resolved_exactly_once_under_crashes() -> None:
    log: list[str] = []

    class Backend:
        def create_worker(self, spec: WorkerSpec) -> FlakyWorker:
            return FlakyWorker(spec, log)

    queue = JobQueue(1000)
    counter = iter(range(9000, 10000))
    pool = WorkerPool(
        name="m",
        queue=queue,
        backend=Backend(),
        batcher=TorchServeBatcher(),
        settings=PoolSettings(batch_size=4, max_batch_delay_s=0.002),
        make_spec=lambda worker_id: WorkerSpec(worker_id, load=None),  # type: ignore[arg-type]
        next_worker_id=lambda: str(next(counter)),
    )
    assert await pool.scale(2)
    jobs = [make_job(queue, n) for n in range(200)]
    for job in jobs:
        queue.put(job)
    results = await asyncio.gather(*(job.future for job in jobs), return_exceptions=True)
    ok = [r for r in results if isinstance(r, WorkerResponse)]
    failed = [r for r in results if isinstance(r, Exception)]
    assert len(ok) + len(failed) == 200
    assert failed
    assert all("Worker died." in str(e) for e in failed)
    assert all(r.body == r.request_id.encode() for r in ok)  # each got its own answer
    await pool.stop()
    assert pool.slots == []


class GatedWorker:
    """An in-process worker that holds up to ``max_in_flight`` batches and runs them in order,
    each until the test opens its gate (or for ``run_s`` seconds)."""

    device = "cpu"
    pid = None

    def __init__(self, spec: WorkerSpec, max_in_flight: int, run_s: float | None) -> None:
        self.worker_id = spec.worker_id
        self.max_in_flight = max_in_flight
        self.run_s = run_s
        self.sent: list[list[str]] = []
        self.gates: dict[str, asyncio.Event] = {}
        self._order: asyncio.Lock = asyncio.Lock()
        self.holding = 0
        self.alive = True

    async def start(self) -> None:
        await asyncio.sleep(0)

    async def infer(
        self,
        requests: Sequence[WorkerRequest],
        on_partial: Callable[[list[WorkerResponse]], None] | None = None,
    ) -> BatchResult:
        assert self.holding < self.max_in_flight, "sent more batches than it takes"
        names = [r.request_id for r in requests]
        self.sent.append(names)
        self.holding += 1
        try:
            async with self._order:  # one at a time, in the order sent
                if self.run_s is None:
                    gate = self.gates.setdefault(names[0], asyncio.Event())
                    await gate.wait()
                else:
                    await asyncio.sleep(self.run_s)
        finally:
            self.holding -= 1
        return BatchResult(responses=[WorkerResponse(n, body=n.encode()) for n in names])

    def release(self, first_request_id: str) -> None:
        self.gates.setdefault(first_request_id, asyncio.Event()).set()

    async def stop(self, timeout_s: float = 10.0) -> None:
        self.alive = False

    def is_alive(self) -> bool:
        return self.alive

    def memory_usage(self) -> int:
        return 0


def gated_pool(
    queue: JobQueue,
    *,
    batch_size: int = 1,
    max_in_flight: int = 2,
    run_s: float | None = None,
    response_timeout_s: float = 120.0,
) -> tuple[WorkerPool, list[GatedWorker]]:
    workers: list[GatedWorker] = []

    class Backend:
        def create_worker(self, spec: WorkerSpec) -> GatedWorker:
            workers.append(GatedWorker(spec, max_in_flight, run_s))
            return workers[-1]

    counter = iter(range(9000, 10000))
    pool = WorkerPool(
        name="m",
        queue=queue,
        backend=Backend(),
        batcher=EagerBatcher(),
        settings=PoolSettings(batch_size=batch_size, response_timeout_s=response_timeout_s),
        make_spec=lambda worker_id: WorkerSpec(worker_id, load=None),  # type: ignore[arg-type]
        next_worker_id=lambda: str(next(counter)),
    )
    return pool, workers


async def test_idle_workers_take_work_before_a_busy_worker_is_sent_more() -> None:
    queue = JobQueue(100)
    pool, workers = gated_pool(queue)
    assert await pool.scale(2)
    jobs = [make_job(queue, n) for n in range(2)]
    for job in jobs:
        queue.put(job)
    await settle()
    # Two jobs, two idle workers: one each, never both on one worker.
    assert sorted(w.sent for w in workers) == [[["r0"]], [["r1"]]]
    for worker in workers:
        worker.release(worker.sent[0][0])
    await asyncio.gather(*(job.future for job in jobs))
    await pool.stop()


async def test_a_busy_worker_is_sent_a_queued_batch_when_every_worker_is_busy() -> None:
    queue = JobQueue(100)
    pool, workers = gated_pool(queue)
    assert await pool.scale(2)
    jobs = [make_job(queue, n) for n in range(4)]
    queue.put(jobs[0])
    await settle()
    queue.put(jobs[1])
    await settle()
    first = next(w for w in workers if w.sent == [["r0"]])
    other = next(w for w in workers if w is not first)
    assert other.sent == [["r1"]]
    queue.put(jobs[2])
    queue.put(jobs[3])
    await settle()
    first.release("r0")
    await settle()
    # r0 done: its worker takes r2, and is sent r3 too while r2 runs (the other one is busy).
    assert first.sent == [["r0"], ["r2"], ["r3"]]
    assert first.holding == 2
    assert jobs[0].future.result().body == b"r0"
    for name in ("r2", "r3"):
        first.release(name)
    other.release("r1")
    assert [r.body for r in await asyncio.gather(*(j.future for j in jobs))] == [
        b"r0",
        b"r1",
        b"r2",
        b"r3",
    ]
    await pool.stop()


async def test_only_a_full_batch_is_sent_ahead() -> None:
    queue = JobQueue(100)
    pool, workers = gated_pool(queue, batch_size=2)
    assert await pool.scale(1)
    jobs = [make_job(queue, n) for n in range(5)]
    queue.put(jobs[0])
    queue.put(jobs[1])
    await settle()
    (worker,) = workers
    queue.put(jobs[2])
    await settle()
    worker.release("r0")
    await settle()
    # One job queued behind [r0, r1] is not a full batch: the worker gets it only when idle.
    assert worker.sent == [["r0", "r1"], ["r2"]]
    queue.put(jobs[3])
    queue.put(jobs[4])
    worker.release("r2")
    await settle()
    assert worker.sent == [["r0", "r1"], ["r2"], ["r3", "r4"]]
    worker.release("r3")
    await asyncio.gather(*(j.future for j in jobs))
    await pool.stop()


async def test_a_batch_sent_ahead_gets_its_whole_timeout_after_the_one_before() -> None:
    queue = JobQueue(100)
    # Each batch runs 0.15 s; the second one ends 0.3 s after it was sent, past the 0.2 s
    # response timeout measured from sending, within it measured from its start.
    pool, workers = gated_pool(queue, max_in_flight=2, run_s=0.15, response_timeout_s=0.2)
    assert await pool.scale(1)
    jobs = [make_job(queue, n) for n in range(3)]
    for job in jobs:
        queue.put(job)
    results = await asyncio.gather(*(j.future for j in jobs))
    assert [r.body for r in results] == [b"r0", b"r1", b"r2"]
    assert workers[0].sent == [["r0"], ["r1"], ["r2"]]
    await pool.stop()


async def test_retiring_a_worker_lets_the_batches_it_holds_finish() -> None:
    queue = JobQueue(100)
    pool, workers = gated_pool(queue)
    assert await pool.scale(1)
    jobs = [make_job(queue, n) for n in range(2)]
    for job in jobs:
        queue.put(job)
    await settle()
    (worker,) = workers
    assert worker.sent == [["r0"], ["r1"]]
    scaling = asyncio.ensure_future(pool.scale(0))
    await settle()
    assert not scaling.done()
    worker.release("r0")
    worker.release("r1")
    await scaling
    assert [j.future.result().body for j in jobs] == [b"r0", b"r1"]
    assert worker.alive is False
