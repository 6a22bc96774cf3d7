"""Round trips and corruption handling of the process worker's binary frames."""

from __future__ import annotations

import struct

import pytest

from flambeau.api import (
    BatchResult,
    MetricRecord,
    ModelLoadSpec,
    RequestInput,
    WorkerRequest,
    WorkerResponse,
)
from flambeau.plugins.builtin.workers.frames import (
    KIND_INFER,
    KIND_PARTIAL,
    KIND_RESULT,
    KIND_SHUTDOWN,
    PREFIX_SIZE,
    FrameError,
    FrameSplitter,
    check_frame_length,
    decode_inference,
    decode_load,
    decode_result,
    encode_inference,
    encode_load,
    encode_result,
    encode_shutdown,
    frame_kind,
)


def _body(frame: bytes) -> bytes:
    """Strip and check the length prefix, as a reader would."""
    (length,) = struct.unpack_from(">I", frame)
    assert length == len(frame) - PREFIX_SIZE
    return frame[PREFIX_SIZE:]


def _batch() -> list[WorkerRequest]:
    return [
        WorkerRequest(
            "req-1",
            {"content-type": "application/json", "x-naïve": "ünïcødé ✓ 日本"},
            [RequestInput("body", b'{"a": 1}', "application/json")],
        ),
        WorkerRequest("req-2", {}, [RequestInput("body", b"")]),  # empty body, no content type
        WorkerRequest(
            "réq-3",
            {"": ""},
            [
                RequestInput("data", bytes(range(256)) * 4096, "application/octet-stream"),
                RequestInput("meta", b"\x00\xff", "text/plain; charset=utf-8"),
            ],
        ),
        WorkerRequest("req-4"),  # no headers, no inputs
    ]


def test_inference_round_trip_keeps_every_field() -> None:
    batch = _batch()
    body = _body(encode_inference(batch))
    assert frame_kind(body) == KIND_INFER
    assert decode_inference(body) == batch


def test_inference_carries_one_megabyte_bodies_as_raw_bytes() -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB, every byte value
    frame = encode_inference([WorkerRequest("r", {}, [RequestInput("body", payload)])])
    # Raw bytes on the wire: the frame is the payload plus a few dozen bytes of framing.
    assert len(frame) - len(payload) < 64
    assert payload in frame
    (decoded,) = decode_inference(_body(frame))
    assert decoded.inputs[0].value == payload
    assert type(decoded.inputs[0].value) is bytes


def test_empty_batch_round_trips() -> None:
    assert decode_inference(_body(encode_inference([]))) == []


def test_text_that_is_not_utf8_encodable_is_a_frame_error() -> None:
    with pytest.raises(FrameError, match="not encodable as UTF-8"):
        encode_inference([WorkerRequest("r", {"x-odd": "bad\udc80byte"}, [])])
    with pytest.raises(FrameError, match="not encodable as UTF-8"):
        encode_result(BatchResult(200, "", [WorkerResponse("r", reason="\ud800")]))


def _result() -> BatchResult:
    return BatchResult(
        200,
        "Prediction success",
        [
            WorkerResponse(
                "req-1", 200, "OK", "application/json", {"x-ü": "✓", "b": ""}, b"[2, 4]", False
            ),
            WorkerResponse("req-2", 418, "", "", {}, b"", True),
            WorkerResponse("req-3", 200, "", "application/octet-stream", {}, b"\x00" * (1 << 20)),
        ],
        [
            MetricRecord("PredictionTime", 1.25, "ms", (("ModelName", "m"), ("Level", "Model"))),
            MetricRecord("Gauge", -3.5e10, "count", (), "GAUGE", "req-2"),
        ],
    )


@pytest.mark.parametrize("partial", [False, True])
def test_result_round_trip_keeps_every_field(partial: bool) -> None:
    result = _result()
    body = _body(encode_result(result, partial=partial))
    assert frame_kind(body) == (KIND_PARTIAL if partial else KIND_RESULT)
    assert decode_result(body) == result


def _field(text: str) -> bytes:
    data = text.encode()
    return struct.pack(">I", len(data)) + data


def test_metric_bytes_follow_the_layout_every_time() -> None:
    metric = MetricRecord("T", 1.5, "ms", (("k", "v"), ("ü", "")), "GAUGE", "r")
    expected = (
        struct.pack(">i", 200)
        + _field("")
        + struct.pack(">II", 0, 1)
        + _field("T")
        + struct.pack(">dBI", 1.5, 1, 2)
        + _field("ms")
        + _field("GAUGE")
        + _field("r")
        + _field("k")
        + _field("v")
        + _field("ü")
        + _field("")
    )
    for attempt in ("first", "reusing the fields of the first"):
        frame = encode_result(BatchResult(200, "", [], [metric]))
        assert _body(frame) == bytes([KIND_RESULT]) + expected, attempt


def test_many_distinct_metrics_and_list_dimensions_round_trip() -> None:
    metrics = [
        MetricRecord(f"M{i % 7}", float(i), "ms", (("request", f"r{i}"),), "GAUGE", f"r{i}")
        for i in range(2000)
    ]
    for _ in range(2):
        assert decode_result(_body(encode_result(BatchResult(200, "", [], metrics)))).metrics == (
            metrics
        )
    as_list = MetricRecord("L", 1.0, "ms", [("a", "b")], "COUNTER")  # a list, not the tuple
    (decoded,) = decode_result(_body(encode_result(BatchResult(200, "", [], [as_list])))).metrics
    assert decoded.dimensions == (("a", "b"),)


def test_error_result_round_trips() -> None:
    result = BatchResult(507, "Out of resources: ✗ ünïcødé")
    assert decode_result(_body(encode_result(result))) == result


def test_load_round_trip() -> None:
    spec = ModelLoadSpec(
        "mnist",
        "1.0",
        "/tmp/models/mnist",
        "handler:handle",
        batch_size=8,
        gpu_id=1,
        manifest={"model": {"modelName": "mnist", "handler": "handler.py"}},
        model_yaml_config={"pt2": {"compile": True}, "deviceIds": [0, 1]},
        intra_op_threads=2,
    )
    worker = {"worker_id": "9000", "cpu_affinity": [0, 1]}
    body = _body(encode_load(spec, worker))
    decoded, decoded_worker = decode_load(body)
    assert decoded == spec
    assert decoded_worker == worker


def test_shutdown_frame_is_kind_only() -> None:
    assert frame_kind(_body(encode_shutdown())) == KIND_SHUTDOWN
    assert len(encode_shutdown()) == PREFIX_SIZE + 1


def test_every_truncation_of_an_inference_frame_is_a_frame_error() -> None:
    body = _body(encode_inference(_batch()[:2]))
    for cut in range(1, len(body)):
        with pytest.raises(FrameError):
            decode_inference(body[:cut])


def test_every_truncation_of_a_result_frame_is_a_frame_error() -> None:
    result = BatchResult(
        200, "ok", [WorkerResponse("r", 200, "OK", "t", {"k": "v"}, b"xy")], _result().metrics
    )
    body = _body(encode_result(result))
    for cut in range(1, len(body)):
        with pytest.raises(FrameError):
            decode_result(body[:cut])


def test_trailing_bytes_are_a_frame_error() -> None:
    with pytest.raises(FrameError, match="trailing"):
        decode_inference(_body(encode_inference(_batch())) + b"\x00")
    with pytest.raises(FrameError, match="trailing"):
        decode_result(_body(encode_result(_result())) + b"\x00")


def test_oversized_length_inside_a_frame_is_rejected_without_allocating() -> None:
    # A request id claiming 4 GiB inside a 25-byte frame.
    body = bytes([KIND_INFER]) + struct.pack(">II", 1, 0xFFFFFFFF) + b"x" * 16
    with pytest.raises(FrameError, match="runs past the frame end"):
        decode_inference(body)


def test_absurd_counts_are_rejected_up_front() -> None:
    body = bytes([KIND_INFER]) + struct.pack(">I", 0xFFFFFFFF)
    with pytest.raises(FrameError, match="claims"):
        decode_inference(body)
    body = bytes([KIND_RESULT]) + struct.pack(">iI", 200, 0) + struct.pack(">II", 1 << 30, 0)
    with pytest.raises(FrameError, match="claims"):
        decode_result(body)


def test_invalid_utf8_is_a_frame_error() -> None:
    good = _body(encode_inference([WorkerRequest("ab", {}, [])]))
    bad = good.replace(b"ab", b"\xc3\x28")
    with pytest.raises(FrameError, match="UTF-8"):
        decode_inference(bad)


def test_unknown_or_wrong_kind_is_a_frame_error() -> None:
    with pytest.raises(FrameError, match="unknown frame kind"):
        frame_kind(b"Z")
    with pytest.raises(FrameError, match="empty"):
        frame_kind(b"")
    with pytest.raises(FrameError, match="not an inference frame"):
        decode_inference(_body(encode_result(_result())))
    with pytest.raises(FrameError, match="not a result frame"):
        decode_result(_body(encode_inference([])))
    with pytest.raises(FrameError, match="not a load frame"):
        decode_load(_body(encode_shutdown()))


def test_malformed_load_json_is_a_frame_error() -> None:
    with pytest.raises(FrameError, match="malformed load frame"):
        decode_load(b"L{not json")
    with pytest.raises(FrameError, match="malformed load frame"):
        decode_load(b'L{"spec": {"model_name": "m"}}')  # required fields missing


def test_length_prefix_is_checked_against_the_cap() -> None:
    check_frame_length(1, 10)
    check_frame_length(10, 10)
    with pytest.raises(FrameError, match="exceeds"):
        check_frame_length(11, 10)
    with pytest.raises(FrameError, match="too small"):
        check_frame_length(0, 10)


def test_splitter_reassembles_frames_however_the_stream_is_chunked() -> None:
    frames = [encode_inference(_batch()), encode_result(_result()), encode_shutdown()]
    stream = b"".join(frames)
    expected = [f[PREFIX_SIZE:] for f in frames]
    for chunk in (1, 3, 4, 5, 4096, 65536, len(stream)):
        splitter = FrameSplitter()
        bodies: list[bytes] = []
        for i in range(0, len(stream), chunk):
            bodies += splitter.feed(stream[i : i + chunk])
        assert bodies == expected, f"chunk size {chunk}"
        assert all(type(b) is bytes for b in bodies)


def test_splitter_rejects_an_oversized_prefix_before_buffering() -> None:
    splitter = FrameSplitter(max_frame_bytes=100)
    assert splitter.feed(encode_shutdown()) == [bytes([KIND_SHUTDOWN])]
    with pytest.raises(FrameError, match="exceeds the 100-byte limit"):
        splitter.feed(struct.pack(">I", 101))
