"""Workflows in snapshots: ``{LOG_LOCATION}/config/workflows.json``, rewritten on every change
and read back at start-up (both off when ``snapshot_enabled=false``, i.e. ``--ncs``).

TorchServe leaves workflows out of its snapshots; here each registered version is saved with
what registering it again needs (its archive, timeouts, default flag) and the worker counts of
its node models, so scaling done through either API survives a restart. The file is written
atomically (temporary file, then rename), so a crash never leaves half a snapshot.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from flambeau.api import FlambeauError
from flambeau.plugins.builtin.workflows.registry import (
    RegisterWorkflowParams,
    WorkflowManager,
    WorkflowVersion,
)

log = logging.getLogger("flambeau.workflows")

FORMAT_VERSION = 1
FILE_NAME = "workflows.json"


def workflow_state(manager: WorkflowManager) -> dict[str, Any]:
    """What a restart needs to serve the same workflows, oldest registration first."""
    entries = []
    for wv in sorted(manager.all_versions(), key=lambda w: w.created):
        workers: dict[str, list[int]] = {}
        for node, target in wv.targets.items():
            with contextlib.suppress(FlambeauError):
                live = manager.models.get(target.model, target.version).settings
                workers[node] = [live.min_workers, live.max_workers]
        entries.append(
            {
                "name": wv.name,
                "version": wv.version,
                "url": wv.url,
                "archive": wv.archive,
                "downloaded": wv.downloaded,
                "default": manager.defaults.get(wv.name) == wv.version,
                "responseTimeout": wv.response_timeout,
                "startupTimeout": wv.startup_timeout,
                "workers": workers,
            }
        )
    return {
        "formatVersion": FORMAT_VERSION,
        "created": int(time.time() * 1000),
        "workflows": entries,
    }


async def restore_workflows(manager: WorkflowManager, state: dict[str, Any]) -> int:
    """Register the workflows of a saved state again; returns how many came back.

    A workflow that cannot be registered (its archive is gone, a node fails to start) is
    logged and skipped, so it does not keep the server and the other workflows from starting.
    """
    restored = 0
    defaults: list[tuple[str, str]] = []
    for entry in state.get("workflows") or []:
        try:
            name, version = str(entry["name"]), str(entry["version"])
            await manager.register(
                RegisterWorkflowParams(
                    url=str(entry["archive"]),
                    workflow_name=name,
                    workflow_version=version,
                    response_timeout=entry.get("responseTimeout"),
                    startup_timeout=entry.get("startupTimeout"),
                )
            )
            wv = manager.get(name, version)
            await _restore_workers(manager, wv, entry.get("workers") or {})
            # Registered again from the store copy: keep the original url and ownership.
            manager.workflows[name][version] = replace(
                wv, url=str(entry.get("url") or wv.url), downloaded=bool(entry.get("downloaded"))
            )
        except (FlambeauError, KeyError, TypeError, ValueError) as exc:
            log.error("could not restore workflow %s: %s", entry, getattr(exc, "message", exc))
            continue
        restored += 1
        if entry.get("default"):
            defaults.append((name, version))
    for name, version in defaults:
        with contextlib.suppress(FlambeauError):
            manager.set_default(name, version)
    return restored


async def _restore_workers(
    manager: WorkflowManager, wv: WorkflowVersion, workers: dict[str, Any]
) -> None:
    for node, counts in workers.items():
        target = wv.targets.get(node)
        if target is None or not isinstance(counts, list) or len(counts) != 2:
            continue
        live = manager.models.get(target.model, target.version).settings
        if [live.min_workers, live.max_workers] != counts:
            await manager.models.scale(target.model, target.version, counts[0], counts[1], True)


class SnapshotFile:
    """The snapshot file of one server; ``paused`` while a restore re-registers workflows."""

    def __init__(self, log_dir: str | os.PathLike[str]) -> None:
        self.path = Path(log_dir) / "config" / FILE_NAME
        self.paused = False

    def read(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.error("ignoring unreadable workflow snapshot %s: %s", self.path, exc)
            return None
        return data if isinstance(data, dict) else None

    def write(self, manager: WorkflowManager) -> None:
        if self.paused:
            return
        data = json.dumps(workflow_state(manager), indent=2)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{FILE_NAME}.{os.getpid()}.tmp")
        try:
            tmp.write_text(data, encoding="utf-8")
            tmp.replace(self.path)
        except OSError as exc:
            log.error("could not write workflow snapshot %s: %s", self.path, exc)
            tmp.unlink(missing_ok=True)
