"""``ts.model_server``: the ``torchserve`` command's entry point, ``start()``, as in TorchServe.

It runs :func:`flambeau_torchserve.launcher.main`: TorchServe's flags and messages, with
flambeau serving.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from flambeau_torchserve.launcher import main

__all__ = ["start"]


def start(argv: Sequence[str] | None = None) -> int:
    """``torchserve [--start | --stop | --version] ...``; returns the exit status."""
    return main(argv)


if __name__ == "__main__":
    sys.exit(start())
