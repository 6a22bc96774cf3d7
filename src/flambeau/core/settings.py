"""Effective per-model-version settings, merged with TorchServe's precedence.

Sources: register parameters, the archive's model-config.yaml, the ``models=`` JSON of
config.properties, and server defaults. Wrongly typed yaml values are ignored with a warning,
as TorchServe does; unknown keys stay for the handler (``context.model_yaml_config``).
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


@dataclass(frozen=True, slots=True)
class ModelSettings:
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
    batching_strategy: str = ""
    worker_backend: str = ""
    envelope: str = ""
    intra_op_threads: int = 0
    max_gpu_memory_mb: int = 0
    extra: Mapping[str, Any] = field(default_factory=dict)

    def with_workers(self, min_workers: int, max_workers: int) -> ModelSettings:
        return replace(self, min_workers=min_workers, max_workers=max_workers)


def _yaml_int(cfg: Mapping[str, Any], key: str, model: str) -> int | None:
    if key not in cfg:
        return None
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int):
        log.warning("model %s: ignoring %s=%r in model-config (not an integer)", model, key, value)
        return None
    return value


def _yaml_bool(cfg: Mapping[str, Any], key: str) -> bool:
    return cfg.get(key) is True


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


def _positive(value: int | None) -> int | None:
    return value if value is not None and value > 0 else None


def merge_settings(
    *,
    config: Config,
    model: str,
    version: str,
    yaml_config: Mapping[str, Any],
    params: RegisterParams,
    default_workers: int,
) -> ModelSettings:
    """Apply the precedence rules; see docs/configuration.md."""
    cfg = yaml_config
    js = _models_json(config, model, version)
    system = cfg.get("system") if isinstance(cfg.get("system"), Mapping) else {}

    def pick(*candidates: int | None, default: int) -> int:
        for candidate in candidates:
            if candidate is not None:
                return candidate
        return default

    batch_size = pick(
        _positive(params.batch_size),
        _positive(_yaml_int(cfg, "batchSize", model)),
        _positive(js.get("batchSize")),
        default=1,
    )
    max_delay = pick(
        params.max_batch_delay if params.max_batch_delay is not None and params.max_batch_delay >= 0 else None,
        _yaml_int(cfg, "maxBatchDelay", model),
        js.get("maxBatchDelay"),
        default=100,
    )
    response_timeout = pick(
        _positive(params.response_timeout),
        _positive(_yaml_int(cfg, "responseTimeout", model)),
        _positive(js.get("responseTimeout")),
        default=config.get_int("default_response_timeout", 120),
    )
    startup_timeout = pick(
        _positive(params.startup_timeout),
        _positive(_yaml_int(cfg, "startupTimeout", model)),
        _positive(js.get("startupTimeout")),
        default=config.get_int("default_startup_timeout", 120),
    )
    yaml_min = _yaml_int(cfg, "minWorkers", model)
    yaml_max = _yaml_int(cfg, "maxWorkers", model)
    if yaml_min is not None and yaml_min > 0 and yaml_max is not None and yaml_max >= yaml_min:
        min_w, max_w = yaml_min, yaml_max
    elif js.get("minWorkers") is not None and params.initial_workers is None:
        min_w = int(js["minWorkers"])
        max_w = max(min_w, int(js.get("maxWorkers", min_w)))
    else:
        n = params.initial_workers if params.initial_workers is not None else default_workers
        min_w = max_w = max(0, n)
    device_ids = cfg.get("deviceIds")
    if not (isinstance(device_ids, list) and all(isinstance(i, int) for i in device_ids)):
        device_ids = []
    queue_size = _positive(_yaml_int(cfg, "jobQueueSize", model)) or config.get_int(
        "job_queue_size", 100
    )
    threads = _yaml_int(cfg, "intraOpThreads", model) or 0
    max_gpu_memory = system.get("maxGPUMemory") if isinstance(system, Mapping) else None
    return ModelSettings(
        min_workers=min_w,
        max_workers=max_w,
        batch_size=max(1, batch_size),
        max_batch_delay_ms=max(0, max_delay),
        response_timeout_s=response_timeout,
        startup_timeout_s=startup_timeout,
        max_retry_timeout_s=_yaml_int(cfg, "maxRetryTimeoutInSec", model) or 300,
        client_timeout_ms=max(0, _yaml_int(cfg, "clientTimeoutInMills", model) or 0),
        job_queue_size=queue_size,
        device_type=str(cfg.get("deviceType", "") or ""),
        device_ids=tuple(device_ids),
        parallel_type=str(cfg.get("parallelType", "") or ""),
        parallel_level=_yaml_int(cfg, "parallelLevel", model) or 0,
        use_venv=_yaml_bool(cfg, "useVenv"),
        use_job_ticket=_yaml_bool(cfg, "useJobTicket"),
        continuous_batching=_yaml_bool(cfg, "continuousBatching"),
        stateful=_yaml_bool(cfg, "sequenceBatching"),
        batching_strategy=str(cfg.get("batchingStrategy", "") or ""),
        worker_backend=str(cfg.get("workerBackend", "") or ""),
        envelope=str(cfg.get("envelope", "") or ""),
        intra_op_threads=max(0, threads),
        max_gpu_memory_mb=int(max_gpu_memory) if isinstance(max_gpu_memory, int) else 0,
        extra=cfg,
    )


def startup_default_workers(config: Config, gpu_count: int) -> int:
    """Workers for a model loaded at start-up: TorchServe's default_workers_per_model, else one
    per GPU, else one per CPU core."""
    configured = config.get_int("default_workers_per_model", 0)
    if configured > 0:
        return configured
    if gpu_count > 0:
        return gpu_count
    return os.cpu_count() or 1
