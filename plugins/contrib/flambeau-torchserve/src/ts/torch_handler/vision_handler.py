"""``ts.torch_handler.vision_handler``: TorchServe's builtin handler, from flambeau.

VisionHandler (the base of the image handlers: image bytes or nested lists in) is flambeau's
:mod:`flambeau.handler.defaults.vision_handler`; subclass it exactly as for TorchServe.
"""

from __future__ import annotations

from flambeau.handler.defaults.vision_handler import VisionHandler

__all__ = ["VisionHandler"]
