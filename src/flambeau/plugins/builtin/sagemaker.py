"""SageMaker- and KServe-v1-style inference routes, each through an envelope.

On the inference listener: ``/invocations`` (the model from a ``model_name`` parameter or form
field, else the only model loaded at start-up) and ``/models/{m}/invoke``, both through the
model's configured envelope, with query parameters as extra inputs (TorchServe's SageMaker
routes); and KServe v1's ``/v1/models/{m}:predict`` and ``:explain`` through the ``kserve``
envelope, whatever the model's. Errors come back in the envelope's shape.
"""

from __future__ import annotations

from typing import Any

from flambeau.api import BadRequestError, Envelope, RouteSpec, hookimpl
from flambeau.envelopes.http import EnvelopeHandler

MODEL = r"(?P<model_name>[^/:]+)"


class InvokeHandler(EnvelopeHandler):
    """``/invocations`` and ``/models/{m}/invoke``: the model's own envelope."""

    async def post(self, model_name: str | None = None) -> None:
        request = self.worker_request(query_inputs=True)
        if model_name is None:
            model_name = self._invocation_model(request.inputs)
        await self.serve(model_name, None, request=request)

    # As TorchServe's inference routes, these do not check the HTTP method.
    get = put = delete = patch = post

    def _invocation_model(self, inputs: list[Any]) -> str:
        for item in inputs:
            if item.name == "model_name" and item.value:
                return str(item.value.decode("utf-8", "replace"))
        startup = {mv.name for mv in self.server.models.all_versions() if mv.loaded_at_startup}
        if len(startup) == 1:
            return startup.pop()
        raise BadRequestError("Parameter model_name is required.")


class KServeV1Handler(EnvelopeHandler):
    """``/v1/models/{m}:predict`` and ``:explain``."""

    raw_body = True

    def default_envelope(self) -> Envelope:
        from flambeau.envelopes.kserve import KServeEnvelope

        return KServeEnvelope()

    async def post(self, model_name: str) -> None:
        await self.serve(model_name, None, self.envelope)


@hookimpl
def flambeau_routes(config: Any) -> list[RouteSpec]:
    def route(pattern: str, handler: type[EnvelopeHandler], **kwargs: Any) -> RouteSpec:
        return RouteSpec(pattern, handler, permission="inference", kwargs=kwargs)

    return [
        route(r"/invocations/?", InvokeHandler),
        route(rf"/models/{MODEL}/invoke/?", InvokeHandler),
        route(rf"/v1/models/{MODEL}:predict/?", KServeV1Handler),
        route(rf"/v1/models/{MODEL}:explain/?", KServeV1Handler, explain=True),
    ]
