"""The ``ts`` import paths TorchServe handlers use resolve to flambeau's own objects."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

# (TorchServe import path, name, flambeau module that must provide the very same object)
SAME_OBJECTS = [
    ("ts.context", "Context", "flambeau.handler.context"),
    ("ts.context", "RequestProcessor", "flambeau.handler.context"),
    ("ts.torch_handler.base_handler", "BaseHandler", "flambeau.handler.base_handler"),
    (
        "ts.torch_handler.vision_handler",
        "VisionHandler",
        "flambeau.handler.defaults.vision_handler",
    ),
    (
        "ts.torch_handler.image_classifier",
        "ImageClassifier",
        "flambeau.handler.defaults.image_classifier",
    ),
    (
        "ts.torch_handler.image_segmenter",
        "ImageSegmenter",
        "flambeau.handler.defaults.image_segmenter",
    ),
    (
        "ts.torch_handler.object_detector",
        "ObjectDetector",
        "flambeau.handler.defaults.object_detector",
    ),
    ("ts.torch_handler.text_handler", "TextHandler", "flambeau.handler.defaults.text_handler"),
    (
        "ts.torch_handler.text_classifier",
        "TextClassifier",
        "flambeau.handler.defaults.text_classifier",
    ),
    (
        "ts.torch_handler.contractions",
        "CONTRACTION_MAP",
        "flambeau.handler.defaults.contractions",
    ),
    ("ts.utils.util", "PredictionException", "flambeau.handler.utils"),
    ("ts.utils.util", "map_class_to_label", "flambeau.handler.utils"),
    ("ts.utils.util", "load_label_mapping", "flambeau.handler.utils"),
    ("ts.utils.util", "list_classes_from_module", "flambeau.handler.utils"),
    ("ts.utils.util", "get_yaml_config", "flambeau.handler.utils"),
    ("ts.handler_utils.utils", "send_intermediate_predict_response", "flambeau.handler.utils"),
    (
        "ts.protocol.otf_message_handler",
        "send_intermediate_predict_response",
        "flambeau.handler.utils",
    ),
    ("ts.handler_utils.timer", "timed", "flambeau.handler.utils"),
    ("ts.metrics.dimension", "Dimension", "flambeau.handler.metrics"),
    ("ts.metrics.metric_type_enum", "MetricTypes", "flambeau.handler.metrics"),
    ("ts.metrics.caching_metric", "CachingMetric", "flambeau.handler.metrics"),
    ("ts.metrics.metric_cache_errors", "MetricsCacheTypeError", "flambeau.handler.metrics"),
]


@pytest.mark.parametrize(("ts_module", "name", "flambeau_module"), SAME_OBJECTS)
def test_ts_name_is_flambeaus_object(ts_module: str, name: str, flambeau_module: str) -> None:
    ours = getattr(importlib.import_module(ts_module), name)
    assert ours is getattr(importlib.import_module(flambeau_module), name)


def test_metric_cache_abstract_is_the_type_of_context_metrics() -> None:
    from ts.context import Context
    from ts.metrics.metric_cache_abstract import MetricCacheAbstract

    context = Context("m", "/tmp", None, 1, None, "0.12.0")
    assert isinstance(context.metrics, MetricCacheAbstract)


def test_units_table_is_torchserves() -> None:
    from ts.metrics.unit import Units

    units = Units().units
    assert (units["ms"], units["MB"], units[None], units[""]) == (
        "Milliseconds",
        "Megabytes",
        "unit",
        "unit",
    )


def test_prediction_exception_keeps_torchserves_shape() -> None:
    from ts.utils.util import PredictionException

    error = PredictionException("nope", 418)
    assert (error.message, error.error_code, str(error)) == ("nope", 418, "nope : 418")


def test_version_is_the_compatibility_level() -> None:
    import ts
    import ts.version

    assert ts.__version__ == ts.version.__version__ == "0.12.0"


def test_arg_parser_parses_a_torchserve_command_line() -> None:
    from ts.arg_parser import ArgParser

    args = ArgParser.extract_args(["--start", "--ncs", "--model-store", "ms", "--models", "a.mar"])
    assert (args.start, args.no_config_snapshots, args.model_store, args.models) == (
        True,
        True,
        "ms",
        ["a.mar"],
    )


def test_importing_ts_handlers_does_not_import_torch() -> None:
    # The server process imports handler modules' names without paying for torch.
    code = (
        "import sys, ts.context, ts.torch_handler.base_handler, "
        "ts.torch_handler.image_classifier, ts.torch_handler.text_classifier, "
        "ts.torch_handler.request_envelope.kservev2, ts.utils.util, ts.handler_utils.utils; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
