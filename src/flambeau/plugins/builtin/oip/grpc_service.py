"""``GRPCInferenceService``: the Open Inference Protocol over gRPC (grpc.aio).

One servicer class serves both generated packages: ``inference`` (KServe, Triton,
tritonclient) and ``org.pytorch.serve.grpc.openinference`` (TorchServe's). ``ModelInfer``
turns a ``ModelInferRequest`` into the same :class:`~flambeau.envelopes.kservev2.InferRequest`
as the REST route, so the handler sees the same rows; tensors come as typed ``contents`` or
``raw_input_contents`` and the answer mirrors the request (raw in, raw out, which is where
tritonclient reads outputs). Errors abort the call with TorchServe's HTTP-to-gRPC status map.
"""

from __future__ import annotations

import logging
import uuid
from types import ModuleType
from typing import Any

from flambeau.api import (
    BadRequestError,
    FlambeauError,
    GrpcServiceSpec,
    InternalServerError,
    ModelRef,
    WorkerRequest,
)
from flambeau.envelopes.dataplane import Submission
from flambeau.envelopes.kservev2 import InferRequest, KServeV2Envelope, RequestedOutput
from flambeau.envelopes.tensors import DATATYPES, Tensor, check_shape, element_count, from_raw
from flambeau.envelopes.tensors import to_raw as tensor_to_raw
from flambeau.plugins.builtin.grpc.status import grpc_code
from flambeau.plugins.builtin.oip.common import model_metadata, model_ready, server_metadata

log = logging.getLogger("flambeau.oip")

# The typed contents field of each datatype; FP16 and BF16 travel only as raw contents.
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
PACKAGES = {
    "inference": "grpc_predict_v2",
    "org.pytorch.serve.grpc.openinference": "open_inference_grpc",
}


def _parameter_value(parameter: Any) -> Any:
    choice = parameter.WhichOneof("parameter_choice")
    return getattr(parameter, choice) if choice else None


def _parameters(mapping: Any) -> dict[str, Any]:
    return {key: _parameter_value(value) for key, value in mapping.items()}


def _set_parameter(target: Any, value: Any) -> None:
    if isinstance(value, bool):
        target.bool_param = value
    elif isinstance(value, int):
        target.int64_param = value
    elif isinstance(value, float):
        target.double_param = value
    else:
        target.string_param = str(value)


def infer_request(message: Any) -> InferRequest:
    """An :class:`InferRequest` from a ``ModelInferRequest`` of either package."""
    raw = list(message.raw_input_contents)
    if raw and len(raw) != len(message.inputs):
        raise BadRequestError(
            f"raw_input_contents has {len(raw)} entries for {len(message.inputs)} inputs"
        )
    if not message.inputs:
        raise BadRequestError("the request has no inputs")
    tensors = []
    for index, item in enumerate(message.inputs):
        parameters = _parameters(item.parameters)
        if raw:
            if item.HasField("contents"):
                raise BadRequestError(
                    f"input '{item.name}' has contents although raw_input_contents is used"
                )
            tensor = from_raw(item.name, item.datatype, list(item.shape), raw[index])
        else:
            tensor = _from_contents(item)
        tensors.append(
            Tensor(tensor.name, tensor.datatype, tensor.shape, tensor.data, parameters, raw=True)
        )
    return InferRequest(
        id=message.id,
        inputs=tuple(tensors),
        outputs=tuple(RequestedOutput(o.name) for o in message.outputs),
        parameters=_parameters(message.parameters),
        binary_output=bool(raw),
    )


def _from_contents(item: Any) -> Tensor:
    dtype = DATATYPES.get(item.datatype)
    if dtype is None:
        raise BadRequestError(f"tensor '{item.name}': unsupported datatype {item.datatype!r}")
    field_name = CONTENTS_FIELD.get(dtype.name)
    if field_name is None:
        raise BadRequestError(
            f"tensor '{item.name}': {dtype.name} needs raw_input_contents (no typed contents)"
        )
    shape = check_shape(item.name, list(item.shape))
    values = list(getattr(item.contents, field_name))
    if len(values) != element_count(shape):
        raise BadRequestError(
            f"tensor '{item.name}': shape {list(shape)} needs {element_count(shape)} "
            f"elements, got {len(values)} in {field_name}"
        )
    if dtype.kind in {"int", "uint"} and not all(dtype.accepts(v) for v in values):
        raise BadRequestError(f"tensor '{item.name}': a value is out of range for {dtype.name}")
    return Tensor(item.name, dtype.name, shape, values)


def infer_response(
    pb: ModuleType, infer: InferRequest, model: ModelRef, request_id: str, outputs: list[Tensor]
) -> Any:
    response = pb.ModelInferResponse(
        model_name=model.name, model_version=model.version, id=infer.id or request_id
    )
    # Typed contents cannot carry FP16/BF16, and raw and typed outputs cannot be mixed.
    raw = infer.binary_output or any(t.datatype not in CONTENTS_FIELD for t in outputs)
    for tensor in outputs:
        out = response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        for key, value in tensor.parameters.items():
            _set_parameter(out.parameters[key], value)
        if raw:
            response.raw_output_contents.append(tensor_to_raw(tensor))
            continue
        contents = getattr(out.contents, CONTENTS_FIELD[tensor.datatype])
        try:
            contents.extend(tensor.data)
        except (TypeError, ValueError) as exc:
            raise InternalServerError(f"output '{tensor.name}': {exc}") from None
    return response


class InferenceServicer:
    """``GRPCInferenceService`` for one generated package (``pb``)."""

    def __init__(self, server: Any, pb: ModuleType) -> None:
        self.server = server
        self.pb = pb
        self.envelope = KServeV2Envelope()

    async def ServerLive(self, request: Any, context: Any) -> Any:
        return self.pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> Any:
        return self.pb.ServerReadyResponse(ready=self.server.models.healthy())

    async def ModelReady(self, request: Any, context: Any) -> Any:
        mv = await self._model(context, request.name, request.version)
        return self.pb.ModelReadyResponse(ready=model_ready(mv))

    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        return self.pb.ServerMetadataResponse(**server_metadata())

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        mv = await self._model(context, request.name, request.version)
        metadata = model_metadata(self.server, mv)
        response = self.pb.ModelMetadataResponse(
            name=metadata["name"], versions=metadata["versions"], platform=metadata["platform"]
        )
        for key in ("inputs", "outputs"):
            for tensor in metadata[key]:
                getattr(response, key).add(**tensor)
        return response

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        version = request.model_version or None
        mv = await self._model(context, request.model_name, version)
        with self.server.prediction(mv.name, version):
            return await self._infer(request, context, mv, version)

    async def _infer(self, request: Any, context: Any, mv: Any, version: str | None) -> Any:
        try:
            infer = infer_request(request)
            work = WorkerRequest(str(uuid.uuid4()), self._headers(context), [])
            model = ModelRef(mv.name, mv.version)
            decoded = self.envelope.decode_infer(infer, work, model)
            submission = Submission.submit(self.server, mv, decoded.rows, version)
            outputs = self.envelope.outputs(decoded, await submission.responses())
            return infer_response(self.pb, infer, model, work.request_id, outputs)
        except FlambeauError as error:
            await context.abort(grpc_code(error.status), error.message)
            raise  # abort raises; this line is never reached
        except Exception:
            # What is logged stays apart from what the client sees.
            log.exception("ModelInfer on %s failed unexpectedly", mv.name)
            await context.abort(grpc_code(500), "Internal server error")
            raise

    async def _model(self, context: Any, name: str, version: str | None) -> Any:
        try:
            if not name:
                raise BadRequestError("Parameter model_name is required.")
            return self.server.models.get(name, version or None)
        except FlambeauError as error:
            await context.abort(grpc_code(error.status), error.message)
            raise

    @staticmethod
    def _headers(context: Any) -> dict[str, str]:
        headers = {"explain": "False", "url_path": ""}
        for key, value in context.invocation_metadata() or ():
            if not key.endswith("-bin") and isinstance(value, str):
                headers[key] = value
        return headers


def _modules(package: str) -> tuple[ModuleType, ModuleType]:
    import importlib

    base = f"flambeau.plugins.builtin.oip._generated.{PACKAGES[package]}"
    return importlib.import_module(f"{base}_pb2"), importlib.import_module(f"{base}_pb2_grpc")


def add_servicer(package: str) -> Any:
    """The ``add_to_server`` callable of :class:`GrpcServiceSpec` for one package."""

    def add_to_server(grpc_server: Any, flambeau_server: Any) -> None:
        pb, pb_grpc = _modules(package)
        servicer = InferenceServicer(flambeau_server, pb)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, grpc_server)

    return add_to_server


def grpc_services() -> list[GrpcServiceSpec]:
    return [
        GrpcServiceSpec(
            name=f"{package}.GRPCInferenceService",
            listener="inference",
            add_to_server=add_servicer(package),
            permission="inference",
        )
        for package in PACKAGES
    ]
