"""TorchServe's REST inference API: predictions, explanations and the legacy MMS route.

Form fields become named inputs, any other body the input ``body``; every header travels, plus
``explain`` and ``url_path``. The handler's status, headers and body come back as they are,
streamed partials as chunks; a client that leaves before its request runs is dropped.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import tornado.httputil

from flambeau.api import (
    BadRequestError,
    Envelope,
    FlambeauError,
    RequestInput,
    RouteSpec,
    WorkerRequest,
    WorkerResponse,
    hookimpl,
)
from flambeau.envelopes.dataplane import NoEnvelope, Submission, envelope_for
from flambeau.plugins.builtin.openapi import document_for, model_inference_document
from flambeau.web import ApiHandler, Endpoint

__all__ = ["HOP_BY_HOP", "PredictionHandler", "parse_inputs"]

log = logging.getLogger("flambeau.inference")

MODEL = r"(?P<model_name>[^/]+)"
VERSION = r"(?:/(?P<version>[^/]+))?"
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
# Framing headers belong to this connection, not to the handler's answer.
HOP_BY_HOP = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive"})


def parse_inputs(content_type_header: str, body: bytes, headers: Any) -> list[RequestInput]:
    """TorchServe's mapping of an HTTP body to named inputs."""
    media_type = content_type_header.split(";", 1)[0].strip().lower()
    if media_type in FORM_TYPES:
        arguments: dict[str, list[bytes]] = {}
        files: dict[str, list[tornado.httputil.HTTPFile]] = {}
        tornado.httputil.parse_body_arguments(content_type_header, body, arguments, files, headers)
        if not arguments and not files and body.strip():
            raise BadRequestError("Invalid form data")
        inputs = [RequestInput(k, v) for k, values in arguments.items() for v in values]
        inputs.extend(
            RequestInput(name, f.body, f.content_type or "")
            for name, parts in files.items()
            for f in parts
        )
        return inputs
    return [RequestInput("body", body, media_type)]


class PredictionHandler(Endpoint):
    """Every inference route (any HTTP method but OPTIONS and HEAD runs the model).

    An :class:`~flambeau.web.Endpoint`: this is the server's hot path.
    """

    METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})

    def setup(self, **kwargs: Any) -> None:
        self.explain = "True" if kwargs.pop("explain", False) else "False"
        # SageMaker and legacy routes also pass query parameters as inputs; /predictions not.
        self.query_inputs = bool(kwargs.pop("query_inputs", False))
        super().setup(**kwargs)
        self._future: asyncio.Future[WorkerResponse] | None = None
        self._envelope: Envelope | None = None
        self._submission: Submission | None = None

    def on_connection_close(self) -> None:
        # The client went away: a queued request is dropped before it reaches a worker.
        if self._future is not None and not self._future.done():
            self._future.cancel()
        if self._submission is not None:
            self._submission.cancel()

    async def handle(self) -> None:
        model_name = self.path_kwargs.get("model_name")
        version = self.path_kwargs.get("version")
        if self.request.method == "OPTIONS":
            if model_name is None:
                raise BadRequestError("Parameter model_name is required.")
            mv = self.server.models.get(model_name, version)
            self.send_json(model_inference_document(mv.name, self.server))
            return
        request = self.request
        headers = dict(request.headers)
        headers["explain"] = self.explain
        headers["url_path"] = self.path_kwargs.get("extra") or ""
        inputs = parse_inputs(request.headers.get("Content-Type", ""), self.body, request.headers)
        if self.query_inputs:
            inputs.extend(
                RequestInput(name, value)
                for name, values in request.query_arguments.items()
                for value in values
            )
        work = WorkerRequest(self.request_id, headers, inputs)
        server = self.server
        mv = server.models.get(model_name, version)
        envelope = envelope_for(server, mv)
        if not isinstance(envelope, NoEnvelope):
            # service_envelope (or the model's envelope:) applies to every inference route,
            # as in TorchServe; errors then come back in that protocol's shape.
            self._envelope = envelope
            await self._serve_enveloped(mv, envelope, work, version)
            return
        self._future = server.models.submit(model_name, version, work, self._on_partial)
        with server.prediction(model_name, version):
            try:
                response = await self._future
            except asyncio.CancelledError:
                return
        self._send(response)

    async def _serve_enveloped(
        self, mv: Any, envelope: Envelope, work: WorkerRequest, version: str | None
    ) -> None:
        with self.server.prediction(mv.name, version):
            try:
                response = await Submission.run(
                    self.server, mv, envelope, work, version=version, on_submitted=self._submitted
                )
            except asyncio.CancelledError:
                return
        self._send(response)

    def _submitted(self, submission: Submission) -> None:
        self._submission = submission

    def render_error(self, error: FlambeauError) -> None:
        if self._envelope is None:
            super().render_error(error)
            return
        status, content_type, body = self._envelope.render_error(error)
        self.send(status, body, content_type=content_type)

    def _on_partial(self, response: WorkerResponse) -> None:
        if self.finished:
            return
        if not self.started:
            self.start(
                response.status,
                content_type=response.content_type or None,
                headers=_handler_headers(response),
                reason=response.reason,
            )
        self.write(response.body)

    def _send(self, response: WorkerResponse) -> None:
        if self.started:
            self.end(response.body)  # the last chunk
            return
        self.send(
            response.status,
            response.body,
            content_type=response.content_type or None,
            headers=_handler_headers(response),
            reason=response.reason,
        )


def _handler_headers(response: WorkerResponse) -> list[tuple[str, str]]:
    # Framing headers belong to this connection, not to the handler's answer.
    return [(k, v) for k, v in response.headers.items() if k.lower() not in HOP_BY_HOP]


class DescriptionHandler(ApiHandler):
    """``OPTIONS /`` and any method on ``/api-description``: the OpenAPI document."""

    def setup(self, **kwargs: Any) -> None:
        self.listener_name = str(kwargs.pop("listener_name", "inference"))
        super().setup(**kwargs)

    async def get(self) -> None:
        self.send_json(document_for(self.listener_name, self.server))

    post = put = delete = patch = options = get


class RootHandler(DescriptionHandler):
    """``/``: only OPTIONS is defined (TorchServe answers 405 to anything else)."""

    SUPPORTED_METHODS = ("OPTIONS",)

    async def options(self) -> None:
        await DescriptionHandler.get(self)


@hookimpl
def flambeau_routes(config: Any) -> list[RouteSpec]:
    extra = r"(?:/(?P<extra>.+?))?"

    def route(pattern: str, **kwargs: Any) -> RouteSpec:
        return RouteSpec(pattern, PredictionHandler, permission="inference", kwargs=kwargs)

    return [
        route(rf"/predictions/{MODEL}{VERSION}{extra}/?"),
        route(rf"/explanations/{MODEL}{VERSION}/?", explain=True),
        route(rf"/{MODEL}{VERSION}/predict/?", query_inputs=True),
        RouteSpec(r"/api-description/?", DescriptionHandler, public=True),
        RouteSpec(r"/", RootHandler, public=True),
    ]
