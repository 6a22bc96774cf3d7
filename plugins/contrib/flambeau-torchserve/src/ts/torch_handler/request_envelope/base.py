"""``BaseEnvelope``: wraps a handler's ``handle(data, context)`` with parse / format steps.

A subclass turns the rows of a batch into what the handler expects (``parse_input``) and the
handler's results back into one response per request (``format_output``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

__all__ = ["BaseEnvelope"]


class BaseEnvelope(ABC):
    """TorchServe's envelope contract: ``handle`` = parse, call the handler, format."""

    def __init__(self, handle_fn: Callable[[Any, Any], Any]) -> None:
        self._handle_fn = handle_fn
        self.context: Any = None

    def handle(self, data: Any, context: Any) -> Any:
        self.context = context
        # Empty input (a function handler's initialisation call) and empty results pass as is.
        if data:
            data = self.parse_input(data)
        results = self._handle_fn(data, context)
        if results:
            results = self.format_output(results)
        return results

    @abstractmethod
    def parse_input(self, data: Any) -> Any:
        """The batch's rows -> the handler's input."""

    @abstractmethod
    def format_output(self, data: Any) -> Any:
        """The handler's output -> one response per request."""
