"""The ``log`` metrics sink: TorchServe's metric lines in ``ts_metrics.log`` and
``model_metrics.log``.

One line per update, in TorchServe's format, for the metrics ``metrics_mode`` sends to the
logs: ``Requests2XX.Count:1.0|#Level:Host|#hostname:h,timestamp:1700000000`` for server
metrics, and ``HandlerTime.Milliseconds:2.5|#ModelName:m,Level:Model|#hostname:h,
requestID:<id>,timestamp:1700000000`` for handler metrics.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

from flambeau.api import MetricRecord, line_writer
from flambeau.plugins.builtin.metrics.prometheus import java_double
from flambeau.plugins.builtin.metrics.settings import MODEL, MetricsMode

frontend_log = logging.getLogger("flambeau.metrics.frontend")
model_log = logging.getLogger("flambeau.metrics.model")


def format_line(record: MetricRecord, *, hostname: str, timestamp: float) -> str:
    """A TorchServe metric log line; a ``Hostname`` dimension moves to the ``hostname`` field."""
    dims = []
    host = hostname
    for name, value in record.dimensions:
        if name.lower() == "hostname":
            host = value
        else:
            dims.append(f"{name}:{value}")
    line = f"{record.name}.{record.unit}:{java_double(record.value)}|#{','.join(dims)}"
    line += f"|#hostname:{host}"
    if record.request_id:
        line += f",requestID:{record.request_id}"
    return f"{line},timestamp:{int(timestamp)}"


class LogSink:
    """Writes each update that the mode logs; server and handler metrics go to their own files."""

    def __init__(self, server: Any) -> None:
        self._families = server.metrics.families
        self._mode = MetricsMode.from_config(server.config)
        self._hostname = socket.gethostname()
        self._write_frontend = line_writer(frontend_log.name)
        self._write_model = line_writer(model_log.name)

    def record(self, record: MetricRecord) -> None:
        family = self._families.get(record.name)
        if not self._mode.logs(family):
            return
        write = (
            self._write_model if family is None or family.origin == MODEL else self._write_frontend
        )
        write(format_line(record, hostname=self._hostname, timestamp=time.time()))
