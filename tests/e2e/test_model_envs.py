"""Per-model environments end to end: requirements from the package registry, cached, reused.

A real server with ``install_py_dep_per_model=true`` and its own ``model_env_cache`` registers
archives whose requirements pin ``humanize==4.9.0``, a pure-Python package that only the
registry has (the local mirror and the server's venv do not), and whose handler answers with
what only humanize computes. Skipped when the registry cannot be reached.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from flambeau.archiver.cli import archive_main
from flambeau.testing.fixtures import ServerProcess

pytestmark = pytest.mark.network

REQUIREMENT = "humanize==4.9.0"

HANDLER = '''
"""Answers with what only humanize computes, and where humanize was imported from."""
import importlib.metadata
import sys


def handle(data, context):
    if data is None:
        return None
    import humanize

    out = []
    for row in data:
        number = int(bytes(row.get("body") or row.get("data")).decode())
        out.append(
            {
                "words": humanize.intword(number),
                "comma": humanize.intcomma(number),
                "version": importlib.metadata.version("humanize"),
                "file": humanize.__file__,
                "prefix": sys.prefix,
            }
        )
    return out
'''


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Skip the module when pip cannot fetch the pinned package from the registry."""
    where = tmp_path_factory.mktemp("download")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir"]
    cmd += ["--disable-pip-version-check", "-d", str(where), REQUIREMENT]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.skip(f"the package registry is unreachable: pip download {REQUIREMENT} hung")
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"the package registry is unreachable: pip download {REQUIREMENT}: {reason}")


def build(out: Path, src: Path, name: str, requirements: str, yaml: str = "") -> None:
    """An archive of HANDLER with ``requirements`` (and a model-config when ``yaml``)."""
    folder = src / name
    folder.mkdir(parents=True)
    handler = folder / "humanize_handler.py"
    handler.write_text(textwrap.dedent(HANDLER).lstrip())
    req = folder / "requirements.txt"
    req.write_text(requirements)
    argv = ["--model-name", name, "--handler", str(handler), "--export-path", str(out)]
    argv += ["--version", "1.0", "-f", "--requirements-file", str(req)]
    if yaml:
        config = folder / "model-config.yaml"
        config.write_text(yaml)
        argv += ["--config-file", str(config)]
    assert archive_main(argv) == 0


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model-envs")


@pytest.fixture(scope="module")
def server(
    registry: None, module_server: Any, cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> ServerProcess:
    store = tmp_path_factory.mktemp("store")
    src = tmp_path_factory.mktemp("src")
    build(store, src, "hz", f"{REQUIREMENT}\n")
    # Another archive, the same requirements: the same environment.
    build(store, src, "hz_twin", f"{REQUIREMENT}\n")
    build(store, src, "hz_venv", f"{REQUIREMENT}\n", yaml="useVenv: true\n")
    build(store, src, "bad_req", "this-package-does-not-exist-flambeau==9.9\n")
    return module_server(
        model_store=store,
        args=["--enable-model-api"],
        config={"install_py_dep_per_model": "true", "model_env_cache": str(cache)},
    )


def register(server: ServerProcess, e2e: Any, query: str) -> tuple[Any, float]:
    started = time.monotonic()
    response = e2e.api(server, "POST", f"/models?{query}&initial_workers=1&synchronous=true")
    return response, time.monotonic() - started


def ask(server: ServerProcess, e2e: Any, model: str) -> dict[str, Any]:
    response = e2e.predict(server, f"/predictions/{model}", b"1234567")
    assert response.status == 200, response.body
    return dict(response.json())


def entries(cache: Path) -> set[str]:
    """The published environments (the links), by key."""
    return {p.name for p in cache.iterdir() if p.is_symlink()}


def test_registry_package_installed_once_then_reused(
    server: ServerProcess, e2e: Any, cache: Path
) -> None:
    first, first_s = register(server, e2e, "url=hz.mar")
    assert first.status == 200, first.body
    answer = ask(server, e2e, "hz")
    assert answer["words"] == "1.2 million"
    assert answer["comma"] == "1,234,567"
    assert answer["version"] == "4.9.0"
    assert answer["file"].startswith(str(cache.resolve()))
    assert "/site/humanize/" in answer["file"]
    assert len(entries(cache)) == 1

    # The same archive again (another name), and another archive with the same requirements.
    again, again_s = register(server, e2e, "url=hz.mar&model_name=hz_again")
    assert again.status == 200, again.body
    twin, _ = register(server, e2e, "url=hz_twin.mar")
    assert twin.status == 200, twin.body
    for model in ("hz_again", "hz_twin"):
        assert ask(server, e2e, model) == answer
    assert len(entries(cache)) == 1
    model_log = (server.log_dir / "model_log.log").read_text()
    assert model_log.count("hz_1.0-pip - running: ") == 1
    assert "hz_1.0-pip - built the environment" in model_log
    for label in ("hz_again_1.0-pip", "hz_twin_1.0-pip"):
        assert f"{label} - reusing the environment" in model_log
        assert f"{label} - running: " not in model_log
    # Without pip, a registration is only its worker's start.
    assert again_s < first_s, (again_s, first_s)
    print(f"first registration {first_s:.2f} s, reusing {again_s:.2f} s")
    for model in ("hz", "hz_again", "hz_twin"):
        assert e2e.api(server, "DELETE", f"/models/{model}").status == 200


def test_venv_environment_from_the_registry(server: ServerProcess, e2e: Any, cache: Path) -> None:
    response, _ = register(server, e2e, "url=hz_venv.mar")
    assert response.status == 200, response.body
    assert e2e.describe(server, "hz_venv")["useVenv"] is True
    answer = ask(server, e2e, "hz_venv")
    assert answer["words"] == "1.2 million"
    assert answer["version"] == "4.9.0"
    assert answer["prefix"].startswith(str(cache.resolve()))
    assert answer["prefix"].endswith("/venv")
    assert answer["file"].startswith(answer["prefix"])
    assert e2e.api(server, "DELETE", "/models/hz_venv").status == 200


def test_missing_package_fails_registration(server: ServerProcess, e2e: Any, cache: Path) -> None:
    published = entries(cache)
    response, _ = register(server, e2e, "url=bad_req.mar")
    body = response.json()
    assert (response.status, body["type"]) == (400, "ModelException"), body
    prefix = "Custom pip package installation failed for model bad_req: ERROR:"
    assert body["message"].startswith(prefix), body["message"]
    assert "this-package-does-not-exist-flambeau==9.9" in body["message"]
    assert e2e.api(server, "GET", "/models/bad_req").status == 404
    # Nothing half-built stays: every directory is a published environment.
    assert entries(cache) == published
    built = {p.name for p in cache.iterdir() if p.is_dir() and not p.is_symlink()}
    assert built == {(cache / key).resolve().name for key in published}
    assert "bad_req_1.0-pip - ERROR:" in (server.log_dir / "model_log.log").read_text()
