"""ModelService: one loaded handler inside a worker, TorchServe's ``ts.service.Service``.

The worker transport (process or thread backend) calls :meth:`ModelService.load` once, then
:meth:`~ModelService.predict` per batch and :meth:`~ModelService.drain_metrics` after it. A
handler error never escapes ``predict``: it becomes a :class:`~flambeau.api.BatchResult` with
TorchServe's code and message. Importing this module does not import torch.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from flambeau.api import (
    ENVELOPE_ROW_HEADER,
    BatchResult,
    MetricRecord,
    ModelLoadSpec,
    RequestInput,
    WorkerRequest,
)
from flambeau.handler.context import Context, RequestProcessor
from flambeau.handler.deps import split_file_list, unpack_dependencies
from flambeau.handler.devices import is_out_of_memory, limit_gpu_memory, select_device
from flambeau.handler.errors import HandlerLoadError, HandlerOutOfMemoryError
from flambeau.handler.loader import (
    LOAD_LOCK,
    EntryPoint,
    activate_model_dir,
    deactivate_model_dir,
    load_entry_point,
)
from flambeau.handler.metrics import MetricsCache
from flambeau.handler.utils import PredictionException, build_predict_result, get_yaml_config

__all__ = ["PREDICTION_METRIC", "ModelService", "decode_input"]

logger = logging.getLogger(__name__)

PREDICTION_METRIC = "PredictionTime"


def _plain(value: Any) -> Any:
    # Handlers mutate their manifest/config (TorchServe's BaseHandler deletes keys), so they
    # get private plain copies of the server's (possibly read-only) mappings.
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _read_manifest(spec: ModelLoadSpec, model_dir: str) -> dict[str, Any] | None:
    if spec.manifest:
        return _plain(spec.manifest)
    path = os.path.join(model_dir, "MAR-INF", "MANIFEST.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    return manifest if isinstance(manifest, dict) else None


def _read_model_config(
    spec: ModelLoadSpec, model_dir: str, manifest: dict[str, Any] | None
) -> dict[str, Any]:
    if spec.model_yaml_config:
        return _plain(spec.model_yaml_config)
    config_file = ((manifest or {}).get("model") or {}).get("configFile")
    if config_file and os.path.isfile(os.path.join(model_dir, config_file)):
        return get_yaml_config(os.path.join(model_dir, config_file))
    return {}


def decode_input(value: bytes, content_type: str, decode: bool = True) -> Any:
    """TorchServe's input decoding: ``application/json`` -> ``json.loads`` (raw bytes when that
    fails), ``text/*`` -> str (raw bytes when not UTF-8), anything else the raw bytes.

    Media-type parameters (``; charset=utf-8``) and case are ignored, as TorchServe's frontend
    strips them before the worker sees the content type.
    """
    if not decode:
        return value
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type == "application/json":
        try:
            return json.loads(value.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            logger.warning("Failed json decoding of input data. Forwarding encoded payload")
            return value
    if media_type.startswith("text"):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            logger.warning("Failed utf-8 decoding of input data. Forwarding encoded payload")
            return value
    return value


def _error_code(code: Any) -> int:
    try:
        value = int(code)
    except (TypeError, ValueError):
        return 500
    return value if 100 <= value <= 599 else 500


class ModelService:
    """A loaded handler plus its Context. Build it with :meth:`load`.

    Not re-entrant: the Context holds the current batch, so ``predict`` calls are serialised
    by a lock (a transport should send one batch at a time per service anyway).
    """

    def __init__(
        self,
        spec: ModelLoadSpec,
        context: Context,
        entry_point: EntryPoint,
        model_dir_token: str | None,
    ) -> None:
        self.spec = spec
        self._context = context
        self._entry: EntryPoint | None = entry_point
        self._model_dir_token = model_dir_token
        self._lock = threading.Lock()

    # ---- loading -----------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        spec: ModelLoadSpec,
        *,
        send_intermediate: Callable[[BatchResult], None] | None = None,
        handler_registry: Mapping[str, str] | None = None,
    ) -> ModelService:
        """Resolve, build the Context for, and initialise the handler of ``spec``.

        ``send_intermediate`` receives streamed chunks (``stream_next=True`` responses) while
        ``predict`` runs; ``handler_registry`` maps plugin handler names to ``module[:attr]``.
        Raises :class:`HandlerLoadError` (status 500) or :class:`HandlerOutOfMemoryError`
        (507) with the original exception as ``__cause__``.
        """
        model_dir = os.path.abspath(spec.model_dir)
        what = f"handler {spec.handler!r} of model {spec.model_name}"
        if not os.path.isdir(model_dir):
            raise HandlerLoadError(f"Failed to load {what}: model dir {model_dir} not found")
        token: str | None = None
        try:
            with LOAD_LOCK:
                manifest = _read_manifest(spec, model_dir)
                model_config = _read_model_config(spec, model_dir, manifest)
                _prepare_process(spec, model_config, model_dir)
                context = Context(
                    spec.model_name,
                    model_dir,
                    manifest,
                    spec.batch_size,
                    spec.gpu_id,
                    spec.server_version or _flambeau_version(),
                    spec.limit_max_image_pixels,
                    MetricsCache(spec.model_name),
                    model_config,
                )
                context.intermediate_sink = send_intermediate
                token = activate_model_dir(model_dir)
                registry = (
                    handler_registry if handler_registry is not None else spec.handler_registry
                )
                entry = load_entry_point(spec.handler, model_dir, registry=registry)
                entry.initialize(context)
        except Exception as exc:
            if token is not None:
                deactivate_model_dir(token)
            logger.error("Failed to load %s", what, exc_info=True)
            error_type = HandlerOutOfMemoryError if is_out_of_memory(exc) else HandlerLoadError
            raise error_type(
                f"Failed to load {what}: {type(exc).__name__}: {exc}", cause=exc
            ) from exc
        logger.info("loaded %s from %s", what, model_dir)
        return cls(spec, context, entry, token)

    # ---- accessors ---------------------------------------------------------------------

    @property
    def context(self) -> Context:
        return self._context

    @property
    def entry_point(self) -> EntryPoint | None:
        """The resolved handler; None once closed."""
        return self._entry

    @property
    def handler(self) -> Any:
        """The handler object (class instance / factory handler) or the module function."""
        entry = self._entry
        if entry is None:
            return None
        return entry.instance if entry.instance is not None else entry.handle

    # ---- prediction --------------------------------------------------------------------

    def _prepare(
        self, requests: Sequence[WorkerRequest]
    ) -> tuple[list[Any], list[RequestProcessor], dict[int, str]]:
        decode = self.spec.decode_input_request
        input_batch: list[Any] = []
        processors: list[RequestProcessor] = []
        id_map: dict[int, str] = {}
        for idx, request in enumerate(requests):
            model_in: dict[str, Any] = {}
            headers: dict[str, Any] = {}
            inp: RequestInput
            for inp in request.inputs:
                model_in[inp.name] = decode_input(inp.value, inp.content_type, decode)
                headers[inp.name] = {"content-type": inp.content_type}
            headers.update(request.headers)
            if ENVELOPE_ROW_HEADER in request.headers and len(request.inputs) == 1:
                # A server-side envelope decoded this row: the handler gets it bare, as
                # TorchServe's worker-side envelopes hand rows over.
                input_batch.append(model_in[request.inputs[0].name])
            else:
                input_batch.append(model_in)
            processors.append(RequestProcessor(headers))
            id_map[idx] = request.request_id
        return input_batch, processors, id_map

    def predict(self, requests: Sequence[WorkerRequest]) -> BatchResult:
        """Run one batch through the handler; never raises for a handler error."""
        with self._lock:
            entry = self._entry
            if entry is None:
                raise RuntimeError(f"ModelService of {self.spec.model_name} is closed")
            if not requests:
                return BatchResult(code=200, message="Prediction success")
            input_batch, processors, id_map = self._prepare(requests)
            context = self._context
            context.request_ids = id_map
            context.request_processor = processors
            context.metrics.set_request_ids(id_map)
            start_time = time.time()
            try:
                ret = entry.handle(input_batch, context)
            except MemoryError:
                logger.error("System out of memory", exc_info=True)
                return BatchResult(code=507, message="Out of resources")
            except PredictionException as exc:
                logger.error("Prediction error", exc_info=True)
                return BatchResult(code=_error_code(exc.error_code), message=str(exc.message))
            except Exception as exc:
                if "CUDA" in str(exc):
                    # CUDA OOM, or CUBLAS_STATUS_NOT_INITIALIZED which is close to it.
                    logger.error("CUDA out of memory", exc_info=True)
                    return BatchResult(code=507, message="Out of resources")
                logger.warning("Invoking custom service failed.", exc_info=True)
                return BatchResult(code=503, message="Prediction failed")

            if not isinstance(ret, list):
                logger.warning("model: %s, Invalid return type: %s.", context.model_name, type(ret))
                return BatchResult(code=503, message="Invalid model predict output")
            if len(ret) != len(input_batch):
                logger.warning(
                    "model: %s, number of batch response mismatched, expect: %d, got: %d.",
                    context.model_name,
                    len(input_batch),
                    len(ret),
                )
                return BatchResult(code=503, message="number of batch response mismatched")

            duration = round((time.time() - start_time) * 1000, 2)
            context.metrics.add_time(PREDICTION_METRIC, duration)
            try:
                return build_predict_result(ret, id_map, "Prediction success", 200, context=context)
            except TypeError:
                logger.warning("Unable to serialize model output.", exc_info=True)
                return BatchResult(code=503, message="Unsupported model output data type.")
            except Exception:
                # e.g. a stopping criterion or a response header set for a missing index
                logger.warning("Building the predict response failed.", exc_info=True)
                return BatchResult(code=503, message="Prediction failed")

    def drain_metrics(self) -> list[MetricRecord]:
        """Metrics recorded since the previous call (handler metrics, HandlerTime,
        PredictionTime and any recorded during load). ``predict`` leaves
        ``BatchResult.metrics`` empty: the transport attaches these."""
        return self._context.metrics.drain()

    # ---- shutdown ----------------------------------------------------------------------

    def close(self) -> None:
        """Drop the handler and model, take the model dir off ``sys.path``, free CUDA cache.

        Idempotent. A function handler's module globals (and so a model kept there) live as
        long as the module stays imported.
        """
        with self._lock:
            if self._entry is None:
                return
            self._entry = None
            self._context.intermediate_sink = None
            self._context.request_processor = None
        if self._model_dir_token is not None:
            deactivate_model_dir(self._model_dir_token)
            self._model_dir_token = None
        gc.collect()
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_initialized():
            torch.cuda.empty_cache()

    def __enter__(self) -> ModelService:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _flambeau_version() -> str:
    from flambeau import __version__

    return __version__


def _prepare_process(spec: ModelLoadSpec, model_config: Mapping[str, Any], model_dir: str) -> None:
    """Process-wide settings and files the handler module may need before it is imported."""
    if spec.intra_op_threads > 0:
        import torch

        torch.set_num_threads(spec.intra_op_threads)
    if spec.max_gpu_memory_mb > 0 and spec.gpu_id is not None:
        limit_gpu_memory(select_device(spec.gpu_id), float(spec.max_gpu_memory_mb))
    system = model_config.get("system")
    if isinstance(system, Mapping):
        # Seed 002 ships model sources in an extraFiles tarball that the handler module
        # imports at top level, so it must be unpacked before the import.
        extra_files = split_file_list(system.get("extraFiles"))
        if extra_files:
            unpack_dependencies(extra_files, model_dir)
