"""The ``process`` worker backend against real worker processes and real model directories."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest

from flambeau.api import (
    PayloadTooLargeError,
    RequestInput,
    WorkerRequest,
    WorkerResponse,
    WorkerSpec,
)
from flambeau.plugins.builtin.workers import WorkerDiedError, WorkerStartError
from flambeau.plugins.builtin.workers.process import ProcessWorker, ProcessWorkerBackend

T = TypeVar("T")
pytestmark = pytest.mark.timeout(60)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def req(rid: str, **body: Any) -> WorkerRequest:
    payload = json.dumps(body).encode()
    return WorkerRequest(rid, {"x-test": "1"}, [RequestInput("body", payload, "application/json")])


def body_json(resp: WorkerResponse) -> Any:
    return json.loads(resp.body)


def gone(pid: int) -> bool:
    """True when no process (zombies included) has this pid any more."""
    return not psutil.pid_exists(pid)


def dead_or_orphan_zombie(pid: int, within_s: float = 2.0) -> bool:
    """SIGKILL is delivered when the process is next scheduled: give it a moment."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)


async def wait_for_line(worker: ProcessWorker, text: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not any(text in line for line in worker.log_tail):
        assert time.monotonic() < deadline, f"worker never printed {text!r}: {worker.log_tail}"
        await asyncio.sleep(0.01)


def backend(service_factory: str | None, **kwargs: Any) -> ProcessWorkerBackend:
    return ProcessWorkerBackend(service_factory=service_factory, **kwargs)


def test_worker_answers_a_batch_and_logs_its_output(
    make_model: Callable[..., Path],
    make_spec: Callable[..., WorkerSpec],
    service_factory: str | None,
    tmp_path: Path,
) -> None:
    spec = make_spec(make_model(), batch_size=4)

    async def scenario() -> None:
        worker = backend(service_factory).create_worker(spec)
        await worker.start()
        try:
            assert worker.is_alive()
            assert worker.pid is not None
            assert worker.pid != os.getpid()
            assert worker.memory_usage() > 1_000_000
            batch = [
                req("a", op="double", x=[1, 2]),
                req("b", op="double", x=[]),
                req("c", op="double", x=[5]),
            ]
            result = await worker.infer(batch)
            assert result.code == 200
            assert [r.request_id for r in result.responses] == ["a", "b", "c"]
            assert [body_json(r) for r in result.responses] == [[2, 4], [], [10]]
            assert any(m.name == "PredictionTime" for m in result.metrics)
            # The same worker serves the next batch.
            again = await worker.infer([req("d", op="double", x=[21])])
            assert body_json(again.responses[0]) == [42]
        finally:
            pid = worker.pid
            await worker.stop()
        assert pid is not None
        assert gone(pid)
        assert not worker.is_alive()
        assert worker.memory_usage() == 0

    run(scenario())
    log_text = (tmp_path / "logs" / "model_log.log").read_text()
    assert "W-9000-echo_1.0-stdout MODEL_LOG - handler module imported" in log_text


def test_streaming_partials_arrive_in_order_before_the_result(
    make_model: Callable[..., Path],
    make_spec: Callable[..., WorkerSpec],
    service_factory: str | None,
) -> None:
    spec = make_spec(make_model(), batch_size=2)

    async def scenario() -> None:
        worker = backend(service_factory).create_worker(spec)
        await worker.start()
        try:
            chunks: list[tuple[str, bytes, bool]] = []
            result = await worker.infer(
                [req("a", op="stream", n=4), req("b", op="noop")],
                on_partial=lambda rs: chunks.extend(
                    (r.request_id, r.body, r.stream_next) for r in rs
                ),
            )
            expected = [
                (rid, f"chunk{i}-{j}".encode(), True)
                for i in range(4)
                for j, rid in enumerate(["a", "b"])
            ]
            assert chunks == expected
            assert result.code == 200
            assert [r.body for r in result.responses] == [b"done", b"done"]
            assert not any(r.stream_next for r in result.responses)
        finally:
            await worker.stop()

    run(scenario())


def test_handler_error_fails_the_batch_and_the_worker_lives_on(
    make_model: Callable[..., Path],
    make_spec: Callable[..., WorkerSpec],
    service_factory: str | None,
) -> None:
    spec = make_spec(make_model())

    async def scenario() -> None:
        worker = backend(service_factory).create_worker(spec)
        await worker.start()
        try:
            pid = worker.pid
            failed = await worker.infer([req("a", op="fail")])
            assert failed.code >= 500
            assert failed.responses == []
            assert worker.is_alive()
            ok = await worker.infer([req("b", op="double", x=[3])])
            assert ok.code == 200
            assert body_json(ok.responses[0]) == [6]
            assert worker.pid == pid
        finally:
            await worker.stop()

    run(scenario())


def test_sigkill_mid_request_fails_promptly_with_worker_died_and_leaves_no_zombie(
    make_model: Callable[..., Path], make_spec: Callable[..., WorkerSpec]
) -> None:
    spec = make_spec(make_model())

    async def scenario() -> None:
        worker = backend("workers_stub_service:StubService.load").create_worker(spec)
        await worker.start()
        pid = worker.pid
        assert pid is not None
        try:
            infer = asyncio.ensure_future(worker.infer([req("a", op="sleep", s=60)]))
            await wait_for_line(worker, "handler going to sleep")
            killed_at = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            with pytest.raises(WorkerDiedError) as info:
                await infer
            assert time.monotonic() - killed_at < 2.0
            assert info.value.message == "Worker died."
            assert info.value.status == 507  # SIGKILL reads as the OOM killer
            assert not worker.is_alive()
            assert gone(pid)  # reaped: no zombie
            with pytest.raises(WorkerDiedError):
                await worker.infer([req("b", op="noop")])
        finally:
            await worker.stop()

    run(scenario())


def test_worker_exit_without_sigkill_is_a_500(
    make_model: Callable[..., Path], make_spec: Callable[..., WorkerSpec]
) -> None:
    spec = make_spec(make_model())

    async def scenario() -> None:
        worker = backend("workers_stub_service:StubService.load").create_worker(spec)
        await worker.start()
        try:
            infer = asyncio.ensure_future(worker.infer([req("a", op="sleep", s=60)]))
            await wait_for_line(worker, "handler going to sleep")
            assert worker.pid is not None
            os.kill(worker.pid, signal.SIGTERM)
            with pytest.raises(WorkerDiedError) as info:
                await infer
            assert info.value.status == 500
            assert info.value.exit_code == -signal.SIGTERM
        finally:
            await worker.stop()

    run(scenario())


def test_load_failure_raises_with_the_handler_error(
    make_model: Callable[..., Path],
    make_spec: Callable[..., WorkerSpec],
    service_factory: str | None,
) -> None:
    model = make_model('raise RuntimeError("kaboom at import time")\n')
    spec = make_spec(model)

    async def scenario() -> None:
        worker = backend(service_factory).create_worker(spec)
        with pytest.raises(WorkerStartError) as info:
            await worker.start()
        assert "kaboom at import time" in info.value.message
        assert info.value.status == 500
        assert worker.pid is not None
        assert gone(worker.pid)
        assert not worker.is_alive()
        await worker.stop()  # harmless after a failed start

    run(scenario())


def test_missing_model_dir_fails_start_cleanly(
    make_spec: Callable[..., WorkerSpec], tmp_path: Path
) -> None:
    spec = make_spec(tmp_path / "no-such-model")

    async def scenario() -> None:
        worker = backend("workers_stub_service:StubService.load").create_worker(spec)
        with pytest.raises(WorkerStartError, match="Cannot start worker"):
            await worker.start()
        assert worker.pid is None
        assert not worker.is_alive()
        await worker.stop()

    run(scenario())


def test_startup_timeout_kills_the_worker_and_reports_its_output(
    make_model: Callable[..., Path], make_spec: Callable[..., WorkerSpec]
) -> None:
    model = make_model('import time\nprint("loading forever", flush=True)\ntime.sleep(60)\n')
    spec = make_spec(model, startup_timeout_s=2.5)

    async def scenario() -> None:
        worker = backend("workers_stub_service:StubService.load").create_worker(spec)
        started = time.monotonic()
        starting = asyncio.ensure_future(worker.start())
        await wait_for_line(worker, "loading forever")
        with pytest.raises(WorkerStartError) as info:
            await starting
        assert time.monotonic() - started < 6.0
        assert "did not load within 2.5 s" in info.value.message
        assert "loading forever" in info.value.message
        assert worker.pid is not None
        assert gone(worker.pid)

    run(scenario())


def test_cancelled_start_leaves_no_process_behind(
    make_model: Callable[..., Path], make_spec: Callable[..., WorkerSpec]
) -> None:
    model = make_model('import time\nprint("loading slowly", flush=True)\ntime.sleep(60)\n')
    spec = make_spec(model)

    async def scenario() -> None:
        worker = backend("workers_stub_service:StubService.load").create_worker(spec)
        starting = asyncio.ensure_future(worker.start())
        await wait_for_line(worker, "loading slowly")
        starting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await starting
        assert worker.pid is not None
        assert gone(worker.pid)

    run(scenario())


def test_stop_leaves_no_process_behind_including_handler_children(
    make_model: Callable[..., Path], make_spec: Callable[..., WorkerSpec], tmp_path: Path
) -> None:
    pid_file = tmp_path / "child.pid"
    source = (
        "import subprocess\n"
        f"child = subprocess.Popen(['sleep', '60'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "def handle(data, context):\n"
        "    return data and [b''] * len(data)\n"
    )
    spec = make_spec(make_model(source))

    async def scenario() -> None:
        worker = backend("workers_stub_service:StubService.load").create_worker(spec)
        await worker.start()
        pid = worker.pid
        assert pid is not None
        child = int(pid_file.read_text())
        assert psutil.pid_exists(child)
        stopping = time.monotonic()
        await worker.stop(timeout_s=5.0)
        # The child holds the worker's stdout/stderr: stopping must not wait for those pipes.
        assert time.monotonic() - stopping < 2.0
        assert gone(pid)
        # Killed; as an orphan it may stay a zombie until init (not us) reaps it.
        assert dead_or_orphan_zombie(child)
        await worker.stop()  # idempotent

    run(scenario())


def test_cancelled_infer_retires_the_worker_and_stop_kills_it_fast(
    make_model: Callable[..., Path], make_spec: Callable[..., WorkerSpec]
) -> None:
    spec = make_spec(make_model())

    async def scenario() -> None:
        worker = backend("workers_stub_service:StubService.load").create_worker(spec)
        await worker.start()
        pid = worker.pid
        assert pid is not None
        # What the pool does on a response timeout: wait_for, then stop().
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(worker.infer([req("a", op="sleep", s=60)]), 0.5)
        assert not worker.is_alive()
        with pytest.raises(WorkerDiedError):
            await worker.infer([req("b", op="noop")])
        stopping = time.monotonic()
        await worker.stop(timeout_s=10.0)
        assert time.monotonic() - stopping < 3.0
        assert gone(pid)

    run(scenario())


def test_batches_in_flight_are_bounded_and_answered_in_order(
    make_model: Callable[..., Path], make_spec: Callable[..., WorkerSpec]
) -> None:
    spec = make_spec(make_model())

    async def scenario() -> None:
        worker = backend("workers_stub_service:StubService.load", max_in_flight=2).create_worker(
            spec
        )
        await worker.start()
        try:
            first = asyncio.ensure_future(worker.infer([req("a", op="sleep", s=0.3)]))
            second = asyncio.ensure_future(worker.infer([req("b", op="double", x=[1, 2])]))
            order: list[str] = []
            first.add_done_callback(lambda _: order.append("a"))
            second.add_done_callback(lambda _: order.append("b"))
            await asyncio.sleep(0.05)
            with pytest.raises(RuntimeError, match="in flight"):
                await worker.infer([req("c", op="noop")])
            # The second batch waited in the socket behind the first, then ran.
            assert (await first).responses[0].body == b"woke up"
            assert body_json((await second).responses[0]) == [2, 4]
            await asyncio.sleep(0)  # done callbacks run on the next loop pass
            assert order == ["a", "b"]
        finally:
            await worker.stop()

    run(scenario())


def test_one_batch_in_flight_when_configured_so(
    make_model: Callable[..., Path], make_spec: Callable[..., WorkerSpec]
) -> None:
    spec = make_spec(make_model())

    async def scenario() -> None:
        worker = backend("workers_stub_service:StubService.load", max_in_flight=1).create_worker(
            spec
        )
        await worker.start()
        try:
            first = asyncio.ensure_future(worker.infer([req("a", op="sleep", s=0.3)]))
            await asyncio.sleep(0.05)
            with pytest.raises(RuntimeError, match="in flight"):
                await worker.infer([req("b", op="noop")])
            assert (await first).responses[0].body == b"woke up"
        finally:
            await worker.stop()

    run(scenario())


def test_a_worker_that_dies_fails_every_batch_it_holds(
    make_model: Callable[..., Path], make_spec: Callable[..., WorkerSpec]
) -> None:
    spec = make_spec(make_model())

    async def scenario() -> None:
        worker = backend("workers_stub_service:StubService.load", max_in_flight=2).create_worker(
            spec
        )
        await worker.start()
        try:
            first = asyncio.ensure_future(worker.infer([req("a", op="sleep", s=5)]))
            second = asyncio.ensure_future(worker.infer([req("b", op="noop")]))
            await asyncio.sleep(0.1)
            assert worker.pid is not None
            os.kill(worker.pid, signal.SIGKILL)
            results = await asyncio.wait_for(
                asyncio.gather(first, second, return_exceptions=True), 5
            )
            assert all(isinstance(r, WorkerDiedError) for r in results), results
        finally:
            await worker.stop()

    run(scenario())


def test_env_cwd_and_cpu_affinity_reach_the_worker(
    make_model: Callable[..., Path], make_spec: Callable[..., WorkerSpec]
) -> None:
    model = make_model()
    spec = make_spec(model, env={"FLAMBEAU_TEST_VAR": "from-spec"}, cpu_affinity=(0,))

    async def scenario() -> None:
        worker = backend("workers_stub_service:StubService.load").create_worker(spec)
        await worker.start()
        try:
            result = await worker.infer([req("a", op="env")])
            seen = body_json(result.responses[0])
            assert seen["var"] == "from-spec"
            assert seen["cwd"] == str(model)
            assert seen["pid"] == worker.pid
            if hasattr(os, "sched_setaffinity"):
                assert seen["affinity"] == [0]
        finally:
            await worker.stop()

    run(scenario())


def test_size_limits_on_requests_and_responses(
    make_model: Callable[..., Path], make_spec: Callable[..., WorkerSpec]
) -> None:
    spec = make_spec(make_model(), max_response_bytes=1000)

    async def scenario() -> None:
        worker = backend(
            "workers_stub_service:StubService.load", max_request_bytes=10_000
        ).create_worker(spec)
        await worker.start()
        try:
            huge = WorkerRequest("h", {}, [RequestInput("body", b"x" * 2_000_000)])
            with pytest.raises(PayloadTooLargeError):
                await worker.infer([huge])
            result = await worker.infer([req("a", op="big", n=5000), req("b", op="big", n=10)])
            big, small = result.responses
            assert big.status == 500
            assert b"exceeds max_response_size" in big.body
            assert small.status == 200
            assert small.body == b"x" * 10
            assert worker.is_alive()
        finally:
            await worker.stop()

    run(scenario())


def test_backend_builds_from_server_config(tmp_path: Path) -> None:
    class Config:
        def get_int(self, key: str, default: int) -> int:
            return {"max_request_size": 1234, "worker_batches_in_flight": 1}.get(key, default)

        def get_str(self, key: str, default: str) -> str:
            return {"blacklist_env_vars": "SECRET_.*"}.get(key, default)

    built = ProcessWorkerBackend.from_config(Config(), str(tmp_path))
    assert built.max_request_bytes == 1234
    assert built.env_blacklist == "SECRET_.*"
    assert built.log_dir == str(tmp_path)
    assert built.max_in_flight == 1
