"""``ts.metrics``: the names handlers use with ``context.metrics`` (dimensions, types, errors).

``context.metrics`` itself is flambeau's :class:`flambeau.handler.metrics.MetricsCache`, which
has TorchServe's ``add_counter`` / ``add_time`` / ``add_size`` / ``add_percent`` /
``add_metric`` / ``add_metric_to_cache`` / ``get_metric`` methods.
"""
