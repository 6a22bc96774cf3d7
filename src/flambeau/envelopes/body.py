"""The ``body`` envelope: TorchServe's, the handler gets the bare payload of each request.

Each request becomes one row, the value of its ``data`` (else ``body``) input, decoded by
content type; the handler's answer goes back unchanged and errors keep TorchServe's
``{"code", "type", "message"}`` shape.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from flambeau.api import Decoded, FlambeauError, ModelRef, WorkerRequest, WorkerResponse
from flambeau.envelopes.base import JSON, payload, raw_row


class BodyEnvelope:
    name = "body"

    def decode(self, request: WorkerRequest, model: ModelRef) -> Decoded:
        row = raw_row(request, self.name, payload(request), 0, 1)
        return Decoded(request, model, (row,))

    def encode(self, decoded: Decoded, responses: Sequence[WorkerResponse]) -> WorkerResponse:
        # Status, headers and body stay the handler's own, as on /predictions.
        (response,) = responses
        response.request_id = decoded.request.request_id
        return response

    def render_error(self, error: FlambeauError) -> tuple[int, str, bytes]:
        body = json.dumps(error.to_json(), indent=2, ensure_ascii=False) + "\n"
        return error.status, JSON, body.encode()
