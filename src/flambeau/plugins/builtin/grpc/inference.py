"""TorchServe's ``InferenceAPIsService`` over the transport-agnostic data plane.

Each map entry of a ``PredictionsRequest`` becomes a named input without a content type; the
request goes through ``server.models.submit`` like a REST one. ``StreamPredictions`` answers
one message per intermediate response of a streaming handler, then the final one;
``StreamPredictions2`` runs the messages of a bidirectional stream in order with TorchServe's
sequence headers and reports errors in-band. As in TorchServe, a request that cannot be queued
(no model name, unknown model, no worker) fails with ``INTERNAL``; a worker's error code maps by
§7.4 (e.g. 503 -> ``UNAVAILABLE``, 404 -> ``NOT_FOUND``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import grpc.aio

from flambeau.api import FlambeauError, RequestInput, WorkerRequest, WorkerResponse
from flambeau.plugins.builtin.grpc._generated import inference_pb2, inference_pb2_grpc
from flambeau.plugins.builtin.grpc.status import internal_error, renders_errors, rpc_status

MODEL_NAME_REQUIRED = "Parameter model_name is required."


def health_document(healthy: bool) -> str:
    """TorchServe's ``health`` string: the pretty JSON of REST ``/ping`` (no trailing newline)."""
    return json.dumps({"status": "Healthy" if healthy else "Unhealthy"}, indent=2)


def response_error(response: WorkerResponse) -> FlambeauError | None:
    """A handler's own error status (``context.set_response_status``) as an error, else None."""
    if response.status < 400:
        return None
    message = response.reason or response.body[:1000].decode("utf-8", "replace")
    return FlambeauError(message or "Prediction failed", status=response.status)


class InferenceServicer:
    """The four rpcs of ``org.pytorch.serve.grpc.inference.InferenceAPIsService``."""

    def __init__(self, server: Any) -> None:
        self._server = server
        config = server.config
        self._sequence_id = config.get_str("ts_header_key_sequence_id", "ts_request_sequence_id")
        self._sequence_start = config.get_str(
            "ts_header_key_sequence_start", "ts_request_sequence_start"
        )
        self._sequence_end = config.get_str("ts_header_key_sequence_end", "ts_request_sequence_end")

    @renders_errors
    async def Ping(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return inference_pb2.TorchServeHealthResponse(
            health=health_document(self._server.models.healthy())
        )

    @renders_errors
    async def Predictions(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        # A streaming handler's chunks arrive whole, as REST's chunked body does.
        async with contextlib.aclosing(self._responses(request, {})) as responses:
            chunks = [response.body async for response in responses]
        return inference_pb2.PredictionResponse(prediction=b"".join(chunks))

    @renders_errors
    async def StreamPredictions(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        async with contextlib.aclosing(self._responses(request, {})) as responses:
            async for response in responses:
                yield inference_pb2.PredictionResponse(prediction=response.body)

    async def StreamPredictions2(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        sequence: str | None = None
        async for request in requests:
            given = request.sequence_id if request.HasField("sequence_id") else ""
            start = sequence is None or (bool(given) and given != sequence)
            sequence = given or sequence or f"ts-seq-{uuid.uuid4()}"
            headers = {self._sequence_id: sequence}
            if start:
                headers[self._sequence_start] = "true"
            end = request.input.get(self._sequence_end, b"").strip().lower() == b"true"
            if end:
                headers[self._sequence_end] = "true"
            try:
                async with contextlib.aclosing(self._responses(request, headers)) as responses:
                    async for response in responses:
                        yield inference_pb2.PredictionResponse(
                            prediction=response.body, sequence_id=sequence
                        )
            except FlambeauError as exc:
                # TorchServe keeps the stream open and reports the failure of one message in it.
                yield inference_pb2.PredictionResponse(sequence_id=sequence, status=rpc_status(exc))
            except Exception:
                error = internal_error("StreamPredictions2")
                yield inference_pb2.PredictionResponse(
                    sequence_id=sequence, status=rpc_status(error)
                )
            if end:
                sequence = None

    async def _responses(
        self, request: Any, headers: dict[str, str]
    ) -> AsyncGenerator[WorkerResponse, None]:
        """Every intermediate response of ``request``, then the final one; errors raised."""
        name = request.model_name
        version = request.model_version or None
        work = WorkerRequest(
            str(uuid.uuid4()),
            headers,
            [RequestInput(key, value) for key, value in request.input.items()],
        )
        partials: asyncio.Queue[WorkerResponse | None] = asyncio.Queue()
        future = self._submit(name, version, work, partials.put_nowait)
        # Partials are delivered before the job's future resolves, so the end marker follows them.
        future.add_done_callback(lambda _: partials.put_nowait(None))
        with self._server.prediction(name, version):
            try:
                while (partial := await partials.get()) is not None:
                    error = response_error(partial)
                    if error is not None:
                        raise error
                    yield partial
                final = future.result()
                error = response_error(final)
                if error is not None:
                    raise error
                yield final
            finally:
                # A client that went away drops its queued request before it reaches a worker.
                if not future.done():
                    future.cancel()

    def _submit(
        self, name: str, version: str | None, work: WorkerRequest, on_partial: Any
    ) -> asyncio.Future[WorkerResponse]:
        if not name:
            raise FlambeauError(MODEL_NAME_REQUIRED, status=500, error_type="BadRequestException")
        try:
            return self._server.models.submit(name, version, work, on_partial)
        except FlambeauError as exc:
            # TorchServe answers INTERNAL to a request it cannot queue: unknown model or
            # version, no worker, full queue.
            raise FlambeauError(exc.message, status=500, error_type=exc.error_type) from None


def add_inference_service(grpc_server: Any, server: Any) -> None:
    """The ``GrpcServiceSpec.add_to_server`` of the inference service."""
    inference_pb2_grpc.add_InferenceAPIsServiceServicer_to_server(
        InferenceServicer(server), grpc_server
    )
