"""Triton kernels for per-example LoRA: shrink once, base GEMM + expand epilogue, split-K decode,
deterministic backward.

Layout of the work. Sequence ``i``'s adapter list is its CSR run of *entries*
(``LoraBatch.adapter_ptr / adapter_idx / adapter_weight``): pool id ``p``, rank ``r_p``
(``ranks[p]``) and coefficient ``c = weight · scale_p``. Entry ``k`` of a sequence owns slot
``k`` of the rank-space buffer ``h [N, E·BE]`` (``BE`` = ``block_e``, a power of two >= 16
and >= r_max; ``E`` = most entries of any sequence). An entry's rank rows are contiguous in
its pool slot, so every A/B load is a scalar pool base plus ``arange`` offsets: 16-byte
vector loads (rank masks are applied with ``where`` after the load, bounds masks use the
pool's static ``r_max`` / ``d``, so Triton can prove the runs contiguous and aligned).
The common case, one adapter per sequence, is one trip of the entry loop with the same
contiguous loads; compositions loop over the entries; ragged ranks zero the columns
``j >= r_p``; rows of a sequence without entries get no delta. No copies, no per-token
gathers.

Forward, sequences of >= 16 rows ("tile mode", prefill):
1. ``_lora_shrink_kernel``: per row tile (never straddling sequences) and entry,
   ``h[:, slot] = c · x Aᵀ`` in fp32 -- computed once per row, not once per output column
   block. Cost: reads x once more (``N·d_in`` elements) and A once per tile, writes
   ``N·E·BE·4`` bytes; FLOPs ``2·N·Σr·d_in``, i.e. exactly the shrink.
2. ``_lora_linear_kernel``: ``y = x Wᵀ + bias + h̃ B̃ᵀ`` tile by tile. The expand is an
   epilogue MMA per entry (K = BE), reading the tile's ``h`` (L2-resident) rounded to the
   input dtype -- the only rounding point besides the final store, as in a plain
   ``bf16`` matmul chain. Tiles are computed transposed (``yᵀ = W xᵀ``): d_out is the MMA
   M (64/128, one wgmma warpgroup per 64 rows), the rows are the MMA N (16..128; 64 for
   rank slots >= 64), so short sequences do not replicate tensor-core work across warps.
   Extra bytes over the base GEMM: x once more (the shrink), ``A + B`` per tile and the
   ``h`` round trip (``4·N·E·BE·(1 + ⌈d_out/BN⌉)`` bytes, mostly L2); extra FLOPs:
   ``2·N·E·BE·(d_in + d_out)`` -- the LoRA floor up to the rank-slot padding (the previous
   design recomputed the shrink per column block: +Σr/BN of the base GEMM on top).

Forward, sequences of < 16 rows ("row mode", decode): every row has its own adapter, so
the LoRA part is a batched GEMV and the base GEMM is skinny. Three launches:
1. ``_lora_rows_shrink_kernel``: per (row, K split), ``[BE, BK]`` A tiles times the x row,
   reduced over K in registers (2-D tiles only, no spills); fp32 partials ``hp[split]``.
2. ``_lora_rows_base_kernel``: ``x Wᵀ`` split over d_out blocks and K (fp32 partials
   ``yp[split]``), computed transposed (d_out is the MMA M, the rows N >= 16): about one to
   two programs per SM at 1..64 rows; every W element is read by exactly one program.
3. ``_lora_rows_reduce_kernel``: per (row, d_out block) sums the partials in a fixed
   order, adds bias and the row's expand (its own B, vector loads) and stores y once.
   Deterministic (fixed-order reduction, no atomics). Bytes floor (bf16):
   ``2·(d_out·d_in + S·(d_in + d_out) + Σ_entries r_p·(d_in + d_out))`` plus the fp32
   partials ``4·splits·S·(d_out + E·BE)`` (L2-resident; the split count is capped so
   they stay below W's bytes). Programs of the base GEMM on 256M's down_proj (1536 -> 576,
   132 SMs): 108 at S = 1, 16 and 64 (9 column blocks x 12 K splits); on 2.2B's: 256.

Backward (derivation in ``_fwd_backward``): ``g̃ = c · dy B̃`` by the tile shrink kernel
(B read with transposed strides; in row mode too, one masked tile per short sequence,
because B read as ``[r, d_out]`` is contiguous along the rank, which a per-row GEMV could
not load as vectors), ``dx = dy W + g̃ Ã`` by the same forward kernels (W
transposed, A as the expand), and ``dA``/``dB`` by ``_lora_grad_part_kernel`` (one program
per (entry, row chunk, column block): fp32 partials, MMA M = the column block) plus
``_lora_grad_reduce_kernel`` (per pool entry: sums its partials in ascending order). No
float atomics; the same bits every run.

Precision: bf16/fp16 operands on tensor cores with fp32 accumulation. fp32 inputs use
IEEE fp32 products by default; TF32 tensor cores are used when the caller allows it
(``torch.backends.cuda.matmul.allow_tf32`` or
``torch.get_float32_matmul_precision() != "highest"``).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from f2l_kernels._alloc import empty
from f2l_kernels._backend import interpret_mode
from f2l_kernels._triton_common import cast_to as _cast
from f2l_kernels._triton_common import mma as _mma
from f2l_kernels.lora.batch import LoraBatch

__all__ = ["lora_linear_triton", "lora_delta_triton"]

_INTERPRET = interpret_mode()

# sequences shorter than this run in row mode (per-row shrink/expand, split-K base GEMM)
ROW_MODE_MAX_ROWS = 16
# rows per backward work item (one fp32 partial of dA/dB each)
GRAD_CHUNK = 16 if _INTERPRET else 256


def _linear_configs():
    if _INTERPRET:
        return [triton.Config({"BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)]
    # accumulator yᵀ [BN, BM]; every config fits sm_80's 163 KB for BM <= 128 and keeps the
    # fp32 accumulator at <= 64 registers per thread
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bn, bk, w, s in [(128, 64, 8, 3), (64, 64, 4, 4), (128, 32, 8, 4), (64, 128, 4, 3)]
    ]


def _grad_configs():
    if _INTERPRET:
        return [triton.Config({"BLOCK_C": 64, "BLOCK_T": 16}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_C": bc, "BLOCK_T": bt}, num_warps=w, num_stages=s)
            for bc, bt, w, s in [(64, 64, 4, 3), (128, 64, 4, 3), (128, 32, 4, 4), (64, 128, 4, 3)]]


# --------------------------------------------------------------------------- kernels


@triton.jit
def _entry(ADAPTER_IDX, ADAPTER_W, RANKS, SCALE, e, scale_f, SCALE_VEC: tl.constexpr):
    """Pool id (int64), rank and coefficient ``weight · scale_p`` of list entry ``e``."""
    p = tl.load(ADAPTER_IDX + e)
    r_p = tl.load(RANKS + p)
    coef = tl.load(ADAPTER_W + e)
    if SCALE_VEC:
        coef = coef * tl.load(SCALE + p)
    else:
        coef = coef * scale_f
    return p.to(tl.int64), r_p, coef


@triton.jit(do_not_specialize=["num_tiles", "num_slots"])
def _lora_shrink_kernel(
    X, S, H, SCALE, TILES, SEQ_STARTS, ADAPTER_PTR, ADAPTER_IDX, ADAPTER_W, RANKS,
    num_tiles, num_slots, K_DIM, R_MAX,
    stride_xm, stride_xk, stride_sp, stride_sj, stride_sk, stride_hm,
    scale_f,
    SCALE_VEC: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
):
    # H[t, slot·BE + j] = c_e · Σ_k X[t, k] · S_p[j, k]  for the entries e of the tile's sequence
    pid = tl.program_id(0)
    seq = tl.load(TILES + 2 * pid)
    row0 = tl.load(TILES + 2 * pid + 1)
    row_end = tl.load(SEQ_STARTS + seq + 1)
    e0 = tl.load(ADAPTER_PTR + seq)
    e1 = tl.load(ADAPTER_PTR + seq + 1)
    o_m = row0 + tl.arange(0, BLOCK_M)
    m_m = o_m < row_end
    o_m64 = o_m.to(tl.int64)
    o_j = tl.arange(0, BLOCK_E)
    m_j = o_j < R_MAX
    for e in range(e0, e1):
        p, r_p, coef = _entry(ADAPTER_IDX, ADAPTER_W, RANKS, SCALE, e, scale_f, SCALE_VEC)
        p_s = S + p * stride_sp + o_j[:, None] * stride_sj  # [BE, 1]
        acc = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)  # [BM, BE]
        for k0 in range(0, K_DIM, BLOCK_K):
            o_k = k0 + tl.arange(0, BLOCK_K)
            m_k = o_k < K_DIM
            b_x = tl.load(X + o_m64[:, None] * stride_xm + o_k[None, :] * stride_xk,
                          mask=m_m[:, None] & m_k[None, :], other=0.0)  # [BM, BK]
            b_s = tl.load(p_s + o_k[None, :] * stride_sk, mask=m_j[:, None] & m_k[None, :], other=0.0)  # [BE, BK]
            acc += _mma(b_x, tl.trans(b_s), DOT_PREC)
        # rank rows j >= r_p belong to no adapter: zeroed after the MMA (not by a load mask,
        # which would hide the contiguity of the A rows from the compiler)
        acc = tl.where((o_j < r_p)[None, :], acc * coef, 0.0)
        tl.store(H + o_m64[:, None] * stride_hm + (e - e0) * BLOCK_E + o_j[None, :], acc, mask=m_m[:, None])
    # slots past the sequence's list are zero: h is an autograd output, every element is defined
    for sl in range(e1 - e0, num_slots):
        tl.store(H + o_m64[:, None] * stride_hm + sl * BLOCK_E + o_j[None, :],
                 tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32), mask=m_m[:, None])


@triton.autotune(configs=_linear_configs(), key=["K_DIM", "N_DIM", "R_MAX", "BLOCK_M"], restore_value=["Y"])
@triton.jit(do_not_specialize=["num_tiles"])
def _lora_linear_kernel(
    X, W, BIAS, Y, H, EX, TILES, SEQ_STARTS, ADAPTER_PTR, ADAPTER_IDX, RANKS,
    num_tiles, K_DIM, N_DIM, R_MAX,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn, stride_hm,
    stride_ep, stride_en, stride_ej,
    HAS_BASE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, ACCUMULATE: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # yᵀ tile [BN, BM] = W[n-block] X[tile]ᵀ + Σ_e EX_p[n-block, :BE] H[tile, slot_e]ᵀ
    # grouped order: GROUP_M row tiles sweep the column blocks together (x and W reuse in L2)
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N_DIM, BLOCK_N)
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(num_tiles - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    seq = tl.load(TILES + 2 * pid_m)
    row0 = tl.load(TILES + 2 * pid_m + 1)
    row_end = tl.load(SEQ_STARTS + seq + 1)
    o_m = row0 + tl.arange(0, BLOCK_M)
    m_m = o_m < row_end
    o_m64 = o_m.to(tl.int64)  # N·d can pass 2³¹ at long-context prefill
    o_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N_DIM
    o_n64 = o_n.to(tl.int64)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # [BN, BM]
    if HAS_BASE:
        for k0 in range(0, K_DIM, BLOCK_K):
            o_k = k0 + tl.arange(0, BLOCK_K)
            m_k = o_k < K_DIM
            b_w = tl.load(W + o_n64[:, None] * stride_wn + o_k[None, :] * stride_wk,
                          mask=m_n[:, None] & m_k[None, :], other=0.0)  # [BN, BK]
            b_x = tl.load(X + o_m64[:, None] * stride_xm + o_k[None, :] * stride_xk,
                          mask=m_m[:, None] & m_k[None, :], other=0.0)  # [BM, BK]
            acc += _mma(b_w, tl.trans(b_x), DOT_PREC)
    if HAS_LORA:
        e0 = tl.load(ADAPTER_PTR + seq)
        e1 = tl.load(ADAPTER_PTR + seq + 1)
        o_j = tl.arange(0, BLOCK_E)
        m_j = o_j < R_MAX
        for e in range(e0, e1):
            p = tl.load(ADAPTER_IDX + e).to(tl.int64)
            r_p = tl.load(RANKS + p)
            b_h = tl.load(H + o_m64[:, None] * stride_hm + (e - e0) * BLOCK_E + o_j[None, :],
                          mask=m_m[:, None], other=0.0)  # [BM, BE] fp32, zero past r_p
            b_e = tl.load(EX + p * stride_ep + o_n64[:, None] * stride_en + o_j[None, :] * stride_ej,
                          mask=m_n[:, None] & m_j[None, :], other=0.0)  # [BN, BE]
            b_e = tl.where((o_j < r_p)[None, :], b_e, 0.0)
            # h̃ rounded to the input dtype: the expand runs on tensor cores like the base GEMM
            acc += _mma(b_e, tl.trans(_cast(b_h, X.dtype.element_ty)), DOT_PREC)
    if HAS_BIAS:
        acc += tl.load(BIAS + o_n, mask=m_n, other=0.0).to(tl.float32)[:, None]
    p_y = Y + o_m64[None, :] * stride_ym + o_n64[:, None] * stride_yn
    m_y = m_n[:, None] & m_m[None, :]
    if ACCUMULATE:
        acc += tl.load(p_y, mask=m_y, other=0.0).to(tl.float32)
    tl.store(p_y, _cast(acc, Y.dtype.element_ty), mask=m_y)


@triton.jit(do_not_specialize=["num_rows", "num_slots", "blocks_per_split"])
def _lora_rows_shrink_kernel(
    X, S, HP, SCALE, ROW_SEQ, ADAPTER_PTR, ADAPTER_IDX, ADAPTER_W, RANKS,
    num_rows, num_slots, K_DIM, R_MAX, blocks_per_split,
    stride_xm, stride_xk, stride_sp, stride_sj, stride_sk, stride_hs, stride_hm,
    scale_f,
    SCALE_VEC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
):
    # HP[split, t, slot·BE + j] = c_e · Σ_{k in split} X[t, k] · S_p[j, k]: a GEMV per row (every
    # row may have its own adapter, so there is no reuse for an MMA to exploit); the K split
    # gives 1..64 rows enough programs, the partials are summed in a fixed order later.
    row = tl.program_id(0)
    split = tl.program_id(1)
    seq = tl.load(ROW_SEQ + row)
    e0 = tl.load(ADAPTER_PTR + seq)
    e1 = tl.load(ADAPTER_PTR + seq + 1)
    row64 = row.to(tl.int64)
    o_j = tl.arange(0, BLOCK_E)
    m_j = o_j < R_MAX
    # split boundaries are multiples of BLOCK_K so that only K_DIM masks the loads
    k_lo = split * blocks_per_split * BLOCK_K
    k_hi = tl.minimum(k_lo + blocks_per_split * BLOCK_K, K_DIM)
    for e in range(e0, e1):
        p, r_p, coef = _entry(ADAPTER_IDX, ADAPTER_W, RANKS, SCALE, e, scale_f, SCALE_VEC)
        p_s = S + p * stride_sp + o_j[:, None] * stride_sj  # [BE, 1]
        acc = tl.zeros((BLOCK_E, BLOCK_K), dtype=tl.float32)  # [BE, BK]
        for k0 in range(k_lo, k_hi, BLOCK_K):
            o_k = k0 + tl.arange(0, BLOCK_K)
            m_k = o_k < K_DIM
            b_x = tl.load(X + row64 * stride_xm + o_k * stride_xk, mask=m_k, other=0.0)  # [BK]
            b_s = tl.load(p_s + o_k[None, :] * stride_sk, mask=m_j[:, None] & m_k[None, :], other=0.0)  # [BE, BK]
            acc += b_s.to(tl.float32) * b_x.to(tl.float32)[None, :]
        h = tl.sum(acc, axis=1)  # [BE]
        h = tl.where(o_j < r_p, h * coef, 0.0)
        tl.store(HP + split * stride_hs + row64 * stride_hm + (e - e0) * BLOCK_E + o_j, h)
    for sl in range(e1 - e0, num_slots):
        tl.store(HP + split * stride_hs + row64 * stride_hm + sl * BLOCK_E + o_j,
                 tl.zeros((BLOCK_E,), dtype=tl.float32))


@triton.jit(do_not_specialize=["num_rows", "blocks_per_split"])
def _lora_rows_base_kernel(
    X, W, YP, num_rows, K_DIM, N_DIM, blocks_per_split,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ys,
    DOT_PREC: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # YP[split, t, n] = Σ_{k in split} X[t, k] W[n, k], computed transposed: d_out is the MMA M
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    pid_s = tl.program_id(2)
    o_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N_DIM
    o_n64 = o_n.to(tl.int64)
    o_m = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    m_m = o_m < num_rows
    o_m64 = o_m.to(tl.int64)
    k_lo = split * blocks_per_split * BLOCK_K
    k_hi = tl.minimum(k_lo + blocks_per_split * BLOCK_K, K_DIM)
    acc = tl.zeros((BLOCK_N, BLOCK_S), dtype=tl.float32)  # [BN, BS]
    for k0 in range(k_lo, k_hi, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < K_DIM
        b_w = tl.load(W + o_n64[:, None] * stride_wn + o_k[None, :] * stride_wk,
                      mask=m_n[:, None] & m_k[None, :], other=0.0)  # [BN, BK]
        b_x = tl.load(X + o_m64[:, None] * stride_xm + o_k[None, :] * stride_xk,
                      mask=m_m[:, None] & m_k[None, :], other=0.0)  # [BS, BK]
        acc += _mma(b_w, tl.trans(b_x), DOT_PREC)
    p_y = YP + split * stride_ys + o_m64[None, :] * N_DIM + o_n64[:, None]
    tl.store(p_y, acc, mask=m_n[:, None] & m_m[None, :])


@triton.jit(do_not_specialize=["num_rows", "num_splits", "num_hsplits"])
def _lora_rows_reduce_kernel(
    YP, HP, EX, BIAS, Y, ROW_SEQ, ADAPTER_PTR, ADAPTER_IDX, RANKS,
    num_rows, num_splits, num_hsplits, N_DIM, R_MAX,
    stride_ys, stride_hs, stride_hm, stride_ep, stride_en, stride_ej, stride_om, stride_on,
    HAS_BASE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, ACCUMULATE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
):
    # Y[t, n] = Σ_split YP[split, t, n] + bias[n] + Σ_e Σ_j EX_p[n, j] · round(Σ_split HP[split, t, slot_e, j])
    row = tl.program_id(0)
    pid_n = tl.program_id(1)
    row64 = row.to(tl.int64)
    o_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N_DIM
    o_n64 = o_n.to(tl.int64)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)  # [BN]
    if HAS_BASE:
        for sp in range(0, num_splits):
            acc += tl.load(YP + sp * stride_ys + row64 * N_DIM + o_n64, mask=m_n, other=0.0)
    if HAS_LORA:
        seq = tl.load(ROW_SEQ + row)
        e0 = tl.load(ADAPTER_PTR + seq)
        e1 = tl.load(ADAPTER_PTR + seq + 1)
        o_j = tl.arange(0, BLOCK_E)
        m_j = o_j < R_MAX
        for e in range(e0, e1):
            p = tl.load(ADAPTER_IDX + e).to(tl.int64)
            r_p = tl.load(RANKS + p)
            p_h = HP + row64 * stride_hm + (e - e0) * BLOCK_E + o_j
            h = tl.zeros((BLOCK_E,), dtype=tl.float32)  # [BE]
            for sp in range(0, num_hsplits):
                h += tl.load(p_h + sp * stride_hs)
            # same rounding point as the tile path: h̃ in the input dtype
            h = _cast(h, Y.dtype.element_ty).to(tl.float32)
            b_e = tl.load(EX + p * stride_ep + o_n64[:, None] * stride_en + o_j[None, :] * stride_ej,
                          mask=m_n[:, None] & m_j[None, :], other=0.0)  # [BN, BE]
            b_e = tl.where((o_j < r_p)[None, :], b_e.to(tl.float32), 0.0)
            acc += tl.sum(b_e * h[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(BIAS + o_n, mask=m_n, other=0.0).to(tl.float32)
    p_y = Y + row64 * stride_om + o_n64 * stride_on
    if ACCUMULATE:
        acc += tl.load(p_y, mask=m_n, other=0.0).to(tl.float32)
    tl.store(p_y, _cast(acc, Y.dtype.element_ty), mask=m_n)


@triton.autotune(configs=_grad_configs(), key=["C_DIM", "R_MAX"])
@triton.jit
def _lora_grad_part_kernel(
    R, L, PART, ITEM_SLOT, ITEM_ROW0, ITEM_ROW1,
    C_DIM, R_MAX, stride_rm, stride_rc, stride_lm,
    DOT_PREC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):
    # PART[i, c, j] = Σ_{t in item i's rows} R[t, c] · L[t, slot_i·BE + j]   (computed as [BC, BE]:
    # the column block is the MMA M). dA: R = x, L = g̃;  dB: R = dy, L = h̃.
    item = tl.program_id(0)
    pid_c = tl.program_id(1)
    slot = tl.load(ITEM_SLOT + item)
    t0 = tl.load(ITEM_ROW0 + item)
    t1 = tl.load(ITEM_ROW1 + item)
    o_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    m_c = o_c < C_DIM
    o_j = tl.arange(0, BLOCK_E)
    acc = tl.zeros((BLOCK_C, BLOCK_E), dtype=tl.float32)  # [BC, BE]
    for t in range(t0, t1, BLOCK_T):
        o_t = t + tl.arange(0, BLOCK_T)
        m_t = o_t < t1
        o_t64 = o_t.to(tl.int64)
        b_r = tl.load(R + o_t64[None, :] * stride_rm + o_c[:, None] * stride_rc,
                      mask=m_c[:, None] & m_t[None, :], other=0.0)  # [BC, BT]
        b_l = tl.load(L + o_t64[:, None] * stride_lm + slot * BLOCK_E + o_j[None, :],
                      mask=m_t[:, None], other=0.0)  # [BT, BE] fp32
        acc += _mma(b_r, _cast(b_l, R.dtype.element_ty), DOT_PREC)
    tl.store(PART + item.to(tl.int64) * (C_DIM * BLOCK_E) + o_c[:, None] * BLOCK_E + o_j[None, :], acc,
             mask=m_c[:, None])


@triton.jit
def _lora_grad_reduce_kernel(
    PART, OUT, ITEM_PTR, RANKS, C_DIM, R_MAX, stride_op, stride_oj, stride_oc,
    BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr,
):
    # OUT[p, j, c] = Σ_{items i of pool entry p, ascending} PART[i, c, j]; rows j >= r_p are zero
    p = tl.program_id(0)
    pid_c = tl.program_id(1)
    i0 = tl.load(ITEM_PTR + p)
    i1 = tl.load(ITEM_PTR + p + 1)
    r_p = tl.load(RANKS + p)
    o_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    m_c = o_c < C_DIM
    o_j = tl.arange(0, BLOCK_E)
    acc = tl.zeros((BLOCK_C, BLOCK_E), dtype=tl.float32)  # [BC, BE]
    p_part = PART + i0.to(tl.int64) * (C_DIM * BLOCK_E) + o_c[:, None] * BLOCK_E + o_j[None, :]  # [BC, BE]
    for _ in range(i0, i1):
        acc += tl.load(p_part, mask=m_c[:, None], other=0.0)
        p_part += C_DIM * BLOCK_E
    acc = tl.where((o_j < r_p)[None, :], acc, 0.0)
    p_o = OUT + p.to(tl.int64) * stride_op + o_j[None, :] * stride_oj + o_c[:, None] * stride_oc
    tl.store(p_o, _cast(acc, OUT.dtype.element_ty), mask=m_c[:, None] & (o_j < R_MAX)[None, :])


# --------------------------------------------------------------------------- launchers


def _dot_prec(dtype: torch.dtype) -> str:
    """fp32: IEEE products unless the caller allows TF32; 16-bit types: tensor cores."""
    if _INTERPRET:
        return "ieee"
    if dtype == torch.float32:
        tf32 = torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"
        return "tf32" if tf32 else "ieee"
    return "tf32"


def _block_m(max_rows: int, block_e: int = 16) -> int:
    """Row-tile height of the tile path: the MMA N of the transposed tiles (16..128).
    Fixed per batch because the tile schedule (``LoraBatch.tiles``) depends on it. Rank
    slots of 64 and more cap it at 64: the expand's operands of a 128-row tile would fill
    sm_80's register file (255 registers per thread, no margin left)."""
    if _INTERPRET:
        return 16
    cap = 128 if block_e <= 32 else 64
    bm = 16
    while bm < max_rows and bm < cap:
        bm *= 2
    return bm


_SM_COUNT: dict = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _SM_COUNT:
        _SM_COUNT[key] = torch.cuda.get_device_properties(key).multi_processor_count
    return _SM_COUNT[key]


class _Lora:
    """What a launch needs to know about the adapters: shrink/expand pools with strides, the
    entry metadata and the scale (None: no LoRA work at all)."""

    def __init__(self, shrink, s_strides, expand, e_strides, meta, scale_vec, scale_f, r_max, block_e):
        self.shrink, self.s_strides, self.expand, self.e_strides = shrink, s_strides, expand, e_strides
        self.m, self.scale_vec, self.scale_f, self.r_max, self.block_e = meta, scale_vec, scale_f, r_max, block_e


def _shrink_config(block_m: int, block_e: int) -> dict:
    """Launch config of the tile shrink, sized to its [BM, BE] accumulator: one warp per
    16x16 of it below the wgmma size (so no warp repeats another's MMA), one warpgroup per
    64 rows above it. The shrink is a small part of the work; it is not autotuned."""
    if _INTERPRET:
        return {"BLOCK_K": 32, "num_warps": 4, "num_stages": 1}
    if block_m >= 64:
        warps = block_m // 16
    else:
        warps = max(1, min(4, (block_m // 16) * (block_e // 16)))
    return {"BLOCK_K": 64, "num_warps": min(8, warps), "num_stages": 3}


def _shrink_tiles(x, lo: _Lora, h, block_m):
    """h[N, E·BE] = per entry slot c · x S̃ᵀ (tile path)."""
    m = lo.m
    num_tiles = m["tiles"].shape[0]
    if num_tiles == 0:
        return
    sv = lo.scale_vec
    _lora_shrink_kernel[(num_tiles,)](
        x, lo.shrink, h, sv if sv is not None else x, m["tiles"], m["seq_starts"], m["adapter_ptr"],
        m["adapter_idx"], m["adapter_weight"], m["ranks"],
        num_tiles, h.shape[1] // lo.block_e, x.shape[1], lo.r_max,
        x.stride(0), x.stride(1), *lo.s_strides, h.stride(0),
        lo.scale_f,
        SCALE_VEC=sv is not None, DOT_PREC=_dot_prec(x.dtype), BLOCK_M=block_m, BLOCK_E=lo.block_e,
        **_shrink_config(block_m, lo.block_e),
    )


def _linear_tiles(x, w, w_t: bool, bias, lo: Optional[_Lora], h, meta, block_m, y, accumulate: bool):
    """y (+)= x op(w)ᵀ + bias + Σ_e h[:, slot_e] Ẽ_eᵀ over the segment tile schedule."""
    n_dim = y.shape[1]
    num_tiles = meta["tiles"].shape[0]
    if num_tiles == 0 or n_dim == 0:
        return
    if w is not None:
        swn, swk = (w.stride(1), w.stride(0)) if w_t else (w.stride(0), w.stride(1))
    else:
        swn = swk = 0
    dummy = x
    has_lora = lo is not None
    grid = lambda mt: (num_tiles * triton.cdiv(n_dim, mt["BLOCK_N"]),)  # noqa: E731
    _lora_linear_kernel[grid](
        x, w if w is not None else dummy, bias if bias is not None else dummy, y,
        h if has_lora else dummy, lo.expand if has_lora else dummy,
        meta["tiles"], meta["seq_starts"], meta["adapter_ptr"], meta["adapter_idx"], meta["ranks"],
        num_tiles, x.shape[1], n_dim, lo.r_max if has_lora else 16,
        x.stride(0), x.stride(1), swn, swk, y.stride(0), y.stride(1), h.stride(0) if has_lora else 0,
        *(lo.e_strides if has_lora else (0, 0, 0)),
        HAS_BASE=w is not None, HAS_BIAS=bias is not None, HAS_LORA=has_lora, ACCUMULATE=accumulate,
        DOT_PREC=_dot_prec(x.dtype), BLOCK_M=block_m, BLOCK_E=lo.block_e if has_lora else 16, GROUP_M=8,
    )


def _splits(k_dim: int, block_k: int, programs: int, device, cap: Optional[int] = None) -> tuple[int, int]:
    """(number of K splits, K blocks per split) so that about 2 programs run per SM."""
    k_blocks = triton.cdiv(k_dim, block_k)
    want = max(1, triton.cdiv(2 * _num_sms(device), max(1, programs)))
    if cap is not None:
        want = min(want, max(1, cap))
    per = triton.cdiv(k_blocks, min(k_blocks, want))
    return triton.cdiv(k_blocks, per), per


def _shrink_rows(x, lo: _Lora, split: bool):
    """hp[splits, N, E·BE] fp32 partials of c · x S̃ᵀ, one GEMV per row (row path)."""
    n_rows, k_dim = x.shape
    be = lo.block_e
    bk = 32 if _INTERPRET else max(32, 4096 // be)
    splits, per = _splits(k_dim, bk, n_rows, x.device) if split else (1, triton.cdiv(k_dim, bk))
    hp = empty((splits, n_rows, lo.m["h_width"]), dtype=torch.float32, device=x.device)
    if n_rows == 0:
        return hp
    sv = lo.scale_vec
    _lora_rows_shrink_kernel[(n_rows, splits)](
        x, lo.shrink, hp, sv if sv is not None else x, lo.m["row_seq"], lo.m["adapter_ptr"],
        lo.m["adapter_idx"], lo.m["adapter_weight"], lo.m["ranks"],
        n_rows, hp.shape[2] // be, k_dim, lo.r_max, per,
        x.stride(0), x.stride(1), *lo.s_strides, hp.stride(0), hp.stride(1),
        lo.scale_f,
        SCALE_VEC=sv is not None, BLOCK_K=bk, BLOCK_E=be, num_warps=4,
    )
    return hp


def _split_cap(k_dim: int, elt: int, n_rows: int) -> int:
    return (k_dim * elt) // (4 * max(1, n_rows))


def _base_rows(x, w, w_t: bool, n_dim: int):
    """yp[splits, N, n_dim] fp32 partials of x op(w)ᵀ, split over d_out blocks and K."""
    n_rows, k_dim = x.shape
    if _INTERPRET:
        bs, bn, bk, warps, stages = 16, 32, 32, 4, 1
    else:
        bs = 16
        while bs < n_rows and bs < 64:
            bs *= 2
        bn, bk, warps, stages = 64, 128, 4, 3
    n_blocks = triton.cdiv(n_dim, bn)
    s_blocks = triton.cdiv(n_rows, bs)
    # the fp32 partials (4·splits·N·d_out bytes, written and read back through the L2) stay
    # under W's bytes: at 64 rows this still gives ~0.8 programs per SM on 256M's down_proj
    cap = _split_cap(k_dim, w.element_size(), n_rows)
    splits, per = _splits(k_dim, bk, n_blocks * s_blocks, x.device, cap)
    yp = empty((splits, n_rows, n_dim), dtype=torch.float32, device=x.device)
    swn, swk = (w.stride(1), w.stride(0)) if w_t else (w.stride(0), w.stride(1))
    _lora_rows_base_kernel[(n_blocks, splits, s_blocks)](
        x, w, yp, n_rows, k_dim, n_dim, per,
        x.stride(0), x.stride(1), swn, swk, yp.stride(0),
        DOT_PREC=_dot_prec(x.dtype), BLOCK_S=bs, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages,
    )
    return yp


def _rows_forward(x, w, w_t: bool, bias, lo: Optional[_Lora], meta, y, accumulate: bool, hp=None):
    """Row path: y (+)= x op(w)ᵀ + bias + per-row expand of ``hp`` (computed here when None)."""
    n_rows = x.shape[0]
    n_dim = y.shape[1]
    if n_rows == 0 or n_dim == 0:
        return
    if lo is not None and hp is None:
        hp = _shrink_rows(x, lo, split=True)
    yp = _base_rows(x, w, w_t, n_dim) if w is not None else None
    be = lo.block_e if lo is not None else 16
    bn = 32 if _INTERPRET else max(32, min(256, 8192 // be))
    dummy = x
    ex_strides = lo.e_strides if lo is not None else (0, 0, 0)
    _lora_rows_reduce_kernel[(n_rows, triton.cdiv(n_dim, bn))](
        yp if yp is not None else dummy, hp if hp is not None else dummy, lo.expand if lo is not None else dummy,
        bias if bias is not None else dummy, y, meta["row_seq"], meta["adapter_ptr"], meta["adapter_idx"],
        meta["ranks"],
        n_rows, yp.shape[0] if yp is not None else 0, hp.shape[0] if hp is not None else 0, n_dim,
        lo.r_max if lo is not None else 16,
        yp.stride(0) if yp is not None else 0, hp.stride(0) if hp is not None else 0,
        hp.stride(1) if hp is not None else 0, *ex_strides, y.stride(0), y.stride(1),
        HAS_BASE=yp is not None, HAS_BIAS=bias is not None, HAS_LORA=lo is not None, ACCUMULATE=accumulate,
        BLOCK_N=bn, BLOCK_E=be, num_warps=4,
    )


def _grad_ab(rmat, lmat, out, out_strides, meta, r_max, block_e):
    """out[p] = Σ over p's work items of rmatᵀ · lmat[:, slot] (fixed order), zero rows past r_p."""
    P = out.shape[0]
    c_dim = rmat.shape[1]
    if P == 0 or c_dim == 0 or r_max == 0:
        return
    n_items = meta["num_items"]
    part = empty((max(1, n_items), c_dim, block_e), dtype=torch.float32, device=rmat.device)
    if n_items > 0:
        grid = lambda mt: (n_items, triton.cdiv(c_dim, mt["BLOCK_C"]))  # noqa: E731
        _lora_grad_part_kernel[grid](
            rmat, lmat, part, meta["item_slot"], meta["item_row0"], meta["item_row1"],
            c_dim, r_max, rmat.stride(0), rmat.stride(1), lmat.stride(0),
            DOT_PREC=_dot_prec(rmat.dtype), BLOCK_E=block_e,
        )
    bc = 64 if _INTERPRET else max(16, 8192 // block_e)
    _lora_grad_reduce_kernel[(P, triton.cdiv(c_dim, bc))](
        part, out, meta["item_ptr"], meta["ranks"], c_dim, r_max, *out_strides,
        BLOCK_C=bc, BLOCK_E=block_e, num_warps=4,
    )


# --------------------------------------------------------------------------- torch ops

# Metadata tensors travel through the ops as one list, in this order (int32 but
# adapter_weight, float32); the forward uses the first seven, the backward all of them.
_META = ("tiles", "seq_starts", "adapter_ptr", "adapter_idx", "adapter_weight", "ranks", "row_seq",
         "item_entry", "item_slot", "item_row0", "item_row1", "item_ptr")


def _meta_dict(meta, h_width: int, block_e: int):
    m = dict(zip(_META, meta))
    m["h_width"] = h_width
    m["block_e"] = block_e
    m["num_items"] = m["item_entry"].shape[0]
    return m


def _lora_of(lora_s, s_strides, lora_e, e_strides, m, scale_vec, scale_f, r_max) -> Optional[_Lora]:
    if r_max == 0 or m["adapter_idx"].shape[0] == 0:
        return None
    return _Lora(lora_s, s_strides, lora_e, e_strides, m, scale_vec, scale_f, r_max, m["block_e"])


@torch.library.custom_op("f2l::lora_fwd", mutates_args=())
def _lora_fwd_op(
    x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], lora_a: torch.Tensor,
    lora_b: torch.Tensor, meta: list[torch.Tensor], scale_vec: Optional[torch.Tensor], scale: float,
    block_m: int, h_width: int, row_mode: bool, store_h: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    P, r_max, _ = lora_a.shape
    m = _meta_dict(meta, h_width, _block_e(r_max))
    n_rows = x.shape[0]
    d_out = lora_b.shape[1]
    y = empty((n_rows, d_out), dtype=x.dtype, device=x.device)
    lo = _lora_of(lora_a, lora_a.stride(), lora_b, lora_b.stride(), m, scale_vec, scale, r_max)
    h = None
    if lo is not None:
        if row_mode:
            hp = _shrink_rows(x, lo, split=not store_h)
            h = hp[0] if store_h else None
            _rows_forward(x, weight, False, bias, lo, m, y, False, hp=hp)
        else:
            h = empty((n_rows, h_width), dtype=torch.float32, device=x.device)
            _shrink_tiles(x, lo, h, block_m)
            _linear_tiles(x, weight, False, bias, lo, h, m, block_m, y, False)
    elif row_mode:
        _rows_forward(x, weight, False, bias, None, m, y, False)
    else:
        _linear_tiles(x, weight, False, bias, None, None, m, block_m, y, False)
    if not store_h or h is None:
        h = empty((n_rows if store_h else 0, h_width), dtype=torch.float32, device=x.device)
        if store_h:
            h.zero_()
    return y, h


@_lora_fwd_op.register_fake
def _(x, weight, bias, lora_a, lora_b, meta, scale_vec, scale, block_m, h_width, row_mode, store_h):
    y = x.new_empty((x.shape[0], lora_b.shape[1]))
    h = x.new_empty((x.shape[0] if store_h else 0, h_width), dtype=torch.float32)
    return y, h


@torch.library.custom_op("f2l::lora_bwd", mutates_args=())
def _lora_bwd_op(
    dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], lora_a: torch.Tensor,
    lora_b: torch.Tensor, h: torch.Tensor, meta: list[torch.Tensor], scale_vec: Optional[torch.Tensor],
    scale: float, block_m: int, h_width: int, row_mode: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n_rows, d_in = x.shape
    P, r_max, _ = lora_a.shape
    d_out = lora_b.shape[1]
    m = _meta_dict(meta, h_width, _block_e(r_max))
    dx = empty((n_rows, d_in), dtype=x.dtype, device=x.device)
    # the shrink of the backward reads B as [r, d_out] and the expand A as [d_in, r]
    lo = _lora_of(lora_b, (lora_b.stride(0), lora_b.stride(2), lora_b.stride(1)),
                  lora_a, (lora_a.stride(0), lora_a.stride(2), lora_a.stride(1)), m, scale_vec, scale, r_max)
    if lo is None:
        if row_mode:
            _rows_forward(dy, weight, True, None, None, m, dx, False)
        else:
            _linear_tiles(dy, weight, True, None, None, None, m, block_m, dx, False)
        return dx, torch.zeros_like(lora_a), torch.zeros_like(lora_b)
    g = empty((n_rows, h_width), dtype=torch.float32, device=x.device)
    if row_mode:
        # g̃ by the tile shrink (one masked tile per short sequence): B read as [r, d_out] is
        # contiguous along the rank, which a per-row GEMV could not load as vectors
        _shrink_tiles(dy, lo, g, block_m)
        _rows_forward(dy, weight, True, None, lo, m, dx, False, hp=g[None])
    else:
        _shrink_tiles(dy, lo, g, block_m)
        _linear_tiles(dy, weight, True, None, lo, g, m, block_m, dx, False)
    da = empty((P, r_max, d_in), dtype=lora_a.dtype, device=x.device)
    db = empty((P, d_out, r_max), dtype=lora_b.dtype, device=x.device)
    _grad_ab(x, g, da, da.stride(), m, r_max, lo.block_e)
    _grad_ab(dy, h, db, (db.stride(0), db.stride(2), db.stride(1)), m, r_max, lo.block_e)
    return dx, da, db


@_lora_bwd_op.register_fake
def _(dy, x, weight, lora_a, lora_b, h, meta, scale_vec, scale, block_m, h_width, row_mode):
    return torch.empty_like(x), torch.empty_like(lora_a), torch.empty_like(lora_b)


def _fwd_setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, meta, scale_vec, scale, block_m, h_width, row_mode, store_h = inputs
    ctx.scale = scale
    ctx.block_m = block_m
    ctx.h_width = h_width
    ctx.row_mode = row_mode
    ctx.n_meta = len(meta)
    ctx.has_weight = weight is not None
    ctx.has_scale_vec = scale_vec is not None
    ctx.save_for_backward(x, weight, lora_a, lora_b, output[1], scale_vec, *meta)


def _fwd_backward(ctx, dy, dh):
    """Backward of ``y = x Wᵀ + bias + Σ_e c_e (x A_eᵀ) B_eᵀ`` over the entries ``e`` of each
    row's sequence (``A_e = A_p[:r_p]``, ``B_e = B_p[:, :r_p]``, ``c_e = scale_p · weight_e``).
    The forward saved ``h̃_e = c_e x A_eᵀ`` (fp32). With ``g̃_e = c_e dy B_e``::

        dx     = dy W + Σ_e g̃_e A_e
        dA_p   = Σ_{e : p_e = p} Σ_{rows t of e's sequence} g̃_e[t]ᵀ x[t]
        dB_p   = Σ_{e : p_e = p} Σ_{rows t of e's sequence} dy[t]ᵀ h̃_e[t]

    ``g̃`` comes from the forward's shrink kernels (B read transposed), ``dx`` from the
    forward's linear kernels (W transposed, A as the expand). ``dA``/``dB`` are reduced per
    pool entry: fp32 partials per (entry, chunk of rows), then a fixed ascending-order sum
    -- deterministic, no atomics. Rows ``j >= r_p`` of ``dA_p``/``dB_p`` are zero. ``scale``
    and the composition weights are constants; the base weight is frozen.
    """
    x, weight, lora_a, lora_b, h, scale_vec, *meta = ctx.saved_tensors
    if not ctx.has_weight:
        weight = None
    if not ctx.has_scale_vec:
        scale_vec = None
    if h.shape[0] != x.shape[0]:
        raise RuntimeError("f2l::lora_fwd: the backward needs the shrink activations; the forward must run "
                           "with store_h=True (lora_linear/lora_delta do this when a gradient is required)")
    dx, da, db = torch.ops.f2l.lora_bwd(dy.contiguous(), x, weight, lora_a, lora_b, h, list(meta), scale_vec,
                                        ctx.scale, ctx.block_m, ctx.h_width, ctx.row_mode)
    return dx, None, None, da, db, [None] * ctx.n_meta, None, None, None, None, None, None


torch.library.register_autograd("f2l::lora_fwd", _fwd_backward, setup_context=_fwd_setup_context)


# --------------------------------------------------------------------------- public launchers


def _block_e(r_max: int) -> int:
    be = 16
    while be < r_max:
        be *= 2
    return be


def _prepare(x, lora_a, batch: LoraBatch, scale):
    """(meta list, scale_vec, scale_f, block_m, h_width, row_mode) of one call."""
    P, r_max, _ = lora_a.shape
    plan = batch.entry_plan(P, r_max, GRAD_CHUNK)
    row_mode = batch.max_rows_per_seq < ROW_MODE_MAX_ROWS
    block_m = _block_m(batch.max_rows_per_seq, plan["block_e"])
    tiles = batch.tiles(block_m)
    meta = [tiles, batch.seq_starts, batch.adapter_ptr, batch.adapter_idx, batch.adapter_weight, plan["ranks"],
            plan["row_seq"], plan["item_entry"], plan["item_slot"], plan["item_row0"], plan["item_row1"],
            plan["item_ptr"]]
    if isinstance(scale, torch.Tensor):
        sv = scale.detach().to(torch.float32)
        scale_vec, scale_f = (sv.expand(P).contiguous() if sv.dim() == 0 else sv.contiguous()), 1.0
    else:
        scale_vec, scale_f = None, float(scale)
    return meta, scale_vec, scale_f, block_m, plan["h_width"], row_mode


def _run(x, weight, bias, lora_a, lora_b, batch, scale):
    meta, scale_vec, scale_f, block_m, h_width, row_mode = _prepare(x, lora_a, batch, scale)
    grad = torch.is_grad_enabled() and (x.requires_grad or lora_a.requires_grad or lora_b.requires_grad)
    y, _ = torch.ops.f2l.lora_fwd(x, weight, bias, lora_a, lora_b, meta, scale_vec, scale_f, block_m, h_width,
                                  row_mode, grad)
    return y


def lora_linear_triton(x, weight, bias, lora_a, lora_b, batch: LoraBatch, scale) -> torch.Tensor:
    """``x [N, d_in]`` rows, inputs validated by :func:`f2l_kernels.lora_linear`."""
    return _run(x, weight, bias, lora_a, lora_b, batch, scale)


def lora_delta_triton(x, lora_a, lora_b, batch: LoraBatch, scale, out: torch.Tensor | None = None) -> torch.Tensor:
    """The delta alone; with ``out`` (no autograd) it is accumulated in place by the kernel."""
    if out is None:
        return _run(x, None, None, lora_a, lora_b, batch, scale)
    meta, scale_vec, scale_f, block_m, h_width, row_mode = _prepare(x, lora_a, batch, scale)
    P, r_max, _ = lora_a.shape
    m = _meta_dict(meta, h_width, _block_e(r_max))
    lo = _lora_of(lora_a, lora_a.stride(), lora_b, lora_b.stride(), m, scale_vec, scale_f, r_max)
    if lo is None or x.shape[0] == 0:
        return out
    if row_mode:
        _rows_forward(x, None, False, None, lo, m, out, True)
    else:
        h = empty((x.shape[0], h_width), dtype=torch.float32, device=x.device)
        _shrink_tiles(x, lo, h, block_m)
        _linear_tiles(x, None, False, None, lo, h, m, block_m, out, True)
    return out
