"""``ts.utils.util``: PredictionException and the label / class / YAML helpers.

Raising this PredictionException fails the batch with its ``error_code`` and ``message``,
because it *is* flambeau's :class:`flambeau.handler.utils.PredictionException`.
"""

from __future__ import annotations

from flambeau.handler.utils import (
    PredictionException,
    get_yaml_config,
    list_classes_from_module,
    load_label_mapping,
    map_class_to_label,
)

__all__ = [
    "PredictionException",
    "get_yaml_config",
    "list_classes_from_module",
    "load_label_mapping",
    "map_class_to_label",
]
