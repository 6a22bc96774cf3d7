"""Config snapshots: TorchServe's ``{LOG_LOCATION}/config/<time>-<kind>.cfg`` files.

Written (Java properties: the configuration plus ``model_snapshot`` JSON) after start-up,
after every successful model change and at shutdown; at a start without a named config file
the newest one's models are registered again. ``--ncs`` turns both off.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
import urllib.parse
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flambeau.api import RegisterParams, hookimpl
from flambeau.properties import parse_properties

log = logging.getLogger("flambeau.snapshots")

SNAPSHOT_DIR = "config"
SNAPSHOT_NAME = re.compile(r"^(\d{17})-(startup|snapshot|shutdown)\.cfg$")
MODEL_SNAPSHOT = "model_snapshot"
# The CLI's fallback when no config file is named: it does not count as naming one.
CWD_CONFIG = "config.properties"


# ----------------------------------------------------------------------------- properties


def _escape(text: str, *, key: bool) -> str:
    out = []
    for index, char in enumerate(text):
        if char == "\\":
            out.append("\\\\")
        elif char in "\t\n\r\f":
            out.append("\\" + {"\t": "t", "\n": "n", "\r": "r", "\f": "f"}[char])
        elif char == " " and (key or index == 0):
            out.append("\\ ")
        elif key and char in "=:#!":
            out.append("\\" + char)
        else:
            # ':' '=' '#' '!' inside a value need no escape in Java's reader, and leaving
            # them plain keeps the file readable by simpler parsers too.
            out.append(char)
    return "".join(out)


def format_properties(values: Mapping[str, str], comment: str, when: float) -> str:
    """Java ``Properties.store`` output: two comment lines, then ``key=value`` lines."""
    stamp = time.strftime("%a %b %d %H:%M:%S %Z %Y", time.localtime(when))
    lines = [f"#{comment}", f"#{stamp}"]
    lines += [f"{_escape(k, key=True)}={_escape(v, key=False)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- model_snapshot


@dataclass(frozen=True, slots=True)
class SavedVersion:
    """One model version as a snapshot records it."""

    model: str
    version: str
    default: bool
    mar_name: str
    settings: Mapping[str, int]
    runtime: str | None


_SETTING_KEYS = {
    "minWorkers": "min_workers",
    "maxWorkers": "max_workers",
    "batchSize": "batch_size",
    "maxBatchDelay": "max_batch_delay_ms",
    "responseTimeout": "response_timeout_s",
    "startupTimeout": "startup_timeout_s",
    "parallelLevel": "parallel_level",
}


def mar_name(mv: Any) -> str:
    """What a restore registers again: the archive's file name in the model store.

    An absolute directory stays absolute (flambeau registers it in place, not from the store).
    """
    url = str(mv.url)
    parts = urllib.parse.urlsplit(url)
    if "://" in url and parts.scheme:
        return Path(urllib.parse.unquote(parts.path)).name
    if os.path.isabs(url):
        return url
    return Path(url).name


def model_snapshot(manager: Any, file_name: str, created: float) -> dict[str, Any]:
    """TorchServe's ``model_snapshot`` JSON for every version the manager holds."""
    models: dict[str, dict[str, Any]] = {}
    count = 0
    for name in sorted(manager.models):
        versions: dict[str, Any] = {}
        for version, mv in manager.models[name].items():
            if getattr(mv, "owner", None):
                continue  # a plugin's own model (workflow node): that plugin restores it
            s = mv.settings
            info: dict[str, Any] = {
                "defaultVersion": manager.is_default(mv),
                "marName": mar_name(mv),
                "minWorkers": s.min_workers,
                "maxWorkers": s.max_workers,
                "batchSize": s.batch_size,
                "maxBatchDelay": s.max_batch_delay_ms,
                "responseTimeout": s.response_timeout_s,
                "startupTimeout": s.startup_timeout_s,
                "runtimeType": mv.runtime,
            }
            if s.parallel_level > 0:
                info["parallelLevel"] = s.parallel_level
            versions[version] = info
            count += 1
        if versions:
            models[name] = versions
    return {
        "name": file_name,
        "modelCount": count,
        "created": int(created * 1000),
        "models": models,
    }


def saved_versions(snapshot_json: str) -> list[SavedVersion]:
    """Parse ``model_snapshot``; entries that make no sense are skipped with a warning."""
    data = json.loads(snapshot_json)
    models = data.get("models") if isinstance(data, dict) else None
    saved: list[SavedVersion] = []
    for model, versions in (models or {}).items():
        if not isinstance(versions, dict):
            continue
        for version, info in versions.items():
            if not isinstance(info, dict) or not isinstance(info.get("marName"), str):
                log.warning("snapshot: model %s version %s has no marName, skipped", model, version)
                continue
            settings = {
                field: info[key]
                for key, field in _SETTING_KEYS.items()
                if isinstance(info.get(key), int) and not isinstance(info.get(key), bool)
            }
            runtime = info.get("runtimeType")
            saved.append(
                SavedVersion(
                    model=str(model),
                    version=str(version),
                    default=info.get("defaultVersion") is True,
                    mar_name=info["marName"],
                    settings=settings,
                    runtime=runtime if isinstance(runtime, str) else None,
                )
            )
    return saved


async def restore(manager: Any, saved: list[SavedVersion]) -> None:
    """Register every saved version with its settings, then restore the default versions."""
    import asyncio

    await asyncio.gather(
        *(
            manager.register_logged(
                RegisterParams(
                    url=entry.mar_name,
                    model_name=entry.model,
                    runtime=entry.runtime,
                    loaded_at_startup=True,
                ),
                overrides=entry.settings,
            )
            for entry in saved
        )
    )
    for entry in saved:
        if entry.default and entry.version in manager.models.get(entry.model, {}):
            manager.set_default(entry.model, entry.version)


def newest_snapshot(directory: Path) -> Path | None:
    """The snapshot file with the latest timestamp prefix (TorchServe's choice)."""
    if not directory.is_dir():
        return None
    found = [p for p in directory.iterdir() if p.is_file() and SNAPSHOT_NAME.match(p.name)]
    return max(found, key=lambda p: p.name[:17], default=None)


# ----------------------------------------------------------------------------- the plugin


class SnapshotWriter:
    """Writes snapshot files; names are unique and strictly increasing within one server."""

    def __init__(self, server: Any, directory: Path) -> None:
        self.server = server
        self.directory = directory
        self.started = False
        self._last_ms = 0

    def on_change(self, event: str) -> None:
        if event == "startup":
            self.started = True
            self.write("startup")
        elif self.started:
            self.write("snapshot")

    def _name(self, kind: str) -> tuple[str, float]:
        now = time.time()
        ms = max(int(now * 1000), self._last_ms + 1)
        self._last_ms = ms
        stamp = time.strftime("%Y%m%d%H%M%S", time.localtime(ms / 1000)) + f"{ms % 1000:03d}"
        return f"{stamp}-{kind}.cfg", ms / 1000

    def write(self, kind: str) -> Path | None:
        name, created = self._name(kind)
        config = self.server.config
        values = {k: v for k, v in config.as_dict().items() if k != MODEL_SNAPSHOT}
        if config.source:
            values["tsConfigFile"] = str(config.source)
        snapshot = model_snapshot(self.server.models, name, created)
        values[MODEL_SNAPSHOT] = json.dumps(snapshot, ensure_ascii=False)
        path = self.directory / name
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{name}.tmp")
            # 0600: the configuration can hold key store passwords.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(format_properties(values, "Saving snapshot", created))
            tmp.replace(path)
        except OSError as exc:
            log.error("cannot write snapshot %s: %s", path, exc)
            return None
        log.info("snapshot %s written (%d model versions)", name, snapshot["modelCount"])
        return path


def _named_config(config: Any) -> bool:
    """Whether the operator named a config file (then no snapshot replaces it)."""
    if os.environ.get("TS_CONFIG_FILE"):
        return True
    return bool(config.source) and str(config.source) != CWD_CONFIG


def _snapshot_to_restore(config: Any, directory: Path, enabled: bool) -> str | None:
    """The ``model_snapshot`` JSON to restore at start, if any."""
    if MODEL_SNAPSHOT in config and config.source:
        # A snapshot file given as the config restores its models, as in TorchServe.
        path: Path | None = Path(config.source)
    elif not enabled or _named_config(config):
        return None
    else:
        path = newest_snapshot(directory)
    if path is None:
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        log.error("cannot read snapshot %s (%s); no models restored", path, exc)
        return None
    log.info("restoring the models of snapshot %s", path.name)
    return parse_properties(text).get(MODEL_SNAPSHOT)


@contextlib.asynccontextmanager
async def _lifespan(server: Any) -> AsyncIterator[None]:
    config = server.config
    enabled = config.get_bool("snapshot_enabled", True)
    directory = Path(server.log_dir) / SNAPSHOT_DIR
    snapshot_json = _snapshot_to_restore(config, directory, enabled)
    if snapshot_json:
        try:
            saved = saved_versions(snapshot_json)
        except json.JSONDecodeError as exc:
            log.error("model_snapshot is not valid JSON (%s); nothing restored", exc)
            saved = []
        # An empty snapshot leaves --models / load_models in charge (TorchServe ignores them).
        if saved:

            async def source(manager: Any) -> None:
                await restore(manager, saved)

            server.models.set_startup_source(source)
    if not enabled:
        yield
        return
    writer = SnapshotWriter(server, directory)
    server.models.add_listener(writer.on_change)
    try:
        yield
    finally:
        writer.write("shutdown")


@hookimpl
def flambeau_lifespan(server: Any) -> contextlib.AbstractAsyncContextManager[None]:
    """Subscribe to model changes, restore at start, write the shutdown snapshot."""
    return _lifespan(server)
