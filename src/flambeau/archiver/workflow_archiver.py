"""Build workflow archives (.war) the way torch-workflow-archiver 0.2.15 does.

A .war is a deflated zip of the DAG spec yaml, the handler holding the DAG's function nodes,
any extra files, and ``WAR-INF/MANIFEST.json``.
"""

from __future__ import annotations

import os
from argparse import Namespace
from dataclasses import dataclass, fields
from pathlib import Path

from flambeau.archiver import manifest as mf
from flambeau.archiver.errors import ArchiverError
from flambeau.archiver.packing import (
    Artifacts,
    add_extra_files,
    check_output,
    log,
    prepare_export_dir,
    require_file,
    write_zip,
)


@dataclass(frozen=True, slots=True)
class WorkflowArchiverConfig:
    """What to archive; field names follow torch-workflow-archiver's flags.

    ``handler`` is required: the real tool declares it optional but crashes without it, and
    the server needs it to resolve function nodes.
    """

    workflow_name: str
    spec_file: str
    handler: str
    export_path: str | None = None
    force: bool = False
    extra_files: str | None = None

    @classmethod
    def from_args(cls, args: Namespace) -> WorkflowArchiverConfig:
        """Build from an argparse namespace carrying one attribute per field."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


def generate_workflow_archive(config: WorkflowArchiverConfig) -> Path:
    """Build ``<export>/<workflow_name>.war`` and return its path."""
    if not mf.valid_name(config.workflow_name):
        raise ArchiverError(
            "Workflow name contains special characters.\n"
            "The allowed regular expression filter for workflow name is: "
            "^[A-Za-z0-9][A-Za-z0-9_\\-.]*$"
        )
    if not config.handler:
        raise ArchiverError("A workflow handler file is required (--handler)")
    export_dir = prepare_export_dir(config.export_path)
    dest = export_dir / f"{config.workflow_name}.war"
    check_output(dest, config.force, "workflow")

    artifacts = Artifacts(exclude=dest)
    for path, what in ((config.spec_file, "Spec file"), (config.handler, "Handler file")):
        artifacts.add_file(os.path.basename(path), require_file(path, what))
    # A superset of the real tool, which copies each comma item as a single plain file.
    if config.extra_files:
        add_extra_files(artifacts, config.extra_files)

    manifest = mf.workflow_manifest(
        workflow_name=config.workflow_name, spec_file=config.spec_file, handler=config.handler
    )
    write_zip(
        dest,
        artifacts.entries(mf.WORKFLOW_MANIFEST_PATH),
        mf.WORKFLOW_MANIFEST_PATH,
        mf.dumps(manifest),
    )
    log.info("Successfully exported workflow %s to file %s", config.workflow_name, dest)
    return dest
