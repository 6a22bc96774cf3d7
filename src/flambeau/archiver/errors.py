"""Errors of packing (:class:`ArchiverError`) and of reading (:class:`ArchiveError`) archives.

Reading errors are client-visible when the server registers a model, so they extend the server's
error hierarchy (400 ``InvalidModelException``, like TorchServe) and carry a one-line message.
"""

from __future__ import annotations

from flambeau.errors import BadRequestError


class ArchiveError(BadRequestError):
    """A model or workflow archive that cannot be used; the message is one user-facing line."""

    error_type = "InvalidModelException"


class ArchiveNotFoundError(ArchiveError):
    """The archive path does not exist (TorchServe answers 404 ``Model not found at: <url>``)."""

    status = 404
    error_type = "ModelNotFoundException"


class InvalidArchiveError(ArchiveError):
    """Not a zip / tar archive, or a corrupt one (bad CRC, truncated stream, encrypted member)."""


class UnsafeArchiveError(ArchiveError):
    """A member that would escape the extraction directory or is not a plain file or directory."""


class ArchiveTooLargeError(ArchiveError):
    """The archive declares or expands to more bytes (or members) than allowed."""


class ManifestError(ArchiveError):
    """A bad manifest: not JSON, unknown runtime, or naming a file the archive lacks."""


class ArchiverError(Exception):
    """Packing failed because of the user's input (bad name, missing file, output exists).

    The command-line entry points print it as ``ERROR - <message>`` and exit with status 1,
    like torch-model-archiver, but without a traceback.
    """
