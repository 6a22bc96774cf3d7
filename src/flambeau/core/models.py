"""The model registry and the transport-agnostic data plane.

:class:`ModelManager` registers model versions from archives, scales, describes and unregisters
them, and runs predictions by putting a job on the version's queue. REST, gRPC and workflows
call the same methods, so there is one behaviour to test. Messages and status codes are
TorchServe's (see docs/compatibility.md for where flambeau deliberately differs).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flambeau import __version__
from flambeau.api import (
    BadRequestError,
    ConflictError,
    FlambeauError,
    InternalServerError,
    ModelLoadSpec,
    ModelNotFoundError,
    ModelVersionNotFoundError,
    ServiceUnavailableError,
    WorkerRequest,
    WorkerResponse,
    WorkerSpec,
)
from flambeau.core.batching import InferenceJob, JobQueue, PartialCallback
from flambeau.core.pool import PoolSettings, WorkerPool
from flambeau.core.settings import ModelSettings, RegisterParams, merge_settings
from flambeau.core.sources import default_model_name, resolve_source

log = logging.getLogger("flambeau.models")

VALID_RUNTIMES = {"python", "python3", "LSP"}


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
    created: float = field(default_factory=time.time)

    @property
    def model_dir(self) -> Path:
        return Path(self.archive.model_dir)


ChangeListener = Callable[[str], None]


class ModelManager:
    """Every model version of one server, and the operations the management APIs expose."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.config = server.config
        self.models: dict[str, dict[str, ModelVersion]] = {}
        self.defaults: dict[str, str] = {}
        self._worker_counter = self.config.get_int("initial_worker_port", 9000)
        self._listeners: list[ChangeListener] = []
        self._lock = asyncio.Lock()
        self.extract_root = Path(server.work_dir) / "models"
        self.extract_root.mkdir(parents=True, exist_ok=True)

    def add_listener(self, listener: ChangeListener) -> None:
        """Called with an event name after every successful change (snapshots, metrics)."""
        self._listeners.append(listener)

    def _changed(self, event: str) -> None:
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:
                log.exception("model change listener failed")

    # ---------------------------------------------------------------- lookup

    def get(self, name: str, version: str | None = None) -> ModelVersion:
        versions = self.models.get(name)
        if not versions:
            raise ModelNotFoundError(f"Model not found: {name}")
        if version is None or version == "":
            return versions[self.defaults[name]]
        found = versions.get(version)
        if found is None:
            raise ModelVersionNotFoundError(
                f"Model version: {version} does not exist for model: {name}"
            )
        return found

    def default_versions(self) -> list[ModelVersion]:
        return [self.models[name][v] for name, v in sorted(self.defaults.items())]

    def all_versions(self) -> list[ModelVersion]:
        return [mv for versions in self.models.values() for mv in versions.values()]

    # ---------------------------------------------------------------- register

    async def register(self, params: RegisterParams) -> tuple[int, str]:
        """Register a model version; returns (HTTP status, status message)."""
        if params.runtime is not None and params.runtime not in VALID_RUNTIMES:
            raise BadRequestError(f"Invalid RuntimeType value: {params.runtime}")
        source = await resolve_source(
            params.url,
            model_store=self.config.model_store,
            allowed_urls=self.config.get_list("allowed_urls"),
            max_download_bytes=self.config.get_int("max_download_size", 2**34),
        )
        try:
            archive = await asyncio.to_thread(self._open_archive, source.path)
        except BaseException:
            if source.downloaded:
                source.path.unlink(missing_ok=True)
            raise
        manifest = archive.manifest
        name = params.model_name or manifest.model_name or default_model_name(source.path)
        version = manifest.model_version or "1.0"
        runtime = params.runtime or manifest.runtime or "python"
        if runtime not in VALID_RUNTIMES:
            self._discard(archive, source.path if source.downloaded else None)
            raise BadRequestError(f"Invalid RuntimeType value: {runtime}")
        handler = params.handler or manifest.handler or self.config.get_str("default_service_handler")
        if not handler:
            self._discard(archive, source.path if source.downloaded else None)
            raise FlambeauError(
                f"Model {name} has no handler", status=400, error_type="InvalidModelException"
            )
        async with self._lock:
            if version in self.models.get(name, {}):
                self._discard(archive, source.path if source.downloaded else None)
                raise ConflictError(f"Model version {version} is already registered for model {name}")
            default_workers = (
                self.server.startup_workers()
                if params.loaded_at_startup and params.initial_workers is None
                else self.config.get_int("default_workers_per_model", 0)
            )
            settings = merge_settings(
                config=self.config,
                model=name,
                version=version,
                yaml_config=archive.model_config,
                params=params,
                default_workers=default_workers,
            )
            mv = self._build_version(name, version, source.url, archive, settings, handler, runtime)
            mv.loaded_at_startup = params.loaded_at_startup
            mv.downloaded_path = source.path if source.downloaded else None
            self.models.setdefault(name, {})[version] = mv
            self.defaults.setdefault(name, version)
        try:
            await self.server.prepare_environment(mv)
        except BaseException:
            await self._remove(mv)
            raise
        workers = settings.min_workers
        if workers <= 0:
            self._changed("register")
            return 200, (
                f'Model "{name}" Version: {version} registered with 0 initial workers. '
                "Use scale workers API to add workers for the model."
            )
        if not params.synchronous:
            asyncio.create_task(mv.pool.scale(workers, wait=True))
            self._changed("register")
            return 202, "Processing worker updates..."
        ok = await mv.pool.scale(workers, wait=True)
        if not ok:
            await self._remove(mv)
            raise InternalServerError(f"Failed to start workers for model {name} version: {version}")
        self._changed("register")
        return 200, f'Model "{name}" Version: {version} registered with {workers} initial workers'

    def _open_archive(self, path: Path) -> Any:
        from flambeau.archiver import ArchiveError, open_model_archive

        try:
            return open_model_archive(path, self.extract_root)
        except ArchiveError as exc:
            raise FlambeauError(str(exc), status=400, error_type="InvalidModelException") from exc

    @staticmethod
    def _discard(archive: Any, downloaded: Path | None) -> None:
        model_dir = Path(archive.model_dir)
        if model_dir.is_dir() and model_dir != Path(archive.source):
            shutil.rmtree(model_dir, ignore_errors=True)
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
        label = f"{name}_{version}"
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
            name=label,
            queue=queue,
            backend=server.worker_backend(settings.worker_backend),
            batcher=server.batcher(settings.batching_strategy),
            settings=pool_settings,
            make_spec=make_spec,
            next_worker_id=self._next_worker_id,
            on_metrics=server.record_handler_metrics,
            on_batch=lambda size, queued, took: server.observe_batch(name, version, size, queued, took),
            release=server.release_device,
        )
        mv = ModelVersion(name, version, url, archive, settings, handler, runtime, queue, pool)
        mv_ref.append(mv)
        return mv

    def _next_worker_id(self) -> str:
        worker_id = str(self._worker_counter)
        self._worker_counter += 1
        return worker_id

    def load_spec(self, mv: ModelVersion, gpu_id: int | None, threads: int) -> ModelLoadSpec:
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
            intra_op_threads=threads,
            max_gpu_memory_mb=mv.settings.max_gpu_memory_mb,
            decode_input_request=self.config.get_bool("decode_input_request", True),
        )

    # ---------------------------------------------------------------- scale / default / remove

    async def scale(
        self, name: str, version: str | None, min_workers: int, max_workers: int, synchronous: bool
    ) -> tuple[int, str]:
        mv = self.get(name, version)
        if max_workers < min_workers:
            raise BadRequestError("max_worker cannot be less than min_worker.")
        if min_workers < 0:
            raise BadRequestError("min_worker cannot be negative.")
        mv.settings = mv.settings.with_workers(min_workers, max_workers)
        suffix = f", version: {version}" if version else ""
        if not synchronous:
            asyncio.create_task(self._scale_and_notify(mv, min_workers))
            return 202, "Processing worker updates..."
        ok = await mv.pool.scale(min_workers, wait=True)
        self._changed("scale")
        if not ok:
            return 206, "Workers scaling in progress..."
        return 200, f"Workers scaled to {min_workers} for model: {name}{suffix}"

    async def _scale_and_notify(self, mv: ModelVersion, count: int) -> None:
        await mv.pool.scale(count, wait=True)
        self._changed("scale")

    def set_default(self, name: str, version: str) -> str:
        versions = self.models.get(name)
        if not versions:
            raise ModelNotFoundError(f"Model not found: {name}")
        if version not in versions:
            raise ModelVersionNotFoundError(f"Model version {version} does not exist for model {name}")
        self.defaults[name] = version
        self._changed("set-default")
        return f'Default version successfully updated for model "{name}" to "{version}"'

    async def unregister(self, name: str, version: str | None) -> str:
        mv = self.get(name, version)
        versions = self.models[name]
        if self.defaults[name] == mv.version and len(versions) > 1:
            raise FlambeauError(
                f"Cannot remove default version for model {name}",
                status=403,
                error_type="InvalidModelVersionException",
            )
        timeout = self.config.get_float("unregister_model_timeout", 120)
        await self._remove(mv, timeout)
        self._changed("unregister")
        return f'Model "{name}" unregistered'

    async def _remove(self, mv: ModelVersion, timeout: float = 120.0) -> None:
        versions = self.models.get(mv.name, {})
        versions.pop(mv.version, None)
        if not versions:
            self.models.pop(mv.name, None)
            self.defaults.pop(mv.name, None)
        mv.queue.fail_all(ServiceUnavailableError(f"Model {mv.name} is being unregistered"))
        await mv.pool.stop(timeout)
        self._discard(mv.archive, mv.downloaded_path)

    async def close(self) -> None:
        """Stop every worker (shutdown); archives' extracted copies are removed."""
        await asyncio.gather(*(self._remove(mv, 30.0) for mv in self.all_versions()))

    # ---------------------------------------------------------------- data plane

    def submit(
        self,
        name: str,
        version: str | None,
        request: WorkerRequest,
        on_partial: PartialCallback | None = None,
    ) -> asyncio.Future[WorkerResponse]:
        """Queue a request; the future resolves with the worker's response or an error."""
        mv = self.get(name, version)
        if not mv.pool.slots:
            label = f'"{name}" Version {version}"' if version else f'"{name}"'
            raise ServiceUnavailableError(
                f"Model {label} has no worker to serve inference request. Please use scale "
                "workers API to add workers. If this is a sequence inference, please check if "
                "it is closed, or expired; or exceeds maxSequenceJobQueueSize"
            )
        queue = mv.queue
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
        return all(mv.pool.healthy_count() >= mv.settings.min_workers for mv in self.default_versions())


def python_for(mv: ModelVersion) -> str:
    venv_python = mv.model_dir / "venv" / "bin" / "python"
    if mv.settings.use_venv and venv_python.exists():
        return str(venv_python)
    return sys.executable


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
