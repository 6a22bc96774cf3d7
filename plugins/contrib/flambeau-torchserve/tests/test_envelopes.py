"""The ported worker-side envelopes behave as TorchServe 0.12's, on TorchServe's own shapes."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from ts.context import Context, RequestProcessor
from ts.torch_handler.request_envelope.base import BaseEnvelope
from ts.torch_handler.request_envelope.body import BodyEnvelope
from ts.torch_handler.request_envelope.json import JSONEnvelope
from ts.torch_handler.request_envelope.kserve import KServeEnvelope
from ts.torch_handler.request_envelope.kservev2 import KServev2Envelope

MANIFEST = {"model": {"modelName": "mnist", "modelVersion": "1.0"}}


def context(*headers: dict[str, str]) -> Context:
    ctx = Context("mnist", "/tmp", MANIFEST, len(headers) or 1, None, "0.12.0")
    ctx.request_processor = [RequestProcessor(dict(h)) for h in headers or ({},)]
    ctx.request_ids = {i: f"req-{i}" for i in range(len(headers) or 1)}
    return ctx


class Recorder:
    """A handle function that records what the envelope gave it and answers ``outputs``."""

    def __init__(self, outputs: Any = None) -> None:
        self.outputs = outputs
        self.seen: Any = "never called"

    def __call__(self, data: Any, ctx: Any) -> Any:
        self.seen = data
        return self.outputs if data is not None else None


def test_initialisation_call_passes_none_through() -> None:
    handler = Recorder(["unused"])
    assert BodyEnvelope(handler).handle(None, context()) is None
    assert handler.seen is None


def test_base_envelope_is_abstract() -> None:
    with pytest.raises(TypeError):
        BaseEnvelope(Recorder())  # type: ignore[abstract]


def test_body_gives_data_else_body_and_returns_output_unchanged() -> None:
    handler = Recorder(["a", "b"])
    result = BodyEnvelope(handler).handle([{"body": b"x"}, {"data": "y"}], context({}, {}))
    assert handler.seen == [b"x", "y"]
    assert result == ["a", "b"]


def test_json_joins_instances_of_the_batch_and_splits_predictions_back() -> None:
    image = base64.b64encode(b"\x89PNG").decode()
    rows = [
        {"body": {"instances": [[1, 2], [3, 4]]}},
        {"data": {"instances": [{"b64": image}]}},
    ]
    handler = Recorder(["p1", "p2", "p3"])
    result = JSONEnvelope(handler).handle(rows, context({}, {}))
    assert handler.seen == [[1, 2], [3, 4], b"\x89PNG"]
    assert [json.loads(r) for r in result] == [
        {"predictions": ["p1", "p2"]},
        {"predictions": ["p3"]},
    ]


def test_json_decodes_b64_columns_of_dict_instances() -> None:
    col = base64.b64encode(b"raw").decode()
    handler = Recorder(["ok"])
    rows = [{"body": {"instances": [{"img": {"b64": col}, "k": 1}]}}]
    JSONEnvelope(handler).handle(rows, context())
    assert handler.seen == [{"img": b"raw", "k": 1}]


def test_kserve_reads_the_first_request_and_wraps_predictions() -> None:
    body = json.dumps({"instances": [[0.1, 0.2]]}).encode()
    handler = Recorder([7])
    result = KServeEnvelope(handler).handle([{"body": body}, {"body": b"ignored"}], context({}, {}))
    assert handler.seen == [[0.1, 0.2]]
    assert result == [{"predictions": [7]}]


def test_kserve_answers_explanations_when_the_explain_header_is_true() -> None:
    handler = Recorder([[0.5]])
    result = KServeEnvelope(handler).handle(
        [{"data": {"instances": [1]}}], context({"explain": "True"})
    )
    assert result == [{"explanations": [[0.5]]}]


def test_kservev2_reshapes_inputs_and_describes_outputs() -> None:
    body = {
        "id": "client-id",
        "inputs": [
            {"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [1, 2.5, 3, 4]},
            {"name": "s", "shape": [1], "datatype": "BYTES", "data": ["hello"]},
        ],
    }
    handler = Recorder([[[1, 2], [3, 4]], ["hi"]])
    result = KServev2Envelope(handler).handle([{"body": json.dumps(body).encode()}], context())
    assert handler.seen[0]["data"] == [[1.0, 2.5], [3.0, 4.0]]
    assert handler.seen[1]["data"] == "hello"
    assert result == [
        {
            "id": "client-id",
            "model_name": "mnist",
            "model_version": "1.0",
            "outputs": [
                {"name": "x", "datatype": "INT64", "data": [1, 2, 3, 4], "shape": (4,)},
                {"name": "s", "datatype": "BYTES", "data": ["hi"], "shape": (1,)},
            ],
        }
    ]


def test_kservev2_without_an_id_answers_with_the_request_id() -> None:
    body = {"inputs": [{"name": "b", "shape": [-1], "datatype": "BOOL", "data": [True, False]}]}
    handler = Recorder([[True, False]])
    (answer,) = KServev2Envelope(handler).handle([{"data": body}], context())
    assert answer["id"] == "req-0"
    assert answer["outputs"][0]["datatype"] == "BOOL"


def test_kservev2_refuses_data_that_does_not_fit_the_shape() -> None:
    body = {"inputs": [{"name": "x", "shape": [3], "datatype": "INT64", "data": [1, 2]}]}
    with pytest.raises(ValueError, match="cannot reshape"):
        KServev2Envelope(Recorder([1])).handle([{"data": body}], context())
