"""Pure-torch reference of the Perceiver cross-attention over packed context.

The fp32-exact semantics shared by tests, benchmarks and the CPU path: for each
sequence s, RMSNorm its context rows, project them to keys and values, append the
sequence's latent keys/values, and run softmax attention for its latent queries.
Everything is computed in fp32; the output is cast back to ``q.dtype``. Plain torch
autograd provides the gradients.
"""
from __future__ import annotations

import numpy as np
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
    lens = [bounds[s + 1] - bounds[s] for s in range(S)]
    extra = 0 if latent_k is None else latent_k.shape[1]
    if S > 1:
        # Many sequences (the CPU training case): sorted by length into buckets that pad
        # little, one masked SDPA a bucket instead of S small ones -- the same math, far
        # fewer kernel launches, and a mixed batch does not pad to its longest sequence.
        buckets = _length_buckets(lens, extra)
        if len(buckets) < S:
            pieces, order = [], []
            for seqs in buckets:
                pieces.append(_padded(qf, k_all, v_all, bounds, seqs, latent_k, latent_v, rep, scale))
                order += seqs
            out = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
            if order != list(range(S)):
                inv = torch.empty(S, dtype=torch.long)
                inv[torch.tensor(order)] = torch.arange(S)
                out = out.index_select(0, inv.to(q.device))
            return out.to(q.dtype)
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


def _length_buckets(lens, extra, waste: float = 1.5):
    """Sequence ids sorted by length, cut into runs whose padded keys stay within ``waste``
    times their real keys (``extra`` latent keys each)."""
    order = sorted(range(len(lens)), key=lambda i: lens[i])
    buckets, cur, real = [], [], 0
    for i in order:
        n = lens[i] + extra
        if cur and (len(cur) + 1) * n > waste * (real + n):
            buckets.append(cur)
            cur, real = [], 0
        cur.append(i)
        real += n
    if cur:
        buckets.append(cur)
    return buckets


def _padded(qf, k_all, v_all, bounds, seqs, latent_k, latent_v, rep, scale):
    """Masked SDPA over sequences ``seqs`` padded to their longest (latent keys after the pad)."""
    Sb = len(seqs)
    _, M, H, Dh = qf.shape
    Hkv = k_all.shape[1]
    dev = qf.device
    lens = [bounds[s + 1] - bounds[s] for s in seqs]
    T = max(lens)
    extra = 0 if latent_k is None else latent_k.shape[1]
    contiguous = seqs == list(range(seqs[0], seqs[0] + Sb))
    sel = torch.tensor(seqs, device=dev) if not contiguous else slice(seqs[0], seqs[0] + Sb)
    q_b = qf[sel]
    if T + extra == 0:  # no keys at all: zeros, as the contract defines
        return q_b * 0.0
    if contiguous and Sb == len(bounds) - 1:  # every sequence, in order: all of the rows
        k_rows, v_rows = k_all, v_all
    else:
        src = torch.from_numpy(np.concatenate([np.arange(bounds[s], bounds[s + 1]) for s in seqs])).to(dev)
        k_rows, v_rows = k_all.index_select(0, src), v_all.index_select(0, src)
    dst_t = torch.from_numpy(np.concatenate([i * T + np.arange(n) for i, n in enumerate(lens)])).to(dev)
    k = k_all.new_zeros(Sb * T, Hkv, Dh).index_copy(0, dst_t, k_rows).view(Sb, T, Hkv, Dh)
    v = v_all.new_zeros(Sb * T, Hkv, Dh).index_copy(0, dst_t, v_rows).view(Sb, T, Hkv, Dh)
    lens_t = torch.tensor(lens, device=dev)
    valid = torch.arange(T, device=dev)[None, :] < lens_t[:, None]               # [Sb, T]
    if latent_k is not None:
        k = torch.cat([k, _up(latent_k[sel])], dim=1)
        v = torch.cat([v, _up(latent_v[sel])], dim=1)
        valid = torch.cat([valid, valid.new_ones(Sb, extra)], dim=1)
    kh = k.repeat_interleave(rep, dim=2).transpose(1, 2)                        # [Sb, H, T', Dh]
    vh = v.repeat_interleave(rep, dim=2).transpose(1, 2)
    qh = q_b.transpose(1, 2)                                                     # [Sb, H, M, Dh]
    has = valid.any(dim=1)                                                       # [Sb]
    # A sequence without keys would softmax over nothing (NaN): give it one dummy key and
    # zero its output, as the contract defines.
    mask = valid | ~has[:, None]
    o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask[:, None, None, :], scale=scale)
    o = o * has[:, None, None, None].to(o.dtype)
    return o.transpose(1, 2)
