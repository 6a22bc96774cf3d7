"""A third-party flambeau plugin: one route on the inference listener."""

from __future__ import annotations

from typing import Any

from flambeau.api import RouteSpec, hookimpl
from flambeau.web import ApiHandler


class HelloHandler(ApiHandler):
    async def get(self) -> None:
        self.send_json({"hello": "world"})


@hookimpl
def flambeau_routes(config: Any) -> list[RouteSpec]:
    return [RouteSpec("/hello", HelloHandler, listener="inference", permission="inference")]
