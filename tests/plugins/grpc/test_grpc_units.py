"""The gRPC plugin's pure parts: status mapping, metadata, request conversion, listener settings."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from google.rpc import error_details_pb2

from flambeau.api import (
    ConfigError,
    FlambeauError,
    ModelNotFoundError,
    RegisterParams,
    WorkerResponse,
)
from flambeau.core.config import Config
from flambeau.plugins.builtin.grpc.auth import MetadataHeaders, split_method
from flambeau.plugins.builtin.grpc.inference import health_document, response_error
from flambeau.plugins.builtin.grpc.listener import GrpcListenerSettings
from flambeau.plugins.builtin.grpc.management import pretty, register_params
from flambeau.plugins.builtin.grpc.status import grpc_code, rpc_status

S = grpc.StatusCode


@pytest.mark.parametrize(
    ("http", "code"),
    [
        (200, S.OK),
        (202, S.OK),
        (206, S.OK),
        (400, S.INVALID_ARGUMENT),
        (401, S.UNAUTHENTICATED),
        (403, S.PERMISSION_DENIED),
        (404, S.NOT_FOUND),
        (405, S.FAILED_PRECONDITION),
        (408, S.FAILED_PRECONDITION),
        (409, S.ABORTED),
        (413, S.RESOURCE_EXHAUSTED),
        (416, S.OUT_OF_RANGE),
        (429, S.RESOURCE_EXHAUSTED),
        (499, S.CANCELLED),
        (500, S.INTERNAL),
        (501, S.UNIMPLEMENTED),
        (503, S.UNAVAILABLE),
        (504, S.DEADLINE_EXCEEDED),
        (507, S.INTERNAL),
        (599, S.INTERNAL),
        (302, S.UNKNOWN),
        (600, S.UNKNOWN),
    ],
)
def test_http_status_maps_as_torchserve_does(http: int, code: grpc.StatusCode) -> None:
    assert grpc_code(http) is code


def test_in_band_status_carries_code_message_and_error_type() -> None:
    status = rpc_status(ModelNotFoundError("Model not found: m"))
    assert (status.code, status.message) == (S.NOT_FOUND.value[0], "Model not found: m")
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert info.reason == "ModelNotFoundException"


def test_metadata_becomes_case_insensitive_headers_without_binary_entries() -> None:
    headers = MetadataHeaders(
        [("authorization", "Bearer k1"), ("trace-bin", b"\x00"), ("x-a", "1"), ("X-A", "2")]
    )
    assert headers.get("Authorization") == "Bearer k1"
    assert headers["x-a"] == "1"  # the first value wins, as for HTTP's get()
    assert "trace-bin" not in headers
    assert len(headers) == 2
    assert MetadataHeaders(None).get("authorization") is None


def test_split_method() -> None:
    assert split_method("/org.pytorch.serve.grpc.inference.InferenceAPIsService/Ping") == (
        "org.pytorch.serve.grpc.inference.InferenceAPIsService",
        "Ping",
    )


def test_register_request_zero_values_mean_not_given() -> None:
    request = SimpleNamespace(
        url="m.mar",
        model_name="",
        handler="",
        runtime="",
        batch_size=0,
        max_batch_delay=-5,
        initial_workers=0,
        synchronous=False,
        response_timeout=0,
        startup_timeout=0,
    )
    assert register_params(request) == RegisterParams(url="m.mar", synchronous=False)
    given = SimpleNamespace(
        **{**vars(request), "model_name": "n", "batch_size": 4, "initial_workers": 2}
    )
    params = register_params(given)
    assert (params.model_name, params.batch_size, params.initial_workers) == ("n", 4, 2)
    with pytest.raises(FlambeauError, match=r"Parameter url is required\.") as info:
        register_params(SimpleNamespace(**{**vars(request), "url": ""}))
    assert info.value.status == 400


def test_documents_are_torchserve_pretty_json_without_newline() -> None:
    assert health_document(True) == '{\n  "status": "Healthy"\n}'
    assert health_document(False) == '{\n  "status": "Unhealthy"\n}'
    assert pretty({"a": ["é"]}) == '{\n  "a": [\n    "é"\n  ]\n}'


def test_handler_error_status_becomes_an_error() -> None:
    assert response_error(WorkerResponse("r", status=200, body=b"ok")) is None
    error = response_error(WorkerResponse("r", status=429, reason="Slow down", body=b"x"))
    assert error is not None
    assert (error.status, error.message) == (429, "Slow down")
    error = response_error(WorkerResponse("r", status=404, body=b"no such thing"))
    assert error is not None
    assert error.message == "no such thing"


def _settings(**values: str) -> GrpcListenerSettings:
    return GrpcListenerSettings.from_config(Config.load(cli=values, environ={}), "inference")


def test_listener_settings_defaults_and_options() -> None:
    settings = _settings()
    assert (settings.target, settings.tls) == ("127.0.0.1:7070", False)
    options = dict(settings.options())
    assert options["grpc.max_receive_message_length"] == 6553500
    assert options["grpc.max_send_message_length"] == 6553500
    assert options["grpc.so_reuseport"] == 0
    assert "grpc.max_connection_age_ms" not in options
    tuned = _settings(
        grpc_inference_address="::1",
        grpc_inference_port="0",
        max_request_size="10000000",
        max_response_size="20000000",
        grpc_inference_max_connection_age_ms="60000",
        grpc_inference_max_connection_age_grace_ms="5000",
    )
    assert tuned.target == "[::1]:0"
    assert tuned.describe(4321) == "[::1]:4321"
    options = dict(tuned.options())
    assert options["grpc.max_receive_message_length"] == 10_000_000
    assert options["grpc.max_send_message_length"] == 20_000_000
    assert options["grpc.max_connection_age_ms"] == 60000
    assert options["grpc.max_connection_age_grace_ms"] == 5000
    unix = _settings(grpc_inference_address="unix:/tmp/flambeau.sock")
    assert unix.target == unix.describe(1) == "unix:/tmp/flambeau.sock"


def test_tls_needs_readable_pem_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="certificate_file and private_key_file"):
        _settings(enable_grpc_ssl="true").credentials()
    missing = _settings(
        enable_grpc_ssl="true",
        certificate_file=str(tmp_path / "cert.pem"),
        private_key_file=str(tmp_path / "key.pem"),
    )
    with pytest.raises(ConfigError, match="cannot read"):
        missing.credentials()
