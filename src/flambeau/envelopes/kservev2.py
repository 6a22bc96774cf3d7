"""The ``kservev2`` envelope: the Open Inference Protocol (KServe v2, Triton) over REST.

Parses ``/v2/models/{m}/infer`` bodies, with the binary tensor data extension
(``Inference-Header-Content-Length``) that tritonclient uses, into an :class:`InferRequest`;
the gRPC service builds the same object from ``ModelInferRequest``. Every input tensor of
every request is one handler row shaped as TorchServe's kservev2 envelope gives it:
``{"name", "shape", "datatype", "data"}`` with ``data`` nested to ``shape`` (a ``BYTES``
tensor of one element is that element; ``BYTES`` from binary contents arrive base64-encoded,
as TorchServe's gRPC gave them). Each row's answer becomes one or more output tensors; see
:func:`output_tensors` and docs/kserve.md. Errors are ``{"error": message}``.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from flambeau.api import (
    BadRequestError,
    Decoded,
    FlambeauError,
    InternalServerError,
    ModelRef,
    WorkerRequest,
    WorkerResponse,
)
from flambeau.envelopes.base import (
    JSON,
    OCTET_STREAM,
    answer_value,
    check_answers,
    error_message,
    header,
    json_error,
    load_json,
    payload,
    value_row,
)
from flambeau.envelopes.tensors import (
    DATATYPES,
    Tensor,
    element_count,
    flatten,
    from_json,
    from_raw,
    infer_shape,
    json_data,
    reshape,
    to_raw,
)

HEADER_LENGTH = "Inference-Header-Content-Length"
PROTOCOL = "KServe v2"


@dataclass(frozen=True, slots=True)
class RequestedOutput:
    name: str
    binary: bool | None = None  # None: the request-level default


@dataclass(frozen=True, slots=True)
class InferRequest:
    """A decoded inference request, whatever transport it came over."""

    id: str
    inputs: tuple[Tensor, ...]
    outputs: tuple[RequestedOutput, ...] = ()
    parameters: Mapping[str, Any] = field(default_factory=dict)
    binary_output: bool = False  # REST: binary_data_output; gRPC: answer with raw contents


# ------------------------------------------------------------------------------ REST parsing


def parse_rest(body: bytes, header_length: str | None) -> InferRequest:
    """An :class:`InferRequest` from a REST body, JSON alone or JSON + binary tensor data."""
    binary = b""
    if header_length is not None:
        try:
            length = int(header_length)
        except ValueError:
            raise BadRequestError(f"{HEADER_LENGTH} must be an integer") from None
        if not 0 <= length <= len(body):
            raise BadRequestError(
                f"{HEADER_LENGTH} is {length} but the body has only {len(body)} bytes"
            )
        body, binary = body[:length], body[length:]
    document = load_json(body, PROTOCOL)
    if not isinstance(document, dict):
        raise BadRequestError(f"{PROTOCOL}: the request body must be a JSON object")
    inputs = document.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise BadRequestError(f'{PROTOCOL}: "inputs" must be a non-empty list')
    tensors, offset = [], 0
    for item in inputs:
        tensor, used = _rest_input(item, binary, offset)
        tensors.append(tensor)
        offset += used
    if offset != len(binary):
        raise BadRequestError(f"{len(binary) - offset} bytes of binary data belong to no input")
    parameters = _parameters(document.get("parameters"), "request")
    outputs = []
    for item in _list(document.get("outputs"), "outputs"):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise BadRequestError('every requested output needs a "name"')
        binary_flag = _parameters(item.get("parameters"), item["name"]).get("binary_data")
        outputs.append(
            RequestedOutput(item["name"], None if binary_flag is None else bool(binary_flag))
        )
    request_id = document.get("id", "")
    return InferRequest(
        id=request_id if isinstance(request_id, str) else str(request_id),
        inputs=tuple(tensors),
        outputs=tuple(outputs),
        parameters=parameters,
        binary_output=bool(parameters.get("binary_data_output", False)),
    )


def _list(value: Any, what: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise BadRequestError(f'"{what}" must be a list')
    return value


def _parameters(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequestError(f'"parameters" of {what} must be an object')
    return value


def _rest_input(item: Any, binary: bytes, offset: int) -> tuple[Tensor, int]:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        raise BadRequestError('every input needs a "name"')
    name = item["name"]
    for key in ("datatype", "shape"):
        if key not in item:
            raise BadRequestError(f"input '{name}' has no \"{key}\"")
    parameters = _parameters(item.get("parameters"), name)
    size = parameters.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise BadRequestError(
                f"input '{name}': binary_data_size must be a non-negative integer"
            )
        if offset + size > len(binary):
            raise BadRequestError(
                f"input '{name}': binary_data_size is {size} but only "
                f"{len(binary) - offset} bytes of binary data are left"
            )
        raw = binary[offset : offset + size]
        tensor = from_raw(name, item["datatype"], item["shape"], raw)
        rest = {k: v for k, v in parameters.items() if k != "binary_data_size"}
        return Tensor(tensor.name, tensor.datatype, tensor.shape, tensor.data, rest, raw=True), size
    if "data" not in item:
        raise BadRequestError(f"input '{name}' has neither \"data\" nor binary_data_size")
    tensor = from_json(name, item["datatype"], item["shape"], item["data"])
    return Tensor(tensor.name, tensor.datatype, tensor.shape, tensor.data, parameters), 0


# ------------------------------------------------------------------------------ rows


def handler_row(tensor: Tensor) -> dict[str, Any]:
    """One input tensor as TorchServe's kservev2 envelope hands it to the handler."""
    if tensor.datatype == "BYTES":
        items = [_bytes_for_handler(v, tensor.raw) for v in tensor.data]
        # TorchServe gives the element itself (its data[0]); flambeau keeps every element
        # of a longer BYTES tensor instead of dropping all but the first.
        data: Any = items[0] if len(items) == 1 else reshape(items, tensor.shape)
    else:
        data = reshape(tensor.data, tensor.shape)
    row: dict[str, Any] = {
        "name": tensor.name,
        "shape": list(tensor.shape),
        "datatype": tensor.datatype,
        "data": data,
    }
    if tensor.parameters:
        row["parameters"] = dict(tensor.parameters)
    return row


def _bytes_for_handler(value: bytes, binary: bool) -> str:
    if binary:
        return base64.b64encode(value).decode("ascii")
    return value.decode("utf-8", "replace")


def rows_for(
    infer: InferRequest, request: WorkerRequest, envelope: str
) -> tuple[WorkerRequest, ...]:
    count = len(infer.inputs)
    return tuple(
        value_row(request, envelope, handler_row(tensor), index, count)
        for index, tensor in enumerate(infer.inputs)
    )


# ------------------------------------------------------------------------------ outputs


def output_tensors(infer: InferRequest, answers: Sequence[Any]) -> list[Tensor]:
    """The output tensors for the handler's per-input ``answers``.

    An answer is a tensor dict (``{"data", "name"?, "datatype"?, "shape"?, "parameters"?}``),
    a list of tensor dicts, or plain data. A missing name is the next requested output's
    name, else the input's (TorchServe); a missing datatype keeps the input's when the
    values fit it, else is inferred (FP64, INT64, BOOL, BYTES); a missing shape is the
    nesting of ``data``. When the request names outputs, only those are returned.
    """
    tensors: list[Tensor] = []
    unnamed = iter(o.name for o in infer.outputs)
    for source, answer in zip(infer.inputs, answers, strict=True):
        for spec in _tensor_specs(answer):
            name = spec.get("name")
            if not isinstance(name, str) or not name:
                name = next(unnamed, source.name)
            tensors.append(_output(name, spec, source.datatype))
    if not infer.outputs:
        return tensors
    by_name = {t.name: t for t in tensors}
    missing = [o.name for o in infer.outputs if o.name not in by_name]
    if missing:
        raise BadRequestError(f"unknown output(s) requested: {', '.join(missing)}")
    return [by_name[o.name] for o in infer.outputs]


def _is_tensor_dict(value: Any) -> bool:
    return isinstance(value, dict) and "data" in value


def _tensor_specs(answer: Any) -> list[dict[str, Any]]:
    if _is_tensor_dict(answer):
        return [answer]
    if isinstance(answer, list) and answer and all(_is_tensor_dict(a) for a in answer):
        return answer
    return [{"data": answer}]


def _output(name: str, spec: Mapping[str, Any], hint: str) -> Tensor:
    data = spec["data"]
    if isinstance(data, bytes):
        data = [data]
    flat = flatten(data)
    shape = spec.get("shape")
    if shape is None:
        inferred = infer_shape(data)
        shape = inferred if inferred is not None and inferred != () else (len(flat),)
    try:
        shape = tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        raise InternalServerError(
            f"output '{name}': shape {shape!r} is not a list of ints"
        ) from None
    if element_count(shape) != len(flat):
        raise InternalServerError(
            f"output '{name}': shape {list(shape)} does not hold {len(flat)} elements"
        )
    datatype = spec.get("datatype") or _infer_datatype(flat, hint)
    if datatype not in DATATYPES:
        raise InternalServerError(f"output '{name}': unsupported datatype {datatype!r}")
    parameters = spec.get("parameters") if isinstance(spec.get("parameters"), dict) else {}
    return Tensor(name, datatype, shape, _coerce(name, flat, datatype), parameters or {})


def _infer_datatype(flat: Sequence[Any], hint: str) -> str:
    hinted = DATATYPES.get(hint)
    if all(isinstance(v, bool) for v in flat):
        return "BOOL" if flat or hinted is None else hint
    if all(isinstance(v, str | bytes) for v in flat):
        return "BYTES"
    if all(isinstance(v, int) and not isinstance(v, bool) for v in flat):
        if hinted is not None and hinted.kind in {"int", "uint"} and all(map(hinted.accepts, flat)):
            return hint
        return "UINT64" if flat and max(flat) > 2**63 - 1 else "INT64"
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in flat):
        return hint if hinted is not None and hinted.kind == "float" else "FP64"
    raise InternalServerError("model output mixes value types; return a tensor dict instead")


def _coerce(name: str, flat: list[Any], datatype: str) -> list[Any]:
    dtype = DATATYPES[datatype]
    try:
        if dtype.kind == "bytes":
            return [v if isinstance(v, bytes) else str(v).encode("utf-8") for v in flat]
        if dtype.kind == "bool":
            return [bool(v) for v in flat]
        if dtype.kind == "float":
            values = [float(v) for v in flat]
            # struct refuses FP16 values out of range; BF16 is packed through FP32, so only
            # values past FP32's range are refused (a finite value past BF16's becomes inf).
            if datatype in {"FP16", "BF16"}:
                to_raw(Tensor(name, datatype, (len(values),), values))
            return values
        values = [int(v) for v in flat]
    except (TypeError, ValueError, OverflowError):
        raise InternalServerError(f"output '{name}' has values that are not {datatype}") from None
    if not all(map(dtype.accepts, values)):
        raise InternalServerError(f"output '{name}' has values out of range for {datatype}")
    return values


# ------------------------------------------------------------------------------ REST answer


def rest_answer(
    infer: InferRequest, model: ModelRef, request_id: str, outputs: Sequence[Tensor]
) -> tuple[str, dict[str, str], bytes]:
    """(content type, headers, body) of the REST answer, JSON or JSON + binary data."""
    binary_for = {o.name: o.binary for o in infer.outputs}
    documents, blobs = [], []
    for tensor in outputs:
        document: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": list(tensor.shape),
        }
        parameters = dict(tensor.parameters)
        wanted = binary_for.get(tensor.name)
        if wanted if wanted is not None else infer.binary_output:
            blob = to_raw(tensor)
            blobs.append(blob)
            parameters["binary_data_size"] = len(blob)
        else:
            document["data"] = json_data(tensor)
        if parameters:
            document["parameters"] = parameters
        documents.append(document)
    answer = {
        "id": infer.id or request_id,
        "model_name": model.name,
        "model_version": model.version,
        "outputs": documents,
    }
    text = json.dumps(answer, ensure_ascii=False, separators=(",", ":")).encode()
    if not blobs:
        return JSON, {}, text
    return OCTET_STREAM, {HEADER_LENGTH: str(len(text))}, text + b"".join(blobs)


class KServeV2Envelope:
    name = "kservev2"

    def decode(self, request: WorkerRequest, model: ModelRef) -> Decoded:
        infer = parse_rest(payload(request).value, header(request.headers, HEADER_LENGTH))
        return self.decode_infer(infer, request, model)

    def decode_infer(self, infer: InferRequest, request: WorkerRequest, model: ModelRef) -> Decoded:
        """Rows for an already parsed request (the gRPC service's way in)."""
        return Decoded(request, model, rows_for(infer, request, self.name), infer)

    def outputs(self, decoded: Decoded, responses: Sequence[WorkerResponse]) -> list[Tensor]:
        check_answers(responses)
        return output_tensors(decoded.state, [answer_value(r) for r in responses])

    def encode(self, decoded: Decoded, responses: Sequence[WorkerResponse]) -> WorkerResponse:
        outputs = self.outputs(decoded, responses)
        content_type, headers, body = rest_answer(
            decoded.state, decoded.model, decoded.request.request_id, outputs
        )
        return WorkerResponse(
            decoded.request.request_id, content_type=content_type, headers=headers, body=body
        )

    def render_error(self, error: FlambeauError) -> tuple[int, str, bytes]:
        return json_error({"error": error_message(error)}, error.status)
