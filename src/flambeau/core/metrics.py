"""The server's metric families, kept in memory and fed to sink plugins.

The core only counts: a family is a counter, gauge or histogram with fixed label names, and
every update is also offered to the enabled metrics sinks (the Prometheus endpoint renders the
families; the log sink writes TorchServe's metric log lines). Updates are plain dict operations,
cheap enough for the request path.
"""

from __future__ import annotations

import bisect
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from flambeau.api import MetricRecord, MetricsSink

DEFAULT_BUCKETS = (0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
HOSTNAME = socket.gethostname()


@dataclass(slots=True)
class Family:
    """One metric family; ``values`` maps a tuple of label values to a number or histogram."""

    name: str
    kind: str  # counter | gauge | histogram
    unit: str
    labelnames: tuple[str, ...]
    help: str = ""
    buckets: tuple[float, ...] = DEFAULT_BUCKETS
    values: dict[tuple[str, ...], Any] = field(default_factory=dict)

    def inc(self, labels: tuple[str, ...], amount: float = 1.0) -> None:
        self.values[labels] = self.values.get(labels, 0.0) + amount

    def set(self, labels: tuple[str, ...], value: float) -> None:
        self.values[labels] = float(value)

    def observe(self, labels: tuple[str, ...], value: float) -> None:
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
        self.started = time.time()

    def family(
        self,
        name: str,
        kind: str,
        unit: str,
        labelnames: Sequence[str],
        help: str = "",
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> Family:
        found = self.families.get(name)
        if found is None:
            found = Family(name, kind, unit, tuple(labelnames), help, tuple(buckets))
            self.families[name] = found
        return found

    def record(self, record: MetricRecord) -> None:
        """A handler (backend) metric: stored as a family keyed by its dimensions."""
        names = tuple(k for k, _ in record.dimensions) + ("Hostname",)
        labels = tuple(v for _, v in record.dimensions) + (HOSTNAME,)
        kind = {"COUNTER": "counter", "GAUGE": "gauge", "HISTOGRAM": "histogram"}.get(
            record.metric_type.upper(), "gauge"
        )
        family = self.family(record.name, kind, record.unit, names)
        if family.labelnames == names:
            if kind == "counter":
                family.inc(labels, record.value)
            elif kind == "histogram":
                family.observe(labels, record.value)
            else:
                family.set(labels, record.value)
        for sink in self.sinks:
            sink.record(record)

    def emit(self, name: str, value: float, unit: str, dims: tuple[tuple[str, str], ...], kind: str) -> None:
        """Tell the sinks about a frontend metric update (the families are updated by callers)."""
        if self.sinks:
            record = MetricRecord(name, value, unit, dims, kind)
            for sink in self.sinks:
                sink.record(record)
