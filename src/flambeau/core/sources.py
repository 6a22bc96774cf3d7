"""Where a model archive comes from: the model store, a directory, a file:// or http(s):// URL.

The rules are TorchServe's, made safe by default: a plain name must live in the model store
(no path separators, no ``..``), and a URL is accepted only when it matches ``allowed_urls``,
which is empty unless configured, so remote registration (ShellTorch's SSRF, CVE-2023-43654)
is off until an operator allows it.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from flambeau.api import BadRequestError, FlambeauError, InternalServerError, ModelNotFoundError

ARCHIVE_SUFFIXES = (".mar", ".model", ".tar.gz", ".tgz", ".war")


@dataclass(frozen=True, slots=True)
class ResolvedSource:
    """A local path to open, and whether flambeau downloaded it (then it owns the file)."""

    path: Path
    url: str
    downloaded: bool = False


def default_model_name(path: Path) -> str:
    """TorchServe's default name: the file name minus its archive extension, non-word -> ``_``."""
    name = path.name
    for suffix in ARCHIVE_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return re.sub(r"\W", "_", name)


def url_allowed(url: str, patterns: list[str]) -> bool:
    return any(re.fullmatch(pattern, url) for pattern in patterns)


async def resolve_source(
    url: str,
    *,
    model_store: Path | None,
    allowed_urls: list[str],
    max_download_bytes: int,
) -> ResolvedSource:
    """Turn a register ``url`` into a local path, downloading when allowed."""
    if not url:
        raise BadRequestError("Parameter url is required.")
    if ".." in url:
        raise ModelNotFoundError(f"Relative path is not allowed in url: {url}")
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme in {"http", "https", "file"}:
        if not url_allowed(url, allowed_urls):
            raise ModelNotFoundError(f"Given URL {url} does not match any allowed URL(s)")
        if scheme == "file":
            path = Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path))
            if not path.exists():
                raise ModelNotFoundError(f"Model not found at: {url}")
            return ResolvedSource(path, url)
        return await _download(url, model_store, max_download_bytes)
    if "/" in url or "\\" in url:
        # An absolute directory is TorchServe's no-archive form; anything else with a separator
        # could escape the store.
        path = Path(url)
        if path.is_absolute() and path.is_dir():
            return ResolvedSource(path, url)
        raise ModelNotFoundError(f"Model not found at: {url}")
    if model_store is None:
        raise ModelNotFoundError(f"Model not found at: {url}")
    path = model_store / url
    if not path.exists():
        raise ModelNotFoundError(f"Model not found at: {url}")
    return ResolvedSource(path, url)


async def _download(url: str, model_store: Path | None, max_bytes: int) -> ResolvedSource:
    if model_store is None:
        raise BadRequestError(f"Failed to download archive from: {url}")
    file_name = Path(urllib.parse.urlsplit(url).path).name
    if not file_name or file_name.startswith("."):
        raise BadRequestError(f"Failed to download archive from: {url}")
    target = model_store / file_name
    if target.exists():
        raise InternalServerError(f"Model file already exists {file_name}")
    try:
        await asyncio.to_thread(_fetch, url, target, max_bytes)
    except FlambeauError:
        raise
    except Exception as exc:
        target.unlink(missing_ok=True)
        raise FlambeauError(
            f"Failed to download archive from: {url}",
            status=400,
            error_type="DownloadArchiveException",
        ) from exc
    return ResolvedSource(target, url, downloaded=True)


def _fetch(url: str, target: Path, max_bytes: int) -> None:
    partial = target.with_name(target.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, partial.open("wb") as out:  # noqa: S310 - scheme checked by the caller
            copied = 0
            while chunk := response.read(1 << 20):
                copied += len(chunk)
                if copied > max_bytes:
                    raise BadRequestError(f"Archive at {url} is larger than {max_bytes} bytes")
                out.write(chunk)
        shutil.move(partial, target)
    finally:
        partial.unlink(missing_ok=True)
