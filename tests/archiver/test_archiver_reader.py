"""The reader's normal paths: manifest defaults, layouts it accepts, in-place directories."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

import pytest
from archiver_support import files_under

from flambeau.archiver import (
    Manifest,
    ManifestError,
    open_model_archive,
    open_workflow_archive,
)


def write_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def write_tgz(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def manifest(**model: object) -> bytes:
    return json.dumps({"runtime": "python", "model": model}).encode()


def test_missing_manifest_is_tolerated(tmp_path: Path) -> None:
    archive = open_model_archive(write_zip(tmp_path / "bare.mar", {"h.py": b""}), tmp_path / "d")
    m = archive.manifest
    assert (m.model_name, m.model_version, m.runtime, m.handler, m.raw) == (
        None,
        "1.0",
        "python",
        None,
        {},
    )
    assert archive.model_config == {}
    assert files_under(archive.model_dir) == {"h.py"}


def test_manifest_defaults_and_numbers() -> None:
    m = Manifest.from_dict({"model": {"modelName": "m", "modelVersion": 2.5, "handler": "h.py"}})
    assert (m.model_version, m.runtime, m.archiver_version, m.created_on) == (
        "2.5",
        "python",
        None,
        None,
    )
    with pytest.raises(ManifestError, match=r"model\.handler must be a string"):
        Manifest.from_dict({"model": {"handler": ["h.py"]}})
    with pytest.raises(ManifestError, match="'model' must be an object"):
        Manifest.from_dict({"model": "m"})


def test_tgz_with_a_top_level_directory_is_unwrapped(tmp_path: Path) -> None:
    src = write_tgz(
        tmp_path / "m.tar.gz",
        {
            "m/MAR-INF/MANIFEST.json": manifest(modelName="m", handler="h.py"),
            "m/h.py": b"",
            "m/sub/x": b"1",
        },
    )
    archive = open_model_archive(src, tmp_path / "d")
    assert files_under(archive.model_dir) == {"MAR-INF/MANIFEST.json", "h.py", "sub/x"}
    assert archive.manifest.model_name == "m"


def test_tgz_without_a_top_level_directory(tmp_path: Path) -> None:
    src = write_tgz(
        tmp_path / "m.tgz", {"MAR-INF/MANIFEST.json": manifest(handler="h.py"), "h.py": b""}
    )
    archive = open_model_archive(src, tmp_path / "d")
    assert files_under(archive.model_dir) == {"MAR-INF/MANIFEST.json", "h.py"}


def test_tgz_holding_only_mar_inf_is_not_unwrapped(tmp_path: Path) -> None:
    src = write_tgz(
        tmp_path / "m.tar.gz", {"MAR-INF/MANIFEST.json": manifest(handler="image_classifier")}
    )
    archive = open_model_archive(src, tmp_path / "d")
    assert archive.manifest.handler == "image_classifier"


def test_model_file_extension_is_a_zip(tmp_path: Path) -> None:
    src = write_zip(tmp_path / "legacy.model", {"MAR-INF/MANIFEST.json": manifest(modelName="old")})
    assert open_model_archive(src, tmp_path / "d").manifest.model_name == "old"


def test_each_open_gets_a_new_directory_under_dest_root(tmp_path: Path) -> None:
    src = write_zip(tmp_path / "m.mar", {"MAR-INF/MANIFEST.json": manifest(modelName="m")})
    dest = tmp_path / "not" / "yet" / "there"
    a, b = open_model_archive(src, dest), open_model_archive(src, dest)
    assert a.model_dir != b.model_dir
    assert a.model_dir.parent == b.model_dir.parent == dest
    a.cleanup()
    assert not a.model_dir.exists()
    assert b.model_dir.exists()


def test_directory_is_used_in_place_and_never_deleted(tmp_path: Path) -> None:
    model = tmp_path / "store" / "m"
    (model / "MAR-INF").mkdir(parents=True)
    (model / "MAR-INF" / "MANIFEST.json").write_bytes(
        manifest(modelName="m", handler="h.py", configFile="c.yaml")
    )
    (model / "h.py").write_text("")
    (model / "c.yaml").write_text("batchSize: 8\n")
    dest = tmp_path / "dest"
    archive = open_model_archive(model, dest)
    assert archive.model_dir == archive.source == model
    assert archive.extracted is False
    assert archive.model_config == {"batchSize": 8}
    assert not dest.exists() or not list(dest.iterdir())
    archive.cleanup()
    assert (model / "h.py").exists()


def test_handler_override_replaces_the_manifest_handler_check(tmp_path: Path) -> None:
    src = write_zip(tmp_path / "m.mar", {"MAR-INF/MANIFEST.json": manifest(handler="gone.py")})
    with pytest.raises(ManifestError, match=r"'gone\.py'"):
        open_model_archive(src, tmp_path / "d")
    archive = open_model_archive(src, tmp_path / "d", handler="image_classifier")
    assert archive.manifest.handler == "gone.py"  # the manifest is reported as written


@pytest.mark.parametrize(
    "handler", ["image_classifier", "custom_module", "pkg.module:fn", "h.py:fn", "h:fn"]
)
def test_handler_forms_accepted(tmp_path: Path, handler: str) -> None:
    src = write_zip(
        tmp_path / "m.mar", {"MAR-INF/MANIFEST.json": manifest(handler=handler), "h.py": b""}
    )
    assert open_model_archive(src, tmp_path / "d").manifest.handler == handler


def test_handler_file_with_function_must_exist(tmp_path: Path) -> None:
    src = write_zip(
        tmp_path / "m.mar", {"MAR-INF/MANIFEST.json": manifest(handler="other.py:fn"), "h.py": b""}
    )
    with pytest.raises(ManifestError, match=r"'other\.py'"):
        open_model_archive(src, tmp_path / "d")


def test_config_must_be_a_mapping_and_must_exist(tmp_path: Path) -> None:
    src = write_zip(
        tmp_path / "m.mar",
        {
            "MAR-INF/MANIFEST.json": manifest(configFile="c.yaml", handler="base_handler"),
            "c.yaml": b"- 1\n",
        },
    )
    with pytest.raises(ManifestError, match="must hold a YAML mapping"):
        open_model_archive(src, tmp_path / "d")
    src = write_zip(tmp_path / "n.mar", {"MAR-INF/MANIFEST.json": manifest(configFile="c.yaml")})
    with pytest.raises(
        ManifestError, match=r"configFile 'c\.yaml' named in the manifest is missing"
    ):
        open_model_archive(src, tmp_path / "d")
    assert list((tmp_path / "d").iterdir()) == []


def test_yaml_config_is_parsed_safely(tmp_path: Path) -> None:
    evil = b"handler: !!python/object/apply:os.system ['echo pwned']\n"
    src = write_zip(
        tmp_path / "m.mar", {"MAR-INF/MANIFEST.json": manifest(configFile="c.yaml"), "c.yaml": evil}
    )
    with pytest.raises(ManifestError, match="not valid YAML"):
        open_model_archive(src, tmp_path / "d")


def test_workflow_directory_source(tmp_path: Path) -> None:
    wf = tmp_path / "wf"
    (wf / "WAR-INF").mkdir(parents=True)
    (wf / "WAR-INF" / "MANIFEST.json").write_text(
        json.dumps({"workflow": {"workflowName": "wf", "specFile": "s.yaml", "handler": "h.py"}})
    )
    (wf / "s.yaml").write_text("models:\n  m: {url: m.mar}\ndag:\n  m: []\n")
    (wf / "h.py").write_text("")
    opened = open_workflow_archive(wf, tmp_path / "d")
    assert opened.workflow_dir == opened.source == wf
    assert opened.extracted is False
    assert opened.spec["models"] == {"m": {"url": "m.mar"}}
    assert opened.manifest.raw["workflow"]["workflowName"] == "wf"


def test_in_place_directory_keeps_the_path_it_was_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tmp_path / "store" / "m"
    (model / "MAR-INF").mkdir(parents=True)
    (model / "MAR-INF" / "MANIFEST.json").write_bytes(manifest(modelName="m"))
    (tmp_path / "link").symlink_to(model, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    for given in (Path("store/m"), Path("link")):
        archive = open_model_archive(given, tmp_path / "dest")
        # Not resolved: a caller comparing model_dir with source must see they are the same.
        assert archive.model_dir == archive.source == Path.cwd() / given
        assert archive.extracted is False
