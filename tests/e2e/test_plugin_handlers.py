"""Named handlers from a plugin (``flambeau_handlers``) reach the worker processes."""

from __future__ import annotations

import os
import textwrap
import zipfile
from pathlib import Path

from flambeau.testing.fixtures import ServerFactory

PLUGIN = """
from flambeau.api import HandlerSpec, hookimpl


@hookimpl
def flambeau_handlers():
    return [HandlerSpec("shout", "shout_handlers:handle")]
"""

HANDLERS = """
def handle(data, context):
    if data is None:
        return None
    return [row["body"].upper() for row in data]
"""


def test_a_plugin_handler_name_serves_in_a_worker_process(
    flambeau_server: ServerFactory, tmp_path: Path
) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "shout_plugin.py").write_text(textwrap.dedent(PLUGIN))
    (site / "shout_handlers.py").write_text(textwrap.dedent(HANDLERS))
    store = tmp_path / "store"
    store.mkdir()
    # An archive naming the plugin's handler, as one names a builtin like image_classifier.
    with zipfile.ZipFile(store / "loud.mar", "w") as mar:
        manifest = '{"runtime": "python", "model": {"modelName": "loud", "modelVersion": "1.0", '
        mar.writestr("MAR-INF/MANIFEST.json", manifest + '"handler": "shout"}}')
    pythonpath = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH", "")]))
    server = flambeau_server(
        model_store=store,
        args=["--disable-token-auth", "--models", "loud=loud.mar", "-p", "shout_plugin"],
        env={"PYTHONPATH": pythonpath},
    )
    answer = server.request(
        "POST",
        "inference",
        "/predictions/loud",
        body="quiet",
        headers={"Content-Type": "text/plain"},
    )
    assert answer.status == 200, answer.body
    assert answer.body == b"QUIET"
    workers = server.request("GET", "management", "/models/loud").json()[0]["workers"]
    assert workers[0]["pid"] != -1  # a real worker process answered, not the server
