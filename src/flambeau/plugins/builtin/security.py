"""Token authentication (TorchServe 0.12's, on by default) and a role-based authorizer.

At start-up a ``key_file.json`` (mode 0600) is written in the working directory with an
inference key, a management key (both expiring after ``token_expiration_min``) and an API key
that never expires and is used to rotate the other two via ``/token``. Requests carry
``Authorization: Bearer <key>``; a wrong or missing key is TorchServe's 400
``InvalidKeyException``. With ``disable_token_authorization`` every caller gets every role.
Static keys for Kubernetes: ``token_inference_key`` / ``token_management_key`` (or the env
vars ``FLAMBEAU_INFERENCE_KEY`` / ``FLAMBEAU_MANAGEMENT_KEY``) fix the keys and never expire.
"""

from __future__ import annotations

import base64
import hmac
import json
import os
import re
import secrets
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from flambeau.api import (
    AuthenticatorSpec,
    AuthorizerSpec,
    FlambeauError,
    Identity,
    InvalidKeyError,
    RouteSpec,
    hookimpl,
)
from flambeau.web import ApiHandler

TOKEN_FAILED = (
    "Token Authorization failed. Token either incorrect, expired, or not provided correctly"
)
_BEARER = re.compile(r"^Bearer\s+(\S+)$")
ALL_ROLES = frozenset({"inference", "management", "metrics", "token", "*"})
ANONYMOUS_METRICS = Identity("anonymous", frozenset({"metrics"}))


def _new_key() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(6)).decode()


class TokenStore:
    """The three keys and their expiry; persisted to ``key_file.json``."""

    def __init__(self, path: Path, expiration_min: float, static: Mapping[str, str]) -> None:
        self.path = path
        self.expiration_s = expiration_min * 60
        self.static = dict(static)
        self.keys: dict[str, str] = {}
        self.expires: dict[str, float] = {}
        for kind in ("inference", "management"):
            self.rotate(kind, write=False)
        self.keys["API"] = _new_key()
        self.write()

    def rotate(self, kind: str, *, write: bool = True) -> None:
        self.keys[kind] = self.static.get(kind) or _new_key()
        self.expires[kind] = float("inf") if kind in self.static else time.time() + self.expiration_s
        if write:
            self.write()

    def write(self) -> None:
        def entry(kind: str) -> dict[str, str]:
            expiry = self.expires[kind]
            when = (
                "never"
                if expiry == float("inf")
                else datetime.fromtimestamp(expiry, timezone.utc).isoformat().replace("+00:00", "Z")
            )
            return {"key": self.keys[kind], "expiration time": when}

        data = {
            "management": entry("management"),
            "inference": entry("inference"),
            "API": {"key": self.keys["API"]},
        }
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(data, out, indent=2)

    def check(self, kind: str, presented: str) -> bool:
        key = self.keys.get(kind)
        if key is None or not hmac.compare_digest(key.encode(), presented.encode()):
            return False
        return time.time() < self.expires.get(kind, float("inf"))


class TokenAuthenticator:
    """Maps a Bearer key to an identity holding the role its key grants."""

    def __init__(self, server: Any) -> None:
        config = server.config
        self.disabled = config.get_bool("disable_token_authorization")
        self.store: TokenStore | None = None
        if not self.disabled:
            static = {
                "inference": config.get_str("token_inference_key")
                or os.environ.get("FLAMBEAU_INFERENCE_KEY", ""),
                "management": config.get_str("token_management_key")
                or os.environ.get("FLAMBEAU_MANAGEMENT_KEY", ""),
            }
            self.store = TokenStore(
                Path(config.get_str("key_file", "key_file.json")),
                config.get_float("token_expiration_min", 60),
                {k: v for k, v in static.items() if v},
            )

    def authenticate(self, listener: str, headers: Mapping[str, str], path: str) -> Identity | None:
        if self.disabled:
            return Identity("anonymous", ALL_ROLES)
        if listener == "metrics":
            return ANONYMOUS_METRICS
        match = _BEARER.match(headers.get("Authorization", ""))
        if match is None:
            return None
        assert self.store is not None
        presented = match.group(1)
        if listener == "management" and path.rstrip("/") == "/token":
            return Identity("api", frozenset({"token"})) if self.store.check("API", presented) else None
        if self.store.check(listener, presented):
            return Identity(listener, frozenset({listener}))
        return None

    def refusal(self, identity: Identity | None, listener: str) -> FlambeauError:
        return InvalidKeyError(TOKEN_FAILED)


class RoleAuthorizer:
    """Allows a permission when the identity holds a role of that name (or ``*``).

    ``authz_model_roles`` restricts inference per model: a JSON object mapping an identity
    name to the list of models it may call, e.g. ``{"inference": ["mnist"]}``.
    """

    def __init__(self, server: Any) -> None:
        raw = server.config.get_str("authz_model_roles")
        self.model_limits: dict[str, set[str]] = (
            {k: set(v) for k, v in json.loads(raw).items()} if raw else {}
        )

    def authorize(self, identity: Identity | None, permission: str, resource: str | None) -> bool:
        if identity is None:
            return False
        if permission not in identity.roles and "*" not in identity.roles:
            return False
        allowed = self.model_limits.get(identity.name)
        return allowed is None or resource is None or resource in allowed


class TokenHandler(ApiHandler):
    """``GET /token?type=management|inference``: rotate a key (API key required)."""

    async def get(self) -> None:
        authenticator = next(
            (a for a in self.security.authenticators if isinstance(a, TokenAuthenticator)), None
        )
        kind = self.get_query_argument("type", "")
        if authenticator is None or authenticator.store is None or kind not in {"management", "inference"}:
            raise InvalidKeyError(TOKEN_FAILED)
        authenticator.store.rotate(kind)
        self.finish(b"\n")


@hookimpl
def flambeau_authenticators(config: Any) -> list[AuthenticatorSpec]:
    return [AuthenticatorSpec("token", TokenAuthenticator)]


@hookimpl
def flambeau_authorizers(config: Any) -> list[AuthorizerSpec]:
    return [AuthorizerSpec("roles", RoleAuthorizer)]


@hookimpl
def flambeau_routes(config: Any) -> list[RouteSpec]:
    return [RouteSpec(r"/token/?", TokenHandler, listener="management", permission="token")]
