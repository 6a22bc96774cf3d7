"""The compat commands answer as TorchServe's do: flags, messages, exit statuses, archives."""

from __future__ import annotations

import json
import os
import subprocess
import zipfile
from pathlib import Path

import pytest

from flambeau_torchserve.launcher import to_flambeau_argv, ts_parser
from support import Ports, compat_command, compat_env, run, write_config


def torchserve(workdir: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = run([compat_command("torchserve"), *args], workdir, env or compat_env(workdir))
    return result.returncode, result.stdout + result.stderr


def test_version(workdir: Path) -> None:
    assert torchserve(workdir, "--version") == (0, "TorchServe Version is 0.12.0\n")


def test_stop_without_a_server_says_so_and_succeeds(workdir: Path) -> None:
    assert torchserve(workdir, "--stop") == (0, "TorchServe is not currently running.\n")


def test_start_and_stop_are_mutually_exclusive(workdir: Path) -> None:
    code, output = torchserve(workdir, "--start", "--stop")
    assert code == 2
    assert "argument --stop: not allowed with argument --start" in output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--start"], "Missing mandatory parameter --model-store"),
        (["--start", "--model-store", "nowhere"], "--model-store directory not found: nowhere"),
        (["--ts-config", "missing.properties"], "--ts-config file not found: missing.properties"),
        (
            ["--start", "--model-store", ".", "--workflow-store", "nowhere"],
            "--workflow-store directory not found: nowhere",
        ),
    ],
)
def test_start_refuses_bad_flags_with_torchserves_messages(
    workdir: Path, args: list[str], message: str
) -> None:
    assert torchserve(workdir, *args) == (1, message + "\n")


def test_log_config_is_checked_as_a_real_path(workdir: Path) -> None:
    expected = f"--log-config file not found: {os.path.realpath(workdir / 'log4j2.xml')}\n"
    assert torchserve(workdir, "--start", "--log-config", "log4j2.xml") == (1, expected)


def test_invalid_temp_directory_is_refused(workdir: Path) -> None:
    env = {**compat_env(workdir), "TEMP": str(workdir / "no-such-dir")}
    code, output = torchserve(workdir, "--start", "--model-store", ".", env=env)
    assert (code, output) == (
        1,
        f"Invalid temp directory: {workdir / 'no-such-dir'}, "
        "please check TEMP environment variable.\n",
    )


def test_model_store_may_come_from_the_ts_config_file(workdir: Path) -> None:
    config = workdir / "config.properties"
    config.write_text("model_store=elsewhere\n")
    code, output = torchserve(workdir, "--start", "--ts-config", str(config))
    assert (code, output) == (1, "--model-store directory not found: elsewhere\n")


def test_flags_translate_to_flambeau_start() -> None:
    args = ts_parser().parse_args(
        [
            "--start",
            "--ncs",
            "--dt",
            "--enable-model-api",
            "--foreground",
            "--ts-config",
            "c.properties",
            "--model-store",
            "ms",
            "--workflow-store",
            "ws",
            "--models",
            "a=a.mar",
            "b.mar",
            "--log-config",
            "log4j2.xml",
            "--ppath",
            "jars",
        ]
    )
    assert to_flambeau_argv(args) == [
        "start",
        "--ts-config",
        "c.properties",
        "--model-store",
        "ms",
        "--workflow-store",
        "ws",
        "--models",
        "a=a.mar",
        "b.mar",
        "--foreground",
        "--ncs",
        "--disable-token-auth",
        "--enable-model-api",
    ]


def test_python_log_config_is_passed_on() -> None:
    args = ts_parser().parse_args(["--model-store", "ms", "--log-config", "logging.yaml"])
    assert to_flambeau_argv(args)[-2:] == ["--log-config", "logging.yaml"]


def test_torch_model_archiver_packs_a_torchserve_archive(workdir: Path) -> None:
    (workdir / "handler.py").write_text("def handle(data, context):\n    return data\n")
    result = run(
        [
            compat_command("torch-model-archiver"),
            "--model-name",
            "echo",
            "--version",
            "1.0",
            "--handler",
            "handler.py:handle",
            "--export-path",
            "store",
        ],
        workdir,
        compat_env(workdir),
    )
    assert result.returncode == 0, result.stderr
    with zipfile.ZipFile(workdir / "store" / "echo.mar") as mar:
        manifest = json.loads(mar.read("MAR-INF/MANIFEST.json"))
        assert set(mar.namelist()) == {"MAR-INF/MANIFEST.json", "handler.py"}
    assert manifest["model"] == {
        "modelName": "echo",
        "handler": "handler.py:handle",
        "modelVersion": "1.0",
    }
    assert manifest["runtime"] == "python"


def test_torch_model_archiver_usage_names_the_command(workdir: Path) -> None:
    result = run([compat_command("torch-model-archiver")], workdir, compat_env(workdir))
    assert result.returncode == 2
    assert result.stderr.startswith("usage: torch-model-archiver ")
    assert "the following arguments are required: --model-name" in result.stderr


def test_torch_workflow_archiver_packs_a_war(workdir: Path) -> None:
    (workdir / "workflow.yaml").write_text("models:\n  m:\n    url: m.mar\ndag:\n  pre: [m]\n")
    (workdir / "workflow_handler.py").write_text("def pre(data, context):\n    return data\n")
    result = run(
        [
            compat_command("torch-workflow-archiver"),
            "--workflow-name",
            "flow",
            "--spec-file",
            "workflow.yaml",
            "--handler",
            "workflow_handler.py",
        ],
        workdir,
        compat_env(workdir),
    )
    assert result.returncode == 0, result.stderr
    with zipfile.ZipFile(workdir / "flow.war") as war:
        manifest = json.loads(war.read("WAR-INF/MANIFEST.json"))
    assert manifest["workflow"] == {
        "workflowName": "flow",
        "specFile": "workflow.yaml",
        "handler": "workflow_handler.py",
    }


def test_foreground_serves_in_the_terminal_until_stopped(workdir: Path) -> None:
    (workdir / "model_store").mkdir()
    write_config(workdir / "config.properties", Ports.pick())
    env = compat_env(workdir)
    server = subprocess.Popen(
        [compat_command("torchserve"), "--foreground", "--dt", "--model-store", "model_store"],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert server.stdout is not None
        # Blocks until the server announces itself, as TorchServe's test harnesses do.
        lines = (line.rstrip("\n") for line in iter(server.stdout.readline, ""))
        assert "Model server started." in lines
        stop = run([compat_command("torchserve"), "--stop", "--foreground"], workdir, env)
        # TorchServe prints nothing after a --foreground stop that finished in time.
        assert (stop.returncode, stop.stdout) == (0, "")
        assert server.wait(timeout=30) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
