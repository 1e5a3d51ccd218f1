"""A per-GPU batch that does not fit: a clear error at the first step instead of a CUDA OOM traceback."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from pipeline.errors import UserError

GIB = 2**30
HEADROOM = 0.9  # of the device's memory: the allocator's fragmentation and the CUDA context need the rest


def oom_message(per_gpu_batch: int, base: int, peak: int, total: int, field: str = "data.batch_size") -> str:
    """What the first step needed (``peak`` bytes, of which ``base`` held before it: models and
    optimisers), what the device has, and the largest batch that fits if memory grows linearly with it."""
    per_sample = max(peak - base, 1) / per_gpu_batch
    fits = int((HEADROOM * total - base) // per_sample)
    suggestion = (
        f"use a per-GPU batch of at most {fits} (set {field} accordingly, or add GPUs)"
        if fits >= 1
        else "the models alone nearly fill it: use a GPU with more memory or a smaller supernet"
    )
    return (
        f"per-GPU batch {per_gpu_batch} does not fit: the first step needed at least {peak / GIB:.2f} GiB "
        f"({base / GIB:.2f} GiB before it) of the GPU's {total / GIB:.2f} GiB; {suggestion}"
    )


def requested_bytes(error: BaseException) -> int:
    """The allocation that failed, from torch's message ("Tried to allocate 1.50 GiB"), 0 if absent."""
    m = re.search(r"Tried to allocate ([\d.]+) (GiB|MiB|KiB|B)", str(error))
    scale = {"GiB": GIB, "MiB": 2**20, "KiB": 2**10, "B": 1}
    return int(float(m.group(1)) * scale[m.group(2)]) if m else 0


@contextmanager
def first_step_fits(device: torch.device, per_gpu_batch: int, is_first: Callable[[], bool]) -> Iterator[None]:
    """Turn a CUDA out-of-memory error while ``is_first()`` (no step finished yet) into ``UserError``."""
    if device.type != "cuda":
        yield
        return
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    try:
        yield
    except torch.cuda.OutOfMemoryError as e:
        if not is_first():
            raise
        peak = torch.cuda.max_memory_allocated(device) + requested_bytes(e)
        total = torch.cuda.get_device_properties(device).total_memory
        raise UserError(oom_message(per_gpu_batch, base, peak, total)) from None
