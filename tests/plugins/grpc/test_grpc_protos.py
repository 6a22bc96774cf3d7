"""The .proto files against the wire spec's tables (§7.1, §7.2), and the committed modules
against the .proto files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FieldDescriptor

from flambeau.plugins.builtin.grpc._generated import (
    inference_pb2,
    inference_pb2_grpc,
    management_pb2,
    management_pb2_grpc,
)

INFERENCE_MESSAGES = {
    "PredictionsRequest": {
        "model_name": (1, "string"),
        "model_version": (2, "string"),
        "input": (3, "map<string, bytes>"),
        "sequence_id": (4, "optional string"),
    },
    "PredictionResponse": {
        "prediction": (1, "bytes"),
        "sequence_id": (2, "optional string"),
        "status": (3, "optional google.rpc.Status"),
    },
    "TorchServeHealthResponse": {"health": (1, "string")},
}
INFERENCE_RPCS = {
    "Ping": ("google.protobuf.Empty", "TorchServeHealthResponse", False, False),
    "Predictions": ("PredictionsRequest", "PredictionResponse", False, False),
    "StreamPredictions": ("PredictionsRequest", "PredictionResponse", False, True),
    "StreamPredictions2": ("PredictionsRequest", "PredictionResponse", True, True),
}
MANAGEMENT_MESSAGES = {
    "ManagementResponse": {"msg": (1, "string")},
    "DescribeModelRequest": {
        "model_name": (1, "string"),
        "model_version": (2, "string"),
        "customized": (3, "bool"),
    },
    "ListModelsRequest": {"limit": (1, "int32"), "next_page_token": (2, "int32")},
    "RegisterModelRequest": {
        "batch_size": (1, "int32"),
        "handler": (2, "string"),
        "initial_workers": (3, "int32"),
        "max_batch_delay": (4, "int32"),
        "model_name": (5, "string"),
        "response_timeout": (6, "int32"),
        "runtime": (7, "string"),
        "synchronous": (8, "bool"),
        "url": (9, "string"),
        "s3_sse_kms": (10, "bool"),
        "startup_timeout": (11, "int32"),
    },
    "ScaleWorkerRequest": {
        "model_name": (1, "string"),
        "model_version": (2, "string"),
        "max_worker": (3, "int32"),
        "min_worker": (4, "int32"),
        "number_gpu": (5, "int32"),
        "synchronous": (6, "bool"),
        "timeout": (7, "int32"),
    },
    "SetDefaultRequest": {"model_name": (1, "string"), "model_version": (2, "string")},
    "UnregisterModelRequest": {"model_name": (1, "string"), "model_version": (2, "string")},
}
MANAGEMENT_RPCS = {
    name: (f"{name}Request", "ManagementResponse", False, False)
    for name in ("DescribeModel", "ListModels", "RegisterModel", "SetDefault", "UnregisterModel")
} | {"ScaleWorker": ("ScaleWorkerRequest", "ManagementResponse", False, False)}

_SCALARS = {
    FieldDescriptor.TYPE_STRING: "string",
    FieldDescriptor.TYPE_BYTES: "bytes",
    FieldDescriptor.TYPE_INT32: "int32",
    FieldDescriptor.TYPE_BOOL: "bool",
}


def _type(field: FieldDescriptor) -> str:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        message = field.message_type
        if message.GetOptions().map_entry:
            key, value = message.fields_by_name["key"], message.fields_by_name["value"]
            return f"map<{_type(key)}, {_type(value)}>"
        name = message.full_name
    else:
        name = _SCALARS[field.type]
    oneof = field.containing_oneof
    # proto3 `optional` is a synthetic one-field oneof named after the field.
    return f"optional {name}" if oneof is not None and oneof.name == f"_{field.name}" else name


def _messages(module: Any, names: dict[str, Any]) -> dict[str, dict[str, tuple[int, str]]]:
    found = {}
    for name in names:
        descriptor = module.DESCRIPTOR.message_types_by_name[name]
        found[name] = {f.name: (f.number, _type(f)) for f in descriptor.fields}
    return found


def _rpcs(module: Any, service: str) -> dict[str, tuple[str, str, bool, bool]]:
    descriptor = module.DESCRIPTOR.services_by_name[service]
    package = module.DESCRIPTOR.package + "."
    return {
        m.name: (
            m.input_type.full_name.removeprefix(package),
            m.output_type.full_name.removeprefix(package),
            m.client_streaming,
            m.server_streaming,
        )
        for m in descriptor.methods
    }


def test_inference_proto_matches_the_wire_spec(stubs: SimpleNamespace) -> None:
    module = stubs.inference_pb2
    assert module.DESCRIPTOR.package == "org.pytorch.serve.grpc.inference"
    assert _messages(module, INFERENCE_MESSAGES) == INFERENCE_MESSAGES
    assert _rpcs(module, "InferenceAPIsService") == INFERENCE_RPCS
    assert module.DESCRIPTOR.GetOptions().java_multiple_files


def test_management_proto_matches_the_wire_spec(stubs: SimpleNamespace) -> None:
    module = stubs.management_pb2
    assert module.DESCRIPTOR.package == "org.pytorch.serve.grpc.management"
    assert _messages(module, MANAGEMENT_MESSAGES) == MANAGEMENT_MESSAGES
    assert _rpcs(module, "ManagementAPIsService") == MANAGEMENT_RPCS


def _file_proto(module: Any) -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto()
    module.DESCRIPTOR.CopyToProto(proto)
    return proto


def test_committed_modules_are_generated_from_the_protos(stubs: SimpleNamespace) -> None:
    assert _file_proto(inference_pb2) == _file_proto(stubs.inference_pb2)
    assert _file_proto(management_pb2) == _file_proto(stubs.management_pb2)
    # The committed service modules import their messages package-relatively.
    assert inference_pb2_grpc.inference__pb2 is inference_pb2
    assert management_pb2_grpc.management__pb2 is management_pb2


def test_grpc_stubs_command_writes_importable_client_modules(tmp_path: Path) -> None:
    out = tmp_path / "client"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "flambeau.core.cli",
            "-p",
            "flambeau.plugins.builtin.grpc.plugin",
            "grpc-stubs",
            str(out),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    names = sorted(path.name for path in out.iterdir() if path.suffix == ".py")
    assert names == [
        "inference_pb2.py",
        "inference_pb2_grpc.py",
        "management_pb2.py",
        "management_pb2_grpc.py",
    ]
    check = subprocess.run(
        [sys.executable, "-c", "import inference_pb2_grpc, management_pb2_grpc"],
        cwd=out,
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stderr


def test_generated_code_is_imported_only_when_a_listener_starts() -> None:
    # Worker processes import the plugin module: it must not pull in grpc or protobuf.
    code = (
        "import sys, flambeau.plugins.builtin.grpc.plugin as p;"
        "p.flambeau_listeners(None); p.flambeau_grpc_services(None);"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('grpc', 'google')"
        " or '_generated' in m))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]"
