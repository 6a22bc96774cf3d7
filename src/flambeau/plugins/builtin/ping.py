"""``GET /ping``: TorchServe's health check on the inference listener.

Healthy (200) while every model's default version has at least its minimum number of healthy
workers, else ``{"status": "Unhealthy"}`` with 500, exactly as TorchServe answers it.
"""

from __future__ import annotations

from typing import Any

from flambeau.api import RouteSpec, hookimpl
from flambeau.web import ApiHandler


class PingHandler(ApiHandler):
    async def get(self) -> None:
        healthy = self.server.models.healthy()
        self.send_json({"status": "Healthy" if healthy else "Unhealthy"}, 200 if healthy else 500)

    post = put = delete = patch = get


@hookimpl
def flambeau_routes(config: Any) -> list[RouteSpec]:
    return [RouteSpec(r"/ping/?", PingHandler, listener="inference", permission="inference")]
