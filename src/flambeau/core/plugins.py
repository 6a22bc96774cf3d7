"""Plugin discovery and the typed hook facade.

Plugins are modules named by entry points in the ``flambeau`` group: flambeau's own builtins
first, then third-party distributions, each group sorted by name, so the load order never
depends on the file system. ``-p MODULE`` adds a module, ``-p no:NAME`` blocks a plugin, and
``disable_autoload`` keeps only the builtins. The loader keeps its own record of which
distribution gave which plugin, because pluggy's is private. Example::

    plugins = load_plugins(PluginOptions(blocked={"grpc"}))
    routes = plugins.hooks.routes(config)
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pluggy

from flambeau.api import (
    PROJECT,
    AllocatorSpec,
    AuthenticatorSpec,
    AuthorizerSpec,
    BatcherSpec,
    CliOption,
    CommandSpec,
    DeviceDiscoverySpec,
    EnvelopeSpec,
    GrpcServiceSpec,
    HandlerSpec,
    ListenerSpec,
    MetricsSinkSpec,
    PluginError,
    PreparerSpec,
    RouteSpec,
    WorkerBackendSpec,
)
from flambeau.core import hookspecs

if sys.version_info >= (3, 12):
    from importlib import metadata
else:  # the backport carries the 3.12 selection API
    import importlib_metadata as metadata

BUILTIN_DISTRIBUTION = "flambeau"
AUTOLOAD_ENV = "FLAMBEAU_DISABLE_PLUGIN_AUTOLOAD"


@dataclass(frozen=True, slots=True)
class PluginOptions:
    """What the command line says about plugins (pytest-style ``-p`` flags)."""

    extra_modules: tuple[str, ...] = ()
    blocked: frozenset[str] = frozenset()
    disable_autoload: bool = False

    @classmethod
    def from_flags(cls, flags: Iterable[str], *, disable_autoload: bool = False) -> PluginOptions:
        extra: list[str] = []
        blocked: set[str] = set()
        for flag in flags:
            if flag.startswith("no:"):
                blocked.add(flag[3:])
            else:
                extra.append(flag)
        env_off = os.environ.get(AUTOLOAD_ENV, "").lower() in {"1", "true", "yes"}
        return cls(tuple(extra), frozenset(blocked), disable_autoload or env_off)


@dataclass(slots=True)
class PluginInfo:
    """One loaded plugin: where it came from and what it provides."""

    name: str
    module: str
    distribution: str
    version: str
    hooks: list[str] = field(default_factory=list)
    provides: dict[str, list[str]] = field(default_factory=dict)

    @property
    def builtin(self) -> bool:
        return self.distribution == BUILTIN_DISTRIBUTION


@dataclass(frozen=True, slots=True)
class _Candidate:
    name: str
    module: str
    distribution: str
    version: str


def _entry_point_candidates() -> list[_Candidate]:
    found = []
    for ep in metadata.entry_points(group=PROJECT):
        dist = ep.dist
        found.append(
            _Candidate(
                name=ep.name,
                module=ep.value.split(":")[0],
                distribution=dist.metadata["Name"] if dist else "unknown",
                version=dist.version if dist else "",
            )
        )
    # Builtins first, then third parties; each sorted, so the order is deterministic.
    found.sort(key=lambda c: (c.distribution != BUILTIN_DISTRIBUTION, c.distribution, c.name))
    return found


class PluginSet:
    """The plugin manager of one server (or one test): no global state."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.infos: dict[str, PluginInfo] = {}
        self.hooks = Hooks(self)

    def register_module(
        self, module: ModuleType, *, name: str, distribution: str, version: str = ""
    ) -> PluginInfo:
        """Register an imported module as plugin ``name``; a duplicate name is an error."""
        if name in self.infos:
            other = self.infos[name]
            raise PluginError(
                f"duplicate plugin name {name!r}: provided by distribution "
                f"{other.distribution!r} ({other.module}) and {distribution!r} ({module.__name__})"
            )
        try:
            self.pm.register(module, name=name)
        except Exception as exc:  # pluggy validates hook signatures here
            raise PluginError(f"plugin {name!r} from {distribution!r} is invalid: {exc}") from exc
        hooks = sorted(h.name for h in self.pm.get_hookcallers(module) or [])
        info = PluginInfo(name, module.__name__, distribution, version, hooks)
        self.infos[name] = info
        return info

    def load(self, candidates: Sequence[_Candidate], options: PluginOptions) -> None:
        for cand in candidates:
            if cand.name in options.blocked:
                continue
            if options.disable_autoload and cand.distribution != BUILTIN_DISTRIBUTION:
                continue
            self.register_module(
                _import_plugin(cand.module, cand.name, cand.distribution),
                name=cand.name,
                distribution=cand.distribution,
                version=cand.version,
            )
        registered_modules = {info.module for info in self.infos.values()}
        for module_name in options.extra_modules:
            # Like pytest, naming a module that an entry point already loaded is a no-op.
            if module_name in options.blocked or module_name in self.infos:
                continue
            if module_name in registered_modules:
                continue
            self.register_module(
                _import_plugin(module_name, module_name, "-p"), name=module_name, distribution="-p"
            )

    def module_paths(self) -> list[str]:
        return [info.module for info in self.infos.values()]


def _import_plugin(module: str, name: str, distribution: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except Exception as exc:
        raise PluginError(
            f"plugin {name!r} from distribution {distribution!r} failed to import "
            f"({module}): {type(exc).__name__}: {exc}"
        ) from exc


def load_plugins(options: PluginOptions | None = None) -> PluginSet:
    """Discover and register every plugin the options allow."""
    plugins = PluginSet()
    plugins.load(_entry_point_candidates(), options or PluginOptions())
    return plugins


class Hooks:
    """One typed method per hook, so the rest of the core never calls untyped ``pm.hook``.

    Registration hooks are flattened and each spec is attributed to the plugin that returned
    it (``PluginInfo.provides``), which ``flambeau plugins`` shows.
    """

    def __init__(self, plugins: PluginSet) -> None:
        self._plugins = plugins

    def _collect(self, hook_name: str, kind: str, **kwargs: Any) -> list[Any]:
        caller = getattr(self._plugins.pm.hook, hook_name)
        specs: list[Any] = []
        # Call each implementation ourselves to know which plugin returned which spec.
        for impl in caller.get_hookimpls():  # registration order
            argnames = impl.argnames
            result = impl.function(**{k: v for k, v in kwargs.items() if k in argnames})
            if not result:
                continue
            info = self._plugins.infos.get(impl.plugin_name)
            for spec in result:
                specs.append(spec)
                label = getattr(spec, "name", None) or getattr(spec, "pattern", "")
                if info is not None and label:
                    provided = info.provides.setdefault(kind, [])
                    if label not in provided:
                        provided.append(label)
        return specs

    def cli_options(self) -> list[CliOption]:
        return self._collect("flambeau_cli_options", "cli-options")

    def commands(self) -> list[CommandSpec]:
        return self._collect("flambeau_commands", "commands")

    def configure(self, config: Any) -> None:
        self._plugins.pm.hook.flambeau_configure(config=config)

    def routes(self, config: Any) -> list[RouteSpec]:
        return self._collect("flambeau_routes", "routes", config=config)

    def listeners(self, config: Any) -> list[ListenerSpec]:
        return self._collect("flambeau_listeners", "listeners", config=config)

    def grpc_services(self, config: Any) -> list[GrpcServiceSpec]:
        return self._collect("flambeau_grpc_services", "grpc-services", config=config)

    def authenticators(self, config: Any) -> list[AuthenticatorSpec]:
        return self._collect("flambeau_authenticators", "authenticators", config=config)

    def authorizers(self, config: Any) -> list[AuthorizerSpec]:
        return self._collect("flambeau_authorizers", "authorizers", config=config)

    def batchers(self, config: Any) -> list[BatcherSpec]:
        return self._collect("flambeau_batchers", "batchers", config=config)

    def envelopes(self, config: Any) -> list[EnvelopeSpec]:
        return self._collect("flambeau_envelopes", "envelopes", config=config)

    def device_discovery(self, config: Any) -> list[DeviceDiscoverySpec]:
        return self._collect("flambeau_device_discovery", "devices", config=config)

    def allocators(self, config: Any) -> list[AllocatorSpec]:
        return self._collect("flambeau_allocators", "allocators", config=config)

    def worker_backends(self, config: Any) -> list[WorkerBackendSpec]:
        return self._collect("flambeau_worker_backends", "worker-backends", config=config)

    def metrics_sinks(self, config: Any) -> list[MetricsSinkSpec]:
        return self._collect("flambeau_metrics_sinks", "metrics-sinks", config=config)

    def model_preparers(self, config: Any) -> list[PreparerSpec]:
        return self._collect("flambeau_model_preparers", "model-preparers", config=config)

    def handlers(self) -> list[HandlerSpec]:
        return self._collect("flambeau_handlers", "handlers")

    def lifespans(self, server: Any) -> list[AbstractAsyncContextManager[None]]:
        results = self._plugins.pm.hook.flambeau_lifespan(server=server)
        return [r for r in results if r is not None]


def named(specs: Iterable[Any], kind: str) -> dict[str, Any]:
    """Index specs by name; two plugins offering the same strategy name is an error."""
    registry: dict[str, Any] = {}
    for spec in specs:
        if spec.name in registry:
            raise PluginError(f"two plugins provide the {kind} {spec.name!r}")
        registry[spec.name] = spec
    return registry
