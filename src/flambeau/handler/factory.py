"""``handler_factory``: a handler built from an init function and per-sample pre/postprocess.

Seed 002's "model-servers" handler, made precise. A model file defines::

    def init_function(in_dim, layer_dims):          # returns an nn.Module, no weights
        return MyNetwork(in_dim, layer_dims)

    handler = handler_factory(init_function, preprocess_function=pre,
                              postprocess_function=post, in_dim=4)

and the archive names it ``--handler model_file.py:handler`` (or just ``model_file.py``: a
module holding exactly one factory handler uses it). On initialisation (``handler(None, ctx)``)
the handler, reading model-config ``system:``

1. unpacks ``extraFiles`` (tar/tar.gz/zip, comma-separated or a list) into the model dir,
   safely and once (ModelService already does this before importing the handler, so model
   files shipped in the tarball can be imported by the handler module), then calls the
   optional ``unpack_dependencies`` hook;
2. with ``installRequirements: true``, pip-installs ``requirementsFile`` (default: the
   manifest's) into the model dir once, then calls the optional ``install_packages`` hook;
3. picks the device (``cuda:<gpu_id>``, ``mps``, ``cpu``); on CUDA, ``maxGPUMemory`` (MB)
   caps the process's allocator on that GPU;
4. calls ``init_function(*initArgs, **kwargs)``: kwargs are handler_factory's ``init_kwargs``
   and extra keyword arguments, overridden key by key by ``initKwargs`` from model-config;
5. loads ``checkpoint`` (default: the manifest's ``serializedFile``) as a state_dict (also
   accepted: a dict holding it under ``state_dict``/``model_state_dict``/``model``; a
   ``module.`` prefix from DataParallel is stripped); ``strictLoad: false`` relaxes matching;
6. moves the model to the device and calls ``eval()``.

Per request: the input (``data``, else ``body``, else the only input, else the dict of all
inputs) goes through ``preprocess_function`` (default: tensors as is, JSON text/bytes parsed,
lists/numbers via ``torch.as_tensor``) and must give ONE sample, without a batch dimension.
Samples that are tensors of one shape (or tuples/dicts of such) are stacked and the model runs
once on the batch (``model(x)``, ``model(*xs)``, ``model(**kw)``); its output is split along
dim 0. Otherwise the model runs per sample on a batch of one. ``postprocess_function`` gets
one sample's output (default: tensors ``.tolist()``). One output per request is returned.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from flambeau.handler.deps import install_packages, split_file_list, unpack_dependencies
from flambeau.handler.devices import limit_gpu_memory, select_device

if TYPE_CHECKING:
    import torch

    from flambeau.handler.context import Context

__all__ = [
    "FactoryHandler",
    "handler_factory",
    "install_packages",
    "unpack_dependencies",
]

logger = logging.getLogger(__name__)

Hook = Callable[..., Any]


class _Unsplittable(Exception):
    """The model output cannot be split into one entry per sample."""


def handler_factory(
    init_function: Callable[..., Any],
    preprocess_function: Callable[[Any], Any] | None = None,
    postprocess_function: Callable[[Any], Any] | None = None,
    init_args: Sequence[Any] = (),
    init_kwargs: Mapping[str, Any] | None = None,
    *,
    install_packages: Hook | None = None,
    unpack_dependencies: Hook | None = None,
    **extra_init_kwargs: Any,
) -> FactoryHandler:
    """Build a handler object callable as ``handler(data, context)`` (see the module doc).

    ``install_packages`` / ``unpack_dependencies`` are optional hooks run at initialisation
    after the builtin steps; a hook with a ``model_dir`` parameter receives the model dir
    (the worker's cwd is not the model dir). Extra keyword arguments go to ``init_function``.
    """
    if not callable(init_function):
        raise TypeError("init_function must be callable")
    kwargs = {**(init_kwargs or {}), **extra_init_kwargs}
    return FactoryHandler(
        init_function,
        preprocess_function=preprocess_function,
        postprocess_function=postprocess_function,
        init_args=tuple(init_args),
        init_kwargs=kwargs,
        install_hook=install_packages,
        unpack_hook=unpack_dependencies,
    )


def _call_hook(hook: Hook, model_dir: str) -> None:
    try:
        wants_dir = "model_dir" in inspect.signature(hook).parameters
    except (TypeError, ValueError):  # builtins without a signature
        wants_dir = False
    if wants_dir:
        hook(model_dir=model_dir)
    else:
        hook()


def _extract_input(row: Any) -> Any:
    # Prefer key presence over TorchServe's `row.get("data") or row.get("body")`, which
    # loses falsy inputs such as 0 or [].
    if not isinstance(row, Mapping):
        return row
    for key in ("data", "body"):
        if key in row:
            return row[key]
    if len(row) == 1:
        return next(iter(row.values()))
    return dict(row)


def _default_preprocess(raw: Any) -> Any:
    import torch

    if isinstance(raw, torch.Tensor):
        return raw
    if isinstance(raw, bytes | bytearray):
        raw = raw.decode("utf-8")
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            return raw  # not numeric input; the model gets the string
    if isinstance(raw, list | tuple | int | float):
        return torch.as_tensor(raw)
    return raw


def _default_postprocess(output: Any) -> Any:
    import torch

    if isinstance(output, torch.Tensor):
        return output.tolist()
    if isinstance(output, Mapping):
        return {k: _default_postprocess(v) for k, v in output.items()}
    if isinstance(output, list | tuple):
        return [_default_postprocess(v) for v in output]
    return output


def _to_device(value: Any, device: torch.device) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


def _same_tensors(items: Sequence[Any]) -> bool:
    import torch

    first = items[0]
    return all(
        isinstance(t, torch.Tensor) and t.shape == first.shape and t.dtype == first.dtype
        for t in items
    )


def _collate(samples: Sequence[Any]) -> Any:
    """Stack samples into one batch, or return None when they cannot be stacked."""
    import torch

    first = samples[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(list(samples)) if _same_tensors(samples) else None
    if isinstance(first, tuple | list) and first:
        if not all(isinstance(s, tuple | list) and len(s) == len(first) for s in samples):
            return None
        columns = list(zip(*samples, strict=True))
        if not all(_same_tensors(col) for col in columns):
            return None
        return tuple(torch.stack(list(col)) for col in columns)
    if isinstance(first, Mapping) and first:
        if not all(isinstance(s, Mapping) and s.keys() == first.keys() for s in samples):
            return None
        if not all(_same_tensors([s[k] for s in samples]) for k in first):
            return None
        return {k: torch.stack([s[k] for s in samples]) for k in first}
    return None


def _call_model(model: Any, batch: Any) -> Any:
    if isinstance(batch, tuple):
        return model(*batch)
    if isinstance(batch, dict):
        return model(**batch)
    return model(batch)


def _split(output: Any, n: int) -> list[Any]:
    """Split a batched model output along dim 0 into ``n`` per-sample outputs."""
    import torch

    if isinstance(output, torch.Tensor):
        if output.dim() == 0 or output.shape[0] != n:
            raise _Unsplittable(f"output shape {tuple(output.shape)} for a batch of {n}")
        return list(output.unbind(0))
    if isinstance(output, Mapping):
        parts = {k: _split(v, n) for k, v in output.items()}
        return [{k: parts[k][i] for k in parts} for i in range(n)]
    if isinstance(output, tuple | list):
        try:
            columns = [_split(v, n) for v in output]
        except _Unsplittable:
            if len(output) == n:  # already one entry per sample (torchvision detection style)
                return list(output)
            raise
        return [tuple(col[i] for col in columns) for i in range(n)]
    raise _Unsplittable(f"cannot split a {type(output).__name__} output per sample")


class FactoryHandler:
    """The handler object ``handler_factory`` returns: ``handler(data, context)``.

    ``handler(None, context)`` initialises it (how ModelService and TorchServe initialise
    function entry points); afterwards it answers batches. It also has TorchServe-style
    ``initialize``/``preprocess``/``inference``/``postprocess``/``handle`` methods and the
    attributes ``model``, ``device``, ``context``, ``manifest``, ``initialized``.
    """

    def __init__(
        self,
        init_function: Callable[..., Any],
        *,
        preprocess_function: Callable[[Any], Any] | None = None,
        postprocess_function: Callable[[Any], Any] | None = None,
        init_args: tuple[Any, ...] = (),
        init_kwargs: Mapping[str, Any] | None = None,
        install_hook: Hook | None = None,
        unpack_hook: Hook | None = None,
    ) -> None:
        self.init_function = init_function
        self.preprocess_function = preprocess_function
        self.postprocess_function = postprocess_function
        self.init_args = init_args
        self.init_kwargs = dict(init_kwargs or {})
        self.install_hook = install_hook
        self.unpack_hook = unpack_hook
        self.model: Any = None
        self.device: torch.device | None = None
        self.context: Context | None = None
        self.manifest: dict[str, Any] = {}
        self.initialized = False

    def __repr__(self) -> str:
        name = getattr(self.init_function, "__name__", repr(self.init_function))
        return f"<FactoryHandler init_function={name} initialized={self.initialized}>"

    def __call__(self, data: list[Any] | None, context: Context) -> list[Any] | None:
        if not self.initialized:
            self.initialize(context)
        if data is None:
            return None
        return self.handle(data, context)

    # ---- initialisation ----------------------------------------------------------------

    def initialize(self, context: Context) -> None:
        """Dependencies, device, ``init_function``, checkpoint, ``eval()`` (module doc)."""
        import torch

        self.context = context
        self.manifest = context.manifest or {}
        model_info = self.manifest.get("model") or {}
        model_dir = str(context.system_properties["model_dir"])
        system = (context.model_yaml_config or {}).get("system") or {}
        if not isinstance(system, Mapping):
            raise TypeError("model-config `system` must be a mapping")

        extra_files = split_file_list(system.get("extraFiles"))
        if extra_files:
            unpack_dependencies(extra_files, model_dir)
        if self.unpack_hook is not None:
            _call_hook(self.unpack_hook, model_dir)

        requirements = system.get("requirementsFile") or model_info.get("requirementsFile")
        if system.get("installRequirements") and requirements:
            install_packages(os.path.join(model_dir, requirements), model_dir)
        if self.install_hook is not None:
            _call_hook(self.install_hook, model_dir)

        self.device = select_device(context.system_properties.get("gpu_id"))
        max_mb = system.get("maxGPUMemory")
        if max_mb and self.device.type == "cuda":
            limit_gpu_memory(self.device, float(max_mb))

        args = tuple(system.get("initArgs", self.init_args))
        kwargs = {**self.init_kwargs, **(system.get("initKwargs") or {})}
        model = self.init_function(*args, **kwargs)
        if not isinstance(model, torch.nn.Module):
            raise TypeError(
                f"init_function must return a torch.nn.Module, got {type(model).__name__}"
            )
        checkpoint = system.get("checkpoint") or model_info.get("serializedFile")
        if checkpoint:
            path = os.path.join(model_dir, checkpoint)
            state = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(
                _state_dict_of(state, path), strict=bool(system.get("strictLoad", True))
            )
        else:
            logger.warning("no checkpoint for %s: serving init_function's weights", model_dir)
        self.model = model.to(self.device).eval()
        self.initialized = True

    # ---- request path ------------------------------------------------------------------

    def preprocess(self, data: Sequence[Any]) -> list[Any]:
        """One sample per request, through ``preprocess_function`` (or the default)."""
        fn = self.preprocess_function or _default_preprocess
        return [fn(_extract_input(row)) for row in data]

    def inference(self, samples: Sequence[Any]) -> list[Any]:
        """Model outputs, one per sample: batched when the samples stack, else one by one."""
        import torch

        if not samples:
            return []
        model, device = self.model, self.device
        if device is None:
            raise RuntimeError("handler_factory handler used before initialisation")
        with torch.inference_mode():
            batch = _collate(samples)
            if batch is not None:
                output = _call_model(model, _to_device(batch, device))
                try:
                    return _split(output, len(samples))
                except _Unsplittable:
                    logger.debug("batched output not splittable; running per sample")
            outputs = []
            for sample in samples:
                single = _collate([sample])
                if single is None:  # not tensors: hand the sample to the model as it is
                    outputs.append(model(sample))
                    continue
                output = _call_model(model, _to_device(single, device))
                try:
                    outputs.append(_split(output, 1)[0])
                except _Unsplittable:
                    outputs.append(output)
            return outputs

    def postprocess(self, outputs: Sequence[Any]) -> list[Any]:
        """One response per sample, through ``postprocess_function`` (or ``.tolist()``)."""
        fn = self.postprocess_function or _default_postprocess
        return [fn(output) for output in outputs]

    def handle(self, data: Sequence[Any], context: Context) -> list[Any]:
        """preprocess -> inference -> postprocess; records ``HandlerTime`` (ms)."""
        start = time.time()
        self.context = context
        results = self.postprocess(self.inference(self.preprocess(data)))
        context.metrics.add_time("HandlerTime", round((time.time() - start) * 1000, 2), None, "ms")
        return results


def _state_dict_of(state: Any, path: str) -> Mapping[str, Any]:
    import torch

    if isinstance(state, Mapping) and not all(isinstance(v, torch.Tensor) for v in state.values()):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping):
        raise TypeError(f"{os.path.basename(path)} does not hold a state_dict")
    if state and all(str(k).startswith("module.") for k in state):
        state = {str(k)[len("module.") :]: v for k, v in state.items()}
    return state
