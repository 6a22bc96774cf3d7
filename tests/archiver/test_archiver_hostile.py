"""Hostile and broken archives: each is refused with a clear error, nothing is written outside
the extraction directory, and no partial extraction is left behind."""

from __future__ import annotations

import io
import json
import stat
import struct
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from flambeau.archiver import (
    ArchiveError,
    ArchiveNotFoundError,
    ArchiveTooLargeError,
    InvalidArchiveError,
    ManifestError,
    UnsafeArchiveError,
    open_model_archive,
    open_workflow_archive,
)
from flambeau.archiver import extract as extract_module

MIB = 1024 * 1024
GOOD_MANIFEST = json.dumps({"runtime": "python", "model": {"modelName": "m", "handler": "h.py"}})


def make_zip(path: Path, members: list[tuple[zipfile.ZipInfo | str, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for info, data in members:
            zf.writestr(info, data)
    return path


def zip_info(name: str, mode: int = 0) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3  # unix, so the mode bits are meaningful
    info.external_attr = mode << 16
    return info


def make_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tf.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


def tar_info(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


def assert_refused(
    source: Path,
    tmp_path: Path,
    error: type[ArchiveError],
    match: str,
    opener: Callable[..., object] = open_model_archive,
    **kwargs: int,
) -> ArchiveError:
    """Open ``source`` expecting ``error``; check that the disk outside is untouched."""
    dest = tmp_path / "dest"
    dest.mkdir(exist_ok=True)
    before = set(tmp_path.rglob("*"))
    with pytest.raises(error, match=match) as info:
        opener(source, dest, **kwargs)
    assert set(tmp_path.rglob("*")) == before, "something was written or left behind"
    assert list(dest.iterdir()) == []
    assert "\n" not in str(info.value)
    return info.value


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("../evil.txt", "points outside the archive"),
        ("a/../../evil.txt", "points outside the archive"),
        ("..\\evil.txt", "points outside the archive"),
        ("/tmp/evil.txt", "absolute path"),
        ("C:/evil.txt", "absolute path"),
    ],
)
def test_zip_member_escaping_is_refused(tmp_path: Path, name: str, match: str) -> None:
    src = make_zip(tmp_path / "evil.mar", [("ok.txt", b"fine"), (zip_info(name), b"pwned")])
    with zipfile.ZipFile(src) as zf:
        assert zf.namelist()[1] == name  # the hostile name really is in the archive
    assert_refused(src, tmp_path, UnsafeArchiveError, match)


@pytest.mark.parametrize(
    ("mode", "kind"),
    [
        (stat.S_IFLNK | 0o777, "symlink"),
        (stat.S_IFCHR | 0o600, "character device"),
        (stat.S_IFIFO | 0o600, "FIFO"),
    ],
)
def test_zip_special_members_are_refused(tmp_path: Path, mode: int, kind: str) -> None:
    src = make_zip(tmp_path / "link.mar", [(zip_info("link", mode), b"/etc/passwd")])
    assert_refused(src, tmp_path, UnsafeArchiveError, f"'link' is a {kind}")


@pytest.mark.parametrize(
    ("members", "error", "match"),
    [
        ([tar_info("m/../../evil.txt")], UnsafeArchiveError, "points outside the archive"),
        ([tar_info("/tmp/evil.txt")], UnsafeArchiveError, "absolute path"),
        (
            [tar_info("m/link", tarfile.SYMTYPE, "/etc"), tar_info("m/link/passwd")],
            UnsafeArchiveError,
            "'m/link' is a symlink",
        ),
        ([tar_info("m/hard", tarfile.LNKTYPE, "/etc/passwd")], UnsafeArchiveError, "hard link"),
        ([tar_info("m/dev", tarfile.CHRTYPE)], UnsafeArchiveError, "character device"),
        ([tar_info("m/fifo", tarfile.FIFOTYPE)], UnsafeArchiveError, "FIFO"),
    ],
)
def test_tar_hostile_members_are_refused(
    tmp_path: Path, members: list[tarfile.TarInfo], error: type[ArchiveError], match: str
) -> None:
    src = make_tar(
        tmp_path / "evil.tar.gz", [(tar_info("m/ok.txt"), b"fine")] + [(m, b"x") for m in members]
    )
    assert_refused(src, tmp_path, error, match)


def test_zip_bomb_by_declared_size(tmp_path: Path) -> None:
    src = make_zip(tmp_path / "bomb.mar", [("zeros.bin", bytes(4 * MIB))])
    assert src.stat().st_size < 64 * 1024  # small on disk, big when expanded
    assert_refused(src, tmp_path, ArchiveTooLargeError, "over the allowed 1048576", max_bytes=MIB)


def test_tar_bomb_by_declared_size(tmp_path: Path) -> None:
    src = make_tar(tmp_path / "bomb.tar.gz", [(tar_info("m/zeros.bin"), bytes(4 * MIB))])
    assert_refused(src, tmp_path, ArchiveTooLargeError, "over the allowed", max_bytes=MIB)


def patch_headers(path: Path, member: str, *, size: int | None = None, flags: int = 0) -> None:
    """Rewrite ``member``'s uncompressed size and OR ``flags`` into its general-purpose bits, in
    both its local and its central directory header (zipfile would never write such lies)."""
    data = bytearray(path.read_bytes())
    name = member.encode()
    # (signature, offset of name length, offset of name, offset of flags, offset of size)
    for sig, len_at, name_at, flags_at, size_at in (
        (b"PK\x03\x04", 26, 30, 6, 22),
        (b"PK\x01\x02", 28, 46, 8, 24),
    ):
        pos = data.find(sig)
        while pos != -1:
            name_len = struct.unpack_from("<H", data, pos + len_at)[0]
            if data[pos + name_at : pos + name_at + name_len] == name:
                old_flags = struct.unpack_from("<H", data, pos + flags_at)[0]
                struct.pack_into("<H", data, pos + flags_at, old_flags | flags)
                if size is not None:
                    struct.pack_into("<I", data, pos + size_at, size)
            pos = data.find(sig, pos + 4)
    path.write_bytes(bytes(data))


def test_zip_bomb_lying_about_its_size(tmp_path: Path) -> None:
    src = make_zip(
        tmp_path / "liar.mar",
        [("MAR-INF/MANIFEST.json", b"{}"), ("bomb.bin", bytes(8 * MIB))],
    )
    patch_headers(src, "bomb.bin", size=100)
    with zipfile.ZipFile(src) as zf:
        assert zf.getinfo("bomb.bin").file_size == 100  # the lie is what a reader sees
    assert_refused(
        src, tmp_path, InvalidArchiveError, "'bomb.bin' is corrupt.*declared size", max_bytes=MIB
    )


def test_actual_bytes_are_counted_even_if_the_decompressor_does_not_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # CPython stops at the declared size; prove our own count would catch a reader that didn't.
    src = make_zip(tmp_path / "liar.mar", [("a.bin", b"x" * 10)])
    monkeypatch.setattr(
        zipfile.ZipFile, "open", lambda self, info, *a, **k: io.BytesIO(bytes(5000))
    )
    assert_refused(
        src, tmp_path, ArchiveTooLargeError, "'a.bin' expands past its declared size of 10"
    )


def test_too_many_members(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(extract_module, "MAX_MEMBERS", 5)
    src = make_zip(tmp_path / "many.mar", [(f"f{i}", b"") for i in range(10)])
    assert_refused(src, tmp_path, ArchiveTooLargeError, "more than 5 members")


def test_duplicate_members_last_one_wins(tmp_path: Path) -> None:
    # As in TorchServe's extractor; the real archiver writes two manifests when re-archiving
    # a no-archive export (see test_archiver_compat).
    with pytest.warns(UserWarning, match="Duplicate name"):
        src = make_zip(tmp_path / "dup.mar", [("h.py", b"one"), ("h.py", b"two")])
    archive = open_model_archive(src, tmp_path / "dest")
    assert (archive.model_dir / "h.py").read_bytes() == b"two"


def test_file_and_directory_with_one_name_is_refused(tmp_path: Path) -> None:
    src = make_zip(tmp_path / "clash.mar", [("a", b"file"), ("a/b", b"nested")])
    assert_refused(src, tmp_path, InvalidArchiveError, "cannot extract clash.mar")


def test_encrypted_member_is_refused(tmp_path: Path) -> None:
    src = make_zip(tmp_path / "enc.mar", [("secret.bin", b"data")])
    patch_headers(src, "secret.bin", flags=0x1)
    assert_refused(src, tmp_path, InvalidArchiveError, "encrypted")


def test_bad_zip(tmp_path: Path) -> None:
    src = tmp_path / "bad.mar"
    src.write_bytes(b"this is not a zip file at all")
    assert_refused(src, tmp_path, InvalidArchiveError, "bad.mar is not a valid zip archive")


def test_truncated_zip(tmp_path: Path) -> None:
    src = make_zip(tmp_path / "cut.mar", [("big.bin", bytes(range(256)) * 4096)])
    src.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    assert_refused(src, tmp_path, InvalidArchiveError, "not a valid zip archive")


def test_truncated_tar_gz(tmp_path: Path) -> None:
    src = make_tar(tmp_path / "cut.tar.gz", [(tar_info("m/a.bin"), bytes(range(256)) * 4096)])
    src.write_bytes(src.read_bytes()[:-200])
    assert_refused(src, tmp_path, InvalidArchiveError, "cut.tar.gz")


def test_unknown_format(tmp_path: Path) -> None:
    src = tmp_path / "weights.bin"
    src.write_bytes(b"definitely not an archive\n" * 40)
    assert_refused(src, tmp_path, InvalidArchiveError, "neither a zip")


def test_missing_source(tmp_path: Path) -> None:
    err = assert_refused(
        tmp_path / "nope.mar", tmp_path, ArchiveNotFoundError, "Model not found at"
    )
    assert err.status == 404


def test_missing_handler_file(tmp_path: Path) -> None:
    src = make_zip(tmp_path / "m.mar", [("MAR-INF/MANIFEST.json", GOOD_MANIFEST.encode())])
    err = assert_refused(
        src, tmp_path, ManifestError, "handler file 'h.py' named in the manifest is missing"
    )
    assert (err.status, err.error_type) == (400, "InvalidModelException")


def test_unknown_runtime(tmp_path: Path) -> None:
    manifest = json.dumps({"runtime": "ruby", "model": {"modelName": "m", "handler": "h.py"}})
    src = make_zip(
        tmp_path / "m.mar", [("MAR-INF/MANIFEST.json", manifest.encode()), ("h.py", b"")]
    )
    assert_refused(src, tmp_path, ManifestError, "^Invalid RuntimeType value: ruby$")


def test_bad_manifest_json(tmp_path: Path) -> None:
    src = make_zip(tmp_path / "m.mar", [("MAR-INF/MANIFEST.json", b"{not json")])
    assert_refused(src, tmp_path, ManifestError, "MANIFEST.json is not valid JSON")


@pytest.mark.parametrize("field", ["configFile", "serializedFile", "requirementsFile"])
def test_manifest_paths_outside_the_archive(tmp_path: Path, field: str) -> None:
    manifest = json.dumps(
        {"runtime": "python", "model": {"handler": "h.py", field: "../../etc/passwd"}}
    )
    src = make_zip(
        tmp_path / "m.mar", [("MAR-INF/MANIFEST.json", manifest.encode()), ("h.py", b"")]
    )
    assert_refused(src, tmp_path, ManifestError, f"model.{field}='../../etc/passwd' points outside")


def test_bad_model_config(tmp_path: Path) -> None:
    manifest = json.dumps({"model": {"handler": "h.py", "configFile": "c.yaml"}})
    src = make_zip(
        tmp_path / "m.mar",
        [("MAR-INF/MANIFEST.json", manifest.encode()), ("h.py", b""), ("c.yaml", b"a: [1,\n")],
    )
    assert_refused(src, tmp_path, ManifestError, "c.yaml is not valid YAML")


def test_workflow_archive_without_manifest(tmp_path: Path) -> None:
    src = make_zip(tmp_path / "wf.war", [("spec.yaml", b"models: {}\n")])
    assert_refused(
        src,
        tmp_path,
        ManifestError,
        "WAR-INF/MANIFEST.json is missing",
        opener=open_workflow_archive,
    )


def test_workflow_archive_missing_handler(tmp_path: Path) -> None:
    manifest = {"workflow": {"workflowName": "wf", "specFile": "spec.yaml", "handler": "h.py"}}
    src = make_zip(
        tmp_path / "wf.war",
        [("WAR-INF/MANIFEST.json", json.dumps(manifest).encode()), ("spec.yaml", b"models: {}\n")],
    )
    assert_refused(
        src, tmp_path, ManifestError, "handler file 'h.py'", opener=open_workflow_archive
    )
