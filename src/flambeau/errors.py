"""The one error hierarchy of flambeau.

Every error a client can see is a :class:`FlambeauError` carrying an HTTP status, the TorchServe
exception class name that its wire format reports as ``type``, and a message. Each transport and
envelope renders it in its own shape (REST JSON, gRPC status, KServe ``{"error": ...}``).
"""

from __future__ import annotations


class FlambeauError(Exception):
    """Base of every client-visible error: ``status`` and ``error_type`` go on the wire."""

    status: int = 500
    error_type: str = "InternalServerException"

    def __init__(self, message: str, *, status: int | None = None, error_type: str | None = None):
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if error_type is not None:
            self.error_type = error_type

    def to_json(self) -> dict[str, object]:
        """The TorchServe error body: ``{"code", "type", "message"}``."""
        return {"code": self.status, "type": self.error_type, "message": self.message}


class BadRequestError(FlambeauError):
    status = 400
    error_type = "BadRequestException"


class InvalidKeyError(FlambeauError):
    """A missing or wrong token; TorchServe answers 400, not 401."""

    status = 400
    error_type = "InvalidKeyException"


class ForbiddenError(FlambeauError):
    """An authenticated identity that may not do this (flambeau's authorizer)."""

    status = 403
    error_type = "ForbiddenException"


class NotFoundError(FlambeauError):
    status = 404
    error_type = "ResourceNotFoundException"


class ModelNotFoundError(NotFoundError):
    error_type = "ModelNotFoundException"


class ModelVersionNotFoundError(NotFoundError):
    error_type = "ModelVersionNotFoundException"


class MethodNotAllowedError(FlambeauError):
    status = 405
    error_type = "MethodNotAllowedException"


class RequestTimeoutError(FlambeauError):
    status = 408
    error_type = "RequestTimeoutException"


class ConflictError(FlambeauError):
    status = 409
    error_type = "ConflictStatusException"


class PayloadTooLargeError(FlambeauError):
    status = 413
    error_type = "RequestEntityTooLargeException"


class InternalServerError(FlambeauError):
    status = 500
    error_type = "InternalServerException"


class ServiceUnavailableError(FlambeauError):
    status = 503
    error_type = "ServiceUnavailableException"


class ConfigError(Exception):
    """A bad configuration value; the CLI prints it on one line and exits non-zero."""


class PluginError(Exception):
    """A plugin that cannot be loaded or clashes with another; names plugin and distribution."""


RESOURCE_NOT_FOUND = "Requested resource is not found, please refer to API document."
METHOD_NOT_ALLOWED = "Requested method is not allowed, please refer to API document."
