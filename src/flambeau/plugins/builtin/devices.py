"""Device discovery (CPU cores by NUMA node, CUDA GPUs through NVML) and the device allocators.

Discovery reports what workers may run on: one ``cpu`` device per NUMA node holding the cores
this server may use, and one ``cuda`` device per visible GPU. NVML (``nvidia-ml-py``) is
imported only when an NVIDIA driver is present, so CPU-only machines never load it. The
allocators (``device_allocator``: ``round_robin``, TorchServe's, or ``memory_aware``) pick a GPU
for each worker and, on the CPU, a share of the cores that no other worker holds yet.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from flambeau.api import (
    AllocatorSpec,
    CliOption,
    ConfigError,
    Device,
    DeviceDiscoverySpec,
    FlambeauError,
    PreparerSpec,
    hookimpl,
)

__all__ = [
    "CorePlanner",
    "DeviceMemoryError",
    "MemoryAwareAllocator",
    "RoundRobinAllocator",
    "discover_cpu",
    "discover_cuda",
    "parse_cpu_list",
    "requested_gpus",
    "usable_gpus",
]

log = logging.getLogger("flambeau.devices")

NODE_ROOT = Path("/sys/devices/system/node")
PLACEMENT_MODES = ("on", "threads", "off")


class DeviceMemoryError(FlambeauError):
    """No GPU has the memory a worker asked for (``maxGPUMemory``)."""

    status = 507
    error_type = "InsufficientMemoryException"


# -------------------------------------------------------------------------------- discovery


def parse_cpu_list(text: str) -> tuple[int, ...]:
    """The kernel's CPU list syntax (``0-3,8,10-11``) as sorted core ids."""
    cores: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        first, _, last = part.partition("-")
        cores.update(range(int(first), int(last or first) + 1))
    return tuple(sorted(cores))


def _node_memory_mb(node_dir: Path) -> tuple[int, int]:
    """(MemTotal, MemFree) of one NUMA node in MiB; zeros when the kernel does not say."""
    total = free = 0
    try:
        lines = (node_dir / "meminfo").read_text().splitlines()
    except OSError:
        return 0, 0
    for line in lines:
        fields = line.split()
        # "Node 0 MemTotal:  7039180 kB"
        if len(fields) >= 4 and fields[2] in ("MemTotal:", "MemFree:"):
            value = int(fields[3]) // 1024
            if fields[2] == "MemTotal:":
                total = value
            else:
                free = value
    return total, free


def _allowed_cores() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return set(range(os.cpu_count() or 1))


def discover_cpu(
    node_root: Path = NODE_ROOT, allowed: Collection[int] | None = None
) -> list[Device]:
    """One ``cpu`` device per NUMA node with the cores this process may run on.

    ``allowed`` defaults to the process's affinity (cpusets and ``taskset`` included), so a
    server started on part of a machine only hands out that part. Without NUMA information
    (not Linux, or a kernel without the node directory) there is a single ``cpu`` device.
    """
    mine = set(_allowed_cores() if allowed is None else allowed)
    devices: list[Device] = []
    seen: set[int] = set()
    node_dirs = sorted(node_root.glob("node[0-9]*"), key=lambda p: int(p.name[4:]))
    for node_dir in node_dirs:
        try:
            node_cores = parse_cpu_list((node_dir / "cpulist").read_text())
        except (OSError, ValueError):
            continue
        cores = tuple(c for c in node_cores if c in mine)
        if not cores:
            continue  # memory-only nodes, or nodes outside our cpuset
        node = int(node_dir.name[4:])
        total, free = _node_memory_mb(node_dir)
        devices.append(Device("cpu", node, total, free, cores=cores, numa_node=node))
        seen.update(cores)
    rest = tuple(sorted(mine - seen))
    if not devices:
        return [Device("cpu", 0, cores=rest)]
    if rest:
        # Cores the node directories do not list still run workers: keep them, without a node.
        devices.append(Device("cpu", len(node_dirs), cores=rest))
    return devices


def nvidia_driver_present() -> bool:
    return Path("/proc/driver/nvidia").exists() or Path("/dev/nvidiactl").exists()


def visible_gpu_handles(nvml: Any) -> list[Any]:
    """NVML handles of the GPUs CUDA will number 0, 1, ... in a worker.

    ``CUDA_VISIBLE_DEVICES`` (indices or ``GPU-`` UUIDs) renumbers the GPUs for CUDA but not
    for NVML, so the list is taken in the variable's order; it stops at the first entry that
    does not resolve, as CUDA does.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
    handles = []
    for entry in (e.strip() for e in visible.split(",")):
        try:
            if entry.isdigit():
                handles.append(nvml.nvmlDeviceGetHandleByIndex(int(entry)))
            else:
                handles.append(nvml.nvmlDeviceGetHandleByUUID(entry))
        except Exception:
            break
    return handles


def _gpu_numa_node(nvml: Any, handle: Any) -> int | None:
    try:
        bus_id = nvml.nvmlDeviceGetPciInfo(handle).busId
        if isinstance(bus_id, bytes):
            bus_id = bus_id.decode()
        # NVML spells the domain with 8 digits, sysfs with 4.
        text = Path(f"/sys/bus/pci/devices/{bus_id[-12:].lower()}/numa_node").read_text()
        node = int(text)
    except Exception:
        return None
    return node if node >= 0 else None


def gpu_usage(indices: Sequence[int]) -> dict[int, str]:
    """TorchServe's ``gpuUsage`` strings for these CUDA indices, read from NVML.

    Called only for models with GPU workers, so NVML is loaded only where a GPU is. Workers
    number GPUs as CUDA does; NVML ignores ``CUDA_VISIBLE_DEVICES``, so it is mapped here.
    """
    import pynvml

    pynvml.nvmlInit()
    try:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        order = [v.strip() for v in visible.split(",")] if visible is not None else []
        usage = {}
        for index in indices:
            name = order[index] if index < len(order) else str(index)
            handle = (
                pynvml.nvmlDeviceGetHandleByIndex(int(name))
                if name.isdigit()
                else pynvml.nvmlDeviceGetHandleByUUID(name)
            )
            rates = pynvml.nvmlDeviceGetUtilizationRates(handle)
            used = int(pynvml.nvmlDeviceGetMemoryInfo(handle).used) // 2**20
            usage[index] = (
                f"gpuId::{index} utilization.gpu [%]::{rates.gpu} % "
                f"utilization.memory [%]::{rates.memory} % memory.used [MiB]::{used} MiB"
            )
        return usage
    finally:
        pynvml.nvmlShutdown()


def discover_cuda(load_nvml: Callable[[], Any] | None = None) -> list[Device]:
    """One ``cuda`` device per GPU CUDA will see, with total and free memory in MiB.

    ``load_nvml`` returns the NVML module (tests pass a fake); by default ``pynvml`` is
    imported, and only when an NVIDIA driver is present.
    """
    if load_nvml is None:
        if not nvidia_driver_present():
            return []
        load_nvml = _import_pynvml
    try:
        nvml = load_nvml()
    except ImportError:
        log.warning("an NVIDIA driver is present but nvidia-ml-py is not installed: no GPUs")
        return []
    try:
        nvml.nvmlInit()
    except Exception as exc:
        log.warning("NVML failed to initialise (%s): no GPUs", exc)
        return []
    devices = []
    try:
        for index, handle in enumerate(visible_gpu_handles(nvml)):
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            devices.append(
                Device(
                    "cuda",
                    index,
                    total_memory_mb=int(memory.total) // 2**20,
                    free_memory_mb=int(memory.free) // 2**20,
                    numa_node=_gpu_numa_node(nvml, handle),
                )
            )
    finally:
        nvml.nvmlShutdown()
    return devices


def _import_pynvml() -> Any:
    import pynvml

    return pynvml


# -------------------------------------------------------------------------------- CPU placement


class CorePlanner:
    """Hands each worker a set of cores, least-held cores first, one NUMA node when it fits.

    ``holders`` counts the workers pinned to each core, so a worker started after others have
    stopped gets the cores they gave back, and workers only share a core once every core is
    taken (more workers than cores).
    """

    def __init__(self) -> None:
        self.holders: dict[int, int] = {}

    def take(self, cpus: Sequence[Device], count: int) -> Device:
        """A ``cpu`` device carrying ``count`` cores (all of them when ``count`` is larger);
        ``count`` 0 asks for no pinning."""
        pool = [(d.numa_node, core) for d in cpus for core in d.cores]
        if count <= 0 or not pool:
            return Device("cpu")
        count = min(count, len(pool))
        chosen = self._within_one_node(cpus, count)
        if chosen is None:
            ranked = sorted(pool, key=lambda nc: (self.holders.get(nc[1], 0), nc[0] or 0, nc[1]))
            chosen = tuple(sorted(core for _, core in ranked[:count]))
        for core in chosen:
            self.holders[core] = self.holders.get(core, 0) + 1
        nodes = {d.numa_node for d in cpus if set(chosen) & set(d.cores)}
        node = nodes.pop() if len(nodes) == 1 else None
        return Device("cpu", node or 0, cores=chosen, numa_node=node)

    def _within_one_node(self, cpus: Sequence[Device], count: int) -> tuple[int, ...] | None:
        best: tuple[int, int, tuple[int, ...]] | None = None
        for device in cpus:
            if len(device.cores) < count:
                continue
            ranked = sorted(device.cores, key=lambda c: (self.holders.get(c, 0), c))[:count]
            load = sum(self.holders.get(c, 0) for c in ranked)
            candidate = (load, device.index, tuple(sorted(ranked)))
            if best is None or candidate[:2] < best[:2]:
                best = candidate
        if best is None:
            return None
        # A node that is busier than the least-held cores elsewhere is not worth keeping to.
        spread = sorted(self.holders.get(c, 0) for d in cpus for c in d.cores)[:count]
        return best[2] if best[0] <= sum(spread) else None

    def give_back(self, cores: Iterable[int]) -> None:
        for core in cores:
            held = self.holders.get(core, 0)
            if held <= 1:
                self.holders.pop(core, None)
            else:
                self.holders[core] = held - 1


# -------------------------------------------------------------------------------- GPU choice


def usable_gpus(devices: Sequence[Device], model: str, config: Mapping[str, Any]) -> list[Device]:
    """The GPUs a worker of this model may use, by index: none for ``deviceType: cpu``, else
    the first ``number_of_gpu`` (all when absent)."""
    if str(config.get("deviceType") or "").lower() == "cpu":
        return []
    gpus = sorted((d for d in devices if d.kind == "cuda"), key=lambda d: d.index)
    limit = config.get("number_of_gpu")
    if isinstance(limit, int) and limit >= 0:
        gpus = gpus[:limit]
    if not gpus and str(config.get("deviceType") or "").lower() == "gpu":
        log.warning("model %s asks for deviceType gpu but no GPU is present: CPU", model)
    return gpus


def requested_gpus(
    gpus: Sequence[Device], model: str, config: Mapping[str, Any]
) -> list[Device] | None:
    """The model's ``deviceIds`` as devices, in its order, or None when it names none.

    A list naming a GPU that is not there is ignored as a whole, as in TorchServe. Repeated
    ids stay (``[0, 0, 1]`` puts two of every three workers on GPU 0).
    """
    ids = list(config.get("deviceIds") or [])
    if not ids:
        return None
    by_index = {g.index: g for g in gpus}
    if all(i in by_index for i in ids):
        return [by_index[i] for i in ids]
    log.warning(
        "model %s: deviceIds %s name GPUs that are not available (%s): ignored",
        model,
        ids,
        sorted(by_index),
    )
    return None


def _cpus(devices: Sequence[Device]) -> list[Device]:
    return [d for d in devices if d.kind == "cpu"]


def _version_key(model: str, config: Mapping[str, Any]) -> tuple[str, str]:
    return model, str(config.get("modelVersion") or "")


class RoundRobinAllocator:
    """TorchServe's placement: a server-wide counter over the GPUs, or one over ``deviceIds``.

    As in TorchServe's ``WorkLoadManager``, the server-wide counter is advanced before it is
    read, so on a two-GPU machine the first worker lands on ``cuda:1``; a model version with
    ``deviceIds`` cycles through its list from the start. Workers without a GPU get a share
    of the cores (``cpuCores`` in the request) from a :class:`CorePlanner`.
    """

    def __init__(self) -> None:
        self._counter = 0
        self._per_version: dict[tuple[str, str], int] = {}
        self.cores = CorePlanner()

    def allocate(self, devices: Sequence[Device], model: str, config: Mapping[str, Any]) -> Device:
        gpus = usable_gpus(devices, model, config)
        if not gpus:
            return self.cores.take(_cpus(devices), int(config.get("cpuCores") or 0))
        chosen = requested_gpus(gpus, model, config)
        if chosen is not None:
            key = _version_key(model, config)
            position = self._per_version.get(key, 0)
            self._per_version[key] = (position + 1) % len(chosen)
            return chosen[position]
        self._counter = (self._counter + 1) % len(gpus)
        return gpus[self._counter]

    def release(self, device: Device, model: str) -> None:
        # GPUs are handed out by counting, so only cores are given back.
        if device.kind == "cpu":
            self.cores.give_back(device.cores)


class MemoryAwareAllocator:
    """Places each worker on the GPU with the most memory left for it, or refuses with a 507.

    A worker asks for its model's ``maxGPUMemory`` (MiB); the memory promised to running
    workers is subtracted from what each GPU had free at start-up, so two workers never count
    on the same megabytes. Without ``maxGPUMemory`` a worker promises nothing and goes to the
    GPU with the fewest workers among those with the most memory left. Every allocation is
    recorded per model and GPU and given back by :meth:`release` when the worker stops.
    """

    def __init__(self) -> None:
        self.reserved: dict[int, int] = {}
        self.workers: dict[int, int] = {}
        self._held: dict[tuple[str, int], list[int]] = {}
        self.cores = CorePlanner()

    def available_mb(self, gpu: Device) -> int:
        return gpu.free_memory_mb - self.reserved.get(gpu.index, 0)

    def allocate(self, devices: Sequence[Device], model: str, config: Mapping[str, Any]) -> Device:
        gpus = usable_gpus(devices, model, config)
        if not gpus:
            return self.cores.take(_cpus(devices), int(config.get("cpuCores") or 0))
        need = max(0, int(config.get("maxGPUMemory") or 0))
        candidates = requested_gpus(gpus, model, config) or gpus
        unique = list({g.index: g for g in candidates}.values())
        best = max(
            unique, key=lambda g: (self.available_mb(g), -self.workers.get(g.index, 0), -g.index)
        )
        left = self.available_mb(best)
        if need > left:
            version = config.get("modelVersion")
            label = f"{model} version {version}" if version else model
            raise DeviceMemoryError(
                f"No GPU has {need} MiB free for a worker of model {label} (maxGPUMemory): "
                f"the most is {left} MiB on cuda:{best.index} "
                f"({self.reserved.get(best.index, 0)} MiB promised to running workers)"
            )
        self.reserved[best.index] = self.reserved.get(best.index, 0) + need
        self.workers[best.index] = self.workers.get(best.index, 0) + 1
        self._held.setdefault((model, best.index), []).append(need)
        return best

    def release(self, device: Device, model: str) -> None:
        if device.kind == "cpu":
            self.cores.give_back(device.cores)
            return
        held = self._held.get((model, device.index))
        if not held:
            return  # never allocated here (or released twice): nothing to give back
        amount = held.pop()
        if not held:
            del self._held[(model, device.index)]
        self.reserved[device.index] = max(0, self.reserved.get(device.index, 0) - amount)
        self.workers[device.index] = max(0, self.workers.get(device.index, 0) - 1)


# -------------------------------------------------------------------------------- registration


async def check_gpu_placement(server: Any, mv: Any) -> None:
    """Refuse a registration up front when ``memory_aware`` cannot place its first workers.

    Placement happens per worker, where an error could only surface as a generic "failed to
    start workers"; placing ``minWorkers`` workers here (and giving them back at once) turns
    "no GPU has room" into the allocator's own 507 message. Only for ``memory_aware``: a trial
    run of ``round_robin`` would move its counters.
    """
    settings = mv.settings
    if (
        server.config.get_str("device_allocator") != "memory_aware"
        or settings.device_type == "cpu"
        or settings.max_gpu_memory_mb <= 0
        or server.gpu_count() == 0
    ):
        return
    specs = []
    try:
        for n in range(settings.min_workers):
            specs.append(server.worker_spec(mv, f"placement-check-{n}"))
    finally:
        for spec in specs:
            server.release_device(spec)


@hookimpl
def flambeau_cli_options() -> list[CliOption]:
    return [
        CliOption(
            ("--cpu-placement",),
            "threads (default): size each worker's thread pools to its share of the cores; "
            "on: also pin each worker to its cores; "
            "off: torch's defaults (TorchServe)",
            config_key="cpu_placement",
        ),
        CliOption(
            ("--device-allocator",),
            "how workers get GPUs: round_robin (TorchServe) or memory_aware",
            config_key="device_allocator",
        ),
    ]


@hookimpl
def flambeau_configure(config: Any) -> None:
    mode = config.get_str("cpu_placement", "threads").strip().lower()
    if mode not in PLACEMENT_MODES:
        raise ConfigError(
            f"cpu_placement: expected one of {', '.join(PLACEMENT_MODES)}, got {mode!r}"
        )


@hookimpl
def flambeau_device_discovery(config: Any) -> list[DeviceDiscoverySpec]:
    return [
        DeviceDiscoverySpec("cpu", discover_cpu),
        DeviceDiscoverySpec("cuda", discover_cuda, usage=gpu_usage),
    ]


@hookimpl
def flambeau_allocators(config: Any) -> list[AllocatorSpec]:
    return [
        AllocatorSpec("round_robin", RoundRobinAllocator),
        AllocatorSpec("memory_aware", MemoryAwareAllocator),
    ]


@hookimpl
def flambeau_model_preparers(config: Any) -> list[PreparerSpec]:
    return [PreparerSpec("gpu-placement", check_gpu_placement)]
