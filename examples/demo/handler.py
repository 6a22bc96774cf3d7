"""The demo handler: JSON rows of 4 numbers in, a label and probabilities per row out.

Written exactly as a TorchServe handler would be (BaseHandler subclass), so the same file works
under TorchServe through flambeau's `ts` compatibility package.
"""

from __future__ import annotations

import json

import torch

from flambeau.handler.base_handler import BaseHandler


class DemoHandler(BaseHandler):
    def preprocess(self, data):
        rows = []
        for item in data:
            payload = item.get("data") or item.get("body")
            if isinstance(payload, (bytes, bytearray)):
                payload = json.loads(payload)
            if isinstance(payload, dict):
                payload = payload.get("instances", payload.get("data"))
            rows.append(torch.as_tensor(payload, dtype=torch.float32).reshape(-1, 4))
        self._sizes = [len(r) for r in rows]
        return torch.cat(rows)

    def postprocess(self, data):
        probabilities = torch.softmax(data, dim=1).tolist()
        labels = self.mapping or {str(i): str(i) for i in range(3)}
        answers = [
            {"label": labels[str(max(range(3), key=p.__getitem__))], "probabilities": p}
            for p in probabilities
        ]
        out, start = [], 0
        for size in self._sizes:
            out.append(answers[start : start + size])
            start += size
        return out
