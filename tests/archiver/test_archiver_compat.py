"""Differential tests: our archivers against the real torch-model-archiver 0.12 and
torch-workflow-archiver 0.2.15, on the same inputs, in every format."""

from __future__ import annotations

import json
import tarfile
import zipfile
from pathlib import Path

import pytest
from archiver_support import ModelInputs, files_under, run_real

from flambeau.archiver import open_model_archive, open_workflow_archive
from flambeau.archiver.cli import archive_main, archive_workflow_main

SUFFIX = {"default": ".mar", "zip-store": ".mar", "tgz": ".tar.gz", "no-archive": ""}


def listing(path: Path, fmt: str) -> dict[str, bytes]:
    """Member name -> content of an archive in any format (directories left out)."""
    if fmt == "no-archive":
        return {name: (path / name).read_bytes() for name in files_under(path)}
    if fmt == "tgz":
        with tarfile.open(path) as tf:
            out: dict[str, bytes] = {}
            for m in tf.getmembers():
                f = tf.extractfile(m) if m.isfile() else None
                if f is not None:
                    out[m.name] = f.read()
            return out
    with zipfile.ZipFile(path) as zf:
        return {n: zf.read(n) for n in zf.namelist() if not n.endswith("/")}


def manifest_entry(fmt: str, name: str) -> str:
    return f"{name}/MAR-INF/MANIFEST.json" if fmt == "tgz" else "MAR-INF/MANIFEST.json"


def without_created_on(text: bytes) -> tuple[dict[str, object], str]:
    """The manifest dict minus createdOn, and its text with the stamp blanked (layout check)."""
    data = json.loads(text)
    stamp = data.pop("createdOn")
    return data, text.decode().replace(stamp, "<stamp>")


def build_both(tmp_path: Path, args: list[str], fmt: str, name: str) -> tuple[Path, Path]:
    real_dir, our_dir = tmp_path / "real", tmp_path / "ours"
    real_dir.mkdir()  # the real tool refuses a missing export path
    common = ["--model-name", name, "--archive-format", fmt, *args]
    proc = run_real("torch-model-archiver", *common, "--export-path", real_dir, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert archive_main([*common, "--export-path", str(our_dir)]) == 0
    return real_dir / f"{name}{SUFFIX[fmt]}", our_dir / f"{name}{SUFFIX[fmt]}"


def full_args(m: ModelInputs) -> list[str]:
    return [
        "--version",
        "1.0",
        "--model-file",
        str(m.model_file),
        "--serialized-file",
        str(m.weights),
        "--handler",
        str(m.handler),
        "--extra-files",
        f"{m.extra_dir},{m.labels}",
        "-r",
        str(m.requirements),
        "-c",
        str(m.config),
    ]


@pytest.mark.parametrize("fmt", ["default", "zip-store", "tgz", "no-archive"])
def test_same_files_and_manifest_as_real_tool(
    tmp_path: Path, model_inputs: ModelInputs, fmt: str
) -> None:
    real, ours = build_both(tmp_path, full_args(model_inputs), fmt, "tiny")
    real_files, our_files = listing(real, fmt), listing(ours, fmt)

    assert set(our_files) == set(real_files)
    entry = manifest_entry(fmt, "tiny")
    real_manifest, real_text = without_created_on(real_files.pop(entry))
    our_manifest, our_text = without_created_on(our_files.pop(entry))
    assert our_manifest == real_manifest
    assert our_text == real_text  # same key order, indent and (absent) trailing newline
    assert our_files == real_files  # identical contents too
    # The hidden file is kept, the skipped directories are not: pinned, not just compared.
    prefix = "tiny/" if fmt == "tgz" else ""
    assert f"{prefix}.hidden.txt" in our_files
    assert f"{prefix}vocab/words.txt" in our_files
    assert not any("__pycache__" in n or ".git/" in n or ".cache" in n for n in our_files)
    if fmt == "zip-store":
        with zipfile.ZipFile(ours) as zf:
            assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_STORED}


@pytest.mark.parametrize(
    ("case", "args"),
    [
        ("builtin-handler", ["-v", "2.0", "--handler", "image_classifier"]),
        ("bare-module-function", ["-v", "1", "--handler", "{src}/tiny_handler:handle"]),
        (
            "glob",
            ["-v", "1", "--handler", "{src}/tiny_handler.py", "--extra-files", "{src}/*.json"],
        ),
        ("python3", ["-v", "1", "--runtime", "python3", "--handler", "base_handler"]),
        (
            "weights-only",
            ["-v", "3", "--handler", "text_classifier", "--serialized-file", "{src}/tiny.pt"],
        ),
    ],
)
def test_flag_variants_match_real_tool(
    tmp_path: Path, model_inputs: ModelInputs, case: str, args: list[str]
) -> None:
    args = [a.format(src=model_inputs.root) for a in args]
    real, ours = build_both(tmp_path, args, "default", f"v-{case}")
    real_files, our_files = listing(real, "default"), listing(ours, "default")
    assert set(our_files) == set(real_files)
    real_manifest, _ = without_created_on(real_files["MAR-INF/MANIFEST.json"])
    our_manifest, _ = without_created_on(our_files["MAR-INF/MANIFEST.json"])
    assert our_manifest == real_manifest


@pytest.mark.parametrize("fmt", ["default", "zip-store", "tgz", "no-archive"])
def test_reader_opens_real_tool_archives(
    tmp_path: Path, model_inputs: ModelInputs, fmt: str
) -> None:
    real_dir = tmp_path / "real"
    real_dir.mkdir()
    args = ["--model-name", "tiny", "--archive-format", fmt, *full_args(model_inputs)]
    proc = run_real("torch-model-archiver", *args, "--export-path", real_dir)
    assert proc.returncode == 0, proc.stderr

    archive = open_model_archive(real_dir / f"tiny{SUFFIX[fmt]}", tmp_path / "extracted")
    m = archive.manifest
    assert (m.model_name, m.model_version, m.runtime) == ("tiny", "1.0", "python")
    assert (m.handler, m.serialized_file, m.model_file) == (
        "tiny_handler.py",
        "tiny.pt",
        "tiny_model.py",
    )
    assert (m.requirements_file, m.config_file) == ("requirements.txt", "model-config.yaml")
    assert m.archiver_version == "0.12.0"
    assert archive.model_config["batchSize"] == 4
    assert archive.model_config["handler"] == {"threshold": 0.5}
    assert (archive.model_dir / "tiny.pt").read_bytes() == model_inputs.weights.read_bytes()
    assert (archive.model_dir / "vocab" / "words.txt").is_file()
    assert archive.extracted is (fmt != "no-archive")


def test_workflow_archive_matches_real_tool(tmp_path: Path, model_inputs: ModelInputs) -> None:
    spec = model_inputs.root / "workflow.yaml"
    spec.write_text("models:\n  m1:\n    url: tiny.mar\ndag:\n  pre: [m1]\n")
    args = [
        "--workflow-name",
        "wf",
        "--spec-file",
        str(spec),
        "--handler",
        str(model_inputs.handler),
        "--extra-files",
        f"{model_inputs.labels},{model_inputs.requirements}",
    ]
    real_dir, our_dir = tmp_path / "real", tmp_path / "ours"
    real_dir.mkdir()
    proc = run_real("torch-workflow-archiver", *args, "--export-path", real_dir)
    assert proc.returncode == 0, proc.stderr
    assert archive_workflow_main([*args, "--export-path", str(our_dir)]) == 0

    real_files, our_files = (
        listing(real_dir / "wf.war", "default"),
        listing(our_dir / "wf.war", "default"),
    )
    assert (
        set(our_files)
        == set(real_files)
        == {
            "workflow.yaml",
            "tiny_handler.py",
            "index_to_name.json",
            "requirements.txt",
            "WAR-INF/MANIFEST.json",
        }
    )
    real_manifest, real_text = without_created_on(real_files["WAR-INF/MANIFEST.json"])
    our_manifest, our_text = without_created_on(our_files["WAR-INF/MANIFEST.json"])
    assert our_manifest == real_manifest
    assert our_text == real_text

    opened = open_workflow_archive(real_dir / "wf.war", tmp_path / "x")
    assert opened.manifest.workflow_name == "wf"
    assert opened.manifest.spec_file == "workflow.yaml"
    assert opened.manifest.handler == "tiny_handler.py"
    assert opened.spec["dag"] == {"pre": ["m1"]}


def test_rearchiving_a_no_archive_export(tmp_path: Path, model_inputs: ModelInputs) -> None:
    """The real tool then writes two manifests; ours writes one; the reader takes the last."""
    first = ["--model-name", "first", "-v", "1", "--handler", str(model_inputs.handler)]
    proc = run_real(
        "torch-model-archiver", *first, "--archive-format", "no-archive", "--export-path", tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    second = ["--model-name", "second", "-v", "2", "--handler", "base_handler"]
    second += ["--extra-files", str(tmp_path / "first")]
    real_dir = tmp_path / "real"
    real_dir.mkdir()
    assert run_real("torch-model-archiver", *second, "--export-path", real_dir).returncode == 0
    assert archive_main([*second, "--export-path", str(tmp_path / "ours")]) == 0

    with zipfile.ZipFile(real_dir / "second.mar") as zf:
        assert zf.namelist().count("MAR-INF/MANIFEST.json") == 2
    with zipfile.ZipFile(tmp_path / "ours" / "second.mar") as zf:
        assert zf.namelist().count("MAR-INF/MANIFEST.json") == 1
    for mar in (real_dir / "second.mar", tmp_path / "ours" / "second.mar"):
        archive = open_model_archive(mar, tmp_path / "x")
        assert (archive.manifest.model_name, archive.manifest.model_version) == ("second", "2")
        assert (archive.model_dir / "tiny_handler.py").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--model-name", "bad name", "-v", "1", "--handler", "base_handler"],
            "special characters",
        ),
        (
            ["--model-name", "m", "-v", "1", "--handler", "base_handler", "--extra-files", "nope"],
            "nope",
        ),
    ],
)
def test_errors_exit_1_like_real_tool(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    proc = run_real("torch-model-archiver", *args, "--export-path", tmp_path, cwd=tmp_path)
    assert proc.returncode == 1
    assert message in proc.stderr
    assert archive_main([*args, "--export-path", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ERROR - ")
    assert message in err
    assert "Traceback" not in err


def test_existing_output_refused_like_real_tool(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--model-name", "dup", "-v", "1", "--handler", "base_handler"]
    args += ["--export-path", str(tmp_path)]
    assert run_real("torch-model-archiver", *args).returncode == 0
    proc = run_real("torch-model-archiver", *args)
    assert proc.returncode == 1
    assert archive_main(args) == 1
    ours = capsys.readouterr().err
    expected = f"{tmp_path}/dup.mar already exists.\nPlease specify --force/-f option"
    assert expected in proc.stderr
    assert expected in ours
    assert archive_main([*args, "-f"]) == 0
    assert "WARNING - Overwriting" in capsys.readouterr().err


def test_usage_errors_exit_2_like_real_tool(tmp_path: Path) -> None:
    args = ["--model-name", "m", "-v", "1", "--handler", "h", "--archive-format", "rar"]
    assert run_real("torch-model-archiver", *args, cwd=tmp_path).returncode == 2
    assert archive_main(args) == 2
    assert archive_main(["--model-name", "m"]) == 2  # missing required flags
