"""``ts.metrics.unit``: TorchServe's short unit names (``ms``, ``MB``...) and what they mean.

``Units().units`` is built from flambeau's :data:`flambeau.handler.metrics.UNIT_ALIASES`, the
table ``context.metrics`` itself applies.
"""

from __future__ import annotations

from flambeau.handler.metrics import UNIT_ALIASES

__all__ = ["Units"]


class Units:
    """``units``: short name (or None) -> the unit name that goes on the wire."""

    def __init__(self) -> None:
        self.units: dict[str | None, str] = dict(UNIT_ALIASES.items())
        self.units[None] = "unit"
