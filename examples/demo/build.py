"""Build demo.mar into a model store: deterministic weights, the handler, a label map."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from model import DemoNet  # noqa: E402

from flambeau.archiver.cli import archive_main  # noqa: E402


def build(store: Path) -> Path:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "demo.pt"
        torch.save(DemoNet().state_dict(), weights)
        labels = Path(tmp) / "index_to_name.json"
        labels.write_text(json.dumps({"0": "setosa", "1": "versicolor", "2": "virginica"}))
        config = Path(tmp) / "model-config.yaml"
        config.write_text("minWorkers: 1\nmaxWorkers: 1\nbatchSize: 8\nmaxBatchDelay: 5\n")
        store.mkdir(parents=True, exist_ok=True)
        code = archive_main(
            [
                "--model-name",
                "demo",
                "--version",
                "1.0",
                "--model-file",
                str(HERE / "model.py"),
                "--serialized-file",
                str(weights),
                "--handler",
                str(HERE / "handler.py"),
                "--extra-files",
                str(labels),
                "--config-file",
                str(config),
                "--export-path",
                str(store),
                "--force",
            ]
        )
    if code != 0:
        raise SystemExit(code)
    return store / "demo.mar"


if __name__ == "__main__":
    print(build(Path(sys.argv[1] if len(sys.argv) > 1 else "model_store")))
