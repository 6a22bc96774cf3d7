"""The plugin module: the hook implementations flambeau calls while it assembles the server.

The entry point ``example = "flambeau_example.plugin"`` names this module. Each hook takes
only the arguments it needs (here ``config``) and returns spec objects; flambeau builds its
registries from them once, so nothing here runs per request.
"""

from __future__ import annotations

from typing import Any

from flambeau.api import BatcherSpec, RouteSpec, hookimpl

#: config.properties key read by the echo route (an example of plugin configuration).
PREFIX_KEY = "example_echo_prefix"


@hookimpl
def flambeau_routes(config: Any) -> list[RouteSpec]:
    """``/example/echo`` on the inference listener, guarded like the inference API."""
    from flambeau_example.echo import EchoHandler

    return [
        RouteSpec(
            r"/example/echo/?",
            EchoHandler,
            listener="inference",
            # The route is closed unless the authorizer grants this permission to the caller:
            # with token authorization on, that means the inference key.
            permission="inference",
            kwargs={"prefix": config.get_str(PREFIX_KEY, "")},
            name="example-echo",
        )
    ]


@hookimpl
def flambeau_batchers() -> list[BatcherSpec]:
    """The ``deadline`` strategy, picked by ``batching_strategy=deadline`` (server) or
    ``batchingStrategy: deadline`` (model-config.yaml)."""
    from flambeau_example.deadline import DeadlineBatcher

    return [
        BatcherSpec(
            "deadline",
            DeadlineBatcher,
            "bound every request's queueing delay by maxBatchDelay from its arrival",
        )
    ]
