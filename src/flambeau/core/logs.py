"""Logging set-up: TorchServe's log files in ``logs/`` (or ``LOG_LOCATION``), with rotation.

``ts_log.log`` holds the server log (lines about a request carry its ``x-request-id``),
``access_log.log`` one line per HTTP request, ``model_log.log`` what workers print,
``ts_metrics.log`` / ``model_metrics.log`` metric lines, each in TorchServe's log4j2 pattern.
``--log-config`` replaces all of it with a Python logging configuration (a ``.json`` or
``.yaml`` dictConfig, or an ``.ini`` fileConfig), since TorchServe's log4j2 XML has no meaning here.
"""

from __future__ import annotations

import contextvars
import json
import logging
import logging.config
import logging.handlers
import os
import sys
import time
import weakref
from collections.abc import Callable
from pathlib import Path

from flambeau.api import ConfigError

# The id of the request being served; set by flambeau.web for each request, inherited by the
# tasks that request starts.
REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("flambeau_request_id", default="")

DATE_FORMAT = "%Y-%m-%dT%H:%M:%S"  # log4j2's %d{ISO8601}, with ",SSS" added by the formats
FORMAT = "%(asctime)s,%(msecs)03d [%(levelname)-5s] %(name)s%(request_tag)s - %(message)s"
BARE_FORMAT = "%(asctime)s,%(msecs)03d - %(message)s"  # TorchServe's access and metrics logs
FILES = {
    "flambeau": "ts_log.log",
    "flambeau.access": "access_log.log",
    "flambeau.model": "model_log.log",
    "flambeau.metrics.frontend": "ts_metrics.log",
    "flambeau.metrics.model": "model_metrics.log",
}
BARE = frozenset({"flambeau.access", "flambeau.metrics.frontend", "flambeau.metrics.model"})
# TorchServe's log4j2.xml rolls each file at 100 MB and keeps 5 of them.
MAX_BYTES = 100 * 1024 * 1024
BACKUPS = 5


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` (or ``""``) and ``request_tag`` (`` [<id>]`` or ``""``) to records.

    Usable from a ``--log-config`` dictConfig as ``{"()": "flambeau.core.logs.RequestIdFilter"}``.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = REQUEST_ID.get()
        record.request_id = request_id
        record.request_tag = f" [{request_id}]" if request_id else ""
        return True


class SizeRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A RotatingFileHandler that counts what it writes, and optionally buffers it.

    The standard one stats, seeks and formats twice for every record to decide on rotation;
    access and metric lines are written on every request, so this one keeps the size itself.
    With ``buffered``, lines are written in bulk (at 64 KiB, after 0.5 s, or on
    :func:`flush_buffered_logs`, which the server calls twice a second and at shutdown): one
    ``write`` and ``flush`` per line was ~20% of the server's samples under load
    (docs/performance.md, first profile).
    """

    FLUSH_BYTES = 64 * 1024
    FLUSH_SECONDS = 0.5

    def __init__(self, filename: Path, max_bytes: int, backups: int, *, buffered: bool = False):
        super().__init__(filename, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
        self._size = os.path.getsize(filename) if os.path.exists(filename) else 0
        self.buffered = buffered
        self._pending: list[str] = []
        self._pending_bytes = 0
        self._last_write = time.monotonic()
        if buffered:
            _BUFFERED.add(self)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
            if self.buffered:
                self.append(line)
            else:
                self._write(line)
        except Exception:
            self.handleError(record)

    def append(self, line: str) -> None:
        """Buffer one finished line (the fast path of :func:`line_writer`)."""
        self._pending.append(line)
        self._pending_bytes += len(line)
        if (
            self._pending_bytes >= self.FLUSH_BYTES
            or time.monotonic() - self._last_write >= self.FLUSH_SECONDS
        ):
            self.flush()

    def flush(self) -> None:
        if self._pending:
            with self.lock:  # type: ignore[union-attr]
                pending, self._pending, self._pending_bytes = self._pending, [], 0
                self._write("".join(pending))
        else:
            super().flush()

    def close(self) -> None:
        self.flush()
        _BUFFERED.discard(self)
        super().close()

    def _write(self, text: str) -> None:
        if self.maxBytes > 0 and self._size + len(text) > self.maxBytes and self._size:
            self.doRollover()
            self._size = 0
        if self.stream is None:
            self.stream = self._open()
        self.stream.write(text)
        self.stream.flush()
        self._size += len(text)
        self._last_write = time.monotonic()


_BUFFERED: weakref.WeakSet[SizeRotatingFileHandler] = weakref.WeakSet()


class _Stamp:
    """``BARE_FORMAT``'s time prefix, the date part formatted once per second."""

    def __init__(self) -> None:
        self._second = -1
        self._text = ""

    def __call__(self) -> str:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._text = time.strftime(DATE_FORMAT, time.localtime(now))
        return f"{self._text},{int(now * 1000) % 1000:03d}"


def line_writer(logger_name: str) -> Callable[[str], None]:
    """A function writing one message to a bare log (access, metrics) as ``BARE_FORMAT`` does.

    These logs get a line or more per request. With flambeau's own buffered handler in place
    the line goes straight to its buffer, skipping a ``LogRecord``; with a ``--log-config``
    of the user's, it is an ordinary ``logger.info``.
    """
    logger = logging.getLogger(logger_name)
    handler = next(
        (h for h in logger.handlers if isinstance(h, SizeRotatingFileHandler) and h.buffered),
        None,
    )
    if handler is None or len(logger.handlers) != 1 or not logger.isEnabledFor(logging.INFO):
        return logger.info
    stamp = _Stamp()
    append = handler.append
    return lambda message: append(f"{stamp()} - {message}\n")


def flush_buffered_logs() -> None:
    """Write out what buffered handlers (access and metric logs) hold."""
    for handler in list(_BUFFERED):
        handler.flush()


def log_dir() -> Path:
    return Path(os.environ.get("LOG_LOCATION", "logs"))


def configure_logging(*, log_config: str | None = None, foreground: bool = False) -> Path:
    """Install the handlers; returns the log directory."""
    directory = log_dir()
    if log_config:
        _apply_user_config(Path(log_config))
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    # Nobody reads thread and process names in these logs; not gathering them makes every
    # record cheaper (these are logging's documented switches).
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    request_ids = RequestIdFilter()
    formatter = logging.Formatter(FORMAT, DATE_FORMAT)
    bare = logging.Formatter(BARE_FORMAT, DATE_FORMAT)
    for logger_name, file_name in FILES.items():
        logger = logging.getLogger(logger_name)
        logger.setLevel(logging.INFO)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
            handler.close()
        handler = SizeRotatingFileHandler(
            directory / file_name, MAX_BYTES, BACKUPS, buffered=logger_name in BARE
        )
        handler.setFormatter(bare if logger_name in BARE else formatter)
        handler.addFilter(request_ids)
        logger.addHandler(handler)
        if logger_name != "flambeau":
            logger.propagate = False  # keep access, model and metric lines out of the server log
    if foreground:
        console = logging.StreamHandler(sys.stdout)
        console.setFormatter(formatter)
        console.addFilter(request_ids)
        logging.getLogger("flambeau").addHandler(console)
    return directory


def _apply_user_config(path: Path) -> None:
    if not path.is_file():
        raise ConfigError(f"--log-config: no such file {path}")
    try:
        if path.suffix in {".json"}:
            logging.config.dictConfig(json.loads(path.read_text()))
        elif path.suffix in {".yaml", ".yml"}:
            import yaml

            logging.config.dictConfig(yaml.safe_load(path.read_text()))
        else:
            logging.config.fileConfig(path, disable_existing_loggers=False)
    except Exception as exc:
        raise ConfigError(f"--log-config {path}: {exc}") from None
