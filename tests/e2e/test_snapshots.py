"""Config snapshots on real servers: written on every change, restored at the next start.

The servers here start like ``flambeau start`` in a directory holding config.properties and
no ``--ts-config``, the case where TorchServe restores the newest snapshot of
``{LOG_LOCATION}/config``; a named config file, ``--ncs`` and TorchServe's own snapshot
format are checked too.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

from flambeau.plugins.builtin.snapshots import format_properties
from flambeau.properties import parse_properties
from flambeau.testing.fixtures import ServerProcess

NAME = re.compile(r"^\d{17}-(startup|snapshot|shutdown)\.cfg$")


def snapshot_files(log_dir: Path) -> list[Path]:
    """The snapshot files (other plugins may keep files of their own in the directory)."""
    directory = log_dir / "config"
    files = (
        sorted(p for p in directory.iterdir() if p.suffix == ".cfg") if directory.is_dir() else []
    )
    assert all(NAME.match(p.name) for p in files), [p.name for p in files]
    return files


def kinds(files: list[Path]) -> list[str]:
    return [p.name.split("-", 1)[1].removesuffix(".cfg") for p in files]


def model_snapshot(path: Path) -> dict[str, Any]:
    return dict(json.loads(parse_properties(path.read_text())["model_snapshot"]))


def test_properties_round_trip() -> None:
    values = {
        "allowed_urls": r"file://.*,http://127\.0\.0\.1:\d+/.*",
        "odd key": " leading space, a # and a ! and = and :",
        "multi": "line one\nline two\ttab",
        "model_snapshot": json.dumps({"name": "ü", "models": {}}),
    }
    text = format_properties(values, "Saving snapshot", time.time())
    assert text.startswith("#Saving snapshot\n#")
    assert parse_properties(text) == values
    # What Java's Properties.store writes (TorchServe's snapshots) reads back too.
    java = 'inference_address=http\\://127.0.0.1\\:8080\nmodel_snapshot={\\n  "a"\\: 1\\n}\n'
    assert parse_properties(java) == {
        "inference_address": "http://127.0.0.1:8080",
        "model_snapshot": '{\n  "a": 1\n}',
    }


def test_snapshots_are_written_and_restored(
    sources: Any, e2e: Any, module_server: Any, tmp_path: Path
) -> None:
    store = e2e.store_with(sources, tmp_path / "store", "probe")
    shutil.copy2(sources.archive("probe_v2"), store / "probe-2.0.mar")
    log_dir = tmp_path / "logs"

    def start(name: str, *args: str, **config: str) -> ServerProcess:
        workdir = tmp_path / name
        workdir.mkdir()
        return e2e.CwdConfigServer(
            workdir, model_store=store, log_dir=log_dir, args=args, config=config
        )

    first = start("first")
    try:
        assert kinds(snapshot_files(log_dir)) == ["startup"]
        for query in (
            "url=probe.mar&model_name=snap",
            "url=probe-2.0.mar&model_name=snap",
            "url=probe.mar&model_name=other&batch_size=4&max_batch_delay=9&response_timeout=33",
        ):
            assert e2e.api(first, "POST", f"/models?{query}").status == 200
        assert e2e.api(first, "PUT", "/models/snap/2.0/set-default").status == 200
        scaled = e2e.api(
            first, "PUT", "/models/snap/1.0?min_worker=1&max_worker=2&synchronous=true"
        )
        assert scaled.status == 200
        files = snapshot_files(log_dir)
        assert kinds(files) == ["startup"] + ["snapshot"] * 5
        latest = model_snapshot(files[-1])
        assert latest["name"] == files[-1].name
        assert latest["modelCount"] == 3
        assert latest["models"]["snap"]["1.0"] == {
            "defaultVersion": False,
            "marName": "probe.mar",
            "minWorkers": 1,
            "maxWorkers": 2,
            "batchSize": 1,
            "maxBatchDelay": 100,
            "responseTimeout": 120,
            "startupTimeout": 120,
            "runtimeType": "python",
        }
        assert latest["models"]["snap"]["2.0"]["defaultVersion"] is True
        assert latest["models"]["snap"]["2.0"]["marName"] == "probe-2.0.mar"
        other = latest["models"]["other"]["1.0"]
        assert (other["batchSize"], other["maxBatchDelay"], other["responseTimeout"]) == (4, 9, 33)
        config = parse_properties(files[-1].read_text())
        assert config["enable_model_api"] == "true"
        assert (files[-1].stat().st_mode & 0o777) == 0o600
    finally:
        first.stop()
    assert kinds(snapshot_files(log_dir))[-1] == "shutdown"

    second = start("second")
    try:
        listed = e2e.api(second, "GET", "/models").json()["models"]
        assert [m["modelName"] for m in listed] == ["other", "snap"]
        assert e2e.describe(second, "snap")["modelVersion"] == "2.0"
        restored = e2e.api(second, "GET", "/models/snap/1.0").json()[0]
        assert (restored["minWorkers"], restored["maxWorkers"]) == (1, 2)
        assert [w["status"] for w in restored["workers"]] == ["READY"]
        assert restored["loadedAtStartup"] is True
        other_info = e2e.describe(second, "other")
        assert (other_info["batchSize"], other_info["maxBatchDelay"]) == (4, 9)
        assert other_info["responseTimeout"] == 33
        assert e2e.predict(second, "/predictions/snap/1.0", b"x").status == 200
    finally:
        second.stop()
    assert kinds(snapshot_files(log_dir))[-2:] == ["startup", "shutdown"]

    # A snapshot written by TorchServe itself (Java escapes, pretty JSON) is the newest now.
    models = {
        "tsmodel": {
            "1.0": {
                "defaultVersion": True,
                "marName": "probe.mar",
                "minWorkers": 0,
                "maxWorkers": 0,
                "batchSize": 3,
                "maxBatchDelay": 50,
                "responseTimeout": 60,
                "runtimeType": "python",
            }
        }
    }
    pretty = json.dumps({"name": "x", "modelCount": 1, "created": 0, "models": models}, indent=2)
    escaped = pretty.replace(":", "\\:").replace("\n", "\\n")
    foreign = log_dir / "config" / "29991231235959999-shutdown.cfg"
    foreign.write_text(
        f"#Saving snapshot\n#Fri Dec 31 23:59:59 UTC 2999\nmodel_snapshot={escaped}\n"
    )
    count = len(snapshot_files(log_dir))

    no_snapshots = start("ncs", "--ncs")
    try:
        assert e2e.api(no_snapshots, "GET", "/models").json() == {"models": []}
    finally:
        no_snapshots.stop()
    assert len(snapshot_files(log_dir)) == count

    # A named config file wins over any snapshot (module_server passes --ts-config).
    named = module_server(model_store=store, env={"LOG_LOCATION": str(log_dir)})
    try:
        assert named.request("GET", "management", "/models").json() == {"models": []}
    finally:
        named.stop()

    from_torchserve = start("torchserve", "--models", "probe.mar")
    try:
        # The snapshot's models, not --models.
        listed = e2e.api(from_torchserve, "GET", "/models").json()["models"]
        assert [m["modelName"] for m in listed] == ["tsmodel"]
        info = e2e.describe(from_torchserve, "tsmodel")
        assert (info["batchSize"], info["maxBatchDelay"], info["responseTimeout"]) == (3, 50, 60)
        assert e2e.api(from_torchserve, "DELETE", "/models/tsmodel").status == 200
    finally:
        from_torchserve.stop()

    # Its shutdown snapshot holds no model: --models is in charge again.
    foreign.unlink()
    assert model_snapshot(snapshot_files(log_dir)[-1])["modelCount"] == 0
    no_models = {"models": json.dumps({"probe": {"1.0": {"minWorkers": 0}}})}
    empty = start("empty", "--models", "probe.mar", **no_models)
    try:
        assert [m["modelName"] for m in e2e.api(empty, "GET", "/models").json()["models"]] == [
            "probe"
        ]
    finally:
        empty.stop()
