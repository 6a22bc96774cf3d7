"""Each envelope's decode, encode and error shape, on real request and response values."""

from __future__ import annotations

import base64
import json
import struct
from typing import Any

import pytest

from flambeau.api import (
    ENVELOPE_ROW_HEADER,
    BadRequestError,
    FlambeauError,
    InternalServerError,
    ModelNotFoundError,
    ModelRef,
    RequestInput,
    WorkerRequest,
    WorkerResponse,
)
from flambeau.envelopes.body import BodyEnvelope
from flambeau.envelopes.dataplane import NoEnvelope, envelope_named
from flambeau.envelopes.json_envelope import JsonEnvelope
from flambeau.envelopes.kserve import KServeEnvelope
from flambeau.envelopes.kservev2 import HEADER_LENGTH, KServeV2Envelope
from flambeau.envelopes.plugin import flambeau_envelopes
from flambeau.envelopes.seldon import SeldonEnvelope

MODEL = ModelRef("m", "2.0")


def request(body: Any, headers: dict[str, str] | None = None, name: str = "body") -> WorkerRequest:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return WorkerRequest("rid", dict(headers or {}), [RequestInput(name, raw, "application/json")])


def answer(value: Any, status: int = 200) -> WorkerResponse:
    if isinstance(value, bytes):
        body = value
    elif isinstance(value, str):
        body = value.encode()
    else:
        body = json.dumps(value, indent=2).encode()
    return WorkerResponse("x", status=status, body=body)


def row_values(rows: tuple[WorkerRequest, ...]) -> list[Any]:
    values = []
    for row in rows:
        assert row.headers[ENVELOPE_ROW_HEADER]
        (item,) = row.inputs
        values.append(
            item.value if item.content_type != "application/json" else json.loads(item.value)
        )
    return values


def test_json_envelope_rows_and_predictions() -> None:
    envelope = JsonEnvelope()
    document = {
        "instances": [[1, 2], {"b64": base64.b64encode(b"\xff").decode()}, "t"],
        "parameters": {"k": 1},
    }
    decoded = envelope.decode(request(document, {"x-client": "c"}), MODEL)
    assert [r.request_id for r in decoded.rows] == ["rid:0", "rid:1", "rid:2"]
    assert row_values(decoded.rows) == [[1, 2], b"\xff", "t"]
    assert decoded.rows[1].inputs[0].content_type == "application/octet-stream"
    assert decoded.rows[0].headers["x-client"] == "c"
    assert json.loads(decoded.rows[0].headers["vertex_parameters"]) == {"k": 1}
    response = envelope.encode(decoded, [answer([0.5]), answer(b"\x00\xfe"), answer("plain text")])
    assert response.request_id == "rid"
    assert response.content_type == "application/json"
    assert json.loads(response.body) == {"predictions": [[0.5], {"b64": "AP4="}, "plain text"]}
    single = envelope.decode(request({"instances": [1]}), MODEL)
    assert single.rows[0].request_id == "rid"
    assert (
        envelope.encode(envelope.decode(request({"instances": []}), MODEL), []).body
        == b'{"predictions":[]}'
    )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "body is empty"),
        (b"{nope", "not valid JSON"),
        (b"\xff", "not UTF-8 JSON"),
        (b"[1]", "must be a JSON object"),
        (b"{}", 'has no "instances"'),
        (b'{"instances": 3}', '"instances" must be a list'),
        (b'{"instances": [{"b64": "%%"}]}', "not hold valid base64"),
        (b'{"instances": [{"b64": 1}]}', "must hold a base64 string"),
    ],
)
def test_json_envelope_refuses_malformed_payloads(body: bytes, message: str) -> None:
    with pytest.raises(BadRequestError, match=message):
        JsonEnvelope().decode(request(body), MODEL)


def test_json_envelope_errors_and_failed_rows() -> None:
    envelope = JsonEnvelope()
    assert envelope.render_error(ModelNotFoundError("Model not found: m")) == (
        404,
        "application/json",
        b'{"error": "Model not found: m"}',
    )
    decoded = envelope.decode(request({"instances": [1, 2]}), MODEL)
    with pytest.raises(FlambeauError, match="bad row") as caught:
        envelope.encode(decoded, [answer(1), answer("bad row", status=422)])
    assert caught.value.status == 422
    lone = envelope.decode(request(b'{"instances": ["\\ud800"]}'), MODEL)
    assert json.loads(lone.rows[0].inputs[0].value) == "\ud800"


def test_kserve_v1_predictions_and_explanations() -> None:
    envelope = KServeEnvelope()
    decoded = envelope.decode(request({"instances": [{"data": "aGk="}]}), MODEL)
    assert row_values(decoded.rows) == [{"data": "aGk="}]  # as it is, like TorchServe's
    assert json.loads(envelope.encode(decoded, [answer({"c": 1})]).body) == {
        "predictions": [{"c": 1}]
    }
    explained = envelope.decode(request({"instances": [1]}, {"explain": "True"}), MODEL)
    assert json.loads(envelope.encode(explained, [answer([0.1])]).body) == {"explanations": [[0.1]]}
    assert json.loads(envelope.render_error(BadRequestError("no"))[2]) == {"error": "no"}


def test_body_envelope_passes_the_payload_through() -> None:
    envelope = BodyEnvelope()
    form = WorkerRequest("rid", {}, [RequestInput("other", b"o"), RequestInput("data", b"d")])
    decoded = envelope.decode(form, MODEL)
    assert [i.name for i in decoded.rows[0].inputs] == ["data"]
    handler_answer = WorkerResponse("rid", status=201, content_type="text/plain", body=b"ok")
    assert envelope.encode(decoded, [handler_answer]) is handler_answer
    status, content_type, body = envelope.render_error(ModelNotFoundError("Model not found: m"))
    assert (status, content_type) == (404, "application/json")
    assert json.loads(body) == {
        "code": 404,
        "type": "ModelNotFoundException",
        "message": "Model not found: m",
    }
    with pytest.raises(BadRequestError, match="no body"):
        envelope.decode(WorkerRequest("rid", {}, []), MODEL)


def test_no_envelope_and_the_registry() -> None:
    plain = WorkerRequest("rid", {}, [RequestInput("body", b"x")])
    decoded = NoEnvelope().decode(plain, MODEL)
    assert decoded.rows == (plain,)
    assert ENVELOPE_ROW_HEADER not in plain.headers
    specs = {spec.name: spec for spec in flambeau_envelopes(config=None)}
    assert sorted(specs) == ["body", "json", "kserve", "kservev2", "seldon", "vertex"]

    class Registry:
        envelopes = specs

    assert isinstance(envelope_named(Registry, "vertex"), JsonEnvelope)
    assert isinstance(envelope_named(Registry, ""), NoEnvelope)
    with pytest.raises(InternalServerError, match="'nope' is not provided"):
        envelope_named(Registry, "nope")


# ---------------------------------------------------------------- KServe v2


def v2_request(document: dict[str, Any], binary: bytes = b"") -> WorkerRequest:
    head = json.dumps(document).encode()
    headers = {HEADER_LENGTH.lower(): str(len(head))} if binary else {}
    return request(head + binary, headers)


def test_kservev2_rows_are_torchserve_shaped() -> None:
    document = {
        "id": "client-id",
        "inputs": [
            {"name": "a", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3, 4]},
            {
                "name": "s",
                "shape": [1],
                "datatype": "BYTES",
                "data": ["one"],
                "parameters": {"p": 1},
            },
            {
                "name": "b",
                "shape": [2],
                "datatype": "BYTES",
                "parameters": {"binary_data_size": 10},
            },
        ],
    }
    raw = struct.pack("<I", 1) + b"x" + struct.pack("<I", 1) + b"\xff"
    decoded = KServeV2Envelope().decode(v2_request(document, raw), MODEL)
    assert row_values(decoded.rows) == [
        {"name": "a", "shape": [2, 2], "datatype": "FP32", "data": [[1.0, 2.0], [3.0, 4.0]]},
        {"name": "s", "shape": [1], "datatype": "BYTES", "data": "one", "parameters": {"p": 1}},
        {"name": "b", "shape": [2], "datatype": "BYTES", "data": ["eA==", "/w=="]},
    ]


def test_kservev2_outputs_json_and_binary() -> None:
    envelope = KServeV2Envelope()
    document = {
        "inputs": [
            {"name": "a", "shape": [2], "datatype": "FP32", "data": [1, 2]},
            {"name": "i", "shape": [1], "datatype": "INT16", "data": [3]},
        ],
        "outputs": [{"name": "OUT_A", "parameters": {"binary_data": True}}, {"name": "OUT_I"}],
    }
    decoded = envelope.decode(v2_request(document), MODEL)
    response = envelope.encode(decoded, [answer([[2.0, 4.0]]), answer([4])])
    length = int(response.headers[HEADER_LENGTH])
    head = json.loads(response.body[:length])
    assert head["id"] == "rid"
    assert (head["model_name"], head["model_version"]) == ("m", "2.0")
    out_a, out_i = head["outputs"]
    assert out_a == {
        "name": "OUT_A",
        "datatype": "FP32",
        "shape": [1, 2],
        "parameters": {"binary_data_size": 8},
    }
    assert response.body[length:] == struct.pack("<2f", 2.0, 4.0)
    assert out_i == {"name": "OUT_I", "datatype": "INT16", "shape": [1], "data": [4]}


def test_kservev2_output_rules() -> None:
    envelope = KServeV2Envelope()
    document = {"inputs": [{"name": "a", "shape": [1], "datatype": "INT8", "data": [1]}]}
    decoded = envelope.decode(v2_request(document), MODEL)

    def outputs(value: Any) -> list[dict[str, Any]]:
        return json.loads(envelope.encode(decoded, [answer(value)]).body)["outputs"]

    # Named after the input (TorchServe); the input's datatype while the values fit it.
    assert outputs([5]) == [{"name": "a", "datatype": "INT8", "shape": [1], "data": [5]}]
    assert outputs([500])[0]["datatype"] == "INT64"
    assert outputs([0.5])[0]["datatype"] == "FP64"
    assert outputs(["x"])[0] == {"name": "a", "datatype": "BYTES", "shape": [1], "data": ["x"]}
    assert outputs(True)[0]["datatype"] == "BOOL"
    explicit = [
        {"name": "p", "datatype": "FP16", "shape": [2, 1], "data": [1, 2]},
        {"name": "q", "data": [[1, 2]]},
    ]
    assert outputs(explicit) == [
        {"name": "p", "datatype": "FP16", "shape": [2, 1], "data": [1.0, 2.0]},
        {"name": "q", "datatype": "INT8", "shape": [1, 2], "data": [1, 2]},
    ]
    with pytest.raises(InternalServerError, match="does not hold 3 elements"):
        outputs({"data": [1, 2, 3], "shape": [2]})
    with pytest.raises(InternalServerError, match="mixes value types"):
        outputs([1, "x"])
    with pytest.raises(InternalServerError, match="out of range for UINT8"):
        outputs({"data": [300], "datatype": "UINT8"})
    with pytest.raises(InternalServerError, match="not FP16"):
        outputs({"data": [1e6], "datatype": "FP16"})
    wanted = envelope.decode(
        v2_request({**document, "outputs": [{"name": "zzz"}, {"name": "yyy"}]}), MODEL
    )
    with pytest.raises(BadRequestError, match="unknown output"):
        envelope.encode(wanted, [answer([1])])


@pytest.mark.parametrize(
    ("document", "binary", "message"),
    [
        ({"inputs": []}, b"", '"inputs" must be a non-empty list'),
        ({"inputs": [{"shape": [1], "datatype": "FP32", "data": [1]}]}, b"", 'needs a "name"'),
        ({"inputs": [{"name": "a", "shape": [1], "data": [1]}]}, b"", 'has no "datatype"'),
        ({"inputs": [{"name": "a", "shape": [1], "datatype": "FP32"}]}, b"", 'neither "data" nor'),
        (
            {
                "inputs": [
                    {
                        "name": "a",
                        "shape": [2],
                        "datatype": "FP32",
                        "parameters": {"binary_data_size": 8},
                    }
                ]
            },
            b"\x00" * 4,
            "only 4 bytes of binary data are left",
        ),
        (
            {
                "inputs": [
                    {
                        "name": "a",
                        "shape": [1],
                        "datatype": "FP32",
                        "parameters": {"binary_data_size": 4},
                    }
                ]
            },
            b"\x00" * 6,
            "2 bytes of binary data belong to no input",
        ),
        (
            {
                "inputs": [{"name": "a", "shape": [1], "datatype": "FP32", "data": [1]}],
                "outputs": [{}],
            },
            b"",
            'needs a "name"',
        ),
    ],
)
def test_kservev2_refuses_malformed_requests(
    document: dict[str, Any], binary: bytes, message: str
) -> None:
    with pytest.raises(BadRequestError, match=message):
        KServeV2Envelope().decode(v2_request(document, binary), MODEL)


def test_kservev2_header_length_is_checked() -> None:
    bad = request(b"{}", {HEADER_LENGTH: "99"})
    with pytest.raises(BadRequestError, match="has only 2 bytes"):
        KServeV2Envelope().decode(bad, MODEL)


# ---------------------------------------------------------------- Seldon


def test_seldon_kinds_in_and_out() -> None:
    envelope = SeldonEnvelope()
    ndarray = envelope.decode(
        request({"data": {"names": ["a", "b"], "ndarray": [[1, 2], [3, 4]]}}), MODEL
    )
    assert row_values(ndarray.rows) == [[1, 2], [3, 4]]
    body = json.loads(envelope.encode(ndarray, [answer([0.1, 0.9]), answer([0.8, 0.2])]).body)
    assert body["data"] == {"names": ["t:0", "t:1"], "ndarray": [[0.1, 0.9], [0.8, 0.2]]}
    assert body["meta"] == {
        "puid": "rid",
        "tags": {},
        "routing": {},
        "requestPath": {"m": "2.0"},
        "metrics": [],
    }

    tensor = envelope.decode(
        request(
            {
                "data": {"tensor": {"shape": [2, 2], "values": [1, 2, 3, 4]}},
                "meta": {"puid": "p", "tags": {"t": 1}},
            }
        ),
        MODEL,
    )
    assert row_values(tensor.rows) == [[1, 2], [3, 4]]
    body = json.loads(envelope.encode(tensor, [answer([1]), answer([2])]).body)
    assert body["data"] == {"names": ["t:0"], "tensor": {"shape": [2, 1], "values": [1, 2]}}
    assert (body["meta"]["puid"], body["meta"]["tags"]) == ("p", {"t": 1})
    # Answers that are not rectangular numbers fall back to ndarray.
    assert "ndarray" in json.loads(envelope.encode(tensor, [answer("a"), answer("b")]).body)["data"]

    for message, value, kind in (
        ({"strData": "hi"}, "hi", "strData"),
        ({"binData": "AAE="}, b"\x00\x01", "binData"),
        ({"jsonData": {"k": [1]}}, {"k": [1]}, "jsonData"),
    ):
        decoded = envelope.decode(request(message), MODEL)
        assert row_values(decoded.rows) == [value]
        assert kind in json.loads(envelope.encode(decoded, [answer(value)]).body)


@pytest.mark.parametrize(
    ("message", "error"),
    [
        ({}, "has no data, strData, binData or jsonData"),
        ({"data": []}, '"data" must be an object'),
        ({"data": {"names": [1], "ndarray": []}}, '"names" must be a list of strings'),
        ({"data": {"ndarray": 3}}, '"ndarray" must be a list'),
        ({"data": {"tftensor": {}}}, 'needs an "ndarray" or a "tensor"'),
        ({"data": {"tensor": {"shape": [3], "values": [1]}}}, "needs 3 values, got 1"),
        (
            {"data": {"tensor": {"shape": [1], "values": ["1"]}}},
            '"values" must be a list of numbers',
        ),
        ({"strData": 3}, '"strData" must be a string'),
        ({"binData": "@@"}, '"binData" is not valid base64'),
        ({"jsonData": 1, "meta": []}, '"meta" must be an object'),
    ],
)
def test_seldon_refuses_malformed_messages(message: dict[str, Any], error: str) -> None:
    with pytest.raises(BadRequestError, match=error):
        SeldonEnvelope().decode(request(message), MODEL)


def test_seldon_error_shape() -> None:
    status, _, body = SeldonEnvelope().render_error(BadRequestError("bad tensor"))
    assert status == 400
    assert json.loads(body) == {
        "status": {
            "code": 400,
            "info": "bad tensor",
            "reason": "BadRequestException",
            "status": "FAILURE",
        }
    }
