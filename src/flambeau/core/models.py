"""The model registry and the transport-agnostic data plane.

:class:`ModelManager` registers, scales, describes, lists and unregisters model versions,
loads the start-up models and queues predictions; REST, gRPC and workflows all call it, with
TorchServe's messages and codes. Plugins observe changes with ``add_listener``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flambeau import __version__
from flambeau.api import (
    BadRequestError,
    ConfigError,
    ConflictError,
    FlambeauError,
    InternalServerError,
    ModelLoadSpec,
    ModelNotFoundError,
    ModelVersionNotFoundError,
    RegisterParams,
    RequestInput,
    RequestTimeoutError,
    ServiceUnavailableError,
    WorkerRequest,
    WorkerResponse,
    WorkerSpec,
)
from flambeau.core.batching import InferenceJob, JobQueue, PartialCallback
from flambeau.core.pool import PoolSettings, WorkerPool
from flambeau.core.settings import ModelSettings, merge_settings
from flambeau.core.sources import default_model_name, resolve_source

log = logging.getLogger("flambeau.models")

VALID_RUNTIMES = ("python", "python3", "LSP")
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-.]*$")


@dataclass(slots=True)
class ModelVersion:
    """One registered version of a model and the machinery serving it."""

    name: str
    version: str
    url: str
    archive: Any  # flambeau.archiver.ModelArchive
    settings: ModelSettings
    handler: str
    runtime: str
    queue: JobQueue
    pool: WorkerPool
    loaded_at_startup: bool = False
    downloaded_path: Path | None = None
    owner: str | None = None  # the plugin that registered it for its own use (workflows)
    created: float = field(default_factory=time.time)
    # Set by a preparer (per-model requirements): the workers' interpreter, "" = the
    # server's, and the directories put in front of the workers' PYTHONPATH.
    python: str = ""
    python_path: tuple[str, ...] = ()

    @property
    def model_dir(self) -> Path:
        return Path(self.archive.model_dir)


ChangeListener = Callable[[str], None]
StartupSource = Callable[["ModelManager"], Awaitable[None]]


def no_worker_message(name: str, version: str | None) -> str:
    """TorchServe's 503 text for "cannot queue" (no worker, full queue); the stray quote after
    the version is TorchServe's own."""
    label = f'"{name}" Version {version}"' if version else f'"{name}"'
    return (
        f"Model {label} has no worker to serve inference request. Please use scale workers API "
        "to add workers. If this is a sequence inference, please check if it is closed, or "
        "expired; or exceeds maxSequenceJobQueueSize"
    )


class ModelManager:
    """Every model version of one server, and the operations the management APIs expose."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.config = server.config
        self.models: dict[str, dict[str, ModelVersion]] = {}
        self.defaults: dict[str, str] = {}
        self._worker_counter = self.config.get_int("initial_worker_port", 9000)
        self._listeners: list[ChangeListener] = []
        self._startup_source: StartupSource | None = None
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.extract_root = Path(server.work_dir) / "models"
        self.extract_root.mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------- plugin surface

    def add_listener(self, listener: ChangeListener) -> None:
        """Called with an event name after every successful change: ``register``, ``scale``,
        ``set-default``, ``unregister``, and ``startup`` once the start-up models are in."""
        self._listeners.append(listener)

    def set_startup_source(self, source: StartupSource) -> None:
        """Let a plugin (snapshots) register the start-up models instead of ``load_models``.

        Call it from a lifespan; ``source(manager)`` is awaited once, before ``startup``.
        """
        self._startup_source = source

    def _changed(self, event: str) -> None:
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:
                log.exception("model change listener failed on %s", event)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---------------------------------------------------------------- lookup

    def get(self, name: str, version: str | None = None) -> ModelVersion:
        versions = self.models.get(name)
        if not versions:
            raise ModelNotFoundError(f"Model not found: {name}")
        if not version:
            return versions[self.defaults[name]]
        found = versions.get(version)
        if found is None:
            raise ModelVersionNotFoundError(
                f"Model version: {version} does not exist for model: {name}"
            )
        return found

    def versions_of(self, name: str) -> list[ModelVersion]:
        self.get(name)
        return list(self.models[name].values())

    def default_versions(self) -> list[ModelVersion]:
        return [self.models[name][v] for name, v in sorted(self.defaults.items())]

    def all_versions(self) -> list[ModelVersion]:
        return [mv for versions in self.models.values() for mv in versions.values()]

    def is_default(self, mv: ModelVersion) -> bool:
        return self.defaults.get(mv.name) == mv.version

    # ---------------------------------------------------------------- register

    async def register(
        self,
        params: RegisterParams,
        *,
        overrides: Mapping[str, int] | None = None,
        owner: str | None = None,
    ) -> tuple[int, str]:
        """Register a model version; returns (HTTP status, status message).

        ``overrides`` pins settings after the usual merge (a restored snapshot's values).
        ``owner`` marks a version a plugin registers for its own use and saves itself (a
        workflow's node models): the model snapshot leaves it out, as TorchServe does.
        """
        if params.runtime is not None and params.runtime not in VALID_RUNTIMES:
            raise BadRequestError(f"Invalid RuntimeType value: {params.runtime}")
        source = await resolve_source(
            params.url,
            model_store=self.config.model_store,
            allowed_urls=self.config.get_list("allowed_urls"),
            max_download_bytes=self.config.get_int("max_download_size", 2**34),
        )
        downloaded = source.path if source.downloaded else None
        try:
            archive = await asyncio.to_thread(self._open_archive, source.path, params.handler)
        except BaseException:
            if downloaded is not None:
                downloaded.unlink(missing_ok=True)
            raise
        try:
            mv = await self._add_version(params, overrides, source.url, archive, downloaded)
            mv.owner = owner
        except BaseException:
            self._discard(archive, downloaded)
            raise
        try:
            await self.server.prepare_environment(mv)
        except BaseException:
            await self._remove(mv)
            raise
        name, version, workers = mv.name, mv.version, mv.settings.min_workers
        if workers <= 0:
            self._changed("register")
            return 200, (
                f'Model "{name}" Version: {version} registered with 0 initial workers. '
                "Use scale workers API to add workers for the model."
            )
        if not params.synchronous:
            self._spawn(mv.pool.scale(workers, wait=True))
            self._changed("register")
            return 202, "Processing worker updates..."
        if not await mv.pool.scale(workers, wait=True):
            await self._remove(mv)
            raise InternalServerError(
                f"Failed to start workers for model {name} version: {version}"
            )
        self._changed("register")
        return 200, f'Model "{name}" Version: {version} registered with {workers} initial workers'

    async def _add_version(
        self,
        params: RegisterParams,
        overrides: Mapping[str, int] | None,
        url: str,
        archive: Any,
        downloaded: Path | None,
    ) -> ModelVersion:
        manifest = archive.manifest
        name = params.model_name or manifest.model_name or default_model_name(archive.source)
        if not MODEL_NAME.match(name):
            raise FlambeauError(
                f"Model name is not valid: {name}", status=400, error_type="InvalidModelException"
            )
        version = manifest.model_version or "1.0"
        runtime = params.runtime or manifest.runtime or "python"
        handler = (
            params.handler or manifest.handler or self.config.get_str("default_service_handler")
        )
        if not handler:
            raise FlambeauError(
                f"Model {name} has no handler", status=400, error_type="InvalidModelException"
            )
        async with self._lock:
            if version in self.models.get(name, {}):
                raise ConflictError(
                    f"Model version {version} is already registered for model {name}"
                )
            startup = params.loaded_at_startup
            settings = merge_settings(
                config=self.config,
                model=name,
                version=version,
                yaml_config=archive.model_config,
                params=params,
                default_workers=(
                    self.server.startup_workers()
                    if startup
                    else self.config.get_int("default_workers_per_model", 0)
                ),
            )
            if overrides:
                settings = settings.with_overrides(overrides)
            try:
                mv = self._build_version(name, version, url, archive, settings, handler, runtime)
            except ConfigError as exc:
                # An unknown batchingStrategy / workerBackend in the model-config.
                raise BadRequestError(f"Model {name}: {exc}") from None
            mv.loaded_at_startup = startup
            mv.downloaded_path = downloaded
            self.models.setdefault(name, {})[version] = mv
            self.defaults.setdefault(name, version)
        return mv

    def _open_archive(self, path: Path, handler: str | None) -> Any:
        from flambeau.archiver import ArchiveError, open_model_archive

        try:
            return open_model_archive(path, self.extract_root, handler=handler)
        except ArchiveError as exc:
            raise FlambeauError(str(exc), status=400, error_type="InvalidModelException") from exc

    @staticmethod
    def _discard(archive: Any, downloaded: Path | None) -> None:
        archive.cleanup()
        if downloaded is not None:
            downloaded.unlink(missing_ok=True)

    def _build_version(
        self,
        name: str,
        version: str,
        url: str,
        archive: Any,
        settings: ModelSettings,
        handler: str,
        runtime: str,
    ) -> ModelVersion:
        server = self.server
        queue = JobQueue(settings.job_queue_size, name=name)
        pool_settings = PoolSettings(
            batch_size=settings.batch_size,
            max_batch_delay_s=settings.max_batch_delay_ms / 1000.0,
            response_timeout_s=float(settings.response_timeout_s),
            startup_timeout_s=float(settings.startup_timeout_s),
            max_retry_timeout_s=float(settings.max_retry_timeout_s),
        )
        mv_ref: list[ModelVersion] = []

        def make_spec(worker_id: str) -> WorkerSpec:
            return server.worker_spec(mv_ref[0], worker_id)

        pool = WorkerPool(
            name=f"{name}_{version}",
            queue=queue,
            backend=server.worker_backend(settings.worker_backend),
            batcher=server.batcher(settings.batching_strategy),
            settings=pool_settings,
            make_spec=make_spec,
            next_worker_id=self._next_worker_id,
            on_metrics=server.record_handler_metrics,
            on_batch=lambda size, queued, took: server.observe_batch(
                name, version, size, queued, took
            ),
            release=server.release_device,
            device_usage=lambda indices: server.device_usage("cuda", indices),
        )
        mv = ModelVersion(name, version, url, archive, settings, handler, runtime, queue, pool)
        mv_ref.append(mv)
        return mv

    def _next_worker_id(self) -> str:
        worker_id = str(self._worker_counter)
        self._worker_counter += 1
        return worker_id

    def load_spec(self, mv: ModelVersion, gpu_id: int | None, threads: int) -> ModelLoadSpec:
        """The load frame of one worker of ``mv`` (``threads``: its share of the CPUs)."""
        return ModelLoadSpec(
            model_name=mv.name,
            model_version=mv.version,
            model_dir=str(mv.model_dir),
            handler=mv.handler,
            batch_size=mv.settings.batch_size,
            gpu_id=gpu_id,
            envelope=mv.settings.envelope or self.config.get_str("service_envelope"),
            limit_max_image_pixels=self.config.get_bool("limit_max_image_pixels", True),
            manifest=dict(mv.archive.manifest.raw),
            model_yaml_config=dict(mv.archive.model_config),
            server_version=__version__,
            # Only an explicit intraOpThreads: the server's share (``threads``) already reaches
            # the worker as OMP_NUM_THREADS, which torch follows, and setting it here would
            # make every worker import torch, ~2 s per start for handlers that never use it.
            intra_op_threads=mv.settings.intra_op_threads,
            max_gpu_memory_mb=mv.settings.max_gpu_memory_mb,
            decode_input_request=self.config.get_bool("decode_input_request", True),
            handler_registry=dict(self.server.handler_names),
        )

    # ---------------------------------------------------------------- start-up models

    async def load_startup_models(self, entries: Sequence[tuple[str | None, str]]) -> None:
        """Register the start-up models, ``(name or None, location)`` pairs from
        ``load_models``, unless a plugin supplied a source; then tell the listeners
        ``startup``. A model that fails is logged and the others still load."""
        try:
            if self._startup_source is not None:
                if entries:
                    log.info("load_models is ignored: the start-up models come from a plugin")
                await self._startup_source(self)
                return
            await asyncio.gather(
                *(
                    self.register_logged(
                        RegisterParams(url=location, model_name=name, loaded_at_startup=True)
                    )
                    for name, location in entries
                )
            )
        finally:
            self._changed("startup")

    async def register_logged(
        self, params: RegisterParams, *, overrides: Mapping[str, int] | None = None
    ) -> bool:
        """:meth:`register` for start-up: errors are logged, not raised."""
        try:
            _, message = await self.register(params, overrides=overrides)
        except Exception as exc:
            log.error("failed to load %s at start-up: %s", params.url, getattr(exc, "message", exc))
            return False
        log.info("%s", message)
        return True

    # ---------------------------------------------------------------- scale / default / remove

    async def scale(
        self, name: str, version: str | None, min_workers: int, max_workers: int, synchronous: bool
    ) -> tuple[int, str]:
        mv = self.get(name, version)
        if max_workers < min_workers:
            raise BadRequestError("max_worker cannot be less than min_worker.")
        if min_workers < 0:
            # TorchServe answers 500 (an index error); see docs/compatibility.md.
            raise BadRequestError("min_worker cannot be negative.")
        mv.settings = mv.settings.with_workers(min_workers, max_workers)
        self._changed("scale")
        if not synchronous:
            self._spawn(mv.pool.scale(min_workers, wait=True))
            return 202, "Processing worker updates..."
        if not await mv.pool.scale(min_workers, wait=True):
            return 206, "Workers scaling in progress..."
        suffix = f", version: {version}" if version else ""
        return 200, f"Workers scaled to {min_workers} for model: {name}{suffix}"

    def set_default(self, name: str, version: str) -> str:
        versions = self.models.get(name)
        if not versions:
            raise ModelNotFoundError(f"Model not found: {name}")
        if version not in versions:
            raise ModelVersionNotFoundError(
                f"Model version {version} does not exist for model {name}"
            )
        self.defaults[name] = version
        self._changed("set-default")
        return f'Default version successfully updated for model "{name}" to "{version}"'

    async def unregister(self, name: str, version: str | None) -> str:
        mv = self.get(name, version)
        if self.is_default(mv) and len(self.models[name]) > 1:
            raise FlambeauError(
                f"Cannot remove default version for model {name}",
                status=403,
                error_type="InvalidModelVersionException",
            )
        timeout = self.config.get_float("unregister_model_timeout", 120)
        started = time.monotonic()
        await self._remove(mv, timeout)
        self._changed("unregister")
        if time.monotonic() - started >= timeout:
            raise RequestTimeoutError(f"Timed out while cleaning resources: {name}")
        return f'Model "{name}" unregistered'

    async def _remove(self, mv: ModelVersion, timeout: float = 120.0) -> None:
        versions = self.models.get(mv.name, {})
        if versions.get(mv.version) is mv:
            del versions[mv.version]
        if not versions:
            self.models.pop(mv.name, None)
            self.defaults.pop(mv.name, None)
        elif self.defaults.get(mv.name) == mv.version:  # shutdown, or a plugin's own removal
            self.defaults[mv.name] = next(iter(versions))
        mv.queue.fail_all(ServiceUnavailableError(f"Model {mv.name} is being unregistered"))
        await mv.pool.stop(timeout)
        # Only what flambeau extracted or downloaded itself is deleted.
        self._discard(mv.archive, mv.downloaded_path)

    async def close(self) -> None:
        """Stop every worker (shutdown); extracted copies are removed, the store is kept (a
        downloaded archive too: the shutdown snapshot names it)."""
        for task in list(self._tasks):
            task.cancel()
        versions = self.all_versions()
        for mv in versions:
            mv.downloaded_path = None
        await asyncio.gather(*(self._remove(mv, 30.0) for mv in versions))

    # ---------------------------------------------------------------- describe and list

    def describe(self, mv: ModelVersion) -> dict[str, Any]:
        """The describe object, fields in TorchServe's order (absent ones omitted)."""
        s = mv.settings
        gpus = self.server.gpu_count()
        wants_gpu = s.device_type in ("", "gpu")
        out: dict[str, Any] = {
            "modelName": mv.name,
            "modelVersion": mv.version,
            "modelUrl": mv.url,
            "runtime": mv.runtime,
            "minWorkers": s.min_workers,
            "maxWorkers": s.max_workers,
            "batchSize": s.batch_size,
            "maxBatchDelay": s.max_batch_delay_ms,
            "responseTimeout": s.response_timeout_s,
            "startupTimeout": s.startup_timeout_s,
            "maxRetryTimeoutInSec": s.max_retry_timeout_s,
            "clientTimeoutInMills": s.client_timeout_ms,
            "parallelType": s.parallel_type,
            "parallelLevel": s.parallel_level,
            "deviceType": "gpu" if wants_gpu and gpus > 0 else "cpu",
        }
        if s.device_ids and all(i < gpus for i in s.device_ids):
            out["deviceIds"] = list(s.device_ids)
        out.update(
            {
                "continuousBatching": s.continuous_batching,
                "useJobTicket": s.use_job_ticket,
                "useVenv": s.use_venv,
                "stateful": s.stateful,
                "sequenceMaxIdleMSec": s.sequence_max_idle_ms,
                "sequenceTimeoutMSec": s.sequence_timeout_ms,
                "maxNumSequence": s.max_num_sequence,
                "maxSequenceJobQueueSize": s.max_sequence_job_queue_size,
                "loadedAtStartup": mv.loaded_at_startup,
                "workers": mv.pool.describe(),
                "jobQueueStatus": mv.queue.snapshot(),
            }
        )
        return out

    async def describe_customized(self, mv: ModelVersion) -> Any:
        """Ask the handler (header ``describe: True``) for its metadata; None when it has none."""
        if not mv.pool.slots:
            raise ServiceUnavailableError(
                f'Model "{mv.name}" has no worker to serve describe request. '
                "Please use scale workers API to add workers."
            )
        request = WorkerRequest(
            str(uuid.uuid4()), {"describe": "True"}, [RequestInput("body", b"", "")]
        )
        response = await self.submit(mv.name, mv.version, request)
        if response.status >= 400:
            raise FlambeauError(response.body.decode("utf-8", "replace"), status=response.status)
        try:
            return json.loads(response.body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return response.body.decode("utf-8", "replace")

    def list_models(self, limit: int | None, page_token: int | None) -> dict[str, Any]:
        """TorchServe's paginated list of default versions, sorted by name.

        ``limit`` outside 0..100 means 100; ``nextPageToken`` (an offset) is present when the
        page did not run past the end, even if it ends exactly there (TorchServe's rule).
        """
        if limit is None or limit > 100 or limit < 0:
            limit = 100
        offset = max(0, page_token or 0)
        # Versions a plugin registered for its own use (workflow nodes) are not listed.
        names = sorted(n for n, v in self.defaults.items() if self.models[n][v].owner is None)
        last = offset + limit
        body: dict[str, Any] = {}
        if last <= len(names):
            body["nextPageToken"] = str(last)
        else:
            last = len(names)
        body["models"] = [
            {"modelName": name, "modelUrl": self.get(name).url} for name in names[offset:last]
        ]
        return body

    # ---------------------------------------------------------------- data plane

    def submit(
        self,
        name: str,
        version: str | None,
        request: WorkerRequest,
        on_partial: PartialCallback | None = None,
    ) -> asyncio.Future[WorkerResponse]:
        """Queue a request; the future resolves with the worker's response or an error.

        Raises 503 at once (never waits) when the version has no worker, its queue is full, or
        it uses job tickets and no worker is free: TorchServe answers all three alike.
        """
        mv = self.get(name, version)
        queue = mv.queue
        if (
            not mv.pool.slots
            or len(queue) >= queue.capacity
            or (mv.settings.use_job_ticket and _free_workers(mv) <= len(queue))
        ):
            raise ServiceUnavailableError(no_worker_message(name, version))
        now = queue.now()
        timeout_ms = mv.settings.client_timeout_ms
        future: asyncio.Future[WorkerResponse] = asyncio.get_running_loop().create_future()
        job = InferenceJob(
            request,
            future,
            enqueued_at=now,
            deadline=now + timeout_ms / 1000.0 if timeout_ms > 0 else None,
            on_partial=on_partial,
        )
        queue.put(job)
        return future

    async def predict(
        self, name: str, version: str | None, request: WorkerRequest
    ) -> WorkerResponse:
        return await self.submit(name, version, request)

    def healthy(self) -> bool:
        """TorchServe's /ping rule: every default version has at least minWorkers healthy."""
        return all(
            mv.pool.healthy_count() >= mv.settings.min_workers for mv in self.default_versions()
        )


def _free_workers(mv: ModelVersion) -> int:
    return sum(1 for s in mv.pool.slots if s.status == "READY" and not s.busy and not s.retired)


def python_for(mv: ModelVersion) -> str:
    """The worker interpreter: the one a preparer chose (a per-model venv), else the server's."""
    return mv.python or sys.executable
