"""Multi-GPU training under ``torchrun``: joining the process group it describes and
wrapping the hypernetwork in ``DistributedDataParallel`` (the frozen base stays outside).
Every rank computes its share of the global batch; gradients are averaged with one
all-reduce per step (NCCL on GPUs, gloo on CPUs). See docs/training.md.
"""
from __future__ import annotations

import os

import torch


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _maybe_init_distributed(device: torch.device | None) -> bool:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1); True if we created it."""
    import torch.distributed as dist

    if not dist.is_available() or dist.is_initialized():
        return False
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    use_nccl = torch.cuda.is_available() and (device is None or device.type == "cuda")
    dist.init_process_group(backend="nccl" if use_nccl else "gloo")
    return True


def _wrap_ddp(module: torch.nn.Module, device: torch.device):
    """``module`` under :class:`torch.nn.parallel.DistributedDataParallel` when a process
    group of more than one rank is up, else ``module`` itself.

    DDP broadcasts rank 0's parameters and buffers at construction (every rank starts
    from the same weights whatever its seed), all-reduces gradients in buckets that
    overlap with the backward, and averages them over ranks. Only the hypernetwork is
    wrapped: the frozen base has no gradients and stays outside.
    """
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" \
        else None
    return DistributedDataParallel(module, device_ids=ids, output_device=ids[0] if ids else None)
