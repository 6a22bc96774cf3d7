"""``torch-model-archiver`` and ``torch-workflow-archiver``: flambeau's archivers by those names.

The flags, defaults, outputs and exit statuses are those of ``flambeau archive`` and
``flambeau archive-workflow``, which reproduce torch-model-archiver 0.12.0 and
torch-workflow-archiver 0.2.15; only the program name in usage and help differs from them.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = ["model_archiver_main", "workflow_archiver_main"]


def model_archiver_main(argv: Sequence[str] | None = None) -> int:
    """The ``torch-model-archiver`` console script."""
    from flambeau.archiver.cli import model_parser, run_cli
    from flambeau.archiver.model_archiver import ModelArchiverConfig, generate_model_archive

    return run_cli(
        model_parser("torch-model-archiver"),
        list(sys.argv[1:] if argv is None else argv),
        lambda args: generate_model_archive(ModelArchiverConfig.from_args(args)),
    )


def workflow_archiver_main(argv: Sequence[str] | None = None) -> int:
    """The ``torch-workflow-archiver`` console script."""
    from flambeau.archiver.cli import run_cli, workflow_parser
    from flambeau.archiver.workflow_archiver import (
        WorkflowArchiverConfig,
        generate_workflow_archive,
    )

    return run_cli(
        workflow_parser("torch-workflow-archiver"),
        list(sys.argv[1:] if argv is None else argv),
        lambda args: generate_workflow_archive(WorkflowArchiverConfig.from_args(args)),
    )
