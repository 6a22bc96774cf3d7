"""The server's metric families, kept in memory and offered to sink plugins.

A family is a counter, gauge or histogram with fixed label names. The core updates its own
families (requests, latencies, batches); handler metrics arrive as MetricRecords through
:meth:`Metrics.record` and are admitted as ``metrics.yaml`` declares. Every update of an enabled
family is offered to the metrics sinks (the log sink writes TorchServe's metric lines), and the
metrics API renders the families at scrape time. Updates are plain dict operations.
"""

from __future__ import annotations

import bisect
import logging
import socket
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from flambeau.api import ConfigError, MetricRecord, MetricsSink

log = logging.getLogger("flambeau.metrics")

DEFAULT_BUCKETS = (0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
# Seconds; from 1 ms to 10 s, the range where a model server's latencies live.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
HOSTNAME = socket.gethostname()

# Where a family comes from: TorchServe's frontend ("ts_metrics", system metrics included),
# handlers ("model_metrics"), or flambeau's own histograms, which are only exposed, never logged.
FRONTEND = "frontend"
MODEL = "model"
EXTRA = "flambeau"

KINDS = ("counter", "gauge", "histogram")

Notify = Callable[["Family", tuple[str, ...], float], None]


class DeclaredMetric(Protocol):
    """A metric as ``metrics.yaml`` declares it (dimensions without the automatic Hostname)."""

    @property
    def name(self) -> str: ...

    @property
    def kind(self) -> str: ...

    @property
    def unit(self) -> str: ...

    @property
    def dimensions(self) -> tuple[str, ...]: ...


class Family:
    """One metric family; ``values`` maps a tuple of label values to a number or histogram.

    ``inc``, ``set`` and ``observe`` apply a value as the family's kind does (add, replace,
    count into a bucket). A histogram value is ``[per-bucket counts (the last one is +Inf),
    sum, count]``.
    """

    __slots__ = (
        "_notify",
        "buckets",
        "enabled",
        "help",
        "kind",
        "labelnames",
        "name",
        "origin",
        "unit",
        "values",
    )

    def __init__(
        self,
        name: str,
        kind: str,
        unit: str,
        labelnames: Sequence[str],
        *,
        help: str = "",
        buckets: Sequence[float] = DEFAULT_BUCKETS,
        origin: str = FRONTEND,
        notify: Notify | None = None,
    ) -> None:
        if kind not in KINDS:
            raise ConfigError(f"metric {name}: unknown type {kind!r} (expected {', '.join(KINDS)})")
        self.name = name
        self.kind = kind
        self.unit = unit
        self.labelnames = tuple(labelnames)
        self.help = help
        self.buckets = tuple(float(b) for b in buckets)
        self.origin = origin
        self.enabled = True
        self.values: dict[tuple[str, ...], Any] = {}
        self._notify = notify

    def __repr__(self) -> str:
        return f"Family({self.name!r}, {self.kind!r}, {self.unit!r}, {self.labelnames!r})"

    def inc(self, labels: tuple[str, ...], amount: float = 1.0) -> None:
        self._update(labels, amount)

    def set(self, labels: tuple[str, ...], value: float) -> None:
        self._update(labels, value)

    def observe(self, labels: tuple[str, ...], value: float) -> None:
        self._update(labels, value)

    def _update(self, labels: tuple[str, ...], value: float) -> None:
        self.apply(labels, value)
        if self._notify is not None and self.enabled:
            self._notify(self, labels, value)

    def apply(self, labels: tuple[str, ...], value: float) -> None:
        """Update the stored value as this family's kind does, without telling the sinks."""
        if self.kind == "counter":
            self.values[labels] = self.values.get(labels, 0.0) + value
        elif self.kind == "gauge":
            self.values[labels] = float(value)
        else:
            hist = self.values.get(labels)
            if hist is None:
                hist = self.values[labels] = [[0] * (len(self.buckets) + 1), 0.0, 0]
            hist[0][bisect.bisect_left(self.buckets, value)] += 1
            hist[1] += value
            hist[2] += 1


class Metrics:
    """All families of one server, plus the sinks that hear about every update."""

    def __init__(self, sinks: Sequence[MetricsSink] = ()) -> None:
        self.families: dict[str, Family] = {}
        self.sinks = list(sinks)
        # None: no metrics.yaml was applied, so every handler metric is admitted.
        self._model_specs: dict[str, DeclaredMetric] | None = None
        self._auto_detect = True
        self._warned: set[str] = set()

    def family(
        self,
        name: str,
        kind: str,
        unit: str,
        labelnames: Sequence[str],
        help: str = "",
        buckets: Sequence[float] = DEFAULT_BUCKETS,
        *,
        origin: str = FRONTEND,
    ) -> Family:
        """The family ``name``, created on first use; a second, different shape is an error."""
        found = self.families.get(name)
        if found is None:
            found = Family(
                name,
                kind,
                unit,
                labelnames,
                help=help,
                buckets=buckets,
                origin=origin,
                notify=self._notify,
            )
            self.families[name] = found
        elif found.kind != kind or found.labelnames != tuple(labelnames):
            raise ConfigError(
                f"metric {name}: declared as {found.kind} with dimensions "
                f"{list(found.labelnames)}, then as {kind} with {list(labelnames)}"
            )
        return found

    def declare_model_metrics(self, specs: Iterable[DeclaredMetric], *, auto_detect: bool) -> None:
        """Apply ``model_metrics`` of metrics.yaml: declared metrics are admitted with their
        declared type, unit and dimensions; others only when ``auto_detect``."""
        self._model_specs = {spec.name: spec for spec in specs}
        self._auto_detect = auto_detect
        for spec in self._model_specs.values():
            self.family(
                spec.name, spec.kind, spec.unit, (*spec.dimensions, "Hostname"), origin=MODEL
            )

    def record(self, record: MetricRecord) -> None:
        """A handler (backend) metric: stored in its family, then offered to the sinks."""
        admitted = self._model_family(record)
        if admitted is None:
            return
        family, labels = admitted
        family.apply(labels, record.value)
        if family.enabled:
            self._offer(record)

    def _model_family(self, record: MetricRecord) -> tuple[Family, tuple[str, ...]] | None:
        dims = dict(record.dimensions)
        spec = self._model_specs.get(record.name) if self._model_specs is not None else None
        if spec is not None:
            if any(name not in dims for name in spec.dimensions):
                self._warn_once(
                    record.name,
                    "handler metric %s dropped: dimensions %s do not match metrics.yaml's %s",
                    record.name,
                    sorted(dims),
                    list(spec.dimensions),
                )
                return None
            names = (*spec.dimensions, "Hostname")
            values = (*(dims[name] for name in spec.dimensions), HOSTNAME)
            kind, unit = spec.kind, spec.unit
        elif self._model_specs is None or self._auto_detect:
            names = (*(k for k, _ in record.dimensions), "Hostname")
            values = (*(v for _, v in record.dimensions), HOSTNAME)
            kind = record.metric_type.lower()
            kind = kind if kind in KINDS else "gauge"
            unit = record.unit
        else:
            # TorchServe's rule: a metric metrics.yaml does not declare is dropped unless
            # model_metrics_auto_detect is on.
            self._warn_once(
                record.name,
                "handler metric %s dropped: not in metrics.yaml "
                "(declare it, or set model_metrics_auto_detect=true)",
                record.name,
            )
            return None
        try:
            family = self.family(record.name, kind, unit, names, origin=MODEL)
        except ConfigError as exc:
            self._warn_once(record.name, "handler metric %s dropped: %s", record.name, exc)
            return None
        return family, values

    def _notify(self, family: Family, labels: tuple[str, ...], value: float) -> None:
        if self.sinks:
            dims = tuple(zip(family.labelnames, labels, strict=True))
            self._offer(MetricRecord(family.name, value, family.unit, dims, family.kind.upper()))

    def _offer(self, record: MetricRecord) -> None:
        for sink in self.sinks:
            try:
                sink.record(record)
            except Exception:
                # A broken sink must not fail the request that updated a metric.
                key = f"sink:{type(sink).__name__}"
                if key not in self._warned:
                    self._warned.add(key)
                    log.exception("metrics sink %s failed; further failures are not logged", key)

    def _warn_once(self, key: str, message: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message, *args)
