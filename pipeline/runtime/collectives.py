"""Device-aware helpers for the training workers: which device a rank owns, and all-reduces that work
under gloo and NCCL alike (NCCL reduces only CUDA tensors, so CPU-side metrics travel to the rank's GPU
and back)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def worker_device() -> torch.device:
    """This Ray Train worker's device (its GPU, made current for NCCL and CUDA allocations, or the CPU)."""
    import ray.train.torch

    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum of ``t`` over all ranks, as a new tensor on ``t``'s device (a copy of ``t`` when not distributed)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return t.detach().clone()
    comm = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else t.device
    out = t.detach().to(comm, copy=True)
    dist.all_reduce(out)
    return out.to(t.device)


def all_reduce_mean(t: Tensor) -> Tensor:
    """Mean of ``t`` over all ranks (architecture gradients, tangents, metrics)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    return all_reduce_sum(t) / world
