"""ObjectDetector: boxes above a score threshold per image (TorchServe's default handler).

The model (torchvision detection style) returns one dict per image with ``boxes``, ``labels``
and ``scores``; every request gets a list of ``{label: [x1, y1, x2, y2], "score": s}``.
"""

from __future__ import annotations

from typing import Any

from flambeau.handler.defaults.vision_handler import LazyTransform, VisionHandler

__all__ = ["ObjectDetector"]


class ObjectDetector(VisionHandler):
    """Keeps detections whose score is at least ``threshold`` (0.5)."""

    image_processing: Any = LazyTransform(lambda T: T.Compose([T.ToTensor()]))
    threshold = 0.5

    def postprocess(self, data: Any) -> list[list[dict[str, Any]]]:
        result = []
        for row in data:
            keep = row["scores"] >= self.threshold
            boxes = row["boxes"][keep].tolist()
            labels = row["labels"][keep].tolist()
            scores = row["scores"][keep].tolist()
            detections = []
            for label, box, score in zip(labels, boxes, scores, strict=True):
                name = str(label)
                if self.mapping:
                    name = self.mapping.get(name, name)
                detections.append({name: box, "score": score})
            result.append(detections)
        return result
