"""``flambeau package``: seed 002's build.sh, one .mar from a ``handler_factory`` model file.

The model file (init_function, preprocess, postprocess and a module-level
``handler = handler_factory(...)``) becomes the archive's handler with entry point ``handler``
(manifest ``<model_file>.py:handler``), the checkpoint its serializedFile, the model-config
its configFile, the requirements its requirementsFile and the source tarball an extra file
that the handler unpacks as told by the config's ``system.extraFiles``.
"""

from __future__ import annotations

import argparse
import ast
import logging
import os
import tarfile
import tempfile
from argparse import Namespace
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from flambeau.archiver.cli import run_cli
from flambeau.archiver.errors import ArchiveError, ArchiverError
from flambeau.archiver.extract import validate_tar_members
from flambeau.archiver.model_archiver import (
    ARCHIVE_FORMATS,
    ArchiveFormat,
    ModelArchiverConfig,
    generate_model_archive,
)
from flambeau.archiver.packing import require_file

log = logging.getLogger("flambeau.archiver")

HANDLER_ATTRIBUTE = "handler"

# Model files written for the original helpers do ``from base_handler import handler_factory``;
# this module, added to the archive when such an import is found, points them at our SDK.
BASE_HANDLER_SHIM = '''\
"""Written by `flambeau package`: seed-002 model files import handler_factory from here."""

from flambeau.handler import handler_factory

__all__ = ["handler_factory"]
'''


@dataclass(frozen=True, slots=True)
class PackageConfig:
    """build.sh's parameters, plus where to write and how."""

    model_name: str
    model_file: str
    version: str
    checkpoint_file: str
    config_file: str | None = None
    requirements_file: str | None = None
    extra_files: str | None = None
    export_path: str | None = None
    force: bool = False
    archive_format: ArchiveFormat = "default"

    @classmethod
    def from_args(cls, args: Namespace) -> PackageConfig:
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


def inspect_model_file(path: Path) -> bool:
    """Check that ``path`` defines a module-level ``handler``; return whether it imports
    ``base_handler``. The file is parsed, never imported (it would pull in torch)."""
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except SyntaxError as exc:
        raise ArchiverError(f"{path} is not valid Python: {exc.msg} (line {exc.lineno})") from exc
    defines_handler = False
    for node in tree.body:
        if isinstance(node, ast.Assign):
            names = [t.id for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            names = [node.target.id] if isinstance(node.target, ast.Name) else []
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names = [node.name]
        else:
            continue
        defines_handler = defines_handler or HANDLER_ATTRIBUTE in names
    if not defines_handler:
        raise ArchiverError(
            f"{path.name} defines no module-level '{HANDLER_ATTRIBUTE}'; "
            "expected handler = handler_factory(init_function=..., ...)"
        )
    for any_node in ast.walk(tree):
        if isinstance(any_node, ast.ImportFrom) and any_node.module == "base_handler":
            return True
        if isinstance(any_node, ast.Import) and any(
            a.name == "base_handler" for a in any_node.names
        ):
            return True
    return False


def find_tarballs(paths: list[str]) -> list[str]:
    """The extra files that are tar archives, after checking their members are safe to unpack.

    Plain source files may be passed alongside; a file named like a tarball that is not one
    only warns, since the handler will not be able to unpack it.
    """
    tarballs = []
    for item in paths:
        path = Path(item)
        if not path.is_file():
            continue  # reported by the archiver as a missing file
        if not tarfile.is_tarfile(path):
            if path.name.endswith((".tar", ".tar.gz", ".tgz")):
                log.warning("%s is not a tar archive; the handler cannot unpack it", item)
            continue
        try:
            validate_tar_members(path)
        except ArchiveError as exc:
            raise ArchiverError(str(exc)) from exc
        tarballs.append(item)
    return tarballs


def _check_config(config_file: str, tarballs: list[str]) -> None:
    """Warn when ``system.extraFiles`` and the tarball given disagree (seed 002 needs both)."""
    import yaml

    try:
        data = yaml.safe_load(require_file(config_file, "Config file").read_text("utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        detail = " ".join(str(exc).split())
        raise ArchiverError(f"{config_file} is not valid YAML ({detail})") from exc
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ArchiverError(f"{config_file} must hold a YAML mapping")
    system = data.get("system")
    declared = system.get("extraFiles") if isinstance(system, Mapping) else None
    names = [os.path.basename(t) for t in tarballs]
    if names and declared not in names:
        log.warning(
            "%s: system.extraFiles is %r, so the handler will not unpack %s",
            config_file,
            declared,
            ", ".join(names),
        )
    elif declared and not names:
        log.warning(
            "%s: system.extraFiles names %r but no tarball was given", config_file, declared
        )


def build_package(config: PackageConfig) -> Path:
    """Build the archive and return its path (see the module docstring for the layout)."""
    model_file = require_file(config.model_file, "Model file")
    if model_file.suffix != ".py":
        raise ArchiverError(f"Model file must be a Python file: {config.model_file}")
    wants_shim = inspect_model_file(model_file)
    extras = [p.strip() for p in (config.extra_files or "").split(",") if p.strip()]
    tarballs = find_tarballs(extras)
    if config.config_file:
        _check_config(config.config_file, tarballs)
    wants_shim = wants_shim and not any(os.path.basename(p) == "base_handler.py" for p in extras)

    with tempfile.TemporaryDirectory(prefix="flambeau-package-") as tmp:
        if wants_shim:
            shim = Path(tmp, "base_handler.py")
            shim.write_text(BASE_HANDLER_SHIM, encoding="utf-8")
            extras.append(str(shim))
        return generate_model_archive(
            ModelArchiverConfig(
                model_name=config.model_name,
                handler=f"{config.model_file}:{HANDLER_ATTRIBUTE}",
                version=config.version,
                serialized_file=config.checkpoint_file,
                extra_files=",".join(extras) or None,
                export_path=config.export_path,
                archive_format=config.archive_format,
                force=config.force,
                requirements_file=config.requirements_file,
                config_file=config.config_file,
            )
        )


def package_parser(prog: str = "flambeau package") -> argparse.ArgumentParser:
    """build.sh's flags (``--model_name``); the dashed spellings are accepted too."""
    p = argparse.ArgumentParser(
        prog=prog,
        description="Build a .mar from a model file that defines handler = handler_factory(...).",
    )
    p.add_argument("--model_name", "--model-name", required=True, help="Model name")
    p.add_argument(
        "--model_file",
        "--model-file",
        required=True,
        help="Python file with init_function, preprocess/postprocess and the handler instance",
    )
    p.add_argument("--config_file", "--config-file", help="model-config yaml (system: keys)")
    p.add_argument("--requirements_file", "--requirements-file", help="requirements.txt")
    p.add_argument(
        "--checkpoint_file", "--checkpoint-file", required=True, help="state_dict checkpoint"
    )
    p.add_argument("--version", "-v", required=True, help="Model version, e.g. 1.0")
    p.add_argument(
        "--extra_files",
        "--extra-files",
        help="Source tarball (tar -cvf x.tar.gz ...) named in system.extraFiles; "
        "a comma list may add plain files too",
    )
    p.add_argument("--export_path", "--export-path", help="Output directory (default: cwd)")
    p.add_argument(
        "--archive_format", "--archive-format", default="default", choices=ARCHIVE_FORMATS
    )
    p.add_argument("-f", "--force", action="store_true", help="Overwrite an existing archive")
    return p


def package_main(argv: list[str]) -> int:
    """``flambeau package``: 0 on success, 1 on bad input, 2 on bad usage."""
    return run_cli(
        package_parser(), argv, lambda args: build_package(PackageConfig.from_args(args))
    )
