"""Build model archives (.mar, .tar.gz or a directory) the way torch-model-archiver 0.12 does.

:class:`ModelArchiverConfig` has the field names of ``model_archiver.ModelArchiverConfig`` so
code (and TorchServe's own tests) that build archives programmatically can switch imports::

    from flambeau.archiver import ModelArchiverConfig, generate_model_archive
    generate_model_archive(ModelArchiverConfig(model_name="mnist", version="1.0",
                                               handler="mnist_handler.py", export_path="store"))
"""

from __future__ import annotations

import os
import zipfile
from argparse import Namespace
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal

from flambeau.archiver import manifest as mf
from flambeau.archiver.errors import ArchiverError
from flambeau.archiver.packing import (
    Artifacts,
    add_extra_files,
    check_output,
    log,
    prepare_export_dir,
    require_file,
    write_dir,
    write_tgz,
    write_zip,
)

ArchiveFormat = Literal["default", "tgz", "no-archive", "zip-store"]
ARCHIVE_FORMATS: tuple[ArchiveFormat, ...] = ("default", "tgz", "no-archive", "zip-store")


@dataclass(frozen=True, slots=True)
class ModelArchiverConfig:
    """What to archive; field names and meanings follow torch-model-archiver's flags.

    ``export_path`` None means the current directory at the time of the call (the real
    dataclass freezes the directory the module was imported from).
    """

    model_name: str
    handler: str
    version: str
    serialized_file: str | None = None
    model_file: str | None = None
    extra_files: str | None = None
    runtime: str = "python"
    export_path: str | None = None
    archive_format: ArchiveFormat = "default"
    force: bool = False
    requirements_file: str | None = None
    config_file: str | None = None

    @classmethod
    def from_args(cls, args: Namespace) -> ModelArchiverConfig:
        """Build from an argparse namespace carrying one attribute per field."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


def archive_path(config: ModelArchiverConfig, export_dir: Path) -> Path:
    """Where ``config`` writes: ``<export>/<name>.mar``, ``.tar.gz``, or ``<export>/<name>/``."""
    return export_dir / f"{config.model_name}{mf.ARCHIVE_SUFFIXES[config.archive_format]}"


def validate(config: ModelArchiverConfig) -> None:
    """Check the values a command line parser would have checked (for programmatic use)."""
    if not mf.valid_name(config.model_name):
        raise ArchiverError(
            "Model name contains special characters.\n"
            "The allowed regular expression filter for model name is: "
            "^[A-Za-z0-9][A-Za-z0-9_\\-.]*$"
        )
    if config.runtime not in mf.RUNTIMES:
        raise ArchiverError(f"Invalid RuntimeType value: {config.runtime}")
    if config.archive_format not in ARCHIVE_FORMATS:
        raise ArchiverError(f"Invalid archive format: {config.archive_format}")
    if not config.handler:
        raise ArchiverError("A handler is required")
    if not config.version:
        raise ArchiverError("A model version is required")


def collect_artifacts(config: ModelArchiverConfig, exclude: Path | None = None) -> Artifacts:
    """The files of the archive, in the real tool's copy order (later names win)."""
    artifacts = Artifacts(exclude)
    for path, what in (
        (config.model_file, "Model file"),
        (config.serialized_file, "Serialized file"),
    ):
        if path:
            artifacts.add_file(os.path.basename(path), require_file(path, what))
    handler = mf.handler_file(config.handler, config.runtime)
    if handler is not None:
        artifacts.add_file(os.path.basename(handler), require_file(handler, "Handler file"))
    if config.extra_files:
        add_extra_files(artifacts, config.extra_files)
    for path, what in (
        (config.requirements_file, "Requirements file"),
        (config.config_file, "Config file"),
    ):
        if path:
            artifacts.add_file(os.path.basename(path), require_file(path, what))
    return artifacts


def generate_manifest(config: ModelArchiverConfig) -> dict[str, object]:
    """The MANIFEST.json content for ``config`` (``createdOn`` is now)."""
    return mf.model_manifest(
        model_name=config.model_name,
        handler=config.handler,
        version=config.version,
        runtime=config.runtime,
        serialized_file=config.serialized_file,
        model_file=config.model_file,
        requirements_file=config.requirements_file,
        config_file=config.config_file,
    )


def generate_model_archive(config: ModelArchiverConfig) -> Path:
    """Build the archive described by ``config`` and return its path.

    Raises :class:`ArchiverError` for bad input (invalid name, missing file, output exists
    without ``force``); nothing is left behind on failure.
    """
    validate(config)
    export_dir = prepare_export_dir(config.export_path)
    dest = archive_path(config, export_dir)
    check_output(dest, config.force, "model")
    entries = collect_artifacts(config, exclude=dest).entries(mf.MODEL_MANIFEST_PATH)
    text = mf.dumps(generate_manifest(config))
    if config.archive_format == "tgz":
        write_tgz(dest, entries, config.model_name, mf.MODEL_MANIFEST_PATH, text)
    elif config.archive_format == "no-archive":
        write_dir(dest, entries, mf.MODEL_MANIFEST_PATH, text)
    else:
        stored = config.archive_format == "zip-store"
        compression = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
        write_zip(dest, entries, mf.MODEL_MANIFEST_PATH, text, compression=compression)
    log.info("Successfully exported model %s to file %s", config.model_name, dest)
    return dest
