"""Helpers for the workflow plugin tests: a real server in this process, and a .war writer.

:class:`InProcessServer` runs one real :class:`flambeau.core.server.Server` (real Tornado
listeners, real ``thread`` workers, the real plugins) on an event loop in a background thread,
shared by a test module (the ``inproc`` fixture); tests reach it over HTTP or run coroutines on
its loop with ``call``.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import textwrap
import threading
import zipfile
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from flambeau.plugins.builtin.workflows.registry import WorkflowManager
from flambeau.testing.fixtures import LOOPBACK_CONFIG, Response, http_request

PLUGINS = ("flambeau.plugins.builtin.workers.plugin", "flambeau.plugins.builtin.workflows.plugin")


def unregistered(modules: tuple[str, ...]) -> tuple[str, ...]:
    """The plugin modules not (yet) registered as entry points: those need ``-p``."""
    registered = {ep.value for ep in importlib.metadata.entry_points(group="flambeau")}
    return tuple(m for m in modules if m not in registered)


class InProcessServer:
    """A real server on a background event loop; ``stop()`` drains it like SIGTERM would."""

    def __init__(self, root: Path, config: dict[str, str]) -> None:
        from flambeau.core.config import Config
        from flambeau.core.plugins import PluginOptions, load_plugins
        from flambeau.core.server import Server

        self.store = root / "store"
        self.store.mkdir()
        values = {
            **LOOPBACK_CONFIG,
            "model_store": str(self.store),
            "worker_backend": "thread",
            "disable_token_authorization": "true",
            "enable_model_api": "true",
            "snapshot_enabled": "false",
            **config,
        }
        plugins = load_plugins(PluginOptions(extra_modules=unregistered(PLUGINS)))
        ready = threading.Event()
        self.server = Server(Config.load(cli=values, environ={}), plugins, on_ready=ready.set)
        self.server.log_dir = str(root / "logs")
        self.loop = asyncio.new_event_loop()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="inproc-server", daemon=True)
        self.thread.start()
        if not ready.wait(60):
            raise RuntimeError(f"in-process server did not start: {self.error!r}")

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.server.run())
        except BaseException as exc:  # surfaced by the constructor's wait
            self.error = exc
        finally:
            self.loop.close()

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = 60) -> Any:
        """Run a coroutine on the server's loop and return its result (or raise its error)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def request(self, method: str, listener: str, path: str, **kwargs: Any) -> Response:
        return http_request(self.server.addresses[listener], method, path, **kwargs)

    def register(self, query: str) -> Response:
        return self.request("POST", "management", f"/workflows?{query}")

    def predict(self, name: str, payload: Any, version: str = "") -> Response:
        path = f"/wfpredict/{name}" + (f"/{version}" if version else "")
        return self.request(
            "POST",
            "inference",
            path,
            body=json.dumps(payload),
            headers={"Content-Type": "application/json"},
        )

    @property
    def workflows(self) -> WorkflowManager:
        """The workflow plugin's registry (its lifespan attached it to the server)."""
        manager: WorkflowManager = vars(self.server)["workflows"]
        return manager

    def model_names(self) -> set[str]:
        return set(self.server.models.models)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.server.request_stop)
        self.thread.join(60)


def write_war(
    store: Path,
    name: str,
    spec: str,
    handler: str | None,
    *,
    handler_name: str | None = None,
    manifest_extra: dict[str, Any] | None = None,
) -> Path:
    """A .war as torch-workflow-archiver lays it out (``manifest_extra`` joins the
    ``workflow`` section, e.g. a ``version``)."""
    handler_file = handler_name or f"{name}_handler.py"
    section: dict[str, Any] = {"workflowName": name, "specFile": f"{name}.yaml"}
    if handler is not None:
        section["handler"] = handler_file
    section.update(manifest_extra or {})
    manifest = {
        "createdOn": "01/01/2026 00:00:00",
        "workflow": section,
        "archiverVersion": "0.2.15",
    }
    path = store / f"{name}.war"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as war:
        war.writestr(f"{name}.yaml", textwrap.dedent(spec))
        if handler is not None:
            war.writestr(handler_file, textwrap.dedent(handler))
        war.writestr("WAR-INF/MANIFEST.json", json.dumps(manifest, indent=2))
    return path
