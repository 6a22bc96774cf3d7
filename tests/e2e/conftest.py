"""Shared fixtures for the end-to-end tests: test handlers, archives, module-scoped servers.

Archives are built once per session, with flambeau's archiver (``archive_main``) and with the
real ``torch-model-archiver``; each module copies the ones it needs into its own model store
and shares one real server process (``module_server``) between its tests.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from flambeau.archiver.cli import archive_main
from flambeau.testing.fixtures import Response, ServerProcess, http_request

VENV_BIN = Path(sys.executable).parent
EXTRA_PLUGINS = (
    "flambeau.plugins.builtin.workers.plugin",
    "flambeau.plugins.builtin.snapshots",
    "flambeau.plugins.builtin.dependencies",
)

# ----------------------------------------------------------------------------- handlers

PROBE = '''
"""A handler without torch: echoes what it got, does what the x-* request headers ask."""
import os
import time

from flambeau.handler.utils import send_intermediate_predict_response


def _plain(value):
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    return value


def handle(data, context):
    if data is None:  # initialisation
        return None
    out = []
    for idx, row in enumerate(data):
        def header(name):
            return context.get_request_header(idx, name)

        if header("describe") == "True":
            out.append({"handler": "probe", "pid": os.getpid()})
            continue
        if header("x-mark"):  # tells the test that this request reached the handler
            open(header("x-mark"), "w").close()
        if header("x-exit"):
            os._exit(3)
        if header("x-sleep"):
            time.sleep(float(header("x-sleep")))
        if header("x-fail"):
            raise ValueError("asked to fail")
        if header("x-status"):
            context.set_response_status(int(header("x-status")), header("x-reason") or "", idx)
        if header("x-content-type"):
            context.set_response_content_type(idx, header("x-content-type"))
        if header("x-set-header"):
            name, _, value = header("x-set-header").partition("=")
            context.set_response_header(idx, name, value)
        chunks = int(header("x-stream") or 0)
        if chunks:
            for n in range(chunks):
                send_intermediate_predict_response(
                    [f"chunk{n};"], context.request_ids, "Intermediate", 200, context
                )
            out.append("done")
            continue
        out.append(
            {
                "pid": os.getpid(),
                "model": context.model_name,
                "inputs": {
                    name: {"value": _plain(value), "content-type": header(name)["content-type"]}
                    for name, value in row.items()
                },
                "x-probe": header("x-probe"),
                "url_path": header("url_path"),
                "explain": header("explain"),
            }
        )
    return out
'''

NET = """
import torch


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        return torch.tanh(self.fc(x))
"""

LINEAR_CLASS = '''
"""A class handler (TorchServe style): BaseHandler loads Net and its weights."""
import torch

from flambeau.handler.base_handler import BaseHandler


class LinearHandler(BaseHandler):
    def preprocess(self, data):
        return torch.as_tensor([row.get("data") or row.get("body") for row in data]).float()

    def postprocess(self, data):
        return data.tolist()

    def describe_handle(self):
        return {"kind": "class handler", "outputs": 3}
'''

LINEAR_FN = '''
"""A module-function handler: handle(None, context) loads, handle(data, context) predicts."""
import os

import torch

from net import Net

model = None


def handle(data, context):
    global model
    if data is None:
        props = context.system_properties
        weights = os.path.join(props["model_dir"], context.manifest["model"]["serializedFile"])
        model = Net()
        model.load_state_dict(torch.load(weights, weights_only=True))
        model.eval()
        return None
    batch = torch.as_tensor([row.get("body") for row in data]).float()
    with torch.inference_mode():
        return model(batch).tolist()
'''

FACTORY = '''
"""Seed 002's handler_factory: an init function and per-sample pre/postprocess."""
import torch

from flambeau.handler.factory import handler_factory
from net import Net


def init_function():
    return Net()


def preprocess(sample):
    return torch.as_tensor(sample, dtype=torch.float32)


def postprocess(output):
    return {"scores": output.tolist()}


handler = handler_factory(
    init_function=init_function, preprocess_function=preprocess, postprocess_function=postprocess
)
'''

BROKEN = '''
"""A handler whose initialisation always fails."""


def handle(data, context):
    raise RuntimeError("this model cannot load")
'''

USES_DEP = '''
"""Imports the package its requirements file installs."""
import sys


def handle(data, context):
    if data is None:
        return None
    import flambeau_tinydep

    return [
        {"value": flambeau_tinydep.VALUE, "file": flambeau_tinydep.__file__, "prefix": sys.prefix}
        for _ in data
    ]
'''

# An in-tree PEP 517 backend: pip builds the package with no network and no setuptools.
TINY_BACKEND = """
import base64
import hashlib
import zipfile

NAME, VERSION = "flambeau_tinydep", "1.0"
FILES = {
    "flambeau_tinydep.py": "VALUE = 42\\n",
    f"{NAME}-{VERSION}.dist-info/METADATA": (
        f"Metadata-Version: 2.1\\nName: flambeau-tinydep\\nVersion: {VERSION}\\n"
    ),
    f"{NAME}-{VERSION}.dist-info/WHEEL": (
        "Wheel-Version: 1.0\\nGenerator: tiny\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n"
    ),
}


def _digest(data):
    raw = hashlib.sha256(data).digest()
    return "sha256=" + base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def get_requires_for_build_wheel(config_settings=None):
    return []


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    name = f"{NAME}-{VERSION}-py3-none-any.whl"
    record = f"{NAME}-{VERSION}.dist-info/RECORD"
    rows = []
    with zipfile.ZipFile(f"{wheel_directory}/{name}", "w") as wheel:
        for path, text in FILES.items():
            data = text.encode()
            wheel.writestr(path, data)
            rows.append(f"{path},{_digest(data)},{len(data)}")
        rows.append(f"{record},,")
        wheel.writestr(record, "\\n".join(rows) + "\\n")
    return name
"""


# ----------------------------------------------------------------------------- archives


def build_with_flambeau(export: Path, name: str, handler: Path | str, **options: Any) -> Path:
    """``flambeau archive`` in-process; options are the flags' names in snake case."""
    argv = ["--model-name", name, "--handler", str(handler), "--export-path", str(export), "-f"]
    argv += ["--version", str(options.pop("version", "1.0"))]
    for key, value in options.items():
        if value is not None:
            argv += [f"--{key.replace('_', '-')}", str(value)]
    assert archive_main(argv) == 0, argv
    fmt = options.get("archive_format")
    return export / (
        name if fmt == "no-archive" else f"{name}.tar.gz" if fmt == "tgz" else f"{name}.mar"
    )


def build_with_torch_model_archiver(export: Path, name: str, handler: Path, **options: Any) -> Path:
    """The real TorchServe ``torch-model-archiver`` 0.12 (a separate process)."""
    argv = [str(VENV_BIN / "torch-model-archiver"), "--model-name", name]
    argv += ["--handler", str(handler), "--export-path", str(export), "-f"]
    argv += ["--version", str(options.pop("version", "1.0"))]
    for key, value in options.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    subprocess.run(argv, check=True, capture_output=True, timeout=120)
    return export / f"{name}.mar"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def load_module(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Sources:
    """The test handlers and model files of the session, and the archives built from them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.src = root / "src"
        self.archives = root / "archives"
        self.archives.mkdir(parents=True)
        self.probe = write(self.src / "probe.py", PROBE)
        self.net = write(self.src / "net.py", NET)
        self.linear_class = write(self.src / "linear_class.py", LINEAR_CLASS)
        self.linear_fn = write(self.src / "linear_fn.py", LINEAR_FN)
        self.factory = write(self.src / "factory_model.py", FACTORY)
        self.broken = write(self.src / "broken.py", BROKEN)
        self.uses_dep = write(self.src / "uses_dep.py", USES_DEP)
        self._built: dict[str, Path] = {}
        self._weights: Path | None = None

    def yaml(self, name: str, text: str) -> Path:
        return write(self.src / f"{name}.yaml", text)

    @property
    def weights(self) -> Path:
        """A state dict for Net, deterministic (torch imported only by tests that need it)."""
        if self._weights is None:
            import torch

            torch.manual_seed(7)
            net = load_module(self.net, "e2e_net").Net()
            self._weights = self.src / "net.pt"
            torch.save(net.state_dict(), self._weights)
        return self._weights

    def expected(self, rows: Sequence[Sequence[float]]) -> list[list[float]]:
        """What Net with these weights answers, computed here, outside the server."""
        import torch

        net = load_module(self.net, "e2e_net").Net()
        net.load_state_dict(torch.load(self.weights, weights_only=True))
        net.eval()
        with torch.inference_mode():
            return net(torch.tensor(rows, dtype=torch.float32)).tolist()

    def archive(self, key: str) -> Path:
        """Build (once) and return the archive called ``key``."""
        if key not in self._built:
            self._built[key] = self._build(key)
        return self._built[key]

    def _build(self, key: str) -> Path:
        out = self.archives
        one_worker = "minWorkers: 1\nmaxWorkers: 1\n"
        if key == "probe":
            return build_with_flambeau(out, "probe", self.probe)
        if key == "probe_v2":
            return build_with_flambeau(
                out / "v2",
                "probe",
                self.probe,
                version="2.0",
                config_file=self.yaml("v2", "batchSize: 2\n"),
            )
        if key == "probe_dir":
            return build_with_flambeau(out, "probe_dir", self.probe, archive_format="no-archive")
        if key == "probe_timeout":
            config = self.yaml("timeout", one_worker + "responseTimeout: 1\n")
            return build_with_flambeau(out, "probe_timeout", self.probe, config_file=config)
        if key == "probe_queue":
            config = self.yaml("queue", one_worker + "jobQueueSize: 2\n")
            return build_with_flambeau(out, "probe_queue", self.probe, config_file=config)
        if key == "tma_probe":
            return build_with_torch_model_archiver(out, "tma_probe", self.probe)
        if key == "broken":
            return build_with_flambeau(out, "broken", self.broken)
        if key == "linear_class":
            return build_with_flambeau(
                out,
                "linear_class",
                self.linear_class,
                model_file=self.net,
                serialized_file=self.weights,
                config_file=self.yaml("linear", one_worker),
            )
        if key == "linear_fn":
            return build_with_flambeau(
                out,
                "linear_fn",
                self.linear_fn,
                serialized_file=self.weights,
                extra_files=self.net,
                config_file=self.yaml("linear", one_worker),
            )
        if key == "factory":
            config = self.yaml("factory", one_worker + "batchSize: 4\nmaxBatchDelay: 200\n")
            return build_with_flambeau(
                out,
                "factory",
                f"{self.factory}:handler",
                serialized_file=self.weights,
                extra_files=self.net,
                config_file=config,
            )
        if key in ("uses_dep", "uses_dep_venv", "bad_dep"):
            return self._dependency_archive(key)
        raise KeyError(key)

    def _dependency_archive(self, key: str) -> Path:
        package = self.root / "tinydep"
        if not package.exists():
            write(package / "tiny_backend.py", TINY_BACKEND)
            write(
                package / "pyproject.toml",
                """
                [build-system]
                requires = []
                build-backend = "tiny_backend"
                backend-path = ["."]
                """,
            )
        requirement = str(package) if key != "bad_dep" else "flambeau-no-such-dist==9.9.9"
        requirements = write(self.src / key / "requirements.txt", requirement + "\n")
        config = None
        if key == "uses_dep_venv":
            config = self.yaml("venv", "useVenv: true\n")
        return build_with_flambeau(
            self.archives,
            key,
            self.uses_dep,
            requirements_file=requirements,
            config_file=config,
        )


@pytest.fixture(scope="session")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Sources:
    return Sources(tmp_path_factory.mktemp("e2e-sources"))


def store_with(sources: Sources, store: Path, *keys: str) -> Path:
    """Copy the named archives into ``store`` (directories too)."""
    store.mkdir(parents=True, exist_ok=True)
    for key in keys:
        archive = sources.archive(key)
        if archive.is_dir():
            shutil.copytree(archive, store / archive.name)
        else:
            shutil.copy2(archive, store / archive.name)
    return store


# ----------------------------------------------------------------------------- servers


def plugin_args() -> list[str]:
    """``-p`` for the plugins this task adds, until they are registered as entry points."""
    registered = {ep.value for ep in importlib.metadata.entry_points(group="flambeau")}
    args: list[str] = []
    for module in EXTRA_PLUGINS:
        if module not in registered:
            args += ["-p", module]
    return args


@contextlib.contextmanager
def cpus_limited(count: int) -> Iterator[int]:
    """Run the block (a server start) on at most ``count`` CPUs; yields how many it got.

    A child inherits the affinity, so a server started here counts exactly these CPUs.
    """
    if not hasattr(os, "sched_setaffinity"):
        yield os.cpu_count() or 1
        return
    before = os.sched_getaffinity(0)
    chosen = set(sorted(before)[:count])
    os.sched_setaffinity(0, chosen)
    try:
        yield len(chosen)
    finally:
        os.sched_setaffinity(0, before)


def distinct_addresses() -> dict[str, str]:
    """One port per listener, as in production: three ``:0`` addresses are one address to the
    server, which then serves all three APIs on one listener."""
    return {
        key: f"http://127.0.0.1:{free_port()}"
        for key in ("inference_address", "management_address", "metrics_address")
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class SafeServerProcess(ServerProcess):
    """A ServerProcess whose ``stop`` can never hit another process group.

    ``killpg`` runs while the stopped server is still unreaped (a zombie keeps its pid, so the
    group id cannot have been reused), and a second ``stop`` does nothing. Killing the group
    of a pid that was already reaped could kill an unrelated server on a busy machine, where
    pids wrap around within minutes.
    """

    _stopped = False

    def stop(self, timeout: float = 30.0) -> int | None:
        if self._stopped:
            return self.process.returncode
        self._stopped = True
        pid = self.process.pid
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and not _exited(pid):
                time.sleep(0.02)
            # The leader is not reaped yet: its group id still names only its own processes.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(5)
        self.output.close()
        return self.process.returncode


def _exited(pid: int) -> bool:
    """Whether child ``pid`` has exited, without reaping it."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return info is not None


ServerStarter = Callable[..., ServerProcess]


@pytest.fixture(scope="module")
def module_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerStarter]:
    """Starts real servers shared by a module's tests (token auth off unless asked)."""
    started: list[ServerProcess] = []

    def start(
        *,
        model_store: Path,
        config: Mapping[str, str] | None = None,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        auth: bool = False,
    ) -> ServerProcess:
        workdir = tmp_path_factory.mktemp("server")
        argv = [*plugin_args(), *([] if auth else ["--disable-token-auth"]), *args]
        merged = {**distinct_addresses(), **(config or {})}
        server = SafeServerProcess(
            workdir, model_store=model_store, config=merged, args=argv, env=env
        )
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


class CwdConfigServer(SafeServerProcess):
    """A server started like ``flambeau start`` in a directory holding config.properties,
    without ``--ts-config`` (the case where TorchServe restores the newest snapshot)."""

    def __init__(
        self,
        workdir: Path,
        *,
        model_store: Path,
        log_dir: Path,
        args: Sequence[str] = (),
        config: Mapping[str, str] | None = None,
        timeout: float = 60.0,
    ) -> None:
        self.workdir = workdir
        self.model_store = model_store
        self.ready_file = workdir / "ready.json"
        self.ready_file.unlink(missing_ok=True)
        (workdir / "config.properties").write_text(
            "inference_address=http://127.0.0.1:0\n"
            "management_address=http://127.0.0.1:0\n"
            "metrics_address=http://127.0.0.1:0\n"
            "grpc_inference_port=0\ngrpc_management_port=0\n"
            + "".join(f"{k}={v}\n" for k, v in (config or {}).items())
        )
        self.log_dir = log_dir
        cmd = [sys.executable, "-m", "flambeau.core.cli", "start", "--foreground"]
        cmd += ["--model-store", str(model_store), "--ready-file", str(self.ready_file)]
        cmd += [*plugin_args(), "--disable-token-auth", "--enable-model-api", *args]
        env = {**os.environ, "LOG_LOCATION": str(log_dir)}
        env.pop("TS_CONFIG_FILE", None)
        env["FLAMBEAU_PID_FILE"] = str(workdir / "server.pid")
        self.output = (workdir / "server.out").open("ab")
        self.process = subprocess.Popen(
            cmd,
            cwd=workdir,
            env=env,
            stdout=self.output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.addresses = self._wait_ready(timeout)


# ----------------------------------------------------------------------------- helpers


class Helpers:
    """What the e2e modules share besides fixtures (conftest cannot be imported reliably)."""

    CwdConfigServer = CwdConfigServer
    plugin_args = staticmethod(plugin_args)
    cpus_limited = staticmethod(cpus_limited)
    store_with = staticmethod(store_with)
    http_request = staticmethod(http_request)

    @staticmethod
    def api(server: ServerProcess, method: str, path: str, **kwargs: Any) -> Response:
        """A management API request."""
        return server.request(method, "management", path, **kwargs)

    @staticmethod
    def predict(server: ServerProcess, path: str, body: Any = b"", **kwargs: Any) -> Response:
        """An inference request; a body that is not bytes or str is sent as JSON."""
        headers = dict(kwargs.pop("headers", None) or {})
        if not isinstance(body, bytes | str):
            body = json.dumps(body)
            headers.setdefault("Content-Type", "application/json")
        method = kwargs.pop("method", "POST")
        return server.request(method, "inference", path, body=body, headers=headers, **kwargs)

    @classmethod
    def describe(cls, server: ServerProcess, model: str) -> dict[str, Any]:
        response = cls.api(server, "GET", f"/models/{model}")
        assert response.status == 200, response.body
        return dict(response.json()[0])

    @staticmethod
    def wait_for(condition: Callable[[], Any], timeout: float = 30.0, what: str = "it") -> Any:
        """Poll ``condition`` until it returns something truthy (workers coming up)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}")

    @classmethod
    def ready_pids(cls, server: ServerProcess, model: str) -> list[int]:
        """The pids of the model's READY workers.

        pid -1 is skipped: while a dead worker is being stopped, the pool still reports its
        slot READY without a process (reported to the core's owner).
        """
        workers = cls.describe(server, model)["workers"]
        return [w["pid"] for w in workers if w["status"] == "READY" and w["pid"] > 0]


@pytest.fixture(scope="session")
def e2e() -> type[Helpers]:
    return Helpers
