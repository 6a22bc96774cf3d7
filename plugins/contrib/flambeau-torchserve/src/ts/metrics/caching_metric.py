"""``ts.metrics.caching_metric``: the metric object ``add_metric_to_cache`` returns.

Its ``add_or_update(value, dimension_values, request_id)`` and ``update(...)`` are TorchServe's.
"""

from __future__ import annotations

from flambeau.handler.metrics import CachingMetric

__all__ = ["CachingMetric"]
