"""Workflows end to end: a real server process, real process workers, tiny plain-torch models.

The sequential workflow is packed with flambeau's archiver, the parallel one with the real
``torch-workflow-archiver`` 0.2.15; both DAGs are the seed's examples (function nodes around
two model nodes ``add`` (x + 1) and ``dbl`` (2x)). A restart test checks the snapshot.
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from flambeau.testing.fixtures import Response, ServerFactory, ServerProcess

PLUGINS = (
    "flambeau.plugins.builtin.workers.plugin",
    "flambeau.plugins.builtin.workflows.plugin",
    "flambeau.plugins.builtin.grpc.plugin",
    "flambeau.plugins.builtin.metrics.plugin",
)
REGISTERED = {ep.value for ep in importlib.metadata.entry_points(group="flambeau")}
# ``-p`` only for the plugins not registered as entry points yet (a second load is an error).
PLUGIN_ARGS = [arg for m in PLUGINS if m not in REGISTERED for arg in ("-p", m)]
ARGS = ["--disable-token-auth", "--enable-model-api", *PLUGIN_ARGS]
WORKFLOW_ARCHIVER = Path(sys.executable).parent / "torch-workflow-archiver"

MODEL_PY = """
import torch


class Affine(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(1))
        self.shift = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return x * self.scale + self.shift
"""

MODEL_HANDLER = """
import json

import torch

from flambeau.handler.base_handler import BaseHandler


class AffineHandler(BaseHandler):
    def preprocess(self, data):
        rows = []
        for row in data:
            value = row.get("data") or row.get("body")
            if isinstance(value, (bytes, bytearray)):
                value = json.loads(value)
            rows.append(torch.as_tensor(value, dtype=torch.float32))
        return torch.stack(rows)

    def postprocess(self, data):
        return data.tolist()
"""

FUNCTIONS = """
import json


def _value(row):
    value = row.get("data") or row.get("body")
    return json.loads(value) if isinstance(value, (bytes, bytearray)) else value


def pre(data, context):
    if data is None:  # TorchServe calls each function node once with None when it loads
        return None
    return [[float(v) for v in _value(row)["values"]] for row in data]


def post(data, context):
    if data is None:
        return None
    return [{"result": _value(row)} for row in data]


def agg(data, context):
    if data is None:
        return None
    out = []
    for row in data:
        added, doubled = json.loads(row["add"]), json.loads(row["dbl"])
        out.append({"sum": [a + b for a, b in zip(added, doubled)]})
    return out
"""

SEQUENTIAL = """
models:
  retry-attempts: 0
  max-batch-delay: 5
  add:
    url: add.mar
  dbl:
    url: dbl.mar
    batch-size: 2
dag:
  pre: [add]
  add: [dbl]
  dbl: [post]
"""

PARALLEL = """
models:
  retry-attempts: 0
  add:
    url: add.mar
  dbl:
    url: dbl.mar
dag:
  pre: [add, dbl]
  add: [agg]
  dbl: [agg]
"""

MINI = "models:\n  add:\n    url: add.mar\ndag:\n  pre: [add]\n"
CYCLE = "models:\n  add:\n    url: add.mar\ndag:\n  pre: [add]\n  add: [pre]\n"


def _write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text).lstrip())
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """add.mar, dbl.mar, seq.war (flambeau's archiver), par.war (the real one), mini.war."""
    import torch

    from flambeau.archiver.cli import archive_main, archive_workflow_main

    src = tmp_path_factory.mktemp("src")
    store = tmp_path_factory.mktemp("store")
    model_file = _write(src, "model.py", MODEL_PY)
    handler = _write(src, "affine_handler.py", MODEL_HANDLER)
    functions = _write(src, "functions.py", FUNCTIONS)
    namespace: dict[str, object] = {}
    exec(MODEL_PY, namespace)
    for name, scale, shift in (("add", 1.0, 1.0), ("dbl", 2.0, 0.0)):
        model = namespace["Affine"]()  # type: ignore[operator]
        model.scale.data.fill_(scale)
        model.shift.data.fill_(shift)
        torch.save(model.state_dict(), src / f"{name}.pt")
        argv = ["--model-name", name, "--version", "1.0", "--model-file", str(model_file)]
        argv += ["--serialized-file", str(src / f"{name}.pt"), "--handler", str(handler)]
        assert archive_main([*argv, "--export-path", str(store)]) == 0
    for name, spec in (("seq", SEQUENTIAL), ("mini", MINI)):
        spec_file = _write(src, f"{name}.yaml", spec)
        argv = ["--workflow-name", name, "--spec-file", str(spec_file)]
        argv += ["--handler", str(functions), "--export-path", str(store)]
        assert archive_workflow_main(argv) == 0
    spec_file = _write(src, "par.yaml", PARALLEL)
    argv = ["--workflow-name", "par", "--spec-file", str(spec_file), "--handler", str(functions)]
    subprocess.run(
        [str(WORKFLOW_ARCHIVER), *argv, "--export-path", str(store)],
        check=True,
        capture_output=True,
    )
    return store


@pytest.fixture(scope="module")
def server(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    process = ServerProcess(
        tmp_path_factory.mktemp("wf-server"),
        model_store=store,
        config={"metrics_mode": "prometheus"},
        args=ARGS,
    )
    yield process
    process.stop()


def predict(server: ServerProcess, name: str, payload: object) -> Response:
    return server.request(
        "POST",
        "inference",
        f"/wfpredict/{name}",
        body=json.dumps(payload),
        headers={"Content-Type": "application/json"},
    )


def diagnose(server: ServerProcess) -> str:
    """The server's and the workers' last log lines, for a failed assertion's message."""
    worker_log = server.log_dir / "model_log.log"
    workers = worker_log.read_text(errors="replace")[-3000:] if worker_log.exists() else ""
    return f"{server.log()}\n--- model_log.log ---\n{workers}"


def ensure(server: ServerProcess, name: str) -> None:
    if server.request("GET", "management", f"/workflows/{name}").status == 404:
        response = server.request("POST", "management", f"/workflows?url={name}.war")
        assert response.status == 200, (response.body, diagnose(server))


def test_sequential_dag_built_with_flambeau_archiver(server: ServerProcess) -> None:
    response = server.request(
        "POST",
        "management",
        "/workflows",
        body=json.dumps({"url": "seq.war", "response_timeout": 60}),
        headers={"Content-Type": "application/json"},
    )
    assert response.json() == {
        "status": "Workflow seq has been registered and scaled successfully."
    }
    answer = predict(server, "seq", {"values": [1, 2, 3]})
    assert answer.status == 200, answer.body
    assert answer.header("Content-Type") == "application/json"
    assert answer.json() == {"result": [4.0, 6.0, 8.0]}  # (x + 1) * 2
    dbl = server.request("GET", "management", "/models/seq__dbl").json()[0]
    assert (dbl["modelVersion"], dbl["batchSize"], dbl["maxBatchDelay"]) == ("1.0", 2, 5)
    assert dbl["responseTimeout"] == 60
    assert len(dbl["workers"]) == 1


def test_grpc_listener_serves_workflow_predictions_and_metrics_show_nodes(
    server: ServerProcess,
) -> None:
    import grpc

    from flambeau.plugins.builtin.workflows._generated import flambeau_workflow_pb2 as pb2
    from flambeau.plugins.builtin.workflows._generated import flambeau_workflow_pb2_grpc

    ensure(server, "seq")
    with grpc.insecure_channel(server.addresses["grpc_inference"]) as channel:
        stub = flambeau_workflow_pb2_grpc.WorkflowInferenceServiceStub(channel)
        request = pb2.WorkflowPredictionsRequest(
            workflow_name="seq", input={"body": b'{"values": [10]}'}
        )
        response = stub.WorkflowPredictions(request, timeout=60)
    assert json.loads(response.prediction) == {"result": [22.0]}
    scraped = server.request(
        "GET", "metrics", "/metrics?name[]=flambeau_workflow_node_executions_total"
    ).body.decode()
    for node in ("pre", "add", "dbl", "post"):
        sample = (
            "flambeau_workflow_node_executions_total"
            f'{{workflow="seq",workflow_version="1.0",node="{node}",}} '
        )
        assert sample in scraped, scraped


def test_parallel_dag_built_with_the_real_archiver(server: ServerProcess, store: Path) -> None:
    with zipfile.ZipFile(store / "par.war") as war:
        manifest = json.loads(war.read("WAR-INF/MANIFEST.json"))
    assert manifest["archiverVersion"] == "0.2.15"  # really built by torch-workflow-archiver
    ensure(server, "par")
    answer = predict(server, "par", {"values": [1, 2, 3]})
    assert answer.status == 200, answer.body
    assert answer.json() == {"sum": [4.0, 7.0, 10.0]}  # (x + 1) + 2x
    described = server.request("GET", "management", "/workflows/par").json()
    assert len(described) == 1
    head = {k: described[0][k] for k in list(described[0])[:7]}
    assert head == {
        "workflowName": "par",
        "workflowUrl": "par.war",
        "minWorkers": 1,
        "maxWorkers": 1,
        "batchSize": 1,
        "maxBatchDelay": 50,
        "workflowDag": "{pre=[add, dbl], add=[agg], dbl=[agg]}",
    }
    kinds = {n["name"]: (n["type"], n["modelName"]) for n in described[0]["nodes"]}
    assert kinds == {
        "pre": ("function", "par__pre"),
        "add": ("model", "par__add"),
        "dbl": ("model", "par__dbl"),
        "agg": ("function", "par__agg"),
    }


def test_list_unregister_and_refusals(server: ServerProcess, store: Path) -> None:
    ensure(server, "seq")
    ensure(server, "par")
    listing = server.request("GET", "management", "/workflows").json()
    assert listing == {
        "workflows": [
            {"workflowName": "par", "workflowUrl": "par.war"},
            {"workflowName": "seq", "workflowUrl": "seq.war"},
        ]
    }
    page = server.request("GET", "management", "/workflows?limit=1&next_page_token=1").json()
    assert page == {"nextPageToken": "2", "workflows": [listing["workflows"][1]]}
    # A cycle is refused whole: no node model of it is registered.
    with zipfile.ZipFile(store / "cyc.war", "w") as war:
        war.writestr("cyc.yaml", CYCLE)
        war.writestr("functions.py", FUNCTIONS)
        manifest = {"workflow": {"workflowName": "cyc", "specFile": "cyc.yaml"}}
        manifest["workflow"]["handler"] = "functions.py"
        war.writestr("WAR-INF/MANIFEST.json", json.dumps(manifest))
    refused = server.request("POST", "management", "/workflows?url=cyc.war")
    assert refused.status == 400
    assert refused.json() == {
        "code": 400,
        "type": "InvalidDAGException",
        "message": "dag: the graph has a cycle: pre -> add -> pre",
    }
    names = [
        m["modelName"] for m in server.request("GET", "management", "/models").json()["models"]
    ]
    assert not [n for n in names if n.startswith("cyc__")]
    # Node models of registered workflows serve, but are the workflow's, not listed as models.
    assert not [n for n in names if "__" in n]
    assert server.request("GET", "management", "/models/seq__pre").status == 200
    removed = server.request("DELETE", "management", "/workflows/par")
    assert removed.json() == {"status": 'Workflow "par" unregistered'}
    assert server.request("GET", "management", "/models/par__add").status == 404
    missing = predict(server, "par", {"values": [1]})
    assert missing.status == 404
    assert missing.json()["type"] == "WorkflowNotFoundException"
    assert predict(server, "seq", {"values": [0]}).json() == {"result": [2.0]}


def test_registration_is_a_management_operation_gated_like_models(
    flambeau_server: ServerFactory, store: Path
) -> None:
    gated = flambeau_server(model_store=store, args=["--disable-token-auth", *PLUGIN_ARGS])
    refused = gated.request("POST", "management", "/workflows?url=seq.war")
    assert refused.status == 405
    assert refused.json()["message"] == (
        "Requested method is not allowed, please refer to API document."
    )
    assert gated.request("DELETE", "management", "/workflows/seq").status == 405
    assert gated.request("GET", "management", "/workflows").json() == {"workflows": []}


def test_workflows_are_restored_after_a_restart(
    store: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    workdir = tmp_path_factory.mktemp("restart")
    wf_store = workdir / "workflow_store"
    wf_store.mkdir()
    (wf_store / "mini.war").write_bytes((store / "mini.war").read_bytes())
    args = [*ARGS, "--workflow-store", str(wf_store)]
    first = ServerProcess(workdir, model_store=store, args=args)
    try:
        registered = first.request("POST", "management", "/workflows?url=mini.war")
        assert registered.status == 200, (registered.body, diagnose(first))
        # Scaling a node model through the models API is part of what is saved.
        scaled = first.request(
            "PUT", "management", "/models/mini__pre?min_worker=2&max_worker=2&synchronous=true"
        )
        assert scaled.status == 200, scaled.body
    finally:
        first.stop()
    saved = json.loads((workdir / "logs" / "config" / "workflows.json").read_text())
    assert [(w["name"], w["version"], w["archive"]) for w in saved["workflows"]] == [
        ("mini", "1.0", "mini.war")
    ]
    assert saved["workflows"][0]["workers"] == {"pre": [2, 2], "add": [1, 1]}

    second = ServerProcess(workdir, model_store=store, args=args)
    try:
        assert second.request("GET", "management", "/workflows").json() == {
            "workflows": [{"workflowName": "mini", "workflowUrl": "mini.war"}]
        }
        assert predict(second, "mini", {"values": [1, 2]}).json() == [2.0, 3.0]
        pre = second.request("GET", "management", "/models/mini__pre").json()[0]
        assert (pre["minWorkers"], len(pre["workers"])) == (2, 2)
    finally:
        second.stop()
    saved = json.loads((workdir / "logs" / "config" / "workflows.json").read_text())
    assert saved["workflows"][0]["workers"] == {"pre": [2, 2], "add": [1, 1]}

    without = ServerProcess(workdir, model_store=store, args=[*args, "--ncs"])
    try:
        assert without.request("GET", "management", "/workflows").json() == {"workflows": []}
    finally:
        without.stop()
    assert json.loads((workdir / "logs" / "config" / "workflows.json").read_text()) == saved
