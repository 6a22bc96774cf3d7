"""``ts.torch_handler.text_classifier``: TorchServe's builtin handler, from flambeau.

TextClassifier (``{label: probability}`` per text) is flambeau's
:mod:`flambeau.handler.defaults.text_classifier`; subclass it exactly as for TorchServe.
"""

from __future__ import annotations

from flambeau.handler.defaults.text_classifier import TextClassifier

__all__ = ["TextClassifier"]
