"""``metrics_mode`` and ``metrics.yaml``: which metrics exist, where each one goes.

The mode decides what the metrics API exposes and what the log sink writes (TorchServe's
``log``, ``prometheus`` and ``legacy``). ``metrics.yaml`` (``metrics_config``, default the
packaged copy of TorchServe's) lists the server metrics that are emitted and the handler
metrics that are admitted; it is read with ``yaml.safe_load`` only.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from flambeau.api import ConfigError

KINDS = ("counter", "gauge", "histogram")
# The origins the server's metric registry gives its families.
FRONTEND = "frontend"  # TorchServe's ts_metrics, system metrics included
MODEL = "model"  # handler metrics
EXTRA = "flambeau"  # flambeau's own histograms: exposed, never logged


class MetricFamily(Protocol):
    """What this plugin reads and sets on one family of the server's registry."""

    name: str
    kind: str
    unit: str
    labelnames: tuple[str, ...]
    buckets: tuple[float, ...]
    origin: str
    enabled: bool
    values: dict[tuple[str, ...], Any]

    def set(self, labels: tuple[str, ...], value: float) -> None: ...


class MetricsRegistry(Protocol):
    """The server's metric registry (``server.metrics``), as this plugin uses it."""

    @property
    def families(self) -> Mapping[str, MetricFamily]: ...

    def family(
        self,
        name: str,
        kind: str,
        unit: str,
        labelnames: Sequence[str],
        help: str = "",
        buckets: Sequence[float] = ...,
        *,
        origin: str = ...,
    ) -> MetricFamily: ...

    def declare_model_metrics(self, specs: Iterable[MetricSpec], *, auto_detect: bool) -> None: ...


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """One metric of metrics.yaml (dimensions without the automatic Hostname)."""

    name: str
    kind: str
    unit: str
    dimensions: tuple[str, ...]


DEFAULT_METRICS_YAML = Path(__file__).with_name("metrics.yaml")
# What legacy mode still shows on /metrics (TorchServe's pre-0.8 Prometheus metrics).
LEGACY_EXPOSED = frozenset(
    {
        "ts_inference_requests_total",
        "ts_inference_latency_microseconds",
        "ts_queue_latency_microseconds",
    }
)


class MetricsMode(enum.Enum):
    """TorchServe's ``metrics_mode``: where each metric goes."""

    LOG = "log"
    PROMETHEUS = "prometheus"
    LEGACY = "legacy"

    @classmethod
    def from_config(cls, config: Any) -> MetricsMode:
        raw = config.get_str("metrics_mode") or "log"
        try:
            return cls(raw.strip().lower())
        except ValueError:
            raise ConfigError(
                f"metrics_mode: expected log, prometheus or legacy, got {raw!r}"
            ) from None

    def exposes(self, family: MetricFamily) -> bool:
        """Whether ``/metrics`` shows the family."""
        if self is MetricsMode.PROMETHEUS:
            return True
        return self is MetricsMode.LEGACY and family.name in LEGACY_EXPOSED

    def logs(self, family: MetricFamily | None) -> bool:
        """Whether the log sink writes the family's updates (None: an unknown handler metric)."""
        if self is MetricsMode.PROMETHEUS or (family is not None and family.origin == EXTRA):
            return False
        return self is MetricsMode.LOG or family is None or family.name not in LEGACY_EXPOSED


@dataclass(frozen=True, slots=True)
class MetricsYaml:
    """The two sections of a metrics.yaml."""

    frontend: tuple[MetricSpec, ...]
    model: tuple[MetricSpec, ...]


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    mode: MetricsMode
    declared: MetricsYaml
    auto_detect: bool
    source: Path


def _specs(section: Any, where: str) -> tuple[MetricSpec, ...]:
    if section is None:
        return ()
    if not isinstance(section, dict) or not set(section) <= set(KINDS):
        raise ConfigError(f"{where}: expected a mapping with counter, gauge and/or histogram")
    specs = []
    for kind, entries in section.items():
        for entry in entries or ():
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                raise ConfigError(f"{where}.{kind}: every entry needs a name")
            name = entry["name"]
            dims = entry.get("dimensions") or []
            if not isinstance(dims, list) or not all(isinstance(d, str) for d in dims):
                raise ConfigError(f"{where}.{kind}.{name}: dimensions must be a list of strings")
            specs.append(MetricSpec(name, kind, str(entry.get("unit", "")), tuple(dims)))
    return tuple(specs)


def parse_metrics_yaml(text: str, source: str = "metrics.yaml") -> MetricsYaml:
    import yaml

    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"metrics_config: {source}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"metrics_config: {source}: expected a mapping at the top")
    return MetricsYaml(
        _specs(data.get("ts_metrics"), f"{source}: ts_metrics"),
        _specs(data.get("model_metrics"), f"{source}: model_metrics"),
    )


def load_settings(config: Any) -> MetricsSettings:
    path = Path(config.get_str("metrics_config") or DEFAULT_METRICS_YAML)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"metrics_config: cannot read {path}: {exc.strerror}") from None
    return MetricsSettings(
        MetricsMode.from_config(config),
        parse_metrics_yaml(text, str(path)),
        config.get_bool("model_metrics_auto_detect"),
        path,
    )


def apply_settings(metrics: MetricsRegistry, settings: MetricsSettings) -> None:
    """Declare the yaml's families; server metrics it does not list are switched off."""
    for spec in settings.declared.frontend:
        metrics.family(spec.name, spec.kind, spec.unit, spec.dimensions, origin=FRONTEND)
    declared = {spec.name for spec in settings.declared.frontend}
    for family in metrics.families.values():
        if family.origin == FRONTEND and family.name not in declared:
            family.enabled = False
    metrics.declare_model_metrics(settings.declared.model, auto_detect=settings.auto_detect)
