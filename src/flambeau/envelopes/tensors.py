"""The Open Inference Protocol's tensors without numpy: datatypes, shapes, raw bytes, JSON.

A :class:`Tensor` holds its elements as one flat row-major list of Python values (bool, int,
float, or bytes for ``BYTES``). Raw contents are little-endian, as the protocol says; ``BYTES``
elements are each prefixed by a 4-byte little-endian length; ``BF16`` is the upper half of
an FP32. Every check raises :class:`~flambeau.api.BadRequestError` naming the tensor, so a
malformed tensor is answered with a 400 and never reaches a worker.
"""

from __future__ import annotations

import math
import struct
import sys
from array import array
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from flambeau.api import BadRequestError


@dataclass(frozen=True, slots=True)
class DataType:
    name: str
    kind: str  # bool | int | uint | float | bytes
    size: int  # bytes per element in raw form; 0 for BYTES
    code: str  # struct / array code; "" where neither has one (BF16, BYTES)
    low: float = 0.0
    high: float = 0.0

    def accepts(self, value: Any) -> bool:
        """Whether a JSON value is an element of this type."""
        if self.kind == "bool":
            return isinstance(value, bool)
        if self.kind == "bytes":
            return isinstance(value, str)
        if isinstance(value, bool):
            return False
        if self.kind == "float":
            return isinstance(value, int | float)
        return isinstance(value, int) and self.low <= value <= self.high


def _int(name: str, bits: int, code: str) -> DataType:
    return DataType(name, "int", bits // 8, code, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)


def _uint(name: str, bits: int, code: str) -> DataType:
    return DataType(name, "uint", bits // 8, code, 0, 2**bits - 1)


DATATYPES: dict[str, DataType] = {
    t.name: t
    for t in (
        DataType("BOOL", "bool", 1, "?"),
        _uint("UINT8", 8, "B"),
        _uint("UINT16", 16, "H"),
        _uint("UINT32", 32, "I"),
        _uint("UINT64", 64, "Q"),
        _int("INT8", 8, "b"),
        _int("INT16", 16, "h"),
        _int("INT32", 32, "i"),
        _int("INT64", 64, "q"),
        DataType("FP16", "float", 2, "e"),
        DataType("FP32", "float", 4, "f"),
        DataType("FP64", "float", 8, "d"),
        DataType("BF16", "float", 2, ""),
        DataType("BYTES", "bytes", 0, ""),
    )
}
# array's codes are native-endian and native-sized; struct ("<") is used where they differ.
_ARRAY_OK = sys.byteorder == "little"


@dataclass(frozen=True, slots=True)
class Tensor:
    """One named tensor: flat row-major ``data`` of ``prod(shape)`` elements."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: list[Any]
    parameters: Mapping[str, Any] = field(default_factory=dict)
    raw: bool = False  # came as raw/binary contents rather than JSON


def datatype_of(name: str, datatype: Any) -> DataType:
    found = DATATYPES.get(datatype) if isinstance(datatype, str) else None
    if found is None:
        raise BadRequestError(f"tensor '{name}': unsupported datatype {datatype!r}")
    return found


def check_shape(name: str, shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, list | tuple) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise BadRequestError(f"tensor '{name}': shape must be a list of non-negative integers")
    return tuple(shape)


def element_count(shape: Sequence[int]) -> int:
    return math.prod(shape)


def flatten(data: Any) -> list[Any]:
    """Row-major elements of a nested list (the protocol allows nested or flat data)."""
    if not isinstance(data, list):
        return [data]
    if not any(isinstance(item, list) for item in data):
        return data
    flat: list[Any] = []
    stack: list[Iterable[Any]] = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def reshape(flat: Sequence[Any], shape: Sequence[int]) -> Any:
    """The nested list of ``shape`` holding ``flat`` (a scalar for shape ``[]``)."""
    if not shape:
        return flat[0] if flat else None
    nested: list[Any] = list(flat)
    for dim in reversed(shape[1:]):
        nested = [nested[i : i + dim] for i in range(0, len(nested), dim)] if dim else []
    return nested


def infer_shape(value: Any) -> tuple[int, ...] | None:
    """The shape of a rectangular nested list; None when it is ragged."""
    shape: list[int] = []
    level = [value]
    while True:
        lists = [v for v in level if isinstance(v, list)]
        if not lists:
            return tuple(shape)
        if len(lists) != len(level) or len({len(v) for v in lists}) != 1:
            return None
        shape.append(len(lists[0]))
        level = [item for v in lists for item in v]
        if not level:
            return tuple(shape)


_NOTHING = object()


def from_json(name: str, datatype: Any, shape: Any, data: Any) -> Tensor:
    """A tensor from the JSON form: every element checked against the datatype."""
    dtype = datatype_of(name, datatype)
    dims = check_shape(name, shape)
    flat = flatten(data)
    expected = element_count(dims)
    if len(flat) != expected:
        raise BadRequestError(
            f"tensor '{name}': shape {list(dims)} needs {expected} elements, got {len(flat)}"
        )
    bad = next((v for v in flat if not dtype.accepts(v)), _NOTHING)
    if bad is not _NOTHING:
        raise BadRequestError(f"tensor '{name}': {bad!r} is not a {dtype.name} value")
    if dtype.kind == "bytes":
        try:
            flat = [v.encode("utf-8") for v in flat]
        except UnicodeEncodeError:
            raise BadRequestError(f"tensor '{name}': BYTES text is not valid UTF-8") from None
    elif dtype.kind == "float":
        flat = [float(v) for v in flat]
    return Tensor(name, dtype.name, dims, flat)


def from_raw(name: str, datatype: Any, shape: Any, raw: bytes) -> Tensor:
    """A tensor from raw little-endian contents, checking the byte count against the shape."""
    dtype = datatype_of(name, datatype)
    dims = check_shape(name, shape)
    count = element_count(dims)
    if dtype.kind == "bytes":
        return Tensor(name, dtype.name, dims, split_bytes(name, raw, count), raw=True)
    if len(raw) != count * dtype.size:
        raise BadRequestError(
            f"tensor '{name}': shape {list(dims)} of {dtype.name} needs "
            f"{count * dtype.size} bytes, got {len(raw)}"
        )
    return Tensor(name, dtype.name, dims, unpack(dtype, raw, count), raw=True)


def unpack(dtype: DataType, raw: bytes, count: int) -> list[Any]:
    if dtype.name == "BF16":
        widened = bytearray(4 * count)
        widened[2::4] = raw[0::2]
        widened[3::4] = raw[1::2]
        return list(struct.unpack(f"<{count}f", widened))
    if _ARRAY_OK and dtype.code in "bBhHiIqQfd" and array(dtype.code).itemsize == dtype.size:
        values = array(dtype.code)
        values.frombytes(raw)
        return values.tolist()
    return list(struct.unpack(f"<{count}{dtype.code}", raw))


def split_bytes(name: str, raw: bytes, count: int) -> list[bytes]:
    """BYTES raw contents: ``count`` elements, each a 4-byte little-endian length + bytes."""
    items: list[bytes] = []
    offset = 0
    view = memoryview(raw)
    for _ in range(count):
        if offset + 4 > len(raw):
            raise BadRequestError(
                f"tensor '{name}': BYTES contents end before element {len(items)}"
            )
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise BadRequestError(f"tensor '{name}': BYTES element {len(items)} is truncated")
        items.append(bytes(view[offset : offset + length]))
        offset += length
    if offset != len(raw):
        raise BadRequestError(
            f"tensor '{name}': {len(raw) - offset} bytes left over after {count} BYTES elements"
        )
    return items


def to_raw(tensor: Tensor) -> bytes:
    """The raw little-endian contents of ``tensor``."""
    dtype = DATATYPES[tensor.datatype]
    data = tensor.data
    if dtype.kind == "bytes":
        parts = []
        for item in data:
            encoded = item if isinstance(item, bytes) else str(item).encode("utf-8")
            parts.append(struct.pack("<I", len(encoded)))
            parts.append(encoded)
        return b"".join(parts)
    if dtype.name == "BF16":
        words = array("I", struct.pack(f"<{len(data)}f", *data))
        if sys.byteorder != "little":
            words.byteswap()
        # Round to nearest even, as torch and ml_dtypes do, instead of truncating.
        halves = array("H", ((w + 0x7FFF + ((w >> 16) & 1)) >> 16 & 0xFFFF for w in words))
        if sys.byteorder != "little":
            halves.byteswap()
        return halves.tobytes()
    if _ARRAY_OK and dtype.code in "bBhHiIqQfd" and array(dtype.code).itemsize == dtype.size:
        return array(dtype.code, data).tobytes()
    return struct.pack(f"<{len(data)}{dtype.code}", *data)


def json_data(tensor: Tensor) -> list[Any]:
    """The flat JSON ``data`` of ``tensor`` (BYTES as text; see :func:`text_of`)."""
    if tensor.datatype == "BYTES":
        return [text_of(item) for item in tensor.data]
    return tensor.data


def text_of(item: Any) -> str:
    if isinstance(item, bytes):
        # JSON can only carry text; the binary data extension carries anything.
        return item.decode("utf-8", "replace")
    return str(item)
