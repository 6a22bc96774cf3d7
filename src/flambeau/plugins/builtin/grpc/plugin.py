"""Hook implementations of the gRPC plugin: two listeners, TorchServe's two services, a command.

``grpc_inference`` and ``grpc_management`` are listeners like any other; TorchServe's services
reach them through ``flambeau_grpc_services``, the same hook a third-party service uses. This
module imports neither grpc nor protobuf (worker processes rebuild the plugin set and import
it); the rest of the package is imported when a listener starts.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from flambeau.api import CommandSpec, GrpcServiceSpec, ListenerSpec, hookimpl

INFERENCE_SERVICE = "org.pytorch.serve.grpc.inference.InferenceAPIsService"
MANAGEMENT_SERVICE = "org.pytorch.serve.grpc.management.ManagementAPIsService"


def _listener(listener: str) -> Callable[[Any], AbstractAsyncContextManager[str]]:
    def start(server: Any) -> AbstractAsyncContextManager[str]:
        from flambeau.plugins.builtin.grpc.listener import serve

        return serve(server, listener)

    return start


def _add_inference(grpc_server: Any, server: Any) -> None:
    from flambeau.plugins.builtin.grpc.inference import add_inference_service

    add_inference_service(grpc_server, server)


def _add_management(grpc_server: Any, server: Any) -> None:
    from flambeau.plugins.builtin.grpc.management import add_management_service

    add_management_service(grpc_server, server)


def _stubs_main(argv: list[str]) -> int:
    from flambeau.plugins.builtin.grpc.stubs import main

    return main(argv)


@hookimpl
def flambeau_listeners(config: Any) -> list[ListenerSpec]:
    return [
        ListenerSpec("grpc_inference", _listener("inference")),
        ListenerSpec("grpc_management", _listener("management")),
    ]


@hookimpl
def flambeau_grpc_services(config: Any) -> list[GrpcServiceSpec]:
    return [
        GrpcServiceSpec(INFERENCE_SERVICE, "inference", _add_inference, permission="inference"),
        GrpcServiceSpec(MANAGEMENT_SERVICE, "management", _add_management, permission="management"),
    ]


@hookimpl
def flambeau_commands() -> list[CommandSpec]:
    return [
        CommandSpec(
            "grpc-stubs",
            "write Python client stubs for the TorchServe gRPC APIs (needs grpcio-tools)",
            _stubs_main,
        )
    ]
