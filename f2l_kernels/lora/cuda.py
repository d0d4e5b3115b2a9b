"""Loader and wrapper of the CUDA decode kernel (``csrc/lora_decode.cu``).

At decode every sequence brings one row and usually its own adapter, so the LoRA delta
is a batched GEMV bound by memory; the kernel does the shrink and the expand in one
launch (see the header of ``csrc/lora_decode.cu`` for the design and the bytes floor).

The compiled extension ``f2l_kernels._C`` is optional: it is imported lazily, the first
time :func:`available` is asked, never at import of this module. Without it (or without
a GPU) :func:`available` is False and ``f2l_kernels.lora`` runs the Triton path; on a
machine that has a GPU but no extension one warning says so, once per process.
``F2L_JIT_CUDA=1`` builds the extension on first use with
``torch.utils.cpp_extension.load`` from a source checkout instead.

The op is registered as ``torch.ops.f2l.lora_delta_decode`` (functional) and
``torch.ops.f2l.lora_delta_decode_into`` (writes ``out``), both with fake
implementations, so they trace under ``torch.compile`` and capture in CUDA graphs (all
indices are read on the device; nothing here syncs with the host).
"""
from __future__ import annotations

import glob
import importlib
import numbers
import os
import threading
import warnings
from typing import Optional

import torch

from f2l_kernels._alloc import empty
from f2l_kernels._checks import FLOAT_DTYPES, check_same, check_tensor
from f2l_kernels.lora.batch import LoraBatch

__all__ = ["available", "unavailable_reason", "supports", "launch_config", "lora_delta_decode",
           "CudaExtensionUnavailableWarning", "MAX_ENTRIES", "MAX_SLOT_RANKS"]

# Kernel limits (mirrors csrc/lora_decode.h; checked again in the binding).
MAX_ENTRIES = 256        # adapters listed by one sequence
MAX_SLOT_RANKS = 4096    # max adapters per sequence x r_max (shared-memory shrink result)
MAX_CLUSTER = 8

_CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc")


class CudaExtensionUnavailableWarning(UserWarning):
    """A GPU is present but the f2l CUDA extension is not: decode LoRA runs on Triton."""


_lock = threading.Lock()
_state: dict = {"tried": False, "ext": None, "reason": "not loaded yet", "warned": False}
_device_info_cache: dict[int, tuple[int, int]] = {}


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _cuda_present() -> bool:
    return torch.cuda.is_available()


def _jit_build():
    """Build ``csrc/`` for the current GPU with torch's JIT extension loader."""
    from torch.utils.cpp_extension import load

    srcs = sorted(glob.glob(os.path.join(_CSRC, "*.cu")) + glob.glob(os.path.join(_CSRC, "*.cpp")))
    if not srcs:
        raise ImportError(f"F2L_JIT_CUDA=1 but no CUDA sources were found in {_CSRC} (needs a source checkout)")
    major, minor = torch.cuda.get_device_capability()
    arch = f"{major}{minor}"
    return load(
        name="f2l_kernels_jit_C",
        sources=srcs,
        extra_include_paths=[_CSRC],
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3", "-lineinfo", "-gencode", f"arch=compute_{arch},code=sm_{arch}"],
        verbose=_flag("F2L_JIT_VERBOSE"),
    )


def _load_extension():
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        # bf16 loads/conversions and the tuned launch shapes assume sm_80+
        raise ImportError(f"the kernel needs compute capability 8.0+, the GPU has {major}.{minor}")
    if _flag("F2L_JIT_CUDA"):
        return _jit_build()
    return importlib.import_module("f2l_kernels._C")


def _extension():
    """The extension module, or None (the reason is kept for :func:`unavailable_reason`)."""
    if _state["tried"]:
        return _state["ext"]
    with _lock:
        if not _state["tried"]:
            try:
                _state["ext"] = _load_extension()
                _state["reason"] = ""
            except Exception as e:  # ImportError, or a JIT build/compile error
                _state["ext"] = None
                _state["reason"] = f"{type(e).__name__}: {e}"
            _state["tried"] = True
    return _state["ext"]


def available() -> bool:
    """True when the extension is importable and a CUDA device (sm_80+) is present.

    On a machine with a GPU but no extension this warns once per process
    (:class:`CudaExtensionUnavailableWarning`) and returns False, so callers fall back to
    Triton. Cheap after the first call.
    """
    if not _cuda_present():
        return False
    if _extension() is not None:
        return True
    if not _state["warned"]:
        _state["warned"] = True
        warnings.warn(
            "f2l: the CUDA extension f2l_kernels._C is not available "
            f"({_state['reason']}); decode-time LoRA runs on the Triton path. Build it with "
            "`F2L_BUILD_CUDA=1 pip install --no-build-isolation -e .` (docs/ENV.md).",
            CudaExtensionUnavailableWarning,
            stacklevel=2,
        )
    return False


def unavailable_reason() -> str:
    """Why :func:`available` is False ('' when it is True)."""
    if not _cuda_present():
        return "no CUDA device"
    _extension()
    return _state["reason"]


def _reset_for_tests() -> None:
    with _lock:
        _state.update(tried=False, ext=None, reason="not loaded yet", warned=False)


# --------------------------------------------------------------------------- launch shape
def _device_info(device: torch.device) -> tuple[int, int]:
    """(multiprocessor count, compute-capability major) of ``device``, cached."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    info = _device_info_cache.get(idx)
    if info is None:
        props = torch.cuda.get_device_properties(idx)
        info = (int(props.multi_processor_count), int(props.major))
        _device_info_cache[idx] = info
    return info


def launch_config(num_seqs: int, d_out: int, device: torch.device) -> tuple[int, int]:
    """(tiles, cluster): output tiles per sequence and thread-block cluster size.

    Enough blocks to cover the GPU (about two per SM with clusters, one without), but no
    more tiles than needed: without clusters each extra tile re-reads the sequence's A
    from L2. With clusters (sm_90+, ``F2L_CUDA_CLUSTER`` not 0) the tiles of a cluster
    split the shrink instead of repeating it. At large batch one tile per sequence.
    """
    sms, major = _device_info(device)
    use_clusters = major >= 9 and os.environ.get("F2L_CUDA_CLUSTER", "1").strip() != "0"
    max_tiles = max(1, -(-d_out // 128))  # keep >= 128 output rows (half a block) per tile
    target = (2 if use_clusters else 1) * sms
    tiles = max(1, min(max_tiles, -(-target // max(1, num_seqs))))
    if not use_clusters or tiles == 1:
        return tiles, 1
    c = 1
    while c * 2 <= min(MAX_CLUSTER, tiles):
        c *= 2
    return c * max(1, round(tiles / c)), c


def supports(batch: LoraBatch, r_max: int, dtype: torch.dtype) -> bool:
    """Whether the kernel covers this call: a decode batch within the kernel's limits."""
    return (
        isinstance(batch, LoraBatch)
        and batch.is_decode
        and dtype in FLOAT_DTYPES
        and batch.max_adapters_per_seq <= MAX_ENTRIES
        and batch.max_adapters_per_seq * r_max <= MAX_SLOT_RANKS
    )


# --------------------------------------------------------------------------- custom ops
def _launch(x, lora_a, lora_b, adapter_ptr, adapter_idx, adapter_weight, ranks, scale_vec, scale, out,
            accumulate, max_entries, tiles, cluster) -> None:
    ext = _extension()
    if ext is None:
        raise RuntimeError(f"f2l CUDA extension is not available: {unavailable_reason()}")
    ext.lora_delta_decode_out(x, lora_a, lora_b, adapter_ptr, adapter_idx, adapter_weight, ranks, scale_vec,
                              float(scale), out, bool(accumulate), int(max_entries), int(tiles), int(cluster))


@torch.library.custom_op("f2l::lora_delta_decode", mutates_args=(), device_types="cuda")
def _decode_op(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, adapter_ptr: torch.Tensor,
               adapter_idx: torch.Tensor, adapter_weight: torch.Tensor, ranks: Optional[torch.Tensor],
               scale_vec: Optional[torch.Tensor], scale: float, max_entries: int, tiles: int,
               cluster: int) -> torch.Tensor:
    out = empty((x.shape[0], lora_b.shape[1]), dtype=x.dtype, device=x.device)
    _launch(x, lora_a, lora_b, adapter_ptr, adapter_idx, adapter_weight, ranks, scale_vec, scale, out, False,
            max_entries, tiles, cluster)
    return out


@_decode_op.register_fake
def _decode_fake(x, lora_a, lora_b, adapter_ptr, adapter_idx, adapter_weight, ranks, scale_vec, scale,
                 max_entries, tiles, cluster):
    return x.new_empty((x.shape[0], lora_b.shape[1]))


@torch.library.custom_op("f2l::lora_delta_decode_into", mutates_args=("out",), device_types="cuda")
def _decode_into_op(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, adapter_ptr: torch.Tensor,
                    adapter_idx: torch.Tensor, adapter_weight: torch.Tensor, ranks: Optional[torch.Tensor],
                    scale_vec: Optional[torch.Tensor], scale: float, out: torch.Tensor, accumulate: bool,
                    max_entries: int, tiles: int, cluster: int) -> None:
    _launch(x, lora_a, lora_b, adapter_ptr, adapter_idx, adapter_weight, ranks, scale_vec, scale, out, accumulate,
            max_entries, tiles, cluster)


@_decode_into_op.register_fake
def _decode_into_fake(x, lora_a, lora_b, adapter_ptr, adapter_idx, adapter_weight, ranks, scale_vec, scale, out,
                      accumulate, max_entries, tiles, cluster):
    return None


# --------------------------------------------------------------------------- public
def lora_delta_decode(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, batch: LoraBatch, scale=1.0,
                      out: torch.Tensor | None = None, accumulate: bool = False, *, tiles: int | None = None,
                      cluster: int | None = None) -> torch.Tensor:
    """Per-example LoRA delta of one decode step, on the CUDA kernel.

    Row ``s`` of ``x`` is sequence ``s``'s only row; with its adapter list
    ``p_1..p_m`` (weights ``w``, effective ranks ``r``)::

        delta[s] = Σ_k scale[p_k] · w_k · (x[s] A_{p_k}[:r]ᵀ) B_{p_k}[:, :r]ᵀ

    Shapes: ``x [S, d_in]``, ``lora_a [P, r_max, d_in]``, ``lora_b [P, d_out, r_max]``
    (one dtype: fp32/bf16/fp16, CUDA), ``batch`` a decode :class:`LoraBatch`
    (``batch.is_decode``) on ``x``'s device, ``scale`` a float or a float32 tensor ``[P]``.
    Products and sums in fp32, rounded once to ``x.dtype``. Returns ``[S, d_out]``; with
    ``out`` (``[S, d_out]``, ``x``'s dtype) the result is written there (``accumulate``:
    added to it) and ``out`` is returned. ``tiles``/``cluster`` override
    :func:`launch_config` (benchmarks, tests).

    CUDA graphs: nothing here reads device memory on the host, so a call can be captured;
    between replays ``batch.adapter_idx`` / ``batch.adapter_weight`` (and ``x``, the
    pool's contents, a ``scale`` tensor) may be rewritten in place, as long as the list
    structure (``batch.adapter_ptr``) stays the same. Ids outside ``[0, P)`` written that
    way contribute nothing instead of reading out of bounds.

    Example::

        batch = LoraBatch.build([1] * 3, [0, -1, [1, 0]], device="cuda")
        d = lora_delta_decode(x, A, B, batch, scale=2.0)   # x [3, d_in] -> [3, d_out]
    """
    check_tensor("x", x, ndim=2, dtype=FLOAT_DTYPES)
    check_tensor("lora_a", lora_a, ndim=3)
    check_tensor("lora_b", lora_b, ndim=3)
    check_same("x", x, "lora_a", lora_a)
    check_same("x", x, "lora_b", lora_b)
    S, d_in = x.shape
    P, r_max, a_in = lora_a.shape
    if a_in != d_in:
        raise ValueError(f"lora_a: expected shape [P, r_max, d_in={d_in}] (d_in of x), got {list(lora_a.shape)}")
    if lora_b.shape[0] != P or lora_b.shape[2] != r_max:
        raise ValueError(f"lora_b: expected shape [P={P}, d_out, r_max={r_max}] (matching lora_a), "
                         f"got {list(lora_b.shape)}")
    d_out = lora_b.shape[1]
    if not isinstance(batch, LoraBatch):
        raise TypeError(f"batch: expected a LoraBatch, got {type(batch).__name__}")
    if not batch.is_decode or batch.num_seqs != S:
        raise ValueError(f"batch: expected a decode batch of {S} sequences with one row each (x has {S} rows), "
                         f"got {batch.num_seqs} sequences, is_decode={batch.is_decode}")
    if batch.max_pool_index >= P:
        raise ValueError(f"batch: adapter id {batch.max_pool_index} is out of range for a pool of {P} "
                         f"adapters (lora_a.shape[0])")
    if batch.ranks is not None and batch.ranks.numel() != P:
        raise ValueError(f"batch: ranks has {batch.ranks.numel()} entries but the pool has {P} adapters")
    if not supports(batch, r_max, x.dtype):
        raise ValueError(f"batch: {batch.max_adapters_per_seq} adapters per sequence x r_max={r_max} exceed the "
                         f"CUDA kernel's limits ({MAX_ENTRIES} adapters, {MAX_SLOT_RANKS} rank slots); "
                         f"use backend='triton'")

    scale_vec, scale_f = None, 1.0
    if isinstance(scale, torch.Tensor):
        check_tensor("scale", scale, ndim=(0, 1))
        if scale.device != x.device:
            raise ValueError(f"scale: expected a tensor on {x.device} (the device of x), got one on {scale.device}")
        if not scale.is_floating_point():
            raise TypeError(f"scale: expected a floating-point tensor, got dtype {scale.dtype}")
        s32 = scale.detach().to(torch.float32)
        if s32.dim() == 0:
            s32 = s32.expand(P)
        elif s32.shape[0] != P:
            raise ValueError(f"scale: expected a float or a tensor of shape [P={P}], got {list(scale.shape)}")
        scale_vec = s32.contiguous()
    elif isinstance(scale, numbers.Real) and not isinstance(scale, bool):
        scale_f = float(scale)
    else:
        raise TypeError(f"scale: expected a float or a float32 tensor [P], got {type(scale).__name__}")

    if out is not None:
        check_tensor("out", out, shape=(S, d_out))
        check_same("x", x, "out", out)
        if d_out > 1 and out.stride(1) != 1:
            raise ValueError(f"out: expected unit stride along d_out, got strides {list(out.stride())}")
    elif accumulate:
        raise ValueError("accumulate: True needs out= (the tensor to add the delta to)")

    if x.device.type != "cuda":
        raise ValueError(f"x: expected a CUDA tensor, got one on {x.device} (use backend='reference' or 'triton')")
    if batch.device != x.device:
        raise ValueError(f"batch: built on {batch.device} but x is on {x.device}; pass device= to LoraBatch.build")
    if tiles is None or cluster is None:
        t_auto, c_auto = launch_config(S, d_out, x.device)
        tiles = t_auto if tiles is None else tiles
        cluster = (c_auto if tiles % c_auto == 0 else 1) if cluster is None else cluster
    if not isinstance(tiles, int) or tiles < 1:
        raise ValueError(f"tiles: expected an int >= 1, got {tiles!r}")
    if cluster not in (1, 2, 4, 8) or tiles % cluster:
        raise ValueError(f"cluster: expected 1, 2, 4 or 8 dividing tiles={tiles}, got {cluster!r}")

    if d_in > 1 and x.stride(1) != 1:
        x = x.contiguous()
    # No-ops for pools laid out as [P, r, d] / [P, d, r] slices (the AdapterPool layout).
    lora_a = lora_a.contiguous()
    lora_b = lora_b.contiguous()
    args = (x, lora_a, lora_b, batch.adapter_ptr, batch.adapter_idx,
            batch.adapter_weight, batch.ranks, scale_vec, scale_f)
    meta = (batch.max_adapters_per_seq, tiles, cluster)
    if out is None:
        return torch.ops.f2l.lora_delta_decode(*args, *meta)
    torch.ops.f2l.lora_delta_decode_into(*args, out, bool(accumulate), *meta)
    return out
