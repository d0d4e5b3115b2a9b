"""Pure-torch reference of the Perceiver cross-attention over packed context.

The fp32-exact semantics shared by tests, benchmarks and the CPU path: for each
sequence s, RMSNorm its context rows, project them to keys and values, append the
sequence's latent keys/values, and run softmax attention for its latent queries.
Everything is computed in fp32; the output is cast back to ``q.dtype``. Plain torch
autograd provides the gradients.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _up(t: torch.Tensor) -> torch.Tensor:
    # fp32 math for fp32/bf16/fp16; fp64 stays fp64 so tests can build an exact truth.
    return t if t.dtype == torch.float64 else t.float()


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``x · rsqrt(mean(x²) + eps) · weight`` in fp32 (fp64 for fp64 inputs)."""
    x = _up(x)
    y = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)
    if weight is not None:
        y = y * _up(weight)
    return y


def perceiver_attention_ref(
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
) -> torch.Tensor:
    """Reference ``perceiver_attention`` (inputs are assumed validated).

    q ``[S, M, H, Dh]``, ctx ``[N, Dc]``, cu_seqlens ``[S+1]``, k_weight/v_weight
    ``[Hkv·Dh, Dc]``, norm_weight ``[Dc] | None``, latent_k/latent_v ``[S, M', Hkv, Dh] | None``
    -> ``[S, M, H, Dh]`` in ``q.dtype``.
    """
    S, M, H, Dh = q.shape
    Hkv = k_weight.shape[0] // Dh
    rep = H // Hkv
    if scale is None:
        scale = Dh ** -0.5
    # One projection GEMM over all rows (the context is read once here); the attention
    # itself runs per sequence because the sequences are ragged.
    n = rms_norm_ref(ctx, norm_weight, eps)                       # [N, Dc]
    k_all = (n @ _up(k_weight).t()).view(-1, Hkv, Dh)          # [N, Hkv, Dh]
    v_all = (n @ _up(v_weight).t()).view(-1, Hkv, Dh)          # [N, Hkv, Dh]
    qf = _up(q)
    bounds = [int(b) for b in cu_seqlens.tolist()]
    outs = []
    for s in range(S):
        a, b = bounds[s], bounds[s + 1]
        k = k_all[a:b]
        v = v_all[a:b]
        if latent_k is not None:
            k = torch.cat([k, _up(latent_k[s])], dim=0)
            v = torch.cat([v, _up(latent_v[s])], dim=0)
        if k.shape[0] == 0:
            # No keys at all: the contract defines the output as zeros (and the gradient
            # through this sequence as zero) rather than the NaN an empty softmax gives.
            outs.append(qf[s] * 0.0)
            continue
        qh = qf[s].transpose(0, 1)                                 # [H, M, Dh]
        kh = k.repeat_interleave(rep, dim=1).transpose(0, 1)       # [H, len, Dh]
        vh = v.repeat_interleave(rep, dim=1).transpose(0, 1)       # [H, len, Dh]
        o = F.scaled_dot_product_attention(qh, kh, vh, scale=scale)  # [H, M, Dh]
        outs.append(o.transpose(0, 1))
    if not outs:
        return q * 0
    return torch.stack(outs, dim=0).to(q.dtype)
