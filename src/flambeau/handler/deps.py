"""Per-model dependencies inside the model directory: extra-file archives and pip packages.

``unpack_dependencies`` extracts tar/tar.gz/zip archives (seed 002's ``system: extraFiles``)
into the model dir, refusing any member that would land outside it; ``install_packages`` runs
``pip install -t <model dir> -r requirements.txt``. Both are idempotent (marker files) and
serialised across the worker processes of one model by a lock file.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import logging
import os
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

__all__ = [
    "PackageInstallError",
    "UnsafeArchiveError",
    "install_packages",
    "split_file_list",
    "unpack_dependencies",
]

logger = logging.getLogger(__name__)

LOCK_NAME = ".flambeau-deps.lock"
REQUIREMENTS_MARKER = ".flambeau-requirements.sha256"
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


class UnsafeArchiveError(ValueError):
    """An archive member would be written outside the destination (or is a device file)."""


class PackageInstallError(RuntimeError):
    """``pip install`` of a model's requirements failed; the message ends with pip's output."""


@contextlib.contextmanager
def _dir_lock(directory: Path) -> Iterator[None]:
    # Workers of one model share its directory; only one of them may extract/install at once.
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(directory / LOCK_NAME, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def split_file_list(value: str | os.PathLike[str] | Iterable[Any] | None) -> list[str]:
    """``"a.tar.gz, b.zip"`` or ``["a.tar.gz", "b.zip"]`` -> ``["a.tar.gz", "b.zip"]``."""
    if value is None:
        return []
    if isinstance(value, str | os.PathLike):
        return [part.strip() for part in os.fspath(value).split(",") if part.strip()]
    return [os.fspath(item) for item in value if str(item).strip()]


def _within(dest: Path, target: Path) -> bool:
    try:
        target.relative_to(dest)
    except ValueError:
        return False
    return True


def _check_member_name(dest: Path, name: str, archive: Path) -> Path:
    pure = PurePosixPath(name.replace("\\", "/"))
    if pure.is_absolute() or ".." in pure.parts or (pure.parts and ":" in pure.parts[0]):
        raise UnsafeArchiveError(f"{archive.name}: member {name!r} escapes the model directory")
    target = (dest / pure).resolve()
    if not _within(dest, target):
        raise UnsafeArchiveError(f"{archive.name}: member {name!r} escapes the model directory")
    return target


def _safe_tar_members(tar: tarfile.TarFile, dest: Path, archive: Path) -> list[tarfile.TarInfo]:
    members = []
    for member in tar.getmembers():
        target = _check_member_name(dest, member.name, archive)
        if member.issym() or member.islnk():
            link = PurePosixPath(member.linkname)
            base = target.parent if member.issym() else dest
            if link.is_absolute() or not _within(dest, (base / link).resolve()):
                raise UnsafeArchiveError(
                    f"{archive.name}: link {member.name!r} -> {member.linkname!r} points outside "
                    "the model directory"
                )
        elif not (member.isfile() or member.isdir()):
            raise UnsafeArchiveError(f"{archive.name}: member {member.name!r} is a special file")
        members.append(member)
    return members


def _extract(archive: Path, dest: Path) -> None:
    name = archive.name.lower()
    if name.endswith(".zip"):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                _check_member_name(dest, info.filename, archive)
            zf.extractall(dest)
    elif name.endswith(_TAR_SUFFIXES) or tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tar:
            members = _safe_tar_members(tar, dest, archive)
            if hasattr(tarfile, "data_filter"):
                # The stdlib's own checks on top of ours (and no setuid bits, no owners).
                tar.extractall(dest, members=members, filter="data")
            else:  # pragma: no cover - Python < 3.11.4
                tar.extractall(dest, members=members)
    else:
        raise ValueError(f"{archive.name}: not a .zip or tar archive")


def _stamp(archive: Path) -> str:
    stat = archive.stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def unpack_dependencies(
    archives: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    dest_dir: str | os.PathLike[str],
    *,
    base_dir: str | os.PathLike[str] | None = None,
    force: bool = False,
) -> list[Path]:
    """Extract each archive (``.zip``, ``.tar``, ``.tar.gz``/``.tgz``, ``.tar.bz2``,
    ``.tar.xz``) into ``dest_dir``, keeping the directory structure it was packed with.

    ``archives`` is a path, a comma-separated string or a list; relative paths are resolved
    against ``base_dir`` (default ``dest_dir``). Members with absolute paths, ``..``
    components, links pointing outside ``dest_dir`` or device files raise
    :class:`UnsafeArchiveError` before anything is written. An archive already extracted
    (same size and mtime, recorded in a ``.<name>.unpacked`` marker) is skipped unless
    ``force``. Returns the archives actually extracted.
    """
    dest = Path(dest_dir).resolve()
    base = Path(base_dir).resolve() if base_dir is not None else dest
    paths = [Path(a) if Path(a).is_absolute() else base / a for a in split_file_list(archives)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"extra files not found: {', '.join(missing)}")
    dest.mkdir(parents=True, exist_ok=True)
    extracted = []
    with _dir_lock(dest):
        for archive in paths:
            marker = dest / f".{archive.name}.unpacked"
            stamp = _stamp(archive)
            if not force and marker.is_file() and marker.read_text() == stamp:
                logger.debug("%s already unpacked into %s", archive.name, dest)
                continue
            logger.info("unpacking %s into %s", archive, dest)
            _extract(archive, dest)
            marker.write_text(stamp)
            extracted.append(archive)
    if extracted:
        importlib.invalidate_caches()  # new .py files must be importable at once
    return extracted


def _has_requirements(text: str) -> bool:
    for line in text.splitlines():
        stripped = line.split(" #", 1)[0].strip()
        if stripped and not stripped.startswith("#"):
            return True
    return False


def install_packages(
    requirements: str | os.PathLike[str],
    target_dir: str | os.PathLike[str],
    *,
    python: str | None = None,
    extra_args: Sequence[str] = (),
    force: bool = False,
    timeout: float | None = None,
    runner: Callable[..., subprocess.CompletedProcess[str]] | None = None,
) -> bool:
    """``<python> -m pip install -U -t <target_dir> -r <requirements>``, once per content.

    The SHA-256 of the requirements file is recorded in ``<target_dir>/.flambeau-requirements
    .sha256``; while it matches, nothing runs (so the server's per-model dependency step and
    a handler can both call this). A file with no requirement lines never runs pip. Returns
    True when pip ran. ``runner`` (default :func:`subprocess.run`) is for tests. Raises
    :class:`PackageInstallError` with pip's output when pip fails.
    """
    req = Path(requirements).resolve()
    target = Path(target_dir).resolve()
    if not req.is_file():
        raise FileNotFoundError(f"requirements file not found: {req}")
    content = req.read_bytes()
    digest = hashlib.sha256(content).hexdigest()
    target.mkdir(parents=True, exist_ok=True)
    marker = target / REQUIREMENTS_MARKER
    with _dir_lock(target):
        if not force and marker.is_file() and marker.read_text().strip() == digest:
            logger.debug("requirements %s already installed into %s", req.name, target)
            return False
        if not _has_requirements(content.decode("utf-8", "replace")):
            marker.write_text(digest)
            return False
        cmd = [
            python or sys.executable,
            *("-m", "pip", "install", "--disable-pip-version-check", "--no-input"),
            *("-U", "-t", str(target), "-r", str(req)),
            *extra_args,
        ]
        logger.info("installing model requirements: %s", " ".join(cmd))
        run = runner or subprocess.run
        proc = run(cmd, cwd=str(req.parent), capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            output = ((proc.stdout or "") + (proc.stderr or ""))[-4000:]
            raise PackageInstallError(
                f"pip install -r {req.name} failed with exit code {proc.returncode}:\n{output}"
            )
        marker.write_text(digest)
    importlib.invalidate_caches()
    return True
