"""Per-model Python requirements (``install_py_dep_per_model`` + a ``requirementsFile``).

Installed at registration, before the workers start, into a cached environment keyed by what
pip would install (:func:`environment_key`): ``pip install --target <entry>/site`` put first on
the workers' ``PYTHONPATH``, or a ``<entry>/venv`` whose interpreter runs them (``useVenv``).
A second registration with the same requirements reuses the entry without running pip.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import site
import sys
import sysconfig
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from flambeau import __version__
from flambeau.api import FlambeauError, PreparerSpec, hookimpl

log = logging.getLogger("flambeau.dependencies")

DEFAULT_TIMEOUT_S = 1800.0
MODES = ("target", "venv")
MARKER = "flambeau-env.json"
_PIP_FLAGS = ("--disable-pip-version-check", "--no-input")
# Build by-products a source tree gains when pip builds it in place: not part of its identity.
_SKIPPED_NAMES = frozenset({"__pycache__", ".git", ".hg", "build", ".eggs", ".tox", ".venv"})
_NESTED_OPTIONS = frozenset({"-r", "--requirement", "-c", "--constraint"})


class ModelDependencyError(FlambeauError):
    """TorchServe's ``ModelException`` (400) for a failed per-model install."""

    status = 400
    error_type = "ModelException"


class _ModelLog:
    """Appends lines to ``model_log.log`` in the worker backends' format."""

    def __init__(self, log_dir: str, label: str) -> None:
        self.path = Path(log_dir) / "model_log.log"
        self.label = label

    def write(self, line: str) -> None:
        now = time.time()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now))
        text = f"{stamp},{int(now * 1000) % 1000:03d} [INFO ] {self.label} - {line}\n"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as out:
                out.write(text)
        except OSError as exc:
            log.warning("cannot write model log: %s", exc)


async def run_logged(
    cmd: Sequence[str], *, cwd: Path, env: dict[str, str], sink: _ModelLog, timeout_s: float
) -> tuple[int, list[str]]:
    """Run ``cmd``; every output line goes to ``sink``. Returns (exit code, last lines)."""
    sink.write("running: " + " ".join(cmd))
    process = await asyncio.create_subprocess_exec(
        *cmd,
        cwd=cwd,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )
    tail: list[str] = []

    async def pump() -> None:
        assert process.stdout is not None
        async for raw in process.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            sink.write(line)
            tail.append(line)
            del tail[:-200]

    try:
        await asyncio.wait_for(pump(), timeout_s)
        code = await process.wait()
    except (TimeoutError, asyncio.CancelledError):
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        raise
    return code, tail


def error_summary(lines: Sequence[str], limit: int = 2000) -> str:
    """pip's own reasons: its ``ERROR:`` lines in order, else the last line it printed."""
    errors = list(dict.fromkeys(line.strip() for line in lines if line.startswith("ERROR:")))
    if not errors:
        return next((line for line in reversed(lines) if line.strip()), "no output")
    text = "; ".join(errors)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------- the key


def interpreter_tag() -> str:
    """What an installed package depends on: implementation, minor version, ABI, platform."""
    return f"{sys.implementation.cache_tag}{sys.abiflags}-{sysconfig.get_platform()}"


def environment_key(
    requirements: bytes,
    mode: str,
    *,
    tag: str | None = None,
    base: str = "",
    inputs: Sequence[tuple[str, str]] = (),
) -> str:
    """The cache key: sha256 of the requirements, interpreter ``tag``, ``mode`` and ``base``.

    ``base`` is the server environment a venv builds on (its packages are visible to it);
    ``inputs`` are (path, fingerprint) of the local files the requirements name, so a rebuilt
    wheel at the same path is a new environment.
    """
    if mode not in MODES:
        raise ValueError(f"unknown environment mode {mode!r}")
    digest = hashlib.sha256()
    parts = [b"flambeau-env-1", mode.encode(), (tag or interpreter_tag()).encode(), base.encode()]
    parts.append(requirements)
    for path, fingerprint in inputs:
        parts += [path.encode(), fingerprint.encode()]
    for part in parts:
        # Length-prefixed, so no two different part lists hash the same bytes.
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


def fingerprint(path: Path) -> str:
    """sha256 of a file's bytes, or of a tree's relative paths and file bytes."""
    digest = hashlib.sha256()
    if path.is_file():
        digest.update(path.read_bytes())
        return digest.hexdigest()
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if d not in _SKIPPED_NAMES and not d.endswith(".egg-info"))
        for name in sorted(files):
            file = Path(root, name)
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
            with contextlib.suppress(OSError):
                digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()


def _logical_lines(text: str) -> Iterator[str]:
    pending = ""
    for raw in text.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", raw).rstrip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        if pending + line:
            yield pending + line
        pending = ""
    if pending:
        yield pending


def _as_local_path(token: str) -> str | None:
    """The path a requirement token names, if it names one (pip's own test: it has a slash or
    starts with a dot), or a ``file:`` URL's path; None for names and remote URLs."""
    if "@file:" in token:
        token = token[token.index("@") + 1 :]
    if token.startswith("file:"):
        return unquote(urlsplit(token).path)
    if "://" in token or token.startswith(("git+", "hg+", "svn+", "bzr+")):
        return None
    if "/" in token or os.sep in token or token.startswith((".", "~")):
        return os.path.expanduser(token.split("#", 1)[0])
    return None


def _path_tokens(line: str) -> Iterator[tuple[str, bool]]:
    """The values of one requirements line that may be paths, each with whether it names a
    nested requirements or constraints file (``-r x``, ``--requirement=x``, ``-rx``)."""
    tokens = line.split()
    for index, token in enumerate(tokens):
        if index > 0 and tokens[index - 1] in _NESTED_OPTIONS:
            yield token, True
        elif token.startswith("--"):
            option, _, value = token.partition("=")
            if value:
                yield value, option in _NESTED_OPTIONS
        elif token.startswith("-"):
            if len(token) > 2:
                yield token[2:].lstrip("="), token[:2] in _NESTED_OPTIONS
        else:
            yield token, False


def local_inputs(requirements: Path, cwd: Path) -> list[tuple[str, str]]:
    """(path, fingerprint) of every existing local file or directory ``requirements`` names:
    nested ``-r``/``-c`` files (recursively, relative to the file naming them, as pip does),
    wheels, source trees and find-links directories (relative to ``cwd``, pip's working dir).

    A path inside ``cwd`` is given relative to it, so the same archive extracted elsewhere
    has the same inputs.
    """
    found: dict[Path, str] = {}
    root = cwd.resolve()

    def visit(req_file: Path, seen: frozenset[Path]) -> None:
        try:
            text = req_file.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return
        for line in _logical_lines(text):
            for token, nested in _path_tokens(line):
                local = _as_local_path(token) or (token if nested else None)
                if local is None:
                    continue
                resolved = ((req_file.parent if nested else cwd) / local).resolve()
                if not resolved.exists() or resolved in found:
                    continue
                found[resolved] = fingerprint(resolved)
                if nested and resolved.is_file() and resolved not in seen:
                    visit(resolved, seen | {resolved})

    visit(requirements, frozenset({requirements.resolve()}))
    named = {
        (path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)): digest
        for path, digest in found.items()
    }
    return sorted(named.items())


# ---------------------------------------------------------------------------- the cache


def default_cache_root() -> Path:
    """``$XDG_CACHE_HOME/flambeau/envs``, else ``~/.cache/flambeau/envs``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "flambeau" / "envs"


class LockTimeoutError(Exception):
    """Another process held an environment's lock for longer than we could wait."""


Builder = Callable[[Path], Awaitable[None]]


class EnvironmentCache:
    """Built environments under ``root``, one entry per key, each built at most once.

    An entry is built in ``<key>.env-<random>`` and published by atomically replacing a
    symlink ``<key>`` pointing at it, once complete (a venv cannot be renamed after it is
    built: its scripts hold their absolute path). Builders of one key are serialised by a
    file lock ``<key>.lock`` across processes, and by an asyncio lock within one.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._locks: dict[str, asyncio.Lock] = {}

    def lookup(self, key: str) -> Path | None:
        """The complete entry of ``key`` (its real directory), or None."""
        link = self.root / key
        if not link.is_symlink():
            return None
        target = link.resolve()
        return target if (target / MARKER).is_file() else None

    async def get_or_build(
        self, key: str, build: Builder, *, metadata: dict[str, Any], timeout_s: float
    ) -> tuple[Path, bool]:
        """The entry of ``key``, built with ``build(directory)`` if missing; returns (entry,
        whether it was built now). A failed build leaves nothing behind."""
        found = self.lookup(key)
        if found is not None:
            return found, False
        async with self._locks.setdefault(key, asyncio.Lock()), self._file_lock(key, timeout_s):
            found = self.lookup(key)
            if found is not None:
                return found, False
            await asyncio.to_thread(self._clear, key)
            directory = self.root / f"{key}.env-{secrets.token_hex(4)}"
            directory.mkdir()
            try:
                await build(directory)
                record = {"key": key, "created": time.time(), "flambeau": __version__, **metadata}
                (directory / MARKER).write_text(json.dumps(record, indent=2) + "\n")
                self._publish(key, directory)
            except Exception:
                await asyncio.to_thread(shutil.rmtree, directory, True)
                raise
            except BaseException:  # cancelled: the loop may not run another thread job
                shutil.rmtree(directory, ignore_errors=True)
                raise
            return directory.resolve(), True

    def _publish(self, key: str, directory: Path) -> None:
        # Relative, so the entry survives moving the whole cache directory.
        temporary = self.root / f".{key}.{secrets.token_hex(4)}.link"
        os.symlink(directory.name, temporary)
        try:
            os.replace(temporary, self.root / key)
        except OSError:
            temporary.unlink(missing_ok=True)
            raise

    def _clear(self, key: str) -> None:
        """Under the key's lock: drop an invalid entry and what crashed builds left."""
        link = self.root / key
        if link.is_symlink():
            link.unlink()
        elif link.exists():
            shutil.rmtree(link, ignore_errors=True)
        for stale in self.root.glob(f"{key}.env-*"):
            shutil.rmtree(stale, ignore_errors=True)

    @contextlib.asynccontextmanager
    async def _file_lock(self, key: str, timeout_s: float) -> AsyncIterator[None]:
        import fcntl

        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            # Polled, not blocking: a thread parked in flock() per waiter could starve the
            # executor the lock holder itself needs.
            deadline = time.monotonic() + timeout_s
            delay = 0.02
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise LockTimeoutError(key) from None
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 0.5)
            yield
        finally:
            os.close(fd)  # releases the lock


# ---------------------------------------------------------------------------- builders


def _venv_site_packages(venv: Path) -> Path:
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    return venv / "lib" / version / "site-packages"


def _link_server_packages(venv: Path) -> None:
    # A venv's --system-site-packages means the base interpreter's, not the server's own
    # (often itself a venv): a .pth makes the server's packages (torch, flambeau) visible,
    # after the venv's own, and runs their .pth files (editable installs).
    paths = [*site.getsitepackages(), site.getusersitepackages()]
    lines = [f"import site; site.addsitedir({p!r})" for p in paths if os.path.isdir(p)]
    target = _venv_site_packages(venv)
    target.mkdir(parents=True, exist_ok=True)
    (target / "_flambeau_server_packages.pth").write_text("\n".join(lines) + "\n")


class _Install:
    """One model version's install: where pip runs, with what, logging where."""

    def __init__(
        self,
        *,
        requirements: Path,
        cwd: Path,
        env: dict[str, str],
        sink: _ModelLog,
        timeout_s: float,
        failure: str,
    ) -> None:
        self.requirements = requirements
        self.cwd = cwd
        self.env = env
        self.sink = sink
        self.timeout_s = timeout_s
        self.failure = failure

    async def run(self, cmd: list[str]) -> None:
        code, tail = await run_logged(
            cmd, cwd=self.cwd, env=self.env, sink=self.sink, timeout_s=self.timeout_s
        )
        if code != 0:
            log.error("%s (exit code %d), see model_log.log", self.failure, code)
            raise ModelDependencyError(f"{self.failure}: {error_summary(tail)}")

    async def target(self, entry: Path) -> None:
        cmd = [sys.executable, "-m", "pip", "install", *_PIP_FLAGS]
        await self.run([*cmd, "--target", str(entry / "site"), "-r", str(self.requirements)])

    async def venv(self, entry: Path) -> None:
        venv = entry / "venv"
        cmd = [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip"]
        await self.run([*cmd, str(venv)])
        _link_server_packages(venv)
        cmd = [str(venv / "bin" / "python"), "-m", "pip", "install", *_PIP_FLAGS]
        cmd += ["-U", "--upgrade-strategy", "only-if-needed", "-r", str(self.requirements)]
        await self.run(cmd)


# ---------------------------------------------------------------------------- the preparer


class RequirementsPreparer:
    """Installs a model version's requirements into a cached environment and points its
    workers at it (``mv.python`` / ``mv.python_path``)."""

    def __init__(self, cache: EnvironmentCache) -> None:
        self.cache = cache

    async def __call__(self, server: Any, mv: Any) -> None:
        config = server.config
        requirements = mv.archive.manifest.requirements_file
        if not requirements or not config.get_bool("install_py_dep_per_model", False):
            return
        model_dir = Path(mv.model_dir)
        req_path = model_dir / requirements
        mode = "venv" if mv.settings.use_venv else "target"
        sink = _ModelLog(server.log_dir, f"{mv.name}_{mv.version}-pip")
        failure = f"Custom pip package installation failed for model {mv.name}"
        backend = mv.settings.worker_backend or config.get_str("worker_backend")
        if backend == "thread":
            log.warning(
                "%s: the thread worker backend runs handlers in the server's interpreter; "
                "its per-model environment is not on their path",
                mv.name,
            )
        blacklist = config.get_str("blacklist_env_vars")
        # pip runs with the environment the workers get (TorchServe's rule).
        env = {
            k: v for k, v in os.environ.items() if not (blacklist and re.fullmatch(blacklist, k))
        }
        timeout_s = config.get_float("install_py_dep_timeout", DEFAULT_TIMEOUT_S)
        install = _Install(
            requirements=req_path,
            cwd=model_dir,
            env=env,
            sink=sink,
            timeout_s=timeout_s,
            failure=failure,
        )
        try:
            content = await asyncio.to_thread(req_path.read_bytes)
            inputs = await asyncio.to_thread(local_inputs, req_path, model_dir)
            key = environment_key(
                content, mode, base=sys.prefix if mode == "venv" else "", inputs=inputs
            )
            text = content.decode("utf-8", "replace")
            metadata = {"mode": mode, "python": interpreter_tag(), "requirements": text}
            started = time.monotonic()
            entry, built = await self.cache.get_or_build(
                key,
                install.venv if mode == "venv" else install.target,
                metadata=metadata,
                timeout_s=timeout_s,
            )
        except TimeoutError:
            raise ModelDependencyError(f"{failure}: timed out after {timeout_s:g} s") from None
        except LockTimeoutError:
            raise ModelDependencyError(
                f"{failure}: timed out after {timeout_s:g} s waiting for another installation "
                "of the same requirements"
            ) from None
        except OSError as exc:
            raise ModelDependencyError(f"{failure}: {exc}") from None
        if built:
            took = time.monotonic() - started
            sink.write(f"built the environment {entry} in {took:.1f} s")
        else:
            sink.write(f"reusing the environment {entry} (same requirements), pip not run")
        log.info(
            "model %s version %s: %s the %s environment %s",
            mv.name,
            mv.version,
            "built" if built else "reusing",
            mode,
            entry,
        )
        if mode == "venv":
            mv.python = str(entry / "venv" / "bin" / "python")
        else:
            mv.python_path = (str(entry / "site"),)


def cache_root(config: Any) -> Path:
    """``model_env_cache`` (``~`` expanded, relative to the working directory), else the
    default under the user's cache directory."""
    configured = config.get_str("model_env_cache")
    if not configured:
        return default_cache_root()
    return Path(os.path.expanduser(configured)).absolute()


@hookimpl
def flambeau_model_preparers(config: Any) -> list[PreparerSpec]:
    """The ``requirements`` preparer (does nothing unless install_py_dep_per_model is on)."""
    return [
        PreparerSpec("requirements", RequirementsPreparer(EnvironmentCache(cache_root(config))))
    ]
