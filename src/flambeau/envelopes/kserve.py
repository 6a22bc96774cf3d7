"""The ``kserve`` envelope: KServe's v1 protocol (``/v1/models/{m}:predict`` / ``:explain``).

``{"instances": [...]}`` in; every instance is one handler row, as it is (TorchServe's kserve
envelope, but for every request of a batch, not only the first). Out comes
``{"predictions": [...]}``, or ``{"explanations": [...]}`` when the request header
``explain`` is ``True``. Errors are KServe's ``{"error": message}``.
"""

from __future__ import annotations

from collections.abc import Sequence

from flambeau.api import Decoded, FlambeauError, ModelRef, WorkerRequest, WorkerResponse
from flambeau.envelopes.base import (
    answer_value,
    check_answers,
    error_message,
    header,
    json_error,
    json_object,
    json_response,
    payload,
    value_row,
)
from flambeau.envelopes.json_envelope import b64_answer, instances_of


class KServeEnvelope:
    name = "kserve"
    protocol = "KServe v1"

    def decode(self, request: WorkerRequest, model: ModelRef) -> Decoded:
        body = json_object(payload(request).value, self.protocol)
        instances = instances_of(body, self.protocol)
        rows = tuple(
            value_row(request, self.name, instance, index, len(instances))
            for index, instance in enumerate(instances)
        )
        return Decoded(request, model, rows)

    def encode(self, decoded: Decoded, responses: Sequence[WorkerResponse]) -> WorkerResponse:
        check_answers(responses)
        explain = header(decoded.request.headers, "explain") == "True"
        key = "explanations" if explain else "predictions"
        answer = {key: [b64_answer(answer_value(r)) for r in responses]}
        return json_response(decoded.request, answer, indent=2)

    def render_error(self, error: FlambeauError) -> tuple[int, str, bytes]:
        return json_error({"error": error_message(error)}, error.status)
