"""The handler metrics API (context.metrics) and the records it produces."""

from __future__ import annotations

import logging

import pytest

from flambeau.api import MetricRecord
from flambeau.handler.metrics import (
    CachingMetric,
    Dimension,
    MetricsCache,
    MetricsCacheKeyError,
    MetricsCacheTypeError,
    MetricsCacheValueError,
    MetricTypes,
    normalize_unit,
)

MODEL_DIMS = (("ModelName", "m"), ("Level", "Model"))


@pytest.fixture
def cache() -> MetricsCache:
    metrics = MetricsCache("m")
    metrics.set_request_ids({0: "a", 1: "b"})
    return metrics


def test_typed_helpers_record_units_types_and_default_dimensions(cache: MetricsCache):
    cache.add_counter("Hits", 2, idx=1)
    cache.add_time("Latency", 12.5)
    cache.add_time("Wall", 1, unit="s", metric_type=MetricTypes.HISTOGRAM)
    cache.add_size("Mem", 3, unit="GB")
    cache.add_percent("Util", 55.5)
    cache.add_metric("Custom", 7, "widgets", idx=0, dimensions=[Dimension("Shard", 3)])
    cache.add_error("Failures", 1)

    assert cache.drain() == [
        MetricRecord("Hits", 2.0, "Count", MODEL_DIMS, "COUNTER", "b"),
        MetricRecord("Latency", 12.5, "Milliseconds", MODEL_DIMS, "GAUGE", "a,b"),
        MetricRecord("Wall", 1.0, "Seconds", MODEL_DIMS, "HISTOGRAM", "a,b"),
        MetricRecord("Mem", 3.0, "Gigabytes", MODEL_DIMS, "GAUGE", "a,b"),
        MetricRecord("Util", 55.5, "Percent", MODEL_DIMS, "GAUGE", "a,b"),
        MetricRecord("Custom", 7.0, "widgets", (("Shard", "3"), *MODEL_DIMS), "COUNTER", "a"),
        MetricRecord("Failures", 1.0, "unit", (("Level", "Error"),), "COUNTER", None),
    ]
    assert cache.drain() == []


def test_explicit_dimensions_are_not_overridden_and_not_shared(cache: MetricsCache):
    dims = [Dimension("Level", "Host")]
    cache.add_counter("A", 1, dimensions=dims)
    cache.add_counter("B", 1)
    assert dims == [Dimension("Level", "Host")]  # the caller's list is not mutated
    first, second = cache.drain()
    assert first.dimensions == (("Level", "Host"), ("ModelName", "m"))
    assert second.dimensions == MODEL_DIMS


def test_one_name_alternating_between_explicit_and_default_dimensions(cache: MetricsCache):
    cache.add_time("Step", 1, dimensions=[Dimension("Stage", "pre")])
    cache.add_time("Step", 2)
    cache.add_time("Step", 3)
    cache.add_error("Step", 1)
    cache.add_error("Step", 1)
    records = cache.drain()
    assert [r.dimensions for r in records] == [
        (("Stage", "pre"), *MODEL_DIMS),
        MODEL_DIMS,
        MODEL_DIMS,
        (("Level", "Error"),),
        (("Level", "Error"),),
    ]
    assert cache.get_metric("Step", MetricTypes.GAUGE).dimension_names == ["ModelName", "Level"]
    assert cache.get_metric("Step").dimension_names == ["Level"]


def test_default_dimensions_follow_the_model_name(cache: MetricsCache):
    cache.add_counter("Hits", 1)
    cache.model_name = "renamed"
    cache.add_counter("Hits", 1)
    first, second = cache.drain()
    assert first.dimensions == MODEL_DIMS
    assert second.dimensions == (("ModelName", "renamed"), ("Level", "Model"))


def test_unit_validation():
    cache = MetricsCache("m")
    with pytest.raises(MetricsCacheValueError):
        cache.add_time("T", 1, unit="min")
    with pytest.raises(ValueError, match="size"):
        cache.add_size("S", 1, unit="TB")
    assert normalize_unit("kB") == "Kilobytes"
    assert normalize_unit(None) == "unit"
    assert normalize_unit("Requests") == "Requests"


def test_metric_objects_from_the_cache(cache: MetricsCache, caplog: pytest.LogCaptureFixture):
    metric = cache.add_metric_to_cache("Queue", "count", ["Queue", "Kind"], MetricTypes.GAUGE)
    assert cache.get_metric("Queue", MetricTypes.GAUGE) is metric
    assert cache.get_metric("Queue", "gauge") is metric
    assert cache.cache_keys() == ["gauge:Queue"]
    metric.add_or_update(4, ["q1", "text"], "req-9")
    with caplog.at_level(logging.ERROR, logger="flambeau.handler.metrics"):
        metric.add_or_update(4, ["only-one"])  # wrong arity: logged, dropped
    assert "do not match" in caplog.text
    metric.update(5, "req-10", [Dimension("Zone", "eu")])
    assert cache.drain() == [
        MetricRecord("Queue", 4.0, "Count", (("Queue", "q1"), ("Kind", "text")), "GAUGE", "req-9"),
        MetricRecord("Queue", 5.0, "Count", (("Zone", "eu"),), "GAUGE", "req-10"),
    ]
    assert metric.dimension_names == ["Zone"]


def test_negative_counter_steps_and_non_numbers_are_dropped(cache: MetricsCache):
    counter = cache.add_metric_to_cache("C", "count", [])
    counter.add_or_update(-1, [])
    counter.add_or_update("3", [])
    counter.add_or_update(3, [])
    assert [r.value for r in cache.drain()] == [3.0]


def test_lookup_and_type_errors():
    cache = MetricsCache("m")
    with pytest.raises(MetricsCacheKeyError):
        cache.get_metric("absent")
    with pytest.raises(MetricsCacheTypeError):
        cache.add_metric_to_cache("x", "ms", metric_type="bogus")
    with pytest.raises(MetricsCacheTypeError):
        cache.add_metric_to_cache("x", "ms", dimension_names="Level")
    with pytest.raises(MetricsCacheTypeError):
        cache.add_counter("x", 1, dimensions=["not-a-dimension"])


def test_metrics_outside_a_batch_have_no_request_id():
    cache = MetricsCache("m")
    cache.add_counter("Loaded", 1)
    (record,) = cache.drain()
    assert record.request_id is None
    assert record.dimensions == MODEL_DIMS


def test_buffer_is_bounded(caplog: pytest.LogCaptureFixture):
    cache = MetricsCache("m", max_records=3)
    with caplog.at_level(logging.WARNING, logger="flambeau.handler.metrics"):
        for i in range(5):
            cache.add_counter("N", i)
    assert [r.value for r in cache.drain()] == [2.0, 3.0, 4.0]
    assert caplog.text.count("metrics buffer full") == 1


def test_standalone_metric_without_cache_does_not_fail():
    CachingMetric("Alone", "ms", ["A"]).add_or_update(1, ["x"])
