"""System metrics (TorchServe's §6.3 set): host CPU, memory and disk from psutil, GPU memory
and utilization from NVML where an NVIDIA driver is present, or the lines of an operator's
``system_metrics_cmd``. A lifespan task collects every ``metric_time_interval`` seconds (first
at start-up) in a thread, then sets the gauges on the event loop. Metrics that metrics.yaml
does not declare are dropped, as TorchServe does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import shlex
import socket
import subprocess
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Protocol

log = logging.getLogger("flambeau.metrics.system")

MB = 1024 * 1024
GB = 1024 * MB
HOST = (("Level", "Host"),)
# TorchServe's metric line (also what system_metrics_cmd prints):
# Name.Unit:value|#Dim:v,...[|#type:GAUGE]|#hostname:h,<timestamp or more>
_LINE = re.compile(
    r"^(?P<name>[A-Za-z][\w ]*)\.(?P<unit>[A-Za-z]+):(?P<value>[-+.\deE]+|NaN)"
    r"\|#(?P<dims>[^|]*)(?:\|#type:(?P<type>[A-Za-z]+))?\|#hostname:(?P<host>[^,]*)(?:,.*)?$"
)


@dataclass(frozen=True, slots=True)
class Sample:
    """One measurement for a gauge; ``dimensions`` exclude the Hostname."""

    name: str
    unit: str
    value: float
    dimensions: tuple[tuple[str, str], ...] = HOST


class SystemProbe(Protocol):
    """A source of system measurements; ``collect`` runs in a worker thread."""

    def collect(self) -> list[Sample]: ...

    def close(self) -> None: ...


class HostProbe:
    """CPU, memory and disk of the host, as TorchServe's ``metric_collector.py`` reports them."""

    def __init__(self, disk_path: str = "/") -> None:
        import psutil

        self._psutil = psutil
        self._disk_path = disk_path
        self._primed = False

    def collect(self) -> list[Sample]:
        ps = self._psutil
        # cpu_percent compares with its previous call; the first one measures a short window.
        cpu = ps.cpu_percent(interval=None if self._primed else 0.05)
        self._primed = True
        memory = ps.virtual_memory()
        disk = ps.disk_usage(self._disk_path)
        return [
            Sample("CPUUtilization", "Percent", float(cpu)),
            Sample("MemoryUsed", "Megabytes", memory.used / MB),
            Sample("MemoryAvailable", "Megabytes", memory.available / MB),
            Sample("MemoryUtilization", "Percent", float(memory.percent)),
            Sample("DiskUsage", "Gigabytes", disk.used / GB),
            Sample("DiskUtilization", "Percent", float(disk.percent)),
            Sample("DiskAvailable", "Gigabytes", disk.free / GB),
        ]

    def close(self) -> None:
        return None


class NvmlProbe:
    """GPU memory and utilization per device through NVML (the ``nvidia-ml-py`` package)."""

    def __init__(self, nvml: ModuleType, handles: Sequence[Any]) -> None:
        self._nvml = nvml
        self._handles = list(handles)

    @classmethod
    def open(cls, limit: int = -1, nvml: ModuleType | None = None) -> NvmlProbe | None:
        """A probe over the first ``limit`` GPUs (all when negative), or None where there is
        no NVML library, no driver or no GPU."""
        if limit == 0:
            return None
        if nvml is None:
            try:
                import pynvml
            except ImportError:
                return None
            nvml = pynvml
        try:
            nvml.nvmlInit()
            count = int(nvml.nvmlDeviceGetCount())
            if limit > 0:
                count = min(count, limit)
            handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        except Exception as exc:  # NVMLError: no driver, driver/library mismatch, ...
            log.debug("no GPU metrics: %s", exc)
            return None
        if not handles:
            nvml.nvmlShutdown()
            return None
        return cls(nvml, handles)

    def collect(self) -> list[Sample]:
        samples = []
        for index, handle in enumerate(self._handles):
            memory = self._nvml.nvmlDeviceGetMemoryInfo(handle)
            utilization = self._nvml.nvmlDeviceGetUtilizationRates(handle)
            dims = (("Level", "Host"), ("DeviceId", str(index)))
            used_percent = 100.0 * memory.used / memory.total if memory.total else 0.0
            samples += [
                Sample("GPUMemoryUtilization", "Percent", used_percent, dims),
                Sample("GPUMemoryUsed", "Megabytes", memory.used / MB, dims),
                Sample("GPUUtilization", "Percent", float(utilization.gpu), dims),
            ]
        return samples

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._nvml.nvmlShutdown()


def parse_metric_line(line: str) -> Sample | None:
    """One TorchServe metric line as a sample; None for anything else."""
    match = _LINE.match(line.strip())
    if match is None:
        return None
    try:
        value = float(match["value"])
    except ValueError:
        return None
    dims = tuple(
        (name, value_)
        for name, _, value_ in (item.partition(":") for item in match["dims"].split(",") if item)
    )
    return Sample(match["name"], match["unit"], value, dims)


class CommandProbe:
    """``system_metrics_cmd``: an operator's collector printing TorchServe metric lines.

    Run without a shell; its output lines that are not metric lines are ignored.
    """

    def __init__(self, command: str, timeout_s: float) -> None:
        self._argv = shlex.split(command)
        self._timeout_s = timeout_s

    def collect(self) -> list[Sample]:
        done = subprocess.run(
            self._argv,
            capture_output=True,
            text=True,
            timeout=self._timeout_s,
            check=False,
        )
        if done.returncode != 0:
            log.warning(
                "system_metrics_cmd exited with %d: %s", done.returncode, done.stderr.strip()[-500:]
            )
        return [s for s in map(parse_metric_line, done.stdout.splitlines()) if s is not None]

    def close(self) -> None:
        return None


class SystemMetricsCollector:
    """Collects from its probes every ``interval_s`` and sets the declared gauges."""

    def __init__(self, metrics: Any, probes: Sequence[SystemProbe], interval_s: float) -> None:
        self._metrics = metrics
        self._probes = list(probes)
        self._interval_s = max(0.1, interval_s)
        self._hostname = socket.gethostname()
        self._warned: set[str] = set()

    @classmethod
    def from_config(cls, metrics: Any, config: Any) -> SystemMetricsCollector:
        interval = config.get_float("metric_time_interval", 60)
        probes: list[SystemProbe]
        if command := config.get_str("system_metrics_cmd").strip():
            probes = [CommandProbe(command, timeout_s=max(1.0, interval))]
        else:
            probes = [HostProbe()]
            gpu = NvmlProbe.open(config.get_int("number_of_gpu", -1))
            if gpu is not None:
                probes.append(gpu)
        return cls(metrics, probes, interval)

    def _gather(self) -> list[Sample]:
        samples: list[Sample] = []
        for probe in self._probes:
            try:
                samples += probe.collect()
            except Exception as exc:
                # One failing probe (a GPU reset, a broken command) leaves the others working.
                self._warn_once(type(probe).__name__, "system metrics probe %s failed: %s", exc)
        return samples

    async def collect_once(self) -> None:
        for sample in await asyncio.to_thread(self._gather):
            self._apply(sample)

    def _apply(self, sample: Sample) -> None:
        family = self._metrics.families.get(sample.name)
        if family is None or not family.enabled:
            return  # not declared in metrics.yaml
        dims = dict(sample.dimensions)
        dims.setdefault("Hostname", self._hostname)
        if any(name not in dims for name in family.labelnames):
            self._warn_once(
                sample.name,
                "system metric %s dropped: dimensions %s",
                f"{sorted(dims)} do not match {list(family.labelnames)}",
            )
            return
        family.set(tuple(dims[name] for name in family.labelnames), sample.value)

    def _warn_once(self, key: str, message: str, detail: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message, key, detail)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.collect_once()
            except Exception:
                log.exception("system metrics collection failed")

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """The lifespan: a first collection before the server is ready, then the periodic task."""
        await self.collect_once()
        task = asyncio.create_task(self._loop(), name="flambeau-system-metrics")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            for probe in self._probes:
                probe.close()
