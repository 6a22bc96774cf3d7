"""``ts.torch_handler.text_handler``: TorchServe's builtin handler, from flambeau.

TextHandler (the base of the text handlers: vocabulary, text cleanup) is flambeau's
:mod:`flambeau.handler.defaults.text_handler`; subclass it exactly as for TorchServe.
"""

from __future__ import annotations

from flambeau.handler.defaults.text_handler import TextHandler

__all__ = ["TextHandler"]
