"""Logging set-up: TorchServe's log files in ``logs/`` (or ``LOG_LOCATION``), with rotation.

``ts_log.log`` holds the server log, ``access_log.log`` one line per HTTP request,
``model_log.log`` what workers print, ``ts_metrics.log`` / ``model_metrics.log`` metric lines.
``--log-config`` replaces all of it with a Python logging configuration (a ``.json`` or
``.yaml`` dictConfig, or an ``.ini`` fileConfig), since TorchServe's log4j2 XML has no
meaning here.
"""

from __future__ import annotations

import json
import logging
import logging.config
import logging.handlers
import os
import sys
from pathlib import Path

import yaml

from flambeau.api import ConfigError

FORMAT = "%(asctime)s [%(levelname)s] %(name)s - %(message)s"
FILES = {
    "flambeau": "ts_log.log",
    "flambeau.access": "access_log.log",
    "flambeau.model": "model_log.log",
    "flambeau.metrics.frontend": "ts_metrics.log",
    "flambeau.metrics.model": "model_metrics.log",
}
MAX_BYTES = 10 * 1024 * 1024
BACKUPS = 5


def log_dir() -> Path:
    return Path(os.environ.get("LOG_LOCATION", "logs"))


def configure_logging(*, log_config: str | None = None, foreground: bool = False) -> Path:
    """Install the handlers; returns the log directory."""
    directory = log_dir()
    if log_config:
        _apply_user_config(Path(log_config))
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    formatter = logging.Formatter(FORMAT)
    for logger_name, file_name in FILES.items():
        logger = logging.getLogger(logger_name)
        logger.setLevel(logging.INFO)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
            handler.close()
        handler = logging.handlers.RotatingFileHandler(
            directory / file_name, maxBytes=MAX_BYTES, backupCount=BACKUPS, encoding="utf-8"
        )
        handler.setFormatter(formatter)
        logger.addHandler(handler)
        if logger_name != "flambeau":
            logger.propagate = False  # keep access and model lines out of the server log
    if foreground:
        console = logging.StreamHandler(sys.stdout)
        console.setFormatter(formatter)
        logging.getLogger("flambeau").addHandler(console)
    return directory


def _apply_user_config(path: Path) -> None:
    if not path.is_file():
        raise ConfigError(f"--log-config: no such file {path}")
    try:
        if path.suffix in {".json"}:
            logging.config.dictConfig(json.loads(path.read_text()))
        elif path.suffix in {".yaml", ".yml"}:
            logging.config.dictConfig(yaml.safe_load(path.read_text()))
        else:
            logging.config.fileConfig(path, disable_existing_loggers=False)
    except Exception as exc:
        raise ConfigError(f"--log-config {path}: {exc}") from None
