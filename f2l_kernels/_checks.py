"""Input guards shared by the ops: every message names the argument."""
from __future__ import annotations

from typing import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_tensor(
    name: str,
    t,
    *,
    ndim: int | Sequence[int] | None = None,
    dtype: torch.dtype | Sequence[torch.dtype] | None = None,
    device: torch.device | None = None,
    shape: Sequence[int | None] | None = None,
    allow_none: bool = False,
) -> None:
    if t is None:
        if allow_none:
            return
        raise TypeError(f"{name}: expected a torch.Tensor, got None")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        dims = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in dims:
            raise ValueError(f"{name}: expected {' or '.join(map(str, dims))} dims, got shape {tuple(t.shape)}")
    if dtype is not None:
        dts = (dtype,) if isinstance(dtype, torch.dtype) else tuple(dtype)
        if t.dtype not in dts:
            raise TypeError(f"{name}: expected dtype {' or '.join(map(str, dts))}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {t.device}")
    if shape is not None:
        if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise ValueError(f"{name}: expected shape {want}, got {list(t.shape)}")


def check_same(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    """Same dtype and device."""
    if a.dtype != b.dtype:
        raise TypeError(f"{name_b}: expected dtype {a.dtype} (the dtype of {name_a}), got {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"{name_b}: expected device {a.device} (the device of {name_a}), got {b.device}")
