"""``flambeau package``: a .mar from a seed-002 model file (``handler = handler_factory(...)``)."""

from __future__ import annotations

import importlib
import io
import json
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from flambeau.archiver import open_model_archive
from flambeau.archiver.package import BASE_HANDLER_SHIM, PackageConfig, build_package, package_main

SEED_MODEL = """\
import torch


class MyNetworkBlock(torch.nn.Module):
    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.lin = torch.nn.Linear(in_dim, out_dim)

    def forward(self, x):
        return torch.relu(self.lin(x))


class MyNetwork(torch.nn.Module):
    def __init__(self, in_dim, layer_dims):
        super().__init__()
        prev_dim = in_dim
        for i, dim in enumerate(layer_dims):
            setattr(self, f"layer{i}", MyNetworkBlock(prev_dim, dim))
            prev_dim = dim
        self.num_layers = len(layer_dims)
        self.output_proj = torch.nn.Linear(layer_dims[-1], 10)

    def forward(self, x):
        for i in range(self.num_layers):
            x = getattr(self, f"layer{i}")(x)
        return self.output_proj(x)
"""

SEED_HANDLER_MODEL = """\
from base_handler import handler_factory
from seed_model import MyNetwork


def init_function(in_dim, layer_dims):
    return MyNetwork(in_dim, layer_dims)


def preprocess(data):
    return data


def postprocess(data):
    return data.argmax().item()


handler = handler_factory(init_function=init_function,
                          preprocess_function=preprocess,
                          postprocess_function=postprocess,
                          in_dim=4, layer_dims=[8, 6])
"""

# A stand-in for the helpers' base_handler, just enough to run the archive the way
# TorchServe's loader runs a function entry point: handler(None, ctx) to initialise, then
# handler(batch, ctx).
STANDIN_BASE_HANDLER = """\
import os

import torch


def handler_factory(init_function, preprocess_function, postprocess_function, **init_kwargs):
    state = {}

    def handler(data, context):
        if data is None:
            model_dir = context.system_properties["model_dir"]
            weights = os.path.join(model_dir, context.manifest["model"]["serializedFile"])
            model = init_function(**init_kwargs)
            model.load_state_dict(torch.load(weights, weights_only=True))
            state["model"] = model.eval()
            return None
        with torch.no_grad():
            return [postprocess_function(state["model"](torch.tensor(preprocess_function(row))))
                    for row in data]

    return handler
"""

CONFIG = """\
minWorkers: 1
maxWorkers: 1
batchSize: 4
maxBatchDelay: 4000
responseTimeout: 5200
deviceType: "gpu"
deviceIds: [0,1,2,3]
system:
  extraFiles: "src.tar.gz"
  maxGPUMemory: 500
"""


@pytest.fixture
def seed_project(tmp_path: Path) -> Path:
    """A seed-002 project: model code, the model file with the handler, config, requirements,
    a checkpoint of the model, and a source tarball."""
    torch = pytest.importorskip("torch")
    proj = tmp_path / "proj"
    (proj / "pkg").mkdir(parents=True)
    (proj / "seed_model.py").write_text(SEED_MODEL)
    (proj / "seed_handler_model.py").write_text(SEED_HANDLER_MODEL)
    (proj / "model-config.yaml").write_text(CONFIG)
    (proj / "requirements.txt").write_text("pyyaml\n")
    (proj / "pkg" / "util.py").write_text("X = 1\n")
    with tarfile.open(proj / "src.tar.gz", "w:gz") as tf:
        tf.add(proj / "pkg", arcname="pkg")
    namespace: dict[str, object] = {}
    exec(SEED_MODEL, namespace)
    torch.manual_seed(1)
    model = namespace["MyNetwork"](4, [8, 6])  # type: ignore[operator]
    torch.save(model.state_dict(), proj / "checkpoint.pth")
    return proj


def argv(proj: Path, out: Path, *extra: str, extra_files: str = "src.tar.gz") -> list[str]:
    return [
        "--model_name", "seed", "--version", "2.0",
        "--model_file", str(proj / "seed_handler_model.py"),
        "--config_file", str(proj / "model-config.yaml"),
        "--requirements_file", str(proj / "requirements.txt"),
        "--checkpoint_file", str(proj / "checkpoint.pth"),
        "--extra_files", ",".join(str(proj / f) for f in extra_files.split(",")),
        "--export_path", str(out), *extra,
    ]  # fmt: skip


def test_package_builds_the_mar(seed_project: Path, tmp_path: Path) -> None:
    assert package_main(argv(seed_project, tmp_path / "out")) == 0
    mar = tmp_path / "out" / "seed.mar"
    with zipfile.ZipFile(mar) as zf:
        names = set(zf.namelist())
        manifest = json.loads(zf.read("MAR-INF/MANIFEST.json"))
        shim = zf.read("base_handler.py").decode()
    assert names == {
        "seed_handler_model.py",
        "checkpoint.pth",
        "model-config.yaml",
        "requirements.txt",
        "src.tar.gz",
        "base_handler.py",
        "MAR-INF/MANIFEST.json",
    }
    assert manifest["model"] == {
        "modelName": "seed",
        "serializedFile": "checkpoint.pth",
        "handler": "seed_handler_model.py:handler",
        "modelVersion": "2.0",
        "requirementsFile": "requirements.txt",
        "configFile": "model-config.yaml",
    }
    assert shim == BASE_HANDLER_SHIM
    assert "from flambeau.handler import handler_factory" in shim

    archive = open_model_archive(mar, tmp_path / "tmp")
    assert archive.manifest.handler == "seed_handler_model.py:handler"
    assert archive.model_config["system"] == {"extraFiles": "src.tar.gz", "maxGPUMemory": 500}


@pytest.fixture
def clean_modules() -> Iterator[None]:
    names = ("seed_handler_model", "seed_model", "base_handler")
    yield
    for name in names:
        sys.modules.pop(name, None)


@pytest.mark.usefixtures("clean_modules")
def test_packaged_entry_point_runs_like_torchserve_loads_it(
    seed_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch = pytest.importorskip("torch")
    (seed_project / "base_handler.py").write_text(STANDIN_BASE_HANDLER)
    extras = "src.tar.gz,seed_model.py,base_handler.py"
    assert package_main(argv(seed_project, tmp_path / "out", extra_files=extras)) == 0
    archive = open_model_archive(tmp_path / "out" / "seed.mar", tmp_path / "tmp")
    assert (archive.model_dir / "base_handler.py").read_text() == STANDIN_BASE_HANDLER  # no shim

    # TorchServe's model_loader: "<module>.py:<function>" -> import module from model_dir,
    # call the function entry point with None to initialise.
    module_name, function = archive.manifest.handler.split(":")  # type: ignore[union-attr]
    monkeypatch.syspath_prepend(str(archive.model_dir))
    entry = getattr(importlib.import_module(module_name.removesuffix(".py")), function)
    context = SimpleNamespace(
        system_properties={"model_dir": str(archive.model_dir)}, manifest=archive.manifest.raw
    )
    assert entry(None, context) is None
    rows = [[0.1, 0.2, 0.3, 0.4], [1.0, -1.0, 0.5, 2.0]]

    namespace: dict[str, object] = {}
    exec(SEED_MODEL, namespace)
    reference = namespace["MyNetwork"](4, [8, 6])  # type: ignore[operator]
    reference.load_state_dict(torch.load(seed_project / "checkpoint.pth", weights_only=True))
    with torch.no_grad():
        expected = [reference(torch.tensor(r)).argmax().item() for r in rows]
    assert entry(rows, context) == expected


def test_model_file_importing_the_sdk_gets_no_shim(seed_project: Path, tmp_path: Path) -> None:
    model_file = seed_project / "seed_handler_model.py"
    model_file.write_text(
        model_file.read_text().replace("from base_handler", "from flambeau.handler")
    )
    out = build_package(
        PackageConfig(
            model_name="seed",
            model_file=str(model_file),
            version="1.0",
            checkpoint_file=str(seed_project / "checkpoint.pth"),
            export_path=str(tmp_path),
        )
    )
    with zipfile.ZipFile(out) as zf:
        assert set(zf.namelist()) == {
            "seed_handler_model.py",
            "checkpoint.pth",
            "MAR-INF/MANIFEST.json",
        }


def test_model_file_without_handler_instance(
    seed_project: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_file = seed_project / "seed_handler_model.py"
    model_file.write_text(
        model_file.read_text().replace("handler = handler_factory", "h = handler_factory")
    )
    assert package_main(argv(seed_project, tmp_path / "out")) == 1
    assert "defines no module-level 'handler'" in capsys.readouterr().err
    assert not (tmp_path / "out" / "seed.mar").exists()


def test_unsafe_tarball_is_refused(
    seed_project: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with tarfile.open(seed_project / "src.tar.gz", "w:gz") as tf:
        info = tarfile.TarInfo("../../escape.py")
        info.size = 1
        tf.addfile(info, io.BytesIO(b"x"))
    assert package_main(argv(seed_project, tmp_path / "out")) == 1
    assert "points outside the archive" in capsys.readouterr().err
    assert not (tmp_path / "out" / "seed.mar").exists()


def test_config_not_naming_the_tarball_warns(
    seed_project: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = seed_project / "model-config.yaml"
    config.write_text(
        config.read_text().replace('extraFiles: "src.tar.gz"', 'extraFiles: "other.tgz"')
    )
    dashed = [
        a.replace("_", "-") if a.startswith("--") else a for a in argv(seed_project, tmp_path)
    ]
    assert package_main(dashed) == 0  # the dashed spellings work too
    assert "system.extraFiles is 'other.tgz', so the handler will not unpack src.tar.gz" in (
        capsys.readouterr().err
    )


def test_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert package_main(["--model_name", "x"]) == 2
    assert "--model_file" in capsys.readouterr().err
    assert package_main(["--help"]) == 0
    assert "handler_factory" in capsys.readouterr().out
