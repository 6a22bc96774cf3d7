"""TorchServe's REST inference API: predictions, explanations and the legacy MMS route.

Form fields become named inputs, any other body the input ``body``; every header travels, plus
``explain`` and ``url_path``. The handler's status, headers and body come back as they are,
streamed partials as chunks; a client that leaves before its request runs is dropped.
"""

from __future__ import annotations

import asyncio
import logging
from http import HTTPStatus
from typing import Any

import tornado.httputil
import tornado.iostream

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
from flambeau.web import ApiHandler

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


def reason_for(status: int, reason: str) -> str:
    """The handler's phrase; else the standard one (TorchServe sends an empty phrase, which
    Tornado cannot), else Netty's ``Server Error (N)`` for a code without one."""
    if reason:
        return reason
    if status in HTTPStatus._value2member_map_:
        return HTTPStatus(status).phrase
    kind = {1: "Informational", 2: "Success", 3: "Redirection", 4: "Client Error"}
    return f"{kind.get(status // 100, 'Server Error')} ({status})"


class PredictionHandler(ApiHandler):
    """Every inference route (any HTTP method but OPTIONS runs the model)."""

    def setup(self, **kwargs: Any) -> None:
        self.explain = "True" if kwargs.pop("explain", False) else "False"
        # SageMaker and legacy routes also pass query parameters as inputs; /predictions not.
        self.query_inputs = bool(kwargs.pop("query_inputs", False))
        super().setup(**kwargs)
        self._future: asyncio.Future[WorkerResponse] | None = None
        self._envelope: Envelope | None = None
        self._submission: Submission | None = None
        self._streaming = False

    def on_connection_close(self) -> None:
        # The client went away: a queued request is dropped before it reaches a worker.
        if self._future is not None and not self._future.done():
            self._future.cancel()
        if self._submission is not None:
            self._submission.cancel()

    async def options(
        self, model_name: str | None = None, version: str | None = None, extra: str | None = None
    ) -> None:
        if model_name is None:
            raise BadRequestError("Parameter model_name is required.")
        mv = self.server.models.get(model_name, version)
        self.send_json(model_inference_document(mv.name, self.server))

    async def post(
        self, model_name: str | None = None, version: str | None = None, extra: str | None = None
    ) -> None:
        request = self.request
        headers = dict(request.headers)
        headers["explain"] = self.explain
        headers["url_path"] = extra or ""
        inputs = parse_inputs(request.headers.get("Content-Type", ""), self.body, request.headers)
        if self.query_inputs:
            inputs.extend(
                RequestInput(name, value)
                for name, values in request.query_arguments.items()
                for value in values
            )
        work = WorkerRequest(self.request_id, headers, inputs)
        mv = self.server.models.get(model_name, version)
        envelope = envelope_for(self.server, mv)
        if not isinstance(envelope, NoEnvelope):
            # service_envelope (or the model's envelope:) applies to every inference route,
            # as in TorchServe; errors then come back in that protocol's shape.
            self._envelope = envelope
            await self._serve_enveloped(mv, envelope, work, version)
            return
        self._future = self.server.models.submit(model_name, version, work, self._on_partial)
        with self.server.prediction(model_name, version):
            try:
                response = await self._future
            except asyncio.CancelledError:
                return
            except FlambeauError as error:
                if not self._streaming:
                    raise
                # Headers and chunks are out: the only honest signal left is a cut connection.
                log.warning("request %s failed while streaming: %s", self.request_id, error.message)
                self.request.connection.close()  # type: ignore[union-attr]
                return
        await self._send(response)

    get = put = delete = patch = post

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
        await self._send(response)

    def _submitted(self, submission: Submission) -> None:
        self._submission = submission

    def render_error(self, error: FlambeauError) -> None:
        if self._envelope is None:
            super().render_error(error)
            return
        status, content_type, body = self._envelope.render_error(error)
        self.set_status(status, reason=None)
        self.set_header("Content-Type", content_type)
        self.finish(body)

    def _on_partial(self, response: WorkerResponse) -> None:
        if self._finished:
            return
        if not self._streaming:
            self._streaming = True
            self._start_response(response)
        if response.body:
            self.write(response.body)
        future = self.flush()
        future.add_done_callback(_ignore_closed)

    def _start_response(self, response: WorkerResponse) -> None:
        self.set_status(response.status, reason_for(response.status, response.reason))
        if response.content_type:
            self.set_header("Content-Type", response.content_type)
        for name, value in response.headers.items():
            if name.lower() not in HOP_BY_HOP:
                self.set_header(name, value)

    async def _send(self, response: WorkerResponse) -> None:
        if self._finished:
            return
        body: bytes | None = None
        if self._streaming:
            if response.body:
                self.write(response.body)  # the last chunk
        else:
            self._start_response(response)
            body = response.body
        try:
            await self.finish(body)
        except tornado.iostream.StreamClosedError:
            log.debug("request %s: client went away before the answer", self.request_id)


def _ignore_closed(future: asyncio.Future[None]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.debug("streamed chunk not delivered: %s", future.exception())


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
