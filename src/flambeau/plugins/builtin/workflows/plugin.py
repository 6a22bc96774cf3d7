"""The workflows plugin: REST routes, the gRPC service, and a lifespan owning the registry.

Entry point ``workflows = "flambeau.plugins.builtin.workflows.plugin"``. At start-up the
lifespan attaches a :class:`~flambeau.plugins.builtin.workflows.registry.WorkflowManager` as
``server.workflows`` and, unless ``snapshot_enabled=false`` (``--ncs``), registers the
workflows saved in ``{LOG_LOCATION}/config/workflows.json`` again before the server reports
ready, then rewrites that file after every change.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Any

from flambeau.api import GrpcServiceSpec, RouteSpec, hookimpl

log = logging.getLogger("flambeau.workflows")


@hookimpl
def flambeau_routes(config: Any) -> list[RouteSpec]:
    """``/workflows...`` on the management listener, ``/wfpredict/...`` on inference."""
    from flambeau.plugins.builtin.workflows.routes import routes

    return routes()


def _add_grpc_service(grpc_server: Any, flambeau_server: Any) -> None:
    from flambeau.plugins.builtin.workflows.grpc_service import add_to_server

    add_to_server(grpc_server, flambeau_server)


@hookimpl
def flambeau_grpc_services(config: Any) -> list[GrpcServiceSpec]:
    """``flambeau.workflow.WorkflowInferenceService`` on the gRPC inference listener."""
    return [
        GrpcServiceSpec(
            name="workflow",
            listener="inference",
            add_to_server=_add_grpc_service,
            permission="inference",
        )
    ]


@hookimpl
def flambeau_lifespan(server: Any) -> AbstractAsyncContextManager[None]:
    """Create the registry; restore the snapshot; keep the snapshot current."""
    return _lifespan(server)


@contextlib.asynccontextmanager
async def _lifespan(server: Any) -> AsyncIterator[None]:
    from flambeau.plugins.builtin.workflows.registry import WorkflowManager
    from flambeau.plugins.builtin.workflows.snapshot import SnapshotFile, restore_workflows

    manager = WorkflowManager(server)
    server.workflows = manager
    snapshot: SnapshotFile | None = None
    if server.config.get_bool("snapshot_enabled", True):
        snapshot = SnapshotFile(server.log_dir)
        saved = snapshot.read()
        manager.add_listener(lambda: snapshot.write(manager))
        # Node models scaled through the models API change what a restart must restore.
        server.models.add_listener(lambda event: snapshot.write(manager))
        if saved:
            snapshot.paused = True
            try:
                count = await restore_workflows(manager, saved)
            finally:
                snapshot.paused = False
            log.info("restored %d workflow version(s) from %s", count, snapshot.path)
            snapshot.write(manager)
    try:
        yield
    finally:
        # Shutting down unregisters nothing on purpose; the saved state must stay as it is.
        if snapshot is not None:
            snapshot.paused = True
