"""Per-example LoRA: a frozen linear layer whose adapter differs per sequence.

Public: :class:`LoraBatch`, :func:`lora_linear`, :func:`lora_delta`,
:func:`concat_adapters`. Backends: ``reference`` (torch; the CPU path), ``triton``
(fused forward + deterministic backward), ``cuda`` (decode-time delta, when built).
"""
from __future__ import annotations

import numbers
import warnings

import torch

from f2l_kernels import _tuned
from f2l_kernels._backend import requested_backend, resolve_backend
from f2l_kernels._checks import FLOAT_DTYPES, check_same, check_tensor
from f2l_kernels.lora.batch import LoraBatch
from f2l_kernels.lora.reference import concat_adapters_ref, lora_delta_ref, lora_linear_ref

try:
    from f2l_kernels.lora import cuda as _cuda
except ImportError:
    _cuda = None

__all__ = ["LoraBatch", "lora_linear", "lora_delta", "concat_adapters"]

_WARNED_NO_CUDA = False


def _cuda_ready() -> bool:
    if _cuda is None:
        return False
    try:
        return bool(_cuda.available())
    except Exception:
        return False


def _check_scale(scale, pool_size: int, device: torch.device):
    if isinstance(scale, torch.Tensor):
        if not scale.is_floating_point():
            raise TypeError(f"scale: expected a float or a floating-point tensor, got dtype {scale.dtype}")
        if scale.device != device:
            raise ValueError(f"scale: expected a tensor on {device} (the device of x), got one on {scale.device}")
        if scale.dim() == 0:
            return scale
        if scale.dim() != 1 or scale.shape[0] != pool_size:
            raise ValueError(f"scale: expected a float or a tensor of shape [P={pool_size}] "
                             f"(one per pool entry), got shape {list(scale.shape)}")
        return scale
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale: expected a float or a tensor [P], got {type(scale).__name__}")
    return float(scale)


def _check_common(x, lora_a, lora_b, batch, weight=None):
    """Shared guards; returns (x as rows [N, d_in], leading shape, P, r_max, d_in, d_out)."""
    check_tensor("x", x, dtype=FLOAT_DTYPES)
    if x.dim() < 1:
        raise ValueError("x: expected shape [..., d_in], got a 0-d tensor")
    check_tensor("lora_a", lora_a, ndim=3)
    check_tensor("lora_b", lora_b, ndim=3)
    check_same("x", x, "lora_a", lora_a)
    check_same("x", x, "lora_b", lora_b)
    if not isinstance(batch, LoraBatch):
        raise TypeError(f"batch: expected a LoraBatch (LoraBatch.build(...)), got {type(batch).__name__}")
    P, r_max, d_in = lora_a.shape
    d_out = None
    if weight is not None:  # lora_linear: the base layer fixes d_out, so a wrong lora_b is lora_b's fault
        check_tensor("weight", weight, ndim=2)
        d_out = weight.shape[0]
    if x.shape[-1] != d_in:
        raise ValueError(f"x: expected last dim d_in={d_in} (lora_a.shape[2]), got shape {list(x.shape)}")
    if lora_b.shape[0] != P or lora_b.shape[2] != r_max or (d_out is not None and lora_b.shape[1] != d_out):
        want = "d_out" if d_out is None else f"d_out={d_out} (weight.shape[0])"
        raise ValueError(f"lora_b: expected shape [P={P}, {want}, r_max={r_max}] (matching lora_a "
                         f"[P, r_max, d_in]), got {list(lora_b.shape)}")
    d_out = lora_b.shape[1]
    lead = tuple(x.shape[:-1])
    x2 = x.reshape(-1, d_in)
    batch.validate(num_rows=x2.shape[0], pool_size=P, r_max=r_max, device=x.device)
    return x2, lead, P, r_max, d_in, d_out


def _needs_grad(*ts) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def _pick(backend, x, batch, grad: bool, r_max: int, d_out: int | None = None) -> str:
    name = resolve_backend(backend, x.device, has_cuda_kernel=_cuda_ready())
    if name == "cuda":
        if not _cuda_ready():
            global _WARNED_NO_CUDA
            if not _WARNED_NO_CUDA:
                warnings.warn("backend='cuda': the f2l CUDA extension is not built (see setup.py, "
                              "F2L_BUILD_CUDA=1); using the Triton kernels", RuntimeWarning, stacklevel=3)
                _WARNED_NO_CUDA = True
            return "triton"
        # the CUDA kernel covers the decode-time forward only (no backward), within its limits
        supports = getattr(_cuda, "supports", None)
        if not batch.is_decode or grad or (supports is not None and not supports(batch, r_max, x.dtype)):
            return "triton"
        # auto: the CUDA kernel only where measurements say it wins (f2l_kernels/_tuned.py)
        if requested_backend(backend) == "auto" and not _tuned.decode_prefers_cuda(
                x.device, x.dtype, x.shape[-1], d_out or 0, r_max * max(1, batch.max_adapters_per_seq),
                batch.num_seqs):
            return "triton"
    return name


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, batch: LoraBatch, scale=1.0, *, backend: str | None = None) -> torch.Tensor:
    """Frozen linear layer plus a per-sequence LoRA update, fused.

    For each row ``x`` of sequence ``i`` with adapter list ``p_1..p_m`` (weights ``w``)::

        y = x Wᵀ + bias + scale · Σ_k w_ik · (x A_{p_k}[:r_{p_k}]ᵀ) B_{p_k}[:, :r_{p_k}]ᵀ

    Shapes: ``x [..., d_in]`` (rows flattened, ``batch.num_rows`` of them), ``weight
    [d_out, d_in]`` (frozen: must not require grad), ``bias [d_out] | None``, pool
    ``lora_a [P, r_max, d_in]``, ``lora_b [P, d_out, r_max]``; ``scale`` a float or a
    tensor ``[P]`` (per pool entry, not differentiated). All float tensors share one
    dtype (fp32/bf16/fp16) and device; accumulation is fp32; ``y [..., d_out]`` has
    ``x``'s dtype. Differentiable w.r.t. ``x``, ``lora_a``, ``lora_b``.

    Example::

        batch = LoraBatch.build([3, 2], [0, [1, 0]], device=x.device)
        y = lora_linear(x, W, None, A, B, batch, scale=2.0)   # x [5, d_in]
    """
    x2, lead, P, r_max, d_in, d_out = _check_common(x, lora_a, lora_b, batch, weight)
    check_tensor("weight", weight, shape=(d_out, d_in))
    check_same("x", x, "weight", weight)
    if weight.requires_grad:
        raise ValueError("weight: the base weight must be frozen (requires_grad=False); "
                         "use lora_delta plus your own linear layer to train it")
    if bias is not None:
        check_tensor("bias", bias, shape=(d_out,))
        check_same("x", x, "bias", bias)
        if bias.requires_grad:
            raise ValueError("bias: the base bias must be frozen (requires_grad=False)")
    scale = _check_scale(scale, P, x.device)
    name = _pick(backend, x, batch, _needs_grad(x, lora_a, lora_b), r_max, d_out)
    if name == "reference":
        y = lora_linear_ref(x2, weight, bias, lora_a, lora_b, batch, scale)
    elif name == "cuda":
        y = torch.nn.functional.linear(x2, weight, bias)
        y = _cuda.lora_delta_decode(x2, lora_a, lora_b, batch, scale, out=y, accumulate=True)
    else:
        from f2l_kernels.lora import triton as _tr

        y = _tr.lora_linear_triton(x2, weight, bias, lora_a, lora_b, batch, scale)
    return y.reshape(*lead, d_out)


def lora_delta(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, batch: LoraBatch, scale=1.0, *,
               out: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """The per-sequence LoRA update alone: ``scale · Σ_k w_ik (x A_{p_k}ᵀ) B_{p_k}ᵀ``.

    Same shapes and semantics as :func:`lora_linear` without the base layer. With
    ``out`` (``[..., d_out]`` or ``[N, d_out]``, ``x``'s dtype and device) the delta is
    added to ``out`` in place and ``out`` is returned.

    Example::

        batch = LoraBatch.build([1] * 4, [0, 1, -1, [0, 1]], device=x.device)
        d = lora_delta(x, A, B, batch)   # x [4, d_in] -> [4, d_out]
    """
    x2, lead, P, r_max, d_in, d_out = _check_common(x, lora_a, lora_b, batch)
    scale = _check_scale(scale, P, x.device)
    if out is not None:
        check_tensor("out", out)
        check_same("x", x, "out", out)
        if out.numel() != x2.shape[0] * d_out or out.shape[-1] != d_out:
            raise ValueError(f"out: expected {x2.shape[0]} rows of d_out={d_out} "
                             f"(shape [*{list(lead)}, {d_out}]), got {list(out.shape)}")
    grad = _needs_grad(x, lora_a, lora_b)
    name = _pick(backend, x, batch, grad, r_max, d_out)
    if name == "reference":
        d = lora_delta_ref(x2, lora_a, lora_b, batch, scale).to(x.dtype)
    elif name == "cuda":
        if out is not None and out.is_contiguous():
            _cuda.lora_delta_decode(x2, lora_a, lora_b, batch, scale, out=out.view(-1, d_out), accumulate=True)
            return out
        d = _cuda.lora_delta_decode(x2, lora_a, lora_b, batch, scale)
    else:
        from f2l_kernels.lora import triton as _tr

        if out is not None and not grad and not out.requires_grad and out.is_contiguous():
            # accumulate inside the kernel: out is read and written once
            _tr.lora_delta_triton(x2, lora_a, lora_b, batch, scale, out=out.view(-1, d_out))
            return out
        d = _tr.lora_delta_triton(x2, lora_a, lora_b, batch, scale)
    if out is not None:
        out.add_(d.reshape(out.shape))
        return out
    return d.reshape(*lead, d_out)


def concat_adapters(lora_as, lora_bs, weights=None):
    """Materialised rank-space concatenation of adapters.

    ``lora_as[i]`` ``[..., r_i, d_in]`` and ``lora_bs[i]`` ``[..., d_out, r_i]`` (PEFT
    layout, equal leading dims) become ``A = cat(w_i · A_i, dim=-2)`` ``[..., Σr, d_in]``
    and ``B = cat(B_i, dim=-1)`` ``[..., d_out, Σr]``, so that
    ``(x Aᵀ) Bᵀ = Σ_i w_i (x A_iᵀ) B_iᵀ``. ``weights``: None, or one float per adapter
    (list or 1-D tensor). Differentiable (plain torch).

    Example::

        A, B = concat_adapters([A0, A1], [B0, B1], weights=[0.5, 0.5])
    """
    if isinstance(lora_as, torch.Tensor) or not isinstance(lora_as, (list, tuple)):
        raise TypeError(f"lora_as: expected a list of tensors, got {type(lora_as).__name__}")
    if isinstance(lora_bs, torch.Tensor) or not isinstance(lora_bs, (list, tuple)):
        raise TypeError(f"lora_bs: expected a list of tensors, got {type(lora_bs).__name__}")
    if len(lora_as) == 0:
        raise ValueError("lora_as: expected at least one adapter, got an empty list")
    if len(lora_bs) != len(lora_as):
        raise ValueError(f"lora_bs: expected {len(lora_as)} tensors (one per entry of lora_as), got {len(lora_bs)}")
    a0 = lora_as[0]
    check_tensor("lora_as[0]", a0, dtype=FLOAT_DTYPES)
    if a0.dim() < 2:
        raise ValueError(f"lora_as[0]: expected shape [..., r, d_in], got {list(a0.shape)}")
    lead, d_in = tuple(a0.shape[:-2]), a0.shape[-1]
    d_out = None
    for i, (a, b) in enumerate(zip(lora_as, lora_bs)):
        check_tensor(f"lora_as[{i}]", a, ndim=a0.dim())
        check_tensor(f"lora_bs[{i}]", b, ndim=a0.dim())
        check_same("lora_as[0]", a0, f"lora_as[{i}]", a)
        check_same("lora_as[0]", a0, f"lora_bs[{i}]", b)
        if tuple(a.shape[:-2]) != lead or a.shape[-1] != d_in:
            raise ValueError(f"lora_as[{i}]: expected shape [{', '.join(map(str, lead + ('r',)))}, {d_in}] "
                             f"(like lora_as[0]), got {list(a.shape)}")
        if d_out is None:
            d_out = b.shape[-2]
        want = list(lead) + [d_out, a.shape[-2]]
        if list(b.shape) != want:
            raise ValueError(f"lora_bs[{i}]: expected shape {want} (d_out of lora_bs[0], rank of lora_as[{i}]), "
                             f"got {list(b.shape)}")
    if weights is not None:
        if isinstance(weights, torch.Tensor):
            if weights.dim() != 1 or weights.shape[0] != len(lora_as):
                raise ValueError(f"weights: expected shape [{len(lora_as)}], got {list(weights.shape)}")
            weights = [weights[i] for i in range(len(lora_as))]
        else:
            if isinstance(weights, (str, bytes)) or not isinstance(weights, (list, tuple)):
                raise TypeError(f"weights: expected a list of floats or a 1-D tensor, got {type(weights).__name__}")
            if len(weights) != len(lora_as):
                raise ValueError(f"weights: expected {len(lora_as)} weights (one per adapter), got {len(weights)}")
            for i, w in enumerate(weights):
                if isinstance(w, bool) or not isinstance(w, (numbers.Real, torch.Tensor)):
                    raise TypeError(f"weights[{i}]: expected a float, got {type(w).__name__}")
    return concat_adapters_ref(lora_as, lora_bs, weights)
