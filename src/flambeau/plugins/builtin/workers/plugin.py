"""Registers the builtin ``process`` and ``thread`` worker backends.

The factories receive the core's server object and read only ``server.config`` (TorchServe
config.properties keys: ``max_request_size``, ``blacklist_env_vars``) and ``server.log_dir``.
The backend modules are imported when a backend is built, not when the plugin is loaded.
"""

from __future__ import annotations

from typing import Any

from flambeau.api import WorkerBackend, WorkerBackendSpec, hookimpl

__all__ = ["flambeau_worker_backends"]


def _process_backend(server: Any) -> WorkerBackend:
    from flambeau.plugins.builtin.workers.process import ProcessWorkerBackend

    return ProcessWorkerBackend.from_config(server.config, getattr(server, "log_dir", None))


def _thread_backend(server: Any) -> WorkerBackend:
    del server  # nothing configurable yet
    from flambeau.plugins.builtin.workers.thread import ThreadWorkerBackend

    return ThreadWorkerBackend()


@hookimpl
def flambeau_worker_backends(config: Any) -> list[WorkerBackendSpec]:
    """The ``process`` (default, one OS process per worker) and ``thread`` backends."""
    del config  # the backends read their settings when built, from the server's config
    return [
        WorkerBackendSpec("process", _process_backend),
        WorkerBackendSpec("thread", _thread_backend),
    ]
