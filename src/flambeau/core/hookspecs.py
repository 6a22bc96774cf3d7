"""The hook specifications of flambeau, in one module.

Every hook runs in the server process while the server is assembled (or, for CLI hooks, while
the command line is parsed), never per request: the request path is a pipeline built once from
what these hooks return. Registration hooks return lists of spec objects from
:mod:`flambeau.api`; the core merges them into named registries and configuration picks
strategies by name. Implementations may take any subset of the declared arguments, so specs
can gain arguments later without breaking plugins. Worker processes rebuild the same plugin
set, so ``flambeau_handlers`` is also called there.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Any

import pluggy

from flambeau.api import (
    PROJECT,
    AllocatorSpec,
    AuthenticatorSpec,
    AuthorizerSpec,
    BatcherSpec,
    CliOption,
    CommandSpec,
    DeviceDiscoverySpec,
    EnvelopeSpec,
    GrpcServiceSpec,
    HandlerSpec,
    ListenerSpec,
    MetricsSinkSpec,
    PreparerSpec,
    RouteSpec,
    WorkerBackendSpec,
)

hookspec = pluggy.HookspecMarker(PROJECT)


@hookspec
def flambeau_cli_options() -> list[CliOption]:
    """Options a plugin adds to ``flambeau start``.

    Runs in the CLI process before arguments are parsed. All results are collected.
    """
    raise NotImplementedError


@hookspec
def flambeau_commands() -> list[CommandSpec]:
    """Sub-commands (``flambeau archive``, ...). Runs in the CLI process; all collected."""
    raise NotImplementedError


@hookspec
def flambeau_configure(config: Any) -> None:
    """Validate or adjust the merged configuration before anything is built.

    Runs once in the server process after config file, CLI and environment are merged.
    Raise :class:`flambeau.api.ConfigError` for a bad value.
    """


@hookspec
def flambeau_routes(config: Any) -> list[RouteSpec]:
    """HTTP routes for the inference, management and metrics listeners; all collected."""
    raise NotImplementedError


@hookspec
def flambeau_listeners(config: Any) -> list[ListenerSpec]:
    """Non-HTTP listeners such as gRPC servers, entered at start-up; all collected."""
    raise NotImplementedError


@hookspec
def flambeau_grpc_services(config: Any) -> list[GrpcServiceSpec]:
    """gRPC services for the gRPC listeners (TorchServe's, KServe v2, ...); all collected.

    Runs once in the server process; the gRPC listener plugin adds them to its servers.
    """
    raise NotImplementedError


@hookspec
def flambeau_authenticators(config: Any) -> list[AuthenticatorSpec]:
    """Authenticators, chosen by the ``authenticator`` config key; all collected."""
    raise NotImplementedError


@hookspec
def flambeau_authorizers(config: Any) -> list[AuthorizerSpec]:
    """Authorizers, chosen by the ``authorizer`` config key; all collected."""
    raise NotImplementedError


@hookspec
def flambeau_batchers(config: Any) -> list[BatcherSpec]:
    """Batching strategies, chosen by ``batching_strategy`` (server) or ``batchingStrategy``
    (model-config); all collected."""
    raise NotImplementedError


@hookspec
def flambeau_envelopes(config: Any) -> list[EnvelopeSpec]:
    """Request envelopes, chosen by ``service_envelope`` or per model; all collected."""
    raise NotImplementedError


@hookspec
def flambeau_device_discovery(config: Any) -> list[DeviceDiscoverySpec]:
    """Device discovery (cpu, cuda); every discovery is run and the devices merged."""
    raise NotImplementedError


@hookspec
def flambeau_allocators(config: Any) -> list[AllocatorSpec]:
    """Device allocators, chosen by the ``device_allocator`` config key; all collected."""
    raise NotImplementedError


@hookspec
def flambeau_worker_backends(config: Any) -> list[WorkerBackendSpec]:
    """Worker backends (``process``, ``thread``), chosen by ``worker_backend`` (server) or
    ``workerBackend`` (model-config); all collected."""
    raise NotImplementedError


@hookspec
def flambeau_metrics_sinks(config: Any) -> list[MetricsSinkSpec]:
    """Metrics sinks, enabled by ``metrics_sinks`` (comma list); all collected."""
    raise NotImplementedError


@hookspec
def flambeau_model_preparers(config: Any) -> list[PreparerSpec]:
    """Steps run at registration before workers start, in plugin order; all collected."""
    raise NotImplementedError


@hookspec
def flambeau_handlers() -> list[HandlerSpec]:
    """Named handlers (``image_classifier`` -> module). Runs in the server and in workers."""
    raise NotImplementedError


@hookspec
def flambeau_lifespan(server: Any) -> AbstractAsyncContextManager[None] | None:
    """An async context manager entered at start-up and exited at shut-down (in reverse order).

    Runs once in the server process after the registries are built and before the listeners
    accept connections. Return None when the plugin has nothing to start.
    """
