"""Open model and workflow archives for the server: extract safely, parse and check manifests.

    archive = open_model_archive(Path("store/mnist.mar"), Path(tmp) / "models")
    archive.manifest.handler, archive.model_dir, archive.model_config["batchSize"]
    archive.cleanup()  # removes the extraction, never a directory that was used in place

Archives (.mar / .model zips, .tar.gz) are extracted into a new unique directory under
``dest_root`` (see :mod:`flambeau.archiver.extract` for the safety rules). A directory source
(``--archive-format no-archive``) is used in place: no copy, no symlink, ``extracted=False``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flambeau.archiver import manifest as mf
from flambeau.archiver.errors import ManifestError, UnsafeArchiveError
from flambeau.archiver.extract import extract, member_parts

DEFAULT_MAX_BYTES = 2**34  # 16 GiB: larger than any single-GPU checkpoint we expect
_MAX_MANIFEST_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Manifest:
    """``MAR-INF/MANIFEST.json``, with TorchServe's defaults applied; ``raw`` is the whole dict."""

    model_name: str | None
    model_version: str
    handler: str | None
    serialized_file: str | None
    model_file: str | None
    requirements_file: str | None
    config_file: str | None
    runtime: str
    archiver_version: str | None
    created_on: str | None
    raw: Mapping[str, Any]

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None, archive: str = "archive") -> Manifest:
        """Parse a manifest dict; None (no manifest at all) gives version 1.0 and no name."""
        raw = dict(raw or {})
        runtime = raw.get("runtime") or "python"
        if runtime not in mf.RUNTIMES:
            # The wire literal TorchServe answers a bad runtime with (400).
            raise ManifestError(f"Invalid RuntimeType value: {runtime}")
        model = raw.get("model") or {}
        if not isinstance(model, Mapping):
            raise ManifestError(f"{archive}: manifest field 'model' must be an object")

        def text(
            key: str, section: Mapping[str, Any] = model, prefix: str = "model."
        ) -> str | None:
            value = section.get(key)
            if value is None or value == "":
                return None
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)  # a version written as a JSON number
            if not isinstance(value, str):
                raise ManifestError(f"{archive}: manifest field {prefix}{key} must be a string")
            return value

        return cls(
            model_name=text("modelName"),
            model_version=text("modelVersion") or "1.0",
            handler=text("handler"),
            serialized_file=text("serializedFile"),
            model_file=text("modelFile"),
            requirements_file=text("requirementsFile"),
            config_file=text("configFile"),
            runtime=runtime,
            archiver_version=text("archiverVersion", raw, ""),
            created_on=text("createdOn", raw, ""),
            raw=raw,
        )


@dataclass(frozen=True, slots=True)
class ModelArchive:
    """An opened model archive: where its files are and what its manifest and config say.

    ``source`` is the absolute path opened. ``extracted`` is False for a directory used in
    place (then ``model_dir == source``): remove files with :meth:`cleanup`, never by hand.
    """

    source: Path
    model_dir: Path
    manifest: Manifest
    model_config: Mapping[str, Any]
    extracted: bool = True

    def cleanup(self) -> None:
        """Remove the extracted files; a directory source used in place is left alone."""
        if self.extracted:
            shutil.rmtree(self.model_dir, ignore_errors=True)


@dataclass(frozen=True, slots=True)
class WorkflowManifest:
    """``WAR-INF/MANIFEST.json``'s ``workflow`` section; ``raw`` is the whole dict."""

    workflow_name: str | None
    spec_file: str
    handler: str | None
    raw: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class WorkflowArchive:
    """An opened workflow archive with its DAG spec parsed."""

    source: Path
    workflow_dir: Path
    manifest: WorkflowManifest
    spec: Mapping[str, Any]
    extracted: bool = True

    def cleanup(self) -> None:
        """Remove the extracted files; a directory source used in place is left alone."""
        if self.extracted:
            shutil.rmtree(self.workflow_dir, ignore_errors=True)


def _open_dir(source: Path, dest_root: Path, max_bytes: int) -> tuple[Path, bool]:
    if source.is_dir():
        # Exactly ``source`` (absolute, symlinks kept): callers can tell "used in place" by
        # ``model_dir == source`` as well as by ``extracted``.
        return source, False
    return extract(source, dest_root, max_bytes=max_bytes, strip_single_top=True), True


def open_model_archive(
    source: Path | str,
    dest_root: Path | str,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    handler: str | None = None,
) -> ModelArchive:
    """Extract (or use in place) and validate a model archive.

    ``handler`` is the register request's override, checked instead of the manifest's. Raises
    :class:`~flambeau.archiver.errors.ArchiveError` subclasses with one-line messages; on error
    nothing extracted is left behind.
    """
    source = Path(os.path.abspath(source))
    model_dir, extracted = _open_dir(source, Path(dest_root), max_bytes)
    try:
        raw = _read_manifest(model_dir, mf.MODEL_MANIFEST_PATH, source.name)
        manifest = Manifest.from_dict(raw, source.name)
        for key, value in (
            ("serializedFile", manifest.serialized_file),
            ("modelFile", manifest.model_file),
            ("requirementsFile", manifest.requirements_file),
            ("configFile", manifest.config_file),
        ):
            if value is not None:
                _inside(model_dir, value, f"model.{key}", source.name)
        if manifest.runtime in mf.PYTHON_RUNTIMES:
            _check_handler(model_dir, handler or manifest.handler, source.name)
        config: Mapping[str, Any] = {}
        if manifest.config_file is not None:
            config = _read_yaml(model_dir, manifest.config_file, "configFile", source.name)
    except BaseException:
        if extracted:
            shutil.rmtree(model_dir, ignore_errors=True)
        raise
    return ModelArchive(source, model_dir, manifest, config, extracted)


def open_workflow_archive(
    source: Path | str, dest_root: Path | str, *, max_bytes: int = DEFAULT_MAX_BYTES
) -> WorkflowArchive:
    """Extract (or use in place) a .war, check its manifest and parse its spec yaml."""
    source = Path(os.path.abspath(source))
    workflow_dir, extracted = _open_dir(source, Path(dest_root), max_bytes)
    archive = source.name
    try:
        raw = _read_manifest(workflow_dir, mf.WORKFLOW_MANIFEST_PATH, archive)
        if raw is None:
            raise ManifestError(f"{archive}: {mf.WORKFLOW_MANIFEST_PATH} is missing")
        section = raw.get("workflow")
        if not isinstance(section, Mapping):
            raise ManifestError(f"{archive}: manifest has no 'workflow' object")
        fields: dict[str, str | None] = {}
        for key in ("workflowName", "specFile", "handler"):
            value = section.get(key)
            if value is not None and not isinstance(value, str):
                raise ManifestError(f"{archive}: manifest field workflow.{key} must be a string")
            fields[key] = value or None
        spec_file = fields["specFile"]
        if spec_file is None:
            raise ManifestError(f"{archive}: manifest names no workflow.specFile")
        handler = fields["handler"]
        if handler is not None:
            path = _inside(workflow_dir, handler, "workflow.handler", archive)
            if not path.is_file():
                raise ManifestError(
                    f"{archive}: handler file {handler!r} named in the manifest is missing"
                )
        spec = _read_yaml(workflow_dir, spec_file, "specFile", archive)
        if not spec:
            raise ManifestError(f"{archive}: workflow spec {spec_file!r} is empty")
    except BaseException:
        if extracted:
            shutil.rmtree(workflow_dir, ignore_errors=True)
        raise
    wf_manifest = WorkflowManifest(fields["workflowName"], spec_file, handler, raw)
    return WorkflowArchive(source, workflow_dir, wf_manifest, spec, extracted)


def _read_manifest(root: Path, relpath: str, archive: str) -> dict[str, Any] | None:
    path = root / relpath
    if not path.is_file():
        return None
    if path.stat().st_size > _MAX_MANIFEST_BYTES:
        raise ManifestError(f"{archive}: {relpath} is larger than {_MAX_MANIFEST_BYTES} bytes")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{archive}: {relpath} is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ManifestError(f"{archive}: {relpath} must hold a JSON object")
    return data


def _inside(root: Path, name: str, field: str, archive: str) -> Path:
    """``root/name``, refusing a manifest entry that points outside the archive."""
    try:
        parts = member_parts(name, archive)
    except UnsafeArchiveError:
        parts = ()
    if not parts:
        raise ManifestError(
            f"{archive}: manifest field {field}={name!r} points outside the archive"
        )
    return root.joinpath(*parts)


def _check_handler(model_dir: Path, handler: str | None, archive: str) -> None:
    """Refuse a handler that names a file (``x.py``, ``x.py:fn``) which the archive lacks.

    Bare names (``image_classifier``, ``my_handler``, ``pkg.module:fn``) are left to the
    worker: they may be builtins, handlers registered by plugins, or installed modules.
    TorchServe imports the handler module from the model directory by its base name only.
    """
    if not handler or handler in mf.BUILTIN_HANDLERS:
        return
    module = handler.split(":", 1)[0]
    if not (module.endswith(".py") or "/" in module):
        return
    name = os.path.basename(module)
    if not name.endswith(".py"):
        name += ".py"
    if not _inside(model_dir, name, "model.handler", archive).is_file():
        raise ManifestError(f"{archive}: handler file {name!r} named in the manifest is missing")


def _read_yaml(root: Path, name: str, field: str, archive: str) -> Mapping[str, Any]:
    import yaml  # deferred: most importers of this package never read a config

    path = _inside(root, name, field, archive)
    if not path.is_file():
        raise ManifestError(f"{archive}: {field} {name!r} named in the manifest is missing")
    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        detail = " ".join(str(exc).split())
        raise ManifestError(f"{archive}: {name} is not valid YAML ({detail})") from exc
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ManifestError(f"{archive}: {name} must hold a YAML mapping")
    return data
