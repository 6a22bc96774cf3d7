"""The OIP plugin's parts: proto <-> tensors for both packages, status map, the switch."""

from __future__ import annotations

import struct

import grpc
import pytest

from flambeau.api import BadRequestError, ModelRef
from flambeau.core.config import Config
from flambeau.envelopes.tensors import Tensor
from flambeau.plugins.builtin.grpc.status import grpc_code
from flambeau.plugins.builtin.oip import plugin
from flambeau.plugins.builtin.oip._generated import grpc_predict_v2_pb2 as standard
from flambeau.plugins.builtin.oip._generated import open_inference_grpc_pb2 as torchserve
from flambeau.plugins.builtin.oip.grpc_service import infer_request, infer_response

PACKAGES = [standard, torchserve]


@pytest.mark.parametrize("pb", PACKAGES)
def test_typed_contents_in_and_out(pb: object) -> None:
    message = pb.ModelInferRequest(model_name="m", id="q")
    message.parameters["priority"].int64_param = 2
    a = message.inputs.add(name="a", datatype="INT8", shape=[2])
    a.contents.int_contents.extend([-3, 4])
    b = message.inputs.add(name="b", datatype="BYTES", shape=[1])
    b.contents.bytes_contents.append(b"\x00z")
    message.outputs.add(name="A")
    infer = infer_request(message)
    assert [(t.name, t.datatype, t.shape, t.data) for t in infer.inputs] == [
        ("a", "INT8", (2,), [-3, 4]),
        ("b", "BYTES", (1,), [b"\x00z"]),
    ]
    assert infer.parameters == {"priority": 2}
    assert [o.name for o in infer.outputs] == ["A"]
    assert not infer.binary_output
    outputs = [Tensor("A", "INT8", (2,), [-2, 5], {"note": "x"}), Tensor("B", "FP64", (1,), [0.5])]
    response = infer_response(pb, infer, ModelRef("m", "1"), "rid", outputs)
    assert response.id == "q"
    assert not response.raw_output_contents
    assert list(response.outputs[0].contents.int_contents) == [-2, 5]
    assert response.outputs[0].parameters["note"].string_param == "x"
    assert list(response.outputs[1].contents.fp64_contents) == [0.5]


@pytest.mark.parametrize("pb", PACKAGES)
def test_raw_contents_in_and_out(pb: object) -> None:
    message = pb.ModelInferRequest(
        model_name="m", raw_input_contents=[struct.pack("<2e", 1.5, -2.0)]
    )
    message.inputs.add(name="h", datatype="FP16", shape=[1, 2])
    infer = infer_request(message)
    assert infer.inputs[0].data == [1.5, -2.0]
    assert infer.binary_output
    response = infer_response(
        pb, infer, ModelRef("m", "1"), "rid", [Tensor("h", "FP16", (1, 2), [3.0, -4.0])]
    )
    assert response.id == "rid"
    assert list(response.raw_output_contents) == [struct.pack("<2e", 3.0, -4.0)]


def test_fp16_outputs_force_raw_contents() -> None:
    message = standard.ModelInferRequest(model_name="m")
    message.inputs.add(name="x", datatype="FP32", shape=[1]).contents.fp32_contents.append(1.0)
    infer = infer_request(message)
    outputs = [Tensor("x", "FP32", (1,), [2.0]), Tensor("y", "FP16", (1,), [1.0])]
    response = infer_response(standard, infer, ModelRef("m", "1"), "rid", outputs)
    assert list(response.raw_output_contents) == [struct.pack("<f", 2.0), struct.pack("<e", 1.0)]


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda m: None, "no inputs"),
        (lambda m: m.inputs.add(name="x", datatype="FP16", shape=[1]), "needs raw_input_contents"),
        (
            lambda m: m.inputs.add(
                name="x", datatype="FP32", shape=[2]
            ).contents.fp32_contents.append(1),
            "needs 2 elements, got 1",
        ),
        (
            lambda m: m.inputs.add(
                name="x", datatype="UINT8", shape=[1]
            ).contents.uint_contents.append(300),
            "out of range for UINT8",
        ),
        (lambda m: m.inputs.add(name="x", datatype="NOPE", shape=[1]), "unsupported datatype"),
        (
            lambda m: (
                m.inputs.add(name="x", datatype="FP32", shape=[1]),
                m.inputs.add(name="y", datatype="FP32", shape=[1]),
                m.raw_input_contents.append(b"1234"),
            ),
            "1 entries for 2 inputs",
        ),
        (
            lambda m: (
                m.inputs.add(name="x", datatype="FP32", shape=[1]).contents.fp32_contents.append(1),
                m.raw_input_contents.append(b"1234"),
            ),
            "has contents although",
        ),
    ],
)
def test_malformed_requests_are_bad_requests(build: object, message: str) -> None:
    request = standard.ModelInferRequest(model_name="m")
    build(request)  # type: ignore[operator]
    with pytest.raises(BadRequestError, match=message):
        infer_request(request)


def test_http_to_grpc_status_map() -> None:
    codes = grpc.StatusCode
    assert grpc_code(400) == codes.INVALID_ARGUMENT
    assert grpc_code(404) == codes.NOT_FOUND
    assert grpc_code(429) == codes.RESOURCE_EXHAUSTED
    assert grpc_code(503) == codes.UNAVAILABLE
    assert grpc_code(422) == codes.FAILED_PRECONDITION
    assert grpc_code(507) == codes.INTERNAL
    assert grpc_code(200) == codes.OK
    assert grpc_code(99) == codes.UNKNOWN


def test_the_switch_adds_metadata_routes_and_the_grpc_services() -> None:
    off = Config.load(environ={})
    on = Config.load(environ={"TS_OPEN_INFERENCE_PROTOCOL": "oip"})
    off_routes = {r.pattern for r in plugin.flambeau_routes(off)}
    on_routes = {r.pattern for r in plugin.flambeau_routes(on)}
    assert all(p.endswith(("/infer/?", "/explain/?")) for p in off_routes)
    assert off_routes < on_routes
    assert {r"/v2/?", r"/v2/health/live/?", r"/v2/health/ready/?"} <= on_routes
    assert plugin.flambeau_grpc_services(off) == []
    services = plugin.flambeau_grpc_services(on)
    assert [s.name for s in services] == [
        "inference.GRPCInferenceService",
        "org.pytorch.serve.grpc.openinference.GRPCInferenceService",
    ]
    assert {(s.listener, s.permission) for s in services} == {("inference", "inference")}
