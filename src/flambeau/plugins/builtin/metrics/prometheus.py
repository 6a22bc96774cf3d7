"""The metrics API: ``/metrics`` in Prometheus text format 0.0.4, exactly as TorchServe wrote it.

TorchServe used Java simpleclient 0.9.0, whose output differs from Python ``prometheus_client``:
a trailing comma inside the label braces, Java ``Double.toString`` numbers (``8.0``, ``1.0E-4``),
counters without a ``_total`` suffix, and HELP/TYPE printed for families with no samples.
Scrapers and TorchServe's own tests (regexes over the text) depend on it, so the writer is
hand-rolled. Example line: ``Requests2XX{Level="Host",Hostname="h",} 3.0``.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable
from typing import Any

from flambeau.plugins.builtin.metrics.settings import MetricFamily, MetricsMode
from flambeau.plugins.builtin.openapi import metrics_document
from flambeau.web import ApiHandler

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_PLAIN_MIN, _PLAIN_MAX = 1e-3, 1e7  # Java prints decimals in [10^-3, 10^7), else E notation


def java_double(value: float) -> str:
    """Java's ``Double.toString``: shortest round-trip digits, ``.0`` for whole numbers, and
    ``<d>.<ddd>E<exp>`` outside [0.001, 10^7)."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    if value == 0:
        return "-0.0" if math.copysign(1.0, value) < 0 else "0.0"
    sign = "-" if value < 0 else ""
    digits, point = _shortest_digits(abs(value))
    if _PLAIN_MIN <= abs(value) < _PLAIN_MAX:
        if point <= 0:
            body = "0." + "0" * -point + digits
        elif point >= len(digits):
            body = digits + "0" * (point - len(digits)) + ".0"
        else:
            body = digits[:point] + "." + digits[point:]
    else:
        body = f"{digits[0]}.{digits[1:] or '0'}E{point - 1}"
    return sign + body


def _shortest_digits(value: float) -> tuple[str, int]:
    """``(digits, point)`` with ``value == 0.<digits> * 10**point``; Python's repr gives the
    shortest digits that round-trip, as Java 19+ does."""
    mantissa, _, exponent = repr(value).partition("e")
    whole, _, fraction = mantissa.partition(".")
    all_digits = whole + fraction
    point = len(whole) + (int(exponent) if exponent else 0)
    stripped = all_digits.lstrip("0")
    point -= len(all_digits) - len(stripped)
    return stripped.rstrip("0") or "0", point


def go_double(value: float) -> str:
    """simpleclient's ``doubleToGoString``: Go's names for the infinities and NaN."""
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return java_double(value)


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def help_text(family: MetricFamily) -> str:
    return f"Torchserve prometheus {family.kind} metric with unit: {family.unit}"


def _sample(
    out: list[str], name: str, names: Iterable[str], values: Iterable[str], v: float
) -> None:
    labels = "".join(f'{n}="{_escape_label(x)}",' for n, x in zip(names, values, strict=True))
    out.append(f"{name}{{{labels}}} {go_double(v)}\n" if labels else f"{name} {go_double(v)}\n")


def _wanted(family: MetricFamily, names: Collection[str]) -> bool:
    if not names:
        return True
    if family.name in names:
        return True
    return family.kind == "histogram" and any(
        f"{family.name}{suffix}" in names for suffix in ("_bucket", "_count", "_sum")
    )


def render(families: Iterable[MetricFamily], names: Collection[str] = ()) -> str:
    """The exposition of ``families`` (only those in ``names`` when given)."""
    out: list[str] = []
    for family in families:
        if not _wanted(family, names):
            continue
        name = family.name
        out.append(f"# HELP {name} {_escape_help(help_text(family))}\n")
        out.append(f"# TYPE {name} {family.kind}\n")
        for labels, value in family.values.items():
            if family.kind != "histogram":
                _sample(out, name, family.labelnames, labels, value)
                continue
            per_bucket, total, count = value[0], value[1], value[2]
            cumulative = 0
            bounds = (*family.buckets, math.inf)
            for bound, in_bucket in zip(bounds, per_bucket, strict=True):
                cumulative += in_bucket
                _sample(
                    out,
                    f"{name}_bucket",
                    (*family.labelnames, "le"),
                    (*labels, go_double(bound)),
                    float(cumulative),
                )
            _sample(out, f"{name}_count", family.labelnames, labels, float(count))
            _sample(out, f"{name}_sum", family.labelnames, labels, float(total))
    return "".join(out)


class MetricsHandler(ApiHandler):
    """Any method on ``/metrics[/...]``; ``name[]`` query parameters filter the families."""

    mode: MetricsMode

    def setup(self, **kwargs: Any) -> None:
        self.mode = kwargs.pop("mode", MetricsMode.LOG)
        super().setup(**kwargs)

    async def get(self) -> None:
        families = [
            family
            for family in self.server.metrics.families.values()
            if family.enabled and self.mode.exposes(family)
        ]
        body = render(families, set(self.get_query_arguments("name[]")))
        self.set_header("Content-Type", CONTENT_TYPE)
        self.finish(body.encode("utf-8"))

    post = put = delete = patch = options = get


class MetricsDescriptionHandler(ApiHandler):
    """``OPTIONS /`` and any method on ``/api-description``: the metrics API's OpenAPI."""

    async def get(self) -> None:
        self.send_json(metrics_document(self.server))

    post = put = delete = patch = options = get


class MetricsRootHandler(MetricsDescriptionHandler):
    """``/`` answers only OPTIONS (TorchServe: 405 for other methods)."""

    SUPPORTED_METHODS = ("OPTIONS",)
