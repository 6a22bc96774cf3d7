"""Device discovery and allocators against fake inventories (sysfs trees, NVML stand-ins).

Nothing here needs a GPU: CUDA devices are plain :class:`Device` values or come from a fake
NVML module, so the allocators' order, ``deviceIds``, ``number_of_gpu``, memory refusal and
release bookkeeping are checked on any machine.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from flambeau.api import Device, WorkerSpec
from flambeau.core.batching import JobQueue
from flambeau.core.pool import PoolSettings, WorkerPool, WorkerSlot
from flambeau.core.settings import ModelSettings
from flambeau.plugins.builtin import devices
from flambeau.plugins.builtin.devices import (
    CorePlanner,
    DeviceMemoryError,
    MemoryAwareAllocator,
    RoundRobinAllocator,
    check_gpu_placement,
    discover_cpu,
    discover_cuda,
    gpu_usage,
    parse_cpu_list,
)

CPU2 = [Device("cpu", 0, cores=(0, 1), numa_node=0)]


def gpu(index: int, free_mb: int = 16000) -> Device:
    return Device("cuda", index, total_memory_mb=16000, free_memory_mb=free_mb)


def request(**config: Any) -> dict[str, Any]:
    """What the server passes to ``allocate`` (see Server._allocate)."""
    return {
        "modelVersion": "1.0",
        "deviceType": "",
        "deviceIds": [],
        "maxGPUMemory": 0,
        "number_of_gpu": -1,
        "cpuCores": 0,
        **config,
    }


# ----------------------------------------------------------------------------- discovery


def test_parse_cpu_list() -> None:
    assert parse_cpu_list("0-3,8,10-11\n") == (0, 1, 2, 3, 8, 10, 11)
    assert parse_cpu_list("5") == (5,)
    assert parse_cpu_list("") == ()


def fake_sysfs(root: Path, nodes: dict[int, str]) -> Path:
    for node, cpulist in nodes.items():
        node_dir = root / f"node{node}"
        node_dir.mkdir(parents=True)
        (node_dir / "cpulist").write_text(cpulist + "\n")
        (node_dir / "meminfo").write_text(
            f"Node {node} MemTotal:       8388608 kB\nNode {node} MemFree:        4194304 kB\n"
        )
    (root / "online").write_text("0-1\n")
    return root


def test_discover_cpu_reports_numa_nodes_within_the_affinity(tmp_path: Path) -> None:
    root = fake_sysfs(tmp_path, {0: "0-3", 1: "4-7", 2: ""})
    found = discover_cpu(root, allowed={1, 2, 3, 4, 5})
    assert found == [
        Device("cpu", 0, 8192, 4096, cores=(1, 2, 3), numa_node=0),
        Device("cpu", 1, 8192, 4096, cores=(4, 5), numa_node=1),
    ]


def test_discover_cpu_keeps_cores_no_node_lists(tmp_path: Path) -> None:
    root = fake_sysfs(tmp_path, {0: "0-1"})
    found = discover_cpu(root, allowed={0, 1, 9})
    assert [d.cores for d in found] == [(0, 1), (9,)]
    assert found[1].numa_node is None


def test_discover_cpu_without_numa_information(tmp_path: Path) -> None:
    assert discover_cpu(tmp_path / "absent", allowed={0, 1}) == [Device("cpu", 0, cores=(0, 1))]


def test_discover_cpu_on_this_machine() -> None:
    found = discover_cpu()
    cores = sorted(c for d in found for c in d.cores)
    assert cores == sorted(__import__("os").sched_getaffinity(0))


class FakeNvml:
    """The slice of pynvml that discovery and describe use, over a fixed inventory."""

    def __init__(self, gpus: Sequence[tuple[str, int, int]]) -> None:
        self.gpus = list(gpus)  # (uuid, total MiB, used MiB)
        self.initialised = 0

    def nvmlInit(self) -> None:
        self.initialised += 1

    def nvmlShutdown(self) -> None:
        self.initialised -= 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        if not 0 <= index < len(self.gpus):
            raise LookupError(index)
        return index

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> int:
        return [g[0] for g in self.gpus].index(uuid)

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        _, total, used = self.gpus[handle]
        return SimpleNamespace(total=total * 2**20, used=used * 2**20, free=(total - used) * 2**20)

    def nvmlDeviceGetPciInfo(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(busId=b"00000000:00:1E.0")

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(gpu=37 + handle, memory=5)


NVML = [("GPU-a", 16000, 1000), ("GPU-b", 24000, 0), ("GPU-c", 8000, 8000)]


def test_discover_cuda_through_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    nvml = FakeNvml(NVML)
    found = discover_cuda(lambda: nvml)
    assert [(d.name, d.total_memory_mb, d.free_memory_mb) for d in found] == [
        ("cuda:0", 16000, 15000),
        ("cuda:1", 24000, 24000),
        ("cuda:2", 8000, 0),
    ]
    assert nvml.initialised == 0  # shut down again


def test_discover_cuda_follows_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    # CUDA numbers the visible GPUs 0, 1 ... in the variable's order, by index or UUID.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,GPU-a,7")
    found = discover_cuda(lambda: FakeNvml(NVML))
    assert [(d.index, d.total_memory_mb) for d in found] == [(0, 8000), (1, 16000)]


def test_no_driver_means_no_gpu_and_no_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devices, "nvidia_driver_present", lambda: False)
    monkeypatch.delitem(sys.modules, "pynvml", raising=False)
    assert discover_cuda() == []
    assert "pynvml" not in sys.modules


def test_missing_nvml_library_means_no_gpu() -> None:
    def missing() -> Any:
        raise ImportError("No module named 'pynvml'")

    assert discover_cuda(missing) == []


def test_failing_nvml_init_means_no_gpu() -> None:
    nvml = FakeNvml(NVML)

    def broken() -> None:
        raise RuntimeError("Driver/library version mismatch")

    nvml.nvmlInit = broken  # type: ignore[method-assign]
    assert discover_cuda(lambda: nvml) == []


# ----------------------------------------------------------------------------- CPU placement


def test_two_workers_on_two_cores_get_one_core_each() -> None:
    planner = CorePlanner()
    first = planner.take(CPU2, 1)
    second = planner.take(CPU2, 1)
    assert (first.cores, second.cores) == ((0,), (1,))
    assert first.name == "cpu"
    # A third worker has to share: it takes the core held least (both once: the first).
    assert planner.take(CPU2, 1).cores == (0,)
    assert planner.holders == {0: 2, 1: 1}


def test_released_cores_are_handed_out_again() -> None:
    planner = CorePlanner()
    a, b = planner.take(CPU2, 1), planner.take(CPU2, 1)
    planner.give_back(a.cores)
    assert planner.take(CPU2, 1).cores == a.cores
    planner.give_back(b.cores)
    planner.give_back(b.cores)  # twice: never below zero
    assert planner.holders == {0: 1}


def test_a_worker_stays_on_one_numa_node_when_it_fits() -> None:
    cpus = [
        Device("cpu", 0, cores=(0, 1, 2, 3), numa_node=0),
        Device("cpu", 1, cores=(4, 5, 6, 7), numa_node=1),
    ]
    planner = CorePlanner()
    first = planner.take(cpus, 4)
    second = planner.take(cpus, 4)
    assert (first.cores, first.numa_node) == ((0, 1, 2, 3), 0)
    assert (second.cores, second.numa_node) == ((4, 5, 6, 7), 1)
    # Two-core workers: node 0 is full, so both go to node 1 before anything doubles up.
    planner.give_back(second.cores)
    assert planner.take(cpus, 2).cores == (4, 5)
    assert planner.take(cpus, 2).cores == (6, 7)
    # Wider than any node: the least-held cores across nodes, no single node.
    wide = CorePlanner().take(cpus, 6)
    assert (len(wide.cores), wide.numa_node) == (6, None)


def test_asking_for_more_cores_than_exist_gets_them_all() -> None:
    assert CorePlanner().take(CPU2, 8).cores == (0, 1)
    assert CorePlanner().take(CPU2, 0) == Device("cpu")
    assert CorePlanner().take([], 2) == Device("cpu")


# ----------------------------------------------------------------------------- round robin


def test_round_robin_follows_torchserve_global_counter() -> None:
    allocator = RoundRobinAllocator()
    inventory = [*CPU2, gpu(0), gpu(1)]
    # WorkLoadManager increments before reading: the first worker of a 2-GPU box gets GPU 1.
    order = [allocator.allocate(inventory, "a", request()).index for _ in range(3)]
    order += [allocator.allocate(inventory, "b", request()).index for _ in range(2)]
    assert order == [1, 0, 1, 0, 1]


def test_round_robin_over_three_gpus_and_number_of_gpu() -> None:
    inventory = [gpu(0), gpu(1), gpu(2), *CPU2]
    allocator = RoundRobinAllocator()
    assert [allocator.allocate(inventory, "m", request()).index for _ in range(4)] == [1, 2, 0, 1]
    limited = RoundRobinAllocator()
    picks = [limited.allocate(inventory, "m", request(number_of_gpu=2)).index for _ in range(3)]
    assert picks == [1, 0, 1]
    none = limited.allocate(inventory, "m", request(number_of_gpu=0, cpuCores=1))
    assert none.kind == "cpu"


def test_round_robin_cycles_device_ids_per_model_version() -> None:
    inventory = [gpu(0), gpu(1), gpu(2), gpu(3)]
    allocator = RoundRobinAllocator()
    ids = request(deviceIds=[2, 0, 2])
    assert [allocator.allocate(inventory, "m", ids).index for _ in range(4)] == [2, 0, 2, 2]
    # Another version of the model has its own counter, starting at the list's head.
    v2 = request(deviceIds=[3, 1], modelVersion="2.0")
    assert [allocator.allocate(inventory, "m", v2).index for _ in range(3)] == [3, 1, 3]
    assert allocator.allocate(inventory, "m", ids).index == 0
    # deviceIds do not move the global counter.
    assert allocator.allocate(inventory, "other", request()).index == 1


def test_invalid_device_ids_are_ignored_as_a_whole() -> None:
    allocator = RoundRobinAllocator()
    inventory = [gpu(0), gpu(1)]
    picks = [allocator.allocate(inventory, "m", request(deviceIds=[1, 5])).index for _ in range(2)]
    assert picks == [1, 0]
    # An id beyond number_of_gpu is as absent as one the machine lacks.
    beyond = request(deviceIds=[1], number_of_gpu=1)
    assert allocator.allocate(inventory, "m", beyond).index == 0


def test_cpu_models_and_gpu_less_machines_get_cores() -> None:
    allocator = RoundRobinAllocator()
    on_cpu = allocator.allocate([*CPU2, gpu(0)], "m", request(deviceType="cpu", cpuCores=1))
    assert (on_cpu.kind, on_cpu.cores) == ("cpu", (0,))
    # deviceType gpu without a GPU falls back to the CPU, as TorchServe does.
    fallback = allocator.allocate(CPU2, "m", request(deviceType="gpu", cpuCores=1))
    assert (fallback.kind, fallback.cores) == ("cpu", (1,))
    allocator.release(on_cpu, "m")
    allocator.release(gpu(0), "m")  # GPUs carry no state here
    assert allocator.cores.holders == {1: 1}


# ----------------------------------------------------------------------------- memory aware


def test_memory_aware_places_where_the_model_fits() -> None:
    allocator = MemoryAwareAllocator()
    inventory = [gpu(0, free_mb=8000), gpu(1, free_mb=4000), *CPU2]
    need = request(maxGPUMemory=3000)
    picks = [allocator.allocate(inventory, "m", need).index for _ in range(3)]
    # 8000/4000 -> 5000/4000 -> 2000/4000 -> 2000/1000
    assert picks == [0, 0, 1]
    assert allocator.reserved == {0: 6000, 1: 3000}


def test_memory_aware_refuses_with_a_clear_507() -> None:
    allocator = MemoryAwareAllocator()
    inventory = [gpu(0, free_mb=8000), gpu(1, free_mb=4000)]
    allocator.allocate(inventory, "big", request(maxGPUMemory=6000))
    with pytest.raises(DeviceMemoryError) as caught:
        allocator.allocate(inventory, "huge", request(maxGPUMemory=5000))
    error = caught.value
    assert error.status == 507
    assert error.message == (
        "No GPU has 5000 MiB free for a worker of model huge version 1.0 (maxGPUMemory): "
        "the most is 4000 MiB on cuda:1 (0 MiB promised to running workers)"
    )
    assert allocator.reserved == {0: 6000}  # a refusal reserves nothing


def test_memory_aware_release_gives_back_each_workers_share() -> None:
    allocator = MemoryAwareAllocator()
    inventory = [gpu(0, free_mb=10000)]
    v1 = request(maxGPUMemory=1000)
    v2 = request(maxGPUMemory=4000, modelVersion="2.0")
    first = allocator.allocate(inventory, "m", v1)
    allocator.allocate(inventory, "m", v1)
    allocator.allocate(inventory, "other", v2)
    assert allocator.reserved == {0: 6000}
    allocator.release(first, "m")
    assert allocator.reserved == {0: 5000}
    allocator.release(first, "other")
    assert allocator.reserved == {0: 1000}
    allocator.release(first, "m")
    allocator.release(first, "m")  # nothing left for m: no effect
    assert allocator.reserved == {0: 0}
    assert allocator.workers == {0: 0}
    # Everything given back: a 10000 MiB worker fits again.
    assert allocator.allocate(inventory, "m", request(maxGPUMemory=10000)).index == 0


def test_memory_aware_without_a_limit_spreads_workers() -> None:
    allocator = MemoryAwareAllocator()
    inventory = [gpu(0), gpu(1), gpu(2)]
    picks = [allocator.allocate(inventory, "m", request()).index for _ in range(4)]
    assert picks == [0, 1, 2, 0]


def test_memory_aware_respects_device_ids_and_cpu_models() -> None:
    allocator = MemoryAwareAllocator()
    inventory = [gpu(0, free_mb=9000), gpu(1, free_mb=2000), *CPU2]
    pinned = request(deviceIds=[1], maxGPUMemory=1500)
    assert allocator.allocate(inventory, "m", pinned).index == 1
    with pytest.raises(DeviceMemoryError, match="the most is 500 MiB on cuda:1"):
        allocator.allocate(inventory, "m", pinned)
    on_cpu = allocator.allocate(inventory, "m", request(deviceType="cpu", cpuCores=2))
    assert on_cpu.cores == (0, 1)
    allocator.release(on_cpu, "m")
    assert allocator.cores.holders == {}


# ----------------------------------------------------------------------------- registration check


class PlacingServer:
    """The two server methods the placement check calls, over a real allocator."""

    def __init__(self, allocator: MemoryAwareAllocator, inventory: list[Device]) -> None:
        self.allocator = allocator
        self.inventory = inventory
        self.config = SimpleNamespace(get_str=lambda key: "memory_aware")
        self.released: list[str] = []

    def gpu_count(self) -> int:
        return sum(1 for d in self.inventory if d.kind == "cuda")

    def worker_spec(self, mv: Any, worker_id: str) -> Any:
        config = request(maxGPUMemory=mv.settings.max_gpu_memory_mb)
        device = self.allocator.allocate(self.inventory, mv.name, config)
        return SimpleNamespace(worker_id=worker_id, device=device)

    def release_device(self, spec: Any) -> None:
        self.released.append(spec.worker_id)
        self.allocator.release(spec.device, "m")


def test_registration_check_refuses_what_cannot_be_placed() -> None:
    allocator = MemoryAwareAllocator()
    server = PlacingServer(allocator, [gpu(0, free_mb=5000)])
    fits = SimpleNamespace(name="m", settings=ModelSettings(min_workers=2, max_gpu_memory_mb=2000))
    asyncio.run(check_gpu_placement(server, fits))
    assert server.released == ["placement-check-0", "placement-check-1"]
    assert allocator.reserved == {0: 0}
    too_many = SimpleNamespace(
        name="m", settings=ModelSettings(min_workers=3, max_gpu_memory_mb=2000)
    )
    with pytest.raises(DeviceMemoryError):
        asyncio.run(check_gpu_placement(server, too_many))
    # The two placed before the refusal were given back.
    assert allocator.reserved == {0: 0}


# ----------------------------------------------------------------------------- describe


class GpuWorker:
    worker_id = "9000"
    device = "cuda:1"
    pid = 4242

    def memory_usage(self) -> int:
        return 123


def reported_usage(indices: Sequence[int]) -> dict[int, str]:
    """The cuda plugin's reporter as the server calls it: a failure means no usage."""
    try:
        return gpu_usage(indices)
    except Exception:
        return {}


async def describe_rows(worker: Any) -> list[dict[str, Any]]:
    def no_spec(worker_id: str) -> WorkerSpec:
        raise AssertionError("describe starts nothing")

    pool = WorkerPool(
        name="m_1.0",
        queue=JobQueue(10, name="m"),
        backend=SimpleNamespace(),  # type: ignore[arg-type]
        batcher=SimpleNamespace(),  # type: ignore[arg-type]
        settings=PoolSettings(),
        make_spec=no_spec,
        next_worker_id=lambda: "9000",
        device_usage=reported_usage,
    )
    pool.slots.append(WorkerSlot("9000", status="READY", worker=worker))
    return pool.describe()


def test_describe_reports_gpu_usage_as_torchserve(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(NVML))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-c,GPU-a")
    (row,) = asyncio.run(describe_rows(GpuWorker()))
    assert list(row) == ["id", "startTime", "status", "memoryUsage", "pid", "gpu", "gpuUsage"]
    assert row["gpu"] is True
    # cuda:1 is GPU-a (NVML index 0) once CUDA_VISIBLE_DEVICES renumbers the GPUs.
    assert row["gpuUsage"] == (
        "gpuId::1 utilization.gpu [%]::37 % utilization.memory [%]::5 % memory.used [MiB]::1000 MiB"
    )


def test_describe_without_nvml_says_not_available(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    (row,) = asyncio.run(describe_rows(GpuWorker()))
    assert (row["gpu"], row["gpuUsage"]) == (True, "N/A")
    cpu_worker = GpuWorker()
    cpu_worker.device = "cpu"
    (row,) = asyncio.run(describe_rows(cpu_worker))
    assert (row["gpu"], row["gpuUsage"]) == (False, "N/A")


# ----------------------------------------------------------------------------- hooks


def test_plugin_registers_both_allocators_and_validates_placement() -> None:
    from flambeau.api import ConfigError
    from flambeau.core.config import Config

    names = [spec.name for spec in devices.flambeau_allocators(None)]
    assert names == ["round_robin", "memory_aware"]
    assert {type(spec.factory()) for spec in devices.flambeau_allocators(None)} == {
        RoundRobinAllocator,
        MemoryAwareAllocator,
    }
    devices.flambeau_configure(Config.load(cli={"cpu_placement": "threads"}, environ={}))
    with pytest.raises(ConfigError, match="cpu_placement: expected one of on, threads, off"):
        devices.flambeau_configure(Config.load(cli={"cpu_placement": "sometimes"}, environ={}))
