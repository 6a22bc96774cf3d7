"""``ts.metrics.metric_type_enum``: COUNTER, GAUGE and HISTOGRAM."""

from __future__ import annotations

from flambeau.handler.metrics import MetricTypes

__all__ = ["MetricTypes"]
