"""Device discovery (CPU, CUDA) and TorchServe's round-robin GPU allocator.

CUDA devices are found through NVML (``pynvml`` / ``nvidia-ml-py``), imported only when an
NVIDIA driver is visible, so machines without a GPU never load it. ``round_robin`` hands worker
k of any model GPU ``counter % number_of_gpu`` (a server-wide counter, as TorchServe does), or
cycles through the model's ``deviceIds``; with no GPU every worker runs on the CPU.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flambeau.api import (
    AllocatorSpec,
    Device,
    DeviceDiscoverySpec,
    FlambeauError,
    hookimpl,
)

log = logging.getLogger("flambeau.devices")


def discover_cpu() -> list[Device]:
    try:
        cores = tuple(sorted(os.sched_getaffinity(0)))
    except AttributeError:
        cores = tuple(range(os.cpu_count() or 1))
    return [Device("cpu", 0, cores=cores)]


def nvidia_driver_present() -> bool:
    return Path("/proc/driver/nvidia").exists() or Path("/dev/nvidiactl").exists()


def discover_cuda() -> list[Device]:
    if not nvidia_driver_present():
        return []
    try:
        import pynvml
    except ImportError:
        log.warning("an NVIDIA driver is present but nvidia-ml-py is not installed: no GPUs")
        return []
    try:
        pynvml.nvmlInit()
    except Exception as exc:
        log.warning("NVML failed to initialise (%s): no GPUs", exc)
        return []
    devices = []
    try:
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            devices.append(
                Device(
                    "cuda",
                    index,
                    total_memory_mb=int(memory.total) // 2**20,
                    free_memory_mb=int(memory.free) // 2**20,
                )
            )
    finally:
        pynvml.nvmlShutdown()
    return devices


class RoundRobinAllocator:
    """TorchServe's placement: a global counter over the GPUs, or over ``deviceIds``."""

    def __init__(self) -> None:
        self._counter = itertools.count()
        self._per_model: dict[str, itertools.count[int]] = {}

    def allocate(self, devices: Sequence[Device], model: str, config: Mapping[str, Any]) -> Device:
        gpus = [d for d in devices if d.kind == "cuda"]
        limit = config.get("number_of_gpu")
        if isinstance(limit, int) and limit >= 0:
            gpus = gpus[:limit]
        if not gpus:
            if config.get("deviceType") == "gpu":
                log.warning("model %s asks for deviceType gpu but no GPU is present", model)
            return Device("cpu")
        ids = [i for i in config.get("deviceIds") or [] if any(g.index == i for g in gpus)]
        if ids:
            counter = self._per_model.setdefault(model, itertools.count())
            index = ids[next(counter) % len(ids)]
            return next(g for g in gpus if g.index == index)
        return gpus[next(self._counter) % len(gpus)]

    def release(self, device: Device, model: str) -> None:
        """Round-robin keeps no per-device state."""


class MemoryAwareAllocator:
    """Places a worker on the GPU with the most free memory that fits ``maxGPUMemory`` (MB).

    Memory promised to running workers is tracked, so two workers never count on the same
    megabytes; when no GPU has room the registration fails with a clear 507.
    """

    def __init__(self) -> None:
        self.reserved: dict[int, int] = {}
        self._need: dict[str, int] = {}

    def allocate(self, devices: Sequence[Device], model: str, config: Mapping[str, Any]) -> Device:
        gpus = [d for d in devices if d.kind == "cuda"]
        ids = config.get("deviceIds") or []
        if ids:
            gpus = [g for g in gpus if g.index in ids]
        if not gpus:
            return Device("cpu")
        need = int(config.get("maxGPUMemory") or 0)
        best = max(gpus, key=lambda g: g.free_memory_mb - self.reserved.get(g.index, 0))
        free = best.free_memory_mb - self.reserved.get(best.index, 0)
        if need and free < need:
            raise FlambeauError(
                f"No GPU has {need} MB free for model {model} (most free: {free} MB on "
                f"cuda:{best.index})",
                status=507,
            )
        self._need[model] = need
        self.reserved[best.index] = self.reserved.get(best.index, 0) + need
        return best

    def release(self, device: Device, model: str) -> None:
        # Every worker of a model reserved the same amount: give one share back.
        held = self.reserved.get(device.index, 0)
        self.reserved[device.index] = max(0, held - self._need.get(model, 0))


@hookimpl
def flambeau_device_discovery(config: Any) -> list[DeviceDiscoverySpec]:
    return [DeviceDiscoverySpec("cpu", discover_cpu), DeviceDiscoverySpec("cuda", discover_cuda)]


@hookimpl
def flambeau_allocators(config: Any) -> list[AllocatorSpec]:
    return [
        AllocatorSpec("round_robin", RoundRobinAllocator),
        AllocatorSpec("memory_aware", MemoryAwareAllocator),
    ]
