"""``ts.torch_handler.contractions``: the English contractions map text handlers expand.

flambeau's :mod:`flambeau.handler.defaults.contractions`, under TorchServe's module name.
"""

from __future__ import annotations

from flambeau.handler.defaults.contractions import CONTRACTION_MAP

__all__ = ["CONTRACTION_MAP"]
