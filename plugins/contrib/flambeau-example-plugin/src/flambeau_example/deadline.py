"""The ``deadline`` batching strategy: ``maxBatchDelay`` counts from a request's arrival.

TorchServe's strategy starts the ``maxBatchDelay`` clock when an idle worker takes the first
request, so a request that already waited in the queue behind busy workers waits again. Here
the clock starts when the oldest request of the batch was *queued*: once it has waited
``maxBatchDelay``, the batch leaves with whatever is queued, so no request waits for
batch-mates longer than that. Under light load both behave alike.
"""

from __future__ import annotations

import asyncio

from flambeau.api import Job, JobQueue

__all__ = ["DeadlineBatcher"]


class DeadlineBatcher:
    """A :class:`flambeau.api.Batcher`: up to ``max_size`` jobs, until the first job's deadline.

    Cancellation-safe, as the protocol requires: jobs popped before a cancellation (a worker
    retired mid-wait) go back to the front of the queue, in order.
    """

    async def next_batch(self, queue: JobQueue, max_size: int, max_delay_s: float) -> list[Job]:
        first = await _first_live_job(queue)
        batch = [first]
        deadline = first.enqueued_at + max_delay_s
        try:
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


async def _first_live_job(queue: JobQueue) -> Job:
    # pop_nowait skips jobs whose client went away; another worker may win the race too.
    while True:
        await queue.wait_nonempty(None)
        job = queue.pop_nowait()
        if job is not None:
            return job
