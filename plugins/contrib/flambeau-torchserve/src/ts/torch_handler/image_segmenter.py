"""``ts.torch_handler.image_segmenter``: TorchServe's builtin handler, from flambeau.

ImageSegmenter (a per-pixel ``[class, probability]`` grid per image) is flambeau's
:mod:`flambeau.handler.defaults.image_segmenter`; subclass it exactly as for TorchServe.
"""

from __future__ import annotations

from flambeau.handler.defaults.image_segmenter import ImageSegmenter, ImangeSegmenter

__all__ = ["ImageSegmenter", "ImangeSegmenter"]
