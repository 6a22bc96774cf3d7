"""``JSONEnvelope``: TensorFlow-Serving style ``{"instances": [...]}`` in, ``{"predictions"}`` out.

The instances of every request in the batch are joined into one list for the handler
(``{"b64": ...}`` instances and columns decoded to bytes); the handler's outputs are split
back by each request's instance count, each request answered with a JSON string.
"""

from __future__ import annotations

import json
from base64 import b64decode
from collections.abc import Callable
from itertools import chain
from typing import Any

from ts.torch_handler.request_envelope.base import BaseEnvelope

__all__ = ["JSONEnvelope"]


def _is_b64(value: Any) -> bool:
    return isinstance(value, dict) and list(value) == ["b64"]


class JSONEnvelope(BaseEnvelope):
    def __init__(self, handle_fn: Callable[[Any, Any], Any]) -> None:
        super().__init__(handle_fn)
        self._lengths: list[int] = []  # instances per request of the batch being served

    def parse_input(self, data: Any) -> list[Any]:
        lengths, batch = self._batch_from_json(data)
        self._lengths = lengths
        return batch

    def format_output(self, data: Any) -> list[str]:
        return self._batch_to_json(data, self._lengths)

    def _batch_from_json(self, data_rows: Any) -> tuple[list[int], list[Any]]:
        mini_batches = [self._from_json(row) for row in data_rows]
        return [len(mini) for mini in mini_batches], list(chain.from_iterable(mini_batches))

    def _from_json(self, data: Any) -> list[Any]:
        rows: list[Any] = (data.get("data") or data.get("body") or data)["instances"]
        if rows and isinstance(rows[0], dict):
            for index, row in enumerate(rows):
                if _is_b64(row):
                    rows[index] = b64decode(row["b64"])
                    continue
                for column, value in row.items():
                    if _is_b64(value):
                        row[column] = b64decode(value["b64"])
        return rows

    def _batch_to_json(self, batch: Any, lengths: list[int]) -> list[str]:
        outputs = []
        cursor = 0
        for length in lengths:
            outputs.append(self._to_json(batch[cursor : cursor + length]))
            cursor += length
        return outputs

    def _to_json(self, output: Any) -> str:
        return json.dumps({"predictions": output})
