"""The base of the HTTP routes that serve a model through an envelope (OIP, KServe, SageMaker).

:class:`EnvelopeHandler` builds the :class:`~flambeau.api.WorkerRequest` as TorchServe's
inference routes do, runs it through the envelope and the model's queue
(:class:`~flambeau.envelopes.dataplane.Submission`), writes the envelope's answer, and renders
every error -- authentication, unknown model, malformed payload, handler failure -- in the
envelope's own shape. A client that goes away cancels its queued rows. Example::

    class Predict(EnvelopeHandler):
        async def post(self, model_name: str) -> None:
            await self.serve(model_name, None, KServeEnvelope())
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import tornado.iostream

from flambeau.api import Envelope, FlambeauError, RequestInput, WorkerRequest, WorkerResponse
from flambeau.envelopes.dataplane import Submission, envelope_for
from flambeau.plugins.builtin.inference import HOP_BY_HOP, parse_inputs
from flambeau.web import ApiHandler, reason_for


class EnvelopeHandler(ApiHandler):
    """See the module docstring. ``envelope`` renders errors until the model's is known.

    ``raw_body``: the whole body is the payload whatever its content type (the protocol
    routes: KServe clients and curl send JSON without saying so), instead of TorchServe's
    form-field mapping.
    """

    envelope: Envelope
    raw_body = False

    def setup(self, **kwargs: Any) -> None:
        self.explain = "True" if kwargs.pop("explain", False) else "False"
        self.envelope = self.default_envelope()
        super().setup(**kwargs)
        self._submission: Submission | None = None

    def default_envelope(self) -> Envelope:
        """The envelope that renders errors before a model (and its envelope) is known."""
        from flambeau.envelopes.body import BodyEnvelope

        return BodyEnvelope()

    def on_connection_close(self) -> None:
        # The client went away: its queued rows are dropped before they reach a worker.
        if self._submission is not None:
            self._submission.cancel()

    def render_error(self, error: FlambeauError) -> None:
        status, content_type, body = self.envelope.render_error(error)
        self.set_status(status, reason=None)
        self.set_header("Content-Type", content_type)
        self.finish(body)

    def worker_request(self, *, query_inputs: bool = False) -> WorkerRequest:
        """The request as TorchServe's inference routes map it (headers + named inputs)."""
        request = self.request
        headers = dict(request.headers)
        headers["explain"] = self.explain
        headers["url_path"] = ""
        content_type = request.headers.get("Content-Type", "")
        if self.raw_body:
            media_type = content_type.split(";", 1)[0].strip().lower()
            inputs = [RequestInput("body", self.body, media_type)]
        else:
            inputs = parse_inputs(content_type, self.body, request.headers)
        if query_inputs:
            inputs.extend(
                RequestInput(name, value)
                for name, values in request.query_arguments.items()
                for value in values
            )
        return WorkerRequest(self.request_id, headers, inputs)

    def model(self, model_name: str, version: str | None) -> Any:
        return self.server.models.get(model_name, version or None)

    async def serve(
        self,
        model_name: str,
        version: str | None,
        envelope: Envelope | None = None,
        request: WorkerRequest | None = None,
    ) -> None:
        """Serve one request on ``model_name``: the given envelope, else the model's."""
        mv = self.model(model_name, version)
        self.envelope = envelope if envelope is not None else envelope_for(self.server, mv)
        work = request if request is not None else self.worker_request()
        with self.server.prediction(mv.name, version or None):
            try:
                response = await Submission.run(
                    self.server,
                    mv,
                    self.envelope,
                    work,
                    version=version or None,
                    on_submitted=self._submitted,
                )
            except asyncio.CancelledError:
                return
        await self.send_response(response)

    def _submitted(self, submission: Submission) -> None:
        self._submission = submission

    async def send_response(self, response: WorkerResponse) -> None:
        if self._finished:
            return
        self.set_status(response.status, reason_for(response.status, response.reason))
        if response.content_type:
            self.set_header("Content-Type", response.content_type)
        for name, value in response.headers.items():
            if name.lower() not in HOP_BY_HOP:
                self.set_header(name, value)
        # A client that went away before its answer has nobody left to tell.
        with contextlib.suppress(tornado.iostream.StreamClosedError):
            await self.finish(response.body)
