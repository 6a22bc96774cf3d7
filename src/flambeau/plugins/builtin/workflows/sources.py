"""Where a workflow archive, or a model archive named in a spec, comes from.

The rules are the models API's, safe by default: a plain name lives in its store (no path
separators, no ``..``); ``file://`` and ``http(s)://`` URLs are accepted only when they match
``allowed_urls``, which is empty unless an operator sets it, so registration cannot be turned
into a server-side request forgery (TorchServe's CVE-2023-43654) out of the box.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from flambeau.api import BadRequestError, FlambeauError, InternalServerError, NotFoundError


@dataclass(frozen=True, slots=True)
class Resolved:
    """A local path for a url; ``downloaded`` means flambeau fetched it and owns the file."""

    path: Path
    url: str
    downloaded: bool = False


def url_allowed(url: str, patterns: Sequence[str]) -> bool:
    return any(re.fullmatch(pattern, url) for pattern in patterns)


async def resolve(
    url: str,
    *,
    stores: Sequence[Path],
    allowed_urls: Sequence[str],
    download_dir: Path | None,
    max_bytes: int,
    not_found: str,
) -> Resolved:
    """Turn ``url`` into a local path: a name found in the first of ``stores`` that has it, or
    an allowed URL (downloaded into ``download_dir``, which must not hold that file yet).

    ``not_found`` is the message prefix for a 404 (the url is appended).
    """
    if not url:
        raise BadRequestError("Parameter url is required.")
    if ".." in url:
        raise NotFoundError(f"Relative path is not allowed in url: {url}")
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme in {"http", "https", "file"}:
        if not url_allowed(url, allowed_urls):
            raise NotFoundError(f"Given URL {url} does not match any allowed URL(s)")
        if scheme in {"http", "https"}:
            if download_dir is None:
                raise BadRequestError(f"Failed to download archive from: {url}")
            return await _download(url, download_dir, max_bytes)
    return _local(url, scheme, stores, not_found)


def _local(url: str, scheme: str, stores: Sequence[Path], not_found: str) -> Resolved:
    # Only stat calls on local disks: cheap enough for the event loop.
    if scheme == "file":
        path = Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path))
        if path.exists():
            return Resolved(path, url)
    elif "/" not in url and "\\" not in url:
        for store in stores:
            path = store / url
            if path.exists():
                return Resolved(path, url)
    raise NotFoundError(f"{not_found}{url}")


async def _download(url: str, directory: Path, max_bytes: int) -> Resolved:
    file_name = Path(urllib.parse.urlsplit(url).path).name
    if not file_name or file_name.startswith("."):
        raise BadRequestError(f"Failed to download archive from: {url}")
    target = directory / file_name
    if target.exists():
        # TorchServe's answer when the store already holds a file of that name.
        raise InternalServerError(f"Workflow file already exists {file_name}")
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
    return Resolved(target, url, downloaded=True)


def _fetch(url: str, target: Path, max_bytes: int) -> None:
    partial = target.with_name(target.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, partial.open("wb") as out:
            copied = 0
            while chunk := response.read(1 << 20):
                copied += len(chunk)
                if copied > max_bytes:
                    raise BadRequestError(f"Archive at {url} is larger than {max_bytes} bytes")
                out.write(chunk)
        shutil.move(partial, target)
    finally:
        partial.unlink(missing_ok=True)
