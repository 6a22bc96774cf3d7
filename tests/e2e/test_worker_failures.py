"""Workers that die, hang or fail, on a real server: the request in flight fails cleanly, the
worker comes back, the next request succeeds, and the other models never stop serving.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from flambeau.testing.fixtures import Response, ServerProcess


@pytest.fixture(scope="module")
def server(module_server: Any, sources: Any, e2e: Any, tmp_path_factory: Any) -> ServerProcess:
    store = tmp_path_factory.mktemp("store")
    e2e.store_with(sources, store, "probe", "probe_timeout")
    return module_server(
        model_store=store,
        args=["--models", "probe.mar", "other=probe.mar", "probe_timeout.mar"],
        config={"default_workers_per_model": "1"},
    )


def body(response: Response) -> dict[str, Any]:
    return dict(response.json())


def in_background(call: Any) -> tuple[threading.Thread, list[Any]]:
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(call()))
    thread.start()
    return thread, result


def replaced(server: ServerProcess, e2e: Any, model: str, old_pid: int) -> int:
    """Wait until ``model`` has a READY worker again, with another pid; return it."""
    pids = e2e.wait_for(
        lambda: [p for p in e2e.ready_pids(server, model) if p != old_pid],
        what=f"a new worker for {model}",
    )
    return int(pids[0])


def test_killed_worker_fails_its_request_and_comes_back(
    server: ServerProcess, e2e: Any, tmp_path: Path
) -> None:
    (pid,) = e2e.ready_pids(server, "probe")
    mark = tmp_path / "running"
    thread, result = in_background(
        lambda: e2e.predict(
            server, "/predictions/probe", b"x", headers={"x-sleep": "30", "x-mark": str(mark)}
        )
    )
    e2e.wait_for(mark.exists, what="the request to reach the handler")
    os.kill(pid, signal.SIGKILL)
    thread.join(30)
    # TorchServe's rule: "Worker died." with 507 when the exit says SIGKILL (137), else 500.
    assert body(result[0]) == {
        "code": 507,
        "type": "InternalServerException",
        "message": "Worker died.",
    }
    # A dead worker inside its retry window still counts as healthy.
    assert server.request("GET", "inference", "/ping").status == 200
    assert e2e.predict(server, "/predictions/other", b"x").status == 200
    new_pid = replaced(server, e2e, "probe", pid)
    answer = e2e.predict(server, "/predictions/probe", b"x")
    assert answer.status == 200
    assert body(answer)["pid"] == new_pid


def test_worker_that_exits_fails_its_request_and_comes_back(
    server: ServerProcess, e2e: Any
) -> None:
    (pid,) = e2e.ready_pids(server, "probe")
    died = e2e.predict(server, "/predictions/probe", b"x", headers={"x-exit": "1"})
    assert body(died) == {"code": 500, "type": "InternalServerException", "message": "Worker died."}
    assert e2e.predict(server, "/predictions/other", b"x").status == 200
    new_pid = replaced(server, e2e, "probe", pid)
    assert body(e2e.predict(server, "/predictions/probe", b"x"))["pid"] == new_pid


def test_response_timeout_replaces_the_worker(server: ServerProcess, e2e: Any) -> None:
    assert e2e.describe(server, "probe_timeout")["responseTimeout"] == 1
    (pid,) = e2e.ready_pids(server, "probe_timeout")
    started = time.monotonic()
    timed_out = e2e.predict(server, "/predictions/probe_timeout", b"x", headers={"x-sleep": "20"})
    elapsed = time.monotonic() - started
    assert body(timed_out) == {
        "code": 500,
        "type": "InternalServerException",
        "message": "Worker died.",
    }
    assert 0.9 < elapsed < 10
    new_pid = replaced(server, e2e, "probe_timeout", pid)
    assert body(e2e.predict(server, "/predictions/probe_timeout", b"x"))["pid"] == new_pid
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the hung worker was killed, not left behind


def test_handler_error_keeps_the_worker(server: ServerProcess, e2e: Any) -> None:
    (pid,) = e2e.ready_pids(server, "other")
    failed = e2e.predict(server, "/predictions/other", b"x", headers={"x-fail": "1"})
    assert body(failed) == {
        "code": 503,
        "type": "InternalServerException",
        "message": "Prediction failed",
    }
    assert body(e2e.predict(server, "/predictions/other", b"x"))["pid"] == pid
    assert e2e.predict(server, "/predictions/probe", b"x").status == 200
