"""Metrics and logs over real HTTP against real server processes and real workers: the
``/metrics`` scrape in each mode (parsed with prometheus_client and checked line by line against
the simpleclient 0.9.0 format), handler metrics, system metrics, and TorchServe's log files."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from flambeau.core.plugins import load_plugins
from flambeau.testing.fixtures import Response, ServerProcess

ROOT = Path(__file__).resolve().parents[2]
METRICS_PLUGIN = "flambeau.plugins.builtin.metrics.plugin"
WORKERS_PLUGIN = "flambeau.plugins.builtin.workers.plugin"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# TorchServe's postman collections match this on the scrape.
POSTMAN_REQUESTS_2XX = re.compile(r'Requests2XX\{Level="Host",Hostname=".*",\} \d+\.\d+')
# One sample line of simpleclient 0.9.0: every label followed by a comma, a Java double.
JAVA_DOUBLE = r"-?(?:\d+\.\d+(?:E-?\d+)?|NaN|Infinity)|[+-]Inf"
SAMPLE_LINE = re.compile(
    rf'^[A-Za-z_:][\w:]*(?:\{{(?:[A-Za-z_]\w*="(?:[^"\\]|\\.)*",)+\}})? (?:{JAVA_DOUBLE})$'
)
# A TorchServe metric log line (log4j2 "%d{ISO8601} - %m").
STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d,\d{3}"
FRONTEND_LINE = re.compile(
    rf"^{STAMP} - (?P<name>\w+)\.(?P<unit>\w+):(?P<value>[-\d.E]+)\|#(?P<dims>[^|]*)"
    r"\|#hostname:[^,]+,timestamp:\d+$"
)
MODEL_LINE = re.compile(
    rf"^{STAMP} - (?P<name>\w+)\.(?P<unit>\w+):(?P<value>[-\d.E]+)\|#(?P<dims>[^|]*)"
    r"\|#hostname:[^,]+,requestID:(?P<request>[\w-]+),timestamp:\d+$"
)
ACCESS_LINE = re.compile(
    rf'^{STAMP} - /127\.0\.0\.1:\d+ "(?P<method>[A-Z]+) (?P<uri>\S+) HTTP/1\.1" (?P<code>\d+) \d+$'
)

METRICS_HANDLER = """
def handle(data, context):
    if data is None:
        return None
    for index, _ in enumerate(data):
        context.metrics.add_counter("CustomRequests", 1, index)
        context.metrics.add_time("CustomTime", 2.5, index)
        context.metrics.add_counter("UndeclaredCount", 1, index)
    return [row.get("body") or row.get("data") or b"" for row in data]
"""
DEFAULT_METRICS_YAML = (
    ROOT / "src" / "flambeau" / "plugins" / "builtin" / "metrics" / "metrics.yaml"
)


def _plugin_args(*modules: str) -> list[str]:
    """``-p`` flags for the modules that are not already registered as entry points."""
    registered = set(load_plugins().module_paths())
    return [flag for module in modules if module not in registered for flag in ("-p", module)]


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _build_archives(store: Path, *, demo: bool) -> None:
    from flambeau.archiver.cli import archive_main

    store.mkdir(parents=True, exist_ok=True)
    handler = store.parent / "metrics_handler.py"
    handler.write_text(METRICS_HANDLER)
    argv = ["--model-name", "custom", "--version", "1.0", "--handler", str(handler)]
    assert archive_main([*argv, "--export-path", str(store), "--force"]) == 0
    if demo:
        build = ROOT / "examples" / "demo" / "build.py"
        subprocess.run([sys.executable, str(build), str(store)], check=True, capture_output=True)


def _start(workdir: Path, config: dict[str, str], models: list[str]) -> ServerProcess:
    inference, management, metrics = _free_ports(3)
    listeners = {
        "inference_address": f"http://127.0.0.1:{inference}",
        "management_address": f"http://127.0.0.1:{management}",
        "metrics_address": f"http://127.0.0.1:{metrics}",
        "default_workers_per_model": "1",
    }
    args = ["--models", *models, *_plugin_args(WORKERS_PLUGIN, METRICS_PLUGIN)]
    return ServerProcess(
        workdir, model_store=workdir / "store", config={**listeners, **config}, args=args
    )


@dataclass(frozen=True, slots=True)
class Scrape:
    """One scrape: the raw text, its families' types, and every sample prometheus_client parsed."""

    text: str
    types: dict[str, str]
    samples: list[Sample]

    def value(self, name: str, **labels: str) -> float:
        # prometheus_client adds "_total" to counter samples that the text names without it.
        return sum(
            sample.value
            for sample in self.samples
            if sample.name in (name, f"{name}_total")
            and all(sample.labels.get(k) == v for k, v in labels.items())
        )

    def labels(self, name: str) -> list[dict[str, str]]:
        return [s.labels for s in self.samples if s.name in (name, f"{name}_total")]


def _scrape(server: ServerProcess, query: str = "") -> Scrape:
    response = server.request("GET", "metrics", f"/metrics{query}")
    assert response.status == 200
    assert response.header("Content-Type") == CONTENT_TYPE
    text = response.body.decode()
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, flags=re.MULTILINE))
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    return Scrape(text, types, samples)


# ------------------------------------------------------------------------ prometheus mode


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Token authorization on (default), prometheus mode, the demo model and a metrics model."""
    workdir = tmp_path_factory.mktemp("prometheus")
    _build_archives(workdir / "store", demo=True)
    config = {"metrics_mode": "prometheus", "model_metrics_auto_detect": "true"}
    server = _start(workdir, config, ["demo=demo.mar", "custom=custom.mar"])
    yield server
    server.stop()


def _predict(server: ServerProcess, model: str, body: str) -> Response:
    key = server.keys["inference"]["key"]
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    response = server.request(
        "POST", "inference", f"/predictions/{model}", body=body, headers=headers
    )
    assert response.status == 200, response.body
    return response


def test_counters_move_with_predictions(prometheus: ServerProcess) -> None:
    before = _scrape(prometheus)
    demo = {"model_name": "demo", "model_version": "default"}
    for _ in range(3):
        _predict(prometheus, "demo", "[[5.1, 3.5, 1.4, 0.2]]")
    after = _scrape(prometheus)

    def moved(name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    assert moved("ts_inference_requests_total", **demo) == 3.0
    assert moved("ts_inference_latency_microseconds", **demo) > 0
    # The 3 predictions and the first scrape; the second scrape is counted after it answers.
    assert moved("Requests2XX", Level="Host") == 4.0
    assert moved("flambeau_request_seconds_count", **demo) == 3.0
    assert moved("flambeau_batch_size_count", model_name="demo", model_version="1.0") >= 1.0
    assert moved("flambeau_batch_seconds_count", model_name="demo", model_version="1.0") >= 1.0
    assert {"ModelName": "demo", "Level": "Model", "Hostname": socket.gethostname()} in (
        after.labels("HandlerTime")
    )
    assert after.value("HandlerTime", ModelName="demo") > 0


def test_handler_custom_metrics_are_exposed(prometheus: ServerProcess) -> None:
    before = _scrape(prometheus)
    for _ in range(2):
        _predict(prometheus, "custom", "{}")
    after = _scrape(prometheus, "?name[]=CustomRequests&name[]=CustomTime&name[]=UndeclaredCount")
    assert after.types == {
        "CustomRequests": "counter",
        "CustomTime": "gauge",
        "UndeclaredCount": "counter",
    }
    labels = {"ModelName": "custom", "Level": "Model"}
    assert after.value("CustomRequests", **labels) - before.value("CustomRequests", **labels) == 2
    assert after.value("CustomTime", **labels) == 2.5


def test_exposition_format_is_simpleclient_0_9(prometheus: ServerProcess) -> None:
    _predict(prometheus, "demo", "[[1, 2, 3, 4]]")
    text = prometheus.request("POST", "metrics", "/metrics").body.decode()
    assert POSTMAN_REQUESTS_2XX.search(text)
    samples = [line for line in text.splitlines() if not line.startswith("#")]
    assert samples
    assert [line for line in samples if not SAMPLE_LINE.match(line)] == []
    assert "_total{" not in text.replace("ts_inference_requests_total{", "")
    assert "# HELP Requests2XX Torchserve prometheus counter metric with unit: Count\n" in text
    assert "# TYPE HandlerTime gauge\n" in text
    # A family that never had a sample still prints its HELP and TYPE.
    assert (
        "# HELP WorkerThreadTime Torchserve prometheus gauge metric with unit: Milliseconds\n"
        "# TYPE WorkerThreadTime gauge\n# HELP"
    ) in text


def test_system_metrics_are_collected(prometheus: ServerProcess) -> None:
    families = _scrape(prometheus, "?name[]=CPUUtilization&name[]=MemoryUsed&name[]=DiskAvailable")
    assert set(families.types) == {"CPUUtilization", "MemoryUsed", "DiskAvailable"}
    assert 0.0 <= families.value("CPUUtilization", Level="Host") <= 100.0
    assert families.value("MemoryUsed", Level="Host") > 0
    assert families.value("DiskAvailable", Level="Host") > 0


def test_metrics_api_routing(prometheus: ServerProcess) -> None:
    for method, path in [
        ("PUT", "/metrics"),
        ("DELETE", "/metrics/"),
        ("GET", "/metrics/anything"),
    ]:
        response = prometheus.request(method, "metrics", f"{path}?name[]=Requests4XX")
        assert response.status == 200, (method, path)
        assert response.body.startswith(b"# HELP Requests4XX ")
    assert prometheus.request("GET", "metrics", "/metricsx").status == 404
    description = prometheus.request("OPTIONS", "metrics", "/").json()
    assert set(description["paths"]) == {"/metrics"}
    assert prometheus.request("GET", "metrics", "/").status == 405


# ------------------------------------------------------------------------------- log mode


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The default log mode, with a metrics.yaml that declares one of the handler's metrics."""
    workdir = tmp_path_factory.mktemp("logged")
    _build_archives(workdir / "store", demo=False)
    # TorchServe's defaults, with one of the handler's metrics declared and HandlerTime gone.
    declared = yaml.safe_load(DEFAULT_METRICS_YAML.read_text())
    declared["model_metrics"] = {
        "counter": [
            {"name": "CustomRequests", "unit": "Count", "dimensions": ["ModelName", "Level"]}
        ],
        "gauge": [{"name": "PredictionTime", "unit": "ms", "dimensions": ["ModelName", "Level"]}],
    }
    yaml_file = workdir / "metrics.yaml"
    yaml_file.write_text(yaml.safe_dump(declared))
    server = _start(workdir, {"metrics_config": str(yaml_file)}, ["custom=custom.mar"])
    yield server
    server.stop()


def _lines(server: ServerProcess, name: str) -> list[str]:
    return (server.log_dir / name).read_text().splitlines()


def _inference_key(server: ServerProcess) -> dict[str, str]:
    return {"Authorization": f"Bearer {server.keys['inference']['key']}"}


def test_log_mode_writes_metric_logs_and_exposes_nothing(logged: ServerProcess) -> None:
    scrape = logged.request("GET", "metrics", "/metrics")
    assert scrape.status == 200
    assert scrape.header("Content-Type") == CONTENT_TYPE
    assert scrape.body == b""
    response = logged.request(
        "POST", "inference", "/predictions/custom", body=b"{}", headers=_inference_key(logged)
    )
    assert response.status == 200
    request_id = response.header("x-request-id")
    logged.stop()  # flushes and closes the logs

    frontend = [FRONTEND_LINE.match(line) for line in _lines(logged, "ts_metrics.log")]
    assert all(frontend), _lines(logged, "ts_metrics.log")
    names = {m["name"] for m in frontend if m}
    assert {"Requests2XX", "ts_inference_requests_total", "QueueTime", "CPUUtilization"} <= names
    assert not any(name.startswith("flambeau_") for name in names)
    requests = [m for m in frontend if m and m["name"] == "Requests2XX"]
    assert (requests[0]["unit"], requests[0]["value"], requests[0]["dims"]) == (
        "Count",
        "1.0",
        "Level:Host",
    )
    total = next(m for m in frontend if m and m["name"] == "ts_inference_requests_total")
    assert total["dims"] == "model_name:custom,model_version:default"

    model = [MODEL_LINE.match(line) for line in _lines(logged, "model_metrics.log")]
    assert all(model), _lines(logged, "model_metrics.log")
    by_name = {m["name"]: m for m in model if m}
    # Declared in metrics.yaml: logged; UndeclaredCount and CustomTime are dropped.
    assert set(by_name) == {"CustomRequests", "PredictionTime"}
    assert by_name["CustomRequests"]["dims"] == "ModelName:custom,Level:Model"
    assert by_name["CustomRequests"]["request"] == request_id

    access = [ACCESS_LINE.match(line) for line in _lines(logged, "access_log.log")]
    assert all(access), _lines(logged, "access_log.log")
    assert [(m["method"], m["uri"], m["code"]) for m in access if m] == [
        ("GET", "/metrics", "200"),
        ("POST", "/predictions/custom", "200"),
    ]


@pytest.fixture(scope="module")
def scaled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    workdir = tmp_path_factory.mktemp("scaled")
    _build_archives(workdir / "store", demo=False)
    server = _start(
        workdir,
        {"disable_token_authorization": "true", "metrics_mode": "legacy"},
        ["custom=custom.mar"],
    )
    yield server
    server.stop()


def test_legacy_mode_and_request_ids_in_the_server_log(scaled: ServerProcess) -> None:
    assert _scrape(scaled).types == {
        "ts_inference_requests_total": "counter",
        "ts_inference_latency_microseconds": "counter",
        "ts_queue_latency_microseconds": "counter",
    }
    scale = scaled.request("PUT", "management", "/models/custom?min_worker=2&synchronous=true")
    assert scale.status == 200, scale.body
    request_id = scale.header("x-request-id")
    scaled.stop()
    server_log = _lines(scaled, "ts_log.log")
    tagged = [line for line in server_log if f"[{request_id}] - " in line]
    assert any("worker 9001 ready" in line for line in tagged), server_log
    # Legacy mode logs what it does not expose.
    metric_names = {
        m["name"] for m in map(FRONTEND_LINE.match, _lines(scaled, "ts_metrics.log")) if m
    }
    assert "Requests2XX" in metric_names
    assert "ts_inference_requests_total" not in metric_names
    assert json.loads(scale.body) == {"status": "Workers scaled to 2 for model: custom"}
