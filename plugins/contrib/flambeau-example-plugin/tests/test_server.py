"""The installed plugin in a real flambeau server, through flambeau's own pytest fixture.

``flambeau_server`` (registered by flambeau as a pytest plugin) starts the server as a child
process on free loopback ports; the plugin is found through its entry point, exactly as in
production. Each test starts its own server with the flags it is about.
"""

from __future__ import annotations

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from flambeau.archiver import ModelArchiverConfig, generate_model_archive
from flambeau.testing.fixtures import ServerFactory

BATCH_HANDLER = """\
import time


def handle(data, context):
    if data is None:
        return None
    start = time.monotonic()  # CLOCK_MONOTONIC: comparable across processes of one machine
    if any((row.get("body") or b"") == b"slow" for row in data):
        time.sleep(3)
    return [{"size": len(data), "start": start, "end": time.monotonic()} for _ in data]
"""


def build_batch_model(store: Path, strategy: str | None) -> None:
    """batched.mar: batches of 2 within 2 s; each answer says its batch's size and when the
    handler started and ended it. ``strategy`` goes to model-config.yaml as
    ``batchingStrategy`` (None: the server's default)."""
    source = store.parent / "batched_src"
    source.mkdir()
    (source / "batch_handler.py").write_text(BATCH_HANDLER)
    chosen = f"batchingStrategy: {strategy}\n" if strategy else ""
    (source / "model-config.yaml").write_text(
        f"batchSize: 2\nmaxBatchDelay: 2000\n{chosen}minWorkers: 1\nmaxWorkers: 1\n"
    )
    generate_model_archive(
        ModelArchiverConfig(
            model_name="batched",
            handler=str(source / "batch_handler.py"),
            version="1.0",
            config_file=str(source / "model-config.yaml"),
            export_path=str(store),
        )
    )


def test_echo_route_is_served_guarded_and_configured(flambeau_server: ServerFactory) -> None:
    server = flambeau_server(config={"example_echo_prefix": "[demo]"})
    key = server.keys["inference"]["key"]
    auth = {"Authorization": f"Bearer {key}"}

    echoed = server.request("POST", "inference", "/example/echo", body="hello", headers=auth)
    assert echoed.status == 200
    assert echoed.json()["echo"] == "[demo]hello"
    assert echoed.json()["request_id"] == echoed.header("x-request-id")

    query = server.request("GET", "inference", "/example/echo?text=hi", headers=auth)
    assert query.json()["echo"] == "[demo]hi"

    # Closed without the inference key: TorchServe's token refusal is a 400.
    refused = server.request("POST", "inference", "/example/echo", body="hello")
    assert refused.status == 400

    not_text = server.request("POST", "inference", "/example/echo", body=b"\xff", headers=auth)
    assert (not_text.status, not_text.json()["message"]) == (
        400,
        "the echo route takes UTF-8 text",
    )
    assert server.request("PUT", "inference", "/example/echo", headers=auth).status == 405


@pytest.mark.parametrize(
    ("model_config", "server_config", "waits_again"),
    [
        ("deadline", {}, False),
        (None, {"batching_strategy": "deadline"}, False),
        ("torchserve", {}, True),  # the contrast: proves the measurement tells them apart
    ],
    ids=["model-config deadline", "server deadline", "torchserve"],
)
def test_a_request_queued_behind_a_busy_worker_waits_only_under_torchserves_strategy(
    flambeau_server: ServerFactory,
    tmp_path: Path,
    model_config: str | None,
    server_config: dict[str, str],
    waits_again: bool,
) -> None:
    store = tmp_path / "store"
    store.mkdir()
    build_batch_model(store, model_config)
    server = flambeau_server(
        model_store=store,
        config=server_config,
        args=["--disable-token-auth", "--models", "batched=batched.mar"],
    )

    def predict(body: str) -> dict[str, float]:
        response = server.request("POST", "inference", "/predictions/batched", body=body)
        assert response.status == 200, response.body
        return dict(response.json())

    with ThreadPoolExecutor(3) as pool:
        slow, other = pool.submit(predict, "slow"), pool.submit(predict, "x")
        # No event to await: the server does not say when a batch starts. 0.5 s is far less
        # than the 3 s the slow batch keeps the only worker busy.
        time.sleep(0.5)
        late = pool.submit(predict, "late")
        first, second, queued = slow.result(), other.result(), late.result()
    assert (first["size"], second["size"], queued["size"]) == (2, 2, 1)
    # "late" was queued at ~0.5 s, its deadline (2 s later) passed while the worker was busy:
    # the deadline strategy runs it at once, TorchServe's waits maxBatchDelay again.
    gap = queued["start"] - first["end"]
    assert gap > 1.0 if waits_again else gap < 1.0


def test_blocked_plugin_provides_neither_route_nor_strategy(
    flambeau_server: ServerFactory, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    store.mkdir()
    build_batch_model(store, "deadline")
    server = flambeau_server(
        model_store=store, args=["--disable-token-auth", "--enable-model-api", "-p", "no:example"]
    )
    assert server.request("POST", "inference", "/example/echo", body="x").status == 404
    registered = server.request("POST", "management", "/models?url=batched.mar")
    # Naming a strategy nobody provides is the caller's error, answered with the reason.
    assert registered.status == 400
    assert (
        "batching strategy 'deadline' is not provided by any plugin"
        in (registered.json()["message"])
    )
    assert server.request("GET", "management", "/models").json() == {"models": []}


def _plugins(*flags: str) -> str:
    command = [sys.executable, "-m", "flambeau.core.cli", "plugins", *flags]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout


def test_flambeau_plugins_lists_it_from_its_distribution() -> None:
    listing = _plugins()
    assert "example  (flambeau-example-plugin 0.1.0)  module flambeau_example.plugin" in listing
    assert "    batchers: deadline" in listing
    assert "    routes: example-echo" in listing
    assert "flambeau_example" not in _plugins("-p", "no:example")
