"""A third-party plugin for the tests: two gRPC services added through flambeau_grpc_services.

``flambeau.test.Echo`` has a public method and one that needs the inference permission;
``flambeau.test.Nobody`` declares no permission, so it is refused to everybody.
"""

from __future__ import annotations

from typing import Any

from flambeau.api import GrpcServiceSpec, hookimpl


async def _echo(request: bytes, context: Any) -> bytes:
    return b"echo:" + request


def _add(service: str, methods: tuple[str, ...]) -> Any:
    def add_to_server(grpc_server: Any, server: Any) -> None:
        import grpc

        handlers = {name: grpc.unary_unary_rpc_method_handler(_echo) for name in methods}
        grpc_server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, handlers),)
        )

    return add_to_server


@hookimpl
def flambeau_grpc_services(config: Any) -> list[GrpcServiceSpec]:
    return [
        GrpcServiceSpec(
            "test-echo",
            "inference",
            _add("flambeau.test.Echo", ("Public", "Closed")),
            permission="inference",
            public_methods=frozenset({"Public"}),
        ),
        GrpcServiceSpec("test-nobody", "inference", _add("flambeau.test.Nobody", ("Call",))),
    ]
