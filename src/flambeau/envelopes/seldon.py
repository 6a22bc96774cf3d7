"""The ``seldon`` envelope: Seldon Core v1's ``SeldonMessage`` over REST.

In: ``{"data": {"names": [...], "ndarray": [...]}}`` or ``{"data": {"tensor": {"shape",
"values"}}}`` (each first-dimension element is one handler row, like Vertex instances), or a
single-row ``strData`` (text), ``binData`` (base64, arrives as bytes) or ``jsonData``, with an
optional ``meta``. Out: the same kind (``tensor`` when the answers are rectangular numbers),
with ``names`` ``t:0``, ``t:1``, ... for two-dimensional answers and a ``meta`` that keeps the
request's ``puid``, ``tags`` and ``routing`` and adds ``requestPath``. Errors are Seldon's
``{"status": {"code", "info", "reason", "status": "FAILURE"}}``.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass, field
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
from flambeau.envelopes.tensors import check_shape, element_count, flatten, infer_shape, reshape

PROTOCOL = "Seldon"
SINGLE_KINDS = ("strData", "binData", "jsonData")


@dataclass(frozen=True, slots=True)
class _State:
    kind: str  # ndarray | tensor | strData | binData | jsonData
    meta: dict[str, Any] = field(default_factory=dict)


def _rows_of(body: dict[str, Any]) -> tuple[str, list[Any]]:
    data = body.get("data")
    if data is not None:
        if not isinstance(data, dict):
            raise BadRequestError(f'{PROTOCOL}: "data" must be an object')
        names = data.get("names", [])
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise BadRequestError(f'{PROTOCOL}: "names" must be a list of strings')
        if "ndarray" in data:
            ndarray = data["ndarray"]
            if not isinstance(ndarray, list):
                raise BadRequestError(f'{PROTOCOL}: "ndarray" must be a list')
            return "ndarray", ndarray
        if "tensor" in data:
            return "tensor", _tensor_rows(data["tensor"])
        raise BadRequestError(f'{PROTOCOL}: "data" needs an "ndarray" or a "tensor"')
    for kind in SINGLE_KINDS:
        if kind in body:
            return kind, [_single(kind, body[kind])]
    raise BadRequestError(f"{PROTOCOL}: the message has no data, strData, binData or jsonData")


def _tensor_rows(tensor: Any) -> list[Any]:
    if not isinstance(tensor, dict):
        raise BadRequestError(f'{PROTOCOL}: "tensor" must be an object')
    shape = check_shape("tensor", tensor.get("shape"))
    values = tensor.get("values")
    if not isinstance(values, list) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in values
    ):
        raise BadRequestError(f'{PROTOCOL}: "values" must be a list of numbers')
    if len(values) != element_count(shape):
        raise BadRequestError(
            f"{PROTOCOL}: tensor shape {list(shape)} needs {element_count(shape)} values, "
            f"got {len(values)}"
        )
    if not shape:
        return list(values)
    nested = reshape(values, shape)
    return nested if isinstance(nested, list) else [nested]


def _single(kind: str, value: Any) -> Any:
    if kind == "jsonData":
        return value
    if not isinstance(value, str):
        raise BadRequestError(f'{PROTOCOL}: "{kind}" must be a string')
    if kind == "strData":
        return value
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error:
        raise BadRequestError(f'{PROTOCOL}: "binData" is not valid base64') from None


def _single_answer(value: Any) -> dict[str, Any]:
    if isinstance(value, bytes):
        return {"binData": base64.b64encode(value).decode("ascii")}
    if isinstance(value, str):
        return {"strData": value}
    return {"jsonData": value}


def _data_answer(kind: str, answers: list[Any]) -> dict[str, Any]:
    shape = infer_shape(answers)
    names = [f"t:{i}" for i in range(shape[1])] if shape is not None and len(shape) == 2 else []
    flat = flatten(answers) if shape is not None else []
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in flat)
    if kind == "tensor" and shape is not None and numeric:
        return {"names": names, "tensor": {"shape": list(shape), "values": flat}}
    return {"names": names, "ndarray": answers}


class SeldonEnvelope:
    name = "seldon"

    def decode(self, request: WorkerRequest, model: ModelRef) -> Decoded:
        body = json_object(payload(request).value, PROTOCOL)
        meta = body.get("meta", {})
        if not isinstance(meta, dict):
            raise BadRequestError(f'{PROTOCOL}: "meta" must be an object')
        kind, values = _rows_of(body)
        rows = tuple(
            value_row(request, self.name, value, index, len(values))
            for index, value in enumerate(values)
        )
        return Decoded(request, model, rows, _State(kind, meta))

    def encode(self, decoded: Decoded, responses: Sequence[WorkerResponse]) -> WorkerResponse:
        check_answers(responses)
        state: _State = decoded.state
        answers = [answer_value(r) for r in responses]
        meta: dict[str, Any] = {
            "puid": state.meta.get("puid") or decoded.request.request_id,
            "tags": state.meta.get("tags") or {},
            "routing": state.meta.get("routing") or {},
            "requestPath": {decoded.model.name: decoded.model.version},
            "metrics": [],
        }
        if state.kind in SINGLE_KINDS:
            value = answers[0]
            if state.kind == "binData" and isinstance(value, str):
                # Bytes in, bytes out: a non-JSON answer to binData stays binary.
                value = responses[0].body
            answer = _single_answer(value)
        else:
            answer = {"data": _data_answer(state.kind, answers)}
        answer["meta"] = meta
        return json_response(decoded.request, answer)

    def render_error(self, error: FlambeauError) -> tuple[int, str, bytes]:
        status = {
            "code": error.status,
            "info": error_message(error),
            "reason": error.error_type,
            "status": "FAILURE",
        }
        return json_error({"status": status}, error.status)
