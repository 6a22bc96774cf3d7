"""Safe extraction of untrusted zip and tar archives into a fresh directory.

Every member name is checked before anything is written ('..', absolute and drive paths are
refused; so are symlinks, hard links, devices, FIFOs and sparse files), declared sizes are
summed against a byte budget up front, and actual bytes are counted again while writing
because size fields lie. On any error the partial extraction is removed.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import IO, Literal

from flambeau.archiver.errors import (
    ArchiveError,
    ArchiveNotFoundError,
    ArchiveTooLargeError,
    InvalidArchiveError,
    UnsafeArchiveError,
)
from flambeau.archiver.progress import Progress

ArchiveKind = Literal["zip", "tar"]

# A cap on entries, so an archive of a million empty files cannot exhaust inodes.
MAX_MEMBERS = 200_000
CHUNK = 1024 * 1024
_ZIP_SUFFIXES = (".mar", ".model", ".war", ".zip")
_TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar")
_DRIVE = re.compile(r"^[A-Za-z]:")
_ZIP_ENCRYPTED = 0x1
_FILE_KINDS = {
    stat.S_IFLNK: "symlink",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
    stat.S_IFIFO: "FIFO",
    stat.S_IFSOCK: "socket",
}


def member_parts(name: str, archive: str = "archive") -> tuple[str, ...]:
    """The path components of member ``name``, refusing anything that could escape.

    Backslashes count as separators (zips made on Windows use them), so ``..\\x`` is refused
    too. An empty result means the member is the archive root itself (``./``).
    """
    if "\x00" in name:
        raise UnsafeArchiveError(f"{archive}: member name {name!r} contains a NUL byte")
    normalized = name.replace("\\", "/")
    if normalized.startswith("/") or _DRIVE.match(normalized):
        raise UnsafeArchiveError(f"{archive}: member {name!r} has an absolute path")
    parts = tuple(p for p in normalized.split("/") if p not in ("", "."))
    if ".." in parts:
        raise UnsafeArchiveError(f"{archive}: member {name!r} points outside the archive")
    return parts


def detect_kind(source: Path) -> ArchiveKind:
    """Whether ``source`` is a zip or a (possibly compressed) tar, by name then by content."""
    name = source.name.lower()
    if name.endswith(_ZIP_SUFFIXES):
        return "zip"
    if name.endswith(_TAR_SUFFIXES):
        return "tar"
    if zipfile.is_zipfile(source):
        return "zip"
    if tarfile.is_tarfile(source):
        return "tar"
    raise InvalidArchiveError(f"{source.name} is neither a zip (.mar) nor a tar.gz archive")


class _Writer:
    """Writes members under ``root`` while counting bytes against the budgets."""

    __slots__ = ("_archive", "_max_bytes", "_progress", "_root", "_root_real", "written")

    def __init__(self, root: Path, archive: str, max_bytes: int, progress: Progress) -> None:
        self._root = root
        self._root_real = os.path.realpath(root)
        self._archive = archive
        self._max_bytes = max_bytes
        self._progress = progress
        self.written = 0

    def _path(self, parts: tuple[str, ...]) -> Path:
        path = self._root.joinpath(*parts)
        # Belt and braces: member_parts already refused '..' and nothing here is a symlink.
        if os.path.commonpath([self._root_real, os.path.realpath(path)]) != self._root_real:
            raise UnsafeArchiveError(f"{self._archive}: member {'/'.join(parts)!r} escapes")
        return path

    def mkdir(self, parts: tuple[str, ...]) -> None:
        self._path(parts).mkdir(parents=True, exist_ok=True)

    def write(self, parts: tuple[str, ...], src: IO[bytes], declared: int) -> None:
        name = "/".join(parts)
        path = self._path(parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        # A repeated name overwrites the earlier member, as TorchServe's extractor does (the
        # real archiver writes two manifests when its input already holds one). O_NOFOLLOW is
        # belt and braces: nothing here creates symlinks.
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
        fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0), 0o644)
        with os.fdopen(fd, "wb") as out:
            # Every byte is counted before it is written: the declared size may be a lie.
            member_total = 0
            while chunk := src.read(CHUNK):
                member_total += len(chunk)
                self.written += len(chunk)
                if member_total > declared:
                    raise ArchiveTooLargeError(
                        f"{self._archive}: member {name!r} expands past its declared size "
                        f"of {declared} bytes"
                    )
                # Unreachable while the per-member check holds (declared sizes were summed
                # against the budget up front); kept as the last line of defence.
                if self.written > self._max_bytes:
                    raise ArchiveTooLargeError(
                        f"{self._archive} expands to more than the allowed {self._max_bytes} bytes"
                    )
                out.write(chunk)
                self._progress.advance(len(chunk))


def extract(source: Path, dest_root: Path, *, max_bytes: int, strip_single_top: bool) -> Path:
    """Extract ``source`` into a new unique directory under ``dest_root`` and return it.

    ``strip_single_top`` makes a tar whose only top-level entry is a directory extract that
    directory's contents (``torch-model-archiver --archive-format tgz`` output).
    """
    if not source.is_file():
        raise ArchiveNotFoundError(f"Model not found at: {source}")
    kind = detect_kind(source)
    dest_root.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^\w.-]", "_", source.name)[:64]
    target = Path(tempfile.mkdtemp(prefix=f"{stem}-", dir=dest_root))
    try:
        if kind == "zip":
            _extract_zip(source, target, max_bytes)
        else:
            _extract_tar(source, target, max_bytes, strip_single_top)
    except ArchiveError:
        shutil.rmtree(target, ignore_errors=True)
        raise
    except OSError as exc:
        shutil.rmtree(target, ignore_errors=True)
        raise InvalidArchiveError(f"cannot extract {source.name}: {exc}") from exc
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    return target


def _check_budget(archive: str, count: int, declared: int, max_bytes: int) -> None:
    if count > MAX_MEMBERS:
        raise ArchiveTooLargeError(f"{archive} has more than {MAX_MEMBERS} members")
    if declared > max_bytes:
        raise ArchiveTooLargeError(
            f"{archive} declares {declared} bytes or more, over the allowed {max_bytes}"
        )


def _open_zip(source: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(source)
    except (zipfile.BadZipFile, zlib.error, ValueError) as exc:
        raise InvalidArchiveError(f"{source.name} is not a valid zip archive ({exc})") from exc


def _open_tar(source: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(source, "r:*")
    except (tarfile.TarError, zlib.error, EOFError) as exc:
        raise InvalidArchiveError(f"{source.name} is not a valid tar archive ({exc})") from exc


def _extract_zip(source: Path, target: Path, max_bytes: int) -> None:
    archive = source.name
    with _open_zip(source) as zf:
        plan: list[tuple[zipfile.ZipInfo, tuple[str, ...], bool]] = []
        declared = 0
        for info in zf.infolist():
            parts = member_parts(info.filename, archive)
            file_kind = stat.S_IFMT(info.external_attr >> 16)
            if file_kind in _FILE_KINDS:
                raise UnsafeArchiveError(
                    f"{archive}: member {info.filename!r} is a {_FILE_KINDS[file_kind]}, "
                    "not a regular file"
                )
            if info.flag_bits & _ZIP_ENCRYPTED:
                raise InvalidArchiveError(f"{archive}: member {info.filename!r} is encrypted")
            is_dir = info.is_dir() or file_kind == stat.S_IFDIR
            if not is_dir:
                declared += info.file_size
            _check_budget(archive, len(plan) + 1, declared, max_bytes)
            if parts:
                plan.append((info, parts, is_dir))

        with Progress(f"Extracting {archive}", declared) as progress:
            writer = _Writer(target, archive, max_bytes, progress)
            for info, parts, is_dir in plan:
                if is_dir:
                    writer.mkdir(parts)
                    continue
                try:
                    with zf.open(info) as src:
                        writer.write(parts, src, info.file_size)
                except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
                    # CPython never yields more than the declared size; a member whose data
                    # is longer (a lying zip bomb) or damaged ends in a CRC / stream error.
                    raise InvalidArchiveError(
                        f"{archive}: member {info.filename!r} is corrupt: its data does not "
                        f"match its declared size or CRC ({exc})"
                    ) from exc
                except NotImplementedError as exc:
                    raise InvalidArchiveError(
                        f"{archive}: member {info.filename!r} uses an unsupported "
                        f"compression method ({exc})"
                    ) from exc


def _tar_kind(member: tarfile.TarInfo) -> str:
    checks: tuple[tuple[Callable[[], bool], str], ...] = (
        (member.issym, "symlink"),
        (member.islnk, "hard link"),
        (member.ischr, "character device"),
        (member.isblk, "block device"),
        (member.isfifo, "FIFO"),
        (member.issparse, "sparse file"),
    )
    return next((label for check, label in checks if check()), "special file")


def _extract_tar(source: Path, target: Path, max_bytes: int, strip_single_top: bool) -> None:
    archive = source.name
    with _open_tar(source) as tf:
        plan: list[tuple[tarfile.TarInfo, tuple[str, ...], bool]] = []
        declared = 0
        while True:
            try:
                member = tf.next()
            except (tarfile.TarError, zlib.error, EOFError) as exc:
                raise InvalidArchiveError(f"{archive} is a corrupt tar archive ({exc})") from exc
            if member is None:
                break
            parts = member_parts(member.name, archive)
            if member.isreg() and not member.issparse():
                declared += member.size
            elif not member.isdir():
                raise UnsafeArchiveError(
                    f"{archive}: member {member.name!r} is a {_tar_kind(member)}, "
                    "not a regular file"
                )
            _check_budget(archive, len(plan) + 1, declared, max_bytes)
            if parts:
                plan.append((member, parts, member.isdir()))

        tops = {parts[0] for _, parts, _ in plan}
        # An archive holding only MAR-INF/ has no wrapping directory to strip.
        wrapped = all(is_dir or len(parts) > 1 for _, parts, is_dir in plan)
        if strip_single_top and len(tops) == 1 and wrapped and not tops & {"MAR-INF", "WAR-INF"}:
            plan = [(m, parts[1:], is_dir) for m, parts, is_dir in plan if len(parts) > 1]

        with Progress(f"Extracting {archive}", declared) as progress:
            writer = _Writer(target, archive, max_bytes, progress)
            for member, parts, is_dir in plan:
                if is_dir:
                    writer.mkdir(parts)
                    continue
                try:
                    src = tf.extractfile(member)
                    if src is None:  # unreachable for regular files; keeps mypy honest
                        raise InvalidArchiveError(f"{archive}: cannot read {member.name!r}")
                    with src:
                        writer.write(parts, src, member.size)
                except (tarfile.TarError, zlib.error, EOFError) as exc:
                    raise InvalidArchiveError(
                        f"{archive}: member {member.name!r} is corrupt ({exc})"
                    ) from exc


def validate_tar_members(source: Path) -> None:
    """Check a tarball's member names and kinds without extracting it (for ``package``)."""
    archive = source.name
    try:
        with _open_tar(source) as tf:
            for member in tf:
                member_parts(member.name, archive)
                if not (member.isdir() or (member.isreg() and not member.issparse())):
                    raise UnsafeArchiveError(
                        f"{archive}: member {member.name!r} is a {_tar_kind(member)}, "
                        "not a regular file"
                    )
    except (tarfile.TarError, zlib.error, EOFError) as exc:
        raise InvalidArchiveError(f"{archive} is not a valid tar archive ({exc})") from exc
