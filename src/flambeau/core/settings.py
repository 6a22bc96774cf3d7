"""Effective per-model-version settings, merged from their four sources.

Sources: register parameters, the archive's model-config.yaml, the ``models=`` JSON of
config.properties, and server defaults. Wrongly typed yaml values are ignored with a warning
and out-of-range ones clamped, as TorchServe's ``ModelConfig`` does; unknown keys stay for the
handler (``context.model_yaml_config``). docs/configuration.md tells the precedence per key.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from flambeau.api import RegisterParams
from flambeau.core.config import Config

log = logging.getLogger("flambeau.models")

# The register/scale/snapshot names of the settings a caller may pin (snapshot restore).
OVERRIDABLE = frozenset(
    {
        "min_workers",
        "max_workers",
        "batch_size",
        "max_batch_delay_ms",
        "response_timeout_s",
        "startup_timeout_s",
        "parallel_level",
    }
)


@dataclass(frozen=True, slots=True)
class ModelSettings:
    """What one model version runs with, after every source was applied."""

    min_workers: int = 1
    max_workers: int = 1
    batch_size: int = 1
    max_batch_delay_ms: int = 100
    response_timeout_s: int = 120
    startup_timeout_s: int = 120
    max_retry_timeout_s: int = 300
    client_timeout_ms: int = 0
    job_queue_size: int = 100
    device_type: str = ""
    device_ids: tuple[int, ...] = ()
    parallel_type: str = ""
    parallel_level: int = 0
    use_venv: bool = False
    use_job_ticket: bool = False
    continuous_batching: bool = False
    stateful: bool = False
    sequence_max_idle_ms: int = 0
    sequence_timeout_ms: int = 0
    max_num_sequence: int = 0
    max_sequence_job_queue_size: int = 0
    batching_strategy: str = ""
    worker_backend: str = ""
    envelope: str = ""
    intra_op_threads: int = 0
    max_gpu_memory_mb: int = 0
    extra: Mapping[str, Any] = field(default_factory=dict)

    def with_workers(self, min_workers: int, max_workers: int) -> ModelSettings:
        return replace(self, min_workers=min_workers, max_workers=max_workers)

    def with_overrides(self, overrides: Mapping[str, Any]) -> ModelSettings:
        """Pin some settings (a restored snapshot); unknown names are a programming error."""
        unknown = set(overrides) - OVERRIDABLE
        if unknown:
            raise ValueError(f"settings cannot be overridden: {', '.join(sorted(unknown))}")
        return replace(self, **dict(overrides))


class _Yaml:
    """Typed reads of one model-config mapping, warning once per ignored key."""

    def __init__(self, cfg: Mapping[str, Any], model: str) -> None:
        self.cfg = cfg
        self.model = model

    def _ignore(self, key: str, why: str) -> None:
        log.warning(
            "model %s: ignoring %s=%r in model-config (%s)", self.model, key, self.cfg[key], why
        )

    def get_int(self, key: str) -> int | None:
        if key not in self.cfg:
            return None
        value = self.cfg[key]
        if isinstance(value, bool) or not isinstance(value, int):
            self._ignore(key, "not an integer")
            return None
        return value

    def positive(self, key: str) -> int | None:
        value = self.get_int(key)
        if value is not None and value <= 0:
            self._ignore(key, "must be greater than 0")
            return None
        return value

    def get_bool(self, key: str) -> bool:
        if key not in self.cfg:
            return False
        value = self.cfg[key]
        if not isinstance(value, bool):
            self._ignore(key, "not a boolean")
            return False
        return value

    def get_str(self, key: str) -> str:
        value = self.cfg.get(key)
        if value is None:
            return ""
        if not isinstance(value, str):
            self._ignore(key, "not a string")
            return ""
        return value

    def int_list(self, key: str) -> tuple[int, ...]:
        value = self.cfg.get(key)
        if value is None:
            return ()
        if not isinstance(value, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value
        ):
            self._ignore(key, "not a list of device ids")
            return ()
        return tuple(value)


def _models_json(config: Config, model: str, version: str) -> Mapping[str, Any]:
    raw = config.get_str("models")
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except json.JSONDecodeError:
        log.warning("config key models is not valid JSON; ignoring it")
        return {}
    entry = data.get(model, {}) if isinstance(data, dict) else {}
    per_version = entry.get(version, {}) if isinstance(entry, dict) else {}
    return per_version if isinstance(per_version, dict) else {}


def _json_int(data: Mapping[str, Any], key: str) -> int | None:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value


def _first(*candidates: int | None, default: int) -> int:
    for candidate in candidates:
        if candidate is not None:
            return candidate
    return default


def _positive(value: int | None) -> int | None:
    return value if value is not None and value > 0 else None


def _non_negative(value: int | None) -> int | None:
    return value if value is not None and value >= 0 else None


def merge_settings(
    *,
    config: Config,
    model: str,
    version: str,
    yaml_config: Mapping[str, Any],
    params: RegisterParams,
    default_workers: int,
) -> ModelSettings:
    """Apply the precedence rules of docs/configuration.md.

    Batching and timeouts: register parameter > model-config > ``models=`` JSON > server
    default. Workers: a valid model-config ``minWorkers``/``maxWorkers`` pair > register
    ``initial_workers`` > (start-up models only) ``models=`` JSON > ``default_workers``.
    """
    yml = _Yaml(yaml_config, model)
    js = _models_json(config, model, version)

    yaml_batch = yml.get_int("batchSize")
    yaml_delay = yml.get_int("maxBatchDelay")
    batch_size = _first(
        _positive(params.batch_size),
        # TorchServe's ModelConfig clamps batchSize to >= 1 and maxBatchDelay to >= 0.
        None if yaml_batch is None else max(1, yaml_batch),
        _positive(_json_int(js, "batchSize")),
        default=1,
    )
    max_delay = _first(
        _non_negative(params.max_batch_delay),
        None if yaml_delay is None else max(0, yaml_delay),
        _non_negative(_json_int(js, "maxBatchDelay")),
        default=100,
    )
    response_timeout = _first(
        _positive(params.response_timeout),
        yml.positive("responseTimeout"),
        _positive(_json_int(js, "responseTimeout")),
        default=config.get_int("default_response_timeout", 120),
    )
    startup_timeout = _first(
        _positive(params.startup_timeout),
        yml.positive("startupTimeout"),
        _positive(_json_int(js, "startupTimeout")),
        default=config.get_int("default_startup_timeout", 120),
    )
    min_w, max_w = _workers(yml, js, params, default_workers)

    parallel_type = yml.get_str("parallelType")
    parallel_level = yml.get_int("parallelLevel") or 0
    if not parallel_type or parallel_level <= 0:
        # TorchServe keeps a parallel level only together with a parallel type.
        parallel_level = 0
    stateful = yml.get_bool("sequenceBatching")
    seq_idle = max(0, yml.get_int("sequenceMaxIdleMSec") or 0)
    seq_queue = max_sequences = 0
    if seq_idle > 0:
        seq_queue = max(1, yml.get_int("maxSequenceJobQueueSize") or 1)
        max_sequences = max(1, yml.get_int("maxNumSequence") or 1, batch_size * max_w)
    system = yaml_config.get("system")
    max_gpu_memory = system.get("maxGPUMemory") if isinstance(system, Mapping) else None
    return ModelSettings(
        min_workers=min_w,
        max_workers=max_w,
        batch_size=batch_size,
        max_batch_delay_ms=max_delay,
        response_timeout_s=response_timeout,
        startup_timeout_s=startup_timeout,
        max_retry_timeout_s=max(0, _first(yml.get_int("maxRetryTimeoutInSec"), default=300)),
        client_timeout_ms=max(0, yml.get_int("clientTimeoutInMills") or 0),
        job_queue_size=yml.positive("jobQueueSize") or config.get_int("job_queue_size", 100),
        device_type=yml.get_str("deviceType").lower(),
        device_ids=yml.int_list("deviceIds"),
        parallel_type=parallel_type,
        parallel_level=parallel_level,
        use_venv=yml.get_bool("useVenv"),
        use_job_ticket=yml.get_bool("useJobTicket"),
        continuous_batching=yml.get_bool("continuousBatching"),
        stateful=stateful,
        sequence_max_idle_ms=seq_idle,
        sequence_timeout_ms=max(0, yml.get_int("sequenceTimeoutMSec") or 0),
        max_num_sequence=max_sequences,
        max_sequence_job_queue_size=seq_queue,
        batching_strategy=yml.get_str("batchingStrategy"),
        worker_backend=yml.get_str("workerBackend"),
        envelope=yml.get_str("envelope"),
        intra_op_threads=max(0, yml.get_int("intraOpThreads") or 0),
        max_gpu_memory_mb=max_gpu_memory if isinstance(max_gpu_memory, int) else 0,
        extra=yaml_config,
    )


def _workers(
    yml: _Yaml, js: Mapping[str, Any], params: RegisterParams, default_workers: int
) -> tuple[int, int]:
    yaml_min = yml.get_int("minWorkers")
    yaml_max = yml.get_int("maxWorkers")
    if yaml_min is not None and yaml_max is not None:
        # ModelConfig clamps minWorkers to >= 1 and maxWorkers to >= 0, then the pair is used
        # only when it is consistent.
        low, high = max(1, yaml_min), max(0, yaml_max)
        if high >= low:
            return low, high
    if params.initial_workers is not None:
        count = max(0, params.initial_workers)
        return count, count
    json_min = _json_int(js, "minWorkers")
    if params.loaded_at_startup and json_min is not None and json_min >= 0:
        return json_min, max(json_min, _json_int(js, "maxWorkers") or json_min)
    count = max(0, default_workers)
    return count, count


def usable_cpus() -> int:
    """CPUs this process may run on (affinity and cpusets, like Java's availableProcessors)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def startup_default_workers(config: Config, gpu_count: int) -> int:
    """Workers for a model loaded at start-up when nothing else says: TorchServe's
    ``default_workers_per_model``, else one per GPU, else one per usable CPU (1 in debug)."""
    configured = config.get_int("default_workers_per_model", 0)
    if configured > 0:
        return configured
    if config.get_bool("debug", False):
        return 1
    if gpu_count > 0:
        return gpu_count
    return max(1, usable_cpus())
