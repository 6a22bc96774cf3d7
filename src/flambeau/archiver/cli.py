"""``flambeau archive`` and ``flambeau archive-workflow``: the archivers' command lines.

The flags, defaults and choices are torch-model-archiver 0.12's and torch-workflow-archiver
0.2.15's, so existing build scripts only change the program name. Each ``*_main`` takes argv
and returns an exit status: 0 success, 1 bad input (``ERROR - <message>`` on stderr, no
traceback), 2 bad usage (argparse).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from flambeau.archiver.errors import ArchiverError
from flambeau.archiver.manifest import RUNTIMES
from flambeau.archiver.model_archiver import (
    ARCHIVE_FORMATS,
    ModelArchiverConfig,
    generate_model_archive,
)
from flambeau.archiver.workflow_archiver import WorkflowArchiverConfig, generate_workflow_archive

_FORMAT_HELP = """\
The format in which the model artifacts are archived.
"default": <model-name>.mar, a deflated zip (what TorchServe hosts natively).
"zip-store": <model-name>.mar without compression, faster to build.
"tgz": <model-name>.tar.gz with everything under <model-name>/.
"no-archive": a plain directory export-path/<model-name>/ holding MAR-INF/MANIFEST.json."""


def model_parser(prog: str = "flambeau archive") -> argparse.ArgumentParser:
    """The parser for ``flambeau archive`` (torch-model-archiver's flags)."""
    p = argparse.ArgumentParser(
        prog=prog,
        description="Package a model into a TorchServe-compatible model archive.",
        formatter_class=argparse.RawTextHelpFormatter,
    )
    p.add_argument(
        "--model-name",
        required=True,
        help="Model name; the archive is <model-name>.mar (pattern ^[A-Za-z0-9][A-Za-z0-9_\\-.]*$)",
    )
    p.add_argument(
        "--serialized-file",
        help="Weights: a state_dict .pt/.pth (eager mode), a TorchScript .pt, an .onnx or .so",
    )
    p.add_argument(
        "--model-file", help="Python file with the model class (required for eager mode)"
    )
    p.add_argument(
        "--handler",
        required=True,
        help="A builtin handler name (image_classifier, ...) or a handler file,\n"
        "optionally with an entry point: handler.py[:function]",
    )
    p.add_argument(
        "--extra-files",
        help="Comma-separated files, directories (their contents) or glob patterns",
    )
    p.add_argument(
        "--runtime", default="python", choices=RUNTIMES, help='Runtime (default "python")'
    )
    p.add_argument(
        "--export-path",
        default=None,
        help="Directory for the archive, created if missing (default: current directory)",
    )
    p.add_argument(
        "--archive-format", default="default", choices=ARCHIVE_FORMATS, help=_FORMAT_HELP
    )
    p.add_argument("-f", "--force", action="store_true", help="Overwrite an existing archive")
    p.add_argument("-v", "--version", required=True, help="Model version")
    p.add_argument(
        "-r", "--requirements-file", help="requirements.txt of model-specific Python packages"
    )
    p.add_argument("-c", "--config-file", help="model-config yaml (batchSize, workers, ...)")
    return p


def workflow_parser(prog: str = "flambeau archive-workflow") -> argparse.ArgumentParser:
    """The parser for ``flambeau archive-workflow`` (torch-workflow-archiver's flags)."""
    p = argparse.ArgumentParser(
        prog=prog,
        description="Package a workflow (DAG spec + handler) into a .war archive.",
        formatter_class=argparse.RawTextHelpFormatter,
    )
    p.add_argument(
        "--workflow-name", required=True, help="Workflow name; the archive is <name>.war"
    )
    p.add_argument("--spec-file", required=True, help="Workflow DAG specification (.yaml)")
    p.add_argument("--handler", required=True, help="Python file with the DAG's function nodes")
    p.add_argument(
        "--export-path",
        default=None,
        help="Directory for the archive, created if missing (default: current directory)",
    )
    p.add_argument("-f", "--force", action="store_true", help="Overwrite an existing .war")
    p.add_argument(
        "--extra-files", help="Comma-separated files, directories (their contents) or globs"
    )
    return p


@contextmanager
def _stderr_logging() -> Iterator[None]:
    """Show the archiver's warnings (``WARNING - Overwriting ...``) like the real tools."""
    logger = logging.getLogger("flambeau.archiver")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s - %(message)s"))
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


def run_cli(parser: argparse.ArgumentParser, argv: list[str], action: Callable[..., object]) -> int:
    """Parse ``argv`` and run ``action(namespace)``, mapping outcomes to exit statuses."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2): report, don't exit
        return exc.code if isinstance(exc.code, int) else 2
    with _stderr_logging():
        try:
            action(args)
        except (ArchiverError, OSError) as exc:
            print(f"ERROR - {exc}", file=sys.stderr)
            return 1
    return 0


def archive_main(argv: list[str]) -> int:
    """``flambeau archive``: build a model archive."""
    return run_cli(
        model_parser(),
        argv,
        lambda args: generate_model_archive(ModelArchiverConfig.from_args(args)),
    )


def archive_workflow_main(argv: list[str]) -> int:
    """``flambeau archive-workflow``: build a workflow archive."""
    return run_cli(
        workflow_parser(),
        argv,
        lambda args: generate_workflow_archive(WorkflowArchiverConfig.from_args(args)),
    )


def package_main(argv: list[str]) -> int:
    """``flambeau package``: seed 002's build helper (see :mod:`flambeau.archiver.package`)."""
    from flambeau.archiver.package import package_main as main

    return main(argv)


if __name__ == "__main__":
    sys.exit(archive_main(sys.argv[1:]))
