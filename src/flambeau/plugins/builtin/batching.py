"""Batching strategies: TorchServe's (``torchserve``) and a no-wait one (``eager``).

``torchserve``: an idle worker waits for a first job, then keeps taking jobs until it has
``batch_size`` of them or ``max_batch_delay`` has passed since the first (TorchServe's
``BatchAggregator``). ``eager``: an idle worker takes the first job and whatever else is queued
at that moment, up to ``batch_size``, and never waits: under light load a request runs at once;
under heavy load the queue fills while the worker is busy, so batches still fill up.
``torchserve`` hands popped jobs back if cancelled (a worker retired while it waited for
more); ``eager`` never waits after popping.
"""

from __future__ import annotations

import asyncio
from typing import Any

from flambeau.api import BatcherSpec, Job, JobQueue, hookimpl


async def _first_job(queue: JobQueue) -> Job:
    while True:
        await queue.wait_nonempty(None)
        job = queue.pop_nowait()
        if job is not None:
            return job


class TorchServeBatcher:
    """Fill up to ``max_size`` or until ``max_delay_s`` after the first job."""

    async def next_batch(self, queue: JobQueue, max_size: int, max_delay_s: float) -> list[Job]:
        first = await _first_job(queue)
        batch = [first]
        try:
            deadline = queue.now() + max_delay_s
            while len(batch) < max_size:
                job = queue.pop_nowait()
                if job is not None:
                    batch.append(job)
                    continue
                remaining = deadline - queue.now()
                if remaining <= 0 or not await queue.wait_nonempty(remaining):
                    break
        except asyncio.CancelledError:
            queue.requeue(batch)
            raise
        return batch


class EagerBatcher:
    """Take what is queued now, up to ``max_size``; never wait for more."""

    async def next_batch(self, queue: JobQueue, max_size: int, max_delay_s: float) -> list[Job]:
        batch = [await _first_job(queue)]
        while len(batch) < max_size:
            job = queue.pop_nowait()
            if job is None:
                break
            batch.append(job)
        return batch


@hookimpl
def flambeau_batchers(config: Any) -> list[BatcherSpec]:
    return [
        BatcherSpec("torchserve", TorchServeBatcher, "TorchServe's batch_size / max_batch_delay"),
        BatcherSpec("eager", EagerBatcher, "dispatch whatever is queued when a worker is free"),
    ]
