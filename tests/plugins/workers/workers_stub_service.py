"""A stand-in for the handler SDK's ModelService, loaded through the backends' factory seam.

It imports a TorchServe-style function handler (``module[:function]``) from the model dir by
file path, calls ``handle(None, context)`` once, then ``handle(data, context)`` per batch, and
streams through ``context.stub_send``. Just enough to exercise the worker backends.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import time
from collections.abc import Callable
from typing import Any

from flambeau.api import BatchResult, MetricRecord, ModelLoadSpec, WorkerRequest, WorkerResponse

_counter = itertools.count()


class StubLoadError(Exception):
    """Mirrors the SDK's HandlerLoadError: a message and a ``status``."""

    def __init__(self, message: str, status: int = 500) -> None:
        super().__init__(message)
        self.status = status


def _encode(value: Any) -> bytes:
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, str):
        return value.encode()
    return json.dumps(value).encode()


class StubContext:
    def __init__(self, spec: ModelLoadSpec, send: Callable[[BatchResult], None] | None) -> None:
        self.model_name = spec.model_name
        self.request_ids: dict[int, str] = {}
        self._send = send

    def stub_send(self, chunks: list[Any]) -> None:
        if self._send is None:
            raise RuntimeError("no intermediate sink")
        responses = [
            WorkerResponse(rid, body=_encode(chunk), stream_next=True)
            for rid, chunk in zip(self.request_ids.values(), chunks, strict=True)
        ]
        self._send(BatchResult(200, "Intermediate Prediction success", responses))


class StubService:
    def __init__(self, handle: Callable[..., Any], context: StubContext) -> None:
        self._handle = handle
        self._context = context
        self._metrics: list[MetricRecord] = []
        self.closed = False

    @classmethod
    def load(
        cls, spec: ModelLoadSpec, *, send_intermediate: Callable[[BatchResult], None] | None = None
    ) -> StubService:
        module_name, _, function = spec.handler.partition(":")
        path = os.path.join(spec.model_dir, module_name + ".py")
        try:
            # A unique module name: thread workers of several tests share one interpreter.
            mod_spec = importlib.util.spec_from_file_location(f"stub_{next(_counter)}", path)
            assert mod_spec is not None
            assert mod_spec.loader is not None
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        except Exception as exc:
            raise StubLoadError(f"cannot load handler {spec.handler}: {exc}") from exc
        handle = getattr(module, function or "handle")
        context = StubContext(spec, send_intermediate)
        handle(None, context)
        return cls(handle, context)

    def predict(self, requests: list[WorkerRequest]) -> BatchResult:
        self._context.request_ids = {i: r.request_id for i, r in enumerate(requests)}
        data = [{item.name: item.value for item in r.inputs} for r in requests]
        started = time.perf_counter()
        try:
            outputs = self._handle(data, self._context)
        except Exception as exc:
            return BatchResult(503, f"Prediction failed: {exc}")
        ms = (time.perf_counter() - started) * 1000
        self._metrics.append(
            MetricRecord("PredictionTime", ms, "ms", (("ModelName", self._context.model_name),))
        )
        return BatchResult(
            200,
            "Prediction success",
            [
                WorkerResponse(r.request_id, body=_encode(o))
                for r, o in zip(requests, outputs, strict=True)
            ],
        )

    def drain_metrics(self) -> list[MetricRecord]:
        metrics, self._metrics = self._metrics, []
        return metrics

    def close(self) -> None:
        self.closed = True
