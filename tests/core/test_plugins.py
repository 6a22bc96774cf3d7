"""The entry-point loader: order, duplicates, import errors, blocking, autoload."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from flambeau.api import PluginError, RouteSpec
from flambeau.core.config import Config
from flambeau.core.plugins import (
    BUILTIN_DISTRIBUTION,
    PluginOptions,
    PluginSet,
    _Candidate,
    load_plugins,
)


@pytest.fixture
def plugin_modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Write plugin modules into a directory on sys.path."""
    monkeypatch.syspath_prepend(str(tmp_path))
    for name, body in {
        "fake_alpha": """
            from flambeau.api import hookimpl, BatcherSpec
            @hookimpl
            def flambeau_batchers(config):
                return [BatcherSpec("alpha", object)]
        """,
        "fake_beta": """
            from flambeau.api import hookimpl, BatcherSpec
            @hookimpl
            def flambeau_batchers():
                return [BatcherSpec("beta", object)]
        """,
        "fake_broken": "raise RuntimeError('boom at import')\n",
        "fake_badhook": """
            from flambeau.api import hookimpl
            @hookimpl
            def flambeau_batchers(not_an_argument):
                return []
        """,
    }.items():
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    yield tmp_path
    for name in ("fake_alpha", "fake_beta", "fake_broken", "fake_badhook"):
        sys.modules.pop(name, None)


def cand(name: str, module: str, dist: str) -> _Candidate:
    return _Candidate(name, module, dist, "1.0")


def test_builtins_load_first_and_in_a_stable_order() -> None:
    plugins = load_plugins()
    infos = list(plugins.infos.values())
    builtin_flags = [info.builtin for info in infos]
    assert builtin_flags == sorted(builtin_flags, reverse=True)
    builtin_names = [info.name for info in infos if info.builtin]
    assert builtin_names == sorted(builtin_names)
    assert {"ping", "inference", "management", "batching"} <= set(builtin_names)
    assert all(info.distribution == BUILTIN_DISTRIBUTION for info in infos if info.builtin)


def test_hooks_are_attributed_to_their_plugin(plugin_modules: Path) -> None:
    plugins = PluginSet()
    plugins.load(
        [cand("a", "fake_alpha", "dist-a"), cand("b", "fake_beta", "dist-b")], PluginOptions()
    )
    names = [spec.name for spec in plugins.hooks.batchers(config=None)]
    assert names == ["alpha", "beta"]  # registration order, not pluggy's LIFO
    assert plugins.infos["a"].provides == {"batchers": ["alpha"]}
    assert plugins.infos["b"].hooks == ["flambeau_batchers"]


def test_duplicate_name_names_both_distributions(plugin_modules: Path) -> None:
    plugins = PluginSet()
    with pytest.raises(PluginError, match=r"duplicate plugin name 'x'.*dist-a.*dist-b"):
        plugins.load(
            [cand("x", "fake_alpha", "dist-a"), cand("x", "fake_beta", "dist-b")], PluginOptions()
        )


def test_import_error_names_plugin_and_distribution(plugin_modules: Path) -> None:
    plugins = PluginSet()
    with pytest.raises(
        PluginError, match=r"plugin 'broken' from distribution 'dist-z'.*boom at import"
    ):
        plugins.load([cand("broken", "fake_broken", "dist-z")], PluginOptions())


def test_invalid_hook_signature_is_refused(plugin_modules: Path) -> None:
    plugins = PluginSet()
    with pytest.raises(PluginError, match="'bad' from 'dist-q' is invalid"):
        plugins.load([cand("bad", "fake_badhook", "dist-q")], PluginOptions())


def test_blocking_skips_even_a_broken_plugin(plugin_modules: Path) -> None:
    plugins = PluginSet()
    options = PluginOptions.from_flags(["no:broken"])
    plugins.load([cand("a", "fake_alpha", "d"), cand("broken", "fake_broken", "d")], options)
    assert list(plugins.infos) == ["a"]


def test_disable_autoload_keeps_only_builtins(plugin_modules: Path) -> None:
    plugins = PluginSet()
    options = PluginOptions(disable_autoload=True)
    plugins.load(
        [cand("a", "fake_alpha", BUILTIN_DISTRIBUTION), cand("b", "fake_beta", "other")], options
    )
    assert list(plugins.infos) == ["a"]


def test_disable_autoload_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLAMBEAU_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert PluginOptions.from_flags([]).disable_autoload


def test_dash_p_adds_a_module(plugin_modules: Path) -> None:
    plugins = PluginSet()
    plugins.load([], PluginOptions.from_flags(["fake_beta"]))
    assert plugins.infos["fake_beta"].distribution == "-p"


def test_blocking_a_builtin_removes_its_routes() -> None:
    config = Config.load(environ={})
    plugins = load_plugins(PluginOptions.from_flags(["no:ping"]))
    routes = plugins.hooks.routes(config)
    assert not any(spec.pattern.startswith("/ping") for spec in routes)
    assert all(isinstance(spec, RouteSpec) for spec in routes)
    assert any(s.pattern.startswith("/ping") for s in load_plugins().hooks.routes(config))


def test_dash_p_of_an_entry_point_module_is_a_no_op() -> None:
    plugins = load_plugins(PluginOptions.from_flags(["flambeau.plugins.builtin.ping"]))
    assert [i.name for i in plugins.infos.values()].count("ping") == 1
    assert "flambeau.plugins.builtin.ping" not in plugins.infos
