"""The ``torchserve`` command: TorchServe 0.12's flags and messages, served by ``flambeau``.

The flags are checked as TorchServe's launcher checks them, with its messages and exit
statuses, then translated to ``flambeau start`` / ``flambeau stop``, which print TorchServe's
wording (``Model server started.``, ``TorchServe has stopped.``...). The pid file is
TorchServe's, ``$TMPDIR/.model_server.pid``. Java-only flags (``--plugins-path``, a log4j2
``--log-config``, ``--cpp-log-config``) are accepted and ignored with a note on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flambeau.core.cli import CliMessages

__all__ = ["main", "pid_file", "to_flambeau_argv", "ts_parser", "validate"]

TORCHSERVE_VERSION = "0.12.0"
PID_FILE_NAME = ".model_server.pid"


def ts_parser() -> argparse.ArgumentParser:
    """TorchServe 0.12's ``torchserve`` parser: the same flags, destinations and help."""
    parser = argparse.ArgumentParser(prog="torchserve", description="Torchserve")
    action = parser.add_mutually_exclusive_group(required=False)
    action.add_argument("-v", "--version", action="store_true", help="Return TorchServe Version")
    action.add_argument("--start", action="store_true", help="Start the model-server")
    action.add_argument("--stop", action="store_true", help="Stop the model-server")
    parser.add_argument("--ts-config", dest="ts_config", help="Configuration file for model server")
    parser.add_argument(
        "--model-store",
        dest="model_store",
        help="Model store location from where local or default models can be loaded",
    )
    parser.add_argument(
        "--workflow-store",
        dest="workflow_store",
        help="Workflow store location from where local or default workflows can be loaded",
    )
    parser.add_argument(
        "--models",
        metavar="MODEL_PATH1 MODEL_NAME=MODEL_PATH2...",
        nargs="+",
        help="Models to be loaded using [model_name=]model_location format. "
        "Location can be a HTTP URL or a model archive file in MODEL_STORE.",
    )
    parser.add_argument(
        "--log-config",
        dest="log_config",
        help="Logging configuration: Python logging (.json, .yaml, .ini); "
        "a log4j2 .xml file is ignored",
    )
    parser.add_argument(
        "--cpp-log-config",
        dest="cpp_log_config",
        help="log configuration file for cpp backend (ignored: flambeau has no C++ backend)",
    )
    parser.add_argument(
        "--foreground",
        action="store_true",
        help="Run the model server in foreground. If this option is disabled, the model server"
        " will run in the background.",
    )
    parser.add_argument(
        "--no-config-snapshots",
        "--ncs",
        dest="no_config_snapshots",
        action="store_true",
        help="Prevents to server from storing config snapshot files.",
    )
    parser.add_argument(
        "--plugins-path",
        "--ppath",
        dest="plugins_path",
        help="plugin jars to be included in torchserve class path (ignored: no JVM)",
    )
    parser.add_argument(
        "--disable-token-auth",
        "--dt",
        dest="token_auth",
        action="store_true",
        help="if this option is set then token authorization is disabled",
    )
    parser.add_argument(
        "--enable-model-api",
        dest="model_mode",
        action="store_true",
        help="enables model control apis",
    )
    return parser


def pid_file() -> Path:
    """TorchServe's pid file, which flambeau then uses as its own."""
    return Path(tempfile.gettempdir()) / PID_FILE_NAME


def _messages() -> CliMessages:
    from flambeau.core.cli import CliMessages

    return CliMessages(
        started="Model server started.",
        already_running=(
            "TorchServe is already running, please use torchserve --stop to stop TorchServe."
        ),
        not_running="TorchServe is not currently running.",
        stopped="TorchServe has stopped.",
    )


def _is_log4j(path: str) -> bool:
    return path.lower().endswith(".xml")


def _config_model_store(ts_config: str | None) -> str | None:
    # TorchServe's launcher reads only model_store from the --ts-config file, verbatim.
    if not ts_config:
        return None
    from flambeau.properties import parse_properties

    return parse_properties(Path(ts_config).read_text(encoding="utf-8")).get("model_store")


def validate(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> str | None:
    """The first problem TorchServe's launcher would report for a start, in its words."""
    env: Mapping[str, str] = os.environ if environ is None else environ
    if args.log_config and not os.path.isfile(os.path.realpath(args.log_config)):
        return f"--log-config file not found: {os.path.realpath(args.log_config)}"
    temp = env.get("TEMP")
    if temp and not os.path.isdir(temp):
        return f"Invalid temp directory: {temp}, please check TEMP environment variable."
    ts_config = env.get("TS_CONFIG_FILE") or args.ts_config
    if ts_config and not os.path.isfile(ts_config):
        return f"--ts-config file not found: {ts_config}"
    model_store = args.model_store or _config_model_store(ts_config)
    if not model_store:
        return "Missing mandatory parameter --model-store"
    if not os.path.isdir(model_store):
        return f"--model-store directory not found: {model_store}"
    if args.workflow_store and not os.path.isdir(args.workflow_store):
        return f"--workflow-store directory not found: {args.workflow_store}"
    if args.cpp_log_config and not os.path.isfile(os.path.realpath(args.cpp_log_config)):
        return f"--cpp-log-config file not found: {os.path.realpath(args.cpp_log_config)}"
    return None


def ignored(args: argparse.Namespace) -> list[str]:
    """Notes for the flags that only meant something to TorchServe's Java frontend."""
    notes = []
    if args.log_config and _is_log4j(args.log_config):
        notes.append(
            f"--log-config {args.log_config} is a log4j2 file; flambeau logs through Python "
            "logging (give a .json, .yaml or .ini dictConfig/fileConfig): ignored"
        )
    if args.cpp_log_config:
        notes.append("--cpp-log-config: flambeau has no C++ backend: ignored")
    if args.plugins_path:
        notes.append(
            "--plugins-path: Java plugins do not apply; flambeau plugins are Python packages "
            "(see 'flambeau plugins'): ignored"
        )
    return notes


def to_flambeau_argv(args: argparse.Namespace) -> list[str]:
    """``flambeau start`` arguments equivalent to a ``torchserve --start`` command line."""
    argv = ["start"]
    for flag, value in (
        ("--ts-config", args.ts_config),
        ("--model-store", args.model_store),
        ("--workflow-store", args.workflow_store),
    ):
        if value:
            argv += [flag, value]
    if args.models:
        argv += ["--models", *args.models]
    if args.log_config and not _is_log4j(args.log_config):
        argv += ["--log-config", args.log_config]
    for flag, on in (
        ("--foreground", args.foreground),
        ("--ncs", args.no_config_snapshots),
        ("--disable-token-auth", args.token_auth),
        ("--enable-model-api", args.model_mode),
    ):
        if on:
            argv.append(flag)
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``torchserve``; returns the exit status TorchServe's launcher would."""
    from flambeau.core.cli import PID_ENV
    from flambeau.core.cli import main as flambeau_main

    args = ts_parser().parse_args(argv)
    if args.version:
        print(f"TorchServe Version is {TORCHSERVE_VERSION}")
        return 0
    os.environ[PID_ENV] = str(pid_file())
    messages = _messages()
    if args.stop:
        # TorchServe says nothing after a --foreground stop that finished in time.
        flambeau_main(["stop"], replace(messages, stopped="") if args.foreground else messages)
        return 0  # TorchServe's --stop succeeds whether or not a server was running
    problem = validate(args)
    if problem is not None:
        print(problem)
        return 1
    for note in ignored(args):
        print(f"flambeau: note: {note}", file=sys.stderr)
    return flambeau_main(to_flambeau_argv(args), messages)
