"""Configuration: properties syntax, substitution, precedence, typed values."""

from __future__ import annotations

from pathlib import Path

import pytest

from flambeau.api import ConfigError
from flambeau.core.config import Config, parse_address, parse_properties


def test_properties_syntax() -> None:
    text = "# comment\n! also a comment\na=1\nb : two\nc three\nlong=first,\\\n   second\nempty=\n"
    assert parse_properties(text) == {
        "a": "1",
        "b": "two",
        "c": "three",
        "long": "first,second",
        "empty": "",
    }


def test_env_substitution(tmp_path: Path) -> None:
    path = tmp_path / "config.properties"
    path.write_text("model_store=$$STORE$$/models\n")
    config = Config.load(file=path, environ={"STORE": "/srv"})
    assert config.get_str("model_store") == "/srv/models"
    with pytest.raises(ConfigError, match="Invalid Environment Variable STORE"):
        Config.load(file=path, environ={})


def test_precedence_file_cli_env(tmp_path: Path) -> None:
    path = tmp_path / "config.properties"
    path.write_text("job_queue_size=5\nmetrics_mode=log\ndefault_workers_per_model=2\n")
    env = {"TS_JOB_QUEUE_SIZE": "9", "TS_METRICS_MODE": "prometheus"}
    config = Config.load(file=path, cli={"job_queue_size": "7"}, environ=env)
    assert config.get_int("job_queue_size") == 7  # CLI beats file; env ignored unless enabled
    assert config.get_str("metrics_mode") == "log"
    path.write_text(path.read_text() + "enable_envvars_config=true\n")
    config = Config.load(file=path, cli={"job_queue_size": "7"}, environ=env)
    assert config.get_int("job_queue_size") == 9  # env beats CLI once enabled
    assert config.get_str("metrics_mode") == "prometheus"
    assert config.get_int("default_workers_per_model") == 2


def test_file_only_keys_and_irregular_env_names(tmp_path: Path) -> None:
    path = tmp_path / "c.properties"
    path.write_text("enable_envvars_config=true\nmetric_time_interval=60\n")
    env = {"TS_METRIC_TIME_INTERVAL": "1", "TS_TOKEN_EXPIRATION_TIME_MIN": "5"}
    config = Config.load(file=path, environ=env)
    assert config.get_int("metric_time_interval") == 60
    assert config.get_float("token_expiration_min") == 5.0


def test_oip_env_is_read_directly() -> None:
    config = Config.load(environ={"TS_OPEN_INFERENCE_PROTOCOL": "oip"})
    assert config.get_bool("ts_open_inference_protocol")


def test_typed_getters_name_the_key() -> None:
    config = Config({"n": "x", "b": "maybe", "f": "1.5"})
    with pytest.raises(ConfigError, match="n: expected an integer"):
        config.get_int("n")
    with pytest.raises(ConfigError, match="b: expected true or false"):
        config.get_bool("b")
    assert config.get_float("f") == 1.5
    assert config.get_int("missing", 3) == 3


def test_addresses() -> None:
    assert parse_address("k", "http://127.0.0.1:8080").port == 8080
    assert parse_address("k", "https://example.org").port == 443
    assert parse_address("k", "unix:/tmp/s.sock").path == "/tmp/s.sock"
    with pytest.raises(ConfigError, match="k: invalid address"):
        parse_address("k", "127.0.0.1:8080")
    with pytest.raises(ConfigError, match="invalid port"):
        parse_address("k", "http://127.0.0.1:99999")


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        Config.load(file=tmp_path / "nope.properties")


def test_java_escapes_as_torchserve_writes_them() -> None:
    text = "inference_address=http\\://127.0.0.1\\:8080\nkey\\ with\\ space = v\\u0041\\tz\n"
    assert parse_properties(text) == {
        "inference_address": "http://127.0.0.1:8080",
        "key with space": "vA\tz",
    }
