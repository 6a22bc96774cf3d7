"""Token authentication (TorchServe 0.12's, on by default) and the role authorizer.

At start-up ``key_file.json`` (mode 0600) is written with an inference key, a management key
(both expire after ``token_expiration_min``) and an API key that never expires and rotates the
other two through ``GET /token?type=...``. Requests carry ``Authorization: Bearer <key>``; a wrong
or missing key is TorchServe's 400 ``InvalidKeyException``. Keys fixed by configuration (config,
env or a mounted secret file, for Kubernetes) never expire and are not copied to the key file.
The authorizer maps identities to permissions, optionally per model (``authz_policy``).
"""

from __future__ import annotations

import base64
import fnmatch
import hmac
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flambeau.api import (
    AuthenticatorSpec,
    AuthorizerSpec,
    ConfigError,
    FlambeauError,
    ForbiddenError,
    Identity,
    InvalidKeyError,
    RouteSpec,
    hookimpl,
)
from flambeau.web import ApiHandler

log = logging.getLogger("flambeau.security")

TOKEN_FAILED = (
    "Token Authorization failed. Token either incorrect, expired, or not provided correctly"
)
_BEARER = re.compile(r"^Bearer\s+(\S+)$")
ROTATABLE = ("inference", "management")
API = "API"  # the key-file entry name of the key that rotates the others
MIN_STATIC_KEY_LENGTH = 8  # TorchServe's generated keys are 8 characters
ENV_KEYS = {
    "inference": "FLAMBEAU_INFERENCE_KEY",
    "management": "FLAMBEAU_MANAGEMENT_KEY",
    API: "FLAMBEAU_API_KEY",
}
CONFIG_KEYS = {
    "inference": "token_inference_key",
    "management": "token_management_key",
    API: "token_api_key",
}

ANONYMOUS = Identity("anonymous", frozenset({"*"}))  # token authorization disabled
METRICS_ANONYMOUS = Identity("anonymous", frozenset({"metrics"}))  # TorchServe: no token there

Clock = Callable[[], float]


def new_key() -> str:
    """TorchServe's key: 6 random bytes, URL-safe base64 (8 characters)."""
    return base64.urlsafe_b64encode(secrets.token_bytes(6)).decode()


def bearer_token(headers: Mapping[str, str]) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` header, in HTTP headers (any case) or gRPC
    metadata (lower-case keys); None when absent or malformed."""
    value = headers.get("Authorization")
    if value is None:
        value = headers.get("authorization")
    if value is None:
        value = next((v for k, v in headers.items() if k.lower() == "authorization"), None)
    match = _BEARER.match(value) if isinstance(value, str) else None
    return match.group(1) if match else None


def _instant(epoch: float) -> str:
    """Java's ``Instant.toString()`` (UTC, ISO-8601, ``Z``), as TorchServe writes expiries."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _read_keys_file(path: str) -> dict[str, str]:
    """A mounted secret: a JSON or YAML mapping of identity name to key."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"token_keys_file: cannot read {path}: {exc.strerror}") from None
    if path.endswith((".yaml", ".yml")):
        import yaml

        data = yaml.safe_load(text)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"token_keys_file: {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in data.items()
    ):
        raise ConfigError(f"token_keys_file: {path} must map identity names to key strings")
    return data


def static_keys(config: Any, environ: Mapping[str, str]) -> dict[str, str]:
    """Keys fixed by configuration, by identity name: the config key beats the environment,
    which beats ``token_keys_file``. ``inference``/``management``/``API`` replace the generated
    keys; any other name is an extra identity whose permissions come from ``authz_policy``."""
    keys: dict[str, str] = {}
    if path := config.get_str("token_keys_file"):
        keys.update(_read_keys_file(path))
    for kind, env_name in ENV_KEYS.items():
        if environ.get(env_name):
            keys[kind] = environ[env_name]
    for kind, key_name in CONFIG_KEYS.items():
        if value := config.get_str(key_name):
            keys[kind] = value
    owners: dict[str, str] = {}
    for name, key in keys.items():
        if len(key) < MIN_STATIC_KEY_LENGTH or not _BEARER.match(f"Bearer {key}"):
            raise ConfigError(
                f"static key of {name!r}: needs at least {MIN_STATIC_KEY_LENGTH} characters "
                "and no white space"
            )
        if key in owners:
            raise ConfigError(f"identities {owners[key]!r} and {name!r} share one key")
        owners[key] = name
    return keys


class TokenStore:
    """The keys and their expiry, persisted to ``key_file.json`` (TorchServe's format)."""

    def __init__(
        self,
        path: Path,
        expiration_min: float,
        static: Mapping[str, str] | None = None,
        *,
        clock: Clock = time.time,
    ) -> None:
        self.path = path
        self.expiration_s = expiration_min * 60
        self.static = dict(static or {})
        self._clock = clock
        self.keys: dict[str, str] = {}
        self.expires: dict[str, float] = {}
        for kind in ROTATABLE:
            self._issue(kind)
        self.keys[API] = self.static.get(API) or new_key()
        self.named = {
            key: name for name, key in self.static.items() if name not in ROTATABLE and name != API
        }
        self.write()

    def _issue(self, kind: str) -> None:
        if kind in self.static:
            self.keys[kind] = self.static[kind]
            self.expires[kind] = float("inf")
        else:
            self.keys[kind] = new_key()
            self.expires[kind] = self._clock() + self.expiration_s

    def rotate(self, kind: str) -> None:
        """A new ``inference`` or ``management`` key and expiry, written to the key file."""
        if kind not in ROTATABLE:
            raise InvalidKeyError(TOKEN_FAILED)
        if kind in self.static:
            raise InvalidKeyError(f"The {kind} key is fixed by configuration and cannot rotate")
        self._issue(kind)
        self.write()

    def write(self) -> None:
        data: dict[str, Any] = {}
        for kind in ("management", "inference"):  # TorchServe's order
            if kind in self.static:
                # A key from configuration (often a Kubernetes secret) is not copied to disk.
                data[kind] = {"expiration time": "never", "source": "configuration"}
            else:
                data[kind] = {
                    "key": self.keys[kind],
                    "expiration time": _instant(self.expires[kind]),
                }
        data[API] = (
            {"key": self.keys[API]} if API not in self.static else {"source": "configuration"}
        )
        # Written to a new 0600 file and renamed over the old one: never readable by others,
        # even for a moment, and never half-written.
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(data, out, indent=2)
            out.write("\n")
        os.replace(tmp, self.path)

    def check(self, kind: str, presented: str) -> bool:
        key = self.keys.get(kind)
        if key is None or not hmac.compare_digest(key.encode(), presented.encode()):
            return False
        return self._clock() < self.expires.get(kind, float("inf"))

    def named_identity(self, presented: str) -> str | None:
        for key, name in self.named.items():
            if hmac.compare_digest(key.encode(), presented.encode()):
                return name
        return None


class TokenAuthenticator:
    """Maps a Bearer key to an identity: the listener's key gives that listener's role, the API
    key gives ``token`` (``/token`` only), a named static key gives its identity."""

    def __init__(self, server: Any, *, environ: Mapping[str, str] | None = None) -> None:
        config = server.config
        self.disabled = config.get_bool("disable_token_authorization")
        self.store: TokenStore | None = None
        if self.disabled:
            log.warning("token authorization is disabled: every caller may use every API")
            return
        path = Path(config.get_str("key_file") or "key_file.json")
        self.store = TokenStore(
            path,
            config.get_float("token_expiration_min", 60),
            static_keys(config, os.environ if environ is None else environ),
        )
        log.info(
            "token authorization is enabled: keys are in %s (send 'Authorization: Bearer <key>')",
            path.resolve(),
        )

    def authenticate(self, listener: str, headers: Mapping[str, str], path: str) -> Identity | None:
        if self.disabled:
            return ANONYMOUS
        presented = bearer_token(headers)
        if presented is not None and self.store is not None:
            identity = self._identify(listener, presented, path)
            if identity is not None:
                return identity
        # TorchServe applies no token to the metrics API.
        return METRICS_ANONYMOUS if listener == "metrics" else None

    def _identify(self, listener: str, presented: str, path: str) -> Identity | None:
        assert self.store is not None
        if listener == "management" and path.rstrip("/") == "/token":
            if self.store.check(API, presented):
                return Identity("API", frozenset({"token"}))
        elif listener in ROTATABLE and self.store.check(listener, presented):
            return Identity(listener, frozenset({listener}))
        name = self.store.named_identity(presented)
        return Identity(name) if name is not None else None

    def refusal(self, identity: Identity | None, listener: str) -> FlambeauError:
        """No valid key: TorchServe's 400; a valid key without the permission: 403."""
        if identity is None:
            return InvalidKeyError(TOKEN_FAILED)
        return ForbiddenError(f"Identity {identity.name} is not allowed to use this API")


@dataclass(frozen=True, slots=True)
class Grant:
    """What one identity may do; ``models`` (glob patterns) limits model-scoped calls."""

    permissions: frozenset[str]
    models: tuple[str, ...] | None = None

    def allows_model(self, model: str) -> bool:
        return self.models is None or any(fnmatch.fnmatchcase(model, p) for p in self.models)


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"authz_policy: {where} must be a list of strings")
    return tuple(value)


def parse_policy(data: Any) -> dict[str, Grant]:
    """``{identity: {"permissions": [...], "models": [...]}}``; a bare list is the permissions."""
    if not isinstance(data, dict):
        raise ConfigError("authz_policy: expected a mapping of identity name to its grant")
    policy: dict[str, Grant] = {}
    for name, raw in data.items():
        entry = {"permissions": raw} if isinstance(raw, list) else raw
        if not isinstance(entry, dict) or not set(entry) <= {"permissions", "models"}:
            raise ConfigError(
                f"authz_policy: {name}: expected a list of permissions or a mapping with "
                "'permissions' and 'models'"
            )
        models = entry.get("models")
        policy[str(name)] = Grant(
            frozenset(_strings(entry.get("permissions", []), f"{name}.permissions")),
            None if models is None else _strings(models, f"{name}.models"),
        )
    return policy


def load_policy(value: str) -> dict[str, Grant]:
    """``authz_policy``: inline JSON, or the path of a ``.json`` / ``.yaml`` file."""
    if not value.strip():
        return {}
    if value.lstrip().startswith(("{", "[")):
        text, is_yaml = value, False
    else:
        try:
            text = Path(value).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"authz_policy: cannot read {value}: {exc.strerror}") from None
        is_yaml = value.endswith((".yaml", ".yml"))
    if is_yaml:
        import yaml

        try:
            return parse_policy(yaml.safe_load(text))
        except yaml.YAMLError as exc:
            raise ConfigError(f"authz_policy: {value}: {exc}") from None
    try:
        return parse_policy(json.loads(text))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"authz_policy: not valid JSON: {exc}") from None


class RoleAuthorizer:
    """Allows a permission the identity's grant (from ``authz_policy``, else the roles its
    authenticator gave it) names, or ``*``; a grant with ``models`` limits model-scoped calls."""

    def __init__(self, server: Any) -> None:
        self.policy = load_policy(server.config.get_str("authz_policy"))

    def authorize(self, identity: Identity | None, permission: str, resource: str | None) -> bool:
        if identity is None:
            return False
        grant = self.policy.get(identity.name)
        permissions = grant.permissions if grant is not None else identity.roles
        if permission not in permissions and "*" not in permissions:
            return False
        return resource is None or grant is None or grant.allows_model(resource)


class TokenHandler(ApiHandler):
    """``GET /token?type=management|inference``: rotate a key (the API key is required)."""

    async def get(self) -> None:
        store = next(
            (
                a.store
                for a in self.security.authenticators
                if isinstance(a, TokenAuthenticator) and a.store is not None
            ),
            None,
        )
        kind = self.get_query_argument("type", "")
        if store is None or kind not in ROTATABLE:
            raise InvalidKeyError(TOKEN_FAILED)
        store.rotate(kind)
        log.info("%s key rotated", kind)
        # TorchServe answers with an empty JSON response: one newline.
        self.set_header("Content-Type", "application/json")
        self.finish(b"\n")


@hookimpl
def flambeau_configure(config: Any) -> None:
    # Fail at start-up, not on the first request, when the policy does not parse.
    load_policy(config.get_str("authz_policy"))


@hookimpl
def flambeau_authenticators(config: Any) -> list[AuthenticatorSpec]:
    return [AuthenticatorSpec("token", TokenAuthenticator)]


@hookimpl
def flambeau_authorizers(config: Any) -> list[AuthorizerSpec]:
    return [AuthorizerSpec("roles", RoleAuthorizer)]


@hookimpl
def flambeau_routes(config: Any) -> list[RouteSpec]:
    return [RouteSpec(r"/token/?", TokenHandler, listener="management", permission="token")]
