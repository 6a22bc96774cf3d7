"""Our model and workflow archivers: round trips in every format and the flag semantics."""

from __future__ import annotations

import argparse
import json
import os
import zipfile
from datetime import datetime
from pathlib import Path

import pytest
from archiver_support import ModelInputs, files_under

from flambeau.archiver import (
    ArchiverError,
    ModelArchiverConfig,
    WorkflowArchiverConfig,
    generate_model_archive,
    generate_workflow_archive,
    open_model_archive,
)
from flambeau.archiver.manifest import dumps, handler_file, model_manifest, valid_name

FORMATS = ["default", "zip-store", "tgz", "no-archive"]


def config_for(m: ModelInputs, export: Path, **overrides: object) -> ModelArchiverConfig:
    values: dict[str, object] = {
        "model_name": "tiny",
        "version": "1.0",
        "handler": str(m.handler),
        "model_file": str(m.model_file),
        "serialized_file": str(m.weights),
        "extra_files": f"{m.extra_dir},{m.labels}",
        "requirements_file": str(m.requirements),
        "config_file": str(m.config),
        "export_path": str(export),
    }
    values.update(overrides)
    return ModelArchiverConfig(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_every_format(tmp_path: Path, model_inputs: ModelInputs, fmt: str) -> None:
    out = generate_model_archive(config_for(model_inputs, tmp_path / "store", archive_format=fmt))
    assert out.name == {"tgz": "tiny.tar.gz", "no-archive": "tiny"}.get(fmt, "tiny.mar")

    archive = open_model_archive(out, tmp_path / "tmp")
    assert files_under(archive.model_dir) == {
        "MAR-INF/MANIFEST.json",
        "tiny_model.py",
        "tiny.pt",
        "tiny_handler.py",
        "requirements.txt",
        "model-config.yaml",
        "index_to_name.json",
        "tokenizer.json",
        ".hidden.txt",
        "vocab/words.txt",
    }
    assert archive.manifest.model_name == "tiny"
    assert archive.manifest.handler == "tiny_handler.py"
    assert archive.model_config["maxWorkers"] == 2
    assert (archive.model_dir / "tiny.pt").read_bytes() == model_inputs.weights.read_bytes()
    # no staging leftovers next to the output
    assert [p.name for p in out.parent.iterdir()] == [out.name]


def test_weights_survive_round_trip(tmp_path: Path, model_inputs: ModelInputs) -> None:
    torch = pytest.importorskip("torch")
    out = generate_model_archive(config_for(model_inputs, tmp_path))
    archive = open_model_archive(out, tmp_path / "tmp")
    loaded = torch.load(archive.model_dir / "tiny.pt", weights_only=True)
    original = torch.load(model_inputs.weights, weights_only=True)
    assert loaded.keys() == original.keys() == {"fc.weight", "fc.bias"}
    assert all(torch.equal(loaded[k], original[k]) for k in loaded)


def test_manifest_layout_is_the_real_tools() -> None:
    manifest = model_manifest(
        model_name="mnist",
        handler="src/mnist_handler.py",
        version="1.0",
        serialized_file="/w/mnist_cnn.pt",
        model_file="src/mnist.py",
        requirements_file="requirements.txt",
        config_file="conf/model-config.yaml",
        now=datetime(2026, 11, 21, 21, 0, 0),
    )
    assert dumps(manifest) == (
        "{\n"
        '  "createdOn": "21/11/2026 21:00:00",\n'
        '  "runtime": "python",\n'
        '  "model": {\n'
        '    "modelName": "mnist",\n'
        '    "serializedFile": "mnist_cnn.pt",\n'
        '    "handler": "mnist_handler.py",\n'
        '    "modelFile": "mnist.py",\n'
        '    "modelVersion": "1.0",\n'
        '    "requirementsFile": "requirements.txt",\n'
        '    "configFile": "model-config.yaml"\n'
        "  },\n"
        '  "archiverVersion": "0.12.0"\n'
        "}"
    )


@pytest.mark.parametrize(
    ("handler", "runtime", "expected"),
    [
        ("image_classifier", "python", None),
        ("h.py", "python", "h.py"),
        ("dir/h", "python", "dir/h.py"),
        ("dir/h:fn", "python3", "dir/h.py"),
        ("dir/h.py:fn", "python", "dir/h.py"),  # the real 0.12 tool crashes on this one
        ("BaseHandler", "LSP", None),
        ("libh", "LSP", "libh.so"),
        ("libh.so", "LSP", "libh.so"),
    ],
)
def test_handler_file_resolution(handler: str, runtime: str, expected: str | None) -> None:
    assert handler_file(handler, runtime) == expected


@pytest.mark.parametrize(
    ("name", "ok"), [("a", True), ("Model-1.2_x", True), ("-a", False), ("a b", False), ("", False)]
)
def test_model_name_pattern(name: str, ok: bool) -> None:
    assert valid_name(name) is ok


def test_handler_with_function_copies_the_file(tmp_path: Path, model_inputs: ModelInputs) -> None:
    cfg = config_for(
        model_inputs, tmp_path, handler=f"{model_inputs.handler}:handle", extra_files=None
    )
    out = generate_model_archive(cfg)
    with zipfile.ZipFile(out) as zf:
        assert "tiny_handler.py" in zf.namelist()
        assert json.loads(zf.read("MAR-INF/MANIFEST.json"))["model"]["handler"] == (
            "tiny_handler.py:handle"
        )


def test_builtin_handler_is_not_copied(tmp_path: Path) -> None:
    out = generate_model_archive(
        ModelArchiverConfig(
            model_name="ic", version="1", handler="image_classifier", export_path=str(tmp_path)
        )
    )
    with zipfile.ZipFile(out) as zf:
        assert zf.namelist() == ["MAR-INF/MANIFEST.json"]


def test_export_path_is_created(tmp_path: Path, model_inputs: ModelInputs) -> None:
    out = generate_model_archive(config_for(model_inputs, tmp_path / "a" / "b"))
    assert out == tmp_path / "a" / "b" / "tiny.mar"
    assert out.is_file()


def test_export_path_that_is_a_file_is_refused(tmp_path: Path, model_inputs: ModelInputs) -> None:
    (tmp_path / "f").write_text("")
    with pytest.raises(ArchiverError, match="is not a directory"):
        generate_model_archive(config_for(model_inputs, tmp_path / "f"))


def test_default_export_path_is_cwd_at_call_time(
    tmp_path: Path, model_inputs: ModelInputs, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    out = generate_model_archive(config_for(model_inputs, tmp_path, export_path=None))
    assert out.resolve() == (tmp_path / "tiny.mar").resolve()


def test_existing_output_needs_force(tmp_path: Path, model_inputs: ModelInputs) -> None:
    cfg = config_for(model_inputs, tmp_path)
    first = generate_model_archive(cfg)
    stamp = first.stat().st_mtime_ns
    with pytest.raises(ArchiverError, match="already exists"):
        generate_model_archive(cfg)
    assert first.stat().st_mtime_ns == stamp  # untouched
    generate_model_archive(config_for(model_inputs, tmp_path, force=True, extra_files=None))
    with zipfile.ZipFile(first) as zf:
        assert "tokenizer.json" not in zf.namelist()


def test_forced_no_archive_replaces_the_directory(
    tmp_path: Path, model_inputs: ModelInputs
) -> None:
    out = generate_model_archive(config_for(model_inputs, tmp_path, archive_format="no-archive"))
    (out / "stale.txt").write_text("from an earlier build")
    generate_model_archive(
        config_for(model_inputs, tmp_path, archive_format="no-archive", force=True)
    )
    assert not (out / "stale.txt").exists()
    assert (out / "MAR-INF" / "MANIFEST.json").is_file()


def test_failure_leaves_nothing_behind(tmp_path: Path, model_inputs: ModelInputs) -> None:
    export = tmp_path / "store"
    cfg = config_for(model_inputs, export, extra_files=f"{model_inputs.labels},missing.txt")
    with pytest.raises(ArchiverError, match=r"File does not exist: missing\.txt"):
        generate_model_archive(cfg)
    assert list(export.iterdir()) == []


@pytest.mark.parametrize(
    "field", ["serialized_file", "model_file", "requirements_file", "config_file"]
)
def test_missing_input_files_are_reported(
    tmp_path: Path, model_inputs: ModelInputs, field: str
) -> None:
    cfg = config_for(model_inputs, tmp_path, **{field: str(tmp_path / "absent.bin")})
    with pytest.raises(ArchiverError, match=r"does not exist: .*absent\.bin"):
        generate_model_archive(cfg)


def test_missing_handler_file(tmp_path: Path, model_inputs: ModelInputs) -> None:
    with pytest.raises(ArchiverError, match=r"Handler file does not exist: nothere\.py"):
        generate_model_archive(config_for(model_inputs, tmp_path, handler="nothere"))


def test_invalid_values_from_code_are_refused(tmp_path: Path, model_inputs: ModelInputs) -> None:
    with pytest.raises(ArchiverError, match="Invalid RuntimeType value: java"):
        generate_model_archive(config_for(model_inputs, tmp_path, runtime="java"))
    with pytest.raises(ArchiverError, match="special characters"):
        generate_model_archive(config_for(model_inputs, tmp_path, model_name="../x"))


def test_extra_files_globs_and_filters(tmp_path: Path, model_inputs: ModelInputs) -> None:
    assets = model_inputs.extra_dir
    cfg = config_for(
        model_inputs, tmp_path / "o", extra_files=f"{assets}/*, {model_inputs.labels},"
    )
    with zipfile.ZipFile(generate_model_archive(cfg)) as zf:
        names = set(zf.namelist())
    # 'assets/*' matches tokenizer.json and vocab/ (whose contents land at the root) but not
    # the dot-dirs; '__pycache__' matched by the pattern is skipped (the real tool copies it).
    assert {"tokenizer.json", "words.txt", "index_to_name.json"} <= names
    assert not {n for n in names if n.endswith(".pyc") or n in {"HEAD", ".hidden.txt"}}


def test_unmatched_glob_only_warns(
    tmp_path: Path, model_inputs: ModelInputs, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = config_for(model_inputs, tmp_path, extra_files=f"{model_inputs.root}/*.nothing")
    generate_model_archive(cfg)
    assert "did not match any file" in caplog.text


def test_file_and_directory_clash_is_refused(tmp_path: Path, model_inputs: ModelInputs) -> None:
    (model_inputs.root / "vocab").write_text("a file named like the assets' vocab/ dir")
    cfg = config_for(
        model_inputs,
        tmp_path / "o",
        extra_files=f"{model_inputs.extra_dir},{model_inputs.root / 'vocab'}",
    )
    with pytest.raises(ArchiverError, match="vocab is both a file and a directory"):
        generate_model_archive(cfg)


def test_output_inside_extra_dir_is_not_archived(tmp_path: Path, model_inputs: ModelInputs) -> None:
    cfg = config_for(model_inputs, model_inputs.extra_dir, extra_files=str(model_inputs.extra_dir))
    generate_model_archive(cfg)
    out = generate_model_archive(
        config_for(
            model_inputs,
            model_inputs.extra_dir,
            extra_files=str(model_inputs.extra_dir),
            force=True,
        )
    )
    with zipfile.ZipFile(out) as zf:
        assert "tiny.mar" not in zf.namelist()


def test_config_from_argparse_namespace() -> None:
    ns = argparse.Namespace(
        model_name="m", handler="h", version="1", serialized_file=None, model_file=None,
        extra_files=None, runtime="python", export_path="e", archive_format="tgz",
        force=True, requirements_file=None, config_file=None,
    )  # fmt: skip
    cfg = ModelArchiverConfig.from_args(ns)
    assert (cfg.model_name, cfg.archive_format, cfg.force, cfg.export_path) == (
        "m",
        "tgz",
        True,
        "e",
    )


def test_workflow_round_trip(tmp_path: Path, model_inputs: ModelInputs) -> None:
    spec = model_inputs.root / "wf.yaml"
    spec.write_text("models:\n  m:\n    url: m.mar\ndag:\n  m: []\n")
    out = generate_workflow_archive(
        WorkflowArchiverConfig(
            workflow_name="wf",
            spec_file=str(spec),
            handler=str(model_inputs.handler),
            export_path=str(tmp_path / "wars"),
            extra_files=str(model_inputs.extra_dir),
        )
    )
    with zipfile.ZipFile(out) as zf:
        assert {"wf.yaml", "tiny_handler.py", "tokenizer.json", "vocab/words.txt"} <= set(
            zf.namelist()
        )
        assert json.loads(zf.read("WAR-INF/MANIFEST.json"))["workflow"] == {
            "workflowName": "wf",
            "specFile": "wf.yaml",
            "handler": "tiny_handler.py",
        }
    with pytest.raises(ArchiverError, match="Workflow name contains special characters"):
        generate_workflow_archive(
            WorkflowArchiverConfig(workflow_name="w f", spec_file=str(spec), handler="h.py")
        )


def test_archive_files_are_world_readable_like_any_new_file(
    tmp_path: Path, model_inputs: ModelInputs
) -> None:
    old = os.umask(0o022)
    try:
        out = generate_model_archive(config_for(model_inputs, tmp_path))
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o644
