"""Device choice, GPU memory limits and out-of-memory detection for handlers.

Shared by :class:`~flambeau.handler.base_handler.BaseHandler`, ``handler_factory`` and
:class:`~flambeau.handler.service.ModelService`; torch is imported inside each function.
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["is_out_of_memory", "limit_gpu_memory", "select_device"]

logger = logging.getLogger(__name__)


def select_device(gpu_id: int | None) -> torch.device:
    """``cuda:<gpu_id>`` when CUDA is available and a GPU was assigned, else ``mps`` (Apple)
    when a GPU was assigned and MPS is available, else ``cpu`` (TorchServe's order)."""
    import torch

    if gpu_id is not None and torch.cuda.is_available():
        return torch.device(f"cuda:{gpu_id}")
    if gpu_id is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def limit_gpu_memory(device: torch.device | str, max_mb: float) -> float | None:
    """Cap this process's CUDA caching allocator on ``device`` at ``max_mb`` megabytes.

    Uses ``torch.cuda.set_per_process_memory_fraction``, which is per process and per device:
    thread workers sharing a process share the cap. Returns the fraction set, or None when
    ``device`` is not a CUDA device or ``max_mb`` is not positive.
    """
    import torch

    dev = torch.device(device)
    if dev.type != "cuda" or max_mb <= 0 or not torch.cuda.is_available():
        return None
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    total_mb = torch.cuda.get_device_properties(index).total_memory / (1024 * 1024)
    fraction = min(1.0, float(max_mb) / total_mb)
    torch.cuda.set_per_process_memory_fraction(fraction, index)
    logger.info("limited cuda:%d to %.0f MB (fraction %.4f)", index, max_mb, fraction)
    return fraction


def is_out_of_memory(exc: BaseException) -> bool:
    """True for host OOM (MemoryError) and CUDA OOM, which TorchServe reports as 507."""
    if isinstance(exc, MemoryError):
        return True
    torch = sys.modules.get("torch")
    oom_type = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)
    if isinstance(oom_type, type) and isinstance(exc, oom_type):
        return True
    return "out of memory" in str(exc).lower() and "CUDA" in str(exc)
