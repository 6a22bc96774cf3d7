"""Helpers of the compatibility tests: the compat commands, the real archiver, free ports.

Every server here is started by the ``torchserve`` command of the environment under test, in
a temporary working directory whose ``TMPDIR`` holds TorchServe's pid file, so parallel runs
never see each other's server.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[4]
BIN = Path(sys.executable).parent
REAL_ARCHIVER_ENV = "REAL_TORCH_MODEL_ARCHIVER"


def compat_command(name: str) -> str:
    """A console script this distribution installed next to the running interpreter."""
    path = BIN / name
    assert path.exists(), f"{name} is not installed in {BIN}: pip install flambeau-torchserve"
    return str(path)


def _is_real_archiver(path: Path) -> bool:
    # The real tool's console script imports TorchServe's package; ours imports flambeau's.
    try:
        return "model_archiver.model_packaging" in path.read_text(errors="replace")
    except OSError:
        return False


def find_real_archiver() -> tuple[Path | None, str]:
    """The real torch-model-archiver 0.12.0, or None and why it is not there."""
    named = os.environ.get(REAL_ARCHIVER_ENV)
    if named:
        path = Path(named)
        if _is_real_archiver(path):
            return path, ""
        return None, f"{REAL_ARCHIVER_ENV}={named} is not TorchServe's torch-model-archiver"
    candidate = REPO_ROOT / ".venv" / "bin" / "torch-model-archiver"
    if _is_real_archiver(candidate):
        return candidate, ""
    return None, (
        f"the real torch-model-archiver 0.12.0 was not found: set {REAL_ARCHIVER_ENV} to its "
        f"executable or create {REPO_ROOT / '.venv'} (scripts/setup.sh)"
    )


def free_ports(count: int) -> list[int]:
    """Loopback ports free right now (the torchserve command takes fixed addresses)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass(frozen=True, slots=True)
class Ports:
    inference: int
    management: int
    metrics: int

    @classmethod
    def pick(cls) -> Ports:
        return cls(*free_ports(3))

    def url(self, listener: str) -> str:
        return f"http://127.0.0.1:{getattr(self, listener)}"


def write_config(path: Path, ports: Ports, extra: Mapping[str, str] | None = None) -> Path:
    """A TorchServe config.properties binding everything to free loopback ports."""
    values = {
        "inference_address": ports.url("inference"),
        "management_address": ports.url("management"),
        "metrics_address": ports.url("metrics"),
        "grpc_inference_port": "0",
        "grpc_management_port": "0",
        "default_workers_per_model": "1",
        **(extra or {}),
    }
    path.write_text("".join(f"{key}={value}\n" for key, value in values.items()))
    return path


def compat_env(workdir: Path) -> dict[str, str]:
    """The environment a user's shell would have, with this run's own TMPDIR and PATH."""
    tmp = workdir / "tmp"
    tmp.mkdir(exist_ok=True)
    env = {key: value for key, value in os.environ.items() if not key.startswith("FLAMBEAU_")}
    env.update(TMPDIR=str(tmp), PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    return env


def run(
    argv: Sequence[str], workdir: Path, env: Mapping[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv),
        check=False,
        cwd=workdir,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def kill_leftover(env: Mapping[str, str]) -> None:
    """Kill a server a failed test left behind (its pid is in TorchServe's pid file)."""
    pid_file = Path(env["TMPDIR"]) / ".model_server.pid"
    with contextlib.suppress(OSError, ValueError):
        pid = int(pid_file.read_text().strip())
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


def post_chunked(
    url: str, path: str, body: bytes, headers: Mapping[str, str], timeout: float = 30
) -> tuple[int, dict[str, str], list[bytes]]:
    """POST over a raw socket and return the response's HTTP chunks one by one.

    http.client joins chunks; a streaming handler's contract is the chunk boundaries.
    """
    host, port = url.removeprefix("http://").split(":")
    head = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", f"Content-Length: {len(body)}"]
    head += [f"{name}: {value}" for name, value in headers.items()]
    head.append("Connection: close")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        received = b""
        while data := sock.recv(65536):
            received += data
    raw_head, _, rest = received.partition(b"\r\n\r\n")
    status_line, *header_lines = raw_head.decode("latin-1").split("\r\n")
    response_headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        response_headers[name.strip().lower()] = value.strip()
    assert response_headers.get("transfer-encoding") == "chunked", response_headers
    chunks = []
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        chunks.append(rest[:size])
        rest = rest[size + 2 :]
    return int(status_line.split()[1]), response_headers, chunks
