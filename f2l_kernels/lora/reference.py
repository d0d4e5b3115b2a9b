"""Per-example LoRA in plain torch: the semantics, the CPU path, the benchmark baseline.

For each row ``x`` of sequence ``i`` (entries ``k`` of its adapter list, pool ids ``p_k``,
weights ``w_ik``, effective ranks ``r_p``)::

    delta = Σ_k scale_{p_k} · w_ik · (x A_{p_k}[:r]ᵀ) B_{p_k}[:, :r]ᵀ
    y     = x Wᵀ + bias + delta

Everything is computed in fp32 and rounded once to the input dtype. The sequences are
laid out as a padded ``[S, T_max, d]`` batch (a view when all lengths are equal) and
a sequence's adapter list is one adapter in rank space: one pair of batched einsums over
per-sequence copies of the listed A and B -- the straightforward approach the fused
kernels are measured against. Plain torch
autograd differentiates it.
"""
from __future__ import annotations

import torch

from f2l_kernels.lora.batch import LoraBatch

__all__ = ["lora_delta_ref", "lora_linear_ref", "concat_adapters_ref", "scale_vector"]


def scale_vector(scale, pool_size: int, device) -> torch.Tensor:
    """``scale`` (float or tensor ``[P]``/scalar) as a detached float32 ``[P]`` vector."""
    if isinstance(scale, torch.Tensor):
        s = scale.detach().to(device=device, dtype=torch.float32)
        return s.expand(pool_size) if s.dim() == 0 else s
    return torch.full((pool_size,), float(scale), dtype=torch.float32, device=device)


def _padding(batch: LoraBatch, device):
    """(pad_idx [S, T] long into x rows with N for padding, valid_idx [N] into S*T) or None."""
    lens = batch.seq_lens_host
    S, T = batch.num_seqs, batch.max_rows_per_seq
    if all(n == T for n in lens):
        return None
    key = ("ref_pad", str(device))
    v = batch._cache.get(key)
    if v is None:
        pad = torch.full((S, T), batch.num_rows, dtype=torch.long)
        valid = []
        start = 0
        for i, n in enumerate(lens):
            pad[i, :n] = torch.arange(start, start + n)
            valid.extend(range(i * T, i * T + n))
            start += n
        v = (pad.to(device), torch.tensor(valid, dtype=torch.long).to(device))
        batch._cache[key] = v
    return v


def _slots(batch: LoraBatch, device):
    """The adapter lists as ``[S, J]`` tables (J = the longest list): pool id (long),
    weight (fp32), present (bool); and whether every slot is present (no ragged lists)."""
    key = ("ref_slots", str(device))
    v = batch._cache.get(key)
    if v is None:
        ptr, idx, wts = batch.adapter_ptr_host, batch.adapter_idx_host, batch.adapter_weight_host
        S, J = batch.num_seqs, batch.max_adapters_per_seq
        pid, w, ok = [], [], []
        for i in range(S):
            for j in range(J):
                k = ptr[i] + j
                has = k < ptr[i + 1]
                pid.append(idx[k] if has else 0)
                w.append(wts[k] if has else 0.0)
                ok.append(has)
        v = (torch.tensor(pid, dtype=torch.long).view(S, J).to(device),
             torch.tensor(w, dtype=torch.float32).view(S, J).to(device),
             torch.tensor(ok, dtype=torch.bool).view(S, J).to(device), all(ok))
        batch._cache[key] = v
    return v


def lora_delta_ref(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, batch: LoraBatch,
                   scale=1.0, *, compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[N, d_out]`` delta for rows ``x [N, d_in]`` (inputs assumed validated), computed and
    returned in ``compute_dtype`` (fp32: the semantics; the input dtype: the plain
    einsum path the benchmarks compare against)."""
    P, r_max, d_in = lora_a.shape
    d_out = lora_b.shape[1]
    S, T, N = batch.num_seqs, batch.max_rows_per_seq, x.shape[0]
    dev = x.device
    if batch.num_entries == 0 or N == 0 or r_max == 0:
        # keep the graph connected so gradients are zeros rather than None
        z = torch.zeros(d_in, d_out, device=dev, dtype=compute_dtype)
        return x.to(compute_dtype) @ z + 0.0 * (lora_a.to(compute_dtype).sum() + lora_b.to(compute_dtype).sum())
    xc = x.to(compute_dtype)
    pad = _padding(batch, dev)
    if pad is None:
        xp = xc.view(S, T, d_in)
    else:
        xp = torch.cat([xc, xc.new_zeros(1, d_in)])[pad[0]]
    svec = scale_vector(scale, P, dev).to(compute_dtype)
    ac, bc = lora_a.to(compute_dtype), lora_b.to(compute_dtype)
    pid, w, ok, dense = _slots(batch, dev)  # [S, J]
    # index_select, not ac[pid]: many sequences list the same pool entry, and the backward of
    # advanced indexing (an accumulating index_put) adds their gradients in a thread-dependent
    # order on CPU; index_select's backward does not
    flat = pid.reshape(-1)
    a_s = ac.index_select(0, flat).view(*pid.shape, r_max, d_in)  # [S, J, r, d_in]
    b_s = bc.index_select(0, flat).view(*pid.shape, d_out, r_max)  # [S, J, d_out, r]
    if not dense or batch.ranks is not None:
        # ragged lists or ranks below r_max: zero the absent slots and the unused ranks
        ranks = batch.rank_vector(P, r_max).to(dev)
        rmask = torch.arange(r_max, device=dev)[None, :] < ranks[:, None].long()  # [P, r_max]
        m = rmask[pid] & ok[..., None]  # [S, J, r]
        a_s = torch.where(m[..., None], a_s, 0.0)
        b_s = torch.where(m[:, :, None, :], b_s, 0.0)
    coef = torch.where(ok, w.to(compute_dtype) * svec[pid], 0.0)  # [S, J]
    # the list is one adapter in rank space (J·r ranks): one pair of batched GEMMs
    h = torch.einsum("std,sjrd->stjr", xp, a_s) * coef[:, None, :, None]
    out = torch.einsum("stjr,sjor->sto", h, b_s).reshape(S * T, d_out)
    return out if pad is None else out[pad[1]]


def lora_linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                    lora_b: torch.Tensor, batch: LoraBatch, scale=1.0, *,
                    compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``x Wᵀ + bias + delta`` computed in ``compute_dtype`` (default fp32), rounded once to
    ``x.dtype``; ``x [N, d_in]``."""
    cd = compute_dtype
    y = torch.nn.functional.linear(x.to(cd), weight.to(cd), None if bias is None else bias.to(cd))
    return (y + lora_delta_ref(x, lora_a, lora_b, batch, scale, compute_dtype=cd)).to(x.dtype)


def concat_adapters_ref(lora_as, lora_bs, weights=None):
    """Rank-space concatenation: ``A = cat(w_i A_i, dim=-2)``, ``B = cat(B_i, dim=-1)``."""
    if weights is None:
        a = torch.cat(list(lora_as), dim=-2)
    else:
        a = torch.cat([ai * w for ai, w in zip(lora_as, weights)], dim=-2)
    return a, torch.cat(list(lora_bs), dim=-1)
