"""``ts.metrics.metric_cache_errors``: the errors the metrics cache can raise.

flambeau logs and drops a bad metric update instead of raising, so handlers that catch these
keep working; they are raised only for misuse such as an unknown metric type.
"""

from __future__ import annotations

from flambeau.handler.metrics import (
    GeneralMetricsCacheError,
    MetricsCacheKeyError,
    MetricsCacheTypeError,
    MetricsCacheValueError,
)

__all__ = [
    "GeneralMetricsCacheError",
    "MetricsCacheKeyError",
    "MetricsCacheTypeError",
    "MetricsCacheValueError",
]
