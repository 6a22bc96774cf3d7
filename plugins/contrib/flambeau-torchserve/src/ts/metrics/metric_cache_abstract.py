"""``ts.metrics.metric_cache_abstract``: the type of ``context.metrics``, for annotations.

TorchServe's abstract base maps onto flambeau's one concrete cache,
:class:`flambeau.handler.metrics.MetricsCache`.
"""

from __future__ import annotations

from flambeau.handler.metrics import MetricsCache as MetricCacheAbstract

__all__ = ["MetricCacheAbstract"]
