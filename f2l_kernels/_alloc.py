"""Output allocation for kernel launchers.

Launchers allocate outputs with :func:`empty`. Under ``F2L_POISON_OUTPUTS=1`` (the test
suite sets it) the buffer is filled with NaN (ints: -1) so that any element a kernel
forgets to write fails the comparison instead of passing by luck.
"""
from __future__ import annotations

import os

import torch


def poison_enabled() -> bool:
    return os.environ.get("F2L_POISON_OUTPUTS", "0") == "1"


def empty(shape, *, dtype: torch.dtype, device) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=device)
    if poison_enabled():
        t.fill_(float("nan") if t.is_floating_point() else -1)
    return t
