"""The metrics plugin's hooks: the metrics API routes, the ``log`` sink, and a lifespan that
applies metrics.yaml and runs the system metrics collector.

Load it with ``-p flambeau.plugins.builtin.metrics.plugin`` until the entry point
``metrics = "flambeau.plugins.builtin.metrics.plugin"`` is registered. The metrics routes are
on the metrics listener with the ``metrics`` permission, which the token authenticator grants
to every caller there (TorchServe applies no token to its metrics API).
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Any

from flambeau.api import MetricsSinkSpec, RouteSpec, hookimpl
from flambeau.plugins.builtin.metrics.log_sink import LogSink
from flambeau.plugins.builtin.metrics.prometheus import (
    MetricsDescriptionHandler,
    MetricsHandler,
    MetricsRootHandler,
)
from flambeau.plugins.builtin.metrics.settings import MetricsMode, apply_settings, load_settings
from flambeau.plugins.builtin.metrics.system import SystemMetricsCollector


@hookimpl
def flambeau_configure(config: Any) -> None:
    # A bad metrics_mode or metrics.yaml stops the start-up before any port is bound.
    load_settings(config)


@hookimpl
def flambeau_routes(config: Any) -> list[RouteSpec]:
    mode = MetricsMode.from_config(config)
    return [
        # Any path whose first segment is "metrics", any method (TorchServe's routing).
        RouteSpec(
            r"/metrics(?:/.*)?",
            MetricsHandler,
            listener="metrics",
            permission="metrics",
            kwargs={"mode": mode},
        ),
        RouteSpec(
            r"/api-description/?", MetricsDescriptionHandler, listener="metrics", public=True
        ),
        RouteSpec(r"/", MetricsRootHandler, listener="metrics", public=True),
    ]


@hookimpl
def flambeau_metrics_sinks(config: Any) -> list[MetricsSinkSpec]:
    return [MetricsSinkSpec("log", LogSink)]


@hookimpl
def flambeau_lifespan(server: Any) -> AbstractAsyncContextManager[None] | None:
    # Applied here, while the server is assembled and before the first request is read.
    apply_settings(server.metrics, load_settings(server.config))
    if server.config.get_bool("disable_system_metrics"):
        return None
    return SystemMetricsCollector.from_config(server.metrics, server.config).running()
