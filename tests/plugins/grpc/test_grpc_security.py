"""The gRPC listeners' security: TLS, token auth from key_file.json, per-model authorization,
the model-API switch, the message-size limit, and a third-party service's permissions."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from google.protobuf import empty_pb2

from flambeau.testing.fixtures import ServerProcess

S = grpc.StatusCode
TIMEOUT = 60
HERE = Path(__file__).resolve().parent
TOKEN_FAILED = (
    "Token Authorization failed. Token either incorrect, expired, or not provided correctly"
)
StartServer = Callable[..., ServerProcess]

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.fixture(scope="module")
def server(start_server: StartServer, certificate: tuple[Path, Path]) -> ServerProcess:
    cert, key = certificate
    return start_server(
        config={
            "enable_grpc_ssl": "true",
            "certificate_file": str(cert),
            "private_key_file": str(key),
            "max_request_size": "1000000",
            "authz_policy": json.dumps(
                {"inference": {"permissions": ["inference"], "models": ["allowed"]}}
            ),
        },
        args=["-p", "extra_grpc_service"],
        env={"PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])},
    )


@pytest.fixture(scope="module")
def channels(server: ServerProcess, certificate: tuple[Path, Path]) -> Iterator[dict[str, Any]]:
    credentials = grpc.ssl_channel_credentials(root_certificates=certificate[0].read_bytes())
    with (
        grpc.secure_channel(server.addresses["grpc_inference"], credentials) as inference,
        grpc.secure_channel(server.addresses["grpc_management"], credentials) as management,
    ):
        yield {"inference": inference, "management": management}


@pytest.fixture(scope="module")
def inf(channels: dict[str, Any], stubs: SimpleNamespace) -> Any:
    return stubs.inference_pb2_grpc.InferenceAPIsServiceStub(channels["inference"])


@pytest.fixture(scope="module")
def mgmt(channels: dict[str, Any], stubs: SimpleNamespace) -> Any:
    return stubs.management_pb2_grpc.ManagementAPIsServiceStub(channels["management"])


def bearer(server: ServerProcess, kind: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {server.keys[kind]['key']}"),)


def status_of(call: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value.code(), info.value.details()


def test_plaintext_clients_cannot_reach_the_tls_listener(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.addresses["grpc_inference"]) as channel:
        ping = channel.unary_unary(
            "/org.pytorch.serve.grpc.inference.InferenceAPIsService/Ping",
            request_serializer=empty_pb2.Empty.SerializeToString,
        )
        code, _ = status_of(lambda: ping(empty_pb2.Empty(), timeout=5))
    assert code == S.UNAVAILABLE


def test_every_rpc_needs_the_listeners_key(
    server: ServerProcess, inf: Any, mgmt: Any, stubs: SimpleNamespace
) -> None:
    request = stubs.inference_pb2.PredictionsRequest(model_name="allowed")
    wrong = (("authorization", "Bearer nope"),)
    management_key = bearer(server, "management")
    calls: list[Callable[[Any], Any]] = [
        lambda md: inf.Ping(empty_pb2.Empty(), metadata=md, timeout=TIMEOUT),
        lambda md: inf.Predictions(request, metadata=md, timeout=TIMEOUT),
        lambda md: list(inf.StreamPredictions(request, metadata=md, timeout=TIMEOUT)),
        lambda md: list(inf.StreamPredictions2(iter([request]), metadata=md, timeout=TIMEOUT)),
    ]
    for rpc in calls:
        for metadata in (None, wrong, management_key):
            assert status_of(rpc, metadata) == (S.PERMISSION_DENIED, TOKEN_FAILED)
    listing = stubs.management_pb2.ListModelsRequest()
    for metadata in (None, wrong, bearer(server, "inference")):
        assert status_of(mgmt.ListModels, listing, metadata=metadata, timeout=TIMEOUT) == (
            S.PERMISSION_DENIED,
            TOKEN_FAILED,
        )
    # Refusals are in the access log like any other call (written in bulk within 0.5 s).
    ping = "/org.pytorch.serve.grpc.inference.InferenceAPIsService/Ping"
    deadline = time.monotonic() + 5
    access = ""
    while f'"gRPC {ping}" PERMISSION_DENIED' not in access and time.monotonic() < deadline:
        time.sleep(0.1)
        access = (server.log_dir / "access_log.log").read_text()
    assert f'"gRPC {ping}" PERMISSION_DENIED' in access


def test_the_right_key_is_accepted(
    server: ServerProcess, inf: Any, mgmt: Any, stubs: SimpleNamespace
) -> None:
    ping = inf.Ping(empty_pb2.Empty(), metadata=bearer(server, "inference"), timeout=TIMEOUT)
    assert json.loads(ping.health) == {"status": "Healthy"}
    key = bearer(server, "management")
    listing = mgmt.ListModels(stubs.management_pb2.ListModelsRequest(), metadata=key)
    assert json.loads(listing.msg) == {"models": []}


def test_model_api_disabled_refuses_register_and_unregister_only(
    server: ServerProcess, mgmt: Any, stubs: SimpleNamespace
) -> None:
    pb2, key = stubs.management_pb2, bearer(server, "management")
    register = pb2.RegisterModelRequest(url="anything.mar")
    unregister = pb2.UnregisterModelRequest(model_name="anything")
    for rpc, message in ((mgmt.RegisterModel, register), (mgmt.UnregisterModel, unregister)):
        assert status_of(rpc, message, metadata=key, timeout=TIMEOUT) == (
            S.PERMISSION_DENIED,
            "Model API disabled",
        )
    scale = pb2.ScaleWorkerRequest(model_name="anything")
    assert status_of(lambda: mgmt.ScaleWorker(scale, metadata=key, timeout=TIMEOUT)) == (
        S.NOT_FOUND,
        "Model not found: anything",
    )


def test_models_are_authorized_one_by_one(
    server: ServerProcess, inf: Any, stubs: SimpleNamespace
) -> None:
    key = bearer(server, "inference")
    pb2 = stubs.inference_pb2
    allowed = pb2.PredictionsRequest(model_name="allowed")
    secret = pb2.PredictionsRequest(model_name="secret")
    # The policy lets the inference identity call "allowed" only; REST refuses the same way.
    rest = server.request(
        "POST", "inference", "/predictions/secret", headers={"Authorization": key[0][1]}
    )
    assert rest.status == 403
    refusal = (S.PERMISSION_DENIED, rest.json()["message"])
    assert status_of(lambda: inf.Predictions(secret, metadata=key, timeout=TIMEOUT)) == refusal
    assert status_of(lambda: inf.Predictions(allowed, metadata=key, timeout=TIMEOUT)) == (
        S.INTERNAL,
        "Model not found: allowed",
    )
    stream = inf.StreamPredictions2(iter([allowed, secret]), metadata=key, timeout=TIMEOUT)
    first = next(stream)
    assert first.status.message == "Model not found: allowed"
    assert status_of(lambda: next(stream)) == refusal


def test_requests_over_max_request_size_are_refused(
    server: ServerProcess, inf: Any, stubs: SimpleNamespace
) -> None:
    big = stubs.inference_pb2.PredictionsRequest(
        model_name="allowed", input={"data": b"\x00" * 1_500_000}
    )
    code, _ = status_of(
        lambda: inf.Predictions(big, metadata=bearer(server, "inference"), timeout=TIMEOUT)
    )
    assert code == S.RESOURCE_EXHAUSTED


def test_third_party_services_get_the_same_security(
    server: ServerProcess, channels: dict[str, Any]
) -> None:
    channel, key = channels["inference"], bearer(server, "inference")
    public = channel.unary_unary("/flambeau.test.Echo/Public")
    closed = channel.unary_unary("/flambeau.test.Echo/Closed")
    nobody = channel.unary_unary("/flambeau.test.Nobody/Call")
    unknown = channel.unary_unary("/flambeau.test.Echo/Missing")
    assert public(b"hi", timeout=TIMEOUT) == b"echo:hi"
    assert status_of(lambda: closed(b"hi", timeout=TIMEOUT)) == (S.PERMISSION_DENIED, TOKEN_FAILED)
    assert closed(b"hi", metadata=key, timeout=TIMEOUT) == b"echo:hi"
    code, message = status_of(lambda: nobody(b"hi", metadata=key, timeout=TIMEOUT))
    assert (code, message) == (S.PERMISSION_DENIED, "Forbidden: this identity may not use this API")
    assert status_of(lambda: unknown(b"hi", metadata=key, timeout=TIMEOUT))[0] == S.UNIMPLEMENTED
