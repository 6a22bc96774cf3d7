"""The server as a real process: start, ping, plugins, auth refusal, stop, start-up errors."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from flambeau.testing.fixtures import ServerFactory, http_request

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "flambeau.core.cli"]


def test_ping_and_not_found(flambeau_server: ServerFactory) -> None:
    server = flambeau_server(args=["--disable-token-auth"])
    ping = server.request("GET", "inference", "/ping")
    assert ping.status == 200
    assert ping.json() == {"status": "Healthy"}
    assert ping.body.endswith(b"}\n")
    assert ping.header("x-request-id")
    assert ping.header("Cache-Control") == "no-cache; no-store, must-revalidate, private"
    missing = server.request("GET", "inference", "/no/such/path")
    assert missing.status == 404
    assert missing.json() == {
        "code": 404,
        "type": "ResourceNotFoundException",
        "message": "Requested resource is not found, please refer to API document.",
    }
    assert server.request("GET", "management", "/models").json() == {"models": []}


def test_token_auth_is_on_by_default(flambeau_server: ServerFactory) -> None:
    server = flambeau_server()
    refused = server.request("GET", "inference", "/ping")
    assert refused.status == 400
    assert refused.json()["type"] == "InvalidKeyException"
    keys = server.keys
    ok = server.request(
        "GET", "inference", "/ping", headers={"Authorization": f"Bearer {keys['inference']['key']}"}
    )
    assert ok.status == 200
    # An inference key is no management key.
    wrong = server.request(
        "GET",
        "management",
        "/models",
        headers={"Authorization": f"Bearer {keys['inference']['key']}"},
    )
    assert wrong.status == 400
    good = server.request(
        "GET",
        "management",
        "/models",
        headers={"Authorization": f"Bearer {keys['management']['key']}"},
    )
    assert good.status == 200
    assert oct(os.stat(server.workdir / "key_file.json").st_mode & 0o777) == "0o600"
    # The API description stays public, as in TorchServe.
    assert server.request("OPTIONS", "inference", "/").json()["openapi"] == "3.0.1"


def test_blocked_plugin_loses_its_routes(flambeau_server: ServerFactory) -> None:
    server = flambeau_server(args=["--disable-token-auth", "-p", "no:ping"])
    assert server.request("GET", "inference", "/ping").status == 404


def test_sigterm_stops_cleanly(flambeau_server: ServerFactory) -> None:
    server = flambeau_server(args=["--disable-token-auth"])
    assert server.stop() == 0
    assert not server.ready_file.exists()


@pytest.fixture(scope="module")
def hello_plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The third-party test plugin, pip-installed into a directory of its own."""
    target = tmp_path_factory.mktemp("site")
    source = tmp_path_factory.mktemp("src") / "hello_plugin"
    shutil.copytree(ROOT / "tests" / "data" / "hello_plugin", source)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(target),
            str(source),
        ],
        check=True,
    )
    return target


def test_third_party_plugin_is_found_by_entry_point(
    flambeau_server: ServerFactory, hello_plugin_site: Path
) -> None:
    env = {
        "PYTHONPATH": os.pathsep.join([str(hello_plugin_site), os.environ.get("PYTHONPATH", "")])
    }
    server = flambeau_server(args=["--disable-token-auth"], env=env)
    hello = server.request("GET", "inference", "/hello")
    assert hello.status == 200
    assert hello.json() == {"hello": "world"}
    listing = subprocess.run(
        [*CLI, "plugins"], env={**os.environ, **env}, capture_output=True, text=True, check=True
    )
    assert "hello  (flambeau-hello 1.2.3)" in listing.stdout
    blocked = flambeau_server(args=["--disable-token-auth", "-p", "no:hello"], env=env)
    assert blocked.request("GET", "inference", "/hello").status == 404
    no_autoload = flambeau_server(
        args=["--disable-token-auth", "--disable-plugin-autoload"], env=env
    )
    assert no_autoload.request("GET", "inference", "/hello").status == 404


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_start_daemonizes_and_stop_leaves_nothing(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    ports = [_free_port() for _ in range(3)]
    (tmp_path / "config.properties").write_text(
        f"inference_address=http://127.0.0.1:{ports[0]}\n"
        f"management_address=http://127.0.0.1:{ports[1]}\n"
        f"metrics_address=http://127.0.0.1:{ports[2]}\n"
    )
    env = {
        **os.environ,
        "FLAMBEAU_PID_FILE": str(tmp_path / "pid"),
        "LOG_LOCATION": str(tmp_path / "logs"),
    }
    started = time.monotonic()
    result = subprocess.run(
        [*CLI, "start", "--model-store", str(store), "--ncs", "--disable-token-auth"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "Model server started."
    ping = http_request(f"http://127.0.0.1:{ports[0]}", "GET", "/ping")
    elapsed = time.monotonic() - started
    assert ping.status == 200
    pid = int((tmp_path / "pid").read_text())
    assert psutil.pid_exists(pid)
    print(f"start to first /ping: {elapsed:.3f}s")
    again = subprocess.run(
        [*CLI, "start", "--model-store", str(store)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 1
    assert "already running" in again.stdout
    stop = subprocess.run(
        [*CLI, "stop"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=90
    )
    assert stop.returncode == 0
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not (tmp_path / "pid").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model-store", "/definitely/not/here"], "--model-store: directory not found"),
        ([], "--model-store is required"),
        (["--model-store", ".", "--ts-config", "missing.properties"], "--ts-config: no such file"),
    ],
)
def test_start_errors_are_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    env = {
        **os.environ,
        "FLAMBEAU_PID_FILE": str(tmp_path / "pid"),
        "LOG_LOCATION": str(tmp_path / "logs"),
    }
    result = subprocess.run(
        [*CLI, "start", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        (tmp_path / "config.properties").write_text(
            f"inference_address=http://127.0.0.1:{port}\n"
            "management_address=http://127.0.0.1:0\n"
            "metrics_address=http://127.0.0.1:0\n"
        )
        env = {
            **os.environ,
            "FLAMBEAU_PID_FILE": str(tmp_path / "pid"),
            "LOG_LOCATION": str(tmp_path / "logs"),
        }
        result = subprocess.run(
            [*CLI, "start", "--model-store", ".", "--ncs", "--disable-token-auth"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode != 0
    assert f"inference_address: cannot listen on 127.0.0.1:{port}" in result.stderr
