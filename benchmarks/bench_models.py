"""The benchmark models (a small MLP and a small conv net, plain torch) and their archives.

Both servers load the very same ``.mar`` files: the handler imports TorchServe's BaseHandler
when ``ts`` is importable and flambeau's otherwise. Requests carry raw little-endian float32
tensors (``application/octet-stream``) so that neither server spends time parsing JSON.
"""

from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

MODEL_SOURCE = """
import torch
from torch import nn


class BenchMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                                 nn.Linear(256, 10))

    def forward(self, x):
        return self.net(x)


class BenchConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 48, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(48, 96, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(96, 192, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(192, 10)

    def forward(self, x):
        return self.head(torch.flatten(self.features(x), 1))
"""

HANDLER_SOURCE = """
import torch

try:  # the same archive runs under TorchServe and flambeau
    from ts.torch_handler.base_handler import BaseHandler
except ImportError:
    from flambeau.handler.base_handler import BaseHandler


class BenchHandler(BaseHandler):
    def preprocess(self, data):
        shape = tuple(self.context.model_yaml_config.get("inputShape", [64]))
        rows = [torch.frombuffer(bytearray(row.get("body") or row.get("data")), dtype=torch.float32)
                for row in data]
        return torch.stack(rows).reshape((len(rows), *shape))

    def postprocess(self, data):
        return [[round(v, 5) for v in row] for row in data.tolist()]
"""


@dataclass(frozen=True, slots=True)
class BenchModel:
    name: str
    module_class: str
    input_shape: tuple[int, ...]
    batch_size: int
    max_batch_delay_ms: int
    workers: int = 2

    @property
    def body_bytes(self) -> int:
        size = 4
        for dim in self.input_shape:
            size *= dim
        return size

    def instantiate(self) -> nn.Module:
        namespace: dict[str, object] = {}
        exec(compile(MODEL_SOURCE, "bench_model.py", "exec"), namespace)
        model = namespace[self.module_class]()
        assert isinstance(model, nn.Module)
        return model.eval()


MODELS = {
    "mlp_b1": BenchModel("mlp_b1", "BenchMLP", (64,), batch_size=1, max_batch_delay_ms=0),
    "mlp_b8": BenchModel("mlp_b8", "BenchMLP", (64,), batch_size=8, max_batch_delay_ms=5),
    "conv_b8": BenchModel("conv_b8", "BenchConv", (3, 32, 32), batch_size=8, max_batch_delay_ms=5),
}


def build_archive(model: BenchModel, store: Path) -> Path:
    """Write ``<store>/<name>.mar`` (deterministic weights) with flambeau's archiver."""
    from flambeau.archiver.cli import archive_main

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_file = work / "bench_model.py"
        # BaseHandler loads the single nn.Module class of the model file: keep only ours.
        drop = "BenchConv" if model.module_class == "BenchMLP" else "BenchMLP"
        model_file.write_text(_without_class(MODEL_SOURCE, drop))
        weights = work / "weights.pt"
        torch.save(model.instantiate().state_dict(), weights)
        handler = work / "bench_handler.py"
        handler.write_text(HANDLER_SOURCE)
        config = work / "model-config.yaml"
        config.write_text(
            f"minWorkers: {model.workers}\nmaxWorkers: {model.workers}\n"
            f"batchSize: {model.batch_size}\nmaxBatchDelay: {model.max_batch_delay_ms}\n"
            f"responseTimeout: 60\ninputShape: {json.dumps(list(model.input_shape))}\n"
        )
        store.mkdir(parents=True, exist_ok=True)
        code = archive_main(
            [
                "--model-name",
                model.name,
                "--version",
                "1.0",
                "--model-file",
                str(model_file),
                "--serialized-file",
                str(weights),
                "--handler",
                str(handler),
                "--config-file",
                str(config),
                "--export-path",
                str(store),
                "--force",
            ]
        )
    if code != 0:
        raise SystemExit(f"archiving {model.name} failed")
    return store / f"{model.name}.mar"


def _without_class(source: str, name: str) -> str:
    start = source.index(f"class {name}")
    rest = source.find("\nclass ", start + 1)
    return source[:start] + (source[rest + 1 :] if rest != -1 else "")


def request_body(model: BenchModel) -> bytes:
    torch.manual_seed(1)
    return torch.randn(model.input_shape).numpy().astype("<f4").tobytes()


def raw_ceiling(model: BenchModel, seconds: float = 3.0) -> float:
    """Requests/s of the bare model in this process at the model's batch size: the ceiling."""
    import time

    net = model.instantiate()
    batch = torch.randn((model.batch_size, *model.input_shape))
    with torch.inference_mode():
        for _ in range(20):
            net(batch)
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            net(batch)
            done += model.batch_size
    return done / (time.perf_counter() - start)


if __name__ == "__main__":
    for bench_model in MODELS.values():
        print(build_archive(bench_model, Path(sys.argv[1] if len(sys.argv) > 1 else "store")))
