"""Helpers handlers import: PredictionException, streaming, label mapping, ``timed``.

These mirror TorchServe's ``ts.utils.util``, ``ts.handler_utils.utils`` and
``ts.handler_utils.timer``. The response encoding shared by final and intermediate (streamed)
results lives here too. torch is imported only when a value actually is a tensor.
"""

from __future__ import annotations

import functools
import inspect
import io
import itertools
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar, cast

from flambeau.api import BatchResult, WorkerResponse

if TYPE_CHECKING:
    from flambeau.handler.context import Context

__all__ = [
    "STREAM_NEXT_HEADER",
    "PredictionException",
    "build_predict_result",
    "encode_output",
    "get_yaml_config",
    "list_classes_from_module",
    "load_label_mapping",
    "map_class_to_label",
    "send_intermediate_predict_response",
    "timed",
]

logger = logging.getLogger(__name__)

STREAM_NEXT_HEADER = "ts_stream_next"

F = TypeVar("F", bound=Callable[..., Any])


class PredictionException(Exception):
    """Raise from a handler to fail the batch with ``error_code`` and ``message``."""

    def __init__(self, message: str, error_code: int = 500) -> None:
        self.message = message
        self.error_code = error_code
        super().__init__(message)

    def __str__(self) -> str:
        return f"{self.message} : {self.error_code}"


# ---- response encoding ---------------------------------------------------------------------


def encode_output(value: Any) -> bytes:
    """Encode one handler output as TorchServe does; raises TypeError when it cannot.

    bytes/bytearray as is, str as UTF-8, ``torch.Tensor`` via ``torch.save``, anything else
    ``json.dumps(indent=2)``.
    """
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    torch = sys.modules.get("torch")  # a tensor can only exist if torch was imported
    if torch is not None and isinstance(value, torch.Tensor):
        buffer = io.BytesIO()
        torch.save(value, buffer)
        return buffer.getvalue()
    try:
        try:
            text = _indented_json(value)
        except (_NotPlainJson, RecursionError):  # recursion: a cycle, which json.dumps reports
            text = json.dumps(value, indent=2)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"cannot serialise model output of type {type(value).__name__}") from exc
    return text.encode("utf-8")


# json.dumps(indent=2) runs the pure-Python encoder (CPython's C encoder ignores ``indent``):
# about 20 us for a list of ten floats, a sizeable share of a small model's request. Plain
# values are rendered below with the C encoder doing the leaves, byte for byte what
# json.dumps(indent=2) writes; any other value raises _NotPlainJson and goes to json.dumps.

_compact_json = json.JSONEncoder(separators=(",", ":")).encode
_string_json = json.encoder.encode_basestring_ascii
# Their JSON text never holds a comma, so a compact list of them splits at every comma.
_COMMA_FREE_SCALARS = frozenset({float, int, bool, type(None)})


def _float_json(value: float) -> str:
    if math.isfinite(value):
        return float.__repr__(value)
    # json's own spelling of the non-finite floats (allow_nan is on by default).
    if math.isnan(value):
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"


_SCALAR_JSON: dict[type, Callable[[Any], str]] = {
    str: _string_json,
    float: _float_json,
    int: int.__repr__,
    bool: {True: "true", False: "false"}.__getitem__,
    type(None): lambda _: "null",
}


class _NotPlainJson(Exception):
    """A value the fast path leaves to json.dumps (subclasses, non-str keys, other types)."""


def _indented_json(value: Any, newline: str = "\n") -> str:
    """``json.dumps(value, indent=2)`` for exact list/tuple/dict/str/int/float/bool/None."""
    kind = type(value)
    scalar = _SCALAR_JSON.get(kind)
    if scalar is not None:
        return scalar(value)
    inner = newline + "  "
    if kind is list or kind is tuple:
        if not value:
            return "[]"
        if set(map(type, value)) <= _COMMA_FREE_SCALARS:
            body = _compact_json(value)[1:-1].replace(",", "," + inner)
        else:
            body = ("," + inner).join([_indented_json(item, inner) for item in value])
        return f"[{inner}{body}{newline}]"
    if kind is dict:
        if not value:
            return "{}"
        items = []
        for key, item in value.items():
            if type(key) is not str:
                raise _NotPlainJson
            items.append(f"{_string_json(key)}: {_indented_json(item, inner)}")
        return "{" + inner + ("," + inner).join(items) + newline + "}"
    raise _NotPlainJson


def _stream_header(
    context: Context, idx: int, ret: Sequence[Any] | Mapping[int, Any], stream_next: bool
) -> None:
    # Same decision order as TorchServe's create_predict_response.
    if stream_next:
        context.set_response_header(idx, STREAM_NEXT_HEADER, "true")
    elif context.stopping_criteria:
        is_stop = context.stopping_criteria[idx](ret[idx])
        if is_stop is not None:
            context.set_response_header(idx, STREAM_NEXT_HEADER, "false" if is_stop else "true")
    elif context.get_response_headers(idx).get(STREAM_NEXT_HEADER) == "true":
        context.set_response_header(idx, STREAM_NEXT_HEADER, "false")


def build_predict_result(
    ret: Sequence[Any] | Mapping[int, Any] | None,
    req_id_map: Mapping[int, str],
    message: str,
    code: int,
    *,
    context: Context | None = None,
    stream_next: bool = False,
) -> BatchResult:
    """Turn handler outputs into a :class:`BatchResult` (TorchServe's create_predict_response).

    ``ret`` is indexed by batch index like ``req_id_map``; ``ret=None`` (or a non-200 code)
    gives a batch-level failure with no per-request responses. Status, reason, content type
    and headers come from ``context``. A response is marked ``stream_next`` when its
    ``ts_stream_next`` header ends up ``"true"``.
    """
    if ret is None or code != 200:
        return BatchResult(code=code, message=message)
    responses = []
    for idx, request_id in req_id_map.items():
        if context is None:
            responses.append(
                WorkerResponse(request_id=request_id, status=code, body=encode_output(ret[idx]))
            )
            continue
        _stream_header(context, idx, ret, stream_next)
        status, phrase = context.get_response_status(idx)
        response_headers = context.get_response_headers(idx)
        headers = {str(k): str(v) for k, v in response_headers.items()}
        body = encode_output(ret[idx])
        responses.append(
            WorkerResponse(
                request_id=request_id,
                status=status if status is not None else 200,
                reason=phrase or "",
                content_type=response_headers.get("content-type") or "",
                headers=headers,
                body=body,
                stream_next=headers.get(STREAM_NEXT_HEADER) == "true",
            )
        )
    return BatchResult(code=code, message=message, responses=responses)


def send_intermediate_predict_response(
    ret: Sequence[Any] | Mapping[int, Any],
    req_id_map: Mapping[int, str],
    message: str,
    code: int,
    context: Context | None = None,
) -> None:
    """Send one streamed chunk per request in ``req_id_map`` before the handler returns.

    ``ret[idx]`` is the chunk for batch index ``idx``; every response carries
    ``stream_next=True`` (and header ``ts_stream_next: true``). The chunk goes to the
    transport's callable that :meth:`ModelService.load` put on ``context.intermediate_sink``.
    As in TorchServe, only local rank 0 sends when running under torchrun.
    """
    if str(os.environ.get("LOCAL_RANK", "0")) != "0":
        return
    if context is None:
        raise ValueError("send_intermediate_predict_response needs the handler's context")
    sink = getattr(context, "intermediate_sink", None)
    if sink is None:
        raise RuntimeError(
            "this worker cannot stream: no intermediate response sink was given to "
            "ModelService.load(send_intermediate=...)"
        )
    try:
        result = build_predict_result(
            ret, req_id_map, message, code, context=context, stream_next=True
        )
    except TypeError:
        logger.warning("Unable to serialize intermediate model output.", exc_info=True)
        result = BatchResult(code=503, message="Unsupported model output data type.")
    sink(result)


# ---- TorchServe's ts.utils.util ------------------------------------------------------------


def list_classes_from_module(module: ModuleType, parent_class: type | None = None) -> list[type]:
    """Classes defined in ``module`` itself (not imported into it), optionally subclasses."""
    classes = [
        member
        for _, member in inspect.getmembers(module, inspect.isclass)
        if member.__module__ == module.__name__
    ]
    if parent_class is not None:
        return [c for c in classes if issubclass(c, parent_class)]
    return classes


def load_label_mapping(mapping_file_path: str | os.PathLike[str]) -> dict[str, str] | None:
    """Load ``index_to_name.json`` (``{"0": "label"}``, ``{"0": [id, "label"]}`` or
    ``{"object_type_names": [...]}``); None when the file is absent."""
    if not os.path.isfile(mapping_file_path):
        logger.warning(
            "%r is missing. Inference output will not include class name.", str(mapping_file_path)
        )
        return None
    with open(mapping_file_path, encoding="utf-8") as f:
        mapping = json.load(f)
    if not isinstance(mapping, dict):
        raise ValueError('index->name JSON mapping should be in "class": "label" format.')
    names = mapping.get("object_type_names")
    if isinstance(names, list):
        return {str(k): v for k, v in enumerate(names)}
    result = {}
    for key, value in mapping.items():
        label = value[-1] if isinstance(value, list) else value
        if not isinstance(label, str):
            raise ValueError("labels in index->name mapping must be either str or List[str]")
        result[str(key)] = label
    return result


def map_class_to_label(
    probs: list[list[float]],
    mapping: Mapping[str, str] | None = None,
    lbl_classes: list[list[int]] | None = None,
) -> list[dict[str, float]]:
    """One ``{label: probability}`` dict per row; labels from ``mapping`` when given."""
    if not isinstance(probs, list):
        raise TypeError("Convert classes to list before doing mapping")
    if mapping is not None and not isinstance(mapping, Mapping):
        raise TypeError("Mapping must be a dict")
    classes: Any = lbl_classes
    if classes is None:
        classes = itertools.repeat(range(len(probs[0])), len(probs))
    return [
        {
            (mapping[str(lbl)] if mapping is not None else str(lbl)): prob
            for lbl, prob in zip(row_classes, row_probs, strict=False)
        }
        for row_classes, row_probs in zip(classes, probs, strict=False)
    ]


def get_yaml_config(yaml_file_path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a model-config YAML file (safe loader); an empty file gives ``{}``."""
    import yaml

    with open(yaml_file_path, encoding="utf-8") as file:
        config = yaml.safe_load(file)
    return config if isinstance(config, dict) else {}


def timed(func: F) -> F:
    """Decorate a handler method: with model-config ``handler: {profile: true}`` its duration
    is recorded as metric ``ts_handler_<name>`` (ms), as TorchServe's ``timed`` does."""

    @functools.wraps(func)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        context = getattr(self, "context", None)
        config = getattr(context, "model_yaml_config", None)
        handler_config = config.get("handler") if config else None
        # Checked on every call (the config may change); the common no-config case first,
        # as an isinstance check against the Mapping ABC costs more than the call itself.
        if not handler_config or not (
            isinstance(handler_config, Mapping) and handler_config.get("profile")
        ):
            return func(self, *args, **kwargs)
        start = time.perf_counter()
        result = func(self, *args, **kwargs)
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()  # GPU work is asynchronous: wait before stopping the clock
        duration = (time.perf_counter() - start) * 1000
        if context is not None:
            context.metrics.add_time("ts_handler_" + func.__name__, duration)
        return result

    return cast(F, wrapper)
