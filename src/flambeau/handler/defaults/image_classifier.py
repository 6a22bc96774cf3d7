"""ImageClassifier: top-k ``{label: probability}`` per image (TorchServe's default handler).

Images are resized to 256, center-cropped to 224 and normalised with the ImageNet statistics;
labels come from ``index_to_name.json`` when the archive has one.
"""

from __future__ import annotations

from typing import Any

from flambeau.handler.defaults.vision_handler import LazyTransform, VisionHandler
from flambeau.handler.utils import map_class_to_label

__all__ = ["ImageClassifier"]


class ImageClassifier(VisionHandler):
    """Returns, for every image, the ``topk`` (5) most probable classes."""

    topk = 5
    image_processing: Any = LazyTransform(
        lambda T: T.Compose(
            [
                T.Resize(256),
                T.CenterCrop(224),
                T.ToTensor(),
                T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
            ]
        )
    )

    def set_max_result_classes(self, topk: int) -> None:
        self.topk = topk

    def get_max_result_classes(self) -> int:
        return self.topk

    def postprocess(self, data: Any) -> list[dict[str, float]]:
        import torch
        import torch.nn.functional as F

        ps = F.softmax(data, dim=1)
        # min(): TorchServe fails on models with fewer than topk classes.
        probs, classes = torch.topk(ps, min(self.topk, ps.shape[1]), dim=1)
        return map_class_to_label(probs.tolist(), self.mapping, classes.tolist())
