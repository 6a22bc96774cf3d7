"""The workflow registry: register, describe, scale, set-default, unregister and predict.

A workflow version owns a private directory holding its extracted .war and a copy of each model
archive it names. Every DAG node is served by a model ``<workflow>__<node>`` registered through
the server's model manager, with the workflow's version as its model version (the copied
manifest is rewritten to say so), so several versions of a workflow run side by side. Function
nodes are models whose directory is the extracted .war and whose handler is
``<handler file>:<function>``. Registration is all or nothing: when any node fails, every node
model registered so far is unregistered again and the private directory is removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flambeau.api import (
    BadRequestError,
    ConflictError,
    FlambeauError,
    ForbiddenError,
    RegisterParams,
    WorkerRequest,
    WorkerResponse,
)
from flambeau.plugins.builtin.workflows.dag import (
    DagExecutor,
    NodeTarget,
    WorkflowMetrics,
    render_leaves,
)
from flambeau.plugins.builtin.workflows.errors import (
    WorkflowNotFoundError,
    WorkflowSpecError,
    WorkflowVersionNotFoundError,
)
from flambeau.plugins.builtin.workflows.sources import Resolved, resolve
from flambeau.plugins.builtin.workflows.spec import WorkflowSpec, check_functions, parse_spec

log = logging.getLogger("flambeau.workflows")

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-.]*$")
MANIFEST = Path("MAR-INF") / "MANIFEST.json"
MAX_DOWNLOAD = 2**34


@dataclass(frozen=True, slots=True)
class RegisterWorkflowParams:
    """A ``POST /workflows`` request (query or JSON body); None = not given."""

    url: str
    workflow_name: str | None = None
    workflow_version: str | None = None
    response_timeout: int | None = None
    startup_timeout: int | None = None


@dataclass(frozen=True, slots=True)
class WorkflowVersion:
    """One registered version of a workflow and what serves it."""

    name: str
    version: str
    url: str
    archive: str  # what a restart registers again: a store file name or the url
    downloaded: bool
    spec: WorkflowSpec
    handler: str | None
    targets: dict[str, NodeTarget]
    executor: DagExecutor
    directory: Path
    response_timeout: int | None
    startup_timeout: int | None
    created: float


@dataclass(frozen=True, slots=True)
class _Staged:
    root: Path
    war_dir: Path
    manifest: dict[str, Any]
    handler: str | None
    spec: WorkflowSpec


def _version_text(value: Any) -> str | None:
    if value is None or value == "":
        return None
    return str(value)


def _check_label(value: str, what: str) -> str:
    if not NAME.match(value) or value == "all":
        raise BadRequestError(f"Invalid {what}: {value!r} (allowed: {NAME.pattern}, not 'all')")
    return value


class WorkflowManager:
    """Every workflow version of one server; REST and gRPC call the same methods."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.config = server.config
        self.models = server.models
        self.workflows: dict[str, dict[str, WorkflowVersion]] = {}
        self.defaults: dict[str, str] = {}
        self.metrics = WorkflowMetrics(server.metrics)
        self.root = Path(server.work_dir) / "workflows"
        self._pending: set[tuple[str, str]] = set()
        self._lock = asyncio.Lock()
        self._listeners: list[Callable[[], None]] = []

    # ------------------------------------------------------------------ lookup

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Called after every successful change (the snapshot writer)."""
        self._listeners.append(listener)

    def changed(self) -> None:
        for listener in self._listeners:
            try:
                listener()
            except Exception:
                log.exception("workflow change listener failed")

    def get(self, name: str, version: str | None = None) -> WorkflowVersion:
        versions = self.workflows.get(name)
        if not versions:
            raise WorkflowNotFoundError(f"Workflow not found: {name}")
        if not version:
            return versions[self.defaults[name]]
        found = versions.get(version)
        if found is None:
            raise WorkflowVersionNotFoundError(
                f"Workflow version: {version} does not exist for workflow: {name}"
            )
        return found

    def default_versions(self) -> list[WorkflowVersion]:
        return [self.workflows[name][v] for name, v in sorted(self.defaults.items())]

    def all_versions(self) -> list[WorkflowVersion]:
        return [wv for versions in self.workflows.values() for wv in versions.values()]

    # ------------------------------------------------------------------ register

    async def register(self, params: RegisterWorkflowParams) -> tuple[int, str]:
        """Register a workflow version and every node model; returns (status, message)."""
        store = self.config.workflow_store
        resolved = await resolve(
            params.url,
            stores=[store] if store is not None else [],
            allowed_urls=self.config.get_list("allowed_urls"),
            download_dir=store,
            max_bytes=self.config.get_int("max_download_size", MAX_DOWNLOAD),
            not_found="Workflow not found in workflow store: ",
        )
        self.root.mkdir(parents=True, exist_ok=True)
        staged: _Staged | None = None
        try:
            staged = await asyncio.to_thread(self._stage, resolved.path)
            wf = staged.manifest.get("workflow") or {}
            name = params.workflow_name or wf.get("workflowName") or _stem(resolved.path)
            version = (
                params.workflow_version
                or _version_text(wf.get("version") or wf.get("workflowVersion"))
                or "1.0"
            )
            _check_label(name, "workflow name")
            _check_label(version, "workflow version")
            async with self._lock:
                if version in self.workflows.get(name, {}) or (name, version) in self._pending:
                    raise ConflictError(
                        f"Workflow version {version} is already registered for workflow {name}"
                    )
                self._pending.add((name, version))
            try:
                wv = await self._register_nodes(name, version, resolved, staged, params)
            finally:
                self._pending.discard((name, version))
        except BaseException:
            if staged is not None:
                shutil.rmtree(staged.root, ignore_errors=True)
            if resolved.downloaded:
                resolved.path.unlink(missing_ok=True)
            raise
        self.workflows.setdefault(name, {})[version] = wv
        self.defaults.setdefault(name, version)
        self.changed()
        return 200, f"Workflow {name} has been registered and scaled successfully."

    def _stage(self, source: Path) -> _Staged:
        """Extract the .war into a private directory and validate its spec (in a thread)."""
        from flambeau.archiver import open_workflow_archive

        root = self.root / uuid.uuid4().hex
        root.mkdir(parents=True)
        try:
            if source.is_dir():
                # A directory is copied: its function-node manifest is written into our copy.
                copy = root / "war"
                shutil.copytree(source, copy)
                archive = open_workflow_archive(copy, root)
            else:
                archive = open_workflow_archive(source, root)
            spec = parse_spec(archive.spec)
            handler = archive.manifest.handler
            handler_path = archive.workflow_dir / handler if handler else None
            check_functions(spec, handler_path)
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise
        return _Staged(root, archive.workflow_dir, dict(archive.manifest.raw), handler, spec)

    async def _register_nodes(
        self,
        name: str,
        version: str,
        resolved: Resolved,
        staged: _Staged,
        params: RegisterWorkflowParams,
    ) -> WorkflowVersion:
        spec = staged.spec
        sources = await self._model_sources(name, staged)
        model_dirs = await asyncio.to_thread(
            self._prepare_node_dirs, name, version, staged, sources
        )
        targets: dict[str, NodeTarget] = {}

        async def register_node(node: str) -> None:
            target = await self._register_node(name, version, node, staged, model_dirs, params)
            targets[node] = target

        results = await asyncio.gather(
            *(register_node(node) for node in spec.nodes), return_exceptions=True
        )
        errors = [
            (node, r)
            for node, r in zip(spec.nodes, results, strict=True)
            if isinstance(r, BaseException)
        ]
        if errors:
            await self._unregister_nodes(targets.values())
            node, error = errors[0]
            if isinstance(error, FlambeauError):
                raise FlambeauError(
                    f"Workflow {name}: node {node} could not be registered: {error.message}",
                    status=error.status,
                    error_type=error.error_type,
                ) from error
            raise error
        executor = DagExecutor(name, version, spec, targets, self.models, self.metrics)
        return WorkflowVersion(
            name=name,
            version=version,
            url=resolved.url,
            archive=resolved.path.name if resolved.downloaded else resolved.url,
            downloaded=resolved.downloaded,
            spec=spec,
            handler=staged.handler,
            targets=targets,
            executor=executor,
            directory=staged.root,
            response_timeout=params.response_timeout,
            startup_timeout=params.startup_timeout,
            created=time.time(),
        )

    async def _model_sources(self, name: str, staged: _Staged) -> dict[str, Path]:
        """Each model node's archive: in the model store, else packed inside the .war."""
        store = self.config.model_store
        stores = [s for s in (store, staged.war_dir) if s is not None]
        found: dict[str, Path] = {}
        for node in staged.spec.model_nodes:
            url = staged.spec.nodes[node].url or ""
            try:
                resolved = await resolve(
                    url,
                    stores=stores,
                    allowed_urls=self.config.get_list("allowed_urls"),
                    download_dir=staged.root,
                    max_bytes=self.config.get_int("max_download_size", MAX_DOWNLOAD),
                    not_found="",
                )
            except FlambeauError as exc:
                detail = exc.message
                if detail == url:  # resolve's plain "not found" (its prefix is empty here)
                    detail = f"archive {url} not found in the model store or the workflow archive"
                raise WorkflowSpecError(f"Workflow {name}: model node {node}: {detail}") from exc
            found[node] = resolved.path
        return found

    def _prepare_node_dirs(
        self, name: str, version: str, staged: _Staged, sources: dict[str, Path]
    ) -> dict[str, Path]:
        """Copy each model archive into the private directory, its manifest saying the
        workflow's version; write the function nodes' manifest into the .war copy."""
        from flambeau.archiver import ArchiveError, open_model_archive

        dirs: dict[str, Path] = {}
        models_root = staged.root / "models"
        for node, source in sources.items():
            node_root = models_root / node
            node_root.mkdir(parents=True)
            try:
                if source.is_dir():
                    shutil.copytree(source, node_root / "copy")
                    archive = open_model_archive(node_root / "copy", node_root)
                else:
                    archive = open_model_archive(source, node_root)
            except ArchiveError as exc:
                raise WorkflowSpecError(
                    f"Workflow {name}: model node {node}: {exc.message}"
                ) from exc
            manifest = dict(archive.manifest.raw)
            model = dict(manifest.get("model") or {})
            model["modelVersion"] = version
            manifest["model"] = model
            manifest.setdefault("runtime", archive.manifest.runtime)
            _write_json(archive.model_dir / MANIFEST, manifest)
            dirs[node] = archive.model_dir
        if staged.spec.function_nodes and staged.handler:
            function_manifest = {
                "runtime": "python",
                "model": {"modelName": name, "modelVersion": version, "handler": staged.handler},
            }
            _write_json(staged.war_dir / MANIFEST, function_manifest)
        return dirs

    async def _register_node(
        self,
        name: str,
        version: str,
        node: str,
        staged: _Staged,
        model_dirs: dict[str, Path],
        params: RegisterWorkflowParams,
    ) -> NodeTarget:
        spec_node = staged.spec.nodes[node]
        settings = spec_node.settings
        model = f"{name}__{node}"
        if spec_node.kind == "model":
            url, handler = str(model_dirs[node]), None
        else:
            # TorchServe's function node: the .war directory with ``<handler>:<function>``.
            url, handler = str(staged.war_dir), f"{staged.handler}:{node}"
        # The spec's values are the workflow author's: pinned over the archive's model-config,
        # which would otherwise win over register parameters for the worker counts.
        pinned = {
            "min_workers": settings.min_workers,
            "max_workers": settings.max_workers,
            "batch_size": settings.batch_size,
            "max_batch_delay_ms": settings.max_batch_delay_ms,
        }
        await self.models.register(
            RegisterParams(
                url=url,
                model_name=model,
                handler=handler,
                batch_size=settings.batch_size,
                max_batch_delay=settings.max_batch_delay_ms,
                initial_workers=settings.min_workers,
                synchronous=True,
                response_timeout=params.response_timeout,
                startup_timeout=params.startup_timeout,
            ),
            overrides=pinned,
            owner="workflows",
        )
        return NodeTarget(model, version)

    async def _unregister_nodes(self, targets: Sequence[NodeTarget] | Any) -> None:
        async def remove(target: NodeTarget) -> None:
            versions = self.models.models.get(target.model, {})
            if target.version not in versions:
                return
            if self.models.defaults.get(target.model) == target.version and len(versions) > 1:
                other = next(v for v in versions if v != target.version)
                self.models.set_default(target.model, other)
            try:
                await self.models.unregister(target.model, target.version)
            except FlambeauError as exc:
                log.error("could not unregister node model %s: %s", target.model, exc.message)

        await asyncio.gather(*(remove(t) for t in list(targets)))

    # ------------------------------------------------------------------ manage

    async def unregister(self, name: str, version: str | None) -> str:
        wv = self.get(name, version)
        versions = self.workflows[name]
        if self.defaults[name] == wv.version and len(versions) > 1:
            raise ForbiddenError(
                f"Cannot remove default version for workflow {name}",
                error_type="InvalidWorkflowVersionException",
            )
        versions.pop(wv.version)
        if not versions:
            self.workflows.pop(name)
            self.defaults.pop(name)
        await self._unregister_nodes(wv.targets.values())
        shutil.rmtree(wv.directory, ignore_errors=True)
        store = self.config.workflow_store
        if wv.downloaded and store is not None:
            (store / wv.archive).unlink(missing_ok=True)
        self.changed()
        return f'Workflow "{name}" unregistered'

    async def scale(
        self,
        name: str,
        version: str | None,
        min_workers: int,
        max_workers: int,
        synchronous: bool,
    ) -> tuple[int, str]:
        """Scale every node model of a workflow version (function nodes included)."""
        wv = self.get(name, version)
        if max_workers < min_workers:
            raise BadRequestError("max_worker cannot be less than min_worker.")
        if min_workers < 0:
            raise BadRequestError("min_worker cannot be negative.")
        results = await asyncio.gather(
            *(
                self.models.scale(t.model, t.version, min_workers, max_workers, synchronous)
                for t in wv.targets.values()
            )
        )
        self.changed()
        if not synchronous:
            return 202, "Processing worker updates..."
        if any(status == 206 for status, _ in results):
            return 206, "Workers scaling in progress..."
        suffix = f", version: {version}" if version else ""
        return 200, f"Workers scaled to {min_workers} for workflow: {name}{suffix}"

    def set_default(self, name: str, version: str) -> str:
        """Make ``version`` the default; its node models become their models' defaults too."""
        versions = self.workflows.get(name)
        if not versions:
            raise WorkflowNotFoundError(f"Workflow not found: {name}")
        if version not in versions:
            raise WorkflowVersionNotFoundError(
                f"Workflow version {version} does not exist for workflow {name}"
            )
        self.defaults[name] = version
        for target in versions[version].targets.values():
            with contextlib.suppress(FlambeauError):
                self.models.set_default(target.model, target.version)
        self.changed()
        return f'Default version successfully updated for workflow "{name}" to "{version}"'

    # ------------------------------------------------------------------ describe

    def describe(self, wv: WorkflowVersion) -> dict[str, Any]:
        """TorchServe's describe fields in its order, then flambeau's additions."""
        spec = wv.spec
        nodes = []
        for node in spec.nodes.values():
            target = wv.targets[node.name]
            entry: dict[str, Any] = {
                "name": node.name,
                "type": node.kind,
                "modelName": target.model,
                "modelVersion": target.version,
            }
            if node.url is not None:
                entry["url"] = node.url
            else:
                entry["handler"] = f"{wv.handler}:{node.name}"
            entry.update(node.settings.to_json())
            with contextlib.suppress(FlambeauError):
                live = self.models.get(target.model, target.version).settings
                entry["minWorkers"], entry["maxWorkers"] = live.min_workers, live.max_workers
            entry["successors"] = list(spec.successors[node.name])
            nodes.append(entry)
        return {
            "workflowName": wv.name,
            "workflowUrl": wv.url,
            "minWorkers": spec.defaults.min_workers,
            "maxWorkers": spec.defaults.max_workers,
            "batchSize": spec.defaults.batch_size,
            "maxBatchDelay": spec.defaults.max_batch_delay_ms,
            "workflowDag": spec.dag_string(),
            "workflowVersion": wv.version,
            "isDefault": self.defaults.get(wv.name) == wv.version,
            "retryAttempts": spec.defaults.retry_attempts,
            "timeoutMs": spec.defaults.timeout_ms,
            "nodes": nodes,
        }

    # ------------------------------------------------------------------ predict

    async def predict(
        self, name: str, version: str | None, request: WorkerRequest
    ) -> WorkerResponse:
        """Run the DAG of a workflow version; the leaves rendered as TorchServe does."""
        wv = self.get(name, version)
        started = time.monotonic()
        ok = False
        try:
            leaves = await wv.executor.execute(request)
            ok = True
        finally:
            self.metrics.request(wv.name, wv.version, time.monotonic() - started, ok)
        body, content_type = render_leaves(leaves)
        return WorkerResponse(request.request_id, 200, "", content_type, {}, body)


def _stem(path: Path) -> str:
    name = path.name
    if name.endswith(".war"):
        name = name[:-4]
    return re.sub(r"\W", "_", name)


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
