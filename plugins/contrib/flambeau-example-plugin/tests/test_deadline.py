"""The ``deadline`` strategy on a manual clock, against the Batcher protocol only.

``ManualQueue`` implements :class:`flambeau.api.JobQueue` with virtual time, which is how a
plugin author tests a strategy without the server or wall-clock sleeps.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import pytest
from flambeau.api import Job
from flambeau.plugins.builtin.batching import TorchServeBatcher

from flambeau_example.deadline import DeadlineBatcher


@dataclass
class FakeJob:
    name: str
    enqueued_at: float
    cancelled: bool = False

    def is_cancelled(self) -> bool:
        return self.cancelled


class ManualQueue:
    """A JobQueue whose ``now`` only moves when the test calls ``advance``."""

    def __init__(self) -> None:
        self.time = 0.0
        self.jobs: deque[Job] = deque()
        self.waiters: list[tuple[float, asyncio.Future[bool]]] = []

    def __len__(self) -> int:
        return len(self.jobs)

    def now(self) -> float:
        return self.time

    def put(self, name: str, enqueued_at: float | None = None) -> FakeJob:
        job = FakeJob(name, self.time if enqueued_at is None else enqueued_at)
        self.jobs.append(job)
        self._wake(lambda _deadline: True, True)
        return job

    def pop_nowait(self) -> Job | None:
        while self.jobs:
            job = self.jobs.popleft()
            if not job.is_cancelled():
                return job
        return None

    def requeue(self, jobs: Sequence[Job]) -> None:
        self.jobs.extendleft(reversed(jobs))

    async def wait_nonempty(self, timeout: float | None) -> bool:
        if self.jobs:
            return True
        deadline = math.inf if timeout is None else self.time + timeout
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.waiters.append((deadline, future))
        return await future

    async def advance(self, seconds: float) -> None:
        self.time += seconds
        self._wake(lambda deadline: deadline <= self.time, False)
        await settle()

    def _wake(self, due: Callable[[float], bool], result: bool) -> None:
        keep = []
        for deadline, future in self.waiters:
            if not future.done() and due(deadline):
                future.set_result(result)
            elif not future.done():
                keep.append((deadline, future))
        self.waiters = keep


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def names(batch: Sequence[Job]) -> list[str]:
    return [cast(FakeJob, job).name for job in batch]


async def test_a_full_batch_leaves_at_once() -> None:
    queue = ManualQueue()
    for name in "abcd":
        queue.put(name)
    batch = await DeadlineBatcher().next_batch(queue, 3, 1.0)
    assert names(batch) == ["a", "b", "c"]
    assert names(list(queue.jobs)) == ["d"]


async def test_a_fresh_request_waits_for_company_until_its_deadline() -> None:
    queue = ManualQueue()
    queue.put("a")
    task = asyncio.create_task(DeadlineBatcher().next_batch(queue, 4, 1.0))
    await queue.advance(0.4)
    queue.put("b")
    await settle()
    assert not task.done()
    await queue.advance(0.6)  # a's deadline: 1.0 s after it was queued
    assert names(task.result()) == ["a", "b"]


async def test_a_request_that_already_waited_leaves_without_waiting_again() -> None:
    # Queued at t=0 while every worker was busy; a worker frees up at t=2.
    queue = ManualQueue()
    queue.put("late", enqueued_at=0.0)
    queue.time = 2.0
    batch = await asyncio.wait_for(DeadlineBatcher().next_batch(queue, 4, 1.0), 1)
    assert names(batch) == ["late"]


async def test_torchserves_strategy_would_make_it_wait_again() -> None:
    # The contrast that motivates the plugin: TorchServe's clock starts at the worker's pull.
    queue = ManualQueue()
    queue.put("late", enqueued_at=0.0)
    queue.time = 2.0
    task = asyncio.create_task(TorchServeBatcher().next_batch(queue, 4, 1.0))
    await settle()
    assert not task.done()
    await queue.advance(1.0)
    assert names(task.result()) == ["late"]


async def test_jobs_whose_client_left_are_skipped() -> None:
    queue = ManualQueue()
    queue.put("gone").cancelled = True
    queue.put("a")
    queue.put("b")
    batch = await DeadlineBatcher().next_batch(queue, 2, 1.0)
    assert names(batch) == ["a", "b"]


async def test_cancellation_hands_popped_jobs_back_in_order() -> None:
    queue = ManualQueue()
    queue.put("a")
    queue.put("b")
    task = asyncio.create_task(DeadlineBatcher().next_batch(queue, 4, 10.0))
    await settle()
    queue.put("c")  # front of the queue after the requeue: a, b, then c
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert names(list(queue.jobs)) == ["a", "b", "c"]
