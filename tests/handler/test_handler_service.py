"""ModelService.load/predict against real model directories (eager, TorchScript, functions)."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
import torch
from handler_testlib import (
    body,
    json_request,
    make_mlp_dir,
    raw_request,
    spec,
    write,
    write_manifest,
)

from flambeau.api import RequestInput, WorkerRequest
from flambeau.handler.errors import HandlerLoadError, HandlerOutOfMemoryError
from flambeau.handler.service import ModelService, decode_input
from flambeau.handler.utils import encode_output

# TorchScript is deprecated in recent torch, but TorchServe archives still ship it.
pytestmark = pytest.mark.filterwarnings("ignore:.*torch\\.jit.*:DeprecationWarning")

ROWS = [[0.5, -1.0, 2.0, 0.25], [1.5, 0.0, -0.5, 3.0], [-2.0, 1.0, 0.0, 1.0]]


def _expected(model: torch.nn.Module, rows: list[list[float]]) -> list[list[float]]:
    with torch.no_grad():
        return model(torch.tensor(rows)).tolist()


def _assert_close(actual: list[list[float]], expected: list[list[float]]) -> None:
    assert torch.allclose(torch.tensor(actual), torch.tensor(expected), atol=1e-6)


# ---- class handlers on eager and TorchScript models ---------------------------------------


@pytest.mark.parametrize("torchscript", [False, True], ids=["eager", "torchscript"])
def test_class_handler_gives_the_models_numbers(tmp_path: Path, load_service, torchscript):
    model_dir, model = make_mlp_dir(tmp_path, torchscript=torchscript)
    service = load_service(spec(model_dir, "mlp_handler.py", batch_size=3))

    result = service.predict([json_request(f"r{i}", row) for i, row in enumerate(ROWS)])

    assert (result.code, result.message) == (200, "Prediction success")
    assert [r.request_id for r in result.responses] == ["r0", "r1", "r2"]
    outputs = [body(r) for r in result.responses]
    expected = _expected(model, ROWS)
    _assert_close([o["logits"] for o in outputs], expected)
    assert [o["argmax"] for o in outputs] == [max(range(3), key=e.__getitem__) for e in expected]
    # Distinct inputs give distinct outputs: the comparison above is not vacuous.
    assert outputs[0]["logits"] != outputs[1]["logits"]
    assert all(r.status == 200 and not r.stream_next for r in result.responses)
    if torchscript:
        assert isinstance(service.handler.model, torch.jit.ScriptModule)
    else:
        assert type(service.handler.model).__name__ == "TinyMLP"


def test_builtin_base_handler_loads_the_eager_model(tmp_path: Path, load_service):
    model_dir, model = make_mlp_dir(tmp_path)
    service = load_service(spec(model_dir, "base_handler"))
    handler = service.handler
    assert type(handler).__name__ == "BaseHandler"
    assert handler.initialized
    assert str(handler.device) == "cpu"
    assert handler.model_pt_path == str(model_dir / "weights.pt")
    x = torch.tensor(ROWS)
    with torch.no_grad():
        assert torch.equal(handler.model(x), model(x))
    # As in TorchServe without a body envelope: rows are dicts, as_tensor cannot take them.
    result = service.predict([json_request("a", ROWS[0])])
    assert (result.code, result.message, result.responses) == (503, "Prediction failed", [])


def test_describe_and_explain_headers(tmp_path: Path, load_service):
    model_dir, _ = make_mlp_dir(tmp_path)
    service = load_service(spec(model_dir, "mlp_handler"))

    described = service.predict([json_request("d", ROWS[0], headers={"describe": "True"})])
    assert body(described.responses[0]) == {"kind": "mlp", "device": "cpu"}

    explained = service.predict(
        [json_request("e", ROWS[0], headers={"explain": "True"}), json_request("f", ROWS[1])]
    )
    assert [body(r) for r in explained.responses] == [
        {"target": 0, "shape": [4]},
        {"target": 0, "shape": [4]},
    ]
    assert service.handler.explain is True


@pytest.mark.parametrize("enabled", [True, False], ids=["profiler-env", "no-env"])
def test_torch_profiler_env_switches_the_request_path(
    tmp_path: Path, load_service, monkeypatch, enabled
):
    if enabled:
        monkeypatch.setenv("ENABLE_TORCH_PROFILER", "true")
    else:
        monkeypatch.delenv("ENABLE_TORCH_PROFILER", raising=False)
    model_dir, _ = make_mlp_dir(tmp_path)
    service = load_service(spec(model_dir, "mlp_handler"))
    profiled: list[object] = []

    def fake_profiler(data):
        profiled.append(data)
        return ["profiled"] * len(data)

    monkeypatch.setattr(service.handler, "_infer_with_profiler", fake_profiler)
    for rid in "ab":
        result = service.predict([json_request(rid, ROWS[0])])
        assert (result.responses[0].body == b"profiled") is enabled
    assert len(profiled) == (2 if enabled else 0)


# ---- function handlers ------------------------------------------------------------------

FUNCTION_HANDLER = """
import os

import torch

CALLS = []
model = None


def infer(data, context):
    global model
    CALLS.append(data)
    if data is None:
        path = os.path.join(context.system_properties["model_dir"], "traced.pt")
        model = torch.jit.load(path)
        return None
    x = torch.as_tensor([row["body"] for row in data], dtype=torch.float32)
    return model(x).tolist()
"""


def test_function_entry_point_is_initialised_once_with_none(tmp_path: Path, load_service):
    model_dir, model = make_mlp_dir(tmp_path, torchscript=True)
    write(model_dir / "fn_handler.py", FUNCTION_HANDLER)
    service = load_service(spec(model_dir, "some/dir/fn_handler.py:infer"))
    module = sys.modules["fn_handler"]
    assert module.CALLS == [None]

    result = service.predict([json_request("a", ROWS[0]), json_request("b", ROWS[2])])

    assert result.code == 200
    _assert_close([body(r) for r in result.responses], _expected(model, [ROWS[0], ROWS[2]]))
    assert len(module.CALLS) == 2
    assert module.CALLS[1] == [{"body": ROWS[0]}, {"body": ROWS[2]}]
    assert service.handler is module.infer


# ---- errors -----------------------------------------------------------------------------

ERROR_HANDLER = """
from flambeau.handler.utils import PredictionException


def handle(data, context):
    if data is None:
        return None
    kind = data[0]["body"]
    if kind == "teapot":
        raise PredictionException("I'm a teapot", 418)
    if kind == "memory":
        raise MemoryError()
    if kind == "cuda":
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    if kind == "boom":
        raise ValueError("boom")
    if kind == "not-a-list":
        return {"a": 1}
    if kind == "short":
        return ["only one"]
    if kind == "unserialisable":
        return [object() for _ in data]
    return [row["body"] for row in data]
"""


@pytest.mark.parametrize(
    ("kind", "code", "message"),
    [
        ("teapot", 418, "I'm a teapot"),
        ("memory", 507, "Out of resources"),
        ("cuda", 507, "Out of resources"),
        ("boom", 503, "Prediction failed"),
        ("not-a-list", 503, "Invalid model predict output"),
        ("short", 503, "number of batch response mismatched"),
        ("unserialisable", 503, "Unsupported model output data type."),
    ],
)
def test_handler_errors_become_batch_codes(tmp_path: Path, load_service, kind, code, message):
    model_dir = tmp_path / "errors"
    write(model_dir / "error_handler.py", ERROR_HANDLER)
    service = load_service(spec(model_dir, "error_handler"))

    result = service.predict([json_request("a", kind), json_request("b", "x")])

    assert (result.code, result.message, result.responses) == (code, message, [])
    # The worker survives: the next batch succeeds.
    ok = service.predict([json_request("c", "fine"), json_request("d", "also fine")])
    assert ok.code == 200
    assert [r.body for r in ok.responses] == [b"fine", b"also fine"]


def test_handler_error_is_logged_with_traceback(tmp_path: Path, load_service, caplog):
    model_dir = tmp_path / "errors"
    write(model_dir / "error_handler.py", ERROR_HANDLER)
    service = load_service(spec(model_dir, "error_handler"))
    service.predict([json_request("a", "boom")])
    records = [r for r in caplog.records if r.name.startswith("flambeau.handler")]
    assert any(r.exc_info and "boom" in str(r.exc_info[1]) for r in records)


STATUS_HANDLER = """
def handle(data, context):
    if data is None:
        return None
    out = []
    for idx, row in enumerate(data):
        context.set_response_status(201 + idx, f"Made {idx}", idx)
        context.set_response_content_type(idx, "text/plain; charset=utf-8")
        context.set_response_header(idx, "x-echo", context.get_request_header(idx, "X-Token"))
        out.append(f"hello {row['body']}")
    return out
"""


def test_status_headers_and_content_type_per_request(tmp_path: Path, load_service):
    model_dir = tmp_path / "status"
    write(model_dir / "status_handler.py", STATUS_HANDLER)
    service = load_service(spec(model_dir, "status_handler.py"))

    result = service.predict(
        [
            raw_request("a", b"ann", "text/plain", headers={"x-token": "t1"}),
            raw_request("b", b"bob", "text/plain", headers={"X-Token": "t2"}),
        ]
    )

    assert result.code == 200
    first, second = result.responses
    assert (first.status, first.reason, first.body) == (201, "Made 0", b"hello ann")
    assert (second.status, second.reason, second.body) == (202, "Made 1", b"hello bob")
    assert first.content_type == "text/plain; charset=utf-8"
    assert first.headers == {"content-type": "text/plain; charset=utf-8", "x-echo": "t1"}
    assert second.headers["x-echo"] == "t2"


# ---- inputs and outputs -----------------------------------------------------------------

ECHO_HANDLER = """
def handle(data, context):
    if data is None:
        return None
    out = []
    for idx, row in enumerate(data):
        values = {
            name: [type(v).__name__, v.hex() if isinstance(v, (bytes, bytearray)) else v]
            for name, v in row.items()
        }
        out.append({"values": values, "headers": context.get_all_request_header(idx)})
    return out
"""


def test_inputs_are_decoded_per_content_type(tmp_path: Path, load_service):
    model_dir = tmp_path / "echo"
    write(model_dir / "echo_handler.py", ECHO_HANDLER)
    service = load_service(spec(model_dir, "echo_handler"))
    request = WorkerRequest(
        request_id="a",
        headers={"x-h": "v"},
        inputs=[
            RequestInput("j", b'{"k": [1, 2]}', "application/json"),
            RequestInput("jc", b"[3]", "Application/JSON; charset=utf-8"),
            RequestInput("bad", b"{nope", "application/json"),
            RequestInput("t", "h\u00e9".encode(), "text/plain"),
            RequestInput("raw", b"\x00\x01", "application/octet-stream"),
            RequestInput("none", b"xy", ""),
        ],
    )

    (response,) = service.predict([request]).responses

    out = body(response)
    assert out["values"] == {
        "j": ["dict", {"k": [1, 2]}],
        "jc": ["list", [3]],
        "bad": ["bytes", b"{nope".hex()],
        "t": ["str", "h\u00e9"],
        "raw": ["bytes", "0001"],
        "none": ["bytes", b"xy".hex()],
    }
    assert out["headers"]["x-h"] == "v"
    assert out["headers"]["j"] == {"content-type": "application/json"}
    assert out["headers"]["none"] == {"content-type": ""}


def test_decoding_can_be_turned_off(tmp_path: Path, load_service):
    model_dir = tmp_path / "echo"
    write(model_dir / "echo_handler.py", ECHO_HANDLER)
    service = load_service(spec(model_dir, "echo_handler", decode_input_request=False))
    (response,) = service.predict([json_request("a", [1])]).responses
    assert body(response)["values"]["body"] == ["bytes", b"[1]".hex()]


def test_decode_input_rules():
    assert decode_input(b'{"a": 1}', "application/json") == {"a": 1}
    assert decode_input(b"\xff", "text/csv") == b"\xff"
    assert decode_input(b"abc", "text/csv") == "abc"
    assert decode_input(b"[1]", "application/json", decode=False) == b"[1]"


OUTPUT_HANDLER = """
import torch


def handle(data, context):
    if data is None:
        return None
    return [b"raw-bytes", bytearray(b"ba"), "text \\u00e9", {"a": [1, 2]}, torch.tensor([1.5, 2.5])]
"""


def test_outputs_are_encoded_like_torchserve(tmp_path: Path, load_service):
    model_dir = tmp_path / "outputs"
    write(model_dir / "output_handler.py", OUTPUT_HANDLER)
    service = load_service(spec(model_dir, "output_handler"))

    result = service.predict([json_request(str(i), i) for i in range(5)])

    bodies = [r.body for r in result.responses]
    assert bodies[:3] == [b"raw-bytes", b"ba", "text \u00e9".encode()]
    assert bodies[3] == json.dumps({"a": [1, 2]}, indent=2).encode()
    assert torch.equal(torch.load(io.BytesIO(bodies[4])), torch.tensor([1.5, 2.5]))


class _Number(float):
    def __repr__(self) -> str:
        return "not what json writes"


_CYCLE: list[object] = []
_CYCLE.append(_CYCLE)


@pytest.mark.parametrize(
    "value",
    [
        [0.1, -2.5, 1e300, 5e-324, -0.0, 3, True, None],
        [float("nan"), float("inf"), -float("inf")],
        [[1.0, [2, []]], {}, [], ("a,b", ["]", 1.5])],
        {'label \u00e9\n"q"': 0.25, "other": {"nested": [None, False]}, "empty": {}},
        (1, (2.5, "x"), {"k": ()}),
        [12345678901234567890123, "\ud800 lone surrogate"],
        42,
        # left to json.dumps: subclasses and keys that are not str
        [_Number(1.5)],
        {3: "int key", 2.5: "float key", None: "null key", True: "bool key"},
    ],
    ids=lambda value: type(value).__name__,
)
def test_json_outputs_are_exactly_json_dumps_indent_2(value):
    assert encode_output(value) == json.dumps(value, indent=2).encode()


@pytest.mark.parametrize("value", [_CYCLE, [object()], {"a": {1, 2}}, {(1, 2): "tuple key"}])
def test_outputs_json_cannot_take_are_type_errors(value):
    with pytest.raises(TypeError, match="cannot serialise model output"):
        encode_output(value)


def test_empty_batch_does_not_call_the_handler(tmp_path: Path, load_service):
    model_dir = tmp_path / "errors"
    write(model_dir / "error_handler.py", ERROR_HANDLER)
    service = load_service(spec(model_dir, "error_handler"))
    assert service.predict([]).code == 200


# ---- metrics ----------------------------------------------------------------------------

METRIC_HANDLER = """
def handle(data, context):
    if data is None:
        context.metrics.add_counter("Loaded", 1)
        return None
    for idx, _ in enumerate(data):
        context.metrics.add_counter("Seen", 1, idx=idx, dimensions=[("Kind", "row")])
    context.metrics.add_size("Payload", 2.5, unit="kB")
    return [row["body"] for row in data]
"""


def test_metrics_are_drained_once(tmp_path: Path, load_service):
    model_dir = tmp_path / "metrics"
    write(model_dir / "metric_handler.py", METRIC_HANDLER)
    service = load_service(spec(model_dir, "metric_handler", model_name="m"))
    assert [m.name for m in service.drain_metrics()] == ["Loaded"]

    result = service.predict([json_request("r1", 1), json_request("r2", 2)])
    assert result.code == 200
    assert result.metrics == []
    metrics = service.drain_metrics()

    by_name: dict[str, list] = {}
    for m in metrics:
        by_name.setdefault(m.name, []).append(m)
    assert sorted(by_name) == ["Payload", "PredictionTime", "Seen"]
    assert [m.request_id for m in by_name["Seen"]] == ["r1", "r2"]
    assert by_name["Seen"][0].dimensions == (
        ("Kind", "row"),
        ("ModelName", "m"),
        ("Level", "Model"),
    )
    assert by_name["Payload"][0].unit == "Kilobytes"
    assert by_name["Payload"][0].value == 2.5
    (prediction,) = by_name["PredictionTime"]
    assert (prediction.unit, prediction.metric_type) == ("Milliseconds", "GAUGE")
    assert prediction.request_id == "r1,r2"
    assert prediction.value >= 0
    assert service.drain_metrics() == []


def test_base_handler_records_handler_time(tmp_path: Path, load_service):
    model_dir, _ = make_mlp_dir(tmp_path)
    service = load_service(spec(model_dir, "mlp_handler", model_name="mlp"))
    service.drain_metrics()
    service.predict([json_request("a", ROWS[0])])
    names = {m.name: m for m in service.drain_metrics()}
    assert set(names) == {"HandlerTime", "PredictionTime"}
    assert names["HandlerTime"].dimensions == (("ModelName", "mlp"), ("Level", "Model"))


@pytest.mark.parametrize(
    ("config", "names"),
    [
        ({"handler": {"profile": True}}, ["ts_handler_inference", "HandlerTime", "PredictionTime"]),
        ({"handler": {"profile": False}}, ["HandlerTime", "PredictionTime"]),
        ({"handler": None}, ["HandlerTime", "PredictionTime"]),
        ({}, ["HandlerTime", "PredictionTime"]),
    ],
    ids=["profile", "profile-off", "handler-null", "no-config"],
)
def test_handler_profile_config_times_the_timed_steps(tmp_path: Path, load_service, config, names):
    model_dir, _ = make_mlp_dir(tmp_path)
    # MLPHandler overrides preprocess/postprocess; only BaseHandler.inference is @timed.
    service = load_service(spec(model_dir, "mlp_handler", model_yaml_config=config))
    service.drain_metrics()
    service.predict([json_request("a", ROWS[0])])
    assert [m.name for m in service.drain_metrics()] == names


def test_failed_prediction_records_no_prediction_time(tmp_path: Path, load_service):
    model_dir = tmp_path / "errors"
    write(model_dir / "error_handler.py", ERROR_HANDLER)
    service = load_service(spec(model_dir, "error_handler"))
    service.predict([json_request("a", "boom")])
    assert service.drain_metrics() == []


# ---- context, config, load errors, close ------------------------------------------------

CONTEXT_HANDLER = """
def handle(data, context):
    if data is None:
        return None
    return [{
        "model_name": context.model_name,
        "system": context.system_properties,
        "config": context.model_yaml_config,
        "manifest_handler": context.manifest["model"]["handler"],
        "request_ids": {str(k): v for k, v in context.request_ids.items()},
    } for _ in data]
"""


def test_context_is_built_from_spec_manifest_and_config(tmp_path: Path, load_service):
    model_dir = tmp_path / "ctx"
    write(model_dir / "ctx_handler.py", CONTEXT_HANDLER)
    write(model_dir / "model-config.yaml", "batchSize: 2\nhandler:\n  threshold: 0.7\n")
    write_manifest(model_dir, handler="ctx_handler.py", configFile="model-config.yaml")
    service = load_service(
        spec(model_dir, "ctx_handler.py", model_name="ctx", batch_size=2, server_version="9.9")
    )
    (response,) = service.predict([json_request("id-1", 0)]).responses
    out = body(response)
    assert out == {
        "model_name": "ctx",
        "system": {
            "model_dir": str(model_dir),
            "gpu_id": None,
            "batch_size": 2,
            "server_name": "MMS",
            "server_version": "9.9",
            "limit_max_image_pixels": True,
        },
        "config": {"batchSize": 2, "handler": {"threshold": 0.7}},
        "manifest_handler": "ctx_handler.py",
        "request_ids": {"0": "id-1"},
    }


def test_spec_config_wins_over_the_config_file(tmp_path: Path, load_service):
    model_dir = tmp_path / "ctx"
    write(model_dir / "ctx_handler.py", CONTEXT_HANDLER)
    write(model_dir / "model-config.yaml", "batchSize: 2\n")
    write_manifest(model_dir, handler="ctx_handler.py", configFile="model-config.yaml")
    service = load_service(
        spec(
            model_dir,
            "ctx_handler",
            model_yaml_config={"from": "spec"},
            manifest={"model": {"handler": "h"}},
        )
    )
    out = body(service.predict([json_request("a", 0)]).responses[0])
    assert out["config"] == {"from": "spec"}
    assert out["manifest_handler"] == "h"


def test_missing_handler_module_is_a_clear_load_error(tmp_path: Path):
    model_dir = tmp_path / "empty"
    model_dir.mkdir()
    with pytest.raises(HandlerLoadError) as info:
        ModelService.load(spec(model_dir, "no_such_handler.py"))
    assert info.value.status == 500
    assert "no_such_handler" in info.value.message
    assert "not found in the model directory" in info.value.message
    assert isinstance(info.value.__cause__, ModuleNotFoundError)
    assert str(model_dir) not in sys.path


def test_import_error_inside_the_handler_names_the_missing_dependency(tmp_path: Path):
    model_dir = tmp_path / "broken"
    write(model_dir / "broken_handler.py", "import not_installed_dependency_xyz\n")
    with pytest.raises(HandlerLoadError) as info:
        ModelService.load(spec(model_dir, "broken_handler"))
    assert "not_installed_dependency_xyz" in info.value.message
    assert "ModuleNotFoundError" in info.value.traceback_text


def test_out_of_memory_during_initialisation_is_507(tmp_path: Path):
    model_dir = tmp_path / "oom"
    write(model_dir / "oom_handler.py", "def handle(data, context):\n    raise MemoryError()\n")
    with pytest.raises(HandlerOutOfMemoryError) as info:
        ModelService.load(spec(model_dir, "oom_handler"))
    assert info.value.status == 507


def test_missing_model_dir_and_empty_handler(tmp_path: Path):
    with pytest.raises(HandlerLoadError, match="not found"):
        ModelService.load(spec(tmp_path / "nope", "x"))
    (tmp_path / "m").mkdir()
    with pytest.raises(HandlerLoadError, match="no handler given"):
        ModelService.load(spec(tmp_path / "m", ""))


def test_close_releases_the_model_and_sys_path(tmp_path: Path):
    model_dir, _ = make_mlp_dir(tmp_path)
    threads = torch.get_num_threads()
    try:
        service = ModelService.load(spec(model_dir, "mlp_handler", intra_op_threads=2))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert sys.path[0] == str(model_dir.resolve())
    service.close()
    service.close()  # idempotent
    assert str(model_dir.resolve()) not in sys.path
    assert service.handler is None
    with pytest.raises(RuntimeError, match="closed"):
        service.predict([json_request("a", ROWS[0])])
