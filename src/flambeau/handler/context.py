"""The ``Context`` a handler receives, with TorchServe's exact surface (``ts.context``).

One Context lives as long as its worker's model; :class:`~flambeau.handler.service.ModelService`
refreshes ``request_ids`` and ``request_processor`` for every batch. Handlers written for
TorchServe read request headers and set per-request status, headers and content type through it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flambeau.handler.metrics import MetricsCache

if TYPE_CHECKING:
    from flambeau.api import BatchResult

__all__ = ["Context", "RequestProcessor"]


class RequestProcessor:
    """Per-request state: the request's headers in, the response status and headers out.

    Request "headers" also hold one ``{input_name: {"content-type": ...}}`` entry per input, as
    TorchServe puts them. Header lookups fall back to a case-insensitive match, because HTTP
    header names are case-insensitive and transports normalise their case differently.
    """

    def __init__(self, request_header: dict[str, Any]) -> None:
        self._status_code = 200
        self._reason_phrase: str | None = None
        self._response_header: dict[str, str] = {}
        self._request_header = request_header

    def get_request_property(self, key: str) -> Any:
        value = self._request_header.get(key)
        if value is None and isinstance(key, str):
            lowered = key.lower()
            for name, candidate in self._request_header.items():
                if name.lower() == lowered:
                    return candidate
        return value

    def get_request_properties(self) -> dict[str, Any]:
        return self._request_header

    def report_status(self, code: int, reason_phrase: str | None = None) -> None:
        self._status_code = code
        self._reason_phrase = reason_phrase

    def get_response_status_code(self) -> int:
        return self._status_code

    def get_response_status_phrase(self) -> str | None:
        return self._reason_phrase

    def add_response_property(self, key: str, value: str) -> None:
        self._response_header[key] = value

    def get_response_headers(self) -> dict[str, str]:
        return self._response_header

    def get_response_header(self, key: str) -> str | None:
        return self._response_header.get(key)


class Context:
    """Model and worker information plus the current batch's per-request state.

    The constructor keeps TorchServe's positional signature so code that builds a Context by
    hand (handler unit tests) keeps working.
    """

    def __init__(
        self,
        model_name: str,
        model_dir: str,
        manifest: dict[str, Any] | None,
        batch_size: int,
        gpu: int | None,
        mms_version: str,
        limit_max_image_pixels: bool = True,
        metrics: MetricsCache | None = None,
        model_yaml_config: dict[str, Any] | None = None,
    ) -> None:
        self.model_name = model_name
        self.manifest = manifest
        self._system_properties: dict[str, Any] = {
            "model_dir": model_dir,
            "gpu_id": gpu,
            "batch_size": batch_size,
            "server_name": "MMS",
            "server_version": mms_version,
            "limit_max_image_pixels": limit_max_image_pixels,
        }
        self.request_ids: dict[int, str] | None = None
        self._request_processor: list[RequestProcessor] | None = None
        self._metrics = metrics if metrics is not None else MetricsCache(model_name)
        self.model_yaml_config: dict[str, Any] = (
            model_yaml_config if model_yaml_config is not None else {}
        )
        # TorchServe streams through this socket; flambeau streams through intermediate_sink.
        self.cl_socket: Any = None
        # Set by ModelService to the worker transport's callable (see utils.send_intermediate_...).
        self.intermediate_sink: Callable[[BatchResult], None] | None = None
        # Optional per-request callables (indexed like request_ids) deciding ts_stream_next.
        self.stopping_criteria: Any = None
        self.header_key_sequence_id = os.environ.get(
            "TS_REQUEST_SEQUENCE_ID", "ts_request_sequence_id"
        )
        self.header_key_sequence_start = os.environ.get(
            "TS_REQUEST_SEQUENCE_START", "ts_request_sequence_start"
        )
        self.header_key_sequence_end = os.environ.get(
            "TS_REQUEST_SEQUENCE_END", "ts_request_sequence_end"
        )

    @property
    def system_properties(self) -> dict[str, Any]:
        return self._system_properties

    @property
    def request_processor(self) -> list[RequestProcessor] | None:
        return self._request_processor

    @request_processor.setter
    def request_processor(self, request_processor: list[RequestProcessor] | None) -> None:
        self._request_processor = request_processor

    @property
    def metrics(self) -> MetricsCache:
        return self._metrics

    @metrics.setter
    def metrics(self, metrics: MetricsCache) -> None:
        self._metrics = metrics

    def _processor(self, idx: int) -> RequestProcessor | None:
        processors = self._request_processor
        if processors is None or not 0 <= idx < len(processors):
            return None
        return processors[idx]

    def _require_processor(self, idx: int) -> RequestProcessor:
        processor = self._processor(idx)
        if processor is None:
            size = len(self._request_processor or ())
            raise IndexError(f"no request at batch index {idx} (batch size {size})")
        return processor

    # ---- requests ------------------------------------------------------------------------

    def get_request_id(self, idx: int = 0) -> str | None:
        if self.request_ids is None:
            return None
        return self.request_ids.get(idx)

    def get_request_header(self, idx: int, key: str) -> Any:
        processor = self._processor(idx)
        return None if processor is None else processor.get_request_property(key)

    def get_all_request_header(self, idx: int) -> dict[str, Any]:
        processor = self._processor(idx)
        return {} if processor is None else processor.get_request_properties()

    def get_sequence_id(self, idx: int) -> str | None:
        """The session id of a stateful (sequence-batching) request."""
        return self.get_request_header(idx, self.header_key_sequence_id)

    # ---- responses -----------------------------------------------------------------------

    def set_response_content_type(self, idx: int, value: str) -> None:
        self.set_response_header(idx, "content-type", value)

    def get_response_content_type(self, idx: int) -> str | None:
        return self.get_response_headers(idx).get("content-type")

    def get_response_status(self, idx: int) -> tuple[int, str | None]:
        processor = self._require_processor(idx)
        return processor.get_response_status_code(), processor.get_response_status_phrase()

    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0) -> None:
        """Set the HTTP status (and reason phrase) of request ``idx`` of the batch."""
        processor = self._processor(idx)
        if processor is not None:
            processor.report_status(code, reason_phrase=phrase)

    def set_all_response_status(self, code: int = 200, phrase: str = "") -> None:
        for processor in self._request_processor or ():
            processor.report_status(code, reason_phrase=phrase)

    def get_response_headers(self, idx: int) -> dict[str, str]:
        processor = self._processor(idx)
        return {} if processor is None else processor.get_response_headers()

    def set_response_header(self, idx: int, key: str, value: str) -> None:
        self._require_processor(idx).add_response_property(key, value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Context) and self.__dict__ == other.__dict__

    __hash__ = object.__hash__

    def __repr__(self) -> str:
        return f"Context(model_name={self.model_name!r}, model_dir={self.model_dir!r})"

    @property
    def model_dir(self) -> str:
        """Shortcut for ``system_properties["model_dir"]`` (not in TorchServe)."""
        return str(self._system_properties["model_dir"])
