"""Security defaults over real HTTP against real server processes: token authentication and
rotation, the route walk (every non-public route refuses a caller without the right key), the
role authorizer, model API control, the URL allow-list, body limits, TLS and CORS."""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import json
import os
import re
import socket
import ssl
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import tornado.web

from flambeau.core.config import Config
from flambeau.core.plugins import PluginOptions, load_plugins
from flambeau.plugins.builtin.security import TOKEN_FAILED
from flambeau.testing.fixtures import Response, ServerProcess, http_request
from flambeau.web import Endpoint

METRICS_PLUGIN = "flambeau.plugins.builtin.metrics.plugin"
CORS_PLUGIN = "flambeau.plugins.builtin.cors"
WORKERS_PLUGIN = "flambeau.plugins.builtin.workers.plugin"
CLOSED_PLUGIN = "closed_route_plugin"
TEAM_KEY = "team-a-static-key"

# A third-party route that forgets to declare a permission: it must stay closed to everybody.
CLOSED_PLUGIN_SOURCE = """
from flambeau.api import RouteSpec, hookimpl
from flambeau.web import ApiHandler


class Undeclared(ApiHandler):
    async def get(self):
        self.send_json({"reached": True})


@hookimpl
def flambeau_routes(config):
    return [RouteSpec(r"/undeclared", Undeclared, listener="inference")]
"""
ECHO_HANDLER = """
def handle(data, context):
    if data is None:
        return None
    return [row.get("body") or row.get("data") or b"" for row in data]
"""
INVALID_KEY = {"code": 400, "type": "InvalidKeyException", "message": TOKEN_FAILED}
MODEL_API_OFF = {
    "code": 405,
    "type": "MethodNotAllowedException",
    "message": "Requested method is not allowed, please refer to API document.",
}


def _extra_plugins(*modules: str) -> tuple[str, ...]:
    """The modules not already registered as entry points (``-p`` would register them twice)."""
    registered = set(load_plugins().module_paths())
    return tuple(module for module in modules if module not in registered)


def _plugin_args(*modules: str) -> list[str]:
    return [flag for module in _extra_plugins(*modules) for flag in ("-p", module)]


PLUGINS = (METRICS_PLUGIN, CORS_PLUGIN, CLOSED_PLUGIN)


def _separate_listeners() -> dict[str, str]:
    """Three free loopback ports: each listener gets an application of its own."""
    sockets = [socket.socket() for _ in range(3)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    names = ("inference", "management", "metrics")
    return {f"{n}_address": f"http://127.0.0.1:{p}" for n, p in zip(names, ports, strict=True)}


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("plugins")
    (directory / f"{CLOSED_PLUGIN}.py").write_text(CLOSED_PLUGIN_SOURCE)
    return directory


def _env(plugin_dir: Path) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(plugin_dir), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path}


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory, plugin_dir: Path) -> Iterator[ServerProcess]:
    """Defaults: token authorization on, model API off; one extra identity from a key file."""
    workdir = tmp_path_factory.mktemp("secured")
    store = workdir / "store"
    store.mkdir()
    keys_file = workdir / "keys.json"
    keys_file.write_text(json.dumps({"team-a": TEAM_KEY}))
    policy = {"team-a": {"permissions": ["inference"], "models": ["demo"]}}
    config = {
        **_separate_listeners(),
        "token_keys_file": str(keys_file),
        "authz_policy": json.dumps(policy),
        "max_request_size": "1000",
    }
    args = _plugin_args(*PLUGINS)
    server = ServerProcess(
        workdir, model_store=store, config=config, args=args, env=_env(plugin_dir)
    )
    yield server
    server.stop()


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _key(server: ServerProcess, kind: str) -> str:
    return str(server.keys[kind]["key"])


def test_key_file_is_private_and_keys_work(secured: ServerProcess) -> None:
    path = secured.workdir / "key_file.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    keys = secured.keys
    assert list(keys) == ["management", "inference", "API"]
    expiry = datetime.datetime.fromisoformat(keys["inference"]["expiration time"][:-1] + "+00:00")
    remaining = expiry - datetime.datetime.now(datetime.UTC)
    assert datetime.timedelta(minutes=58) < remaining <= datetime.timedelta(minutes=60)
    assert TEAM_KEY not in path.read_text()
    ping = secured.request("GET", "inference", "/ping", headers=_bearer(_key(secured, "inference")))
    assert ping.status == 200
    models = secured.request(
        "GET", "management", "/models", headers=_bearer(_key(secured, "management"))
    )
    assert models.status == 200


@pytest.mark.parametrize(
    "authorization",
    ["", "Bearer", "Bearer wrongkey", "bearer {key}", "Basic {key}", "Bearer {key} extra"],
)
def test_malformed_or_wrong_tokens_are_invalid_keys(
    secured: ServerProcess, authorization: str
) -> None:
    headers = {"Authorization": authorization.format(key=_key(secured, "inference"))}
    refused = secured.request("GET", "inference", "/ping", headers=headers)
    assert refused.status == 400
    assert refused.json() == INVALID_KEY


# ------------------------------------------------------------------------------- route walk


try:  # the regex parser behind ``re``; used to build one path each route pattern matches
    from re import _parser as sre_parse  # type: ignore[attr-defined]
except ImportError:  # Python 3.10
    import sre_parse  # type: ignore[no-redef]

SAMPLE_VALUES = {"model_name": "demo", "version": "1.0", "workflow_name": "wf"}


def _example(parsed: Any, group_names: dict[int, str]) -> str:
    out = []
    for op, arg in parsed:
        name = str(op)
        if name == "LITERAL":
            out.append(chr(arg))
        elif name == "SUBPATTERN":
            group, _, _, sub = arg
            value = SAMPLE_VALUES.get(group_names.get(group, ""))
            out.append(value if value is not None else _example(sub, group_names))
        elif name in {"MAX_REPEAT", "MIN_REPEAT"}:
            low, _, sub = arg
            out.append(_example(sub, group_names) * low)  # optional parts are left out
        elif name in {"IN", "NOT_LITERAL", "ANY"}:
            out.append("x")
        elif name == "BRANCH":
            out.append(_example(arg[1][0], group_names))
    return "".join(out)


def example_path(pattern: str) -> str:
    parsed = sre_parse.parse(pattern)
    state = getattr(parsed, "state", None) or parsed.pattern
    names = {index: name for name, index in state.groupdict.items()}
    return _example(parsed, names)


def _methods(handler: type[Any]) -> list[str]:
    """The HTTP methods a handler class implements itself."""
    if issubclass(handler, Endpoint):
        return sorted(handler.METHODS)
    base = tornado.web.RequestHandler
    return [
        method
        for method in ("GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")
        if method in handler.SUPPORTED_METHODS
        and getattr(handler, method.lower()) is not getattr(base, method.lower())
    ]


def _routes(plugin_dir: Path, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    monkeypatch.syspath_prepend(str(plugin_dir))
    options = PluginOptions(extra_modules=_extra_plugins(*PLUGINS))
    routes = load_plugins(options).hooks.routes(Config.load(cli={}, environ={}))
    assert {r.listener for r in routes} == {"inference", "management", "metrics"}
    return routes


def test_every_non_public_route_refuses_missing_and_wrong_keys(
    secured: ServerProcess, plugin_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other_key = {
        "inference": _key(secured, "management"),
        "management": _key(secured, "inference"),
    }
    checked = 0
    for route in _routes(plugin_dir, monkeypatch):
        if route.public:
            continue
        path = example_path(route.pattern)
        assert re.fullmatch(route.pattern, path), (route.pattern, path)
        for method in _methods(route.handler):
            where = f"{method} {path} ({route.listener})"
            anonymous = secured.request(method, route.listener, path)
            if route.listener == "metrics":
                # TorchServe applies no token to its metrics API; everything else is closed.
                assert route.permission == "metrics", where
                assert anonymous.status == 200, where
                continue
            assert anonymous.status == 400, where
            assert refusal_of(anonymous.json()) == INVALID_KEY["message"], where
            wrong = secured.request(
                method, route.listener, path, headers=_bearer(other_key[route.listener])
            )
            assert wrong.status == 400, where
            assert refusal_of(wrong.json()) == INVALID_KEY["message"], where
            if route.permission != "inference":
                # A valid identity without the permission: 403 from the authorizer.
                team = secured.request(method, route.listener, path, headers=_bearer(TEAM_KEY))
                assert team.status == 403, where
                assert team.json()["type"] == "ForbiddenException", where
            checked += 1
    assert checked >= 10


def refusal_of(body: dict[str, object]) -> object:
    """The refusal's message: TorchServe's error JSON, or a protocol's own error shape (KServe
    v2 routes answer ``{"error": ...}``); anything else is a failure."""
    if set(body) == {"error"}:
        return body["error"]
    assert body == INVALID_KEY
    return body["message"]


def test_a_route_without_permission_is_refused_to_everybody(secured: ServerProcess) -> None:
    assert secured.request("GET", "inference", "/undeclared").status == 400
    with_key = secured.request(
        "GET", "inference", "/undeclared", headers=_bearer(_key(secured, "inference"))
    )
    assert with_key.status == 403
    assert b"reached" not in with_key.body


def test_policy_limits_an_identity_to_its_models(secured: ServerProcess) -> None:
    team = _bearer(TEAM_KEY)
    other = secured.request("POST", "inference", "/predictions/bert", headers=team)
    assert other.status == 403
    assert other.json() == {
        "code": 403,
        "type": "ForbiddenException",
        "message": "Identity team-a is not allowed to use this API",
    }
    # Allowed through; there is simply no such model here.
    allowed = secured.request("POST", "inference", "/predictions/demo", headers=team)
    assert allowed.status == 404
    assert allowed.json()["type"] == "ModelNotFoundException"
    assert secured.request("GET", "inference", "/ping", headers=team).status == 200


def test_metrics_api_needs_no_token(secured: ServerProcess) -> None:
    scrape = secured.request("GET", "metrics", "/metrics", headers=_bearer("not-a-key"))
    assert scrape.status == 200
    assert secured.request("OPTIONS", "metrics", "/").json()["paths"].keys() == {"/metrics"}


def test_model_api_is_off_by_default(secured: ServerProcess) -> None:
    headers = _bearer(_key(secured, "management"))
    register = secured.request("POST", "management", "/models?url=demo.mar", headers=headers)
    assert register.status == 405
    assert register.json() == MODEL_API_OFF
    unregister = secured.request("DELETE", "management", "/models/demo", headers=headers)
    assert unregister.status == 405
    assert unregister.json() == MODEL_API_OFF


def test_request_body_limit(secured: ServerProcess) -> None:
    headers = {**_bearer(_key(secured, "inference")), "Content-Type": "application/octet-stream"}
    too_big = secured.request(
        "POST", "inference", "/predictions/demo", body=b"x" * 1001, headers=headers
    )
    assert too_big.status == 413
    assert too_big.body == b""
    assert too_big.header("Connection") == "close"


def test_request_body_limit_without_content_length(secured: ServerProcess) -> None:
    headers = {**_bearer(_key(secured, "inference")), "Content-Type": "application/octet-stream"}
    port = int(secured.url("inference").rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(
            "POST",
            "/predictions/demo",
            body=iter([b"x" * 600, b"y" * 600]),
            headers=headers,
            encode_chunked=True,
        )
        assert conn.getresponse().status == 413
    finally:
        conn.close()


def test_token_rotation(secured: ServerProcess) -> None:
    api = _bearer(_key(secured, "API"))
    old_inference, management = _key(secured, "inference"), _key(secured, "management")
    rotated = secured.request("GET", "management", "/token?type=inference", headers=api)
    assert rotated.status == 200
    assert rotated.body == b"\n"
    new_inference = _key(secured, "inference")
    assert new_inference != old_inference
    assert _key(secured, "management") == management
    assert stat.S_IMODE((secured.workdir / "key_file.json").stat().st_mode) == 0o600
    assert (
        secured.request("GET", "inference", "/ping", headers=_bearer(old_inference)).status == 400
    )
    assert (
        secured.request("GET", "inference", "/ping", headers=_bearer(new_inference)).status == 200
    )
    for path, headers in [
        ("/token?type=API", api),
        ("/token?type=nonsense", api),
        ("/token?type=inference", _bearer(management)),
        ("/token?type=inference", {}),
    ]:
        refused = secured.request("GET", "management", path, headers=headers)
        assert refused.status == 400, path
        assert refused.json() == INVALID_KEY, path


# ------------------------------------------------------------------- open server, model API on


def _build_echo(store: Path) -> None:
    from flambeau.archiver.cli import archive_main

    handler = store.parent / "echo_handler.py"
    handler.write_text(ECHO_HANDLER)
    argv = ["--model-name", "echo", "--version", "1.0", "--handler", str(handler)]
    assert archive_main([*argv, "--export-path", str(store), "--force"]) == 0


@pytest.fixture(scope="module")
def open_api(tmp_path_factory: pytest.TempPathFactory, plugin_dir: Path) -> Iterator[ServerProcess]:
    """Token authorization off, model API on, CORS configured, small body limits."""
    workdir = tmp_path_factory.mktemp("open")
    store = workdir / "store"
    store.mkdir()
    _build_echo(store)
    config = {
        "cors_allowed_origin": "https://app.example",
        "cors_allowed_methods": "GET, POST",
        "cors_allowed_headers": "Authorization, Content-Type",
        "max_request_size": "4096",
        "max_response_size": "64",
        "default_workers_per_model": "1",
    }
    args = [*_plugin_args(*PLUGINS, WORKERS_PLUGIN), "--disable-token-auth", "--enable-model-api"]
    args += ["--models", "echo=echo.mar"]
    server = ServerProcess(
        workdir, model_store=store, config=config, args=args, env=_env(plugin_dir)
    )
    yield server
    server.stop()


def test_disabled_token_auth_writes_no_key_file(open_api: ServerProcess) -> None:
    assert not (open_api.workdir / "key_file.json").exists()
    assert open_api.request("GET", "management", "/models").status == 200
    # Closed routes stay closed even then.
    assert open_api.request("GET", "inference", "/undeclared").status == 403


NOT_ALLOWED = "Given URL {} does not match any allowed URL(s)"
RELATIVE = "Relative path is not allowed in url: {}"
NOT_FOUND = "Model not found at: {}"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://127.0.0.1:1/m.mar", NOT_ALLOWED),
        ("https://example.com/m.mar", NOT_ALLOWED),
        ("file:///etc/passwd", NOT_ALLOWED),
        ("../echo.mar", RELATIVE),
        ("store/../echo.mar", RELATIVE),
        ("..\\echo.mar", RELATIVE),
        ("sub/echo.mar", NOT_FOUND),
        ("sub\\echo.mar", NOT_FOUND),
        ("/etc/passwd", NOT_FOUND),
    ],
)
def test_registration_only_from_the_model_store(
    open_api: ServerProcess, url: str, message: str
) -> None:
    refused = open_api.request("POST", "management", f"/models?url={quote(url, safe='')}")
    assert refused.status == 404
    assert refused.json()["message"] == message.format(url)


def test_response_size_limit(open_api: ServerProcess) -> None:
    small = open_api.request("POST", "inference", "/predictions/echo", body=b"x" * 64)
    assert small.status == 200
    assert small.body == b"x" * 64
    big = open_api.request("POST", "inference", "/predictions/echo", body=b"x" * 65)
    assert big.status == 500
    assert b"exceeds max_response_size (64 bytes)" in big.body
    # The worker survived: the next request is served.
    assert open_api.request("POST", "inference", "/predictions/echo", body=b"ok").body == b"ok"


def _cors(response: Response) -> dict[str, str | None]:
    return {
        name: response.header(f"Access-Control-Allow-{name}")
        for name in ("Origin", "Methods", "Headers")
    }


def test_cors_headers_on_every_response(open_api: ServerProcess, secured: ServerProcess) -> None:
    expected = {
        "Origin": "https://app.example",
        "Methods": "GET, POST",
        "Headers": "Authorization, Content-Type",
    }
    responses = [
        open_api.request("GET", "inference", "/ping"),
        open_api.request("GET", "inference", "/no/such/path"),
        open_api.request("OPTIONS", "inference", "/predictions/echo"),
        open_api.request("GET", "metrics", "/metrics"),
        open_api.request("POST", "inference", "/predictions/echo", body=b"x" * 5000),
    ]
    assert [r.status for r in responses] == [200, 404, 200, 200, 413]
    assert all(_cors(r) == expected for r in responses)
    unconfigured = secured.request("GET", "inference", "/ping")
    assert _cors(unconfigured) == {"Origin": None, "Methods": None, "Headers": None}


# ----------------------------------------------------------------- expiring and static keys


@pytest.fixture(scope="module")
def expiring(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Keys that expire at once, except an inference key fixed by the environment."""
    workdir = tmp_path_factory.mktemp("expiring")
    store = workdir / "store"
    store.mkdir()
    env = {"FLAMBEAU_INFERENCE_KEY": "k8s-inference-key"}
    server = ServerProcess(
        workdir, model_store=store, config={"token_expiration_min": "0.0001"}, env=env
    )
    yield server
    server.stop()


def test_expired_keys_are_refused_but_static_keys_never_expire(expiring: ServerProcess) -> None:
    static = expiring.request("GET", "inference", "/ping", headers=_bearer("k8s-inference-key"))
    assert static.status == 200
    keys = expiring.keys
    assert keys["inference"] == {"expiration time": "never", "source": "configuration"}
    expired = expiring.request(
        "GET", "management", "/models", headers=_bearer(keys["management"]["key"])
    )
    assert expired.status == 400
    assert expired.json() == INVALID_KEY
    api = _bearer(keys["API"]["key"])
    # The API key never expires: it still rotates the management key.
    rotate = expiring.request("GET", "management", "/token?type=management", headers=api)
    assert rotate.status == 200
    assert expiring.keys["management"]["key"] != keys["management"]["key"]
    fixed = expiring.request("GET", "management", "/token?type=inference", headers=api)
    assert fixed.status == 400
    assert (
        fixed.json()["message"] == "The inference key is fixed by configuration and cannot rotate"
    )


# ----------------------------------------------------------------------------------- TLS


def _self_signed(directory: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


def test_tls_from_certificate_and_key_files(tmp_path: Path) -> None:
    cert_file, key_file = _self_signed(tmp_path)
    store = tmp_path / "store"
    store.mkdir()
    config = {
        "inference_address": "https://127.0.0.1:0",
        "certificate_file": str(cert_file),
        "private_key_file": str(key_file),
    }
    server = ServerProcess(tmp_path, model_store=store, config=config, args=["--dt"])
    try:
        address = server.url("inference")
        assert address.startswith("https://127.0.0.1:")
        port = int(address.rsplit(":", 1)[1])
        trusted = ssl.create_default_context(cafile=str(cert_file))
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=trusted, timeout=30)
        try:
            conn.request("GET", "/ping")
            response = conn.getresponse()
            assert response.status == 200
            assert json.loads(response.read()) == {"status": "Healthy"}
        finally:
            conn.close()
        untrusted = http.client.HTTPSConnection(
            "127.0.0.1", port, context=ssl.create_default_context(), timeout=30
        )
        with pytest.raises(ssl.SSLCertVerificationError):
            untrusted.request("GET", "/ping")
        untrusted.close()
        with pytest.raises((ConnectionError, http.client.HTTPException)):
            http_request(f"http://127.0.0.1:{port}", "GET", "/ping", timeout=30)
    finally:
        server.stop()


def test_https_without_certificate_is_a_start_error(tmp_path: Path) -> None:
    (tmp_path / "config.properties").write_text(
        "inference_address=https://127.0.0.1:0\n"
        "management_address=http://127.0.0.1:0\n"
        "metrics_address=http://127.0.0.1:0\n"
    )
    env = {
        **os.environ,
        "FLAMBEAU_PID_FILE": str(tmp_path / "pid"),
        "LOG_LOCATION": str(tmp_path / "logs"),
    }
    result = subprocess.run(
        [sys.executable, "-m", "flambeau.core.cli", "start", "--foreground", "--model-store", "."],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "certificate_file" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
