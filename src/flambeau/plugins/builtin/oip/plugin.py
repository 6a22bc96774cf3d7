"""Registers the Open Inference Protocol: the ``/v2`` REST routes and, when the protocol is
enabled (``ts_open_inference_protocol=true`` or env ``TS_OPEN_INFERENCE_PROTOCOL=oip``),
``GRPCInferenceService`` on the inference gRPC listener under both packages."""

from __future__ import annotations

from typing import Any

from flambeau.api import GrpcServiceSpec, RouteSpec, hookimpl
from flambeau.plugins.builtin.oip.common import oip_enabled


@hookimpl
def flambeau_routes(config: Any) -> list[RouteSpec]:
    from flambeau.plugins.builtin.oip.rest import routes

    return routes(config)


@hookimpl
def flambeau_grpc_services(config: Any) -> list[GrpcServiceSpec]:
    if not oip_enabled(config):
        return []
    from flambeau.plugins.builtin.oip.grpc_service import grpc_services

    return grpc_services()
