"""Server configuration with TorchServe's keys, syntax and precedence.

Sources, lowest first: built-in defaults, a ``config.properties`` file (Java properties syntax,
``$$VAR$$`` substituted from the environment), command-line flags, then ``TS_*`` environment
variables when ``enable_envvars_config=true``. Values stay strings, as in the file; typed
getters convert them and name the key in the error when they cannot. Example::

    config = Config.load(file="config.properties", cli={"model_store": "store"})
    config.get_int("job_queue_size")  # 100
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from flambeau.api import ConfigError
from flambeau.properties import parse_properties

DEFAULTS: dict[str, str] = {
    "inference_address": "http://127.0.0.1:8080",
    "management_address": "http://127.0.0.1:8081",
    "metrics_address": "http://127.0.0.1:8082",
    "enable_metrics_api": "true",
    "grpc_inference_address": "127.0.0.1",
    "grpc_management_address": "127.0.0.1",
    "grpc_inference_port": "7070",
    "grpc_management_port": "7071",
    "enable_grpc_ssl": "false",
    "ts_open_inference_protocol": "false",
    "load_models": "",
    "default_workers_per_model": "0",
    "job_queue_size": "100",
    "default_response_timeout": "120",
    "default_startup_timeout": "120",
    "unregister_model_timeout": "120",
    "max_request_size": "6553500",
    "max_response_size": "6553500",
    "limit_max_image_pixels": "true",
    "decode_input_request": "true",
    "install_py_dep_per_model": "false",
    "allowed_urls": "",
    "use_env_allowed_urls": "false",
    "blacklist_env_vars": "",
    "disable_token_authorization": "false",
    "token_expiration_min": "60",
    "enable_model_api": "false",
    "metrics_mode": "log",
    "model_metrics_auto_detect": "false",
    "disable_system_metrics": "false",
    "metric_time_interval": "60",
    "initial_worker_port": "9000",
    "enable_envvars_config": "false",
    "snapshot_enabled": "true",
    # flambeau's own keys: strategy choices, all plugins chosen by name.
    "worker_backend": "process",
    "batching_strategy": "torchserve",
    "device_allocator": "round_robin",
    "authenticator": "token",
    "authorizer": "roles",
    "metrics_sinks": "log",
    "drain_timeout": "30",
    "cpu_placement": "threads",
    "model_env_cache": "",  # "" = $XDG_CACHE_HOME/flambeau/envs or ~/.cache/flambeau/envs
}

# Keys TorchServe never lets the environment override (ConfigManager has no TS_ constant).
FILE_ONLY_KEYS = frozenset(
    {
        "use_native_io",
        "io_ratio",
        "metric_time_interval",
        "enable_envvars_config",
        "model_snapshot",
        "models",
        "system_metrics_cmd",
        "use_env_allowed_urls",
    }
)
ENV_NAME_EXCEPTIONS = {"token_expiration_min": "TS_TOKEN_EXPIRATION_TIME_MIN"}
_SUBST = re.compile(r"\$\$([A-Za-z_][A-Za-z0-9_]*)\$\$")
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off", ""}


def substitute_env(value: str, key: str, environ: Mapping[str, str]) -> str:
    def repl(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in environ:
            raise ConfigError(f"Invalid Environment Variable {name} in config key {key}")
        return environ[name]

    return _SUBST.sub(repl, value)


def env_name(key: str) -> str:
    return ENV_NAME_EXCEPTIONS.get(key, "TS_" + key.upper())


@dataclass(frozen=True, slots=True)
class Address:
    """A listener address parsed from ``http(s)://host[:port]`` or ``unix:/path``."""

    scheme: str
    host: str
    port: int
    path: str = ""

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    @property
    def unix(self) -> bool:
        return self.scheme == "unix"


def parse_address(key: str, value: str) -> Address:
    if value.startswith("unix:"):
        return Address("unix", "", 0, value[5:])
    parts = urlsplit(value)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ConfigError(f"{key}: invalid address {value!r}, expected http(s)://host:port")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"{key}: invalid port in {value!r}") from None
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    return Address(parts.scheme, parts.hostname, port)


class Config:
    """The merged configuration. Keys are TorchServe's (``snake_case``) plus flambeau's own."""

    def __init__(self, values: Mapping[str, str], *, source: str | None = None) -> None:
        self._values = dict(values)
        self.source = source

    @classmethod
    def load(
        cls,
        *,
        file: str | os.PathLike[str] | None = None,
        cli: Mapping[str, str | None] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> Config:
        """Merge defaults < file < CLI < ``TS_*`` environment (only if enabled)."""
        env = os.environ if environ is None else environ
        values = dict(DEFAULTS)
        source = None
        if file is not None:
            path = Path(file)
            try:
                text = path.read_text(encoding="utf-8")
            except OSError as exc:
                raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
            source = str(path)
            for key, value in parse_properties(text).items():
                values[key] = substitute_env(value, key, env)
        for key, cli_value in (cli or {}).items():
            if cli_value is not None:
                values[key] = cli_value
        if values.get("enable_envvars_config", "false").lower() in _TRUE:
            for key in list(values) + [k for k in DEFAULTS if k not in values]:
                if key in FILE_ONLY_KEYS:
                    continue
                if key == "allowed_urls" and values.get("use_env_allowed_urls") != "true":
                    continue
                name = env_name(key)
                if name in env:
                    values[key] = env[name]
        if env.get("TS_OPEN_INFERENCE_PROTOCOL", "").lower() == "oip":
            values["ts_open_inference_protocol"] = "true"
        return cls(values, source=source)

    def __contains__(self, key: str) -> bool:
        return key in self._values

    def as_dict(self) -> dict[str, str]:
        return dict(self._values)

    def set(self, key: str, value: str) -> None:
        self._values[key] = value

    def get_str(self, key: str, default: str | None = None) -> str:
        value = self._values.get(key)
        if value is None:
            if default is None:
                return ""
            return default
        return value

    def get_int(self, key: str, default: int | None = None) -> int:
        raw = self._values.get(key)
        if raw is None or raw.strip() == "":
            if default is None:
                raise ConfigError(f"{key}: missing integer value")
            return default
        try:
            return int(raw.strip())
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {raw!r}") from None

    def get_float(self, key: str, default: float | None = None) -> float:
        raw = self._values.get(key)
        if raw is None or raw.strip() == "":
            if default is None:
                raise ConfigError(f"{key}: missing number")
            return default
        try:
            return float(raw.strip())
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {raw!r}") from None

    def get_bool(self, key: str, default: bool = False) -> bool:
        raw = self._values.get(key)
        if raw is None:
            return default
        lowered = raw.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ConfigError(f"{key}: expected true or false, got {raw!r}")

    def get_list(self, key: str) -> list[str]:
        return [item.strip() for item in self.get_str(key).split(",") if item.strip()]

    def address(self, key: str) -> Address:
        return parse_address(key, self.get_str(key))

    @property
    def model_store(self) -> Path | None:
        store = self.get_str("model_store")
        return Path(store) if store else None

    @property
    def workflow_store(self) -> Path | None:
        store = self.get_str("workflow_store")
        return Path(store) if store else self.model_store
