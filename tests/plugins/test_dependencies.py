"""Per-model environments: the cache key, the environment cache and the requirements preparer.

No network: the requirements name a wheel built in ``tmp_path`` and pip runs with
``PIP_NO_INDEX``. The preparer runs real pip and real venvs; the cache's locking is checked
with concurrent builders in one process and a lock held by another process.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from flambeau.core.config import Config
from flambeau.plugins.builtin import dependencies
from flambeau.plugins.builtin.dependencies import (
    MARKER,
    EnvironmentCache,
    LockTimeoutError,
    ModelDependencyError,
    RequirementsPreparer,
    cache_root,
    environment_key,
    error_summary,
    fingerprint,
    local_inputs,
)

KEY = "a" * 64


def make_wheel(directory: Path, value: int, name: str = "flambeau_envprobe") -> Path:
    """A pure-Python wheel whose module holds ``VALUE = value``."""
    directory.mkdir(parents=True, exist_ok=True)
    dist = f"{name}-1.0.dist-info"
    files = {
        f"{name}.py": f"VALUE = {value}\n",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    wheel = directory / f"{name}-1.0-py3-none-any.whl"
    rows = []
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            data = text.encode()
            # A fixed timestamp: the same content is the same bytes, whenever it is built.
            archive.writestr(zipfile.ZipInfo(path, date_time=(2020, 1, 1, 0, 0, 0)), data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            rows.append(f"{path},sha256={digest.decode()},{len(data)}")
        rows.append(f"{dist}/RECORD,,")
        record = zipfile.ZipInfo(f"{dist}/RECORD", date_time=(2020, 1, 1, 0, 0, 0))
        archive.writestr(record, "\n".join(rows) + "\n")
    return wheel


# ---------------------------------------------------------------------------- the key


def test_key_changes_with_every_part() -> None:
    base = environment_key(b"humanize==4.9.0\n", "target", tag="cpython-311-linux-x86_64")
    assert len(base) == 64
    assert int(base, 16) >= 0
    assert base == environment_key(b"humanize==4.9.0\n", "target", tag="cpython-311-linux-x86_64")
    variants = {
        environment_key(b"humanize==4.8.0\n", "target", tag="cpython-311-linux-x86_64"),
        environment_key(b"humanize==4.9.0\n", "venv", tag="cpython-311-linux-x86_64"),
        environment_key(b"humanize==4.9.0\n", "target", tag="cpython-312-linux-x86_64"),
        environment_key(b"humanize==4.9.0\n", "target", tag="cpython-311-macosx-arm64"),
        environment_key(
            b"humanize==4.9.0\n", "target", tag="cpython-311-linux-x86_64", base="/srv/venv"
        ),
        environment_key(
            b"humanize==4.9.0\n",
            "target",
            tag="cpython-311-linux-x86_64",
            inputs=[("/w/x.whl", "00")],
        ),
    }
    assert base not in variants
    assert len(variants) == 6
    # Parts are length-prefixed: moving bytes from one part to the next is another key.
    assert environment_key(b"b", "venv", tag="t", base="a") != environment_key(
        b"ab", "venv", tag="t", base=""
    )
    # The running interpreter is the default tag.
    assert environment_key(b"x", "target") == environment_key(
        b"x", "target", tag=dependencies.interpreter_tag()
    )
    with pytest.raises(ValueError, match="mode"):
        environment_key(b"x", "conda")


def test_local_inputs_cover_what_the_requirements_name(tmp_path: Path) -> None:
    model = tmp_path / "model"
    wheel = make_wheel(model / "wheels", 1)
    (model / "links").mkdir()
    (model / "links" / "a.whl").write_bytes(b"a")
    source = model / "src_pkg"
    (source / "pkg").mkdir(parents=True)
    (source / "pkg" / "__init__.py").write_text("X = 1\n")
    outside = make_wheel(tmp_path / "elsewhere", 2, name="other")
    nested_dir = model / "reqs"
    nested_dir.mkdir()
    # Nested files resolve against the file naming them, as pip does.
    (nested_dir / "more.txt").write_text("./wheels/" + wheel.name + "\n")
    (nested_dir / "base.txt").write_text("-r more.txt\n")
    requirements = model / "requirements.txt"
    requirements.write_text(
        "numpy>=1.0  # ./not-a-path.whl\n"
        "-r reqs/base.txt\n"
        "--find-links=./links\n"
        "./src_pkg\n"
        f"other @ file://{outside}\n"
        "remote @ https://example.invalid/remote.whl\n"
        "./missing.whl\n"
    )
    found = dict(local_inputs(requirements, model))
    wheel_name = f"wheels/{wheel.name}"
    # Inside the model dir, relative: the same archive extracted elsewhere is the same input.
    assert set(found) == {
        "reqs/base.txt",
        "reqs/more.txt",
        wheel_name,
        "links",
        "src_pkg",
        str(outside),
    }
    assert found[wheel_name] == hashlib.sha256(wheel.read_bytes()).hexdigest()
    moved = tmp_path / "moved"
    shutil.copytree(model, moved)
    assert dict(local_inputs(moved / "requirements.txt", moved)) == found

    # Build by-products inside a source tree are not part of its identity; its files are.
    before = fingerprint(source)
    (source / "pkg" / "__pycache__").mkdir()
    (source / "pkg" / "__pycache__" / "x.pyc").write_bytes(b"\0")
    (source / "pkg.egg-info").mkdir()
    assert fingerprint(source) == before
    (source / "pkg" / "__init__.py").write_text("X = 2\n")
    assert fingerprint(source) != before
    # A wheel rebuilt at the same path is another environment.
    make_wheel(model / "wheels", 3)
    assert dict(local_inputs(requirements, model))[wheel_name] != found[wheel_name]


def test_error_summary_keeps_every_pip_error_line() -> None:
    lines = [
        "Looking in indexes: https://example.invalid",
        "ERROR: Could not find a version that satisfies the requirement nope==9.9",
        "ERROR: No matching distribution found for nope==9.9",
        "ERROR: No matching distribution found for nope==9.9",
    ]
    assert error_summary(lines) == (
        "ERROR: Could not find a version that satisfies the requirement nope==9.9; "
        "ERROR: No matching distribution found for nope==9.9"
    )
    assert error_summary(["Collecting x", "Killed", ""]) == "Killed"
    assert error_summary([]) == "no output"
    assert error_summary(["ERROR: " + "x" * 5000], limit=100).endswith("...")


def test_cache_root_setting(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root(Config({})) == tmp_path / "xdg" / "flambeau" / "envs"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root(Config({})) == tmp_path / "home" / ".cache" / "flambeau" / "envs"
    assert cache_root(Config({"model_env_cache": "~/envs"})) == tmp_path / "home" / "envs"
    monkeypatch.chdir(tmp_path)
    assert cache_root(Config({"model_env_cache": "rel"})) == tmp_path / "rel"


# ---------------------------------------------------------------------------- the cache


class CountingBuilder:
    def __init__(self, delay: float = 0.0, fail: bool = False) -> None:
        self.calls: list[Path] = []
        self.started = asyncio.Event()
        self.delay = delay
        self.fail = fail

    async def __call__(self, directory: Path) -> None:
        self.calls.append(directory)
        self.started.set()
        (directory / "site").mkdir()
        (directory / "site" / "half.py").write_text("")
        await asyncio.sleep(self.delay)
        if self.fail:
            raise ModelDependencyError("pip said no")
        (directory / "site" / "done.py").write_text("")


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock"))


async def test_cache_builds_once_then_reuses(tmp_path: Path) -> None:
    cache = EnvironmentCache(tmp_path / "envs")
    assert cache.lookup(KEY) is None
    builder = CountingBuilder()
    entry, built = await cache.get_or_build(KEY, builder, metadata={"mode": "t"}, timeout_s=5)
    assert built
    assert len(builder.calls) == 1
    assert (entry / "site" / "done.py").is_file()
    assert (tmp_path / "envs" / KEY).is_symlink()
    assert '"mode": "t"' in (entry / MARKER).read_text()
    again, built_again = await cache.get_or_build(KEY, builder, metadata={}, timeout_s=5)
    assert (again, built_again) == (entry, False)
    assert len(builder.calls) == 1
    # Another cache object on the same directory (another server) finds it too.
    assert EnvironmentCache(tmp_path / "envs").lookup(KEY) == entry


async def test_concurrent_builders_of_one_key_build_once(tmp_path: Path) -> None:
    builder = CountingBuilder(delay=0.2)
    # Two cache objects on one directory: the file lock, not only the asyncio lock, serialises.
    caches = [EnvironmentCache(tmp_path / "envs") for _ in range(2)]
    results = await asyncio.gather(
        *(caches[i % 2].get_or_build(KEY, builder, metadata={}, timeout_s=5) for i in range(6))
    )
    assert len(builder.calls) == 1
    assert len({entry for entry, _ in results}) == 1
    assert sorted(built for _, built in results) == [False] * 5 + [True]


async def test_failed_build_leaves_nothing(tmp_path: Path) -> None:
    root = tmp_path / "envs"
    cache = EnvironmentCache(root)
    with pytest.raises(ModelDependencyError, match="pip said no"):
        await cache.get_or_build(KEY, CountingBuilder(fail=True), metadata={}, timeout_s=5)
    assert leftovers(root) == []
    assert cache.lookup(KEY) is None
    entry, built = await cache.get_or_build(KEY, CountingBuilder(), metadata={}, timeout_s=5)
    assert built
    assert (entry / "site" / "done.py").is_file()


async def test_cancelled_build_leaves_nothing(tmp_path: Path) -> None:
    root = tmp_path / "envs"
    builder = CountingBuilder(delay=30)
    task = asyncio.create_task(
        EnvironmentCache(root).get_or_build(KEY, builder, metadata={}, timeout_s=5)
    )
    await builder.started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert leftovers(root) == []


async def test_half_built_entry_is_never_used(tmp_path: Path) -> None:
    root = tmp_path / "envs"
    root.mkdir()
    # What a crash leaves: a build dir, and (from a tampered cache) a link to one without
    # its completion marker.
    dead = root / f"{KEY}.env-dead0000"
    (dead / "site").mkdir(parents=True)
    crashed = root / f"{KEY}.env-crash000"
    crashed.mkdir()
    (root / KEY).symlink_to(dead.name)
    cache = EnvironmentCache(root)
    assert cache.lookup(KEY) is None
    builder = CountingBuilder()
    entry, built = await cache.get_or_build(KEY, builder, metadata={}, timeout_s=5)
    assert built
    assert len(builder.calls) == 1
    assert not dead.exists()
    assert not crashed.exists()
    assert leftovers(root) == [KEY, entry.name]


async def test_lock_held_by_another_process(tmp_path: Path) -> None:
    root = tmp_path / "envs"
    root.mkdir()
    script = (
        "import fcntl, os, sys\n"
        f"fd = os.open({str(root / (KEY + '.lock'))!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('locked', flush=True)\n"
        "sys.stdin.read()\n"
    )
    holder = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert holder.stdin is not None
    assert holder.stdout is not None
    try:
        assert await holder.stdout.readline() == b"locked\n"
        cache = EnvironmentCache(root)
        builder = CountingBuilder()
        started = time.monotonic()
        with pytest.raises(LockTimeoutError):
            await cache.get_or_build(KEY, builder, metadata={}, timeout_s=0.3)
        assert time.monotonic() - started >= 0.3
        assert builder.calls == []
        waiting = asyncio.create_task(cache.get_or_build(KEY, builder, metadata={}, timeout_s=10))
        await asyncio.sleep(0.2)
        assert not waiting.done()
        assert builder.calls == []
        holder.stdin.close()  # the holder exits; the kernel drops its lock
        _entry, built = await waiting
        assert built
        assert len(builder.calls) == 1
    finally:
        with contextlib.suppress(ProcessLookupError):
            holder.kill()
        await holder.wait()


# ---------------------------------------------------------------------------- the preparer


@pytest.fixture
def no_index(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIP_NO_INDEX", "1")


def server_for(tmp_path: Path, **config: str) -> SimpleNamespace:
    values = {"install_py_dep_per_model": "true", "model_env_cache": str(tmp_path / "envs")}
    return SimpleNamespace(config=Config({**values, **config}), log_dir=str(tmp_path / "logs"))


def model(tmp_path: Path, name: str, requirements: str, *, venv: bool = False) -> SimpleNamespace:
    model_dir = tmp_path / "models" / name
    model_dir.mkdir(parents=True)
    (model_dir / "requirements.txt").write_text(requirements)
    return SimpleNamespace(
        name=name,
        version="1.0",
        model_dir=model_dir,
        archive=SimpleNamespace(manifest=SimpleNamespace(requirements_file="requirements.txt")),
        settings=SimpleNamespace(use_venv=venv, worker_backend=""),
        python="",
        python_path=(),
    )


def preparer(server: Any) -> RequirementsPreparer:
    return RequirementsPreparer(EnvironmentCache(cache_root(server.config)))


def model_log(server: Any) -> str:
    return (Path(server.log_dir) / "model_log.log").read_text()


def probe(python: str, *, pythonpath: str = "") -> str:
    env = {"PYTHONPATH": pythonpath} if pythonpath else {}
    code = "import flambeau, flambeau_envprobe; print(flambeau_envprobe.VALUE)"
    done = subprocess.run([python, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


async def test_target_environment_is_built_once_and_shared(tmp_path: Path, no_index: None) -> None:
    wheel = make_wheel(tmp_path / "wheels", 7)
    server = server_for(tmp_path)
    prepare = preparer(server)
    first = model(tmp_path, "first", f"{wheel}\n")
    await prepare(server, first)
    assert first.python == ""
    (site_dir,) = first.python_path
    assert site_dir.startswith(str(tmp_path / "envs"))
    assert site_dir.endswith("/site")
    assert probe(sys.executable, pythonpath=site_dir) == "7"
    assert not (first.model_dir / "flambeau_envprobe.py").exists()

    # Another model with the same requirements, and two at once: no pip run at all.
    others = [model(tmp_path, f"other{i}", f"{wheel}\n") for i in range(3)]
    started = time.monotonic()
    await prepare(server, others[0])
    await asyncio.gather(*(prepare(server, mv) for mv in others[1:]))
    assert time.monotonic() - started < 1.0
    assert {mv.python_path for mv in others} == {first.python_path}
    log_text = model_log(server)
    assert log_text.count("running: ") == 1
    assert "first_1.0-pip - built the environment" in log_text
    for mv in others:
        assert f"{mv.name}_1.0-pip - reusing the environment {Path(site_dir).parent}" in log_text


async def test_concurrent_first_registrations_run_pip_once(tmp_path: Path, no_index: None) -> None:
    wheel = make_wheel(tmp_path / "wheels", 8)
    server = server_for(tmp_path)
    prepare = preparer(server)
    models = [model(tmp_path, f"m{i}", f"{wheel}\n") for i in range(3)]
    await asyncio.gather(*(prepare(server, mv) for mv in models))
    assert len({mv.python_path for mv in models}) == 1
    assert model_log(server).count("running: ") == 1
    assert probe(sys.executable, pythonpath=models[0].python_path[0]) == "8"


async def test_venv_environment(tmp_path: Path, no_index: None) -> None:
    wheel = make_wheel(tmp_path / "wheels", 9)
    server = server_for(tmp_path)
    prepare = preparer(server)
    mv = model(tmp_path, "venv_model", f"{wheel}\n", venv=True)
    await prepare(server, mv)
    assert mv.python_path == ()
    python = Path(mv.python)
    assert python.parts[-3:] == ("venv", "bin", "python")
    assert str(python).startswith(str(tmp_path / "envs"))
    # Its own package, and the server's (flambeau) through the linked site-packages.
    assert probe(str(python)) == "9"
    # The same requirements in plain mode are another environment.
    plain = model(tmp_path, "plain_model", f"{wheel}\n")
    await prepare(server, plain)
    assert Path(plain.python_path[0]).parent != python.parent.parent.parent
    again = model(tmp_path, "venv_again", f"{wheel}\n", venv=True)
    await prepare(server, again)
    assert again.python == mv.python
    assert "venv_again_1.0-pip - reusing the environment" in model_log(server)


async def test_failing_install_fails_and_leaves_no_entry(tmp_path: Path, no_index: None) -> None:
    server = server_for(tmp_path)
    mv = model(tmp_path, "bad", "flambeau-no-such-dist==9.9\n")
    with pytest.raises(ModelDependencyError) as caught:
        await preparer(server)(server, mv)
    error = caught.value
    assert error.status == 400
    assert error.error_type == "ModelException"
    assert error.message.startswith("Custom pip package installation failed for model bad: ERROR:")
    assert "flambeau-no-such-dist==9.9" in error.message
    assert "ERROR:" in model_log(server)
    assert leftovers(tmp_path / "envs") == []
    assert mv.python == ""
    assert mv.python_path == ()


async def test_nothing_happens_unless_asked(tmp_path: Path) -> None:
    server = server_for(tmp_path, install_py_dep_per_model="false")
    mv = model(tmp_path, "m", "anything\n")
    await preparer(server)(server, mv)
    mv.archive.manifest.requirements_file = None
    await preparer(server_for(tmp_path))(server_for(tmp_path), mv)
    assert not (tmp_path / "envs").exists()
    assert mv.python_path == ()
    assert mv.python == ""


async def test_bundled_wheels_are_keyed_by_content(tmp_path: Path, no_index: None) -> None:
    server = server_for(tmp_path)
    prepare = preparer(server)
    models = []
    for name, value in (("a", 1), ("a_copy", 1), ("b", 2)):
        mv = model(tmp_path, name, "./wheels/flambeau_envprobe-1.0-py3-none-any.whl\n")
        make_wheel(mv.model_dir / "wheels", value)
        await prepare(server, mv)
        models.append(mv)
    a, a_copy, b = models
    # The same archive extracted elsewhere reuses; another wheel behind the same line does not.
    assert a_copy.python_path == a.python_path
    assert b.python_path != a.python_path
    assert model_log(server).count("running: ") == 2
    assert probe(sys.executable, pythonpath=b.python_path[0]) == "2"
