"""A function handler for the Open Inference Protocol tests (no torch needed).

A KServe v2 row (``{"name", "shape", "datatype", "data"}``) answers: floats doubled, integers
plus one, BYTES (base64 when they came binary) upper-cased, each with a ``batch_rows``
parameter saying how many rows the handler call had. Any other row is echoed, so a test can
see exactly what an envelope handed to the handler.
"""

from __future__ import annotations

import base64
import binascii


def _map(values, fn):
    if isinstance(values, list):
        return [_map(v, fn) for v in values]
    return fn(values)


def _text(item):
    try:
        return base64.b64decode(item, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return item


def _tensor(row, batch_rows):
    datatype, values = row["datatype"], row["data"]
    if datatype == "BYTES":
        answer = {
            "datatype": "BYTES",
            "shape": row["shape"],
            "data": _map(values, lambda v: _text(v).upper()),
        }
    elif datatype.startswith(("FP", "BF")):
        answer = {"data": _map(values, lambda v: v * 2)}
    elif datatype == "BOOL":
        answer = {"data": _map(values, lambda v: not v)}
    else:
        answer = {"data": _map(values, lambda v: v + 1)}
    answer["parameters"] = {"batch_rows": batch_rows}
    return answer


def _unwrap(row):
    # Until the worker unwraps envelope rows, a row may arrive as {"body": row}.
    return row["body"] if isinstance(row, dict) and set(row) == {"body"} else row


def handle(data, context):
    if data is None:
        return None
    out = []
    for row in data:
        inner = _unwrap(row)
        if isinstance(inner, dict) and "datatype" in inner and "data" in inner:
            out.append(_tensor(inner, len(data)))
        elif isinstance(row, bytes | bytearray):
            out.append({"echo_b64": base64.b64encode(row).decode()})
        else:
            out.append({"echo": row})
    return out
