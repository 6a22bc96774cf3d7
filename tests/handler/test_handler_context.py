"""The Context surface TorchServe handlers use."""

from __future__ import annotations

import pytest

from flambeau.handler.context import Context, RequestProcessor
from flambeau.handler.metrics import MetricsCache


def _context(**kwargs) -> Context:
    ctx = Context("m", "/models/m", {"model": {"handler": "h.py"}}, 4, None, "0.12.0", **kwargs)
    ctx.request_ids = {0: "r0", 1: "r1"}
    ctx.request_processor = [
        RequestProcessor({"Content-Type": "application/json", "ts_request_sequence_id": "s-1"}),
        RequestProcessor({"body": {"content-type": "text/plain"}, "explain": "True"}),
    ]
    return ctx


def test_system_properties_and_defaults():
    ctx = Context("m", "/models/m", None, 4, 0, "0.12.0", False)
    assert ctx.system_properties == {
        "model_dir": "/models/m",
        "gpu_id": 0,
        "batch_size": 4,
        "server_name": "MMS",
        "server_version": "0.12.0",
        "limit_max_image_pixels": False,
    }
    assert ctx.manifest is None
    assert ctx.model_yaml_config == {}
    assert isinstance(ctx.metrics, MetricsCache)
    assert ctx.metrics.model_name == "m"
    assert ctx.cl_socket is None
    assert ctx.stopping_criteria is None
    assert ctx.get_request_id() is None
    assert ctx.get_request_header(0, "x") is None
    assert ctx.get_all_request_header(0) == {}


def test_request_headers_and_ids():
    ctx = _context()
    assert ctx.get_request_id(1) == "r1"
    assert ctx.get_request_header(0, "Content-Type") == "application/json"
    assert ctx.get_request_header(0, "content-type") == "application/json"  # case-insensitive
    assert ctx.get_request_header(1, "body") == {"content-type": "text/plain"}
    assert ctx.get_request_header(1, "missing") is None
    assert ctx.get_all_request_header(1)["explain"] == "True"
    assert ctx.get_sequence_id(0) == "s-1"
    assert ctx.header_key_sequence_start == "ts_request_sequence_start"


def test_sequence_header_names_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("TS_REQUEST_SEQUENCE_ID", "x-session")
    ctx = _context()
    ctx.request_processor = [RequestProcessor({"x-session": "abc"})]
    assert ctx.header_key_sequence_id == "x-session"
    assert ctx.get_sequence_id(0) == "abc"


def test_response_status_headers_and_content_type():
    ctx = _context()
    assert ctx.get_response_status(0) == (200, None)
    ctx.set_response_status(404, "Nope", 1)
    ctx.set_response_content_type(0, "image/png")
    ctx.set_response_header(0, "x-a", "1")
    assert ctx.get_response_status(1) == (404, "Nope")
    assert ctx.get_response_content_type(0) == "image/png"
    assert ctx.get_response_headers(0) == {"content-type": "image/png", "x-a": "1"}
    assert ctx.get_response_content_type(1) is None
    ctx.set_all_response_status(206, "Partial")
    assert [ctx.get_response_status(i) for i in (0, 1)] == [(206, "Partial")] * 2


def test_setting_a_header_for_a_missing_request_is_an_error():
    ctx = _context()
    with pytest.raises(IndexError, match="batch index 5"):
        ctx.set_response_header(5, "k", "v")
    ctx.set_response_status(500, "x", 5)  # ignored, like TorchServe's None check


def test_equality_compares_state():
    a = Context("m", "/d", None, 1, None, "v")
    b = Context("m", "/d", None, 1, None, "v")
    b.metrics = a.metrics
    assert a == b
    b.model_name = "other"
    assert a != b
