"""VisionHandler: the base of the image handlers (TorchServe's ``vision_handler``).

Each request's ``data``/``body`` is image bytes (or a base64 string of them), decoded with
Pillow and transformed with ``image_processing`` (torchvision), or a nested list of numbers
(C x H x W), used as is: that path needs neither Pillow nor torchvision.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from typing import Any

from flambeau.handler.base_handler import BaseHandler
from flambeau.handler.context import Context
from flambeau.handler.utils import timed

__all__ = ["LazyTransform", "VisionHandler", "import_vision"]


def import_vision(feature: str = "decoding image bytes") -> tuple[Any, Any]:
    """``(PIL.Image, torchvision.transforms)``, or ImportError naming what to install."""
    try:
        from PIL import Image
        from torchvision import transforms
    except ImportError as exc:
        raise ImportError(
            f"{feature} needs torchvision and Pillow (pip install torchvision pillow); "
            "without them, send images as JSON nested lists of floats (C x H x W)"
        ) from exc
    return Image, transforms


class LazyTransform:
    """A class attribute holding a torchvision transform, built on first access.

    ``image_processing = LazyTransform(lambda T: T.Compose([...]))`` keeps the module
    importable without torchvision; subclasses may still assign a transform directly.
    """

    def __init__(self, build: Callable[[Any], Any]) -> None:
        self._build = build
        self._value: Any = None

    def __get__(self, instance: object, owner: type | None = None) -> Any:
        if self._value is None:
            _, transforms = import_vision(f"{getattr(owner, '__name__', 'handler')} transforms")
            self._value = self._build(transforms)
        return self._value


class VisionHandler(BaseHandler):
    """Stacks one image tensor per request into a batch on ``self.device``."""

    image_processing: Any = LazyTransform(lambda T: T.ToTensor())

    def __init__(self) -> None:
        super().__init__()
        self.ig: Any = None

    def initialize(self, context: Context) -> None:
        super().initialize(context)
        self.initialized = True
        if not context.system_properties.get("limit_max_image_pixels"):
            try:
                from PIL import Image
            except ImportError:
                return  # no Pillow: no decompression-bomb limit to lift either
            Image.MAX_IMAGE_PIXELS = None

    @timed
    def preprocess(self, data: list[dict[str, Any]]) -> Any:
        import torch

        images = []
        for row in data:
            image = row.get("data") or row.get("body")
            if isinstance(image, str):
                image = base64.b64decode(image)  # base64-encoded image bytes
            if isinstance(image, bytes | bytearray):
                pil_image, _ = import_vision()
                image = self.image_processing(pil_image.open(io.BytesIO(image)))
            else:
                image = torch.as_tensor(image, dtype=torch.float32)
            images.append(image)
        return torch.stack(images).to(self.device)

    def get_insights(self, tensor_data: Any, raw_data: Any, target: Any = 0) -> Any:
        """Integrated-gradients attributions (needs Captum)."""
        if self.ig is None:
            try:
                from captum.attr import IntegratedGradients
            except ImportError as exc:
                raise ImportError("explanations need Captum: pip install captum") from exc
            self.ig = IntegratedGradients(self.model)
        return self.ig.attribute(tensor_data, target=target, n_steps=15).tolist()
