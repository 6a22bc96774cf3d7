"""Token authentication and the role authorizer in process, and source-tree checks that keep
the defaults safe (no unsafe YAML loading, loopback listeners, no remote model URLs)."""

from __future__ import annotations

import ast
import json
import os
import re
import stat
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from flambeau.api import ConfigError, ForbiddenError, Identity, InvalidKeyError
from flambeau.core.config import DEFAULTS, Config
from flambeau.plugins.builtin.security import (
    TOKEN_FAILED,
    RoleAuthorizer,
    TokenAuthenticator,
    TokenStore,
    bearer_token,
    load_policy,
    new_key,
    static_keys,
)

SRC = Path(__file__).resolve().parents[2] / "src"
_KEY = re.compile(r"^[A-Za-z0-9_-]{8}$")


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_generated_keys_are_torchserve_keys() -> None:
    keys = {new_key() for _ in range(50)}
    assert len(keys) == 50
    assert all(_KEY.match(k) for k in keys)


@pytest.mark.parametrize(
    ("headers", "key"),
    [
        ({"Authorization": "Bearer abcdefgh"}, "abcdefgh"),
        ({"authorization": "Bearer  abcdefgh"}, "abcdefgh"),  # gRPC metadata: lower case
        ({"AUTHORIZATION": "Bearer abcdefgh"}, "abcdefgh"),
        ({"Authorization": "bearer abcdefgh"}, None),  # TorchServe's regex is case-sensitive
        ({"Authorization": "Basic abcdefgh"}, None),
        ({"Authorization": "Bearer a b"}, None),
        ({"Authorization": "Bearer"}, None),
        ({}, None),
    ],
)
def test_bearer_token(headers: dict[str, str], key: str | None) -> None:
    assert bearer_token(headers) == key


def test_key_file_is_private_and_in_torchserve_format(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "key_file.json"
    path.write_text("{}")
    path.chmod(0o644)  # a stale, readable file is replaced, not reused
    store = TokenStore(path, 60, clock=clock)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    data = json.loads(path.read_text())
    assert list(data) == ["management", "inference", "API"]
    assert data["inference"] == {
        "key": store.keys["inference"],
        "expiration time": "1970-01-12T14:46:40.000000Z",  # 1_000_000 s + 60 min
    }
    assert list(data["API"]) == ["key"]
    assert all(_KEY.match(store.keys[k]) for k in ("inference", "management", "API"))
    assert not list(tmp_path.glob(".*tmp"))


def test_keys_expire_and_rotate(tmp_path: Path) -> None:
    clock = Clock()
    store = TokenStore(tmp_path / "key_file.json", 1.5, clock=clock)
    inference, api = store.keys["inference"], store.keys["API"]
    assert store.check("inference", inference)
    assert not store.check("inference", store.keys["management"])
    assert not store.check("management", inference)
    clock.now += 89
    assert store.check("inference", inference)
    clock.now += 2
    assert not store.check("inference", inference)
    assert store.check("API", api)  # the API key never expires
    store.rotate("inference")
    rotated = store.keys["inference"]
    assert rotated != inference
    assert store.check("inference", rotated)
    assert json.loads((tmp_path / "key_file.json").read_text())["inference"]["key"] == rotated
    with pytest.raises(InvalidKeyError, match="Token Authorization failed"):
        store.rotate("API")


def test_static_keys_never_expire_and_stay_off_disk(tmp_path: Path) -> None:
    clock = Clock()
    static = {"inference": "static-inference-key", "team-a": "team-a-secret-key"}
    store = TokenStore(tmp_path / "key_file.json", 0.001, static, clock=clock)
    clock.now += 10_000
    assert store.check("inference", "static-inference-key")
    assert not store.check("management", store.keys["management"])
    assert store.named_identity("team-a-secret-key") == "team-a"
    assert store.named_identity("static-inference-key") is None
    text = (tmp_path / "key_file.json").read_text()
    assert "static-inference-key" not in text
    assert "team-a-secret-key" not in text
    assert json.loads(text)["inference"] == {"expiration time": "never", "source": "configuration"}
    with pytest.raises(InvalidKeyError, match="fixed by configuration"):
        store.rotate("inference")


def test_static_key_sources_and_their_precedence(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text("inference: from-file-key-1\nteam-a: team-a-key-12\n")
    config = Config.load(
        cli={"token_keys_file": str(keys_file), "token_management_key": "config-mgmt-key"},
        environ={},
    )
    env = {"FLAMBEAU_INFERENCE_KEY": "env-inference-key", "FLAMBEAU_MANAGEMENT_KEY": "env-mgmt-k"}
    assert static_keys(config, env) == {
        "inference": "env-inference-key",
        "team-a": "team-a-key-12",
        "management": "config-mgmt-key",
    }
    with pytest.raises(ConfigError, match="at least 8 characters"):
        static_keys(Config.load(cli={"token_inference_key": "short"}, environ={}), {})
    shared = Config.load(cli={"token_inference_key": "same-key-123"}, environ={})
    with pytest.raises(ConfigError, match="share one key"):
        static_keys(shared, {"FLAMBEAU_MANAGEMENT_KEY": "same-key-123"})
    keys_file.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must map identity names"):
        static_keys(Config.load(cli={"token_keys_file": str(keys_file)}, environ={}), {})


def _authenticator(tmp_path: Path, **config: str) -> TokenAuthenticator:
    values = {"key_file": str(tmp_path / "key_file.json"), **config}
    server = SimpleNamespace(config=Config.load(cli=values, environ={}))
    return TokenAuthenticator(server, environ={})


def test_authenticator_maps_keys_to_identities(tmp_path: Path) -> None:
    authn = _authenticator(tmp_path, token_api_key="static-api-key")
    assert authn.store is not None
    keys = authn.store.keys

    def who(listener: str, key: str | None, path: str = "/models") -> Identity | None:
        headers = {"authorization": f"Bearer {key}"} if key else {}
        return authn.authenticate(listener, headers, path)

    assert who("inference", keys["inference"]) == Identity("inference", frozenset({"inference"}))
    assert who("management", keys["management"]) == Identity(
        "management", frozenset({"management"})
    )
    assert who("management", keys["inference"]) is None
    assert who("inference", keys["management"]) is None
    assert who("inference", None) is None
    # gRPC: the same listener names, lower-case metadata, an rpc path.
    rpc = "/org.pytorch.serve.grpc.inference.InferenceAPIsService/Predictions"
    assert who("inference", keys["inference"], rpc) == Identity(
        "inference", frozenset({"inference"})
    )
    # The API key only rotates keys, on /token.
    assert who("management", "static-api-key", "/token") == Identity("API", frozenset({"token"}))
    assert who("management", "static-api-key") is None
    assert who("management", keys["management"], "/token") is None
    # No token on the metrics API, whatever is sent.
    assert who("metrics", None) == Identity("anonymous", frozenset({"metrics"}))
    assert who("metrics", "wrong-key") == Identity("anonymous", frozenset({"metrics"}))
    assert isinstance(authn.refusal(None, "inference"), InvalidKeyError)
    assert authn.refusal(None, "inference").message == TOKEN_FAILED
    assert isinstance(authn.refusal(Identity("team"), "inference"), ForbiddenError)


def test_disabled_authentication_writes_no_key_file(tmp_path: Path) -> None:
    authn = _authenticator(tmp_path, disable_token_authorization="true")
    assert authn.store is None
    assert not (tmp_path / "key_file.json").exists()
    assert authn.authenticate("management", {}, "/models") == Identity(
        "anonymous", frozenset({"*"})
    )


def _authorizer(policy: str) -> RoleAuthorizer:
    return RoleAuthorizer(SimpleNamespace(config=Config.load(cli={"authz_policy": policy})))


def test_role_authorizer_default_follows_the_key_roles() -> None:
    authz = _authorizer("")
    inference = Identity("inference", frozenset({"inference"}))
    assert authz.authorize(inference, "inference", "any-model")
    assert not authz.authorize(inference, "management", None)
    assert not authz.authorize(inference, "metrics", None)
    assert not authz.authorize(None, "inference", None)
    assert authz.authorize(Identity("anonymous", frozenset({"*"})), "management", "m")
    assert not authz.authorize(Identity("team-a"), "inference", "m")


def test_role_authorizer_policy_limits_models(tmp_path: Path) -> None:
    policy = {
        "team-a": {"permissions": ["inference"], "models": ["demo", "resnet-*"]},
        "ops": ["management", "metrics"],
        "inference": {"permissions": ["inference"], "models": ["demo"]},
    }
    authz = _authorizer(json.dumps(policy))
    team = Identity("team-a")
    assert authz.authorize(team, "inference", "demo")
    assert authz.authorize(team, "inference", "resnet-50")
    assert not authz.authorize(team, "inference", "bert")
    assert authz.authorize(team, "inference", None)
    assert not authz.authorize(team, "management", "demo")
    assert authz.authorize(Identity("ops"), "management", "bert")
    # A policy entry for a key's identity replaces the roles the key gave.
    inference = Identity("inference", frozenset({"inference"}))
    assert not authz.authorize(inference, "inference", "bert")
    yaml_policy = tmp_path / "policy.yaml"
    yaml_policy.write_text("team-b:\n  permissions: [inference]\n  models: [demo]\n")
    assert load_policy(str(yaml_policy))["team-b"].models == ("demo",)


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"a": {"permissions": "inference"}}', "list of strings"),
        ('{"a": {"roles": ["inference"]}}', "expected a list of permissions"),
        ("[1]", "expected a mapping"),
        ("/no/such/policy.json", "cannot read"),
    ],
)
def test_bad_policies_stop_the_start(policy: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_policy(policy)


def test_listeners_default_to_loopback_and_remote_urls_are_off() -> None:
    for key in ("inference_address", "management_address", "metrics_address"):
        assert Config.load(cli={}, environ={}).address(key).host == "127.0.0.1"
    assert DEFAULTS["grpc_inference_address"] == "127.0.0.1"
    assert DEFAULTS["grpc_management_address"] == "127.0.0.1"
    assert DEFAULTS["allowed_urls"] == ""
    assert DEFAULTS["enable_model_api"] == "false"
    assert DEFAULTS["disable_token_authorization"] == "false"


_UNSAFE_YAML_CALLS = {"unsafe_load", "unsafe_load_all", "full_load", "full_load_all"}
_UNSAFE_LOADERS = {"Loader", "UnsafeLoader", "FullLoader"}
_SAFE_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}


def _unsafe_yaml_uses(tree: ast.AST) -> list[int]:
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in _UNSAFE_YAML_CALLS | _UNSAFE_LOADERS:
            lines.append(node.lineno)
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        if node.func.attr not in {"load", "load_all"}:
            continue
        owner = node.func.value
        if not (isinstance(owner, ast.Name) and owner.id == "yaml"):
            continue
        loader: Any = next((k.value for k in node.keywords if k.arg == "Loader"), None)
        if loader is None and len(node.args) > 1:
            loader = node.args[1]
        name = getattr(loader, "attr", getattr(loader, "id", None))
        if name not in _SAFE_LOADERS:
            lines.append(node.lineno)
    return lines


def test_unsafe_yaml_check_catches_the_unsafe_forms() -> None:
    unsafe = (
        "import yaml\n"
        "yaml.load(s)\n"
        "yaml.load(s, Loader=yaml.Loader)\n"
        "yaml.load(s, yaml.FullLoader)\n"
        "yaml.unsafe_load(s)\n"
        "yaml.full_load(s)\n"
        "yaml.load_all(s)\n"
    )
    assert sorted(_unsafe_yaml_uses(ast.parse(unsafe))) == [2, 3, 3, 4, 4, 5, 6, 7]
    safe = "import yaml\nyaml.safe_load(s)\nyaml.load(s, Loader=yaml.SafeLoader)\n"
    assert _unsafe_yaml_uses(ast.parse(safe)) == []


def test_no_unsafe_yaml_loading_in_src() -> None:
    found = {}
    for path in SRC.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        if "yaml" not in text:
            continue
        if lines := _unsafe_yaml_uses(ast.parse(text, str(path))):
            found[str(path.relative_to(SRC))] = lines
        # Text-level backstop for forms the AST check cannot see (e.g. an aliased module).
        if "unsafe_load" in text or re.search(
            r"Loader\s*=\s*(yaml\.)?(Unsafe|Full)?Loader\b", text
        ):
            found.setdefault(str(path.relative_to(SRC)), []).append(-1)
    assert found == {}, f"unsafe YAML loading (SnakeYAML-style RCE risk): {found}"


def test_key_file_permissions_survive_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        TokenStore(tmp_path / "key_file.json", 60)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "key_file.json").stat().st_mode) == 0o600
