"""``ts.torch_handler.object_detector``: TorchServe's builtin handler, from flambeau.

ObjectDetector (boxes with labels and scores per image) is flambeau's
:mod:`flambeau.handler.defaults.object_detector`; subclass it exactly as for TorchServe.
"""

from __future__ import annotations

from flambeau.handler.defaults.object_detector import ObjectDetector

__all__ = ["ObjectDetector"]
