"""The Open Inference Protocol's REST routes on the inference listener.

``POST /v2/models/{m}[/versions/{v}]/infer`` (and TorchServe's ``/explain``) are always
served, as in TorchServe; health (``/v2/health/live|ready``), server metadata (``/v2``) and
model metadata and readiness (``/v2/models/{m}[/versions/{v}][/ready]``) only when the
protocol is enabled (``ts_open_inference_protocol=true``). Every answer and error is in the
protocol's shape (``{"error": message}``).
"""

from __future__ import annotations

from typing import Any

from flambeau.api import Envelope, RouteSpec
from flambeau.envelopes.http import EnvelopeHandler
from flambeau.plugins.builtin.oip.common import (
    model_metadata,
    model_ready,
    oip_enabled,
    server_metadata,
)

MODEL = r"/v2/models/(?P<model_name>[^/]+)(?:/versions/(?P<version>[^/]+))?"


class OipHandler(EnvelopeHandler):
    raw_body = True

    def default_envelope(self) -> Envelope:
        from flambeau.envelopes.kservev2 import KServeV2Envelope

        return KServeV2Envelope()


class InferHandler(OipHandler):
    """``/v2/models/{m}[/versions/{v}]/infer`` and ``/explain``."""

    async def post(self, model_name: str, version: str | None = None) -> None:
        await self.serve(model_name, version, self.envelope)


class ServerMetadataHandler(OipHandler):
    async def get(self) -> None:
        metadata = server_metadata()
        # TorchServe's own key, misspelt, for its clients.
        metadata["extenstion"] = metadata["extensions"]
        self.send_json(metadata)


class LiveHandler(OipHandler):
    async def get(self) -> None:
        self.send_json({"live": True})


class ReadyHandler(OipHandler):
    async def get(self) -> None:
        ready = self.server.models.healthy()
        self.send_json({"ready": ready}, 200 if ready else 503)


class ModelMetadataHandler(OipHandler):
    async def get(self, model_name: str, version: str | None = None) -> None:
        self.send_json(model_metadata(self.server, self.model(model_name, version)))


class ModelReadyHandler(OipHandler):
    async def get(self, model_name: str, version: str | None = None) -> None:
        mv = self.model(model_name, version)
        ready = model_ready(mv)
        self.send_json({"name": mv.name, "ready": ready}, 200 if ready else 503)


def routes(config: Any) -> list[RouteSpec]:
    def route(pattern: str, handler: type[OipHandler], **kwargs: Any) -> RouteSpec:
        return RouteSpec(pattern, handler, permission="inference", kwargs=kwargs)

    served = [
        route(rf"{MODEL}/infer/?", InferHandler),
        route(rf"{MODEL}/explain/?", InferHandler, explain=True),
    ]
    if oip_enabled(config):
        served += [
            route(r"/v2/?", ServerMetadataHandler),
            route(r"/v2/health/live/?", LiveHandler),
            route(r"/v2/health/ready/?", ReadyHandler),
            route(rf"{MODEL}/ready/?", ModelReadyHandler),
            route(rf"{MODEL}/?", ModelMetadataHandler),
        ]
    return served
