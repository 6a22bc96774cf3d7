"""pytest fixtures for flambeau and its plugin authors (registered as the ``flambeau`` pytest11
plugin).

``flambeau_server`` starts the real server as a separate process on free loopback ports and
reads the bound addresses from its ready file; ``ServerProcess.request`` talks to it over real
HTTP. Example::

    def test_ping(flambeau_server):
        server = flambeau_server(args=["--disable-token-auth"])
        assert server.request("GET", "inference", "/ping").json() == {"status": "Healthy"}
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from flambeau.core.cli import descendants, kill_survivors

LOOPBACK_CONFIG = {
    "inference_address": "http://127.0.0.1:0",
    "management_address": "http://127.0.0.1:0",
    "metrics_address": "http://127.0.0.1:0",
    "grpc_inference_port": "0",
    "grpc_management_port": "0",
}


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    reason: str
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        for key, value in self.headers.items():
            if key.lower() == name.lower():
                return value
        return None


def http_request(
    url: str,
    method: str = "GET",
    path: str = "/",
    *,
    body: bytes | str | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 60.0,
) -> Response:
    """One HTTP request on a fresh connection (no client-side pooling to hide server bugs)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=timeout)
    try:
        payload = body.encode() if isinstance(body, str) else body
        conn.request(method, path, body=payload, headers=dict(headers or {}))
        resp = conn.getresponse()
        data = resp.read()
        return Response(resp.status, resp.reason, dict(resp.getheaders()), data)
    finally:
        conn.close()


class ServerProcess:
    """A flambeau server running as a child process, in its own session and working dir."""

    def __init__(
        self,
        workdir: Path,
        *,
        model_store: Path,
        config: Mapping[str, str] | None = None,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        timeout: float = 60.0,
    ) -> None:
        self.workdir = workdir
        self.model_store = model_store
        self.ready_file = workdir / "ready.json"
        self.ready_file.unlink(missing_ok=True)
        config_path = workdir / "config.properties"
        merged = {**LOOPBACK_CONFIG, **(config or {})}
        config_path.write_text("".join(f"{k}={v}\n" for k, v in merged.items()))
        self.log_dir = workdir / "logs"
        cmd = [
            sys.executable,
            "-m",
            "flambeau.core.cli",
            "start",
            "--foreground",
            "--model-store",
            str(model_store),
            "--ts-config",
            str(config_path),
            "--ready-file",
            str(self.ready_file),
            *args,
        ]
        child_env = {
            **os.environ,
            "LOG_LOCATION": str(self.log_dir),
            "FLAMBEAU_PID_FILE": str(workdir / "server.pid"),
            **(env or {}),
        }
        self.output = (workdir / "server.out").open("wb")
        self.process = subprocess.Popen(
            cmd,
            cwd=workdir,
            env=child_env,
            stdout=self.output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.addresses = self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready_file.exists():
                return dict(json.loads(self.ready_file.read_text())["addresses"])
            if self.process.poll() is not None:
                raise RuntimeError(f"flambeau exited with {self.process.returncode}:\n{self.log()}")
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"flambeau did not become ready in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        self.output.flush()
        return (self.workdir / "server.out").read_text(errors="replace")[-6000:]

    @property
    def keys(self) -> dict[str, Any]:
        return dict(json.loads((self.workdir / "key_file.json").read_text()))

    def url(self, listener: str) -> str:
        return self.addresses[listener]

    def request(self, method: str, listener: str, path: str, **kwargs: Any) -> Response:
        return http_request(self.url(listener), method, path, **kwargs)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, wait for the drain, then kill whatever the server left running (its
        workers, if it crashed). Safe to call twice: a reaped pid is never signalled."""
        if self.process.poll() is None:
            family = descendants(self.process.pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout)
            kill_survivors(family)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(5)
        if not self.output.closed:
            self.output.close()
        return self.process.returncode


ServerFactory = Callable[..., ServerProcess]


@pytest.fixture
def flambeau_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerFactory]:
    """A factory starting real flambeau servers; every server is stopped at teardown."""
    started: list[ServerProcess] = []

    def start(
        *,
        model_store: Path | None = None,
        config: Mapping[str, str] | None = None,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> ServerProcess:
        workdir = tmp_path_factory.mktemp("flambeau")
        store = model_store or workdir / "model_store"
        store.mkdir(exist_ok=True)
        server = ServerProcess(workdir, model_store=store, config=config, args=args, env=env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
