"""The OIP tensor codec: raw bytes checked against numpy's, JSON checks, shapes, BYTES."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from flambeau.api import BadRequestError
from flambeau.envelopes.tensors import (
    DATATYPES,
    Tensor,
    flatten,
    from_json,
    from_raw,
    infer_shape,
    reshape,
    split_bytes,
    to_raw,
)

NUMPY = {
    "BOOL": (np.bool_, [True, False, True]),
    "UINT8": (np.uint8, [0, 7, 255]),
    "UINT16": (np.uint16, [0, 513, 65535]),
    "UINT32": (np.uint32, [0, 70000, 2**32 - 1]),
    "UINT64": (np.uint64, [0, 2**40, 2**64 - 1]),
    "INT8": (np.int8, [-128, 0, 127]),
    "INT16": (np.int16, [-32768, 5, 32767]),
    "INT32": (np.int32, [-(2**31), 9, 2**31 - 1]),
    "INT64": (np.int64, [-(2**63), 11, 2**63 - 1]),
    "FP16": (np.float16, [0.5, -2.0, 65504.0]),
    "FP32": (np.float32, [0.1, -3.5, 1e30]),
    "FP64": (np.float64, [0.1, -3.5, 1e300]),
}


@pytest.mark.parametrize("datatype", sorted(NUMPY))
def test_raw_contents_match_numpy_little_endian(datatype: str) -> None:
    dtype, values = NUMPY[datatype]
    array = np.array(values, dtype=np.dtype(dtype).newbyteorder("<")).reshape(3, 1)
    raw = array.tobytes()
    tensor = from_raw("t", datatype, [3, 1], raw)
    assert tensor.data == array.reshape(-1).tolist()
    assert tensor.raw
    assert to_raw(tensor) == raw
    json_tensor = from_json("t", datatype, [3, 1], array.tolist())
    assert to_raw(json_tensor) == raw


def test_bf16_is_the_upper_half_of_fp32_rounded_to_even() -> None:
    exact = [1.0, -2.5, 0.15625]
    raw = b"".join(
        struct.pack("<I", struct.unpack("<I", struct.pack("<f", v))[0] >> 16)[:2] for v in exact
    )
    tensor = from_raw("b", "BF16", [3], raw)
    assert tensor.data == exact
    assert to_raw(tensor) == raw
    # 1 + 1.5 * 2**-7 lies halfway between two bf16 values: it goes to the even one.
    rounded = to_raw(Tensor("b", "BF16", (2,), [1 + 1.5 * 2**-7, 1 + 2**-9]))
    assert from_raw("b", "BF16", [2], rounded).data == [1 + 2**-6, 1.0]


def test_bytes_elements_are_length_prefixed() -> None:
    items = [b"", b"hello", "wörld".encode()]
    raw = b"".join(struct.pack("<I", len(i)) + i for i in items)
    tensor = from_raw("s", "BYTES", [3], raw)
    assert tensor.data == items
    assert to_raw(tensor) == raw
    with pytest.raises(BadRequestError, match="element 1 is truncated"):
        split_bytes("s", raw[:8], 3)
    with pytest.raises(BadRequestError, match="end before element 2"):
        split_bytes("s", raw[: -len(items[2]) - 2], 3)
    with pytest.raises(BadRequestError, match="3 bytes left over"):
        split_bytes("s", raw + b"xyz", 3)


@pytest.mark.parametrize(
    ("datatype", "shape", "data", "message"),
    [
        ("FP32", [2, 2], [1, 2, 3], "needs 4 elements, got 3"),
        ("FP32", [2], ["1", 2], "'1' is not a FP32 value"),
        ("INT32", [2], [1, 2.5], "2.5 is not a INT32 value"),
        ("INT8", [1], [True], "True is not a INT8 value"),
        ("UINT8", [1], [256], "256 is not a UINT8 value"),
        ("BOOL", [1], [1], "1 is not a BOOL value"),
        ("BYTES", [1], [3], "3 is not a BYTES value"),
        ("FP128", [1], [1.0], "unsupported datatype 'FP128'"),
        ("BYTES", [1], ["\ud800"], "BYTES text is not valid UTF-8"),
        ("FP32", [-1], [1.0], "shape must be a list of non-negative integers"),
        ("FP32", "2", [1.0, 2.0], "shape must be a list of non-negative integers"),
    ],
)
def test_json_tensors_are_checked(
    datatype: str, shape: object, data: list[object], message: str
) -> None:
    with pytest.raises(BadRequestError, match=message):
        from_json("x", datatype, shape, data)


def test_raw_length_is_checked_against_shape() -> None:
    with pytest.raises(BadRequestError, match="needs 12 bytes, got 8"):
        from_raw("x", "FP32", [3], b"\x00" * 8)


def test_shapes_flatten_and_reshape() -> None:
    nested = [[[1, 2], [3, 4]], [[5, 6], [7, 8]]]
    assert flatten(nested) == list(range(1, 9))
    assert flatten(7) == [7]
    assert reshape(list(range(1, 9)), [2, 2, 2]) == nested
    assert reshape([4], []) == 4
    assert reshape([], [0, 3]) == []
    assert infer_shape(nested) == (2, 2, 2)
    assert infer_shape([[1, 2], [3]]) is None
    assert infer_shape(5) == ()
    assert infer_shape([]) == (0,)
    assert sorted(DATATYPES) == sorted([*NUMPY, "BF16", "BYTES"])
