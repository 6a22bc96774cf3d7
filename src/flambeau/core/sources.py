"""Where a model archive comes from: the model store, a directory, a file:// or http(s):// URL.

TorchServe's rules, safe by default: a plain name lives in the model store, an absolute path
is a directory, and a URL must match ``allowed_urls`` (empty unless configured: no ShellTorch
SSRF), redirects included; an allowed URL's archive is copied into the store.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from flambeau.api import BadRequestError, FlambeauError, InternalServerError, ModelNotFoundError

ARCHIVE_SUFFIXES = (".mar", ".model", ".tar.gz", ".tgz", ".war")
URL_SCHEMES = ("http", "https", "file")
DOWNLOAD_TIMEOUT_S = 60.0


class DownloadError(FlambeauError):
    """TorchServe's ``DownloadArchiveException`` (400)."""

    status = 400
    error_type = "DownloadArchiveException"


@dataclass(frozen=True, slots=True)
class ResolvedSource:
    """A local path to open, and whether flambeau copied it into the store (then it owns it)."""

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


def archive_file_name(url: str) -> str:
    """The file name part of a register ``url`` (TorchServe's ``marName`` in snapshots)."""
    if is_url(url):
        return Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).name
    return Path(url).name


def is_url(url: str) -> bool:
    return urllib.parse.urlsplit(url).scheme.lower() in URL_SCHEMES and "://" in url


def url_allowed(url: str, patterns: Sequence[str]) -> bool:
    """TorchServe's check: some pattern matches the whole URL, ignoring case."""
    for pattern in patterns:
        try:
            if re.fullmatch(pattern, url, re.IGNORECASE):
                return True
        except re.error:
            continue
    return False


async def resolve_source(
    url: str | None,
    *,
    model_store: Path | None,
    allowed_urls: Sequence[str],
    max_download_bytes: int,
) -> ResolvedSource:
    """Turn a register ``url`` into a local path, copying an allowed URL into the store."""
    if url is None:
        raise BadRequestError("Parameter url is required.")
    if model_store is None:
        raise ModelNotFoundError("Model store has not been configured.")
    if not url:
        raise ModelNotFoundError("empty url")
    if is_url(url):
        if not url_allowed(url, allowed_urls):
            raise ModelNotFoundError(f"Given URL {url} does not match any allowed URL(s)")
        if ".." in url:
            raise ModelNotFoundError(f"Relative path is not allowed in url: {url}")
        local = _local_directory(url)
        if local is not None:
            # A file:// directory is a no-archive model: used in place, never copied.
            return ResolvedSource(local, url)
        return await _download(url, model_store, allowed_urls, max_download_bytes)
    return _resolve_local(url, model_store)


def _resolve_local(url: str, model_store: Path) -> ResolvedSource:
    if ".." in url:
        raise ModelNotFoundError(f"Relative path is not allowed in url: {url}")
    if "/" in url or "\\" in url:
        # An absolute directory is TorchServe's no-archive form; anything else with a separator
        # could reach outside the store.
        path = Path(url)
        if path.is_absolute() and path.is_dir():
            return ResolvedSource(path, url)
        raise ModelNotFoundError(f"Model not found at: {url}")
    path = model_store / url
    if not path.exists():
        raise ModelNotFoundError(f"Model not found at: {url}")
    return ResolvedSource(path, url)


def _local_directory(url: str) -> Path | None:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() != "file":
        return None
    path = Path(urllib.parse.unquote(parts.path))
    return path if path.is_dir() else None


async def _download(
    url: str, model_store: Path, allowed_urls: Sequence[str], max_bytes: int
) -> ResolvedSource:
    file_name = archive_file_name(url)
    if not file_name or file_name.startswith(".") or not _is_archive_name(file_name):
        raise DownloadError(f"Failed to download archive from: {url}")
    target = model_store / file_name
    if target.exists():
        raise InternalServerError(f"Model file already exists {file_name}")
    try:
        await asyncio.to_thread(_fetch, url, target, allowed_urls, max_bytes)
    except FlambeauError:
        raise
    except Exception as exc:
        raise DownloadError(f"Failed to download archive from: {url}") from exc
    return ResolvedSource(target, url, downloaded=True)


def _is_archive_name(name: str) -> bool:
    # Anything else could not be opened anyway, and would litter the store.
    return name.endswith(ARCHIVE_SUFFIXES) or "." not in name


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to a URL that is itself allowed (no SSRF through a 302)."""

    def __init__(self, allowed_urls: Sequence[str]) -> None:
        self.allowed_urls = allowed_urls

    def redirect_request(
        self, req: Any, fp: IO[bytes], code: int, msg: str, headers: Any, newurl: str
    ) -> urllib.request.Request | None:
        if not url_allowed(newurl, self.allowed_urls):
            raise DownloadError(f"Redirect to {newurl} does not match any allowed URL(s)")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _fetch(url: str, target: Path, allowed_urls: Sequence[str], max_bytes: int) -> None:
    opener = urllib.request.build_opener(_CheckedRedirects(allowed_urls))
    # A private partial file in the store: a half-written archive never carries the real
    # name, and two registrations of one URL cannot write into each other.
    fd, partial_name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    partial = Path(partial_name)
    try:
        with os.fdopen(fd, "wb") as out, opener.open(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            copied = 0
            while chunk := response.read(1 << 20):
                copied += len(chunk)
                if copied > max_bytes:
                    raise BadRequestError(f"Archive at {url} is larger than {max_bytes} bytes")
                out.write(chunk)
        # link() fails when the name appeared meanwhile: the first download wins.
        try:
            os.link(partial, target)
        except FileExistsError:
            raise InternalServerError(f"Model file already exists {target.name}") from None
        except OSError:
            shutil.copyfile(partial, target)
    finally:
        partial.unlink(missing_ok=True)
