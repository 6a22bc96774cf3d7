"""The archiver's plugin: contributes ``flambeau archive``, ``archive-workflow`` and ``package``.

Registered under the ``flambeau`` entry-point group as ``archiver``. The command modules are
imported only when a command runs, so listing commands stays cheap.
"""

from __future__ import annotations

from flambeau.api import CommandSpec, hookimpl


def _archive(argv: list[str]) -> int:
    from flambeau.archiver.cli import archive_main

    return archive_main(argv)


def _archive_workflow(argv: list[str]) -> int:
    from flambeau.archiver.cli import archive_workflow_main

    return archive_workflow_main(argv)


def _package(argv: list[str]) -> int:
    from flambeau.archiver.package import package_main

    return package_main(argv)


@hookimpl
def flambeau_commands() -> list[CommandSpec]:
    """The three archive commands."""
    return [
        CommandSpec(
            name="archive",
            help="Package a model into a .mar / .tar.gz / directory (torch-model-archiver flags)",
            main=_archive,
        ),
        CommandSpec(
            name="archive-workflow",
            help="Package a workflow into a .war (torch-workflow-archiver flags)",
            main=_archive_workflow,
        ),
        CommandSpec(
            name="package",
            help="Build a .mar from a handler_factory model file (seed 002's build.sh)",
            main=_package,
        ),
    ]
