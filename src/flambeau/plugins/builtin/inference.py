"""TorchServe's REST inference API: ``/predictions``, ``/explanations`` and the API description.

A request becomes one :class:`~flambeau.api.WorkerRequest`: form fields (multipart or
urlencoded) are named inputs, any other body is the single input ``body`` with the request's
media type; every header travels, plus ``explain`` and ``url_path``. The worker's status,
reason, content type and headers are returned as they are. A handler that streams
(``send_intermediate_predict_response``) turns the answer into a chunked response, one chunk
per partial. A client that goes away before its request runs is dropped from the queue.
"""

from __future__ import annotations

import asyncio
import time
from http import HTTPStatus
from typing import Any

import tornado.httputil

from flambeau.api import (
    BadRequestError,
    RequestInput,
    RouteSpec,
    WorkerRequest,
    WorkerResponse,
    hookimpl,
)
from flambeau.plugins.builtin.openapi import document_for, model_inference_document
from flambeau.web import ApiHandler

MODEL = r"(?P<model_name>[^/]+)"
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


def parse_inputs(content_type_header: str, body: bytes, headers: Any) -> list[RequestInput]:
    """TorchServe's mapping of an HTTP body to named inputs."""
    media_type = content_type_header.split(";", 1)[0].strip().lower()
    if media_type in FORM_TYPES:
        arguments: dict[str, list[bytes]] = {}
        files: dict[str, list[tornado.httputil.HTTPFile]] = {}
        tornado.httputil.parse_body_arguments(content_type_header, body, arguments, files, headers)
        if not arguments and not files and body:
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
    if reason or status in HTTPStatus._value2member_map_:
        return reason
    return f"Server Error ({status})" if status >= 500 else f"Unknown ({status})"


class PredictionHandler(ApiHandler):
    """``/predictions/{model}[/{version}[/extra]]`` and ``/explanations/...`` (any method)."""

    explain = "False"

    def setup(self, explain: bool = False) -> None:
        self.explain = "True" if explain else "False"
        self._future: asyncio.Future[WorkerResponse] | None = None
        self._streaming = False

    def on_connection_close(self) -> None:
        # The client went away: a queued request is dropped before it reaches a worker.
        if self._future is not None and not self._future.done():
            self._future.cancel()

    async def options(self, model_name: str, version: str | None = None, extra: str | None = None) -> None:
        mv = self.server.models.get(model_name, version)
        self.send_json(model_inference_document(mv.name, self.server))

    async def post(self, model_name: str, version: str | None = None, extra: str | None = None) -> None:
        request = self.request
        headers = dict(request.headers)
        headers["explain"] = self.explain
        headers["url_path"] = extra or ""
        work = WorkerRequest(
            self.request_id,
            headers,
            parse_inputs(request.headers.get("Content-Type", ""), self.body, request.headers),
        )
        models = self.server.models
        started = time.monotonic()
        self._future = models.submit(model_name, version or None, work, self._on_partial)
        self.server.track_request(1)
        try:
            response = await self._future
        except asyncio.CancelledError:
            return
        finally:
            self.server.track_request(-1)
            self.server.observe_prediction(model_name, version, time.monotonic() - started, 0.0)
        self._send(response, final=True)

    get = put = delete = patch = post

    def _on_partial(self, response: WorkerResponse) -> None:
        if self._finished:
            return
        if not self._streaming:
            self._streaming = True
            self._start_response(response)
        if response.body:
            self.write(response.body)
        self.flush()

    def _start_response(self, response: WorkerResponse) -> None:
        self.set_status(response.status, reason_for(response.status, response.reason))
        if response.content_type:
            self.set_header("Content-Type", response.content_type)
        for name, value in response.headers.items():
            self.set_header(name, value)

    def _send(self, response: WorkerResponse, *, final: bool) -> None:
        if self._finished:
            return
        if self._streaming:
            if response.body:
                self.write(response.body)
            self.finish()
            return
        self._start_response(response)
        self.finish(response.body)


class DescriptionHandler(ApiHandler):
    """``OPTIONS /`` and any method on ``/api-description``: the OpenAPI document."""

    def setup(self, listener_name: str = "inference") -> None:
        self.listener_name = listener_name

    async def get(self) -> None:
        self.send_json(document_for(self.listener_name, self.server))

    post = put = delete = patch = options = get


class RootHandler(DescriptionHandler):
    """``/``: only OPTIONS is defined (TorchServe answers 405 to anything else)."""

    SUPPORTED_METHODS = ("OPTIONS",)  # type: ignore[assignment]

    async def options(self) -> None:
        await DescriptionHandler.get(self)


@hookimpl
def flambeau_routes(config: Any) -> list[RouteSpec]:
    version = r"(?:/(?P<version>[^/]+))?"
    extra = r"(?:/(?P<extra>.+?))?"
    return [
        RouteSpec(
            rf"/predictions/{MODEL}{version}{extra}/?", PredictionHandler, permission="inference"
        ),
        RouteSpec(
            rf"/explanations/{MODEL}{version}/?",
            PredictionHandler,
            permission="inference",
            kwargs={"explain": True},
        ),
        RouteSpec(r"/api-description/?", DescriptionHandler, public=True),
        RouteSpec(r"/", RootHandler, public=True),
    ]
