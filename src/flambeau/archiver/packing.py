"""Collect artifact files and write them as a zip (.mar / .war), a .tar.gz or a plain directory.

Unlike torch-model-archiver, nothing is staged in a shared ``/tmp/<name>`` directory: files are
streamed straight from where they are into a temporary sibling of the output, which replaces
the output only once complete, so a failed or interrupted run never leaves half an archive.
"""

from __future__ import annotations

import glob
import logging
import os
import secrets
import shutil
import tarfile
import time
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path
from typing import IO, BinaryIO

from flambeau.archiver.errors import ArchiverError
from flambeau.archiver.progress import Progress

log = logging.getLogger("flambeau.archiver")

# Directories the real archivers leave out wherever they appear (files are never filtered).
UNWANTED_DIRS = frozenset({"__MACOSX", "__pycache__"})
CHUNK = 1024 * 1024
Entries = Sequence[tuple[str, Path]]


def is_unwanted_dir(name: str) -> bool:
    """``__MACOSX``, ``__pycache__`` and dot-directories are never archived."""
    return name in UNWANTED_DIRS or name.startswith(".")


class Artifacts:
    """The files going into an archive: archive name -> source path.

    Adding a name twice keeps the later source, as copying both into one staging directory
    does in the real tool.
    """

    __slots__ = ("_exclude", "_files")

    def __init__(self, exclude: Path | None = None) -> None:
        self._files: dict[str, Path] = {}
        # The output itself must not be archived when an extra-files directory contains it.
        self._exclude = exclude.resolve() if exclude is not None else None

    def add_file(self, arcname: str, source: Path) -> None:
        if self._exclude is not None and source.resolve() == self._exclude:
            return
        self._files[arcname] = source

    def add_dir_contents(self, directory: Path) -> None:
        """Add what is inside ``directory`` at the archive root, skipping unwanted dirs."""
        seen: set[str] = set()
        for root, dirs, files in os.walk(directory, followlinks=True):
            real = os.path.realpath(root)
            if real in seen:  # a symlink loop: stop instead of recursing forever
                dirs[:] = []
                continue
            seen.add(real)
            dirs[:] = sorted(d for d in dirs if not is_unwanted_dir(d))
            rel = Path(root).relative_to(directory)
            for name in sorted(files):
                self.add_file((rel / name).as_posix(), Path(root, name))

    def entries(self, generated: str) -> list[tuple[str, Path]]:
        """The files in archive order (sorted by name), without the ``generated`` manifest.

        An input carrying its own manifest (an old no-archive export given as extra files)
        would otherwise make the real tool write two; file/directory name clashes are refused.
        """
        files = {name: src for name, src in self._files.items() if name != generated}
        names = set(files)
        for name in names:
            parent = name.rpartition("/")[0]
            while parent:
                if parent in names:
                    raise ArchiverError(f"{parent} is both a file and a directory in the archive")
                parent = parent.rpartition("/")[0]
        return sorted(files.items())


def add_extra_files(artifacts: Artifacts, spec: str) -> None:
    """Expand ``--extra-files``: a comma list of files, directories and glob patterns.

    A directory contributes its contents (not itself) at the archive root. A path that does not
    exist is an error; a pattern that matches nothing only warns, as in the real tool.
    """
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            continue
        wildcard = "*" in item or "?" in item or ("[" in item and "]" in item)
        if not wildcard and not os.path.lexists(item):
            raise ArchiverError(f"File does not exist: {item}")
        matches = sorted(glob.glob(item)) if wildcard else [item]
        if wildcard and not matches:
            log.warning("Given wildcard pattern did not match any file: %s", item)
        for match in matches:
            path = Path(match)
            if path.is_file():
                artifacts.add_file(path.name, path)
            elif path.is_dir():
                # A directory a pattern happened to match (``src/*`` hitting ``__pycache__``)
                # is filtered like any nested one; a directory named explicitly is honoured.
                if wildcard and is_unwanted_dir(path.name):
                    continue
                artifacts.add_dir_contents(path)
            else:
                raise ArchiverError(f"Invalid extra file given {match}")


def require_file(path: str, what: str) -> Path:
    """``path`` as a Path, or an ArchiverError naming the flag it came from."""
    p = Path(path)
    if not p.exists():
        raise ArchiverError(f"{what} does not exist: {path}")
    if not p.is_file():
        raise ArchiverError(f"{what} is not a file: {path}")
    return p


def prepare_export_dir(export_path: str | os.PathLike[str] | None) -> Path:
    """The export directory, created if missing (the real tool insists it already exists)."""
    path = Path(export_path) if export_path is not None else Path.cwd()
    if path.exists() and not path.is_dir():
        raise ArchiverError(
            f"Given export-path {export_path} is not a directory. "
            "Point to a valid export-path directory."
        )
    path.mkdir(parents=True, exist_ok=True)
    return path


def check_output(dest: Path, force: bool, kind: str) -> None:
    """Refuse to overwrite ``dest`` unless forced, with the real tools' message."""
    if not os.path.lexists(dest):
        return
    if force:
        log.warning("Overwriting %s ...", dest)
        return
    raise ArchiverError(
        f"{dest} already exists.\n"
        f"Please specify --force/-f option to overwrite the {kind} archive output file.\n"
        "See -h/--help for more details."
    )


def _total(entries: Entries) -> int:
    return sum(src.stat().st_size for _, src in entries)


class _CountingReader:
    """A read-only file wrapper that reports progress as tarfile pulls bytes through it."""

    __slots__ = ("_f", "_progress")

    def __init__(self, f: BinaryIO, progress: Progress) -> None:
        self._f = f
        self._progress = progress

    def read(self, size: int = -1) -> bytes:
        data = self._f.read(size)
        self._progress.advance(len(data))
        return data


def _copy(src: IO[bytes], dst: IO[bytes], progress: Progress) -> None:
    while chunk := src.read(CHUNK):
        dst.write(chunk)
        progress.advance(len(chunk))


def _partial_name(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.{secrets.token_hex(6)}.partial")


@contextmanager
def _replacing_file(dest: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``dest``; on success it atomically becomes ``dest``."""
    tmp = _partial_name(dest)
    try:
        yield tmp
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def write_zip(
    dest: Path,
    entries: Entries,
    manifest_name: str,
    manifest_text: str,
    *,
    compression: int = zipfile.ZIP_DEFLATED,
) -> None:
    """Write ``entries`` then the manifest (last, as the real tools do) to a zip at ``dest``."""
    with (
        _replacing_file(dest) as tmp,
        Progress(f"Packing {dest.name}", _total(entries)) as progress,
        zipfile.ZipFile(tmp, "x", compression) as zf,
    ):
        for arcname, src in entries:
            info = zipfile.ZipInfo.from_file(src, arcname, strict_timestamps=False)
            info.compress_type = compression
            with src.open("rb") as fin, zf.open(info, "w") as fout:
                _copy(fin, fout, progress)
        zf.writestr(manifest_name, manifest_text)


def write_tgz(
    dest: Path, entries: Entries, top: str, manifest_name: str, manifest_text: str
) -> None:
    """Write a gzipped tar with every member under the directory ``top/``."""
    with (
        _replacing_file(dest) as tmp,
        Progress(f"Packing {dest.name}", _total(entries)) as progress,
        # Level 6 rather than tarfile's 9: several times faster on multi-GB checkpoints,
        # which are mostly incompressible anyway.
        tarfile.open(tmp, "x:gz", compresslevel=6, dereference=True) as tf,
    ):
        for arcname, src in entries:
            info = tf.gettarinfo(str(src), arcname=f"{top}/{arcname}")
            with src.open("rb") as fin:
                tf.addfile(info, _CountingReader(fin, progress))
        data = manifest_text.encode("utf-8")
        info = tarfile.TarInfo(f"{top}/{manifest_name}")
        info.size = len(data)
        info.mtime = int(time.time())
        tf.addfile(info, BytesIO(data))


def write_dir(dest: Path, entries: Entries, manifest_name: str, manifest_text: str) -> None:
    """Write the files as a plain directory (``no-archive``); an existing one is replaced whole."""
    tmp = _partial_name(dest)
    tmp.mkdir()
    try:
        with Progress(f"Copying to {dest.name}", _total(entries)) as progress:
            for arcname, src in [*entries, (manifest_name, None)]:
                target = tmp / arcname
                target.parent.mkdir(parents=True, exist_ok=True)
                if src is None:
                    target.write_text(manifest_text, encoding="utf-8")
                    continue
                with src.open("rb") as fin, target.open("xb") as fout:
                    _copy(fin, fout, progress)
                shutil.copymode(src, target)
        _swap_in_dir(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _swap_in_dir(tmp: Path, dest: Path) -> None:
    """Move ``tmp`` to ``dest``, removing whatever ``dest`` was only once the move succeeded."""
    if not os.path.lexists(dest):
        tmp.rename(dest)
        return
    old = dest.with_name(f".{dest.name}.{secrets.token_hex(6)}.old")
    dest.rename(old)
    try:
        tmp.rename(dest)
    except BaseException:
        old.rename(dest)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    else:
        old.unlink()
