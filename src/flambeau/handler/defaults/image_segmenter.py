"""ImageSegmenter: per-pixel ``[class, probability]`` (TorchServe's default handler).

The model returns a dict whose ``out`` is ``N x K x H x W`` scores (torchvision segmentation
models do); every request gets an ``H x W`` grid of ``[class index, probability]``.
"""

from __future__ import annotations

from typing import Any

from flambeau.handler.defaults.vision_handler import LazyTransform, VisionHandler

__all__ = ["ImageSegmenter", "ImangeSegmenter"]


class ImageSegmenter(VisionHandler):
    """Returns the most probable class and its probability for every pixel."""

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

    def postprocess(self, data: Any) -> list[Any]:
        import torch

        scores = data["out"] if isinstance(data, dict) else data
        prob = torch.nn.functional.softmax(scores, dim=1)
        top = torch.max(prob, dim=1)
        # Only the top class per pixel: every class's score would make responses huge.
        result = torch.stack([top.indices.to(top.values.dtype), top.values], dim=3)
        return result.tolist()


class ImangeSegmenter(ImageSegmenter):
    """The original, misspelled name, kept for compatibility."""
