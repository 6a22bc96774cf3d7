"""The hook that registers the builtin worker backends, driven through a real plugin manager."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pluggy

from flambeau.api import PROJECT, WorkerBackendSpec
from flambeau.plugins.builtin.workers import plugin
from flambeau.plugins.builtin.workers.process import ProcessWorkerBackend
from flambeau.plugins.builtin.workers.thread import ThreadWorkerBackend

hookspec = pluggy.HookspecMarker(PROJECT)


class Specs:
    @hookspec
    def flambeau_worker_backends(self, config: Any) -> list[WorkerBackendSpec]:  # type: ignore[empty-body]
        """Stand-in for the core's hookspec."""


class Config:
    def __init__(self, values: dict[str, Any]) -> None:
        self.values = values

    def get_str(self, key: str, default: str) -> str:
        return str(self.values.get(key, default))

    def get_int(self, key: str, default: int) -> int:
        return int(self.values.get(key, default))


class Server:
    def __init__(self, log_dir: str, **values: Any) -> None:
        self.config = Config(values)
        self.log_dir = log_dir


def test_hook_registers_process_and_thread_backends(tmp_path: Path) -> None:
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(Specs)
    pm.register(plugin)
    (specs,) = pm.hook.flambeau_worker_backends(config=Config({}))
    assert [s.name for s in specs] == ["process", "thread"]

    server = Server(str(tmp_path), max_request_size=4096, blacklist_env_vars="AWS_.*")
    process = specs[0].factory(server)
    assert isinstance(process, ProcessWorkerBackend)
    assert process.max_request_bytes == 4096
    assert process.env_blacklist == "AWS_.*"
    assert process.log_dir == str(tmp_path)
    assert isinstance(specs[1].factory(server), ThreadWorkerBackend)
