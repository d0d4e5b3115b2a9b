"""Backend selection shared by every op.

One knob, in one place: the ``backend=`` keyword of each public op, else the
``F2L_BACKEND`` environment variable (``auto`` | ``reference`` | ``triton`` | ``cuda``),
else ``auto``: CUDA tensors take the fastest available backend, CPU tensors the
reference path. ``triton`` on CPU tensors runs only under ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "reference", "triton", "cuda")


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def requested_backend(backend: str | None) -> str:
    name = backend if backend is not None else os.environ.get("F2L_BACKEND", "auto")
    name = name.lower()
    if name not in BACKENDS:
        src = "backend" if backend is not None else "F2L_BACKEND"
        raise ValueError(f"{src}: expected one of {BACKENDS}, got {name!r}")
    return name


def resolve_backend(backend: str | None, device: torch.device, *, has_cuda_kernel: bool = False) -> str:
    """Return the backend that will run for tensors on ``device``.

    ``auto`` picks ``triton`` (or ``cuda`` when ``has_cuda_kernel``) on CUDA devices and
    ``reference`` elsewhere -- except under ``TRITON_INTERPRET=1``, where ``auto`` on CPU
    stays ``reference`` too (the interpreter is for tests, not speed).
    """
    name = requested_backend(backend)
    if name == "auto":
        if device.type == "cuda" and triton_available():
            return "cuda" if has_cuda_kernel else "triton"
        return "reference"
    if name == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' was requested but triton is not installed")
        if device.type != "cuda" and not interpret_mode():
            raise ValueError(
                "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU testing); "
                f"got tensors on {device}"
            )
    if name == "cuda" and device.type != "cuda":
        raise ValueError(f"backend='cuda' needs CUDA tensors; got tensors on {device}")
    return name
