"""Per-model Python requirements (``install_py_dep_per_model`` + a ``requirementsFile``).

Installed at registration, before the workers start: ``pip install -t <model_dir>``, or into a
``<model_dir>/venv`` with ``useVenv: true``. pip runs as an asyncio subprocess logging to
``model_log.log``; a failure is TorchServe's 400 ``ModelException``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import site
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flambeau.api import FlambeauError, PreparerSpec, hookimpl

log = logging.getLogger("flambeau.dependencies")

DEFAULT_TIMEOUT_S = 1800.0
_PIP_FLAGS = ("--disable-pip-version-check", "--no-input")


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
            del tail[:-50]

    try:
        await asyncio.wait_for(pump(), timeout_s)
        code = await process.wait()
    except (asyncio.TimeoutError, asyncio.CancelledError):
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        raise
    return code, tail


def error_summary(lines: Sequence[str]) -> str:
    """pip's own one-line reason: the last ``ERROR:`` line, else the last line it printed."""
    for line in reversed(lines):
        if line.startswith("ERROR:"):
            return line
    return next((line for line in reversed(lines) if line.strip()), "no output")


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


async def install_requirements(server: Any, mv: Any) -> None:
    """The preparer: install ``mv``'s requirements when the configuration asks for it."""
    config = server.config
    requirements = mv.archive.manifest.requirements_file
    if not requirements or not config.get_bool("install_py_dep_per_model", False):
        return
    model_dir = Path(mv.model_dir)
    req_path = model_dir / requirements
    sink = _ModelLog(server.log_dir, f"{mv.name}_{mv.version}-pip")
    blacklist = config.get_str("blacklist_env_vars")
    # pip runs with the environment the workers get (TorchServe's rule).
    env = {k: v for k, v in os.environ.items() if not (blacklist and re.fullmatch(blacklist, k))}
    timeout_s = config.get_float("install_py_dep_timeout", DEFAULT_TIMEOUT_S)
    failure = f"Custom pip package installation failed for model {mv.name}"
    try:
        if mv.settings.use_venv:
            venv = model_dir / "venv"
            code, tail = await run_logged(
                [
                    sys.executable,
                    "-m",
                    "venv",
                    "--system-site-packages",
                    "--without-pip",
                    str(venv),
                ],
                cwd=model_dir,
                env=env,
                sink=sink,
                timeout_s=timeout_s,
            )
            if code != 0:
                raise ModelDependencyError(f"{failure}: {error_summary(tail)}")
            _link_server_packages(venv)
            cmd = [str(venv / "bin" / "python"), "-m", "pip", "install", *_PIP_FLAGS]
            cmd += ["-U", "--upgrade-strategy", "only-if-needed", "-r", str(req_path)]
        else:
            cmd = [sys.executable, "-m", "pip", "install", *_PIP_FLAGS]
            cmd += ["-U", "-t", str(model_dir), "-r", str(req_path)]
        code, tail = await run_logged(cmd, cwd=model_dir, env=env, sink=sink, timeout_s=timeout_s)
    except asyncio.TimeoutError:
        raise ModelDependencyError(f"{failure}: timed out after {timeout_s:g} s") from None
    except OSError as exc:
        raise ModelDependencyError(f"{failure}: {exc}") from None
    if code != 0:
        log.error("%s (pip exit code %d), see model_log.log", failure, code)
        raise ModelDependencyError(f"{failure}: {error_summary(tail)}")
    log.info("installed the requirements of model %s version %s", mv.name, mv.version)


@hookimpl
def flambeau_model_preparers(config: Any) -> list[PreparerSpec]:
    """The ``requirements`` preparer (does nothing unless install_py_dep_per_model is on)."""
    return [PreparerSpec("requirements", install_requirements)]
