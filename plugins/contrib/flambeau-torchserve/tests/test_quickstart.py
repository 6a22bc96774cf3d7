"""TorchServe's quick start, as its docs show the shell steps, runs unchanged on flambeau.

``quickstart.sh`` holds the commands (``torch-model-archiver``, ``torchserve --start``,
``curl``, ``torchserve --stop``); here they run in a fresh directory whose PATH resolves them
to this distribution's commands and whose config.properties moves the ports off 8080-8082.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest

from models import write_text_classifier
from support import Ports, compat_env, run, write_config

SCRIPT = Path(__file__).with_name("quickstart.sh")


def json_documents(text: str) -> list[Any]:
    """The JSON bodies curl printed one after another."""
    decoder = json.JSONDecoder()
    documents = []
    index = 0
    while (index := text.find("{", index)) != -1:
        document, index = decoder.raw_decode(text, index)
        documents.append(document)
    return documents


@pytest.mark.skipif(shutil.which("curl") is None, reason="the quick start needs curl")
def test_documented_quick_start_runs_unchanged(workdir: Path) -> None:
    write_text_classifier(workdir)
    ports = Ports.pick()
    write_config(workdir / "config.properties", ports)
    env = compat_env(workdir)
    env.update(INFERENCE=ports.url("inference"), MANAGEMENT=ports.url("management"))
    result = run(["bash", str(SCRIPT)], workdir, env)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "Model server started."
    assert lines[-1] == "TorchServe has stopped."
    positive, negative, models = json_documents("\n".join(lines[1:-1]))
    # 7 tokens each (4 words + 3 bigrams); "good" once -> logit 10/7, "bad" twice -> 20/7.
    assert positive["positive"] == pytest.approx(1 / (1 + math.exp(-10 / 7)), rel=1e-5)
    assert negative["negative"] == pytest.approx(1 / (1 + math.exp(-20 / 7)), rel=1e-5)
    assert models == {"models": [{"modelName": "my_tc", "modelUrl": "my_text_classifier.mar"}]}
    assert not (Path(env["TMPDIR"]) / ".model_server.pid").exists()
