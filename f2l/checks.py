"""Input guards shared by the model layer and the commands: non-finite tensors and device
names, each reported as a ValueError that names the argument.

Imports nothing from ``f2l`` (torch only, on first use).
"""
from __future__ import annotations

__all__ = ["check_finite", "check_device"]


def check_finite(name: str, t) -> None:
    """ValueError naming ``name`` when tensor ``t`` holds NaN or Inf."""
    import torch

    if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name}: holds {bad} non-finite value(s) (NaN/Inf) of {t.numel()}; expected finite "
                         f"numbers")


def check_device(device, *, what: str = "device"):
    """``torch.device(device)``, with a ValueError naming ``what`` for a name torch does not
    know or a CUDA device this machine does not have (instead of torch's RuntimeError later)."""
    import torch

    if isinstance(device, torch.device):
        dev = device
    elif isinstance(device, str):
        try:
            dev = torch.device(device)
        except (RuntimeError, ValueError):
            raise ValueError(f"{what}: expected a torch device such as 'cpu', 'cuda' or 'cuda:1', got {device!r}") \
                from None
    else:
        raise TypeError(f"{what}: expected a str or torch.device, got {type(device).__name__}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"{what}: {str(device)!r} requested but {why}; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{what}: {str(device)!r} requested but only {torch.cuda.device_count()} CUDA "
                             f"device(s) are visible")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"{what}: {str(device)!r} requested but MPS is not available")
    return dev
