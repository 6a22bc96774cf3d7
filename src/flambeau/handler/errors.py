"""Errors raised while loading a handler inside a worker.

Prediction-time failures never raise out of :meth:`ModelService.predict`; they become a
:class:`~flambeau.api.BatchResult` with a non-200 code. Load-time failures raise these, so the
worker transport can answer the load frame with ``status``/``message`` and exit.
"""

from __future__ import annotations

import traceback

from flambeau.errors import FlambeauError

__all__ = ["HandlerLoadError", "HandlerOutOfMemoryError"]


class HandlerLoadError(FlambeauError):
    """The handler could not be imported or initialised; ``__cause__`` is the original error.

    ``traceback_text`` holds the formatted traceback of the original exception, for transports
    that carry the error to another process (where ``__cause__`` does not survive).
    """

    status = 500
    error_type = "InternalServerException"

    def __init__(self, message: str, *, cause: BaseException | None = None) -> None:
        super().__init__(message)
        self.traceback_text = (
            "".join(traceback.format_exception(type(cause), cause, cause.__traceback__))
            if cause is not None
            else ""
        )


class HandlerOutOfMemoryError(HandlerLoadError):
    """Loading ran out of host or GPU memory (TorchServe answers the load frame with 507)."""

    status = 507
    error_type = "ServiceUnavailableException"
