"""A TorchServe class handler, as written for TorchServe 0.12: BaseHandler subclass, metrics,
label mapping, and a PredictionException for input it refuses."""

import torch

from ts.metrics.dimension import Dimension
from ts.metrics.metric_type_enum import MetricTypes
from ts.torch_handler.base_handler import BaseHandler
from ts.utils.util import PredictionException, map_class_to_label


class TinyClassifier(BaseHandler):
    def preprocess(self, data):
        rows = []
        for row in data:
            values = row.get("data") or row.get("body")
            if not isinstance(values, list) or len(values) != 4:
                raise PredictionException("expected a JSON list of 4 numbers", 422)
            rows.append(values)
        self.context.metrics.add_counter(
            "TinyRequests", len(rows), dimensions=[Dimension("Handler", "TinyClassifier")]
        )
        return torch.as_tensor(rows, dtype=torch.float32, device=self.device)

    def postprocess(self, data):
        gauge = self.context.metrics.add_metric_to_cache(
            "TinyBatchSize", "count", metric_type=MetricTypes.GAUGE
        )
        gauge.add_or_update(data.shape[0])
        return map_class_to_label(torch.softmax(data, dim=1).tolist(), self.mapping)
