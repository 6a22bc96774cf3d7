"""The handler metrics API (``context.metrics``), TorchServe's ``ts.metrics`` surface.

Handlers call ``add_counter``/``add_time``/``add_metric``/... or keep a metric object from
``add_metric_to_cache`` and call ``add_or_update``. Every update becomes a
:class:`~flambeau.api.MetricRecord` in a bounded buffer that the worker drains after each batch
(:meth:`MetricsCache.drain`); nothing is printed to stdout as TorchServe's ``[METRICS]`` lines.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

from flambeau.api import MetricRecord

__all__ = [
    "UNIT_ALIASES",
    "CachingMetric",
    "Dimension",
    "GeneralMetricsCacheError",
    "MetricTypes",
    "MetricsCache",
    "MetricsCacheKeyError",
    "MetricsCacheTypeError",
    "MetricsCacheValueError",
    "normalize_unit",
]

logger = logging.getLogger(__name__)

# TorchServe's ts.metrics.unit.Units; any other string is used verbatim.
UNIT_ALIASES: Mapping[str, str] = {
    "ms": "Milliseconds",
    "s": "Seconds",
    "percent": "Percent",
    "count": "Count",
    "MB": "Megabytes",
    "GB": "Gigabytes",
    "kB": "Kilobytes",
    "B": "Bytes",
    "": "unit",
}

DEFAULT_MAX_RECORDS = 10_000

# A tuple, not ``int | float``: that expression builds a new union object on every update.
_NUMBER_TYPES = (int, float)


class GeneralMetricsCacheError(Exception):
    """Base of the metrics-cache errors (``ts.metrics.metric_cache_errors``)."""


class MetricsCacheTypeError(GeneralMetricsCacheError, TypeError):
    pass


class MetricsCacheKeyError(GeneralMetricsCacheError, KeyError):
    pass


class MetricsCacheValueError(GeneralMetricsCacheError, ValueError):
    pass


class MetricTypes(enum.Enum):
    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"


class Dimension:
    """A metric dimension: a ``name``/``value`` pair printed as ``name:value``."""

    def __init__(self, name: str, value: Any) -> None:
        self.name = name
        self.value = value

    def __str__(self) -> str:
        return f"{self.name}:{self.value}"

    def __repr__(self) -> str:
        return f"Dimension({self.name!r}, {self.value!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Dimension) and (self.name, self.value) == (other.name, other.value)

    def __hash__(self) -> int:
        return hash((self.name, str(self.value)))

    def to_dict(self) -> dict[str, Any]:
        return {"Name": self.name, "Value": self.value}


def normalize_unit(unit: str | None) -> str:
    """Map TorchServe's short unit names (``ms``, ``MB``...) to the names that go on the wire."""
    if unit is None:
        return "unit"
    return UNIT_ALIASES.get(unit, unit)


def _metric_type(value: MetricTypes | str) -> MetricTypes:
    if isinstance(value, MetricTypes):
        return value
    if isinstance(value, str):
        try:
            return MetricTypes(value.lower())
        except ValueError:
            pass
    raise MetricsCacheTypeError(f"`metric_type` must be a MetricTypes enum, got {value!r}")


def _dimensions(dimensions: Iterable[Any] | Mapping[str, Any] | None) -> list[Dimension]:
    """Accept Dimension objects (TorchServe), ``(name, value)`` pairs or a mapping; copy them."""
    if dimensions is None:
        return []
    if isinstance(dimensions, Mapping):
        return [Dimension(str(k), v) for k, v in dimensions.items()]
    result = []
    for dim in dimensions:
        if isinstance(dim, Dimension):
            result.append(dim)
        elif isinstance(dim, tuple | list) and len(dim) == 2:
            result.append(Dimension(str(dim[0]), dim[1]))
        else:
            raise MetricsCacheTypeError(f"dimensions must be Dimension objects, got {dim!r}")
    return result


class CachingMetric:
    """One named metric; each ``add_or_update`` emits a :class:`MetricRecord` to its sink."""

    def __init__(
        self,
        metric_name: str,
        unit: str,
        dimension_names: list[str] | None = None,
        metric_type: MetricTypes = MetricTypes.COUNTER,
        *,
        sink: MetricsCache | None = None,
    ) -> None:
        self.metric_name = metric_name
        self.unit = normalize_unit(unit)
        self.dimension_names = list(dimension_names or [])
        self.metric_type = _metric_type(metric_type)
        self._sink = sink

    def __repr__(self) -> str:
        return (
            f"CachingMetric({self.metric_name!r}, {self.unit!r}, {self.dimension_names!r}, "
            f"{self.metric_type})"
        )

    def add_or_update(
        self,
        value: float,
        dimension_values: Iterable[Any] = (),
        request_id: str | None = "",
    ) -> None:
        """Record ``value`` with ``dimension_values`` matching ``dimension_names`` in order.

        Like TorchServe, a bad update (wrong number of dimensions, negative counter increment)
        is logged and dropped rather than raised, so metrics never fail a prediction.
        """
        values = list(dimension_values)
        names = self.dimension_names
        if len(values) != len(names):
            logger.error(
                "Failed to update metric %s: dimension values %s do not match names %s",
                self.metric_name,
                values,
                names,
            )
            return
        if not isinstance(value, _NUMBER_TYPES) or isinstance(value, bool):
            logger.error(
                "Failed to update metric %s: value %r is not a number", self.metric_name, value
            )
            return
        if self.metric_type is MetricTypes.COUNTER and value < 0:
            logger.error(
                "Failed to update metric %s: counter increment %s < 0", self.metric_name, value
            )
            return
        record = MetricRecord(
            name=self.metric_name,
            value=float(value),
            unit=self.unit,
            dimensions=tuple(zip(names, map(str, values), strict=True)),
            metric_type=self.metric_type.name,
            request_id=request_id or None,
        )
        if self._sink is not None:
            self._sink.record(record)
        else:
            logger.debug("metric without a cache: %s", record)

    def update(
        self,
        value: float,
        request_id: str | None = "",
        dimensions: Iterable[Any] | Mapping[str, Any] | None = None,
    ) -> None:
        """Backwards-compatible update: ``dimensions`` (Dimension objects) replace the names."""
        dims = _dimensions(dimensions)
        self.dimension_names = [d.name for d in dims]
        self.add_or_update(value, [d.value for d in dims], request_id)


class MetricsCache:
    """``context.metrics``: a cache of metric objects plus the buffer of emitted records.

    The buffer is bounded (oldest records are dropped, with one warning) so a worker whose
    transport never drains cannot grow without limit. Thread-safe.
    """

    def __init__(self, model_name: str | None = None, *, max_records: int = DEFAULT_MAX_RECORDS):
        self.model_name = model_name
        self.request_ids: Mapping[int, str] | None = None
        self.cache: dict[MetricTypes, dict[str, CachingMetric]] = {}
        self._records: deque[MetricRecord] = deque(maxlen=max_records)
        self._lock = threading.Lock()
        self._overflow_warned = False

    # ---- buffer ------------------------------------------------------------------------

    def record(self, record: MetricRecord) -> None:
        """Append one emitted record (called by :class:`CachingMetric`)."""
        with self._lock:
            maxlen = self._records.maxlen
            if maxlen is not None and len(self._records) >= maxlen and not self._overflow_warned:
                self._overflow_warned = True
                logger.warning("metrics buffer full (%d records): dropping the oldest", maxlen)
            self._records.append(record)

    def drain(self) -> list[MetricRecord]:
        """Return and forget every record emitted since the previous call."""
        with self._lock:
            records = list(self._records)
            self._records.clear()
            self._overflow_warned = False
        return records

    # ---- TorchServe's MetricCacheAbstract API --------------------------------------------

    def set_request_ids(self, request_ids: Mapping[int, str] | None) -> None:
        self.request_ids = request_ids

    def _get_req(self, idx: int | None) -> str | None:
        # TorchServe: the request id of batch index ``idx``, else all ids of the batch joined.
        ids = self.request_ids
        if not ids:
            return None
        if idx is not None and idx in ids:
            return ids[idx]
        return ",".join(ids.values())

    def _add_default_dims(self, dimensions: list[Dimension], *, error: bool) -> list[Dimension]:
        names = {d.name for d in dimensions}
        if error:
            if "Level" not in names:
                dimensions.append(Dimension("Level", "Error"))
            return dimensions
        if "ModelName" not in names:
            dimensions.append(Dimension("ModelName", self.model_name))
        if "Level" not in names:
            dimensions.append(Dimension("Level", "Model"))
        return dimensions

    def _emit(
        self,
        *,
        name: str,
        value: float,
        unit: str,
        idx: int | None,
        dimensions: Iterable[Any] | Mapping[str, Any] | None,
        metric_type: MetricTypes | str,
        error: bool = False,
    ) -> None:
        req_id = None if error else self._get_req(idx)
        names: list[str]
        values: list[Any]
        if dimensions is None:
            # Most emits (HandlerTime and PredictionTime on every batch) carry only the
            # default dimensions: no Dimension objects to build and look through.
            if error:
                names, values = ["Level"], ["Error"]
            else:
                names, values = ["ModelName", "Level"], [self.model_name, "Model"]
        else:
            dims = self._add_default_dims(_dimensions(dimensions), error=error)
            names = [d.name for d in dims]
            values = [d.value for d in dims]
        metric = self._get_or_add_metric(name, unit, names, _metric_type(metric_type))
        metric.add_or_update(value, values, req_id)

    def add_metric(
        self,
        name: str,
        value: float,
        unit: str,
        idx: int | None = None,
        dimensions: Iterable[Any] | Mapping[str, Any] | None = None,
        metric_type: MetricTypes | str = MetricTypes.COUNTER,
    ) -> None:
        """Add a generic metric (default type COUNTER)."""
        self._emit(
            name=name,
            value=value,
            unit=unit,
            idx=idx,
            dimensions=dimensions,
            metric_type=metric_type,
        )

    def add_counter(
        self,
        name: str,
        value: float,
        idx: int | None = None,
        dimensions: Iterable[Any] | Mapping[str, Any] | None = None,
    ) -> None:
        """Increment a counter (unit ``count``)."""
        self._emit(
            name=name,
            value=value,
            unit="count",
            idx=idx,
            dimensions=dimensions,
            metric_type=MetricTypes.COUNTER,
        )

    def add_time(
        self,
        name: str,
        value: float,
        idx: int | None = None,
        unit: str = "ms",
        dimensions: Iterable[Any] | Mapping[str, Any] | None = None,
        metric_type: MetricTypes | str = MetricTypes.GAUGE,
    ) -> None:
        """Add a duration in ``ms`` or ``s`` (default type GAUGE)."""
        if unit not in ("ms", "s"):
            raise MetricsCacheValueError("the unit for a timed metric should be one of ['ms', 's']")
        self._emit(
            name=name,
            value=value,
            unit=unit,
            idx=idx,
            dimensions=dimensions,
            metric_type=metric_type,
        )

    def add_size(
        self,
        name: str,
        value: float,
        idx: int | None = None,
        unit: str = "MB",
        dimensions: Iterable[Any] | Mapping[str, Any] | None = None,
        metric_type: MetricTypes | str = MetricTypes.GAUGE,
    ) -> None:
        """Add a size in ``MB``/``kB``/``GB``/``B`` (default type GAUGE)."""
        if unit not in ("MB", "kB", "GB", "B"):
            raise MetricsCacheValueError(
                "The unit for size based metric is one of ['MB','kB', 'GB', 'B']"
            )
        self._emit(
            name=name,
            value=value,
            unit=unit,
            idx=idx,
            dimensions=dimensions,
            metric_type=metric_type,
        )

    def add_percent(
        self,
        name: str,
        value: float,
        idx: int | None = None,
        dimensions: Iterable[Any] | Mapping[str, Any] | None = None,
        metric_type: MetricTypes | str = MetricTypes.GAUGE,
    ) -> None:
        """Add a percentage (default type GAUGE)."""
        self._emit(
            name=name,
            value=value,
            unit="percent",
            idx=idx,
            dimensions=dimensions,
            metric_type=metric_type,
        )

    def add_error(
        self,
        name: str,
        value: float,
        dimensions: Iterable[Any] | Mapping[str, Any] | None = None,
    ) -> None:
        """Add an error counter; its default dimension is ``Level:Error`` (no ModelName)."""
        self._emit(
            name=name,
            value=value,
            unit="",
            idx=None,
            dimensions=dimensions,
            metric_type=MetricTypes.COUNTER,
            error=True,
        )

    def _get_or_add_metric(
        self, name: str, unit: str, dimension_names: list[str], metric_type: MetricTypes
    ) -> CachingMetric:
        metric = self.cache.get(metric_type, {}).get(name)
        if metric is None or metric.dimension_names != dimension_names:
            metric = self.add_metric_to_cache(name, unit, dimension_names, metric_type)
        return metric

    def add_metric_to_cache(
        self,
        metric_name: str,
        unit: str,
        dimension_names: list[str] | None = None,
        metric_type: MetricTypes | str = MetricTypes.COUNTER,
    ) -> CachingMetric:
        """Create (or replace) a metric object; call ``add_or_update`` on it to emit values."""
        if not isinstance(metric_name, str):
            raise MetricsCacheTypeError("`metric_name` must be a str")
        if not isinstance(unit, str):
            raise MetricsCacheTypeError("`unit` must be a str")
        if dimension_names is not None and not isinstance(dimension_names, list):
            raise MetricsCacheTypeError("`dimension_names` should be a list of strings")
        mtype = _metric_type(metric_type)
        metric = CachingMetric(metric_name, unit, dimension_names, mtype, sink=self)
        self.cache.setdefault(mtype, {})[metric_name] = metric
        return metric

    def get_metric(
        self, metric_name: str, metric_type: MetricTypes | str = MetricTypes.COUNTER
    ) -> CachingMetric:
        """The cached metric object; raises :class:`MetricsCacheKeyError` when absent."""
        if not isinstance(metric_name, str):
            raise MetricsCacheTypeError("`metric_name` must be a str")
        mtype = _metric_type(metric_type)
        try:
            return self.cache[mtype][metric_name]
        except KeyError:
            raise MetricsCacheKeyError(
                f"Metric of type '{mtype}' and name '{metric_name}' doesn't exist"
            ) from None

    def cache_keys(self) -> list[str]:
        """``type:name`` for every cached metric (TorchServe's testing helper)."""
        return [f"{t.value}:{name}" for t, metrics in self.cache.items() for name in metrics]
