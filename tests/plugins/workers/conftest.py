"""Fixtures for the worker backend tests: model directories, specs, and the service to use.

Every backend test runs against the stand-in service (``workers_stub_service``) and, once it
exists, against the real handler SDK (``flambeau.handler.service.ModelService``).
"""

from __future__ import annotations

import importlib.util
import os
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from flambeau.api import ModelLoadSpec, WorkerSpec

HERE = Path(__file__).resolve().parent
STUB_FACTORY = "workers_stub_service:StubService.load"

# A TorchServe-style function handler driven by the request body (JSON {"op": ...}).
HANDLER = textwrap.dedent(
    """
    import json, os, sys, threading, time

    print("handler module imported", flush=True)


    def _value(row):
        value = row.get("body", row.get("data"))
        if isinstance(value, (bytes, bytearray)):
            value = json.loads(value)
        return value


    def _stream(context, chunks):
        sink = getattr(context, "stub_send", None)
        if sink is not None:
            sink(chunks)
        else:
            from flambeau.handler.utils import send_intermediate_predict_response

            send_intermediate_predict_response(
                chunks, context.request_ids, "Intermediate Prediction success", 200, context
            )


    def handle(data, context):
        if data is None:  # TorchServe's initialisation call for function handlers
            return None
        rows = [_value(row) for row in data]
        stream = [row for row in rows if row.get("op") == "stream"]
        if stream:
            for i in range(stream[0]["n"]):
                _stream(context, [f"chunk{i}-{j}" for j in range(len(rows))])
            return ["done"] * len(rows)
        out = []
        for row in rows:
            op = row["op"]
            if op == "double":
                out.append([2 * x for x in row["x"]])
            elif op == "fail":
                raise ValueError("handler exploded")
            elif op == "sleep":
                print("handler going to sleep", flush=True)
                time.sleep(row["s"])
                out.append("woke up")
            elif op == "big":
                out.append("x" * row["n"])
            elif op == "env":
                out.append({
                    "var": os.environ.get("FLAMBEAU_TEST_VAR"),
                    "cwd": os.getcwd(),
                    "affinity": sorted(os.sched_getaffinity(0)),
                    "pid": os.getpid(),
                })
            elif op == "thread":
                out.append(threading.current_thread().name)
            elif op == "noop":
                out.append(b"")
        return out
    """
)


def sdk_available() -> bool:
    return importlib.util.find_spec("flambeau.handler.service") is not None


@pytest.fixture(
    params=[
        "stub",
        pytest.param(
            "sdk",
            marks=pytest.mark.skipif(
                not sdk_available(), reason="flambeau.handler.service not written yet"
            ),
        ),
    ]
)
def service_factory(request: pytest.FixtureRequest) -> str | None:
    """The ``service_factory`` for the backends: the stand-in, or None for the real SDK."""
    return STUB_FACTORY if request.param == "stub" else None


@pytest.fixture
def worker_env() -> dict[str, str]:
    """Lets the worker process import the stand-in service from this directory."""
    paths = [str(HERE), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {"PYTHONPATH": os.pathsep.join(paths)}


@pytest.fixture
def make_model(tmp_path: Path) -> Callable[..., Path]:
    """Write a model directory holding ``handler.py`` with the given source."""

    def make(source: str = HANDLER, name: str = "model") -> Path:
        model_dir = tmp_path / name
        model_dir.mkdir()
        (model_dir / "handler.py").write_text(source)
        return model_dir

    return make


@pytest.fixture
def make_spec(tmp_path: Path, worker_env: dict[str, str]) -> Callable[..., WorkerSpec]:
    def make(model_dir: Path, **overrides: Any) -> WorkerSpec:
        load_fields = {
            k: overrides.pop(k) for k in ("batch_size", "intra_op_threads") if k in overrides
        }
        load = ModelLoadSpec("echo", "1.0", str(model_dir), "handler:handle", **load_fields)
        env = {**worker_env, **overrides.pop("env", {})}
        settings: dict[str, Any] = {
            "worker_id": "9000",
            "log_dir": str(tmp_path / "logs"),
            "startup_timeout_s": 30.0,
            "env": env,
        }
        settings.update(overrides)
        return WorkerSpec(load=load, **settings)

    return make
