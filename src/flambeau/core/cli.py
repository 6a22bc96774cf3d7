"""The ``flambeau`` command: start, stop, plugins, and the sub-commands plugins add.

``flambeau start`` takes TorchServe's flags, daemonizes (a detached child in its own session),
waits until the child is listening, prints ``Model server started.`` and exits; ``--foreground``
serves in this process. ``flambeau stop`` sends SIGTERM, waits for the drain, and kills
whatever is left of the process group, so no worker outlives the server. Plugin flags come
first, pytest-style: ``-p MODULE``, ``-p no:NAME``, ``--disable-plugin-autoload``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from flambeau import __version__

# The launcher (`flambeau start` without --foreground) only spawns the server and waits for
# it: asyncio and flambeau.api (pluggy, the spec dataclasses) are imported where used, so the
# launcher does not pay for them and the server answers sooner.
if TYPE_CHECKING:
    import psutil

    from flambeau.api import CliOption
    from flambeau.core.config import Config
    from flambeau.core.plugins import PluginSet

PID_ENV = "FLAMBEAU_PID_FILE"
STARTED = "Model server started."


@dataclass(frozen=True, slots=True)
class CliMessages:
    """What ``start`` and ``stop`` print on stdout; an empty string prints nothing.

    The ``torchserve`` compatibility command passes TorchServe's wording, which scripts grep
    for. ``already_running`` may use ``{pid}``.
    """

    started: str = STARTED
    already_running: str = (
        "Model server is already running (pid {pid}), please use flambeau stop first."
    )
    not_running: str = "Model server is not currently running."
    stopped: str = "Model server has stopped."


MESSAGES = CliMessages()


def _say(message: str, **fields: object) -> None:
    if message:
        print(message.format(**fields), flush=True)


def pid_file() -> Path:
    return Path(os.environ.get(PID_ENV) or Path(tempfile.gettempdir()) / ".flambeau_server.pid")


def _plugin_flags(argv: Sequence[str]) -> tuple[list[str], bool]:
    flags: list[str] = []
    disable = False
    it = iter(argv)
    for arg in it:
        if arg == "-p":
            flags.append(next(it, ""))
        elif arg.startswith("-p") and len(arg) > 2:
            flags.append(arg[2:])
        elif arg == "--disable-plugin-autoload":
            disable = True
    return flags, disable


def _first_positional(argv: Sequence[str]) -> str | None:
    """The sub-command name: the first argument that is neither a flag nor a ``-p`` value."""
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "-p":
            skip = True
        elif not arg.startswith("-"):
            return arg
    return None


def _add_plugin_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-p",
        dest="plugins",
        action="append",
        default=[],
        metavar="MODULE|no:NAME",
        help="load a plugin module, or block a plugin by name (no:NAME)",
    )
    parser.add_argument(
        "--disable-plugin-autoload",
        action="store_true",
        help="load only flambeau's builtin plugins (also FLAMBEAU_DISABLE_PLUGIN_AUTOLOAD=1)",
    )


def _add_start_args(parser: argparse.ArgumentParser, options: Sequence[CliOption]) -> None:
    parser.add_argument("--model-store", help="directory holding model archives")
    parser.add_argument("--workflow-store", help="directory holding workflow archives")
    parser.add_argument(
        "--models", nargs="+", metavar="[NAME=]ARCHIVE", help="models to load, or all"
    )
    parser.add_argument("--ts-config", help="config.properties file")
    parser.add_argument("--log-config", help="Python logging config (.json, .yaml or .ini)")
    parser.add_argument(
        "--ncs",
        "--no-config-snapshots",
        dest="ncs",
        action="store_true",
        help="do not write or restore config snapshots",
    )
    parser.add_argument("--foreground", action="store_true", help="serve in this process")
    parser.add_argument(
        "--disable-token-auth",
        "--dt",
        dest="disable_token_auth",
        action="store_true",
        help="turn token authentication off",
    )
    parser.add_argument(
        "--enable-model-api",
        action="store_true",
        help="allow registering and unregistering models through the API",
    )
    parser.add_argument("--ready-file", help="write the bound addresses here (JSON) when ready")
    for option in options:
        kwargs: dict[str, object] = {"help": option.help}
        if option.action:
            kwargs["action"] = option.action
        if option.default is not None:
            kwargs["default"] = option.default
        if option.config_key:
            kwargs["dest"] = "cfg__" + option.config_key
        parser.add_argument(*option.flags, **kwargs)  # type: ignore[arg-type]


def build_parser(plugins: PluginSet) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flambeau", description="A PyTorch model server.")
    parser.add_argument("--version", action="version", version=f"flambeau {__version__}")
    _add_plugin_args(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    start = sub.add_parser("start", help="start the model server")
    _add_plugin_args(start)
    _add_start_args(start, plugins.hooks.cli_options())
    stop = sub.add_parser("stop", help="stop the model server started by 'flambeau start'")
    stop.add_argument("--foreground", action="store_true", help="accepted for TorchServe parity")
    listing = sub.add_parser("plugins", help="list the loaded plugins")
    _add_plugin_args(listing)
    for command in plugins.hooks.commands():
        sub.add_parser(command.name, help=command.help, add_help=False)
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    """Merge config file and flags; validate what can be checked before listening."""
    from flambeau.api import ConfigError

    config_file = os.environ.get("TS_CONFIG_FILE") or args.ts_config
    if config_file and not Path(config_file).is_file():
        raise ConfigError(f"--ts-config: no such file {config_file}")
    if not config_file and Path("config.properties").is_file():
        config_file = "config.properties"
    cli: dict[str, str | None] = {
        "model_store": args.model_store,
        "workflow_store": args.workflow_store,
        "load_models": ",".join(args.models) if args.models else None,
        "disable_token_authorization": "true" if args.disable_token_auth else None,
        "enable_model_api": "true" if args.enable_model_api else None,
        "snapshot_enabled": "false" if args.ncs else None,
    }
    for key, value in vars(args).items():
        if key.startswith("cfg__") and value is not None:
            cli[key[5:]] = str(value).lower() if isinstance(value, bool) else str(value)
    from flambeau.core.config import Config

    config = Config.load(file=config_file, cli=cli)
    store = config.model_store
    if store is None:
        raise ConfigError("--model-store is required (or model_store in the config file)")
    if not store.is_dir():
        raise ConfigError(f"--model-store: directory not found: {store}")
    workflow_store = config.get_str("workflow_store")
    if workflow_store and not Path(workflow_store).is_dir():
        raise ConfigError(f"--workflow-store: directory not found: {workflow_store}")
    for key in ("inference_address", "management_address", "metrics_address"):
        config.address(key)
    return config


def _running_pid() -> int | None:
    path = pid_file()
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        path.unlink(missing_ok=True)
        return None
    except PermissionError:
        pass
    return pid


def _ready_file_arg(argv: Sequence[str]) -> str | None:
    for index, arg in enumerate(argv):
        if arg == "--ready-file" and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith("--ready-file="):
            return arg.split("=", 1)[1]
    return None


def _start_daemon(
    argv: Sequence[str], ready_file: str | None, messages: CliMessages = MESSAGES
) -> int:
    if (pid := _running_pid()) is not None:
        _say(messages.already_running, pid=pid)
        return 1
    ready = Path(ready_file or Path(tempfile.mkdtemp(prefix="flambeau-start-")) / "ready.json")
    child_argv = [a for a in argv if a not in {"--ready-file", ready_file}]
    cmd = [
        sys.executable,
        "-m",
        "flambeau.core.cli",
        *child_argv,
        "--foreground",
        "--ready-file",
        str(ready),
        "--daemon-child",
    ]
    log_path = Path(os.environ.get("LOG_LOCATION", "logs"))
    log_path.mkdir(parents=True, exist_ok=True)
    with open(log_path / "ts_stdout.log", "ab") as out:
        child = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
        )
    pid_file().write_text(str(child.pid))
    error_file = Path(str(ready) + ".error")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if ready.exists():
            _say(messages.started)
            return 0
        if child.poll() is not None:
            pid_file().unlink(missing_ok=True)
            message = error_file.read_text().strip() if error_file.exists() else ""
            print(
                f"flambeau: error: {message or 'server exited during start-up, see logs/'}",
                file=sys.stderr,
            )
            return 2 if message else 1
        time.sleep(0.02)
    print("flambeau: error: server did not become ready within 120 s", file=sys.stderr)
    return 1


def stop_server(timeout: float = 60.0, messages: CliMessages = MESSAGES) -> int:
    pid = _running_pid()
    if pid is None:
        _say(messages.not_running)
        return 1
    family = descendants(pid)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.05)
    kill_survivors(family)
    pid_file().unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        Path("key_file.json").unlink()
    _say(messages.stopped)
    return 0


def descendants(pid: int) -> list[psutil.Process]:
    """The process and everything it started, remembered before it is asked to stop."""
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def kill_survivors(processes: list[psutil.Process]) -> None:
    """SIGKILL whichever of ``processes`` still runs: workers of a server that died, say.

    psutil checks each process's start time, so a recycled pid is never hit.
    """
    import psutil

    for proc in processes:
        with contextlib.suppress(psutil.Error):
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                proc.kill()


def _alive(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
        if waited == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return True


def serve_foreground(
    args: argparse.Namespace, plugins: PluginSet, config: Config, messages: CliMessages = MESSAGES
) -> int:
    from flambeau.core.logs import configure_logging
    from flambeau.core.server import Server

    configure_logging(log_config=args.log_config, foreground=not args.daemon_child)
    announce = None if args.daemon_child else lambda: _say(messages.started)
    server = Server(config, plugins, ready_file=args.ready_file, on_ready=announce)
    if not args.daemon_child:
        pid_file().write_text(str(os.getpid()))
    try:
        import asyncio

        asyncio.run(server.run())
    finally:
        if not args.daemon_child:
            pid_file().unlink(missing_ok=True)
    return 0


def list_plugins(plugins: PluginSet) -> int:
    from flambeau.core.config import Config

    config = Config.load(cli={}, environ={})
    hooks = plugins.hooks
    # Ask the registration hooks once so that every plugin's strategies are attributed.
    for collect in (
        hooks.routes,
        hooks.listeners,
        hooks.authenticators,
        hooks.authorizers,
        hooks.batchers,
        hooks.envelopes,
        hooks.allocators,
        hooks.worker_backends,
        hooks.metrics_sinks,
        hooks.device_discovery,
        hooks.model_preparers,
        hooks.grpc_services,
    ):
        with contextlib.suppress(Exception):
            collect(config)
    hooks.handlers()
    hooks.commands()
    for info in plugins.infos.values():
        print(f"{info.name}  ({info.distribution} {info.version})  module {info.module}")
        print(f"    hooks: {', '.join(info.hooks) or '-'}")
        for kind, names in sorted(info.provides.items()):
            print(f"    {kind}: {', '.join(names)}")
    return 0


def main(argv: Sequence[str] | None = None, messages: CliMessages = MESSAGES) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    flags, disable = _plugin_flags(argv)
    daemon_child = "--daemon-child" in argv
    if daemon_child:
        argv.remove("--daemon-child")
    if _first_positional(argv) == "start" and not {"--foreground", "-h", "--help"} & set(argv):
        # The launcher only spawns the server and waits: it loads no plugin, so the server
        # answers sooner. The server itself validates the flags (errors come back one line).
        return _start_daemon(argv, _ready_file_arg(argv), messages)
    from flambeau.api import ConfigError, PluginError
    from flambeau.core.plugins import PluginOptions, load_plugins

    try:
        plugins = load_plugins(PluginOptions.from_flags(flags, disable_autoload=disable))
    except PluginError as exc:
        print(f"flambeau: error: {exc}", file=sys.stderr)
        return 2
    commands = {c.name: c for c in plugins.hooks.commands()}
    first = _first_positional(argv)
    if first in commands and first not in {"start", "stop", "plugins"}:
        index = argv.index(first)
        return commands[first].main(argv[index + 1 :])
    parser = build_parser(plugins)
    args = parser.parse_args(argv)
    args.daemon_child = daemon_child
    if args.command == "stop":
        return stop_server(messages=messages)
    if args.command == "plugins":
        return list_plugins(plugins)
    if args.command != "start":
        parser.print_help()
        return 2
    try:
        config = config_from_args(args)
        return serve_foreground(args, plugins, config, messages)
    except (ConfigError, PluginError) as exc:
        if daemon_child and args.ready_file:
            Path(args.ready_file + ".error").write_text(str(exc))
        print(f"flambeau: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
