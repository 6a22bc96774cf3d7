"""Builders for the handler tests: model directories on disk and worker requests."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import torch

from flambeau.api import ModelLoadSpec, RequestInput, WorkerRequest, WorkerResponse

MLP_SOURCE = """
import torch
from torch import nn


class TinyMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))
"""

# A BaseHandler subclass overriding preprocess/postprocess (TorchServe style).
MLP_CLASS_HANDLER = """
import torch

from flambeau.handler.base_handler import BaseHandler


class MLPHandler(BaseHandler):
    def preprocess(self, data):
        rows = [row["data"] if "data" in row else row["body"] for row in data]
        return torch.as_tensor(rows, dtype=torch.float32)

    def postprocess(self, data):
        rows = data.tolist()
        return [{"logits": row, "argmax": max(range(3), key=row.__getitem__)} for row in rows]

    def describe_handle(self):
        return {"kind": "mlp", "device": str(self.device)}

    def get_insights(self, tensor_data, raw_data, target=0):
        return [{"target": target, "shape": list(row.shape)} for row in tensor_data]
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def write_manifest(model_dir: Path, **model: str) -> dict[str, Any]:
    manifest = {"runtime": "python", "model": {"modelName": model_dir.name, **model}}
    write(model_dir / "MAR-INF" / "MANIFEST.json", json.dumps(manifest, indent=2))
    return manifest


def namespace_of(source: str) -> dict[str, Any]:
    """Execute model source text the way a test can compare against it."""
    namespace: dict[str, Any] = {}
    exec(compile(textwrap.dedent(source), "<model source>", "exec"), namespace)
    return namespace


def make_mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return namespace_of(MLP_SOURCE)["TinyMLP"]().eval()


def make_mlp_dir(
    root: Path,
    name: str = "mlp",
    *,
    handler: str = "mlp_handler.py",
    seed: int = 0,
    torchscript: bool = False,
) -> tuple[Path, torch.nn.Module]:
    """A model dir holding the TinyMLP (eager state_dict + model.py, or TorchScript)."""
    model_dir = root / name
    model_dir.mkdir(parents=True)
    model = make_mlp(seed)
    write(model_dir / "mlp_handler.py", MLP_CLASS_HANDLER)
    if torchscript:
        torch.jit.trace(model, torch.zeros(1, 4)).save(str(model_dir / "traced.pt"))
        write_manifest(model_dir, handler=handler, serializedFile="traced.pt")
    else:
        write(model_dir / "model.py", MLP_SOURCE)
        torch.save(model.state_dict(), model_dir / "weights.pt")
        write_manifest(
            model_dir, handler=handler, serializedFile="weights.pt", modelFile="model.py"
        )
    return model_dir, model


def spec(model_dir: Path, handler: str, **kwargs: Any) -> ModelLoadSpec:
    kwargs.setdefault("model_name", model_dir.name)
    return ModelLoadSpec(model_version="1.0", model_dir=str(model_dir), handler=handler, **kwargs)


def json_request(
    request_id: str, payload: Any, *, name: str = "body", headers: dict[str, str] | None = None
) -> WorkerRequest:
    return WorkerRequest(
        request_id=request_id,
        headers=dict(headers or {}),
        inputs=[RequestInput(name, json.dumps(payload).encode(), "application/json")],
    )


def raw_request(
    request_id: str,
    value: bytes,
    content_type: str = "",
    *,
    name: str = "body",
    headers: dict[str, str] | None = None,
) -> WorkerRequest:
    return WorkerRequest(
        request_id=request_id,
        headers=dict(headers or {}),
        inputs=[RequestInput(name, value, content_type)],
    )


def body(response: WorkerResponse) -> Any:
    return json.loads(response.body)
