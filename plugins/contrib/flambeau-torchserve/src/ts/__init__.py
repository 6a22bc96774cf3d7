"""TorchServe's ``ts`` import paths, served by flambeau (the ``flambeau-torchserve`` package).

Handlers written for TorchServe 0.12 import ``ts.torch_handler.base_handler``, ``ts.context``,
``ts.utils.util`` and friends; each module here re-exports flambeau's handler SDK under that
name, so one class, one exception type and one context serve both spellings.
"""

from __future__ import annotations

from ts.version import __version__

__all__ = ["__version__"]
