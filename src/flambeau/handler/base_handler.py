"""BaseHandler: TorchServe's default handler for eager (state_dict) and TorchScript models.

Subclasses written for ``ts.torch_handler.base_handler.BaseHandler`` work unchanged: the same
method names (initialize, preprocess, inference, postprocess, handle, describe_handle,
explain_handle, get_insights) and attributes (model, device, map_location, manifest,
model_pt_path, mapping, context, initialized). torch is imported inside the methods.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from flambeau.handler.devices import select_device
from flambeau.handler.factory import handler_factory
from flambeau.handler.loader import import_model_file
from flambeau.handler.utils import list_classes_from_module, load_label_mapping, timed

if TYPE_CHECKING:
    import torch

    from flambeau.handler.context import Context

__all__ = ["BaseHandler", "handler_factory"]

logger = logging.getLogger(__name__)


class BaseHandler:
    """Loads the model named by the manifest and runs preprocess -> inference -> postprocess.

    * ``modelFile`` in the manifest: import it from the model dir, instantiate the single
      ``nn.Module`` subclass it defines (no arguments) and load ``serializedFile`` as its
      state_dict.
    * no ``modelFile``: ``serializedFile`` is TorchScript (``torch.jit.load``), or ONNX
      (``.onnx``, through onnxruntime when installed).
    * ``index_to_name.json`` in the model dir becomes ``self.mapping``.
    * model-config ``pt2: {compile: {enable: true, ...}}`` wraps the model in torch.compile.
    """

    # Whether env ENABLE_TORCH_PROFILER is set, read at the first request. A class-level
    # default, so subclasses whose __init__ skips ours still get it.
    _torch_profiler: bool | None = None

    def __init__(self) -> None:
        self.model: Any = None
        self.mapping: dict[str, str] | None = None
        self.device: torch.device | None = None
        self.initialized = False
        self.context: Context | None = None
        self.model_pt_path: str | None = None
        self.manifest: dict[str, Any] | None = None
        self.map_location: str | None = None
        self.explain = False
        self.target = 0
        self.profiler_args: dict[str, Any] = {}
        self.model_yaml_config: dict[str, Any] = {}

    # ---- loading -----------------------------------------------------------------------

    def initialize(self, context: Context) -> None:
        """Choose the device, load the model and the label mapping."""
        self.context = context
        self.model_yaml_config = getattr(context, "model_yaml_config", None) or {}
        properties = context.system_properties
        self.device = select_device(properties.get("gpu_id"))
        self.map_location = self.device.type
        self.manifest = context.manifest or {}
        model_info = self.manifest.get("model") or {}
        model_dir = str(properties.get("model_dir"))

        self.model_pt_path = None
        serialized_file = model_info.get("serializedFile")
        if serialized_file:
            self.model_pt_path = os.path.join(model_dir, serialized_file)
        model_file = model_info.get("modelFile", "")

        if model_file:
            logger.debug("Loading eager model")
            self.model = self._load_pickled_model(model_dir, model_file, self.model_pt_path)
            self.model.to(self.device)
            self.model.eval()
        elif self.model_pt_path is None:
            raise RuntimeError(
                "No model weights could be loaded: the manifest names neither a modelFile nor "
                "a serializedFile"
            )
        elif self.model_pt_path.endswith(".onnx"):
            self.model = self._load_onnx_model(self.model_pt_path)
        else:
            self.model = self._load_torchscript_model(self.model_pt_path)
            self.model.eval()

        self._maybe_compile()
        logger.debug("Model file %s loaded successfully", self.model_pt_path)
        self.mapping = load_label_mapping(os.path.join(model_dir, "index_to_name.json"))
        self.initialized = True

    def _load_torchscript_model(self, model_pt_path: str) -> Any:
        """Load a TorchScript archive onto ``self.device``."""
        import torch

        return torch.jit.load(model_pt_path, map_location=self.device)

    def _load_onnx_model(self, model_pt_path: str) -> Any:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise RuntimeError(
                f"{os.path.basename(model_pt_path)} is an ONNX model: install onnxruntime"
            ) from exc
        providers = ["CPUExecutionProvider"]
        if self.map_location == "cuda":
            providers.insert(0, "CUDAExecutionProvider")
        return ort.InferenceSession(model_pt_path, providers=providers)

    def _load_pickled_model(
        self, model_dir: str, model_file: str, model_pt_path: str | None
    ) -> Any:
        """Instantiate the nn.Module defined in ``model_file``; load the state_dict into it."""
        import torch

        model_def_path = os.path.join(model_dir, model_file)
        if not os.path.isfile(model_def_path):
            raise RuntimeError(f"Missing the model.py file: {model_def_path}")
        module = import_model_file(model_dir, model_file)
        classes = list_classes_from_module(module, torch.nn.Module)
        if len(classes) != 1:
            raise ValueError(
                f"Expected only one class as model definition in {model_file}, found "
                f"{[c.__name__ for c in classes]}"
            )
        model = classes[0]()
        if model_pt_path:
            state_dict = torch.load(model_pt_path, map_location=self.device)
            model.load_state_dict(state_dict)
        return model

    def _maybe_compile(self) -> None:
        pt2 = self.model_yaml_config.get("pt2")
        if not isinstance(pt2, Mapping):
            return
        compile_options = pt2.get("compile")
        if not isinstance(compile_options, Mapping) or not compile_options.get("enable"):
            return
        import torch

        options = {k: v for k, v in compile_options.items() if k != "enable"}
        try:
            self.model = torch.compile(self.model, **options)
            logger.info("Compiled model with %s", options)
        except Exception:
            # TorchServe proceeds uncompiled rather than failing the load.
            logger.warning("torch.compile(%s) failed; proceeding without", options, exc_info=True)

    # ---- request path ------------------------------------------------------------------

    @timed
    def preprocess(self, data: Any) -> Any:
        """Convert the batch to a tensor; override to decode your inputs."""
        import torch

        return torch.as_tensor(data, device=self.device)

    @timed
    def inference(self, data: Any, *args: Any, **kwargs: Any) -> Any:
        """Run the model on ``data`` (moved to ``self.device``) under inference_mode."""
        import torch

        with torch.inference_mode():
            marshalled_data = data.to(self.device)
            return self.model(marshalled_data, *args, **kwargs)

    @timed
    def postprocess(self, data: Any) -> Any:
        """Turn the model output into one JSON-able entry per request."""
        return data.tolist()

    def handle(self, data: list[dict[str, Any]], context: Context) -> Any:
        """Entry point: describe, explain, or preprocess -> inference -> postprocess.

        Records ``HandlerTime`` (ms). A request header ``describe: True`` answers
        ``[describe_handle()]``; ``explain: True`` answers ``explain_handle(...)``.
        """
        start_time = time.time()
        self.context = context
        if self._profiler_enabled():
            output = self._infer_with_profiler(data)
        elif self._is_describe():
            output = [self.describe_handle()]
        else:
            data_preprocess = self.preprocess(data)
            if not self._is_explain():
                output = self.inference(data_preprocess)
                output = self.postprocess(output)
            else:
                output = self.explain_handle(data_preprocess, data)
        duration = round((time.time() - start_time) * 1000, 2)
        context.metrics.add_time("HandlerTime", duration, None, "ms")
        return output

    def _profiler_enabled(self) -> bool:
        # Environment lookups cost a microsecond each; the worker's environment is fixed
        # once requests flow, so the first request reads it for the rest.
        enabled = self._torch_profiler
        if enabled is None:
            enabled = self._torch_profiler = bool(os.environ.get("ENABLE_TORCH_PROFILER"))
        return enabled

    def _infer_with_profiler(self, data: Any) -> Any:
        """preprocess/inference/postprocess under torch.profiler (env ENABLE_TORCH_PROFILER)."""
        import torch
        from torch.profiler import ProfilerActivity, profile, record_function

        if not self.profiler_args:
            self.profiler_args["activities"] = [ProfilerActivity.CPU]
            if torch.cuda.is_available():
                self.profiler_args["activities"].append(ProfilerActivity.CUDA)
            self.profiler_args["record_shapes"] = True
        if "on_trace_ready" not in self.profiler_args:
            model_name = ((self.manifest or {}).get("model") or {}).get("modelName", "")
            result_path = os.path.join("/tmp/pytorch_profiler", model_name)
            self.profiler_args["on_trace_ready"] = torch.profiler.tensorboard_trace_handler(
                result_path
            )
            logger.info("Saving chrome trace to : %s", result_path)
        with profile(**self.profiler_args) as prof:
            with record_function("preprocess"):
                data_preprocess = self.preprocess(data)
            if not self._is_explain():
                with record_function("inference"):
                    output = self.inference(data_preprocess)
                with record_function("postprocess"):
                    output = self.postprocess(output)
            else:
                with record_function("explain"):
                    output = self.explain_handle(data_preprocess, data)
        logger.info(prof.key_averages().table(sort_by="cpu_time_total", row_limit=10))
        return output

    # ---- describe / explain ------------------------------------------------------------

    def _is_explain(self) -> bool:
        if self.context is not None and self.context.get_request_header(0, "explain") == "True":
            self.explain = True
            return True
        return False

    def _is_describe(self) -> bool:
        return self.context is not None and self.context.get_request_header(0, "describe") == "True"

    def describe_handle(self) -> Any:
        """Customised model metadata for ``GET /models/{name}?customized=true``; override."""
        return None

    def explain_handle(self, data_preprocess: Any, raw_data: list[dict[str, Any]]) -> Any:
        """Explanations (Captum in TorchServe's handlers) from :meth:`get_insights`."""
        logger.info("Calculating Explanations")
        inputs = None
        target: Any = 0
        row = raw_data[0] if raw_data else None
        if isinstance(row, dict):
            inputs = row.get("data") or row.get("body")
            target = row.get("target") or 0
        return self.get_insights(data_preprocess, inputs, target)

    def get_insights(self, tensor_data: Any, raw_data: Any, target: Any = 0) -> Any:
        """Compute explanations; handlers that support ``explain`` override this."""
        raise NotImplementedError(f"{type(self).__name__} does not implement get_insights")

    def get_device(self) -> torch.device | None:
        return self.device
