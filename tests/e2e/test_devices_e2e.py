"""Devices end to end: thread counts and core affinity seen inside real workers, GPU ids.

The CPU server runs on two cores (its affinity set at start, so it counts exactly two) and
checks what each worker reports from inside: ``torch.get_num_threads()``,
``os.sched_getaffinity(0)``, ``OMP_NUM_THREADS``. The GPU allocators run against fake GPU
inventories, provided by a test plugin, on any machine: workers then get a ``gpu_id`` (torch
still computes on the CPU there). The tests marked ``gpu`` need a real CUDA GPU.
"""

from __future__ import annotations

import contextlib
import os
import re
import textwrap
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from flambeau.archiver.cli import archive_main
from flambeau.testing.fixtures import Response, ServerProcess

REPORTER = '''
"""Reports where its worker runs. Headers: x-sleep keeps the worker busy for a while,
x-threads adds torch's intra-op thread count (importing torch, which takes a second)."""
import os
import time


def handle(data, context):
    if data is None:
        return None
    rows = []
    for idx, _ in enumerate(data):
        pause = context.get_request_header(idx, "x-sleep")
        if pause:
            time.sleep(float(pause))
        row = {
            "pid": os.getpid(),
            "affinity": sorted(os.sched_getaffinity(0)),
            "omp": os.environ.get("OMP_NUM_THREADS"),
            "gpu_id": context.system_properties.get("gpu_id"),
        }
        if context.get_request_header(idx, "x-threads"):
            import torch

            row["threads"] = torch.get_num_threads()
        rows.append(row)
    return rows
'''

GPU_REPORTER = '''
"""Runs on its GPU: reports the device, allocates ``x-alloc-mb`` there, frees it."""
import os

import torch

from flambeau.handler.devices import select_device


def handle(data, context):
    if data is None:
        return None
    device = select_device(context.system_properties.get("gpu_id"))
    rows = []
    for idx, _ in enumerate(data):
        size = int(context.get_request_header(idx, "x-alloc-mb") or 0)
        block = torch.empty(size * 2**20, dtype=torch.uint8, device=device) if size else None
        rows.append({"pid": os.getpid(), "device": str(device),
                     "allocated_mb": torch.cuda.memory_allocated(device) // 2**20})
        del block
    return rows
'''

# A discovery plugin for machines without a GPU: FLAMBEAU_TEST_GPUS="index:MiB,..." becomes
# cuda devices with that much free memory, so the allocators and gpu_id delivery run for real.
FAKE_GPUS = '''
"""Test plugin: CUDA devices from FLAMBEAU_TEST_GPUS ("index:free MiB,...")."""
import os

from flambeau.api import Device, DeviceDiscoverySpec, hookimpl


def _discover():
    found = []
    for item in os.environ.get("FLAMBEAU_TEST_GPUS", "").split(","):
        if item:
            index, _, free = item.partition(":")
            found.append(Device("cuda", int(index), int(free), int(free)))
    return found


@hookimpl
def flambeau_device_discovery(config):
    return [DeviceDiscoverySpec("fake-cuda", _discover)]
'''


# ----------------------------------------------------------------------------- helpers


class Models:
    """Writes handlers and archives (flambeau's archiver) into one directory tree."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.store = root / "store"
        self.store.mkdir(parents=True)
        self.src = root / "src"
        self.src.mkdir()
        (self.src / "reporter.py").write_text(REPORTER)
        (self.src / "gpu_reporter.py").write_text(GPU_REPORTER)

    def archive(self, name: str, config: str, handler: str = "reporter.py") -> str:
        yaml = self.src / f"{name}.yaml"
        yaml.write_text(textwrap.dedent(config))
        argv = ["--model-name", name, "--version", "1.0", "--handler", str(self.src / handler)]
        argv += ["--config-file", str(yaml), "--export-path", str(self.store), "-f"]
        assert archive_main(argv) == 0
        return f"{name}.mar"


@contextlib.contextmanager
def on_cpus(count: int) -> Iterator[set[int]]:
    """Start processes here on ``count`` CPUs: children inherit the affinity."""
    before = os.sched_getaffinity(0)
    if len(before) < count:
        pytest.skip(f"needs {count} CPUs, this process may use {len(before)}")
    chosen = set(sorted(before)[:count])
    os.sched_setaffinity(0, chosen)
    try:
        yield chosen
    finally:
        os.sched_setaffinity(0, before)


def start_server(
    workdir: Path,
    models: Models,
    config: Mapping[str, str] | None = None,
    args: tuple[str, ...] = (),
    env: Mapping[str, str] | None = None,
) -> ServerProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    # Inherited thread settings would hide what placement does.
    base = {"blacklist_env_vars": "OMP_NUM_THREADS|MKL_NUM_THREADS"}
    return ServerProcess(
        workdir,
        model_store=models.store,
        config={**base, **(config or {})},
        args=("--disable-token-auth", "--enable-model-api", *args),
        env=env,
    )


def register(server: ServerProcess, archive: str) -> Response:
    return server.request("POST", "management", f"/models?url={archive}", timeout=120)


def unregister(server: ServerProcess, name: str) -> None:
    server.request("DELETE", "management", f"/models/{name}", timeout=120)


@contextlib.contextmanager
def registered(server: ServerProcess, archive: str) -> Iterator[str]:
    response = register(server, archive)
    assert response.status == 200, response.body
    name = archive.removesuffix(".mar")
    try:
        yield name
    finally:
        unregister(server, name)


def report_from_each_worker(
    server: ServerProcess, name: str, workers: int, *, threads: bool = False
) -> list[dict[str, Any]]:
    """One report per worker, sorted by cores: as many concurrent requests as workers, each
    holding its worker long enough that the others must go to other workers."""
    headers = {"x-sleep": "0.4", **({"x-threads": "1"} if threads else {})}

    def one(_: int) -> dict[str, Any]:
        path = f"/predictions/{name}"
        response = server.request("POST", "inference", path, body=b"{}", headers=headers)
        assert response.status == 200, response.body
        return dict(response.json())

    with ThreadPoolExecutor(workers) as pool:
        reports = list(pool.map(one, range(workers)))
    assert len({r["pid"] for r in reports}) == workers, reports
    return sorted(reports, key=lambda r: r["affinity"])


def describe(server: ServerProcess, name: str) -> dict[str, Any]:
    response = server.request("GET", "management", f"/models/{name}")
    assert response.status == 200, response.body
    return dict(response.json()[0])


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    return Models(tmp_path_factory.mktemp("device-models"))


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., ServerProcess]]:
    started: list[ServerProcess] = []

    def start(models: Models, **kwargs: Any) -> ServerProcess:
        server = start_server(tmp_path_factory.mktemp("server"), models, **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


# ----------------------------------------------------------------------------- CPU placement


@pytest.fixture(scope="module")
def cpu_server(models: Models, servers: Callable[..., ServerProcess]) -> ServerProcess:
    """A 2-core server that pins workers (``cpu_placement=on``), the mode most tests examine."""
    with on_cpus(2):
        return servers(models, config={"cpu_placement": "on"})


def test_default_placement_sizes_threads_without_pinning(
    models: Models, servers: Callable[..., ServerProcess]
) -> None:
    with on_cpus(2):
        server = servers(models)
    archive = models.archive("defaulted", "minWorkers: 2\nmaxWorkers: 2\n")
    with registered(server, archive) as name:
        reports = report_from_each_worker(server, name, 2, threads=True)
        assert [(r["threads"], r["omp"], len(r["affinity"])) for r in reports] == [
            (1, "1", 2),
            (1, "1", 2),
        ]


def test_two_workers_on_two_cores_run_one_thread_each(
    cpu_server: ServerProcess, models: Models
) -> None:
    archive = models.archive("shared", "minWorkers: 2\nmaxWorkers: 2\n")
    with registered(cpu_server, archive) as name:
        reports = report_from_each_worker(cpu_server, name, 2, threads=True)
        assert [r["threads"] for r in reports] == [1, 1]
        assert [r["omp"] for r in reports] == ["1", "1"]
        # Each worker pinned to a core of its own, together covering the server's two.
        cores = [r["affinity"] for r in reports]
        assert all(len(c) == 1 for c in cores), cores
        assert len({c[0] for c in cores}) == 2
        assert {c[0] for c in cores} <= set(os.sched_getaffinity(0))
        assert [r["gpu_id"] for r in reports] == [None, None]
        workers = describe(cpu_server, name)["workers"]
        assert [(w["gpu"], w["gpuUsage"]) for w in workers] == [(False, "N/A")] * 2
        assert all(w["memoryUsage"] > 0 for w in workers)


def test_intra_op_threads_override_per_model(cpu_server: ServerProcess, models: Models) -> None:
    archive = models.archive("override", "minWorkers: 1\nmaxWorkers: 1\nintraOpThreads: 2\n")
    with registered(cpu_server, archive) as name:
        (report,) = report_from_each_worker(cpu_server, name, 1, threads=True)
        assert (report["threads"], report["omp"], len(report["affinity"])) == (2, "2", 2)


def test_placement_can_be_turned_off_per_model(cpu_server: ServerProcess, models: Models) -> None:
    # YAML reads a bare "off" as false: both spellings must work.
    archive = models.archive("unplaced", "minWorkers: 2\nmaxWorkers: 2\ncpuPlacement: off\n")
    with registered(cpu_server, archive) as name:
        reports = report_from_each_worker(cpu_server, name, 2, threads=True)
        # TorchServe's behaviour: every worker sizes its pool for every core.
        assert [(r["threads"], r["omp"], len(r["affinity"])) for r in reports] == [
            (2, None, 2),
            (2, None, 2),
        ]


def test_threads_only_placement_sizes_pools_without_pinning(
    cpu_server: ServerProcess, models: Models
) -> None:
    archive = models.archive(
        "threads_only", "minWorkers: 2\nmaxWorkers: 2\ncpuPlacement: threads\n"
    )
    with registered(cpu_server, archive) as name:
        reports = report_from_each_worker(cpu_server, name, 2, threads=True)
        assert [(r["threads"], len(r["affinity"])) for r in reports] == [(1, 2), (1, 2)]


def test_cores_go_back_when_workers_stop(cpu_server: ServerProcess, models: Models) -> None:
    archive = models.archive("rescaled", "minWorkers: 2\nmaxWorkers: 2\n")
    with registered(cpu_server, archive) as name:
        before = report_from_each_worker(cpu_server, name, 2)
        assert [len(r["affinity"]) for r in before] == [1, 1]
        for count in (1, 2):
            path = f"/models/{name}?min_worker={count}&max_worker={count}&synchronous=true"
            scaled = cpu_server.request("PUT", "management", path)
            assert scaled.status == 200, scaled.body
        after = report_from_each_worker(cpu_server, name, 2)
        # The retired worker's core went back, so its successor takes it instead of doubling
        # up on the survivor's.
        assert len({r["pid"] for r in before} & {r["pid"] for r in after}) == 1
        assert [r["affinity"] for r in after] == [r["affinity"] for r in before]


def test_bad_cpu_placement_is_refused_at_start(
    models: Models, servers: Callable[..., ServerProcess]
) -> None:
    with pytest.raises(RuntimeError, match="cpu_placement: expected one of on, threads, off"):
        servers(models, config={"cpu_placement": "sometimes"})


# ----------------------------------------------------------------------------- fake GPUs


@pytest.fixture(scope="module")
def fake_gpu_plugin(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment a server needs to load the fake-GPU plugin (workers inherit it)."""
    root = tmp_path_factory.mktemp("fake-gpu-plugin")
    (root / "flambeau_fake_gpus.py").write_text(FAKE_GPUS)
    path = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path}


def test_memory_aware_places_refuses_and_releases(
    models: Models, servers: Callable[..., ServerProcess], fake_gpu_plugin: dict[str, str]
) -> None:
    server = servers(
        models,
        config={"device_allocator": "memory_aware"},
        args=("-p", "flambeau_fake_gpus"),
        env={**fake_gpu_plugin, "FLAMBEAU_TEST_GPUS": "0:8000,1:4000"},
    )
    big = models.archive("big", "minWorkers: 1\nmaxWorkers: 1\nsystem:\n  maxGPUMemory: 6000\n")
    huge = models.archive("huge", "minWorkers: 1\nmaxWorkers: 1\nsystem:\n  maxGPUMemory: 5000\n")
    on_cpu = models.archive("pinned_cpu", "minWorkers: 1\nmaxWorkers: 1\ndeviceType: cpu\n")
    with registered(server, big) as name:
        (report,) = report_from_each_worker(server, name, 1)
        assert report["gpu_id"] == 0
        info = describe(server, name)
        assert info["deviceType"] == "gpu"
        assert [w["gpu"] for w in info["workers"]] == [True]
        # 2000 MiB left on cuda:0 and 4000 on cuda:1: a 5000 MiB worker fits nowhere.
        refused = register(server, huge)
        assert refused.status == 507, refused.body
        assert refused.json() == {
            "code": 507,
            "type": "InsufficientMemoryException",
            "message": "No GPU has 5000 MiB free for a worker of model huge version 1.0 "
            "(maxGPUMemory): the most is 4000 MiB on cuda:1 (0 MiB promised to running "
            "workers)",
        }
        assert server.request("GET", "management", "/models/huge").status == 404
        with registered(server, on_cpu) as cpu_name:
            (cpu_report,) = report_from_each_worker(server, cpu_name, 1)
            assert cpu_report["gpu_id"] is None
            assert describe(server, cpu_name)["deviceType"] == "cpu"
    # Unregistering "big" gave its 6000 MiB back: now the 5000 MiB model fits on cuda:0.
    with registered(server, huge) as name:
        (report,) = report_from_each_worker(server, name, 1)
        assert report["gpu_id"] == 0


def test_round_robin_gpu_ids_reach_the_handler(
    models: Models, servers: Callable[..., ServerProcess], fake_gpu_plugin: dict[str, str]
) -> None:
    server = servers(
        models,
        args=("-p", "flambeau_fake_gpus"),
        env={**fake_gpu_plugin, "FLAMBEAU_TEST_GPUS": "0:8000,1:8000,2:8000"},
        config={"number_of_gpu": "2"},
    )
    spread = models.archive("spread", "minWorkers: 2\nmaxWorkers: 2\n")
    chosen = models.archive("chosen", "minWorkers: 2\nmaxWorkers: 2\ndeviceIds: [1]\n")
    with registered(server, spread) as name:
        reports = report_from_each_worker(server, name, 2)
        # number_of_gpu=2 hides cuda:2.
        assert sorted(r["gpu_id"] for r in reports) == [0, 1]
    with registered(server, chosen) as name:
        reports = report_from_each_worker(server, name, 2)
        assert [r["gpu_id"] for r in reports] == [1, 1]
        assert describe(server, name)["deviceIds"] == [1]


# ----------------------------------------------------------------------------- real GPUs


def _cuda_available() -> bool:
    if not (Path("/proc/driver/nvidia").exists() or Path("/dev/nvidiactl").exists()):
        return False
    import torch

    return bool(torch.cuda.is_available())


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_available(), reason="needs a CUDA GPU")
def test_gpu_worker_limits_memory_reports_usage_and_frees_it(
    models: Models, servers: Callable[..., ServerProcess]
) -> None:
    pynvml = pytest.importorskip("pynvml", reason="needs nvidia-ml-py (flambeau[gpu])")
    server = servers(models)
    archive = models.archive(
        "on_gpu",
        "minWorkers: 1\nmaxWorkers: 1\ndeviceType: gpu\nsystem:\n  maxGPUMemory: 1024\n",
        handler="gpu_reporter.py",
    )
    with registered(server, archive) as name:
        ok = server.request(
            "POST", "inference", f"/predictions/{name}", body=b"{}", headers={"x-alloc-mb": "256"}
        )
        assert ok.status == 200, ok.body
        report = ok.json()
        assert report["device"].startswith("cuda:")
        # Over the per-process fraction maxGPUMemory set: CUDA OOM, reported as 507.
        too_much = server.request(
            "POST", "inference", f"/predictions/{name}", body=b"{}", headers={"x-alloc-mb": "2048"}
        )
        assert too_much.status == 507, too_much.body
        (worker,) = describe(server, name)["workers"]
        assert worker["gpu"] is True
        assert re.fullmatch(
            r"gpuId::\d+ utilization\.gpu \[%\]::\d+ % utilization\.memory \[%\]::\d+ % "
            r"memory\.used \[MiB\]::\d+ MiB",
            worker["gpuUsage"],
        ), worker["gpuUsage"]
        pid = report["pid"]
        scaled = server.request(
            "PUT", "management", f"/models/{name}?min_worker=0&synchronous=true"
        )
        assert scaled.status == 200, scaled.body
        pynvml.nvmlInit()
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                holders = set()
                for i in range(pynvml.nvmlDeviceGetCount()):
                    handle = pynvml.nvmlDeviceGetHandleByIndex(i)
                    holders |= {p.pid for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)}
                if pid not in holders:
                    break
                time.sleep(0.1)
            assert pid not in holders, "the stopped worker still holds GPU memory"
        finally:
            pynvml.nvmlShutdown()
