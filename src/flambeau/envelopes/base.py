"""What every envelope shares: reading the client's payload, building rows, reading answers.

A row is a :class:`~flambeau.api.WorkerRequest` with one input and the
:data:`~flambeau.api.ENVELOPE_ROW_HEADER`, so the worker gives the handler that input's
decoded value (JSON, text or bytes) as its ``data`` row. A row's answer is read back the way
the worker wrote it: JSON when it parses, else text, else bytes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from flambeau.api import (
    ENVELOPE_ROW_HEADER,
    BadRequestError,
    FlambeauError,
    InternalServerError,
    RequestInput,
    WorkerRequest,
    WorkerResponse,
)

JSON = "application/json"
OCTET_STREAM = "application/octet-stream"
# TorchServe's envelopes read the row's "data" input first, then "body".
PAYLOAD_INPUTS = ("data", "body")


def header(headers: Mapping[str, str], name: str) -> str | None:
    """A request header by case-insensitive name (Tornado keeps the client's spelling)."""
    value = headers.get(name)
    if value is not None:
        return value
    lowered = name.lower()
    for key, candidate in headers.items():
        if key.lower() == lowered:
            return candidate
    return None


def payload(request: WorkerRequest) -> RequestInput:
    """The input that carries the protocol payload: ``data``, else ``body``, else the first."""
    by_name = {inp.name: inp for inp in request.inputs}
    for name in PAYLOAD_INPUTS:
        if name in by_name:
            return by_name[name]
    if request.inputs:
        return request.inputs[0]
    raise BadRequestError("The request has no body")


def load_json(raw: bytes, what: str) -> Any:
    """Parse a JSON payload, or a :class:`BadRequestError` that says what was wrong."""
    if not raw:
        raise BadRequestError(f"{what}: the request body is empty")
    try:
        return json.loads(raw)
    except UnicodeDecodeError:
        raise BadRequestError(f"{what}: the request body is not UTF-8 JSON") from None
    except ValueError as exc:
        raise BadRequestError(f"{what}: the request body is not valid JSON ({exc})") from None


def json_object(raw: bytes, what: str) -> dict[str, Any]:
    body = load_json(raw, what)
    if not isinstance(body, dict):
        raise BadRequestError(f"{what}: the request body must be a JSON object")
    return body


def row_id(request_id: str, index: int, count: int) -> str:
    # A single row keeps the client's request id (x-request-id), as TorchServe's does.
    return request_id if count == 1 else f"{request_id}:{index}"


def value_row(
    request: WorkerRequest, envelope: str, value: Any, index: int, count: int
) -> WorkerRequest:
    """A row whose handler value is ``value``: bytes travel as they are, anything else as JSON."""
    if isinstance(value, bytes | bytearray):
        item = RequestInput("body", bytes(value), OCTET_STREAM)
    else:
        item = RequestInput("body", dumps_compact(value), JSON)
    return raw_row(request, envelope, item, index, count)


def raw_row(
    request: WorkerRequest, envelope: str, item: RequestInput, index: int, count: int
) -> WorkerRequest:
    headers = dict(request.headers)
    headers[ENVELOPE_ROW_HEADER] = envelope
    return WorkerRequest(row_id(request.request_id, index, count), headers, [item])


def dumps_compact(value: Any) -> bytes:
    # ASCII escapes, so that a lone surrogate from a client's JSON travels instead of failing.
    return json.dumps(value, separators=(",", ":")).encode()


def answer_value(response: WorkerResponse) -> Any:
    """A row's answer as the handler returned it: JSON when it parses, else text, else bytes.

    A handler's ``str`` output that happens to be valid JSON (``"42"``) reads back as JSON;
    the worker's wire format does not keep the difference.
    """
    body = response.body
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return body
    try:
        return json.loads(text)
    except ValueError:
        return text


def check_answers(responses: Sequence[WorkerResponse]) -> None:
    """A row the handler answered with an error status fails the whole request with it."""
    for response in responses:
        if response.status >= 400:
            message = response.body.decode("utf-8", "replace").strip() or response.reason
            raise FlambeauError(message or "Prediction failed", status=response.status)


def json_response(
    request: WorkerRequest, obj: Any, *, status: int = 200, indent: int | None = None
) -> WorkerResponse:
    separators = (",", ":") if indent is None else None
    try:
        body = json.dumps(obj, ensure_ascii=False, indent=indent, separators=separators).encode()
    except (TypeError, ValueError) as exc:
        raise InternalServerError(f"the model's answer cannot be sent as JSON: {exc}") from None
    return WorkerResponse(request.request_id, status=status, content_type=JSON, body=body)


def json_error(obj: Any, status: int) -> tuple[int, str, bytes]:
    return status, JSON, json.dumps(obj, ensure_ascii=False).encode()


def error_message(error: FlambeauError) -> str:
    return error.message or error.error_type
