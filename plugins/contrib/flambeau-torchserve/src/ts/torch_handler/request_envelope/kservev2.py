"""``KServev2Envelope``: the KServe v2 (Open Inference Protocol) body of the first request.

Each input tensor's flat ``data`` is reshaped to its ``shape`` (a ``BYTES`` tensor gives its
first element); the handler gets the list of inputs and returns one output per input, which
becomes ``{"name", "datatype", "data" (flattened), "shape"}`` under ``outputs``. TorchServe
does this with numpy; here nested lists do, with numpy's dtype inference for ``datatype``.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from ts.torch_handler.request_envelope.base import BaseEnvelope

__all__ = ["KServev2Envelope"]

logger = logging.getLogger(__name__)


def _flatten(value: Any) -> list[Any]:
    if not isinstance(value, list | tuple):
        return [value]
    flat: list[Any] = []
    for item in value:
        flat.extend(_flatten(item))
    return flat


def _upcast(flat: list[Any]) -> list[Any]:
    # numpy makes one dtype of a mixed int/float array: every element becomes a float.
    if any(isinstance(v, float) for v in flat) and all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in flat
    ):
        return [float(v) for v in flat]
    return flat


def _reshape(value: Any, shape: list[int]) -> Any:
    flat = _upcast(_flatten(value))
    dims = [int(d) for d in shape]
    if dims.count(-1) == 1:  # numpy infers one unknown dimension
        known = math.prod(d for d in dims if d != -1)
        dims[dims.index(-1)] = len(flat) // known if known else 0
    if math.prod(dims) != len(flat):
        raise ValueError(f"cannot reshape array of size {len(flat)} into shape {tuple(shape)}")

    def build(offset: int, rest: list[int]) -> Any:
        if not rest:
            return flat[offset]
        step = math.prod(rest[1:])
        return [build(offset + i * step, rest[1:]) for i in range(rest[0])]

    return build(0, dims)


def _datatype(flat: list[Any]) -> str:
    """The v2 datatype numpy would infer for ``np.array(flat)``."""
    if any(isinstance(v, str | bytes | bytearray) for v in flat):
        return "BYTES"
    if flat and all(isinstance(v, bool) for v in flat):
        return "BOOL"
    if flat and all(isinstance(v, int) for v in flat):
        return "INT64"
    return "FP64"


class KServev2Envelope(BaseEnvelope):
    def parse_input(self, data: Any) -> Any:
        logger.debug("Parsing input in KServe v2 format %s", data)
        return self._batch_from_json(data)

    def _batch_from_json(self, rows: Any) -> Any:
        body_list = [row.get("data") or row.get("body") for row in rows]
        return self._from_json(body_list)

    def _from_json(self, body_list: list[Any]) -> Any:
        if isinstance(body_list[0], bytes | bytearray):
            body_list = [json.loads(body.decode("utf8")) for body in body_list]
        first = body_list[0]
        input_names = []
        for tensor in first["inputs"]:
            if tensor["datatype"] == "BYTES":
                tensor["data"] = tensor["data"][0]
            else:
                tensor["data"] = _reshape(tensor["data"], tensor["shape"])
            input_names.append(tensor["name"])
        # TorchServe keeps these on the context for format_output, and so do we.
        self.context.input_names = input_names
        request_id = first.get("id")
        if request_id and request_id.strip():
            self.context.input_request_id = request_id
        return first.get("inputs")

    def format_output(self, data: Any) -> list[dict[str, Any]]:
        context = self.context
        response: dict[str, Any] = {}
        if hasattr(context, "input_request_id"):
            response["id"] = context.input_request_id
            del context.input_request_id
        else:
            response["id"] = context.get_request_id(0)
        model = (context.manifest or {}).get("model") or {}
        response["model_name"] = model.get("modelName")
        response["model_version"] = model.get("modelVersion")
        response["outputs"] = self._batch_to_json(data)
        return [response]

    def _batch_to_json(self, data: Any) -> list[dict[str, Any]]:
        input_names = self.context.input_names
        del self.context.input_names
        return [self._to_json(item, input_names[index]) for index, item in enumerate(data)]

    def _to_json(self, data: Any, input_name: str) -> dict[str, Any]:
        tolist = getattr(data, "tolist", None)  # a tensor or array, as numpy would accept it
        flat = _upcast(_flatten(tolist() if callable(tolist) else data))
        return {
            "name": input_name,
            "datatype": _datatype(flat),
            "data": flat,
            "shape": (len(flat),),  # a tuple, as numpy's .shape is
        }
