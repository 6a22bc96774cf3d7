"""Model (.mar) and workflow (.war) archives, compatible with TorchServe's archivers.

Usable without the server: packing (:func:`generate_model_archive`,
:func:`generate_workflow_archive`) and safe reading (:func:`open_model_archive`,
:func:`open_workflow_archive`) import neither tornado, grpc nor torch.
"""

from __future__ import annotations

from flambeau.archiver.errors import (
    ArchiveError,
    ArchiveNotFoundError,
    ArchiverError,
    ArchiveTooLargeError,
    InvalidArchiveError,
    ManifestError,
    UnsafeArchiveError,
)
from flambeau.archiver.model_archiver import ModelArchiverConfig, generate_model_archive
from flambeau.archiver.reader import (
    Manifest,
    ModelArchive,
    WorkflowArchive,
    WorkflowManifest,
    open_model_archive,
    open_workflow_archive,
)
from flambeau.archiver.workflow_archiver import WorkflowArchiverConfig, generate_workflow_archive

__all__ = [
    "ArchiveError",
    "ArchiveNotFoundError",
    "ArchiveTooLargeError",
    "ArchiverError",
    "InvalidArchiveError",
    "Manifest",
    "ManifestError",
    "ModelArchive",
    "ModelArchiverConfig",
    "UnsafeArchiveError",
    "WorkflowArchive",
    "WorkflowArchiverConfig",
    "WorkflowManifest",
    "generate_model_archive",
    "generate_workflow_archive",
    "open_model_archive",
    "open_workflow_archive",
]
