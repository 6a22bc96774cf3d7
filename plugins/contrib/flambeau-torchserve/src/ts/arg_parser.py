"""``ts.arg_parser``: TorchServe's ``ArgParser.ts_parser()``, the ``torchserve`` flags.

Scripts that build or inspect a TorchServe command line with it keep working.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from flambeau_torchserve.launcher import ts_parser

__all__ = ["ArgParser"]


class ArgParser:
    """The parser factory, under TorchServe's class name."""

    @staticmethod
    def ts_parser() -> argparse.ArgumentParser:
        return ts_parser()

    @staticmethod
    def extract_args(args: Sequence[str] | None = None) -> argparse.Namespace:
        return ts_parser().parse_args(args)
