"""Fixtures for the gRPC plugin tests: client stubs made from our .proto files, test archives,
and real servers (one per test module) with the workers and gRPC plugins loaded.

The client stubs are generated at test time with grpc_tools.protoc from the plugin's .proto
files, so every call here proves that those files are what a client would compile.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Iterator, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

import pytest

from flambeau.archiver.cli import archive_main
from flambeau.plugins.builtin.grpc.stubs import load_stubs
from flambeau.testing.fixtures import ServerProcess

HERE = Path(__file__).resolve().parent


def plugin_flags(*modules: str) -> list[str]:
    """``-p MODULE`` for each plugin module no entry point registers yet (the loader refuses a
    module that is given twice)."""
    registered = {ep.value.split(":")[0] for ep in metadata.entry_points(group="flambeau")}
    return [flag for module in modules if module not in registered for flag in ("-p", module)]


PLUGINS = plugin_flags(
    "flambeau.plugins.builtin.workers.plugin", "flambeau.plugins.builtin.grpc.plugin"
)

# A TorchServe-style module-function handler driven by its named inputs (gRPC map entries).
HANDLER = textwrap.dedent(
    """
    import json
    import time

    from flambeau.handler.utils import PredictionException, send_intermediate_predict_response

    VERSION = "{version}"


    def _text(row, key, default=""):
        value = row.get(key, default)
        return value.decode() if isinstance(value, (bytes, bytearray)) else str(value)


    def _answer(row, idx, context):
        op = _text(row, "op", "echo")
        if op == "stream":
            for i in range(int(_text(row, "n"))):
                send_intermediate_predict_response(
                    {{idx: f"chunk{{i}}"}}, {{idx: context.get_request_id(idx)}},
                    "Intermediate Prediction success", 200, context,
                )
            return "done"
        if op == "fail":
            raise PredictionException(_text(row, "message"), int(_text(row, "code")))
        if op == "status":
            context.set_response_status(int(_text(row, "code")), _text(row, "phrase"), idx)
            return "handler said no"
        if op == "big":
            return b"x" * int(_text(row, "n"))
        if op == "sleep":
            with open(_text(row, "marker"), "w") as marker:
                marker.write("running")
            time.sleep(float(_text(row, "seconds")))
            return "slept"
        header = lambda key: context.get_request_header(idx, key)  # noqa: E731
        return json.dumps({{
            "version": VERSION,
            "sizes": {{name: len(value) for name, value in sorted(row.items())}},
            "sequence": header("ts_request_sequence_id"),
            "start": header("ts_request_sequence_start"),
            "end": header("ts_request_sequence_end"),
            "describe": header("describe"),
        }})


    def handle(data, context):
        if data is None:
            return None
        return [_answer(row, idx, context) for idx, row in enumerate(data)]
    """
)


def build_echo_archive(store: Path, version: str = "1.0", file_name: str = "echo") -> Path:
    """An ``echo`` model archive (handler only, no weights) saved as ``store/<file_name>.mar``."""
    source = store.parent / f"src-{file_name}"
    source.mkdir(parents=True, exist_ok=True)
    handler = source / "echo_handler.py"
    handler.write_text(HANDLER.format(version=version))
    code = archive_main(
        [
            "--model-name",
            "echo",
            "--version",
            version,
            "--handler",
            str(handler),
            "--export-path",
            str(source),
            "--force",
        ]
    )
    assert code == 0
    store.mkdir(parents=True, exist_ok=True)
    return (source / "echo.mar").replace(store / f"{file_name}.mar")


@pytest.fixture(scope="session")
def stubs(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """``inference_pb2``, ``inference_pb2_grpc``, ``management_pb2``, ``management_pb2_grpc``."""
    return load_stubs(tmp_path_factory.mktemp("grpc-stubs"))


StartServer = Callable[..., ServerProcess]


@pytest.fixture(scope="module")
def start_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartServer]:
    """Start real flambeau servers for one test module; all stopped when the module ends."""
    started: list[ServerProcess] = []

    def start(
        *,
        config: Mapping[str, str] | None = None,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        archives: Sequence[tuple[str, str]] = (),
    ) -> ServerProcess:
        workdir = tmp_path_factory.mktemp("flambeau-grpc")
        store = workdir / "model_store"
        for version, file_name in archives:
            build_echo_archive(store, version, file_name)
        store.mkdir(exist_ok=True)
        server = ServerProcess(
            workdir, model_store=store, config=config, args=[*PLUGINS, *args], env=env
        )
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
