"""A TorchServe-style BaseHandler for Linear43: one row of 4 numbers in, 3 numbers out.

Behind an envelope each row is one instance, as with TorchServe's envelopes. Until the worker
unwraps envelope rows (ENVELOPE_ROW_HEADER), a row may still arrive as ``{"body": row}``.
"""

from __future__ import annotations

import torch

from flambeau.handler.base_handler import BaseHandler


class LinearHandler(BaseHandler):
    def preprocess(self, data):
        rows = [r["body"] if isinstance(r, dict) and set(r) == {"body"} else r for r in data]
        return torch.as_tensor(rows, dtype=torch.float32)
