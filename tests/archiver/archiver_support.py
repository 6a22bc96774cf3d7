"""Shared helpers for the archiver tests: sample sources, the real tools, tree listings.

The real torch-model-archiver / torch-workflow-archiver are looked up next to the running
interpreter, so differential tests use exactly the versions the test extra pins.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

MODEL_PY = """\
import torch


class TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x)
"""

HANDLER_PY = """\
def handle(data, context):
    return [len(row) for row in data or []]
"""

CONFIG_YAML = """\
minWorkers: 1
maxWorkers: 2
batchSize: 4
maxBatchDelay: 100
handler:
  threshold: 0.5
"""


@dataclass(frozen=True, slots=True)
class ModelInputs:
    """Paths of one model's source files (see :func:`write_model_inputs`)."""

    root: Path
    model_file: Path
    weights: Path
    handler: Path
    requirements: Path
    config: Path
    extra_dir: Path
    labels: Path


def write_model_inputs(src: Path, weights: bytes) -> ModelInputs:
    """Write a source tree: model, weights, handler, config, requirements and an extra-files
    dir holding a nested dir, a hidden file, and the dirs every archiver must skip."""
    extra = src / "assets"
    for d in (extra / "vocab", extra / "__pycache__", extra / ".git", extra / "vocab" / ".cache"):
        d.mkdir(parents=True)
    (src / "tiny_model.py").write_text(MODEL_PY)
    (src / "tiny.pt").write_bytes(weights)
    (src / "tiny_handler.py").write_text(HANDLER_PY)
    (src / "requirements.txt").write_text("numpy\n")
    (src / "model-config.yaml").write_text(CONFIG_YAML)
    (src / "index_to_name.json").write_text('{"0": "a", "1": "b", "2": "c"}')
    (extra / "tokenizer.json").write_text("{}")
    (extra / ".hidden.txt").write_text("kept: hidden files are not filtered")
    (extra / "vocab" / "words.txt").write_text("a\nb\n")
    (extra / "vocab" / ".cache" / "junk").write_text("skipped")
    (extra / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\0")
    (extra / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    return ModelInputs(
        root=src,
        model_file=src / "tiny_model.py",
        weights=src / "tiny.pt",
        handler=src / "tiny_handler.py",
        requirements=src / "requirements.txt",
        config=src / "model-config.yaml",
        extra_dir=extra,
        labels=src / "index_to_name.json",
    )


def real_tool_path(name: str) -> Path:
    """The real archiver installed beside this interpreter, or skip the test."""
    candidate = Path(sys.executable).parent / name
    found = candidate if candidate.exists() else shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not installed (pip install flambeau[test] provides it)")
    return Path(found)


def run_real(
    tool: str, *args: str | Path, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a real TorchServe archiver and return the completed process (never raises).

    The real tools stage files in ``$TMPDIR/<name>`` and leave it behind on failure, so each
    run gets a private TMPDIR that is removed afterwards.
    """
    with tempfile.TemporaryDirectory(prefix="real-archiver-") as scratch:
        return subprocess.run(
            [str(real_tool_path(tool)), *map(str, args)],
            capture_output=True,
            text=True,
            cwd=cwd,
            env={**os.environ, "TMPDIR": scratch},
            timeout=60,
            check=False,
        )


def files_under(root: Path) -> set[str]:
    """Relative POSIX paths of the regular files below ``root``."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def all_paths(root: Path) -> set[Path]:
    """Every path below ``root`` (to prove nothing was written elsewhere)."""
    return set(root.rglob("*"))
