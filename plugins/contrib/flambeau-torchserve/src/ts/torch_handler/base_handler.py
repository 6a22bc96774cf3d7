"""``ts.torch_handler.base_handler``: the BaseHandler that TorchServe handlers subclass.

It is :class:`flambeau.handler.base_handler.BaseHandler`, with the same methods and attributes
(initialize, preprocess, inference, postprocess, handle, model, device, mapping, manifest...).
"""

from __future__ import annotations

from flambeau.handler.base_handler import BaseHandler

__all__ = ["BaseHandler"]
