"""Workflows on a real in-process server with ``thread`` workers (function nodes only, so fast).

Covers the executor (concurrent branches, inputs named after parents, bytes/JSON/tensor
hand-over, several leaves, retries, timeouts, failures), registration (versions, validation,
rollback, conflicts, gating, downloads), scaling and the per-node metrics.
"""

from __future__ import annotations

import functools
import http.server
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from workflow_support import InProcessServer, write_war

HANDLER = """
import io, json, os, time

CALLS = {"flaky": 0}


def _value(row):
    value = row.get("data") if row.get("data") is not None else row.get("body")
    if isinstance(value, (bytes, bytearray)):
        try:
            return json.loads(value)
        except ValueError:
            return bytes(value)
    return value


def start(data, context):
    if data is None:  # TorchServe initialises every function node with data=None
        return None
    return [_value(row) for row in data]


def left(data, context):
    if data is None:
        return None
    time.sleep(0.4)
    return [{"left": _value(row)} for row in data]


def right(data, context):
    if data is None:
        return None
    time.sleep(0.4)
    return [{"right": _value(row)} for row in data]


def join(data, context):
    if data is None:
        return None
    return [
        {"inputs": sorted(row), "left": json.loads(row["left"]), "right": json.loads(row["right"])}
        for row in data
    ]


def typed(data, context):
    if data is None:
        return None
    for i in range(len(data)):
        context.set_response_content_type(i, "application/json")
    return [{"n": 1, "items": [1, 2]} for _ in data]


def emit(data, context):
    if data is None:
        return None
    for i in range(len(data)):
        context.set_response_content_type(i, "application/octet-stream")
    return [bytes([0, 255, 128, 127]) for _ in data]


def tensor(data, context):
    if data is None:
        return None
    import torch
    return [torch.arange(4.0) for _ in data]


def raw(data, context):
    return None if data is None else [b"\\xff\\x00" for _ in data]


def text(data, context):
    return None if data is None else ["hello" for _ in data]


def seen(data, context):
    if data is None:
        return None
    out = []
    for row in data:
        value = row["body"]
        out.append({"type": type(value).__name__,
                    "value": value.hex() if isinstance(value, bytes) else value})
    return out


def seen_tensor(data, context):
    if data is None:
        return None
    import torch
    return [{"sum": float(torch.load(io.BytesIO(row["body"])).sum())} for row in data]


def flaky(data, context):
    if data is None:
        return None
    CALLS["flaky"] += 1
    if CALLS["flaky"] % 2 == 1:
        raise RuntimeError("fails every other call")
    return ["recovered"]


def boom(data, context):
    if data is None:
        return None
    if any(_value(row).get("explode") for row in data):
        raise RuntimeError("boom")
    return [{"ok": True} for _ in data]


def sleepy(data, context):
    if data is None:
        return None
    for row in data:
        flag = _value(row).get("flag")
        deadline = time.monotonic() + 10
        while flag and not os.path.exists(flag) and time.monotonic() < deadline:
            time.sleep(0.01)
    return ["awake" for _ in data]


def version(data, context):
    return None if data is None else [context.manifest["model"]["modelVersion"] for _ in data]


def broken_init(data, context):
    if data is None:
        raise RuntimeError("cannot initialise")
    return data
"""

SPECS = {
    "par": "models:\n  retry-attempts: 0\ndag:\n  start: [left, right]\n  left: [join]\n"
    "  right: [join]\n",
    "types": "dag:\n  start: [typed, emit, tensor, raw, text]\n  typed: [seen_typed]\n"
    "  emit: [seen_bytes]\n  tensor: [seen_tensor]\n",
    "flaky": "models:\n  retry-attempts: 1\ndag:\n  flaky: []\n",
    "boom": "models:\n  retry-attempts: 2\ndag:\n  start: [boom]\n",
    "sleepy": "models:\n  retry-attempts: 0\n  timeout-ms: 300\ndag:\n  sleepy: []\n",
    "ver": "dag:\n  version: []\n",
}
# Two more nodes that reuse `seen` under other names.
ALIASES = "\nseen_typed = seen\nseen_bytes = seen\n"


def war(server: InProcessServer, name: str, spec: str | None = None, **kw: object) -> Path:
    return write_war(server.store, name, spec or SPECS[name], HANDLER + ALIASES, **kw)  # type: ignore[arg-type]


def registered(server: InProcessServer, name: str) -> None:
    if name not in server.workflows.workflows:
        war(server, name)
        response = server.register(f"url={name}.war")
        assert response.status == 200, response.body


@pytest.fixture(scope="module")
def server(inproc: InProcessServer) -> InProcessServer:
    return inproc


def test_parallel_branches_run_concurrently_and_join_gets_named_inputs(
    server: InProcessServer,
) -> None:
    registered(server, "par")
    started = time.monotonic()
    response = server.predict("par", {"x": 1})
    elapsed = time.monotonic() - started
    assert response.status == 200, response.body
    assert response.header("Content-Type") == "application/json"
    assert response.json() == {
        "inputs": ["left", "right"],
        "left": {"left": {"x": 1}},
        "right": {"right": {"x": 1}},
    }
    # Each branch sleeps 0.4 s: run one after the other they would need 0.8 s at least.
    assert 0.4 <= elapsed < 0.75, elapsed


def test_outputs_keep_their_type_between_nodes_and_leaves_are_collected(
    server: InProcessServer,
) -> None:
    registered(server, "types")
    response = server.predict("types", {"go": True})
    assert response.status == 200, response.body
    assert response.header("Content-Type") == "application/json"
    body = response.json()
    assert list(body) == ["raw", "text", "seen_typed", "seen_bytes", "seen_tensor"]
    # JSON labelled by the node arrives as an object; bytes arrive untouched, never as text.
    assert body["seen_typed"] == {"type": "dict", "value": {"n": 1, "items": [1, 2]}}
    assert body["seen_bytes"] == {"type": "bytes", "value": "00ff807f"}
    assert body["seen_tensor"] == {"sum": 6.0}
    assert body["raw"] == "/wA="  # non-UTF-8 leaf output, base64
    assert body["text"] == "hello"


def test_a_node_that_fails_once_succeeds_on_retry_and_is_counted(
    server: InProcessServer,
) -> None:
    registered(server, "flaky")
    response = server.predict("flaky", {})
    assert response.status == 200, response.body
    assert response.body == b"recovered"
    families = server.server.metrics.families
    labels = ("flaky", "1.0", "flaky")
    assert families["flambeau_workflow_node_executions_total"].values[labels] == 2
    assert families["flambeau_workflow_node_failures_total"].values[(*labels, "error")] == 1
    histogram = families["flambeau_workflow_node_latency_seconds"].values[labels]
    assert histogram[2] == 2  # two observations
    assert families["flambeau_workflow_requests_total"].values[("flaky", "1.0", "ok")] == 1


def test_a_failing_node_fails_the_request_naming_it_and_the_workflow_keeps_serving(
    server: InProcessServer,
) -> None:
    registered(server, "boom")
    failed = server.predict("boom", {"explode": True})
    assert failed.status == 500
    assert failed.json() == {
        "code": 500,
        "type": "InternalServerException",
        "message": "Failed to execute workflow Node after 3 attempts : "
        "Error executing boom (503 Prediction failed)",
    }
    assert server.predict("boom", {"explode": False}).json() == {"ok": True}
    assert {"boom__start", "boom__boom"} <= server.model_names()
    outcome = server.server.metrics.families["flambeau_workflow_requests_total"].values
    assert outcome[("boom", "1.0", "error")] == 1


def test_a_node_that_times_out_fails_the_request(server: InProcessServer, tmp_path: Path) -> None:
    registered(server, "sleepy")
    flag = tmp_path / "wake-up"
    timed_out = server.predict("sleepy", {"flag": str(flag)})
    assert timed_out.status == 500
    assert timed_out.json()["message"] == (
        "Failed to execute workflow Node after 1 attempts : "
        "Error executing sleepy (timed out after 300 ms)"
    )
    failures = server.server.metrics.families["flambeau_workflow_node_failures_total"].values
    assert failures[("sleepy", "1.0", "sleepy", "timeout")] == 1
    flag.touch()  # lets the abandoned call finish, freeing the node's only worker
    assert server.predict("sleepy", {}).body == b"awake"


def test_versions_default_set_default_and_unregister(server: InProcessServer) -> None:
    war(server, "ver", manifest_extra={"version": "3.0"})
    assert server.register("url=ver.war").status == 200
    assert server.register("url=ver.war&workflow_version=4.0").status == 200
    duplicate = server.register("url=ver.war&workflow_version=4.0")
    assert duplicate.status == 409
    assert (
        duplicate.json()["message"] == "Workflow version 4.0 is already registered for workflow ver"
    )
    # Node models carry the workflow's version, so the function sees it in its manifest.
    assert server.predict("ver", {}).body == b"3.0"
    assert server.predict("ver", {}, version="4.0").body == b"4.0"
    assert server.predict("ver", {}, version="9.9").status == 404
    described = server.request("GET", "management", "/workflows/ver/all").json()
    assert [(d["workflowVersion"], d["isDefault"]) for d in described] == [
        ("3.0", True),
        ("4.0", False),
    ]
    refused = server.request("DELETE", "management", "/workflows/ver")
    assert refused.status == 403
    assert refused.json()["message"] == "Cannot remove default version for workflow ver"
    changed = server.request("PUT", "management", "/workflows/ver/4.0/set-default")
    assert changed.json() == {
        "status": 'Default version successfully updated for workflow "ver" to "4.0"'
    }
    assert server.server.models.defaults["ver__version"] == "4.0"
    assert server.predict("ver", {}).body == b"4.0"
    gone = server.request("DELETE", "management", "/workflows/ver/3.0")
    assert gone.json() == {"status": 'Workflow "ver" unregistered'}
    assert list(server.server.models.models["ver__version"]) == ["4.0"]
    assert server.request("DELETE", "management", "/workflows/ver").status == 200
    assert "ver__version" not in server.model_names()
    assert server.request("GET", "management", "/workflows/ver").json() == {
        "code": 404,
        "type": "WorkflowNotFoundException",
        "message": "Workflow not found: ver",
    }


@pytest.mark.parametrize(
    ("name", "spec", "message"),
    [
        ("cyc", "dag:\n  start: [boom]\n  boom: [start]\n", "cycle: start -> boom -> start"),
        ("unk", "dag:\n  start: [nowhere]\n", "node(s) nowhere are neither models"),
        (
            "nomar",
            "models:\n  m: {url: absent.mar}\ndag:\n  start: [m]\n",
            "Workflow nomar: model node m: archive absent.mar not found in the model store "
            "or the workflow archive",
        ),
    ],
)
def test_invalid_workflows_are_refused_before_anything_is_registered(
    server: InProcessServer, name: str, spec: str, message: str
) -> None:
    war(server, name, spec)
    before = server.model_names()
    response = server.register(f"url={name}.war")
    assert response.status == 400, response.body
    assert response.json()["type"] == "InvalidDAGException"
    assert message in response.json()["message"]
    assert server.model_names() == before
    assert name not in server.workflows.workflows


def test_a_node_that_cannot_start_rolls_back_every_node_model(server: InProcessServer) -> None:
    war(server, "half", "dag:\n  start: [left]\n  left: [broken_init]\n")
    response = server.register("url=half.war")
    assert response.status == 500, response.body
    assert response.json()["message"].startswith(
        "Workflow half: node broken_init could not be registered: Failed to start workers"
    )
    assert not {n for n in server.model_names() if n.startswith("half__")}
    assert "half" not in server.workflows.workflows
    # Nothing left behind: the private copies of the archive are gone too.
    assert not list((Path(server.server.work_dir) / "workflows").glob("*/half.war*"))


def test_registration_by_json_body_list_pagination_and_gating(server: InProcessServer) -> None:
    war(server, "listed", "dag:\n  start: []\n")
    response = server.request(
        "POST",
        "management",
        "/workflows",
        body='{"url": "listed.war", "workflow_name": "listed_json", "response_timeout": 30}',
        headers={"Content-Type": "application/json"},
    )
    assert response.json() == {
        "status": "Workflow listed_json has been registered and scaled successfully."
    }
    assert server.server.models.get("listed_json__start").settings.response_timeout_s == 30
    everything = server.request("GET", "management", "/workflows").json()["workflows"]
    assert {"workflowName": "listed_json", "workflowUrl": "listed.war"} in everything
    first = server.request("GET", "management", "/workflows?limit=1").json()
    assert first["nextPageToken"] == "1"
    assert len(first["workflows"]) == 1
    assert first["workflows"][0] == everything[0]
    server.server.config.set("enable_model_api", "false")
    try:
        for method, path in (("POST", "/workflows?url=listed.war"), ("DELETE", "/workflows/x")):
            refused = server.request(method, "management", path)
            assert refused.status == 405
            assert refused.json()["type"] == "MethodNotAllowedException"
    finally:
        server.server.config.set("enable_model_api", "true")
    assert server.request("DELETE", "management", "/workflows/listed_json").status == 200
    assert server.register("").json()["message"] == "Parameter url is required."
    assert server.register("url=missing.war").json() == {
        "code": 404,
        "type": "ResourceNotFoundException",
        "message": "Workflow not found in workflow store: missing.war",
    }


def test_scaling_a_workflow_scales_every_node_model(server: InProcessServer) -> None:
    registered(server, "par")
    response = server.request(
        "PUT", "management", "/workflows/par?min_worker=2&max_worker=3&synchronous=true"
    )
    assert response.json() == {"status": "Workers scaled to 2 for workflow: par"}
    nodes = server.request("GET", "management", "/workflows/par").json()[0]["nodes"]
    assert {(n["name"], n["minWorkers"], n["maxWorkers"]) for n in nodes} == {
        ("start", 2, 3),
        ("left", 2, 3),
        ("right", 2, 3),
        ("join", 2, 3),
    }
    workers = server.request("GET", "management", "/models/par__left").json()[0]["workers"]
    assert len(workers) == 2
    bad = server.request("PUT", "management", "/workflows/par?min_worker=3&max_worker=1")
    assert bad.status == 400
    assert bad.json()["message"] == "max_worker cannot be less than min_worker."
    accepted = server.request("PUT", "management", "/workflows/par?min_worker=1")
    assert accepted.status == 202
    assert server.predict("par", {"x": 2}).status == 200


@pytest.fixture
def http_store(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A plain HTTP server on loopback serving ``tmp_path``."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", tmp_path
    httpd.shutdown()
    httpd.server_close()


def test_urls_are_refused_unless_allowed_then_downloaded_into_the_store(
    server: InProcessServer, http_store: tuple[str, Path]
) -> None:
    base, directory = http_store
    write_war(directory, "remote", "dag:\n  start: []\n", HANDLER)
    url = f"{base}/remote.war"
    refused = server.register(f"url={url}")
    assert refused.status == 404
    assert refused.json()["message"] == f"Given URL {url} does not match any allowed URL(s)"
    server.server.config.set("allowed_urls", r"http://127\.0\.0\.1:\d+/.*")
    try:
        assert server.register(f"url={url}").status == 200
        assert (server.store / "remote.war").is_file()
        assert server.predict("remote", [1, 2]).json() == [1, 2]
        assert (
            server.request("GET", "management", "/workflows/remote").json()[0]["workflowUrl"] == url
        )
        assert server.request("DELETE", "management", "/workflows/remote").status == 200
        assert not (server.store / "remote.war").exists()
    finally:
        server.server.config.set("allowed_urls", "")
