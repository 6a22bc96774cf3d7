"""The public plugin surface of flambeau.

Builtin and third-party plugins import this module (and :mod:`flambeau.web` for HTTP routes),
never :mod:`flambeau.core`. It holds the ``hookimpl`` marker, the frozen spec objects that
registration hooks return, the strategy Protocols the core calls, the values that cross the
worker boundary, and the error hierarchy. Example plugin module::

    from flambeau.api import hookimpl, RouteSpec

    @hookimpl
    def flambeau_routes(config):
        return [RouteSpec("/hello", HelloHandler, listener="inference", permission="inference")]

Nothing here imports torch, tornado or grpc.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import pluggy

from flambeau.errors import (
    BadRequestError,
    ConfigError,
    ConflictError,
    FlambeauError,
    ForbiddenError,
    InternalServerError,
    InvalidKeyError,
    MethodNotAllowedError,
    ModelNotFoundError,
    ModelVersionNotFoundError,
    NotFoundError,
    PayloadTooLargeError,
    PluginError,
    RequestTimeoutError,
    ServiceUnavailableError,
)

__all__ = [
    "ENVELOPE_ROW_HEADER",
    "PROJECT",
    "AllocatorSpec",
    "AuthenticatorSpec",
    "AuthorizerSpec",
    "BadRequestError",
    "BatchResult",
    "BatcherSpec",
    "CliOption",
    "CommandSpec",
    "ConfigError",
    "ConflictError",
    "Decoded",
    "Device",
    "DeviceDiscoverySpec",
    "Envelope",
    "EnvelopeSpec",
    "FlambeauError",
    "ForbiddenError",
    "GrpcServiceSpec",
    "HandlerSpec",
    "Identity",
    "InternalServerError",
    "InvalidKeyError",
    "ListenerSpec",
    "MethodNotAllowedError",
    "MetricRecord",
    "MetricsSinkSpec",
    "ModelLoadSpec",
    "ModelNotFoundError",
    "ModelRef",
    "ModelVersionNotFoundError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PluginError",
    "PreparerSpec",
    "RegisterParams",
    "RequestInput",
    "RequestTimeoutError",
    "RouteSpec",
    "ServiceUnavailableError",
    "WorkerBackendSpec",
    "WorkerRequest",
    "WorkerResponse",
    "WorkerSpec",
    "hookimpl",
    "line_writer",
]

PROJECT = "flambeau"
hookimpl = pluggy.HookimplMarker(PROJECT)

# --------------------------------------------------------------------------------------------
# Values that cross the worker boundary (encoded in binary frames by the process backend).
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class RequestInput:
    """One named input of a request: a form field, a file part, or the whole ``body``."""

    name: str
    value: bytes
    content_type: str = ""


@dataclass(slots=True)
class WorkerRequest:
    """One client request as a worker sees it; a batch is a list of these."""

    request_id: str
    headers: dict[str, str] = field(default_factory=dict)
    inputs: list[RequestInput] = field(default_factory=list)


@dataclass(slots=True)
class WorkerResponse:
    """One request's answer from a handler. ``stream_next`` marks an intermediate chunk."""

    request_id: str
    status: int = 200
    reason: str = ""
    content_type: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    stream_next: bool = False


@dataclass(frozen=True, slots=True)
class MetricRecord:
    """A metric a handler emitted (``context.metrics``), carried back to the server's sinks."""

    name: str
    value: float
    unit: str
    dimensions: tuple[tuple[str, str], ...]
    metric_type: str = "COUNTER"  # COUNTER | GAUGE | HISTOGRAM
    request_id: str | None = None


@dataclass(slots=True)
class BatchResult:
    """What a worker returns for a batch: a batch-level code, then one response per request.

    A non-200 ``code`` fails every request of the batch with ``code``/``message`` (TorchServe's
    semantics for handler exceptions); ``responses`` is then empty.
    """

    code: int = 200
    message: str = ""
    responses: list[WorkerResponse] = field(default_factory=list)
    metrics: list[MetricRecord] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ModelLoadSpec:
    """Everything a worker needs to load one model version (TorchServe's load frame, widened)."""

    model_name: str
    model_version: str
    model_dir: str
    handler: str
    batch_size: int = 1
    gpu_id: int | None = None
    envelope: str = ""
    limit_max_image_pixels: bool = True
    manifest: Mapping[str, Any] = field(default_factory=dict)
    model_yaml_config: Mapping[str, Any] = field(default_factory=dict)
    server_version: str = ""
    intra_op_threads: int = 0  # 0 = leave torch's default
    max_gpu_memory_mb: int = 0  # seed 002's system.maxGPUMemory; 0 = no limit
    decode_input_request: bool = True
    # Named handlers from plugins (``flambeau_handlers``): name -> ``module[:attr]``.
    handler_registry: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What a worker backend needs to start one worker."""

    worker_id: str
    load: ModelLoadSpec
    device: str = "cpu"  # "cpu" or "cuda:N"
    python: str = ""  # interpreter for process workers; "" = the server's own
    env: Mapping[str, str] = field(default_factory=dict)
    cpu_affinity: tuple[int, ...] = ()
    log_dir: str = "logs"
    startup_timeout_s: float = 120.0
    max_response_bytes: int = 6553500


@dataclass(frozen=True, slots=True)
class RegisterParams:
    """What a register call (REST query, JSON body or gRPC) asked for; None = not given."""

    url: str = ""
    model_name: str | None = None
    handler: str | None = None
    runtime: str | None = None
    batch_size: int | None = None
    max_batch_delay: int | None = None
    initial_workers: int | None = None
    synchronous: bool = True
    response_timeout: int | None = None
    startup_timeout: int | None = None
    loaded_at_startup: bool = False


# --------------------------------------------------------------------------------------------
# Strategy protocols: implemented by plugins, called by the core.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is calling, as an authenticator established it."""

    name: str
    roles: frozenset[str] = frozenset()
    attributes: Mapping[str, Any] = field(default_factory=dict)


class Authenticator(Protocol):
    """Turns request credentials into an :class:`Identity`.

    Returns None when the request carries no credentials it understands; raises a
    :class:`FlambeauError` (e.g. :class:`InvalidKeyError`) for credentials that are wrong.
    """

    def authenticate(
        self, listener: str, headers: Mapping[str, str], path: str
    ) -> Identity | None: ...


class Authorizer(Protocol):
    """Decides whether ``identity`` holds ``permission`` (on ``resource``, e.g. a model name)."""

    def authorize(
        self, identity: Identity | None, permission: str, resource: str | None
    ) -> bool: ...


class Job(Protocol):
    """A queued request as a batching strategy sees it."""

    enqueued_at: float

    def is_cancelled(self) -> bool: ...


class JobQueue(Protocol):
    """The bounded FIFO of one model version (a core primitive), as strategies see it."""

    def __len__(self) -> int: ...

    def pop_nowait(self) -> Job | None: ...

    def requeue(self, jobs: Sequence[Job]) -> None:
        """Put popped jobs back at the front, in order (a strategy cancelled mid-batch)."""

    async def wait_nonempty(self, timeout: float | None) -> bool: ...

    def now(self) -> float: ...


class Batcher(Protocol):
    """A batching strategy: forms the next batch for an idle worker of one model version.

    ``next_batch`` must be cancellation-safe: if cancelled after popping jobs, it hands them
    back with ``queue.requeue(jobs)`` before re-raising, so that scaling down loses nothing.
    """

    async def next_batch(self, queue: JobQueue, max_size: int, max_delay_s: float) -> list[Job]: ...


class Worker(Protocol):
    """One running instance of a model: a process, a thread, or anything a backend provides."""

    worker_id: str
    device: str

    @property
    def pid(self) -> int | None: ...

    async def start(self) -> None: ...

    async def infer(
        self,
        requests: Sequence[WorkerRequest],
        on_partial: Callable[[list[WorkerResponse]], None] | None = None,
    ) -> BatchResult: ...

    async def stop(self, timeout_s: float = 10.0) -> None: ...

    def is_alive(self) -> bool: ...

    def memory_usage(self) -> int: ...


class WorkerBackend(Protocol):
    """Creates workers; ``process`` and ``thread`` are the builtin ones."""

    def create_worker(self, spec: WorkerSpec) -> Worker: ...


@dataclass(frozen=True, slots=True)
class Device:
    """A device a worker can run on, as a discovery plugin reports it."""

    kind: str  # "cpu" | "cuda"
    index: int = 0
    total_memory_mb: int = 0
    free_memory_mb: int = 0
    cores: tuple[int, ...] = ()
    numa_node: int | None = None

    @property
    def name(self) -> str:
        return "cpu" if self.kind == "cpu" else f"{self.kind}:{self.index}"


class Allocator(Protocol):
    """Chooses the device for the next worker of a model; raises FlambeauError when none fits."""

    def allocate(
        self, devices: Sequence[Device], model: str, config: Mapping[str, Any]
    ) -> Device: ...

    def release(self, device: Device, model: str) -> None: ...


ENVELOPE_ROW_HEADER = "flambeau_envelope"
"""Header an envelope sets on every row it decodes (value: the envelope's name): the worker is
to give the handler the decoded value of the row's single input as its ``data`` row, as
TorchServe's envelopes do, instead of a ``{input_name: value}`` dict."""


@dataclass(frozen=True, slots=True)
class ModelRef:
    """The model version a request is served by, as an envelope needs to name it."""

    name: str
    version: str


@dataclass(frozen=True, slots=True)
class Decoded:
    """One client request after :meth:`Envelope.decode`: the rows for the handler.

    Each row is queued as a request of its own (so the batcher may put the rows of several
    clients into one handler call, and every one is served); ``state`` is whatever the
    envelope needs again in :meth:`Envelope.encode` (opaque to the core).
    """

    request: WorkerRequest
    model: ModelRef
    rows: tuple[WorkerRequest, ...]
    state: Any = None


class Envelope(Protocol):
    """Translates one protocol's wire shape (Vertex, KServe v1/v2, Seldon) to a handler's.

    Runs in the server process, around the batch queue: ``decode`` turns one client request
    into the handler's rows (one per instance or input tensor, each carrying
    :data:`ENVELOPE_ROW_HEADER`), ``encode`` turns those rows' responses (same order) into the
    one answer, and ``render_error`` renders any :class:`FlambeauError` in the protocol's own
    error shape as ``(status, content type, body)``. ``decode`` raises
    :class:`BadRequestError` for a malformed payload; nothing is queued then.
    """

    def decode(self, request: WorkerRequest, model: ModelRef) -> Decoded: ...

    def encode(self, decoded: Decoded, responses: Sequence[WorkerResponse]) -> WorkerResponse: ...

    def render_error(self, error: FlambeauError) -> tuple[int, str, bytes]: ...


class MetricsSink(Protocol):
    """Receives metric updates (frontend and handler metrics) as they happen."""

    def record(self, record: MetricRecord) -> None: ...


# --------------------------------------------------------------------------------------------
# Spec objects returned by registration hooks.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RouteSpec:
    """An HTTP route on one listener.

    ``handler`` is a subclass of :class:`flambeau.web.ApiHandler`. A route is closed to
    unauthenticated callers unless ``public``; ``permission`` names what the authorizer checks
    (``inference``, ``management``, ``metrics`` or a plugin's own); a non-public route without
    one is refused to everybody.
    """

    pattern: str
    handler: type[Any]
    listener: str = "inference"  # "inference" | "management" | "metrics"
    permission: str | None = None
    public: bool = False
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    name: str | None = None


@dataclass(frozen=True, slots=True)
class ListenerSpec:
    """A non-HTTP listener (gRPC): an async context manager factory entered at start-up."""

    name: str
    start: Callable[[Any], AbstractAsyncContextManager[Any]]


@dataclass(frozen=True, slots=True)
class GrpcServiceSpec:
    """A gRPC service added to one of the gRPC listeners (``inference`` or ``management``).

    ``add_to_server(grpc_server, flambeau_server)`` registers the servicer on the
    ``grpc.aio.Server`` the gRPC listener plugin builds; ``permission`` is what the authorizer
    checks for every rpc of the service (None = refused to everybody, as for routes).
    """

    name: str
    listener: str
    add_to_server: Callable[[Any, Any], None]
    permission: str | None = None
    public_methods: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class AuthenticatorSpec:
    name: str
    factory: Callable[[Any], Authenticator]


@dataclass(frozen=True, slots=True)
class AuthorizerSpec:
    name: str
    factory: Callable[[Any], Authorizer]


@dataclass(frozen=True, slots=True)
class BatcherSpec:
    name: str
    factory: Callable[[], Batcher]
    description: str = ""


@dataclass(frozen=True, slots=True)
class EnvelopeSpec:
    name: str
    factory: Callable[[], Envelope]


@dataclass(frozen=True, slots=True)
class DeviceDiscoverySpec:
    """Finds the devices of one kind; ``usage`` (optional) reports the live usage of some of
    them as describe shows it (``gpuUsage``), keyed by device index."""

    name: str
    discover: Callable[[], Sequence[Device]]
    usage: Callable[[Sequence[int]], Mapping[int, str]] | None = None


@dataclass(frozen=True, slots=True)
class AllocatorSpec:
    name: str
    factory: Callable[[], Allocator]


@dataclass(frozen=True, slots=True)
class WorkerBackendSpec:
    name: str
    factory: Callable[[Any], WorkerBackend]


@dataclass(frozen=True, slots=True)
class MetricsSinkSpec:
    name: str
    factory: Callable[[Any], MetricsSink]


@dataclass(frozen=True, slots=True)
class PreparerSpec:
    """Per-model preparation run at registration, before workers start (e.g. requirements).

    ``prepare(server, model_version)`` is awaited; raising a FlambeauError fails the
    registration with that error.
    """

    name: str
    prepare: Callable[[Any, Any], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class HandlerSpec:
    """A named handler (``image_classifier``) and the ``module[:function]`` that implements it."""

    name: str
    target: str


@dataclass(frozen=True, slots=True)
class CliOption:
    """An option a plugin adds to ``flambeau start``; ``config_key`` maps it onto the config."""

    flags: tuple[str, ...]
    help: str
    config_key: str | None = None
    action: str | None = None
    default: Any = None


@dataclass(frozen=True, slots=True)
class CommandSpec:
    """A ``flambeau <name>`` sub-command; ``main`` takes the remaining argv, returns exit code."""

    name: str
    help: str
    main: Callable[[list[str]], int]


@runtime_checkable
class Lifespan(Protocol):
    def __call__(self, server: Any) -> AbstractAsyncContextManager[None]: ...


def line_writer(logger_name: str) -> Callable[[str], None]:
    """A cheap writer of one-line messages to a bare log (``flambeau.access``,
    ``flambeau.metrics.frontend``, ``flambeau.metrics.model``): buffered straight into
    flambeau's own handler, or ``logger.info`` under a user's ``--log-config``. Call it after
    logging is configured (at server assembly), not at import time."""
    from flambeau.core.logs import line_writer as writer

    return writer(logger_name)
