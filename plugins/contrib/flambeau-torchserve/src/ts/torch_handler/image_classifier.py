"""``ts.torch_handler.image_classifier``: TorchServe's builtin handler, from flambeau.

ImageClassifier (top-5 ``{label: probability}`` per image) is flambeau's
:mod:`flambeau.handler.defaults.image_classifier`; subclass it exactly as for TorchServe.
"""

from __future__ import annotations

from flambeau.handler.defaults.image_classifier import ImageClassifier

__all__ = ["ImageClassifier"]
