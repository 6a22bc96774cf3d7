"""The gRPC listeners: one ``grpc.aio`` server each for inference and management.

:func:`serve` is the ``start`` of the ``grpc_inference`` / ``grpc_management`` listener specs.
It builds a ``grpc.aio.server`` on the server's running asyncio loop, adds every service that
``flambeau_grpc_services`` gave for its listener, binds ``grpc_<listener>_address`` and
``grpc_<listener>_port`` (port 0 picks a free one), with TLS when ``enable_grpc_ssl`` is on, and
yields the bound address (``127.0.0.1:43121``) for the ready file. Message sizes come from
``max_request_size`` / ``max_response_size`` instead of gRPC's 4 MB default. Leaving the context
stops accepting calls and lets in-flight ones finish for up to ``drain_timeout`` seconds.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from flambeau.api import ConfigError, GrpcServiceSpec
from flambeau.plugins.builtin.grpc.auth import SecurityInterceptor

log = logging.getLogger("flambeau.grpc")

LISTENERS = ("inference", "management")
DEFAULT_PORTS = {"inference": 7070, "management": 7071}


@dataclass(frozen=True, slots=True)
class GrpcListenerSettings:
    """What one gRPC listener is configured with (wire spec §9.2's ``grpc_*`` keys)."""

    listener: str
    host: str
    port: int
    max_receive_bytes: int
    max_send_bytes: int
    max_connection_age_ms: int | None = None
    max_connection_age_grace_ms: int | None = None
    tls: bool = False
    certificate_file: str = ""
    private_key_file: str = ""
    grace_s: float = 30.0

    @classmethod
    def from_config(cls, config: Any, listener: str) -> GrpcListenerSettings:
        prefix = f"grpc_{listener}"

        def optional_ms(key: str) -> int | None:
            value = config.get_int(key, -1)
            return value if value >= 0 else None

        return cls(
            listener=listener,
            host=config.get_str(f"{prefix}_address", "127.0.0.1").strip() or "127.0.0.1",
            port=config.get_int(f"{prefix}_port", DEFAULT_PORTS.get(listener, 0)),
            max_receive_bytes=config.get_int("max_request_size", 6553500),
            max_send_bytes=config.get_int("max_response_size", 6553500),
            max_connection_age_ms=optional_ms(f"{prefix}_max_connection_age_ms"),
            max_connection_age_grace_ms=optional_ms(f"{prefix}_max_connection_age_grace_ms"),
            tls=config.get_bool("enable_grpc_ssl"),
            certificate_file=config.get_str("certificate_file"),
            private_key_file=config.get_str("private_key_file"),
            grace_s=config.get_float("drain_timeout", 30),
        )

    @property
    def target(self) -> str:
        """What grpc binds: ``host:port``, ``[v6]:port``, or a ``unix:`` path as given."""
        if self.host.startswith("unix:"):
            return self.host
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{host}:{self.port}"

    def options(self) -> list[tuple[str, Any]]:
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", self.max_receive_bytes),
            ("grpc.max_send_message_length", self.max_send_bytes),
            # grpc turns SO_REUSEPORT on by default: a second server on a busy port would then
            # silently share it (and its calls) instead of failing to start.
            ("grpc.so_reuseport", 0),
        ]
        if self.max_connection_age_ms is not None:
            options.append(("grpc.max_connection_age_ms", self.max_connection_age_ms))
        if self.max_connection_age_grace_ms is not None:
            options.append(("grpc.max_connection_age_grace_ms", self.max_connection_age_grace_ms))
        return options

    def credentials(self) -> Any:
        """Server TLS credentials from the PEM files; ConfigError when they cannot be read."""
        if not self.certificate_file or not self.private_key_file:
            raise ConfigError("enable_grpc_ssl needs certificate_file and private_key_file")
        try:
            key = Path(self.private_key_file).read_bytes()
            chain = Path(self.certificate_file).read_bytes()
        except OSError as exc:
            raise ConfigError(
                f"enable_grpc_ssl: cannot read {exc.filename}: {exc.strerror}"
            ) from None
        return grpc.ssl_server_credentials([(key, chain)])

    def describe(self, bound_port: int) -> str:
        if self.host.startswith("unix:"):
            return self.host
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{host}:{bound_port}"


class _ServiceRecorder:
    """Stands in for the grpc server while a spec adds its services, noting their names.

    The generated ``add_*_to_server`` functions call ``add_generic_rpc_handlers`` (and, with
    newer grpcio-tools, ``add_registered_method_handlers``); both name the service, which is
    how the interceptor later finds the spec (listener, permission) of every call.
    """

    def __init__(self, grpc_server: Any, spec: GrpcServiceSpec, table: dict[str, GrpcServiceSpec]):
        self._server = grpc_server
        self._spec = spec
        self._table = table

    def _note(self, service: str | None) -> None:
        if not service:
            log.warning(
                "gRPC service of %s has no name: its calls will be refused", self._spec.name
            )
            return
        other = self._table.get(service)
        if other is not None and other is not self._spec:
            raise ConfigError(
                f"gRPC service {service} is provided twice ({other.name}, {self._spec.name})"
            )
        self._table[service] = self._spec

    def add_generic_rpc_handlers(self, handlers: Iterable[Any]) -> None:
        handlers = tuple(handlers)
        for handler in handlers:
            service_name = getattr(handler, "service_name", None)
            self._note(service_name() if callable(service_name) else None)
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service: str, handlers: Any) -> None:
        self._note(service)
        self._server.add_registered_method_handlers(service, handlers)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)


def build_server(server: Any, settings: GrpcListenerSettings) -> tuple[Any, list[str]]:
    """A ``grpc.aio`` server with this listener's services; returns it and their names."""
    table: dict[str, GrpcServiceSpec] = {}
    grpc_server = grpc.aio.server(
        interceptors=[SecurityInterceptor(server.security, table)],
        options=settings.options(),
    )
    for spec in server.hooks.grpc_services(server.config):
        if spec.listener != settings.listener:
            continue
        spec.add_to_server(_ServiceRecorder(grpc_server, spec, table), server)
    return grpc_server, sorted(table)


def bind(grpc_server: Any, settings: GrpcListenerSettings) -> int:
    key = f"grpc_{settings.listener}_port"
    try:
        if settings.tls:
            port = grpc_server.add_secure_port(settings.target, settings.credentials())
        else:
            port = grpc_server.add_insecure_port(settings.target)
    except RuntimeError:
        port = 0
    if not port and not settings.target.startswith("unix:"):
        raise ConfigError(f"{key}: cannot listen on {settings.target}")
    return int(port)


@contextlib.asynccontextmanager
async def serve(server: Any, listener: str) -> AsyncIterator[str]:
    """Run the gRPC server of ``listener`` while the context is open; yields its address."""
    settings = GrpcListenerSettings.from_config(server.config, listener)
    grpc_server, services = build_server(server, settings)
    port = bind(grpc_server, settings)
    await grpc_server.start()
    address = settings.describe(port)
    log.info("gRPC %s listener on %s: %s", listener, address, ", ".join(services) or "no services")
    try:
        yield address
    finally:
        await grpc_server.stop(settings.grace_s)
