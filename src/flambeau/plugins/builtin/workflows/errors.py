"""The workflow errors clients see, in flambeau's one hierarchy (rendered per transport).

Type names follow TorchServe where it has one (``WorkflowNotFoundException``,
``InvalidDAGException``); the version error mirrors the models API's.
"""

from __future__ import annotations

from flambeau.api import BadRequestError, InternalServerError, NotFoundError


class WorkflowNotFoundError(NotFoundError):
    error_type = "WorkflowNotFoundException"


class WorkflowVersionNotFoundError(NotFoundError):
    error_type = "WorkflowVersionNotFoundException"


class WorkflowSpecError(BadRequestError):
    """A workflow refused at registration: bad spec, bad DAG, missing function or archive."""

    error_type = "InvalidDAGException"


class NodeExecutionError(InternalServerError):
    """A node that failed on every attempt; the message names the node (TorchServe's shape)."""

    def __init__(self, node: str, attempts: int, reason: str) -> None:
        super().__init__(
            f"Failed to execute workflow Node after {attempts} attempts : "
            f"Error executing {node} ({reason})"
        )
        self.node = node
        self.attempts = attempts
        self.reason = reason
