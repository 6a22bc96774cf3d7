"""Handler resolution: ``module[:function]`` to an entry point, as TorchServe's model_loader.

Order: a module file in the model dir wins, then a named handler from a plugin ``registry``,
then the builtin names (``image_classifier``...), then any importable module. A module with
attribute ``function`` (default ``handle``) is a function entry point; otherwise the single
class defined in it is instantiated. Loading is serialised by :data:`LOAD_LOCK` because
``sys.path`` and ``sys.modules`` are process-wide (thread workers share them).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import os
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType, ModuleType
from typing import Any

from flambeau.handler.utils import list_classes_from_module

__all__ = [
    "BUILTIN_HANDLERS",
    "LOAD_LOCK",
    "EntryPoint",
    "activate_model_dir",
    "deactivate_model_dir",
    "entry_point_from_module",
    "import_model_file",
    "load_entry_point",
    "parse_handler",
]

logger = logging.getLogger(__name__)

_DEFAULTS = "flambeau.handler.defaults"

BUILTIN_HANDLERS: Mapping[str, str] = MappingProxyType(
    {
        "base_handler": "flambeau.handler.base_handler:BaseHandler",
        "vision_handler": f"{_DEFAULTS}.vision_handler:VisionHandler",
        "image_classifier": f"{_DEFAULTS}.image_classifier:ImageClassifier",
        "image_segmenter": f"{_DEFAULTS}.image_segmenter:ImageSegmenter",
        "object_detector": f"{_DEFAULTS}.object_detector:ObjectDetector",
        "text_handler": f"{_DEFAULTS}.text_handler:TextHandler",
        "text_classifier": f"{_DEFAULTS}.text_classifier:TextClassifier",
    }
)

#: Held while a model's handler is imported and initialised (re-entrant).
LOAD_LOCK = threading.RLock()

# Model dirs this process put on sys.path, with a use count (several workers of one model),
# and every model dir it ever did (modules loaded from those may be evicted, nothing else).
_ACTIVE_DIRS: dict[str, int] = {}
_KNOWN_DIRS: set[str] = set()


@dataclass(frozen=True, slots=True)
class EntryPoint:
    """A resolved handler: ``handle(data, context)`` and its one-time ``initialize(context)``.

    ``instance`` is the handler object (class instance or ``handler_factory`` object), None
    for a plain module function.
    """

    handle: Callable[[Any, Any], Any]
    initialize: Callable[[Any], Any]
    module: ModuleType
    instance: Any = None


def parse_handler(handler: str) -> tuple[str, str | None]:
    """``"path/to/my_handler.py:fn"`` -> ``("my_handler", "fn")``; no function -> None."""
    module_name, _, function = handler.strip().partition(":")
    if module_name.endswith(".py"):
        module_name = module_name[:-3]
    module_name = module_name.replace("\\", "/").rsplit("/", 1)[-1]
    return module_name, (function.strip() or None)


def _local_module_names(model_dir: str) -> set[str]:
    names: set[str] = set()
    try:
        entries = list(os.scandir(model_dir))
    except OSError:
        return names
    for entry in entries:
        if entry.is_file() and entry.name.endswith(".py"):
            names.add(entry.name[:-3])
        elif entry.is_dir() and os.path.isfile(os.path.join(entry.path, "__init__.py")):
            names.add(entry.name)
    return names


def _is_under(path: str | None, directory: str) -> bool:
    if not path:
        return False
    try:
        return os.path.commonpath([os.path.realpath(path), directory]) == directory
    except ValueError:
        return False


def _evict_shadowed(model_dir: str) -> None:
    """Forget modules another model dir loaded under names this model dir also provides.

    Without this, the second model served by one process would get the first model's
    ``model.py`` from ``sys.modules``. Modules from anywhere else (stdlib, site-packages)
    are never touched. Code already holding the old modules keeps working.
    """
    provided = _local_module_names(model_dir)
    others = [d for d in _KNOWN_DIRS if d != model_dir]
    if not provided or not others:
        return
    for name, module in list(sys.modules.items()):
        if name.partition(".")[0] not in provided:
            continue
        origin = getattr(module, "__file__", None)
        if _is_under(origin, model_dir):
            continue
        if any(_is_under(origin, other) for other in others):
            logger.debug("evicting %s (from another model dir) for %s", name, model_dir)
            del sys.modules[name]


def activate_model_dir(model_dir: str | os.PathLike[str]) -> str:
    """Put ``model_dir`` first on ``sys.path`` and evict modules it shadows; returns its
    real path. Call :func:`deactivate_model_dir` with the result when the model goes away."""
    directory = os.path.realpath(model_dir)
    with LOAD_LOCK:
        _ACTIVE_DIRS[directory] = _ACTIVE_DIRS.get(directory, 0) + 1
        _KNOWN_DIRS.add(directory)
        if directory in sys.path:
            sys.path.remove(directory)
        sys.path.insert(0, directory)
        _evict_shadowed(directory)
        importlib.invalidate_caches()
    return directory


def deactivate_model_dir(directory: str) -> None:
    """Undo one :func:`activate_model_dir`; the path leaves ``sys.path`` with its last user."""
    with LOAD_LOCK:
        count = _ACTIVE_DIRS.get(directory, 0) - 1
        if count > 0:
            _ACTIVE_DIRS[directory] = count
            return
        _ACTIVE_DIRS.pop(directory, None)
        if directory in sys.path:
            sys.path.remove(directory)


def import_model_file(model_dir: str | os.PathLike[str], filename: str) -> ModuleType:
    """Import ``<model_dir>/<filename>`` under its plain module name (``model.py`` ->
    ``model``), whether or not ``model_dir`` is on ``sys.path``.

    The module is reused when that very file is already loaded and replaces a module of the
    same name loaded from another model dir. A same-named module from anywhere else (the
    stdlib, site-packages) stays in ``sys.modules``; the model file is then loaded privately.
    """
    path = Path(model_dir, filename).resolve()
    name = path.stem
    with LOAD_LOCK:
        existing = sys.modules.get(name)
        origin = getattr(existing, "__file__", None)
        if existing is not None and origin and os.path.realpath(origin) == str(path):
            return existing
        register = existing is None or any(_is_under(origin, d) for d in _KNOWN_DIRS)
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot import {path}")
        module = importlib.util.module_from_spec(spec)
        if register:
            sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            if register:
                sys.modules.pop(name, None)
            raise
        return module


def _split_target(target: str) -> tuple[str, str | None]:
    module_name, _, attr = target.partition(":")
    return module_name.strip(), (attr.strip() or None)


def _import(module_name: str, model_dir: str | None) -> ModuleType:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise  # the handler module exists but one of its own imports is missing
        where = f"the model directory {model_dir} nor " if model_dir else ""
        raise ModuleNotFoundError(
            f"handler module {module_name!r} not found in {where}the builtin handlers "
            f"({', '.join(sorted(BUILTIN_HANDLERS))})",
            name=module_name,
        ) from exc


def load_entry_point(
    handler: str,
    model_dir: str | os.PathLike[str] | None = None,
    *,
    registry: Mapping[str, str] | None = None,
) -> EntryPoint:
    """Import the handler named by ``handler`` (``module[:function]``) and pick its entry point.

    ``registry`` maps extra handler names (plugins' ``HandlerSpec``) to ``module[:attr]``
    targets. The caller puts ``model_dir`` on ``sys.path`` (:func:`activate_model_dir`)
    and calls ``initialize`` on the result. Import errors propagate unchanged, except a
    missing handler module, reported as ModuleNotFoundError naming where it was looked for.
    """
    if not handler or not handler.strip():
        raise ValueError("no handler given (manifest model.handler is empty)")
    module_name, function = parse_handler(handler)
    directory = os.fspath(model_dir) if model_dir is not None else None
    attr = function
    target_module = module_name
    if directory is None or module_name not in _local_module_names(directory):
        alias = (registry or {}).get(module_name) or BUILTIN_HANDLERS.get(module_name)
        if alias:
            target_module, alias_attr = _split_target(alias)
            attr = function or alias_attr
    with LOAD_LOCK:
        if target_module == module_name and directory is not None:
            _evict_stale(module_name, os.path.realpath(directory))
        module = _import(target_module, directory)
    return entry_point_from_module(module, attr)


def _evict_stale(module_name: str, directory: str) -> None:
    # A handler module of this name loaded earlier from another (maybe closed) model dir.
    existing = sys.modules.get(module_name)
    origin = getattr(existing, "__file__", None)
    if existing is None or _is_under(origin, directory):
        return
    if any(_is_under(origin, d) for d in _KNOWN_DIRS):
        for name in [n for n in sys.modules if n == module_name or n.startswith(module_name + ".")]:
            del sys.modules[name]


def _factory_handlers(module: ModuleType) -> list[Any]:
    from flambeau.handler.factory import FactoryHandler

    return [value for value in vars(module).values() if isinstance(value, FactoryHandler)]


def _class_entry(module: ModuleType, cls: type) -> EntryPoint:
    instance = cls()
    if not callable(getattr(instance, "handle", None)):
        raise ValueError(f"Expect handle method in class {cls}")
    initialize = getattr(instance, "initialize", None)
    return EntryPoint(
        handle=instance.handle,
        initialize=initialize if callable(initialize) else (lambda _ctx: None),
        module=module,
        instance=instance,
    )


def _function_entry(module: ModuleType, function: Callable[..., Any]) -> EntryPoint:
    # TorchServe initialises a function entry point by calling it with data=None.
    instance = None if inspect.isroutine(function) else function
    return EntryPoint(
        handle=function,
        initialize=lambda ctx: function(None, ctx),
        module=module,
        instance=instance,
    )


def entry_point_from_module(module: ModuleType, function: str | None = None) -> EntryPoint:
    """Pick the entry point of an imported handler module (TorchServe's rules, extended).

    1. ``function`` (default ``handle``) names a module attribute: a callable is a function
       entry point; a class (``module:MyHandler``) is instantiated as a class handler.
    2. Without an explicit ``function`` and no ``handle``: a single ``handler_factory``
       object in the module is used (seed 002's ``handler = handler_factory(...)``).
    3. Otherwise the module must define exactly one class (or exactly one class with a
       ``handle`` method, when it also defines e.g. its nn.Module), which is instantiated.
    """
    name = function or "handle"
    if hasattr(module, name):
        target = getattr(module, name)
        if inspect.isclass(target):
            return _class_entry(module, target)
        if not callable(target):
            raise ValueError(f"{module.__name__}.{name} is not callable")
        return _function_entry(module, target)
    if function is not None:
        raise ValueError(f"handler module {module.__name__!r} has no attribute {function!r}")
    factories = _factory_handlers(module)
    if len(factories) == 1:
        return _function_entry(module, factories[0])
    classes = list_classes_from_module(module)
    if len(classes) != 1:
        with_handle = [c for c in classes if callable(getattr(c, "handle", None))]
        if len(with_handle) != 1:
            raise ValueError(
                "Expected only one class in custom service code or a function entry point "
                f"{classes} (module {module.__name__!r})"
            )
        classes = with_handle
    return _class_entry(module, classes[0])
