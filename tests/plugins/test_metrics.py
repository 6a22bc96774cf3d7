"""The metrics plugin and the core's metric registry, in process: the exposition writer (Java
simpleclient 0.9.0's exact text), the registry's admission rules, modes, metrics.yaml, the log
sink's lines and the system probes."""

from __future__ import annotations

import asyncio
import logging
import re
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from flambeau.api import ConfigError, MetricRecord
from flambeau.core.config import Config
from flambeau.core.logs import REQUEST_ID, RequestIdFilter, SizeRotatingFileHandler
from flambeau.core.metrics import EXTRA, HOSTNAME, MODEL, Metrics
from flambeau.plugins.builtin.cors import cors_headers
from flambeau.plugins.builtin.metrics.log_sink import LogSink, format_line
from flambeau.plugins.builtin.metrics.prometheus import java_double, render
from flambeau.plugins.builtin.metrics.settings import (
    MetricsMode,
    apply_settings,
    load_settings,
    parse_metrics_yaml,
)
from flambeau.plugins.builtin.metrics.system import (
    CommandProbe,
    HostProbe,
    NvmlProbe,
    Sample,
    SystemMetricsCollector,
    parse_metric_line,
)

# The line TorchServe's postman collections match on the Prometheus text.
POSTMAN_REQUESTS_2XX = re.compile(r'Requests2XX\{Level="Host",Hostname=".*",\} \d+\.\d+')


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (8.0, "8.0"),
        (23596.972999999998, "23596.972999999998"),
        (1e-4, "1.0E-4"),
        (0.001, "0.001"),
        (0.0012345, "0.0012345"),
        (9999999.0, "9999999.0"),
        (1e7, "1.0E7"),
        (123456789.0, "1.23456789E8"),
        (1.5e300, "1.5E300"),
        (0.0, "0.0"),
        (-0.0, "-0.0"),
        (-2.5, "-2.5"),
        (100.0, "100.0"),
        (0.1 + 0.2, "0.30000000000000004"),
        (float("nan"), "NaN"),
        (float("inf"), "Infinity"),
    ],
)
def test_java_double(value: float, text: str) -> None:
    assert java_double(value) == text


def _metrics() -> Metrics:
    metrics = Metrics()
    requests = metrics.family("Requests2XX", "counter", "Count", ("Level", "Hostname"))
    requests.inc(("Host", "h1"))
    requests.inc(("Host", "h1"))
    metrics.family("Requests5XX", "counter", "Count", ("Level", "Hostname"))
    queue = metrics.family("QueueTime", "gauge", "Milliseconds", ("Level", "Hostname"))
    queue.set(("Host", 'we"ird\\host\n'), 1e-4)
    sizes = metrics.family("batch", "histogram", "Count", ("model_name",), buckets=(1, 4))
    for size in (1, 3, 8):
        sizes.observe(("m",), size)
    return metrics


def test_exposition_is_simpleclient_0_9_text() -> None:
    text = render(_metrics().families.values())
    assert text == (
        "# HELP Requests2XX Torchserve prometheus counter metric with unit: Count\n"
        "# TYPE Requests2XX counter\n"
        'Requests2XX{Level="Host",Hostname="h1",} 2.0\n'
        "# HELP Requests5XX Torchserve prometheus counter metric with unit: Count\n"
        "# TYPE Requests5XX counter\n"
        "# HELP QueueTime Torchserve prometheus gauge metric with unit: Milliseconds\n"
        "# TYPE QueueTime gauge\n"
        'QueueTime{Level="Host",Hostname="we\\"ird\\\\host\\n",} 1.0E-4\n'
        "# HELP batch Torchserve prometheus histogram metric with unit: Count\n"
        "# TYPE batch histogram\n"
        'batch_bucket{model_name="m",le="1.0",} 1.0\n'
        'batch_bucket{model_name="m",le="4.0",} 2.0\n'
        'batch_bucket{model_name="m",le="+Inf",} 3.0\n'
        'batch_count{model_name="m",} 3.0\n'
        'batch_sum{model_name="m",} 12.0\n'
    )
    assert POSTMAN_REQUESTS_2XX.search(text)


def test_exposition_parses_with_prometheus_client() -> None:
    parsed = {
        f.name: f for f in text_string_to_metric_families(render(_metrics().families.values()))
    }
    assert parsed["Requests2XX"].type == "counter"
    assert [s.value for s in parsed["Requests2XX"].samples] == [2.0]
    assert parsed["Requests5XX"].samples == []
    assert parsed["QueueTime"].samples[0].labels["Hostname"] == 'we"ird\\host\n'
    buckets = {s.labels.get("le"): s.value for s in parsed["batch"].samples if "le" in s.labels}
    assert buckets == {"1.0": 1.0, "4.0": 2.0, "+Inf": 3.0}


def test_name_filter_keeps_only_the_named_families() -> None:
    families = _metrics().families.values()
    text = render(families, {"QueueTime", "batch_count"})
    assert "# TYPE QueueTime gauge" in text
    assert "# TYPE batch histogram" in text
    assert "Requests2XX" not in text


def test_registry_refuses_a_second_shape_for_one_name() -> None:
    metrics = Metrics()
    metrics.family("QueueTime", "gauge", "Milliseconds", ("Level", "Hostname"))
    with pytest.raises(ConfigError, match="QueueTime"):
        metrics.family("QueueTime", "counter", "Milliseconds", ("Level", "Hostname"))
    with pytest.raises(ConfigError, match="unknown type"):
        metrics.family("Odd", "summary", "Count", ())


class _Collecting:
    def __init__(self) -> None:
        self.records: list[MetricRecord] = []

    def record(self, record: MetricRecord) -> None:
        self.records.append(record)


class _Broken:
    def record(self, record: MetricRecord) -> None:
        raise RuntimeError("sink down")


def test_updates_reach_the_sinks_and_a_broken_sink_is_contained() -> None:
    collected = _Collecting()
    metrics = Metrics([_Broken(), collected])
    family = metrics.family("Requests2XX", "counter", "Count", ("Level", "Hostname"))
    family.inc(("Host", "h"))
    family.inc(("Host", "h"), 2.0)
    assert family.values == {("Host", "h"): 3.0}
    assert [(r.name, r.value, r.metric_type) for r in collected.records] == [
        ("Requests2XX", 1.0, "COUNTER"),
        ("Requests2XX", 2.0, "COUNTER"),
    ]
    assert collected.records[0].dimensions == (("Level", "Host"), ("Hostname", "h"))
    family.enabled = False
    family.inc(("Host", "h"))
    assert len(collected.records) == 2


def _handler_record(name: str, value: float, kind: str = "COUNTER", **dims: str) -> MetricRecord:
    dimensions = tuple(dims.items()) or (("ModelName", "m"), ("Level", "Model"))
    return MetricRecord(name, value, "Count", dimensions, kind, request_id="req-1")


def test_handler_metrics_follow_metrics_yaml() -> None:
    collected = _Collecting()
    metrics = Metrics([collected])
    declared = parse_metrics_yaml(
        "model_metrics:\n  counter:\n    - name: Declared\n      unit: Count\n"
        "      dimensions: [ModelName, Level]\n"
    ).model
    metrics.declare_model_metrics(declared, auto_detect=False)
    metrics.record(_handler_record("Declared", 2))
    metrics.record(_handler_record("Declared", 3))
    metrics.record(_handler_record("Undeclared", 1))
    metrics.record(_handler_record("Declared", 1, Other="x"))  # wrong dimensions: dropped
    assert metrics.families["Declared"].values == {("m", "Model", HOSTNAME): 5.0}
    assert metrics.families["Declared"].origin == MODEL
    assert "Undeclared" not in metrics.families
    assert [r.request_id for r in collected.records] == ["req-1", "req-1"]
    metrics.declare_model_metrics(declared, auto_detect=True)
    metrics.record(_handler_record("Undeclared", 1, "GAUGE"))
    assert metrics.families["Undeclared"].kind == "gauge"


def test_handler_metric_clashing_with_a_server_metric_is_dropped() -> None:
    metrics = Metrics()
    metrics.family("QueueTime", "gauge", "Milliseconds", ("Level", "Hostname"))
    metrics.record(_handler_record("QueueTime", 1))
    assert metrics.families["QueueTime"].values == {}


def test_modes_decide_exposure_and_logging() -> None:
    metrics = Metrics()
    counter = metrics.family("ts_inference_requests_total", "counter", "Count", ("model_name",))
    requests = metrics.family("Requests2XX", "counter", "Count", ("Level", "Hostname"))
    extra = metrics.family("flambeau_batch_size", "histogram", "Count", (), origin=EXTRA)
    log, prometheus, legacy = MetricsMode.LOG, MetricsMode.PROMETHEUS, MetricsMode.LEGACY
    assert [log.exposes(f) for f in (counter, requests, extra)] == [False, False, False]
    assert [prometheus.exposes(f) for f in (counter, requests, extra)] == [True, True, True]
    assert [legacy.exposes(f) for f in (counter, requests, extra)] == [True, False, False]
    assert [log.logs(f) for f in (counter, requests, extra, None)] == [True, True, False, True]
    assert [prometheus.logs(f) for f in (counter, requests, None)] == [False, False, False]
    assert [legacy.logs(f) for f in (counter, requests, None)] == [False, True, True]
    with pytest.raises(ConfigError, match="metrics_mode"):
        MetricsMode.from_config(Config.load(cli={"metrics_mode": "statsd"}, environ={}))


def test_default_metrics_yaml_declares_torchserve_defaults() -> None:
    settings = load_settings(Config.load(cli={}, environ={}))
    frontend = {spec.name: spec for spec in settings.declared.frontend}
    assert frontend["Requests2XX"].dimensions == ("Level", "Hostname")
    assert frontend["GPUUtilization"].dimensions == ("Level", "DeviceId", "Hostname")
    assert frontend["ts_inference_latency_microseconds"].unit == "Microseconds"
    assert {spec.name for spec in settings.declared.model} == {"HandlerTime", "PredictionTime"}
    assert settings.mode is MetricsMode.LOG
    assert settings.auto_detect is False


def test_metrics_yaml_errors_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ts_metrics"):
        parse_metrics_yaml("ts_metrics:\n  summary: []\n")
    with pytest.raises(ConfigError, match="needs a name"):
        parse_metrics_yaml("model_metrics:\n  counter:\n    - unit: Count\n")
    # Only safe loading: a Python object tag is an error, not an object.
    with pytest.raises(ConfigError, match="metrics_config"):
        parse_metrics_yaml("ts_metrics: !!python/object/apply:os.system ['true']\n")
    missing = Config.load(cli={"metrics_config": str(tmp_path / "nope.yaml")}, environ={})
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(missing)


def test_apply_settings_switches_off_undeclared_server_metrics(tmp_path: Path) -> None:
    yaml_file = tmp_path / "metrics.yaml"
    yaml_file.write_text(
        "ts_metrics:\n  counter:\n    - name: Requests2XX\n      unit: Count\n"
        "      dimensions: [Level, Hostname]\n"
    )
    metrics = Metrics()
    requests = metrics.family("Requests2XX", "counter", "Count", ("Level", "Hostname"))
    queue = metrics.family("QueueTime", "gauge", "Milliseconds", ("Level", "Hostname"))
    extra = metrics.family("flambeau_batch_size", "histogram", "Count", (), origin=EXTRA)
    config = Config.load(cli={"metrics_config": str(yaml_file)}, environ={})
    apply_settings(metrics, load_settings(config))
    assert (requests.enabled, queue.enabled, extra.enabled) == (True, False, True)
    clash = tmp_path / "clash.yaml"
    clash.write_text(
        "ts_metrics:\n  counter:\n    - name: QueueTime\n      unit: Count\n      dimensions: []\n"
    )
    with pytest.raises(ConfigError, match="QueueTime"):
        apply_settings(metrics, load_settings(Config.load(cli={"metrics_config": str(clash)})))


def test_log_lines_are_torchserve_lines() -> None:
    frontend = MetricRecord("Requests2XX", 1.0, "Count", (("Level", "Host"), ("Hostname", "h")))
    assert format_line(frontend, hostname="other", timestamp=1700000000.7) == (
        "Requests2XX.Count:1.0|#Level:Host|#hostname:h,timestamp:1700000000"
    )
    handler = MetricRecord(
        "HandlerTime", 2.5, "Milliseconds", (("ModelName", "m"), ("Level", "Model")), "GAUGE", "r1"
    )
    assert format_line(handler, hostname="h", timestamp=1.0) == (
        "HandlerTime.Milliseconds:2.5|#ModelName:m,Level:Model|#hostname:h,requestID:r1,timestamp:1"
    )
    assert parse_metric_line(format_line(handler, hostname="h", timestamp=1.0)) == Sample(
        "HandlerTime", "Milliseconds", 2.5, (("ModelName", "m"), ("Level", "Model"))
    )


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.name, record.getMessage()))


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("log", ["Requests2XX", "ts_inference_requests_total", "Custom"]),
        ("legacy", ["Requests2XX", "Custom"]),
        ("prometheus", []),
    ],
)
def test_log_sink_writes_what_the_mode_logs(mode: str, expected: list[str]) -> None:
    metrics = Metrics()
    server = SimpleNamespace(metrics=metrics, config=Config.load(cli={"metrics_mode": mode}))
    metrics.sinks = [LogSink(server)]
    lines = _Lines()
    loggers = [logging.getLogger(f"flambeau.metrics.{n}") for n in ("frontend", "model")]
    for logger in loggers:
        logger.addHandler(lines)
        logger.setLevel(logging.INFO)
    try:
        metrics.family("Requests2XX", "counter", "Count", ("Level", "Hostname")).inc(("Host", "h"))
        labels = ("model_name", "model_version", "hostname")
        total = metrics.family("ts_inference_requests_total", "counter", "Count", labels)
        total.inc(("m", "default", "h"))
        extra = metrics.family("flambeau_request_seconds", "histogram", "Seconds", (), origin=EXTRA)
        extra.observe((), 0.1)
        metrics.record(_handler_record("Custom", 1))
    finally:
        for logger in loggers:
            logger.removeHandler(lines)
    assert [message.split(".")[0] for _, message in lines.lines] == expected
    files = {message.split(".")[0]: name for name, message in lines.lines}
    if "Custom" in files:
        assert files["Custom"] == "flambeau.metrics.model"
        assert files["Requests2XX"] == "flambeau.metrics.frontend"


def test_host_probe_reports_torchserve_system_metrics() -> None:
    samples = {s.name: s for s in HostProbe().collect()}
    assert set(samples) == {
        "CPUUtilization",
        "MemoryUsed",
        "MemoryAvailable",
        "MemoryUtilization",
        "DiskUsage",
        "DiskUtilization",
        "DiskAvailable",
    }
    assert 0.0 <= samples["CPUUtilization"].value <= 100.0
    assert samples["MemoryUsed"].value > 0
    assert samples["MemoryAvailable"].unit == "Megabytes"
    assert samples["DiskAvailable"].unit == "Gigabytes"
    assert samples["DiskUsage"].dimensions == (("Level", "Host"),)


class _FakeNvml:
    """Stands in for the NVML library (pynvml) on a machine without an NVIDIA GPU."""

    class NVMLError(Exception):
        pass

    def __init__(self, gpus: int, *, fail_init: bool = False) -> None:
        self.gpus = gpus
        self.fail_init = fail_init
        self.shut = False

    def nvmlInit(self) -> None:
        if self.fail_init:
            raise self.NVMLError("Driver Not Loaded")

    def nvmlShutdown(self) -> None:
        self.shut = True

    def nvmlDeviceGetCount(self) -> int:
        return self.gpus

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
        return SimpleNamespace(used=(handle + 1) * 1024 * 1024 * 1024, total=4 * 1024**3)

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> Any:
        return SimpleNamespace(gpu=10 * (handle + 1), memory=0)


def test_gpu_probe_only_where_nvml_answers() -> None:
    assert NvmlProbe.open(nvml=_FakeNvml(2, fail_init=True)) is None  # type: ignore[arg-type]
    assert NvmlProbe.open(nvml=_FakeNvml(0)) is None  # type: ignore[arg-type]
    assert NvmlProbe.open(0, nvml=_FakeNvml(2)) is None  # type: ignore[arg-type]
    fake = _FakeNvml(3)
    probe = NvmlProbe.open(2, nvml=fake)  # type: ignore[arg-type]
    assert probe is not None
    samples = probe.collect()
    by_device = {(s.name, dict(s.dimensions)["DeviceId"]): s.value for s in samples}
    assert by_device == {
        ("GPUMemoryUtilization", "0"): 25.0,
        ("GPUMemoryUsed", "0"): 1024.0,
        ("GPUUtilization", "0"): 10.0,
        ("GPUMemoryUtilization", "1"): 50.0,
        ("GPUMemoryUsed", "1"): 2048.0,
        ("GPUUtilization", "1"): 20.0,
    }
    probe.close()
    assert fake.shut


def test_command_probe_reads_metric_lines() -> None:
    script = (
        "print('CPUUtilization.Percent:12.5|#Level:Host|#hostname:x,timestamp:1');"
        "print('noise');"
        "print('GPUUtilization.Percent:50.0|#Level:Host,DeviceId:1|#hostname:x,1700000000')"
    )
    probe = CommandProbe(f'{sys.executable} -c "{script}"', timeout_s=30)
    assert probe.collect() == [
        Sample("CPUUtilization", "Percent", 12.5),
        Sample("GPUUtilization", "Percent", 50.0, (("Level", "Host"), ("DeviceId", "1"))),
    ]


class _ListProbe:
    def __init__(self, samples: list[Sample]) -> None:
        self.samples = samples

    def collect(self) -> list[Sample]:
        return self.samples

    def close(self) -> None:
        return None


class _FailingProbe(_ListProbe):
    def collect(self) -> list[Sample]:
        raise OSError("GPU fell off the bus")


def test_collector_sets_declared_gauges_only() -> None:
    metrics = Metrics()
    cpu = metrics.family("CPUUtilization", "gauge", "Percent", ("Level", "Hostname"))
    gpu = metrics.family("GPUUtilization", "gauge", "Percent", ("Level", "DeviceId", "Hostname"))
    off = metrics.family("DiskUsage", "gauge", "Gigabytes", ("Level", "Hostname"))
    off.enabled = False
    probe = _ListProbe(
        [
            Sample("CPUUtilization", "Percent", 7.0),
            Sample("GPUUtilization", "Percent", 9.0, (("Level", "Host"), ("DeviceId", "0"))),
            Sample("GPUUtilization", "Percent", 9.0),  # no DeviceId: dropped
            Sample("DiskUsage", "Gigabytes", 3.0),
            Sample("NotDeclared", "Count", 1.0),
        ]
    )
    collector = SystemMetricsCollector(metrics, [_FailingProbe([]), probe], interval_s=60)
    asyncio.run(collector.collect_once())
    assert cpu.values == {("Host", HOSTNAME): 7.0}
    assert gpu.values == {("Host", "0", HOSTNAME): 9.0}
    assert off.values == {}
    assert "NotDeclared" not in metrics.families


def test_cors_headers_come_from_configuration() -> None:
    assert cors_headers(Config.load(cli={}, environ={})) == ()
    config = Config.load(
        cli={"cors_allowed_origin": "https://app.example", "cors_allowed_methods": "GET, POST"},
        environ={},
    )
    assert cors_headers(config) == (
        ("Access-Control-Allow-Origin", "https://app.example"),
        ("Access-Control-Allow-Methods", "GET, POST"),
    )
    injected = Config.load(cli={"cors_allowed_headers": "X-A\r\nSet-Cookie: a=b"}, environ={})
    with pytest.raises(ConfigError, match="line break"):
        cors_headers(injected)


def test_log_files_rotate_at_their_size_limit(tmp_path: Path) -> None:
    path = tmp_path / "ts_metrics.log"
    path.write_text("x" * 90 + "\n")  # a file left by the previous run counts too
    handler = SizeRotatingFileHandler(path, max_bytes=100, backups=2)
    handler.setFormatter(logging.Formatter("%(message)s"))
    try:
        for index in range(6):
            handler.emit(logging.makeLogRecord({"msg": f"line {index} " + "y" * 30}))
    finally:
        handler.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["ts_metrics.log", "ts_metrics.log.1", "ts_metrics.log.2"]
    assert all(p.stat().st_size <= 100 for p in tmp_path.iterdir())
    assert path.read_text().splitlines()[-1].startswith("line 5 ")


def test_request_id_filter_tags_lines_of_a_request() -> None:
    tagged = RequestIdFilter()
    outside = logging.makeLogRecord({"msg": "m"})
    tagged.filter(outside)
    assert (outside.request_id, outside.request_tag) == ("", "")

    async def in_request() -> logging.LogRecord:
        REQUEST_ID.set("0f0e")
        record = logging.makeLogRecord({"msg": "m"})
        tagged.filter(record)
        return record

    inside = asyncio.run(in_request())
    assert (inside.request_id, inside.request_tag) == ("0f0e", " [0f0e]")
    assert REQUEST_ID.get() == ""  # the request's context ended with it
