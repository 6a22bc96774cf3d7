"""CUDA device choice, maxGPUMemory and out-of-memory mapping (skipped without a GPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from handler_testlib import body, json_request, make_mlp_dir, spec, write

from flambeau.handler.devices import is_out_of_memory, select_device

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_cpu_fallback_and_oom_classification():
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        assert select_device(0) == torch.device("cpu")
    assert select_device(None) == torch.device("cpu")
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 1 GiB"))
    assert not is_out_of_memory(RuntimeError("CUDA error: device-side assert triggered"))
    assert not is_out_of_memory(ValueError("out of memory"))


@pytest.mark.gpu
@requires_cuda
def test_model_runs_on_the_assigned_gpu(tmp_path: Path, load_service):
    model_dir, model = make_mlp_dir(tmp_path)
    service = load_service(spec(model_dir, "mlp_handler", gpu_id=0))
    handler = service.handler
    assert handler.device == torch.device("cuda:0")
    assert next(handler.model.parameters()).device == torch.device("cuda:0")
    row = [0.5, -1.0, 2.0, 0.25]
    (response,) = service.predict([json_request("a", row)]).responses
    with torch.no_grad():
        expected = model(torch.tensor([row]))[0]
    assert torch.allclose(torch.tensor(body(response)["logits"]), expected, atol=1e-4)


GREEDY_HANDLER = """
import torch


def handle(data, context):
    if data is None:
        return None
    big = torch.empty(int(data[0]["body"]) * 1024 * 1024, dtype=torch.uint8, device="cuda:0")
    return [int(big.numel()) for _ in data]
"""


@pytest.mark.gpu
@requires_cuda
def test_max_gpu_memory_caps_the_allocator_and_oom_is_507(tmp_path: Path, load_service):
    model_dir = tmp_path / "greedy"
    write(model_dir / "greedy_handler.py", GREEDY_HANDLER)
    try:
        service = load_service(spec(model_dir, "greedy_handler", gpu_id=0, max_gpu_memory_mb=512))
        assert service.predict([json_request("a", 64)]).code == 200
        result = service.predict([json_request("b", 2048)])
        assert (result.code, result.message) == (507, "Out of resources")
        assert service.predict([json_request("c", 64)]).code == 200
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
        torch.cuda.empty_cache()
