"""handler_factory (seed 002): extra-files tarball, init kwargs, checkpoint, per-sample steps."""

from __future__ import annotations

import io
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
from handler_testlib import body, json_request, namespace_of, spec, write, write_manifest

from flambeau.handler.deps import (
    PackageInstallError,
    UnsafeArchiveError,
    install_packages,
    unpack_dependencies,
)
from flambeau.handler.factory import FactoryHandler, handler_factory

# Seed 002's model, shipped inside the extra-files tarball.
NETWORK_SOURCE = """
import torch

from extras.blocks import MyNetworkBlock


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

BLOCK_SOURCE = """
import torch


class MyNetworkBlock(torch.nn.Module):
    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.lin = torch.nn.Linear(in_dim, out_dim)

    def forward(self, x):
        return torch.relu(self.lin(x))
"""

HANDLER_MODEL = """
import torch

from model import MyNetwork  # unpacked from src.tar.gz before this module is imported
from flambeau.handler import handler_factory

HOOK_CALLS = []


def init_function(in_dim, layer_dims):
    return MyNetwork(in_dim, layer_dims)


def preprocess(data):
    return torch.as_tensor(data, dtype=torch.float32)  # one sample, no batch dimension


def postprocess(output):
    probs = output.softmax(0)
    class_id = int(probs.argmax())
    return {"class_id": class_id, "score": float(probs[class_id]), "probs": probs.tolist()}


def unpack_dependencies(model_dir):
    HOOK_CALLS.append(("unpack", model_dir))


def install_packages():
    HOOK_CALLS.append(("install",))


handler = handler_factory(
    init_function=init_function,
    preprocess_function=preprocess,
    postprocess_function=postprocess,
    install_packages=install_packages,
    unpack_dependencies=unpack_dependencies,
    in_dim=4,
)
"""

CONFIG = """
batchSize: 4
system:
  extraFiles: "src.tar.gz"
  initKwargs:
    layer_dims: [8, 6]
  installRequirements: true
"""

SAMPLES = [[0.1, 0.2, 0.3, 0.4], [1.0, -1.0, 0.5, 2.0], [-0.5, 0.0, 3.0, 1.0]]


def _tarball(path: Path, files: dict[str, str]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _reference_network(seed: int = 3) -> torch.nn.Module:
    block_ns = namespace_of(BLOCK_SOURCE)
    net_ns = namespace_of(NETWORK_SOURCE.replace("from extras.blocks import MyNetworkBlock", ""))
    net_ns["MyNetworkBlock"] = block_ns["MyNetworkBlock"]
    torch.manual_seed(seed)
    return net_ns["MyNetwork"](4, [8, 6]).eval()


def _seed_model_dir(
    root: Path, *, checkpoint_wrapper: str | None = None
) -> tuple[Path, torch.nn.Module]:
    model_dir = root / "seed002"
    model_dir.mkdir()
    _tarball(
        model_dir / "src.tar.gz",
        {"model.py": NETWORK_SOURCE, "extras/__init__.py": "", "extras/blocks.py": BLOCK_SOURCE},
    )
    write(model_dir / "handler_model.py", HANDLER_MODEL)
    write(model_dir / "model-config.yaml", CONFIG)
    write(model_dir / "requirements.txt", "# everything is in the base image\n")
    reference = _reference_network()
    state = reference.state_dict()
    if checkpoint_wrapper:
        state = {checkpoint_wrapper: {f"module.{k}": v for k, v in state.items()}, "epoch": 3}
    torch.save(state, model_dir / "checkpoint.pth")
    write_manifest(
        model_dir,
        handler="handler_model.py:handler",
        serializedFile="checkpoint.pth",
        configFile="model-config.yaml",
        requirementsFile="requirements.txt",
    )
    return model_dir, reference


@pytest.mark.parametrize("wrapper", [None, "state_dict"], ids=["plain", "wrapped-checkpoint"])
def test_seed_002_model_batches_and_matches_the_network(tmp_path: Path, load_service, wrapper):
    model_dir, reference = _seed_model_dir(tmp_path, checkpoint_wrapper=wrapper)
    service = load_service(spec(model_dir, "handler_model.py:handler", batch_size=4))
    handler = service.handler
    assert isinstance(handler, FactoryHandler)
    assert handler.initialized
    assert (model_dir / "extras" / "blocks.py").is_file()  # unpacked, structure kept
    assert (model_dir / ".flambeau-requirements.sha256").is_file()  # empty requirements: no pip
    import handler_model

    assert [("unpack", str(model_dir)), ("install",)] == handler_model.HOOK_CALLS

    shapes: list[tuple[int, ...]] = []
    handler.model.register_forward_pre_hook(lambda _m, args: shapes.append(tuple(args[0].shape)))
    result = service.predict([json_request(f"r{i}", s) for i, s in enumerate(SAMPLES)])

    assert result.code == 200
    assert shapes == [(3, 4)]  # one batched forward for three requests
    with torch.no_grad():
        expected = reference(torch.tensor(SAMPLES)).softmax(1)
    outputs = [body(r) for r in result.responses]
    for out, probs in zip(outputs, expected, strict=True):
        assert out["class_id"] == int(probs.argmax())
        assert out["score"] == pytest.approx(float(probs.max()), abs=1e-6)
        assert torch.allclose(torch.tensor(out["probs"]), probs, atol=1e-6)
    assert outputs[0]["probs"] != outputs[1]["probs"]
    assert {m.name for m in service.drain_metrics()} >= {"HandlerTime", "PredictionTime"}


def test_config_init_kwargs_override_the_factory_ones(tmp_path: Path, load_service):
    model_dir, _ = _seed_model_dir(tmp_path)
    config = {"system": {"extraFiles": ["src.tar.gz"], "initKwargs": {"layer_dims": [5]}}}
    with pytest.raises(Exception, match="size mismatch"):
        # The checkpoint was saved for layer_dims [8, 6]: strict loading catches the change.
        load_service(spec(model_dir, "handler_model:handler", model_yaml_config=config))
    config["system"]["strictLoad"] = False
    config["system"]["checkpoint"] = "none.pth"
    torch.save({}, model_dir / "none.pth")
    service = load_service(spec(model_dir, "handler_model:handler", model_yaml_config=config))
    assert service.handler.model.layer0.lin.out_features == 5


SUM_MODEL = """
import torch

from flambeau.handler.factory import handler_factory


class Scale(torch.nn.Module):
    def __init__(self, factor):
        super().__init__()
        self.factor = torch.nn.Parameter(torch.tensor(float(factor)))

    def forward(self, x):
        return x.sum(dim=-1) * self.factor


handler = handler_factory(Scale, init_kwargs={"factor": 2})
"""


def test_defaults_and_variable_shapes_run_per_sample(tmp_path: Path, load_service):
    model_dir = tmp_path / "sum"
    write(model_dir / "sum_model.py", SUM_MODEL)
    service = load_service(spec(model_dir, "sum_model"))  # the module's one factory handler
    calls: list[tuple[int, ...]] = []
    service.handler.model.register_forward_pre_hook(lambda _m, a: calls.append(tuple(a[0].shape)))

    result = service.predict(
        [json_request("a", [1.0, 2.0]), json_request("b", [1.0, 2.0, 3.0]), json_request("c", 4.0)]
    )

    assert [body(r) for r in result.responses] == [6.0, 12.0, 8.0]
    assert calls == [(1, 2), (1, 3), (1,)]
    batched = service.predict([json_request("a", [1.0, 1.0]), json_request("b", [2.0, 2.0])])
    assert [body(r) for r in batched.responses] == [4.0, 8.0]
    assert calls[-1] == (2, 2)


def test_factory_handler_used_directly():
    from flambeau.handler.context import Context

    handler = handler_factory(torch.nn.Identity)
    context = Context("m", "/nonexistent", None, 1, None, "v")
    assert handler(None, context) is None
    assert handler.initialized
    context.request_processor = []
    assert handler([{"data": [1.0, 2.0]}, {"body": b"[3.0]"}], context) == [[1.0, 2.0], [3.0]]
    with pytest.raises(TypeError, match=r"nn\.Module"):
        handler_factory(lambda: "not a module")(None, context)


# ---- unpack_dependencies -------------------------------------------------------------------


def test_unpack_is_idempotent_and_handles_zip(tmp_path: Path):
    dest = tmp_path / "dest"
    _tarball(tmp_path / "a.tgz", {"pkg/a.py": "A = 1\n"})
    with zipfile.ZipFile(tmp_path / "b.zip", "w") as zf:
        zf.writestr("data/b.txt", "bee")
    done = unpack_dependencies(f"{tmp_path / 'a.tgz'}, {tmp_path / 'b.zip'}", dest)
    assert [p.name for p in done] == ["a.tgz", "b.zip"]
    assert (dest / "pkg" / "a.py").read_text() == "A = 1\n"
    assert (dest / "data" / "b.txt").read_text() == "bee"
    assert unpack_dependencies([tmp_path / "a.tgz", tmp_path / "b.zip"], dest) == []
    assert len(unpack_dependencies(tmp_path / "a.tgz", dest, force=True)) == 1


def _evil_tar(path: Path, member: tarfile.TarInfo, data: bytes = b"x") -> None:
    with tarfile.open(path, "w") as tar:
        member.size = len(data) if member.isfile() else 0
        tar.addfile(member, io.BytesIO(data) if member.isfile() else None)


def _link(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    return info


@pytest.mark.parametrize(
    "member",
    [
        tarfile.TarInfo("../escape.py"),
        tarfile.TarInfo("/etc/evil.py"),
        tarfile.TarInfo("ok/../../escape.py"),
        _link("link", "../../outside"),
        _link("abs_link", "/etc/passwd"),
    ],
    ids=["dotdot", "absolute", "nested-dotdot", "symlink-out", "symlink-absolute"],
)
def test_unpack_refuses_members_escaping_the_model_dir(tmp_path: Path, member):
    dest = tmp_path / "models" / "m"
    _evil_tar(tmp_path / "evil.tar", member)
    with pytest.raises(UnsafeArchiveError):
        unpack_dependencies(tmp_path / "evil.tar", dest)
    assert not (tmp_path / "escape.py").exists()
    assert not (tmp_path / "models" / "escape.py").exists()
    assert not any(p.name in ("link", "abs_link") for p in dest.iterdir())


def test_unpack_refuses_zip_slip_and_missing_files(tmp_path: Path):
    with zipfile.ZipFile(tmp_path / "evil.zip", "w") as zf:
        zf.writestr("../../evil.txt", "x")
    with pytest.raises(UnsafeArchiveError):
        unpack_dependencies(tmp_path / "evil.zip", tmp_path / "dest")
    with pytest.raises(FileNotFoundError, match=r"missing\.tar\.gz"):
        unpack_dependencies("missing.tar.gz", tmp_path / "dest")


# ---- install_packages ----------------------------------------------------------------------


class FakePip:
    def __init__(self, returncode: int = 0) -> None:
        self.returncode = returncode
        self.calls: list[list[str]] = []

    def __call__(self, cmd, **kwargs) -> subprocess.CompletedProcess[str]:
        self.calls.append(cmd)
        return subprocess.CompletedProcess(cmd, self.returncode, "out", "ERROR: no such package")


def test_install_packages_runs_pip_once_per_requirements_content(tmp_path: Path):
    req = write(tmp_path / "requirements.txt", "tiny-package==1.0\n")
    target = tmp_path / "model"
    pip = FakePip()
    assert install_packages(req, target, python="/py", runner=pip) is True
    assert pip.calls == [
        [
            "/py",
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "--no-input",
            "-U",
            "-t",
            str(target.resolve()),
            "-r",
            str(req.resolve()),
        ]
    ]
    assert install_packages(req, target, runner=pip) is False  # already done
    req.write_text("tiny-package==2.0\n")
    assert install_packages(req, target, runner=pip) is True  # content changed
    assert len(pip.calls) == 2


def test_install_packages_skips_empty_files_and_reports_failures(tmp_path: Path):
    pip = FakePip(returncode=1)
    empty = write(tmp_path / "empty.txt", "# comment only\n\n")
    assert install_packages(empty, tmp_path / "a", runner=pip) is False
    assert pip.calls == []
    req = write(tmp_path / "req.txt", "nope\n")
    with pytest.raises(PackageInstallError, match="no such package"):
        install_packages(req, tmp_path / "b", runner=pip)
    assert not (tmp_path / "b" / ".flambeau-requirements.sha256").exists()
