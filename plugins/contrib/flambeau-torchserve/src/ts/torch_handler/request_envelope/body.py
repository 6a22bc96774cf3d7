"""``BodyEnvelope``: hands the handler each request's bare payload (``data``, else ``body``)."""

from __future__ import annotations

from typing import Any

from ts.torch_handler.request_envelope.base import BaseEnvelope

__all__ = ["BodyEnvelope"]


class BodyEnvelope(BaseEnvelope):
    def parse_input(self, data: Any) -> list[Any]:
        return [row.get("data") or row.get("body") for row in data]

    def format_output(self, data: Any) -> Any:
        return data
