"""Triton kernels for the Perceiver cross-attention over packed context.

Absorbed form. With ``z_j = ctx_j · r_j`` (``r_j = rsqrt(mean(ctx_j²) + eps)``, a scalar
per context row), group ``g``'s projection ``Wk_g [Dh, Dc]`` and the norm weight ``w``::

    score(h, m, j) = scale · q[m, h] · (Wk_g (w ∘ z_j)) = q̃[h, m] · z_j,
    q̃[h, m]       = scale · (q[m, h] Wk_g) ∘ w                                   # [Dc]
    out[m, h]      = (Σ_j p_j (w ∘ z_j)) Wv_gᵀ = (w ∘ a[h, m]) Wv_gᵀ,  a = Σ_j p_j z_j

so the context only ever meets ``H·M`` query rows of width Dc; its keys and values are
never formed. The *core* -- ``(a, lse) = attend(q̃, ctx)`` over each sequence's rows --
is the only pass over the context and the only part done by kernels here; the absorb,
the output projection and the merge with the few latent keys/values are tiny torch ops
(differentiated by torch autograd around the core's own Function).

Kernels
- ``_ctx_attn_fwd_kernel``: one program per (work item, query block). A work item is a
  slice of one sequence's rows (long sequences are split so one long video still fills
  the GPU). It streams the slice once, with an online softmax in the exp2 domain, and
  writes a partial ``(max, sumexp, acc)`` -- or, when the item is its sequence's only
  one, the final ``(a, lse)`` (no partial traffic, no merge). The query blocks of one work item are
  adjacent in the (flat) grid, so the slice comes from HBM once and from L2 for the
  others; all ``H·M`` query rows in one program would need an ``[H·M, Dc]`` fp32
  accumulator, far beyond the register file at the official sizes.
- ``_ctx_attn_merge_kernel``: one program per (sequence, query block): merges a split
  sequence's partials in order (log-sum-exp), writes ``a`` and ``lse``; no work item
  (empty sequence) gives ``a = 0``, ``lse = -inf``.
- ``_ctx_attn_bwd_ds_kernel``: per (work item, 64-row tile): recomputes the scores with
  the row tile resident while the query blocks stream past it (the ``H·M`` queries and
  ``dA`` are read once per 64 context rows), and writes ``G = [ds·r | p·r]`` ``[N, 2·H·M]``
  plus the per-row RMSNorm-backward coefficient ``c = r²·(dz·z)/Dc``, where
  ``dz·z = Σ_q ds·s + p·dp`` comes from values it already holds.
- ``_ctx_attn_bwd_dx_kernel``: per (work item, row tile): ``r·dz = G [q̃; dA]``, one GEMM
  over the ``2·H·M`` axis, then ``dctx = r·dz − c·ctx`` (elementwise; each row is owned
  by one program).
- ``_ctx_attn_bwd_dq_kernel``: per (work item, query block): ``dq̃ = Σ_j (ds_j r_j) ctx_j``
  partials from the ``ds·r`` half of ``G`` (final ``dq̃`` for single-item sequences).
- ``_segment_sum_kernel``: sums the ``dq̃`` partials of each split sequence in a fixed
  order (and zero-fills empty ones).
No float atomics anywhere: the backward is bitwise deterministic.

Why the backward has three passes over the rows, not two: the gradient ``dz [BN, Dc]`` of
a row tile and the scores that produce it form chained products, for which the compiler
lays every warp along one axis -- 64 rows per sm_90 warpgroup -- and a ``[64, Dc]`` fp32
accumulator per 4-warp group is 256 registers per thread at ``Dc = 512``. Splitting the
score recompute (ds pass) from the ``dz`` GEMM (dx pass) leaves each kernel one shape the
tensor cores take without replicated tiles or spills (see the config tables).

Extra memory: ``O(W·H·M·Dc)`` fp32 partials with ``W ≈ S + splits`` (the split policy,
:func:`default_split_rows`, bounds the splits by the GPU size), never ``O(N·H·Dh)``; the
backward adds ``G`` ``[N, 2·H·M]`` in the input dtype (``H·M/Dc`` of the context's bytes:
a quarter at the official sizes), ``[q̃; dA]`` ``[S, 2·H·M, Dc]`` and 4 bytes per row.

Flops per context row: ``4·H·M·Dc`` forward (scores + accumulation), ``10·H·M·Dc``
backward (ds pass: scores and dp; dx pass: ``[2·H·M]``-long products; dq̃ pass: one
product) -- 2.5x. Saving ``G`` instead of recomputing the scores is what keeps the
backward deterministic (no float atomics on dq̃) at that ratio.

fp32 inputs run IEEE fp32 products by default; TF32 tensor cores only where the user
allowed TF32 for fp32 matmuls (``torch.set_float32_matmul_precision("high")`` or
``torch.backends.cuda.matmul.allow_tf32 = True``), read at every call.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from f2l_kernels._alloc import empty
from f2l_kernels._backend import interpret_mode
from f2l_kernels._triton_common import cast_to as _cast
from f2l_kernels._triton_common import mma as _mma

__all__ = ["perceiver_attention_triton", "ctx_attention", "plan_work"]

_INTERPRET = interpret_mode()
INTERPRET: tl.constexpr = tl.constexpr(_INTERPRET)
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)

# Tests set this to force small splits (so a "long" sequence is cheap to split on CPU).
FORCE_SPLIT_ROWS: int | None = None
# Rows a work item gets at least (see default_split_rows).
MIN_SPLIT_ROWS = 256


def _configs(table):
    if _INTERPRET:
        return [triton.Config({"BLOCK_Q": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_Q": bq, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bq, bn, w, s in table]


# Tile choice at the official sizes (H·M = 128 query rows, Dc = 512 = BLOCK_D), every table
# checked by compiling ahead of time for sm_90 and sm_80 at the launch specialisation:
#  * A [64, 512] fp32 accumulator is 128 registers per thread at 8 warps -- the largest that
#    fits beside the tiles; 64 rows is also one sm_90 warpgroup MMA (4 warps x 16 rows).
#  * Products that feed one another (or share an operand) are "chained": the compiler lays
#    all W warps of such a group along one axis, so that axis must cover them (16·W rows or
#    8·W columns), else several warps compute the same MMA tile.
#  * Shared memory must fit sm_80's 163 KB, not only sm_90's 227 KB: every kept 16-bit
#    config runs on both without register spills, so autotuning never meets one that
#    cannot run.
#  * Three lists per kernel (three autotuners over one kernel): 16-bit operands, fp32 with
#    IEEE products (FMA units), fp32 with TF32 products (tensor cores).
# Few configs, because every config is a compile on the first call.
_KEY = ["HM", "DC"]

# Forward: queries [BQ, BD] stay resident, context tiles [BN, BD] stream through. Its two
# products are chained (the scores feed the accumulation), and a chained pair gets all its
# warps along one axis ([1, W] here, since BQ < Dc): BN >= 8·W keeps every warp on its own
# columns of the [BQ, BN] scores. (On sm_90 a BQ < 64 tile is below one warpgroup MMA, so
# these run on mma.sync there: a 64-row query block would need a [64, 512] fp32
# accumulator per warpgroup, 256 registers per thread.)
_FWD_16 = [(32, 64, 8, 2), (16, 64, 8, 3), (16, 64, 8, 2)]
# fp32: IEEE products run on FMA units (no MMA tiles), TF32 ones on tensor cores with the
# chained-product rule above; fp32 tiles are twice the bytes, so smaller.
_FWD_IEEE = [(16, 32, 8, 2)]
_FWD_TF32 = [(16, 32, 4, 2)]
# dq̃ pass: one product per tile ([BQ, BN] x [BN, BD]), 64 query rows = one warpgroup MMA.
_DQ_16 = [(64, 32, 8, 3), (64, 32, 8, 2)]
_DQ_IEEE = _DQ_TF32 = [(32, 32, 8, 2)]
# ds pass: a [BN, BD] row tile stays resident while the query blocks stream past it.
_DS_16 = [(16, 64, 4, 2), (16, 64, 4, 3)]
# fp32: no TF32 config both fits sm_80 (a 64-row fp32 tile is 128 KB) and keeps its warps
# on their own tiles, so the ds pass runs IEEE products even where TF32 is allowed.
_DS_IEEE = _DS_TF32 = [(16, 32, 8, 1)]
# dx pass: [BN, 2·HM] x [2·HM, BD] per row tile; BLOCK_Q is the slice of the 2·HM axis.
_DX_16 = [(32, 64, 8, 3), (32, 64, 8, 2)]
_DX_IEEE = _DX_TF32 = [(16, 32, 8, 2)]


def _tuned(fn, table16, table_ieee, table_tf32):
    """One autotuner per operand kind over the same kernel (keys: model sizes only):
    16-bit operands, fp32 IEEE products, fp32 TF32 products."""
    return {kind: triton.autotune(configs=_configs(table), key=_KEY)(fn)
            for kind, table in (("16", table16), ("ieee", table_ieee), ("tf32", table_tf32))}


def _kind(dtype: torch.dtype, prec: str) -> str:
    return "16" if dtype != torch.float32 else prec


# --------------------------------------------------------------------------- kernels


@triton.jit
def _row_rsqrt(b_x, eps, DC: tl.constexpr):
    # RMSNorm's per-row scale in fp32; padded columns are zero so they do not count.
    b_xf = b_x.to(tl.float32)                                       # [BN, BD]
    return tl.rsqrt(tl.sum(b_xf * b_xf, axis=1) / DC + eps)         # [BN]


@triton.jit
def _query_block_work(WORK_SEQ, WORK_START, WORK_END, HM: tl.constexpr, BLOCK_Q: tl.constexpr):
    # One flat axis (CUDA caps axis 1 at 65535), query block fastest: the programs that
    # share a work item run back to back, so its rows come from HBM once, then from L2.
    NQ: tl.constexpr = (HM + BLOCK_Q - 1) // BLOCK_Q
    pid = tl.program_id(0)
    i_w = pid // NQ
    i_q = pid % NQ
    seq = tl.load(WORK_SEQ + i_w).to(tl.int64)
    start = tl.load(WORK_START + i_w)
    end = tl.load(WORK_END + i_w)
    o_q = i_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    return i_w, seq, start, end, o_q


@triton.jit
def _ctx_attn_fwd_kernel(
    QT, X, WORK_SEQ, WORK_START, WORK_END, WORK_SLOT, PM, PL, PACC, A, LSE, eps,
    HM: tl.constexpr, DC: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
):
    i_w, seq, start, end, o_q = _query_block_work(WORK_SEQ, WORK_START, WORK_END, HM, BLOCK_Q)
    o_d = tl.arange(0, BLOCK_D)
    m_q = o_q < HM
    m_d = o_d < DC
    p_qt = QT + seq * HM * DC + o_q[:, None] * DC + o_d[None, :]
    b_qt = tl.load(p_qt, mask=m_q[:, None] & m_d[None, :], other=0.0)     # [BQ, BD]
    b_m = tl.full([BLOCK_Q], float("-inf"), dtype=tl.float32)              # [BQ]
    b_l = tl.zeros([BLOCK_Q], dtype=tl.float32)                            # [BQ]
    b_acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)                 # [BQ, BD]
    for n0 in range(start, end, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N)
        m_n = o_n < end
        p_x = X + o_n.to(tl.int64)[:, None] * DC + o_d[None, :]
        b_x = tl.load(p_x, mask=m_n[:, None] & m_d[None, :], other=0.0)   # [BN, BD]
        b_r = _row_rsqrt(b_x, eps, DC)                                     # [BN]
        # Scores in the exp2 domain; the row scale multiplies after the dot (a scalar
        # per row), so the unnormalised rows feed the tensor cores directly.
        b_s = _mma(b_qt, tl.trans(b_x), DOT_PREC) * (b_r * LOG2E)[None, :]  # [BQ, BN]
        b_s = tl.where(m_n[None, :], b_s, float("-inf"))
        # Every iteration has at least one valid row, so b_mn is finite.
        b_mn = tl.maximum(b_m, tl.max(b_s, axis=1))                        # [BQ]
        b_alpha = tl.exp2(b_m - b_mn)                                      # [BQ]
        b_p = tl.exp2(b_s - b_mn[:, None])                                 # [BQ, BN]
        b_l = b_l * b_alpha + tl.sum(b_p, axis=1)
        b_pr = _cast(b_p * b_r[None, :], b_x.dtype)                        # [BQ, BN]
        b_acc = b_acc * b_alpha[:, None] + _mma(b_pr, b_x, DOT_PREC)
        b_m = b_mn
    # A sequence cut into one work item needs no merge: write (a, lse) directly and skip
    # the fp32 partial (whose write + read would cost 4·HM/rows of the context traffic).
    slot = tl.load(WORK_SLOT + i_w).to(tl.int64)   # partial slot; -1: the sequence's only item
    # Per-row vectors rather than scalars: the interpreter rejects scalar-bool masks.
    single = (o_q * 0 + slot) < 0                                          # [BQ]
    multi = (o_q * 0 + slot) >= 0                                          # [BQ]
    m_qd = m_q[:, None] & m_d[None, :]
    tl.store(PM + slot * HM + o_q, b_m, mask=m_q & multi)
    tl.store(PL + slot * HM + o_q, b_l, mask=m_q & multi)
    p_acc = PACC + slot * HM * DC + o_q[:, None] * DC + o_d[None, :]
    tl.store(p_acc, b_acc, mask=m_qd & multi[:, None])
    # Items are never empty, so b_l > 0 here (padded query rows score 0 on real rows).
    tl.store(A + seq * HM * DC + o_q[:, None] * DC + o_d[None, :], b_acc / b_l[:, None], mask=m_qd & single[:, None])
    tl.store(LSE + seq * HM + o_q, (b_m + tl.log2(b_l)) * LN2, mask=m_q & single)


_FWD = _tuned(_ctx_attn_fwd_kernel, _FWD_16, _FWD_IEEE, _FWD_TF32)


@triton.jit
def _ctx_attn_merge_kernel(
    PM, PL, PACC, WORK_PTR, WORK_SLOT, A, LSE,
    HM: tl.constexpr, DC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    i_s = tl.program_id(0)
    i_q = tl.program_id(1)
    # int64 loop bounds: the partial offsets below can pass 2**31 at long contexts.
    w0 = tl.load(WORK_PTR + i_s).to(tl.int64)
    w1 = tl.load(WORK_PTR + i_s + 1).to(tl.int64)
    # Single-item sequences were finished by the forward kernel.
    w_hi = tl.where((w1 - w0) != 1, w1, w0)
    o_q = i_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    o_d = tl.arange(0, BLOCK_D)
    m_q = (o_q < HM) & ((o_q * 0 + (w1 - w0)) != 1)
    m_qd = m_q[:, None] & (o_d < DC)[None, :]
    b_m = tl.full([BLOCK_Q], float("-inf"), dtype=tl.float32)              # [BQ]
    b_l = tl.zeros([BLOCK_Q], dtype=tl.float32)                            # [BQ]
    b_acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)                 # [BQ, BD]
    # Partials in work order: a fixed reduction order, so the same bits every run.
    for w in range(w0, w_hi):
        slot = tl.load(WORK_SLOT + w).to(tl.int64)
        b_pm = tl.load(PM + slot * HM + o_q, mask=m_q, other=0.0)
        b_pl = tl.load(PL + slot * HM + o_q, mask=m_q, other=0.0)
        b_pa = tl.load(PACC + slot * HM * DC + o_q[:, None] * DC + o_d[None, :], mask=m_qd, other=0.0)
        b_mn = tl.maximum(b_m, b_pm)
        b_c0 = tl.exp2(b_m - b_mn)
        b_c1 = tl.exp2(b_pm - b_mn)
        b_l = b_l * b_c0 + b_pl * b_c1
        b_acc = b_acc * b_c0[:, None] + b_pa * b_c1[:, None]
        b_m = b_mn
    has = b_l > 0.0
    b_a = b_acc / tl.where(has, b_l, 1.0)[:, None]
    b_lse = tl.where(has, (b_m + tl.log2(tl.where(has, b_l, 1.0))) * LN2, float("-inf"))
    i_s64 = i_s.to(tl.int64)
    tl.store(A + i_s64 * HM * DC + o_q[:, None] * DC + o_d[None, :], b_a, mask=m_qd)
    tl.store(LSE + i_s64 * HM + o_q, b_lse, mask=m_q)


@triton.jit
def _ctx_attn_bwd_dq_kernel(
    G, X, WORK_SEQ, WORK_START, WORK_END, WORK_SLOT, PDQ, DQ,
    HM: tl.constexpr, DC: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
):
    i_w, seq, start, end, o_q = _query_block_work(WORK_SEQ, WORK_START, WORK_END, HM, BLOCK_Q)
    o_d = tl.arange(0, BLOCK_D)
    m_q = o_q < HM
    m_d = o_d < DC
    m_qd = m_q[:, None] & m_d[None, :]
    o_qd = seq * HM * DC + o_q[:, None] * DC + o_d[None, :]
    b_dq = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)                  # [BQ, BD]
    # dq̃ = Σ_j ds_j z_j = Σ_j (ds_j r_j) ctx_j, with ds·r saved by the dctx pass: one
    # product per row here instead of recomputing the scores (3 -> 1).
    for n0 in range(start, end, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N)
        m_n = o_n < end
        p_x = X + o_n.to(tl.int64)[:, None] * DC + o_d[None, :]
        b_x = tl.load(p_x, mask=m_n[:, None] & m_d[None, :], other=0.0)   # [BN, BD]
        # ds·r (the first half of G's rows) is contiguous along the query axis: load
        # [BN, BQ] row-major (vector loads); the transpose is free on the way to the MMA.
        p_g = G + o_n.to(tl.int64)[:, None] * (2 * HM) + o_q[None, :]
        b_dsr = tl.load(p_g, mask=m_n[:, None] & m_q[None, :], other=0.0)  # [BN, BQ]
        b_dq += _mma(tl.trans(b_dsr), b_x, DOT_PREC)
    # As in the forward: a single-item sequence writes its final dq̃, no partial.
    slot = tl.load(WORK_SLOT + i_w).to(tl.int64)
    p_dq = PDQ + slot * HM * DC + o_q[:, None] * DC + o_d[None, :]
    single = (o_q * 0 + slot) < 0                                          # [BQ]
    multi = (o_q * 0 + slot) >= 0                                          # [BQ]
    tl.store(p_dq, b_dq, mask=m_qd & multi[:, None])
    tl.store(DQ + o_qd, b_dq, mask=m_qd & single[:, None])


_DQ = _tuned(_ctx_attn_bwd_dq_kernel, _DQ_16, _DQ_IEEE, _DQ_TF32)


@triton.jit
def _ctx_attn_bwd_ds_kernel(
    QT, X, DA, LSE, DELTA, WORK_SEQ, WORK_START, WORK_END, G, COEF, eps,
    HM: tl.constexpr, DC: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr, WRITE_P: tl.constexpr,
):
    i_w = tl.program_id(0)
    i_t = tl.program_id(1)
    seq = tl.load(WORK_SEQ + i_w).to(tl.int64)
    start = tl.load(WORK_START + i_w)
    end = tl.load(WORK_END + i_w)
    o_n = start + i_t * BLOCK_N + tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, BLOCK_D)
    m_n = o_n < end
    m_d = o_d < DC
    o_n64 = o_n.to(tl.int64)
    b_x = tl.load(X + o_n64[:, None] * DC + o_d[None, :], mask=m_n[:, None] & m_d[None, :], other=0.0)  # [BN, BD]
    b_r = _row_rsqrt(b_x, eps, DC)                                         # [BN]
    b_c = tl.zeros([BLOCK_N], dtype=tl.float32)                            # [BN]
    # The row tile stays resident while the query blocks stream past it: the H·M queries
    # and dA are read once per BN rows. No product here feeds another, so the compiler
    # is free to spread the warps over both axes of the [BN, BQ] tiles.
    for q0 in range(0, HM, BLOCK_Q):
        o_q = q0 + tl.arange(0, BLOCK_Q)
        m_q = o_q < HM
        m_qd = m_q[:, None] & m_d[None, :]
        o_qd = seq * HM * DC + o_q[:, None] * DC + o_d[None, :]
        b_qt = tl.load(QT + o_qd, mask=m_qd, other=0.0)                    # [BQ, BD]
        b_da = tl.load(DA + o_qd, mask=m_qd, other=0.0)                    # [BQ, BD]
        # Padded query rows get lse = +inf: p = 0 there.
        b_lse = tl.load(LSE + seq * HM + o_q, mask=m_q, other=float("inf")) * LOG2E  # [BQ]
        b_delta = tl.load(DELTA + seq * HM + o_q, mask=m_q, other=0.0)    # [BQ]
        b_st = _mma(b_x, tl.trans(b_qt), DOT_PREC) * (b_r * LOG2E)[:, None]  # [BN, BQ]
        # Padded context rows are zero but r there is rsqrt(eps): mask p, not the scores.
        b_pt = tl.where(m_n[:, None], tl.exp2(b_st - b_lse[None, :]), 0.0)  # [BN, BQ]
        b_dpt = _mma(b_x, tl.trans(b_da), DOT_PREC) * b_r[:, None]          # [BN, BQ]
        b_dst = b_pt * (b_dpt - b_delta[None, :])                           # [BN, BQ]
        # [ds·r | p·r] rows of G [N, 2·HM] in the operand dtype (the rounding the next
        # products apply anyway); a tile row is BQ contiguous elements: vector stores.
        p_g = G + o_n64[:, None] * (2 * HM) + o_q[None, :]
        m_nq = m_n[:, None] & m_q[None, :]
        tl.store(p_g, _cast(b_dst * b_r[:, None], G.dtype.element_ty), mask=m_nq)
        if WRITE_P:
            tl.store(p_g + HM, _cast(b_pt * b_r[:, None], G.dtype.element_ty), mask=m_nq)
            # dz_j·z_j = Σ_q ds s + p dp (natural-log scores): the RMSNorm backward's row
            # dot, from values already here, so the dx pass needs no reduction of its own.
            b_c += tl.sum(b_dst * (b_st * LN2) + b_pt * b_dpt, axis=1)
    if WRITE_P:
        # dx = r·dz − (r³/Dc)(dz·x)x = dz' − (r²/Dc)(dz·z)·x with dz' = r·dz.
        tl.store(COEF + o_n64, b_r * b_r * b_c / DC, mask=m_n)


_DS = _tuned(_ctx_attn_bwd_ds_kernel, _DS_16, _DS_IEEE, _DS_TF32)


@triton.jit
def _ctx_attn_bwd_dx_kernel(
    G, QDA, X, COEF, WORK_SEQ, WORK_START, WORK_END, DX,
    HM: tl.constexpr, DC: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
):
    i_w = tl.program_id(0)
    i_t = tl.program_id(1)
    seq = tl.load(WORK_SEQ + i_w).to(tl.int64)
    start = tl.load(WORK_START + i_w)
    end = tl.load(WORK_END + i_w)
    o_n = start + i_t * BLOCK_N + tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, BLOCK_D)
    m_n = o_n < end
    m_d = o_d < DC
    o_n64 = o_n.to(tl.int64)
    # r·dz = [ds·r | p·r] [q̃; dA]: one GEMM per row tile over the 2·HM axis, whose operand
    # [q̃; dA] of the sequence streams in BQ-row slices (read once per BN context rows).
    b_dz = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)                  # [BN, BD]
    for k0 in range(0, 2 * HM, BLOCK_Q):
        o_k = k0 + tl.arange(0, BLOCK_Q)
        m_k = o_k < 2 * HM
        b_g = tl.load(G + o_n64[:, None] * (2 * HM) + o_k[None, :], mask=m_n[:, None] & m_k[None, :],
                      other=0.0)                                           # [BN, BQ]
        p_q = QDA + seq * (2 * HM) * DC + o_k[:, None] * DC + o_d[None, :]
        b_q = tl.load(p_q, mask=m_k[:, None] & m_d[None, :], other=0.0)   # [BQ, BD]
        b_dz += _mma(b_g, b_q, DOT_PREC)
    # Through z = x · r, r = rsqrt(mean(x²) + eps), with dz' = r·dz from the GEMM:
    #   dx = r·dz − (r³/Dc)·(dz·x)·x = dz' − c·x,  c = r²·(dz·z)/Dc from the ds pass,
    # an elementwise epilogue: no row reduction beside the [BN, BD] accumulator.
    m_nd = m_n[:, None] & m_d[None, :]
    b_x = tl.load(X + o_n64[:, None] * DC + o_d[None, :], mask=m_nd, other=0.0)  # [BN, BD]
    b_coef = tl.load(COEF + o_n64, mask=m_n, other=0.0)                       # [BN]
    b_dx = b_dz - b_coef[:, None] * b_x.to(tl.float32)
    tl.store(DX + o_n64[:, None] * DC + o_d[None, :], _cast(b_dx, DX.dtype.element_ty), mask=m_nd)


_DX = _tuned(_ctx_attn_bwd_dx_kernel, _DX_16, _DX_IEEE, _DX_TF32)


@triton.jit(do_not_specialize=["numel"])
def _segment_sum_kernel(P, WORK_PTR, WORK_SLOT, OUT, numel, BLOCK: tl.constexpr):
    i_s = tl.program_id(0)
    i_b = tl.program_id(1)
    # int64 loop bounds: the partial offsets below can pass 2**31 at long contexts.
    w0 = tl.load(WORK_PTR + i_s).to(tl.int64)
    w1 = tl.load(WORK_PTR + i_s + 1).to(tl.int64)
    # Single-item segments were written in place by their producer.
    w_hi = tl.where((w1 - w0) != 1, w1, w0)
    o = i_b * BLOCK + tl.arange(0, BLOCK)
    m = (o < numel) & ((o * 0 + (w1 - w0)) != 1)
    b_acc = tl.zeros([BLOCK], dtype=tl.float32)
    for w in range(w0, w_hi):
        slot = tl.load(WORK_SLOT + w).to(tl.int64)
        b_acc += tl.load(P + slot * numel + o, mask=m, other=0.0)
    tl.store(OUT + i_s.to(tl.int64) * numel + o, b_acc, mask=m)


# --------------------------------------------------------------------------- launchers


def _launch(kernel, grid, x: torch.Tensor):
    """``wrap_triton(kernel)[grid]``, or a no-op launcher for fake tensors in interpreter mode.

    On a GPU, fake-tensor tracing of the triton ops goes through ``wrap_triton``'s own
    fake rule; the CPU interpreter would instead dereference the fake tensors.
    """
    if _INTERPRET and isinstance(x, torch._subclasses.fake_tensor.FakeTensor):
        return lambda *args, **kwargs: None
    return wrap_triton(kernel)[grid]


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def default_split_rows(total_rows: int, query_rows: int, device: torch.device) -> int:
    """Rows per work item when nothing forces a split size.

    Aim for about four programs per SM over the whole call (so one long video still fills
    the GPU), but never split below ``8·query_rows`` rows: a split item costs an fp32
    partial of ``query_rows·Dc`` written and read back, ``4·query_rows/rows`` of its
    context bytes. Depends on the total row count and model sizes, never on one
    sequence's length.
    """
    q_blocks = max(1, -(-query_rows // 32))
    target_items = max(1, 4 * _num_sms(device) // q_blocks)
    rows = max(MIN_SPLIT_ROWS, 8 * query_rows, -(-total_rows // target_items))
    return -(-rows // 64) * 64


class WorkPlan(NamedTuple):
    """Work items: int32 device tensors plus the host sizes the launchers need."""

    work_seq: torch.Tensor      # [W] sequence of each item
    work_start: torch.Tensor    # [W] first row
    work_end: torch.Tensor      # [W] one past the last row
    work_ptr: torch.Tensor      # [S+1] items of sequence s: work_ptr[s]:work_ptr[s+1]
    work_slot: torch.Tensor     # [W] fp32 partial slot, -1 for a sequence's only item
    max_rows: int               # rows of the longest item (grid of the dctx pass)
    num_slots: int              # partial slots (items of split sequences)


@functools.lru_cache(maxsize=64)
def _plan_cached(bounds: tuple, device: torch.device, split_rows: int):
    seqs, starts, ends, ptr = [], [], [], [0]
    for s in range(len(bounds) - 1):
        a, b = bounds[s], bounds[s + 1]
        for lo in range(a, b, split_rows):
            seqs.append(s)
            starts.append(lo)
            ends.append(min(lo + split_rows, b))
        ptr.append(len(seqs))
    # Only split sequences get fp32 partial slots; a sequence's only item writes its result.
    slots, num_slots = [], 0
    for s in range(len(bounds) - 1):
        n = ptr[s + 1] - ptr[s]
        slots += list(range(num_slots, num_slots + n)) if n > 1 else [-1] * n
        num_slots += n if n > 1 else 0
    max_rows = max((e - a for a, e in zip(starts, ends)), default=0)
    # One host->device copy for the five index arrays.
    flat = torch.tensor(seqs + starts + ends + slots + ptr, dtype=torch.int32).to(device)
    W = len(seqs)
    return WorkPlan(flat[:W], flat[W:2 * W], flat[2 * W:3 * W], flat[4 * W:], flat[3 * W:4 * W],
                    max_rows, num_slots)


def plan_work(bounds, device: torch.device, *, split_rows: int | None = None, query_rows: int = 1):
    """Cut every non-empty sequence into work items of at most ``split_rows`` rows.

    Returns a :class:`WorkPlan`; work items are in sequence order, so a sequence's items
    ``work_ptr[s]:work_ptr[s+1]`` are reduced in a fixed order. Plans are cached
    per (bounds, device, split): the blocks of one hypernetwork forward share one.
    """
    if split_rows is None:
        split_rows = FORCE_SPLIT_ROWS
    if split_rows is None:
        split_rows = default_split_rows(bounds[-1], query_rows, device)
    return _plan_cached(tuple(int(b) for b in bounds), torch.device(device), max(1, int(split_rows)))


def tf32_allowed() -> bool:
    """Whether the user allowed TF32 for fp32 matmuls (torch's own switches)."""
    return torch.get_float32_matmul_precision() != "highest" or bool(torch.backends.cuda.matmul.allow_tf32)


def _dot_prec(dtype: torch.dtype) -> str:
    # fp32 inputs promise IEEE fp32 math by default: no silent TF32 rounding of the scores.
    # TF32 tensor cores only where the user allowed them for fp32 matmuls
    # (torch.set_float32_matmul_precision("high"/"medium") or
    # torch.backends.cuda.matmul.allow_tf32 = True). 16-bit operands ignore the setting.
    # Read at every call, so the choice follows the switches (a separate compile each).
    if dtype == torch.float32 and tf32_allowed():
        return "tf32"
    return "ieee"


@torch.library.triton_op("f2l::perceiver_ctx_fwd", mutates_args=())
def _ctx_fwd_op(qt: torch.Tensor, x: torch.Tensor, work_seq: torch.Tensor, work_start: torch.Tensor,
                work_end: torch.Tensor, work_ptr: torch.Tensor, work_slot: torch.Tensor, num_slots: int,
                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``qt [S, HM, Dc]`` (x.dtype), ``x [N, Dc]`` -> ``a [S, HM, Dc]`` fp32, ``lse [S, HM]`` fp32."""
    S, HM, Dc = qt.shape
    W = work_seq.shape[0]
    BD = max(16, triton.next_power_of_2(Dc))  # tl.dot needs every dim >= 16
    dev = x.device
    P = max(num_slots, 1)
    pm = empty((P, HM), dtype=torch.float32, device=dev)
    pl = empty((P, HM), dtype=torch.float32, device=dev)
    pacc = empty((P, HM, Dc), dtype=torch.float32, device=dev)
    a = empty((S, HM, Dc), dtype=torch.float32, device=dev)
    lse = empty((S, HM), dtype=torch.float32, device=dev)
    if W > 0:
        grid = lambda meta: (triton.cdiv(HM, meta["BLOCK_Q"]) * W,)  # noqa: E731
        prec = _dot_prec(x.dtype)
        _launch(_FWD[_kind(x.dtype, prec)], grid, x)(
            qt, x, work_seq, work_start, work_end, work_slot, pm, pl, pacc, a, lse, eps,
            HM=HM, DC=Dc, BLOCK_D=BD, DOT_PREC=prec,
        )
    if S > 0:
        BQ = 16 if _INTERPRET else 32
        _launch(_ctx_attn_merge_kernel, (S, triton.cdiv(HM, BQ)), x)(
            pm, pl, pacc, work_ptr, work_slot, a, lse, HM=HM, DC=Dc, BLOCK_D=BD, BLOCK_Q=BQ,
            num_warps=4 if _INTERPRET else 8,
        )
    return a, lse


@torch.library.triton_op("f2l::perceiver_ctx_bwd", mutates_args=())
def _ctx_bwd_op(qt: torch.Tensor, x: torch.Tensor, a: torch.Tensor, lse: torch.Tensor, da: torch.Tensor,
                dlse: torch.Tensor, work_seq: torch.Tensor, work_start: torch.Tensor, work_end: torch.Tensor,
                work_ptr: torch.Tensor, work_slot: torch.Tensor, num_slots: int, max_rows: int,
                eps: float, need_dq: bool = True, need_dx: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of the core: ``(dq̃ [S, HM, Dc] fp32, dx [N, Dc] x.dtype)``; a pass whose
    gradient is not needed is skipped (its output is then left unwritten)."""
    S, HM, Dc = qt.shape
    W = work_seq.shape[0]
    dev = x.device
    BD = max(16, triton.next_power_of_2(Dc))
    # ds_j = p_j (dA·z_j − δ), δ = dA·a − dlse (the lse output's gradient enters here).
    delta = ((da.float() * a).sum(-1) - dlse.float()).contiguous()
    da_c = da.to(x.dtype).contiguous()
    dx = empty(x.shape, dtype=x.dtype, device=dev)
    dq = empty((S, HM, Dc), dtype=torch.float32, device=dev)
    if W == 0:
        dq.zero_()
        return dq, dx
    prec = _dot_prec(x.dtype)
    if not (need_dq or need_dx):
        return dq, dx
    # The ds pass recomputes the scores once and leaves G = [ds·r | p·r] [N, 2·HM] (and a
    # per-row RMSNorm coefficient) behind: the dq̃ pass reads its ds·r half, the dx pass all.
    N = x.shape[0]
    g = empty((N, 2 * HM), dtype=x.dtype, device=dev)
    coef = empty((N,), dtype=torch.float32, device=dev) if need_dx else delta
    # Axis 1 is the row tiles of an item: at most split / BLOCK_N, well under CUDA's cap.
    grid = lambda meta: (W, triton.cdiv(max_rows, meta["BLOCK_N"]))  # noqa: E731
    _launch(_DS[_kind(x.dtype, prec)], grid, x)(
        qt, x, da_c, lse, delta, work_seq, work_start, work_end, g, coef, eps,
        HM=HM, DC=Dc, BLOCK_D=BD, DOT_PREC="ieee" if x.dtype == torch.float32 else prec, WRITE_P=need_dx,
    )
    if need_dx:
        qda = torch.cat([qt, da_c], dim=1)                                   # [S, 2·HM, Dc]
        _launch(_DX[_kind(x.dtype, prec)], grid, x)(
            g, qda, x, coef, work_seq, work_start, work_end, dx,
            HM=HM, DC=Dc, BLOCK_D=BD, DOT_PREC=prec,
        )
    if need_dq:
        pdq = empty((max(num_slots, 1), HM, Dc), dtype=torch.float32, device=dev)
        grid = lambda meta: (triton.cdiv(HM, meta["BLOCK_Q"]) * W,)  # noqa: E731
        _launch(_DQ[_kind(x.dtype, prec)], grid, x)(
            g, x, work_seq, work_start, work_end, work_slot, pdq, dq,
            HM=HM, DC=Dc, BLOCK_D=BD, DOT_PREC=prec,
        )
        numel = HM * Dc
        BLOCK = 1024
        _launch(_segment_sum_kernel, (S, triton.cdiv(numel, BLOCK)), x)(
            pdq, work_ptr, work_slot, dq, numel, BLOCK=BLOCK,
        )
    return dq, dx


def _ctx_fwd_setup(ctx, inputs, output):
    qt, x, work_seq, work_start, work_end, work_ptr, work_slot, num_slots, eps = inputs
    a, lse = output
    ctx.save_for_backward(qt, x, a, lse, work_seq, work_start, work_end, work_ptr, work_slot)
    ctx.eps = eps
    ctx.num_slots = num_slots
    # The dctx pass's grid needs the longest item's rows on the host; the eager Function
    # carries it from the plan, this op-level path (torch.compile) reads it back here.
    ctx.max_rows = int((work_end - work_start).max()) if work_seq.numel() else 0


def _ctx_fwd_backward(ctx, da, dlse):
    qt, x, a, lse, work_seq, work_start, work_end, work_ptr, work_slot = ctx.saved_tensors
    da = torch.zeros_like(a) if da is None else da
    dlse = torch.zeros_like(lse) if dlse is None else dlse
    dq, dx = torch.ops.f2l.perceiver_ctx_bwd(qt, x, a, lse, da, dlse, work_seq, work_start, work_end,
                                             work_ptr, work_slot, ctx.num_slots, ctx.max_rows, ctx.eps,
                                             ctx.needs_input_grad[0], ctx.needs_input_grad[1])
    return (dq.to(qt.dtype) if ctx.needs_input_grad[0] else None, dx if ctx.needs_input_grad[1] else None,
            None, None, None, None, None, None, None)


torch.library.register_autograd("f2l::perceiver_ctx_fwd", _ctx_fwd_backward, setup_context=_ctx_fwd_setup)


class CtxAttentionFunction(torch.autograd.Function):
    """``(a, lse) = attend(q̃, ctx)``: per sequence, ``p = softmax_j(q̃ · z_j)``,
    ``a = Σ_j p_j z_j``, ``lse = log Σ_j exp(q̃ · z_j)``, ``z_j = ctx_j · r_j``.

    Backward (recomputes p from ``lse``; never stores it; saves ``ds·r`` for the dq̃ pass)::

        dp_j  = dA · z_j
        ds_j  = p_j (dp_j − δ),           δ = dA · a − dlse
        dq̃    = Σ_j ds_j z_j
        dz_j  = Σ_{rows} (ds_j q̃ + p_j dA)
        dctx_j = r_j dz_j − (r_j³ / Dc) (dz_j · ctx_j) ctx_j

    ``dq̃`` is reduced from per-work-item partials in work order and ``dctx`` rows are each
    written by exactly one program: deterministic, fp32 accumulation throughout. Both
    passes are the registered ops ``f2l::perceiver_ctx_fwd`` / ``f2l::perceiver_ctx_bwd``
    (the forward op also carries this backward through ``register_autograd`` for
    ``torch.compile``).
    """

    @staticmethod
    def forward(ctx_, qt, x, plan: "WorkPlan", eps):
        qt_c = qt.to(x.dtype).contiguous()
        a, lse = torch.ops.f2l.perceiver_ctx_fwd(qt_c, x, plan.work_seq, plan.work_start, plan.work_end,
                                                 plan.work_ptr, plan.work_slot, plan.num_slots, eps)
        ctx_.save_for_backward(qt_c, x, a, lse)
        ctx_.plan = plan
        ctx_.eps = eps
        ctx_.qt_dtype = qt.dtype
        return a, lse

    @staticmethod
    def backward(ctx_, da, dlse):
        qt_c, x, a, lse = ctx_.saved_tensors
        p = ctx_.plan
        da = torch.zeros_like(a) if da is None else da
        dlse = torch.zeros_like(lse) if dlse is None else dlse
        dq, dx = torch.ops.f2l.perceiver_ctx_bwd(qt_c, x, a, lse, da, dlse, p.work_seq, p.work_start, p.work_end,
                                                 p.work_ptr, p.work_slot, p.num_slots, p.max_rows, ctx_.eps,
                                                 ctx_.needs_input_grad[0], ctx_.needs_input_grad[1])
        return (dq.to(ctx_.qt_dtype) if ctx_.needs_input_grad[0] else None,
                dx if ctx_.needs_input_grad[1] else None, None, None)


def ctx_attention(qt: torch.Tensor, x: torch.Tensor, bounds: list[int], eps: float, *, split_rows=None):
    """Differentiable core over packed rows; see :class:`CtxAttentionFunction`."""
    plan = plan_work(bounds, x.device, split_rows=split_rows, query_rows=qt.shape[1])
    return CtxAttentionFunction.apply(qt, x.contiguous(), plan, eps)


def perceiver_attention_triton(q, ctx, cu_seqlens, k_weight, v_weight, *, norm_weight=None, eps=1e-6,
                               latent_k=None, latent_v=None, scale=None, bounds=None):
    """Fused path of :func:`f2l_kernels.perceiver_attention` (inputs already validated)."""
    S, M, H, Dh = q.shape
    Dc = ctx.shape[1]
    Hkv = k_weight.shape[0] // Dh
    rep = H // Hkv
    if scale is None:
        scale = Dh ** -0.5
    if bounds is None:
        bounds = [int(b) for b in cu_seqlens.tolist()]
    # Heads as (KV group g, member r), h = g·rep + r: query head h reads KV head h // rep
    # (HF's repeat_kv order) without repeating any weight. The softmax scale and the norm
    # weight fold into the [Hkv, Dh, Dc] weights, the cheapest place for them.
    qg = q.float().view(S, M, Hkv, rep, Dh)
    w = norm_weight.float() if norm_weight is not None else None
    wk = k_weight.float().view(Hkv, Dh, Dc) * (scale if w is None else scale * w)
    wv = v_weight.float().view(Hkv, Dh, Dc)
    if w is not None:
        wv = wv * w
    qt = torch.einsum("smgrd,gdc->sgrmc", qg, wk)                              # [S, Hkv, rep, M, Dc]
    a, lse = ctx_attention(qt.reshape(S, H * M, Dc), ctx, bounds, eps)
    o = torch.einsum("sgrmc,gdc->smgrd", a.view(S, Hkv, rep, M, Dc), wv)      # [S, M, Hkv, rep, Dh]
    if latent_k is not None and latent_k.shape[1] > 0:
        lse = lse.view(S, Hkv, rep, M).permute(0, 3, 1, 2)                     # [S, M, Hkv, rep]
        s_l = torch.einsum("smgrd,sjgd->smgrj", qg, latent_k.float()) * scale  # [S, M, Hkv, rep, M']
        lse_l = torch.logsumexp(s_l, dim=-1)                                   # [S, M, Hkv, rep]
        o_l = torch.einsum("smgrj,sjgd->smgrd", torch.softmax(s_l, dim=-1), latent_v.float())
        # Merge by log-sum-exp; lse = -inf (empty context) gives weight 0, never NaN,
        # because lse_l is finite whenever there is at least one latent key.
        lse_t = torch.logaddexp(lse, lse_l)
        o = torch.exp(lse - lse_t).unsqueeze(-1) * o + torch.exp(lse_l - lse_t).unsqueeze(-1) * o_l
    return o.reshape(S, M, H, Dh).to(q.dtype)
