"""``KServeEnvelope``: KServe v1 ``{"instances": [...]}`` of the first request in the batch.

Out comes ``[{"predictions": ...}]``, or ``[{"explanations": ...}]`` when the request header
``explain`` is ``True``. As in TorchServe, only the first request of a batch is read.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from ts.torch_handler.request_envelope.base import BaseEnvelope

__all__ = ["KServeEnvelope"]

logger = logging.getLogger(__name__)


class KServeEnvelope(BaseEnvelope):
    def parse_input(self, data: Any) -> Any:
        self._data_list = [row.get("data") or row.get("body") for row in data]
        body = self._data_list[0]
        # A KServe transformer or explainer forwards the body as bytes.
        if isinstance(body, bytes | bytearray):
            body = json.loads(body.decode())
        self._inputs = body.get("instances")
        logger.debug("kserve parsed inputs %s", self._inputs)
        return self._inputs

    def format_output(self, data: Any) -> list[dict[str, Any]]:
        key = "explanations" if self._is_explain() else "predictions"
        return [{key: data}]

    def _is_explain(self) -> bool:
        return bool(self.context) and self.context.get_request_header(0, "explain") == "True"
