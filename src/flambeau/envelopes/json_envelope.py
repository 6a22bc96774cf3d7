"""The ``json`` envelope (alias ``vertex``): Vertex AI / AI Platform online prediction.

``{"instances": [...], "parameters": {...}}`` in, ``{"predictions": [...]}`` out, one
prediction per instance, as TorchServe's json envelope: every instance is one handler row
(``{"b64": ...}`` instances arrive as bytes), the rows of all requests in a batch reach the
handler together, and each request gets back exactly its own predictions. ``parameters``
reach the handler as the request header ``vertex_parameters`` (JSON). Errors are
``{"error": message}``, AI Platform's shape.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from typing import Any

from flambeau.api import (
    BadRequestError,
    Decoded,
    FlambeauError,
    ModelRef,
    WorkerRequest,
    WorkerResponse,
)
from flambeau.envelopes.base import (
    answer_value,
    check_answers,
    error_message,
    json_error,
    json_object,
    json_response,
    payload,
    value_row,
)

PARAMETERS_HEADER = "vertex_parameters"


def b64_instance(instance: Any) -> Any:
    """Vertex's binary convention: an instance ``{"b64": "..."}`` stands for those bytes."""
    if isinstance(instance, dict) and len(instance) == 1 and "b64" in instance:
        encoded = instance["b64"]
        if not isinstance(encoded, str):
            raise BadRequestError('"b64" must hold a base64 string')
        try:
            return base64.b64decode(encoded, validate=True)
        except binascii.Error:
            raise BadRequestError('"b64" does not hold valid base64') from None
    return instance


def b64_answer(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"b64": base64.b64encode(value).decode("ascii")}
    return value


def instances_of(body: dict[str, Any], what: str) -> list[Any]:
    if "instances" not in body:
        raise BadRequestError(f'{what}: the request has no "instances"')
    instances = body["instances"]
    if not isinstance(instances, list):
        raise BadRequestError(f'{what}: "instances" must be a list')
    return instances


class JsonEnvelope:
    name = "json"
    protocol = "Vertex AI"

    def decode(self, request: WorkerRequest, model: ModelRef) -> Decoded:
        body = json_object(payload(request).value, self.protocol)
        instances = [b64_instance(i) for i in instances_of(body, self.protocol)]
        carrier = request
        if "parameters" in body:
            headers = {**request.headers, PARAMETERS_HEADER: json.dumps(body["parameters"])}
            carrier = WorkerRequest(request.request_id, headers, request.inputs)
        rows = tuple(
            value_row(carrier, self.name, instance, index, len(instances))
            for index, instance in enumerate(instances)
        )
        return Decoded(request, model, rows)

    def encode(self, decoded: Decoded, responses: Sequence[WorkerResponse]) -> WorkerResponse:
        check_answers(responses)
        predictions = [b64_answer(answer_value(r)) for r in responses]
        return json_response(decoded.request, {"predictions": predictions})

    def render_error(self, error: FlambeauError) -> tuple[int, str, bytes]:
        return json_error({"error": error_message(error)}, error.status)
