"""Perceiver cross-attention of a few latent queries over packed, ragged context.

Public: :func:`perceiver_attention`. Backends: ``reference`` (torch; the CPU path) and
``triton`` (a fused pass over the context that never materialises its keys or values:
the K/V projections are absorbed into the few latent queries, each context row is read
once per call, long sequences are split across programs and merged by log-sum-exp; the
backward is deterministic -- no float atomics). ``cuda`` maps to ``triton`` (there is no
hand-written CUDA kernel for this op). See ``f2l_kernels/perceiver/triton.py`` for the
derivation and the kernels.
"""
from __future__ import annotations

import numbers

import torch

from f2l_kernels._backend import resolve_backend
from f2l_kernels._checks import FLOAT_DTYPES, check_same, check_tensor
from f2l_kernels.perceiver.reference import perceiver_attention_ref

__all__ = ["perceiver_attention"]


def _validate(q, ctx, cu_seqlens, k_weight, v_weight, norm_weight, eps, latent_k, latent_v, scale):
    """Every guard of the public op; returns the host list of sequence bounds."""
    check_tensor("q", q, ndim=4, dtype=FLOAT_DTYPES)
    S, M, H, Dh = q.shape
    dev = q.device
    check_tensor("ctx", ctx, ndim=2, dtype=FLOAT_DTYPES)
    check_same("q", q, "ctx", ctx)
    N, Dc = ctx.shape
    if Dh == 0 or H == 0:
        raise ValueError(f"q: expected non-zero heads and head_dim, got shape {list(q.shape)}")
    if Dc == 0:
        raise ValueError(f"ctx: expected a non-zero feature dim Dc, got shape {list(ctx.shape)}")
    # Weights may be in another float dtype than the activations (fp32 master weights
    # under autocast); the math runs in fp32 either way.
    check_tensor("k_weight", k_weight, ndim=2, dtype=FLOAT_DTYPES, device=dev)
    check_tensor("v_weight", v_weight, ndim=2, dtype=FLOAT_DTYPES, device=dev)
    if k_weight.shape[1] != Dc or k_weight.shape[0] % Dh != 0 or k_weight.shape[0] == 0:
        raise ValueError(f"k_weight: expected shape [Hkv*Dh, Dc={Dc}] with Dh={Dh} (q.shape[3]), "
                         f"got {list(k_weight.shape)}")
    Hkv = k_weight.shape[0] // Dh
    if H % Hkv != 0:
        raise ValueError(f"k_weight: Hkv={Hkv} (k_weight.shape[0] / Dh) must divide the number of "
                         f"query heads H={H}, got k_weight shape {list(k_weight.shape)}")
    if tuple(v_weight.shape) != tuple(k_weight.shape):
        raise ValueError(f"v_weight: expected shape {list(k_weight.shape)} (as k_weight), "
                         f"got {list(v_weight.shape)}")
    check_tensor("norm_weight", norm_weight, shape=[Dc], dtype=FLOAT_DTYPES, device=dev, allow_none=True)
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not float(eps) >= 0.0:
        raise ValueError(f"eps: expected a non-negative float, got {eps!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)):
        raise TypeError(f"scale: expected a float or None, got {type(scale).__name__}")
    if (latent_k is None) != (latent_v is None):
        raise ValueError("latent_k/latent_v: pass both or neither, got "
                         f"latent_k={'None' if latent_k is None else 'a tensor'}, "
                         f"latent_v={'None' if latent_v is None else 'a tensor'}")
    if latent_k is not None:
        check_tensor("latent_k", latent_k, ndim=4)
        check_same("q", q, "latent_k", latent_k)
        check_tensor("latent_k", latent_k, shape=[S, None, Hkv, Dh])
        check_tensor("latent_v", latent_v, ndim=4)
        check_same("q", q, "latent_v", latent_v)
        check_tensor("latent_v", latent_v, shape=list(latent_k.shape))
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens: expected an int32/int64 tensor [S+1], got {type(cu_seqlens).__name__}")
    check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtype=(torch.int32, torch.int64))
    if cu_seqlens.device != dev and cu_seqlens.device.type != "cpu":
        raise ValueError(f"cu_seqlens: expected a tensor on {dev} (the device of q) or on cpu, "
                         f"got one on {cu_seqlens.device}")
    if cu_seqlens.shape[0] != S + 1:
        raise ValueError(f"cu_seqlens: expected shape [S+1={S + 1}] (S = q.shape[0]), "
                         f"got {list(cu_seqlens.shape)}")
    bounds = [int(b) for b in cu_seqlens.tolist()]
    if bounds[0] != 0:
        raise ValueError(f"cu_seqlens: expected cu_seqlens[0] == 0, got {bounds[0]}")
    if bounds[-1] != N:
        raise ValueError(f"cu_seqlens: expected cu_seqlens[-1] == N={N} (ctx.shape[0]), got {bounds[-1]}")
    for i in range(S):
        if bounds[i + 1] < bounds[i]:
            raise ValueError(f"cu_seqlens: expected non-decreasing offsets, got cu_seqlens[{i}]={bounds[i]} "
                             f"> cu_seqlens[{i + 1}]={bounds[i + 1]}")
    return bounds


def perceiver_attention(
    q: torch.Tensor,
    ctx: torch.Tensor,
    cu_seqlens: torch.Tensor,
    k_weight: torch.Tensor,
    v_weight: torch.Tensor,
    *,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    latent_k: torch.Tensor | None = None,
    latent_v: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Latent queries attend to their sequence's RMS-normed, projected context.

    For sequence ``s`` (context rows ``cu_seqlens[s]:cu_seqlens[s+1]`` of ``ctx``)::

        n = ctx_s · rsqrt(mean(ctx_s², -1) + eps) · norm_weight          # fp32
        K = concat(n k_weightᵀ, latent_k[s])   V = concat(n v_weightᵀ, latent_v[s])
        out[s, :, h] = softmax(scale · q[s, :, h] K[:, h // (H/Hkv)]ᵀ) V[:, h // (H/Hkv)]

    Args:
        q: ``[S, M, H, Dh]`` latent queries of S sequences (fp32/bf16/fp16).
        ctx: ``[N, Dc]`` packed context rows, same dtype and device as ``q``.
        cu_seqlens: int32/int64 ``[S+1]``, non-decreasing, from 0 to N (empty sequences allowed).
        k_weight, v_weight: ``[Hkv·Dh, Dc]`` projections (nn.Linear layout); Hkv divides H.
            May be in another float dtype than ``q`` (e.g. fp32 master weights).
        norm_weight: ``[Dc]`` RMSNorm weight, or None for no weight.
        eps: RMSNorm epsilon.
        latent_k, latent_v: ``[S, M', Hkv, Dh]`` extra keys/values appended per sequence,
            or both None.
        scale: softmax scale, default ``Dh ** -0.5``.
        backend: ``auto`` | ``reference`` | ``triton`` (default: ``F2L_BACKEND`` or auto).

    Returns:
        ``[S, M, H, Dh]`` in ``q.dtype`` (fp32 accumulation). A sequence with no keys at
        all (empty context and no latents) yields zeros. Differentiable w.r.t. every
        floating input; gradients come back in each input's dtype. The Triton backward
        is bitwise deterministic. fp32 inputs get IEEE fp32 products unless TF32 is allowed
        for fp32 matmuls (``torch.set_float32_matmul_precision("high")`` or
        ``torch.backends.cuda.matmul.allow_tf32 = True``): then the fused path uses TF32
        tensor cores.

    Reads ``cu_seqlens`` on the host once per call (one device sync) to plan the work.

    Example::

        >>> S, M, H, Hkv, Dh, Dc = 2, 8, 4, 2, 16, 32
        >>> q = torch.randn(S, M, H, Dh)
        >>> ctx = torch.randn(100, Dc)
        >>> cu = torch.tensor([0, 60, 100], dtype=torch.int32)
        >>> wk, wv = torch.randn(Hkv * Dh, Dc), torch.randn(Hkv * Dh, Dc)
        >>> perceiver_attention(q, ctx, cu, wk, wv).shape
        torch.Size([2, 8, 4, 16])
    """
    bounds = _validate(q, ctx, cu_seqlens, k_weight, v_weight, norm_weight, eps, latent_k, latent_v, scale)
    eps = float(eps)
    scale = float(scale) if scale is not None else None
    name = resolve_backend(backend, q.device)
    if name == "cuda":
        # No hand-written CUDA kernel for this op: the Triton path is the fast one.
        name = "triton"
    if name == "triton":
        from f2l_kernels.perceiver import triton as _tri

        return _tri.perceiver_attention_triton(
            q, ctx, cu_seqlens, k_weight, v_weight, norm_weight=norm_weight, eps=eps,
            latent_k=latent_k, latent_v=latent_v, scale=scale, bounds=bounds,
        )
    return perceiver_attention_ref(
        q, ctx, cu_seqlens, k_weight, v_weight, norm_weight=norm_weight, eps=eps,
        latent_k=latent_k, latent_v=latent_v, scale=scale,
    )
