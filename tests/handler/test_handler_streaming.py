"""Streaming: send_intermediate_predict_response chunks and stopping_criteria."""

from __future__ import annotations

from pathlib import Path

import pytest
from handler_testlib import json_request, spec, write

from flambeau.api import BatchResult

STREAM_HANDLER = """
from flambeau.handler.utils import send_intermediate_predict_response


def handle(data, context):
    if data is None:
        return None
    context.set_response_content_type(0, "text/event-stream")
    for step in range(3):
        chunks = [f"{row['body']}-chunk{step}" for row in data]
        send_intermediate_predict_response(
            chunks, context.request_ids, "Intermediate Prediction success", 200, context
        )
    return [f"{row['body']}-done" for row in data]
"""


def _stream_dir(tmp_path: Path) -> Path:
    model_dir = tmp_path / "stream"
    write(model_dir / "stream_handler.py", STREAM_HANDLER)
    return model_dir


def test_three_intermediate_chunks_then_a_final_response(tmp_path: Path, load_service):
    sent: list[BatchResult] = []
    service = load_service(
        spec(_stream_dir(tmp_path), "stream_handler"), send_intermediate=sent.append
    )

    final = service.predict([json_request("a", "x"), json_request("b", "y")])

    assert len(sent) == 3
    for step, chunk in enumerate(sent):
        assert (chunk.code, chunk.message) == (200, "Intermediate Prediction success")
        assert [r.request_id for r in chunk.responses] == ["a", "b"]
        assert [r.body for r in chunk.responses] == [
            f"x-chunk{step}".encode(),
            f"y-chunk{step}".encode(),
        ]
        assert all(r.stream_next for r in chunk.responses)
        assert all(r.headers["ts_stream_next"] == "true" for r in chunk.responses)
    assert sent[0].responses[0].content_type == "text/event-stream"
    assert sent[0].responses[1].content_type == ""

    assert final.code == 200
    assert [r.body for r in final.responses] == [b"x-done", b"y-done"]
    assert [r.stream_next for r in final.responses] == [False, False]
    assert [r.headers["ts_stream_next"] for r in final.responses] == ["false", "false"]


def test_streaming_without_a_sink_fails_the_batch(tmp_path: Path, load_service):
    service = load_service(spec(_stream_dir(tmp_path), "stream_handler"))
    result = service.predict([json_request("a", "x")])
    assert (result.code, result.message) == (503, "Prediction failed")


def test_only_local_rank_zero_streams(tmp_path: Path, load_service, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    sent: list[BatchResult] = []
    service = load_service(
        spec(_stream_dir(tmp_path), "stream_handler"), send_intermediate=sent.append
    )
    result = service.predict([json_request("a", "x")])
    assert result.code == 200
    assert sent == []


CRITERIA_HANDLER = """
def handle(data, context):
    if data is None:
        return None
    # request idx continues until its output says "stop"; None leaves the header alone
    stop = lambda out: out == "stop"  # noqa: E731
    context.stopping_criteria = [stop, stop, lambda out: None]
    return [row["body"] for row in data]
"""


def test_stopping_criteria_decide_stream_next(tmp_path: Path, load_service):
    model_dir = tmp_path / "criteria"
    write(model_dir / "criteria_handler.py", CRITERIA_HANDLER)
    service = load_service(spec(model_dir, "criteria_handler"))

    result = service.predict(
        [json_request("a", "stop"), json_request("b", "more"), json_request("c", "more")]
    )

    assert [r.stream_next for r in result.responses] == [False, True, False]
    assert [r.headers.get("ts_stream_next") for r in result.responses] == ["false", "true", None]


@pytest.mark.parametrize("rank", ["0", None])
def test_intermediate_chunk_with_unserialisable_output_reports_503(
    tmp_path: Path, load_service, monkeypatch, rank
):
    if rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", rank)
    model_dir = tmp_path / "badchunk"
    write(
        model_dir / "badchunk_handler.py",
        """
        from flambeau.handler.utils import send_intermediate_predict_response


        def handle(data, context):
            if data is None:
                return None
            send_intermediate_predict_response([object()], context.request_ids, "m", 200, context)
            return ["end"]
        """,
    )
    sent: list[BatchResult] = []
    service = load_service(spec(model_dir, "badchunk_handler"), send_intermediate=sent.append)
    assert service.predict([json_request("a", 1)]).code == 200
    assert [(c.code, c.message) for c in sent] == [(503, "Unsupported model output data type.")]
