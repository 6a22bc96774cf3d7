"""``ts.metrics.dimension``: a metric dimension, a ``name``/``value`` pair."""

from __future__ import annotations

from flambeau.handler.metrics import Dimension

__all__ = ["Dimension"]
