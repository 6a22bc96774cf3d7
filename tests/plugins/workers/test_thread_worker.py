"""The ``thread`` worker backend: the handler runs on a dedicated thread of this process."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from flambeau.api import RequestInput, WorkerRequest, WorkerSpec
from flambeau.plugins.builtin.workers import WorkerDiedError, WorkerStartError
from flambeau.plugins.builtin.workers.thread import ThreadWorkerBackend

T = TypeVar("T")
pytestmark = pytest.mark.timeout(60)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def req(rid: str, **body: Any) -> WorkerRequest:
    payload = json.dumps(body).encode()
    return WorkerRequest(rid, {}, [RequestInput("body", payload, "application/json")])


def test_thread_worker_answers_batches_on_one_dedicated_thread(
    make_model: Callable[..., Path],
    make_spec: Callable[..., WorkerSpec],
    service_factory: str | None,
) -> None:
    spec = make_spec(make_model(), batch_size=2)

    async def scenario() -> None:
        worker = ThreadWorkerBackend(service_factory=service_factory).create_worker(spec)
        await worker.start()
        try:
            assert worker.is_alive()
            assert worker.pid == os.getpid()
            assert worker.memory_usage() > 0
            result = await worker.infer(
                [req("a", op="double", x=[1, 2]), req("b", op="double", x=[4])]
            )
            assert result.code == 200
            assert [json.loads(r.body) for r in result.responses] == [[2, 4], [8]]
            assert any(m.name == "PredictionTime" for m in result.metrics)
            names = set()
            for i in range(3):
                answer = await worker.infer([req(str(i), op="thread")])
                names.add(answer.responses[0].body.decode())
            assert len(names) == 1
            assert names.pop().startswith("flambeau-9000")
        finally:
            await worker.stop()
        assert not worker.is_alive()
        with pytest.raises(WorkerDiedError):
            await worker.infer([req("x", op="noop")])

    run(scenario())


def test_thread_worker_streams_partials_in_order(
    make_model: Callable[..., Path],
    make_spec: Callable[..., WorkerSpec],
    service_factory: str | None,
) -> None:
    spec = make_spec(make_model())

    async def scenario() -> None:
        worker = ThreadWorkerBackend(service_factory=service_factory).create_worker(spec)
        await worker.start()
        try:
            chunks: list[bytes] = []
            result = await worker.infer(
                [req("a", op="stream", n=5)],
                on_partial=lambda rs: chunks.extend(r.body for r in rs if r.stream_next),
            )
            assert chunks == [f"chunk{i}-0".encode() for i in range(5)]
            assert result.responses[0].body == b"done"
        finally:
            await worker.stop()

    run(scenario())


def test_thread_worker_survives_a_handler_error(
    make_model: Callable[..., Path],
    make_spec: Callable[..., WorkerSpec],
    service_factory: str | None,
) -> None:
    spec = make_spec(make_model())

    async def scenario() -> None:
        worker = ThreadWorkerBackend(service_factory=service_factory).create_worker(spec)
        await worker.start()
        try:
            failed = await worker.infer([req("a", op="fail")])
            assert failed.code >= 500
            assert worker.is_alive()
            ok = await worker.infer([req("b", op="double", x=[1])])
            assert json.loads(ok.responses[0].body) == [2]
        finally:
            await worker.stop()

    run(scenario())


def test_thread_worker_load_failure_raises_with_the_handler_error(
    make_model: Callable[..., Path],
    make_spec: Callable[..., WorkerSpec],
    service_factory: str | None,
) -> None:
    spec = make_spec(make_model('raise RuntimeError("thread kaboom")\n'))

    async def scenario() -> None:
        worker = ThreadWorkerBackend(service_factory=service_factory).create_worker(spec)
        with pytest.raises(WorkerStartError, match="thread kaboom") as info:
            await worker.start()
        assert info.value.status == 500
        assert not worker.is_alive()
        await worker.stop()

    run(scenario())


def test_thread_worker_startup_timeout(
    make_model: Callable[..., Path], make_spec: Callable[..., WorkerSpec]
) -> None:
    spec = make_spec(make_model("import time\ntime.sleep(1.5)\n"), startup_timeout_s=0.3)

    async def scenario() -> None:
        worker = ThreadWorkerBackend(
            service_factory="workers_stub_service:StubService.load"
        ).create_worker(spec)
        started = time.monotonic()
        with pytest.raises(WorkerStartError, match=r"did not load within 0\.3 s"):
            await worker.start()
        assert time.monotonic() - started < 1.0
        assert not worker.is_alive()

    run(scenario())


def test_thread_worker_cancelled_infer_retires_it(
    make_model: Callable[..., Path], make_spec: Callable[..., WorkerSpec]
) -> None:
    spec = make_spec(make_model())

    async def scenario() -> None:
        worker = ThreadWorkerBackend(
            service_factory="workers_stub_service:StubService.load"
        ).create_worker(spec)
        await worker.start()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(worker.infer([req("a", op="sleep", s=0.5)]), 0.1)
        assert not worker.is_alive()
        with pytest.raises(WorkerDiedError):
            await worker.infer([req("b", op="noop")])
        stopping = time.monotonic()
        await worker.stop(timeout_s=5.0)
        assert time.monotonic() - stopping < 0.5  # does not wait for the stuck handler

    run(scenario())
