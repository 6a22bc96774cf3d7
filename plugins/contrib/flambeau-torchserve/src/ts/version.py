"""The TorchServe release whose interfaces this package reproduces (``ts.__version__``).

It is the compatibility level, not flambeau's version (``flambeau --version`` says that), so
code that branches on ``ts.__version__`` takes its TorchServe 0.12 path.
"""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.12.0"
