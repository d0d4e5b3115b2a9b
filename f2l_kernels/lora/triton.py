"""Triton kernels for per-example LoRA: fused forward, decode forward, deterministic backward.

Layout of the work (see :meth:`LoraBatch.rank_plan`): every sequence's adapter list is
a list of *rank rows* ``(pool entry, row of that entry, weight)``. Kernels gather A and B
rows through that map, so rank-space composition and ragged ranks are handled in
registers -- no concatenated copies, no per-token copies, no zero padding in memory.

Kernels
- ``_lora_fused_kernel``: one program per (row tile, output column block). Row tiles
  come from the segment-aware schedule (``LoraBatch.tiles``): a tile never straddles two
  sequences, so its rank rows are uniform. The base GEMM's K loop also carries the LoRA
  shrink (``h += x_tile Ãᵀ`` next to ``acc += x_tile Wᵀ``); the expand ``(h·coef) B̃ᵀ``
  is added before the single store of ``y``. The same kernel computes ``dx`` in the
  backward with the roles of (W, A, B) transposed/swapped via strides.
- decode (one row per sequence, every row a different adapter), two launches:
  ``_lora_decode_shrink_kernel`` gathers each row's own A rows and reduces ``x·Ã`` over a
  split of d_in (fp32 partials; the split gives the parallelism a batch of 1-64 rows
  lacks), then ``_lora_decode_kernel`` runs the base GEMM for 16 rows of different
  sequences per W tile (the grid walks row blocks fastest, so programs sharing a W
  column block run together and W comes from HBM about once), sums the partials in a
  fixed order, gathers each row's own B rows and stores ``y`` once. A and B bytes are
  exactly those that must move; the extra traffic is the fp32 partials
  (``splits·S·R·4`` bytes, L2-resident). Bytes floor per call (bf16):
  ``2·(d_out·d_in + S·(d_in + d_out) + Σ_distinct R_p·(d_in + d_out))``.
- ``_lora_grad_ab_kernel``: one program per (pool entry, column block); reduces over the
  entry's uses (pool -> list entries map, ascending) and their rows in a fixed order:
  no atomics, the same bits every run.
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
INTERPRET: tl.constexpr = tl.constexpr(_INTERPRET)


def _fused_configs():
    if _INTERPRET:
        return [triton.Config({"BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bn, bk, w, s in [
            (128, 64, 4, 3), (128, 64, 8, 3), (256, 64, 8, 3), (128, 128, 8, 3),
            (64, 64, 4, 4), (128, 32, 4, 4), (256, 32, 8, 4), (64, 32, 4, 2),
        ]
    ]


def _decode_configs():
    if _INTERPRET:
        return [triton.Config({"BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bn, bk, w, s in [(32, 64, 4, 3), (64, 64, 4, 3), (64, 64, 8, 3), (32, 128, 4, 3), (64, 32, 4, 4)]
    ]


def _grad_configs():
    if _INTERPRET:
        return [triton.Config({"BLOCK_C": 32, "BLOCK_T": 16}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_C": bc, "BLOCK_T": bt}, num_warps=w, num_stages=s)
        for bc, bt, w, s in [(64, 64, 4, 3), (128, 64, 4, 3), (128, 32, 4, 4), (256, 32, 8, 3), (64, 128, 4, 3)]
    ]


# --------------------------------------------------------------------------- kernels


@triton.autotune(configs=_fused_configs(), key=["K_DIM", "N_DIM", "BLOCK_R", "BLOCK_M"], restore_value=["Y"])
@triton.jit(do_not_specialize=["num_tiles"])
def _lora_fused_kernel(
    X, W, BIAS, Y, H, SH, EX, SCALE,
    TILES, SEQ_STARTS, RR_POOL, RR_J, RR_W,
    num_tiles, K_DIM, N_DIM,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
    stride_sp, stride_sj, stride_sk, stride_ep, stride_en, stride_ej,
    scale_f,
    HAS_BASE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, SCALE_VEC: tl.constexpr,
    ACCUMULATE: tl.constexpr, STORE_H: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # grouped order: GROUP_M row tiles sweep all column blocks together, so x tiles and
    # W blocks are both reused from L2 instead of streaming x once per column block
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
    o_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N_DIM
    o_r = tl.arange(0, BLOCK_R)
    # 64-bit row offsets: N·d can pass 2³¹ at long-context prefill
    o_m64 = o_m.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # [BM, BN]
    if HAS_LORA:
        rr_p = tl.load(RR_POOL + seq * BLOCK_R + o_r).to(tl.int64)  # [BR]
        rr_j = tl.load(RR_J + seq * BLOCK_R + o_r)  # [BR]
        m_r = rr_j >= 0
        rr_j = tl.maximum(rr_j, 0).to(tl.int64)
        p_sh = SH + rr_p * stride_sp + rr_j * stride_sj  # [BR]
        h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)  # [BM, BR]
    for k0 in range(0, K_DIM, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < K_DIM
        b_x = tl.load(X + o_m64[:, None] * stride_xm + o_k[None, :] * stride_xk,
                      mask=m_m[:, None] & m_k[None, :], other=0.0)  # [BM, BK]
        if HAS_BASE:
            b_w = tl.load(W + o_n[:, None].to(tl.int64) * stride_wn + o_k[None, :] * stride_wk,
                          mask=m_n[:, None] & m_k[None, :], other=0.0)  # [BN, BK]
            acc += _mma(b_x, tl.trans(b_w), DOT_PREC)
        if HAS_LORA:
            # the shrink rides in the same K loop: x tile is already in registers
            b_s = tl.load(p_sh[:, None] + o_k[None, :] * stride_sk,
                          mask=m_r[:, None] & m_k[None, :], other=0.0)  # [BR, BK]
            h += _mma(b_x, tl.trans(b_s), DOT_PREC)
    if HAS_LORA:
        if STORE_H:
            if pid_n == 0:
                tl.store(H + o_m64[:, None] * BLOCK_R + o_r[None, :], h, mask=m_m[:, None])
        coef = tl.load(RR_W + seq * BLOCK_R + o_r)  # [BR]
        if SCALE_VEC:
            coef = coef * tl.load(SCALE + rr_p, mask=m_r, other=0.0)
        else:
            coef = coef * scale_f
        # rounded to the input dtype for the tensor-core expand, as the base GEMM's inputs are
        b_h = _cast(h * coef[None, :], X.dtype.element_ty)  # [BM, BR]
        b_e = tl.load(EX + rr_p[None, :] * stride_ep + o_n[:, None].to(tl.int64) * stride_en
                      + rr_j[None, :] * stride_ej,
                      mask=m_n[:, None] & m_r[None, :], other=0.0)  # [BN, BR]
        acc += _mma(b_h, tl.trans(b_e), DOT_PREC)
    if HAS_BIAS:
        acc += tl.load(BIAS + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
    p_y = Y + o_m64[:, None] * stride_ym + o_n[None, :] * stride_yn
    m_y = m_m[:, None] & m_n[None, :]
    if ACCUMULATE:
        acc += tl.load(p_y, mask=m_y, other=0.0).to(tl.float32)
    tl.store(p_y, _cast(acc, Y.dtype.element_ty), mask=m_y)


@triton.jit(do_not_specialize=["num_rows", "k_chunk"])
def _lora_decode_shrink_kernel(
    X, SH, HP, RR_POOL, RR_J,
    num_rows, K_DIM, k_chunk,
    stride_xm, stride_xk, stride_sp, stride_sj, stride_sk,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # HP[split, m, q] = Σ_{k in split's chunk} x[m, k] · Ã_{m,q}[k]. Every row has its own
    # A rows, so this is a gather-reduce (no reuse across rows for a GEMM to exploit);
    # splitting K gives the parallelism, and the partials are summed in a fixed order.
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    o_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < num_rows
    o_r = tl.arange(0, BLOCK_R)
    o_m64 = o_m.to(tl.int64)
    p_rr = o_m64[:, None] * BLOCK_R + o_r[None, :]  # [BM, BR]
    rr_p = tl.load(RR_POOL + p_rr, mask=m_m[:, None], other=0).to(tl.int64)  # [BM, BR]
    rr_j = tl.load(RR_J + p_rr, mask=m_m[:, None], other=-1)  # [BM, BR]
    m_r = rr_j >= 0
    rr_j = tl.maximum(rr_j, 0).to(tl.int64)
    p_sh = SH + rr_p * stride_sp + rr_j * stride_sj  # [BM, BR]
    h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)  # [BM, BR]
    k_lo = pid_s * k_chunk
    k_hi = tl.minimum(k_lo + k_chunk, K_DIM)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < k_hi
        b_x = tl.load(X + o_m64[:, None] * stride_xm + o_k[None, :] * stride_xk,
                      mask=m_m[:, None] & m_k[None, :], other=0.0).to(tl.float32)  # [BM, BK]
        b_s = tl.load(p_sh[:, :, None] + o_k[None, None, :] * stride_sk,
                      mask=m_r[:, :, None] & m_k[None, None, :], other=0.0).to(tl.float32)  # [BM, BR, BK]
        h += tl.sum(b_x[:, None, :] * b_s, axis=2)
    p_h = HP + (pid_s * num_rows + o_m64)[:, None] * BLOCK_R + o_r[None, :]
    tl.store(p_h, h, mask=m_m[:, None])


@triton.autotune(configs=_decode_configs(), key=["K_DIM", "N_DIM", "BLOCK_R"], restore_value=["Y"])
@triton.jit(do_not_specialize=["num_rows", "num_splits"])
def _lora_decode_kernel(
    X, W, BIAS, Y, HP, EX, SCALE,
    RR_POOL, RR_J, RR_W,
    num_rows, num_splits, K_DIM, N_DIM,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
    stride_ep, stride_en, stride_ej,
    scale_f,
    HAS_BASE: tl.constexpr, HAS_BIAS: tl.constexpr, SCALE_VEC: tl.constexpr, ACCUMULATE: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    RANK_CHUNK: tl.constexpr,
):
    # Row m is sequence m. The grid's fastest axis walks row blocks, so the programs
    # that share a W column block run together and W comes from HBM about once.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    o_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < num_rows
    o_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N_DIM
    o_m64 = o_m.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # [BM, BN]
    if HAS_BASE:
        for k0 in range(0, K_DIM, BLOCK_K):
            o_k = k0 + tl.arange(0, BLOCK_K)
            m_k = o_k < K_DIM
            b_x = tl.load(X + o_m64[:, None] * stride_xm + o_k[None, :] * stride_xk,
                          mask=m_m[:, None] & m_k[None, :], other=0.0)  # [BM, BK]
            b_w = tl.load(W + o_n[:, None].to(tl.int64) * stride_wn + o_k[None, :] * stride_wk,
                          mask=m_n[:, None] & m_k[None, :], other=0.0)  # [BN, BK]
            acc += _mma(b_x, tl.trans(b_w), DOT_PREC)
    # rank rows in chunks of RANK_CHUNK so the [BM, BN, RC] B gather's registers do not
    # grow with the (composed) rank; h comes back from the fp32 partials per chunk
    for r0 in range(0, BLOCK_R, RANK_CHUNK):
        o_r = r0 + tl.arange(0, RANK_CHUNK)
        p_rr = o_m64[:, None] * BLOCK_R + o_r[None, :]  # [BM, RC]
        rr_p = tl.load(RR_POOL + p_rr, mask=m_m[:, None], other=0).to(tl.int64)  # [BM, RC]
        rr_j = tl.load(RR_J + p_rr, mask=m_m[:, None], other=-1)  # [BM, RC]
        m_r = rr_j >= 0
        rr_j = tl.maximum(rr_j, 0).to(tl.int64)
        h = tl.zeros((BLOCK_M, RANK_CHUNK), dtype=tl.float32)  # [BM, RC]
        for sp in range(0, num_splits):
            h += tl.load(HP + (sp * num_rows + o_m64)[:, None] * BLOCK_R + o_r[None, :], mask=m_m[:, None],
                         other=0.0)
        coef = tl.load(RR_W + p_rr, mask=m_m[:, None], other=0.0)  # [BM, RC]
        if SCALE_VEC:
            coef = coef * tl.load(SCALE + rr_p, mask=m_r, other=0.0)
        else:
            coef = coef * scale_f
        # same rounding point as the fused kernel: h·coef in the input dtype
        b_h = _cast(h * coef, X.dtype.element_ty).to(tl.float32)  # [BM, RC]
        # every row has its own B: a per-row gather, each B byte read once per call
        b_e = tl.load(EX + rr_p[:, None, :] * stride_ep + o_n[None, :, None].to(tl.int64) * stride_en
                      + rr_j[:, None, :] * stride_ej,
                      mask=m_r[:, None, :] & m_n[None, :, None], other=0.0)  # [BM, BN, RC]
        acc += tl.sum(b_h[:, None, :] * b_e.to(tl.float32), axis=2)
    if HAS_BIAS:
        acc += tl.load(BIAS + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
    p_y = Y + o_m64[:, None] * stride_ym + o_n[None, :] * stride_yn
    m_y = m_m[:, None] & m_n[None, :]
    if ACCUMULATE:
        acc += tl.load(p_y, mask=m_y, other=0.0).to(tl.float32)
    tl.store(p_y, _cast(acc, Y.dtype.element_ty), mask=m_y)


@triton.autotune(configs=_grad_configs(), key=["C_DIM", "BLOCK_J", "LB"])
@triton.jit
def _lora_grad_ab_kernel(
    L, R, OUT, SCALE, SEQ_STARTS, USE_PTR, USE_ENTRY, ENTRY_SEQ, ENTRY_OFF, ENTRY_W, RANKS,
    C_DIM, R_MAX, stride_rm, stride_rc, stride_op, stride_oj, stride_oc, scale_f,
    SCALE_VEC: tl.constexpr, DOT_PREC: tl.constexpr, LB: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr,
):
    # OUT[p, j, c] = Σ_{list entries e using p} coef_e · Σ_{rows t of e's sequence}
    #                L[t, off_e + j] · R[t, c]
    # dA: L = g = dy B̃ (per rank row), R = x.  dB (OUT viewed [P, r, d_out]): L = u = x Ãᵀ, R = dy.
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    o_j = tl.arange(0, BLOCK_J)
    r_p = tl.load(RANKS + pid_p)
    m_j = o_j < r_p
    o_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    m_c = o_c < C_DIM
    if SCALE_VEC:
        s_p = tl.load(SCALE + pid_p)
    else:
        s_p = scale_f
    u0 = tl.load(USE_PTR + pid_p)
    u1 = tl.load(USE_PTR + pid_p + 1)
    acc = tl.zeros((BLOCK_J, BLOCK_C), dtype=tl.float32)  # [BJ, BC]
    for u in range(u0, u1):
        e = tl.load(USE_ENTRY + u)
        seq = tl.load(ENTRY_SEQ + e)
        off = tl.load(ENTRY_OFF + e)
        coef = tl.load(ENTRY_W + e) * s_p
        t0 = tl.load(SEQ_STARTS + seq)
        t1 = tl.load(SEQ_STARTS + seq + 1)
        part = tl.zeros((BLOCK_J, BLOCK_C), dtype=tl.float32)  # [BJ, BC]
        for t in range(t0, t1, BLOCK_T):
            o_t = t + tl.arange(0, BLOCK_T)
            m_t = o_t < t1
            o_t64 = o_t.to(tl.int64)
            b_l = tl.load(L + o_t64[None, :] * LB + (off + o_j)[:, None],
                          mask=m_j[:, None] & m_t[None, :], other=0.0)  # [BJ, BT] fp32
            b_r = tl.load(R + o_t64[:, None] * stride_rm + o_c[None, :] * stride_rc,
                          mask=m_t[:, None] & m_c[None, :], other=0.0)  # [BT, BC]
            part += _mma(_cast(b_l, R.dtype.element_ty), b_r, DOT_PREC)
        acc += coef * part
    # rows j >= r_p are stored as zeros: the gradient of unused rank rows is zero
    p_o = OUT + pid_p.to(tl.int64) * stride_op + o_j[:, None] * stride_oj + o_c[None, :] * stride_oc
    tl.store(p_o, _cast(acc, OUT.dtype.element_ty), mask=(o_j[:, None] < R_MAX) & m_c[None, :])


# --------------------------------------------------------------------------- launchers


def _dot_prec(dtype: torch.dtype) -> str:
    # fp32 callers get fp32 products (not tf32): the reference is fp32-exact
    return "ieee" if dtype == torch.float32 or _INTERPRET else "tf32"


def _block_m(max_rows: int, block_r: int = 16) -> int:
    """Row-tile height: large enough for tensor-core efficiency on long segments, small
    enough that short segments do not leave most of a tile masked. Fixed per batch
    because the tile schedule (``LoraBatch.tiles``) depends on it."""
    if _INTERPRET:
        return 16
    # h [BM, BR] is an fp32 register accumulator next to the [BM, BN] output tile
    cap = 128 if block_r <= 64 else 64 if block_r <= 128 else 32
    bm = 16
    while bm < max_rows and bm < cap:
        bm *= 2
    return bm


def _fused_launch(x, w, w_t: bool, bias, shrink, sh_strides, expand, ex_strides, tiles, seq_starts, plan,
                  scale_vec, scale_f, block_m, y, h, accumulate: bool):
    """y[N, n_dim] (+)= x @ op(w)ᵀ + bias + ((x S̃ᵀ)·coef) Ẽᵀ over the segment tile schedule."""
    n_rows, k_dim = x.shape
    n_dim = y.shape[1]
    has_lora = plan is not None
    block_r = plan["block_r"] if has_lora else 16
    num_tiles = tiles.shape[0]
    if num_tiles == 0 or n_dim == 0:
        return
    if w is not None:
        swn, swk = (w.stride(1), w.stride(0)) if w_t else (w.stride(0), w.stride(1))
    else:
        swn = swk = 0
    dummy = x
    grid = lambda meta: (num_tiles * triton.cdiv(n_dim, meta["BLOCK_N"]),)  # noqa: E731
    _lora_fused_kernel[grid](
        x, w if w is not None else dummy, bias if bias is not None else dummy, y,
        h if h is not None else dummy, shrink, expand, scale_vec if scale_vec is not None else dummy,
        tiles, seq_starts,
        plan["rr_pool"] if has_lora else seq_starts, plan["rr_j"] if has_lora else seq_starts,
        plan["rr_w"] if has_lora else dummy,
        num_tiles, k_dim, n_dim,
        x.stride(0), x.stride(1), swn, swk, y.stride(0), y.stride(1),
        *sh_strides, *ex_strides,
        scale_f,
        HAS_BASE=w is not None, HAS_BIAS=bias is not None, HAS_LORA=has_lora,
        SCALE_VEC=scale_vec is not None, ACCUMULATE=accumulate, STORE_H=h is not None,
        DOT_PREC=_dot_prec(x.dtype), BLOCK_M=block_m, BLOCK_R=block_r, GROUP_M=8,
    )


_SM_COUNT: dict = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _SM_COUNT:
        _SM_COUNT[key] = torch.cuda.get_device_properties(key).multi_processor_count
    return _SM_COUNT[key]


def _decode_launch(x, w, bias, a, b, plan, scale_vec, scale_f, y, accumulate: bool):
    """Decode: split-K shrink into fp32 partials, then base GEMM + per-row expand, one store of y."""
    n_rows, k_dim = x.shape
    n_dim = y.shape[1]
    if n_rows == 0 or n_dim == 0:
        return
    block_r = plan["block_r"]
    # shrink: a [BM, BR, BK] gather-reduce tile of about 8K elements per program
    if _INTERPRET:
        bk_s = 32
    else:
        bk_s = 128 if block_r <= 64 else max(16, 8192 // block_r)
    bm_s = max(1, min(16, 8192 // (block_r * bk_s)))
    row_blocks = triton.cdiv(n_rows, bm_s)
    k_blocks = triton.cdiv(k_dim, bk_s)
    # enough programs to cover the machine about twice over
    splits = max(1, min(k_blocks, triton.cdiv(2 * _num_sms(x.device), row_blocks)))
    k_chunk = triton.cdiv(k_blocks, splits) * bk_s
    splits = triton.cdiv(k_dim, k_chunk)
    hp = empty((splits, n_rows, block_r), dtype=torch.float32, device=x.device)
    _lora_decode_shrink_kernel[(row_blocks, splits)](
        x, a, hp, plan["rr_pool"], plan["rr_j"],
        n_rows, k_dim, k_chunk,
        x.stride(0), x.stride(1), a.stride(0), a.stride(1), a.stride(2),
        BLOCK_M=bm_s, BLOCK_K=bk_s, BLOCK_R=block_r, num_warps=4,
    )
    block_m = 16  # tl.dot's minimum; the B gather is chunked over ranks inside the kernel
    dummy = x
    grid = lambda meta: (triton.cdiv(n_rows, block_m), triton.cdiv(n_dim, meta["BLOCK_N"]))  # noqa: E731
    _lora_decode_kernel[grid](
        x, w if w is not None else dummy, bias if bias is not None else dummy, y, hp, b,
        scale_vec if scale_vec is not None else dummy,
        plan["rr_pool"], plan["rr_j"], plan["rr_w"],
        n_rows, splits, k_dim, n_dim,
        x.stride(0), x.stride(1),
        w.stride(0) if w is not None else 0, w.stride(1) if w is not None else 0,
        y.stride(0), y.stride(1),
        b.stride(0), b.stride(1), b.stride(2),
        scale_f,
        HAS_BASE=w is not None, HAS_BIAS=bias is not None, SCALE_VEC=scale_vec is not None,
        ACCUMULATE=accumulate, DOT_PREC=_dot_prec(x.dtype),
        BLOCK_M=block_m, BLOCK_R=block_r, RANK_CHUNK=16,
    )


def _grad_ab_launch(lmat, rmat, out, out_strides, plan, seq_starts, entry_w, scale_vec, scale_f, r_max):
    P = out.shape[0]
    c_dim = rmat.shape[1]
    if P == 0 or c_dim == 0 or r_max == 0:
        return
    block_j = 16
    while block_j < r_max:
        block_j *= 2
    dummy = rmat
    grid = lambda meta: (P, triton.cdiv(c_dim, meta["BLOCK_C"]))  # noqa: E731
    _lora_grad_ab_kernel[grid](
        lmat, rmat, out, scale_vec if scale_vec is not None else dummy, seq_starts,
        plan["use_ptr"], plan["use_entry"], plan["entry_seq"], plan["entry_off"], entry_w, plan["ranks"],
        c_dim, r_max, rmat.stride(0), rmat.stride(1), *out_strides, scale_f,
        SCALE_VEC=scale_vec is not None, DOT_PREC=_dot_prec(rmat.dtype), LB=lmat.shape[1],
        BLOCK_J=block_j,
    )


# --------------------------------------------------------------------------- torch ops

# Metadata tensors travel through the ops as one list, in this order (all int32 but rr_w
# and entry_w, float32): the forward uses the first five, the backward all of them.
_META = ("tiles", "seq_starts", "rr_pool", "rr_j", "rr_w", "ranks", "entry_off", "entry_seq", "entry_w",
         "use_ptr", "use_entry")


def _meta_dict(meta):
    return dict(zip(_META, meta))


@torch.library.custom_op("f2l::lora_fwd", mutates_args=())
def _lora_fwd_op(
    x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], lora_a: torch.Tensor,
    lora_b: torch.Tensor, meta: list[torch.Tensor], scale_vec: Optional[torch.Tensor], scale: float,
    block_m: int, decode: bool, store_h: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    m = _meta_dict(meta)
    n_rows = x.shape[0]
    d_out = lora_b.shape[1]
    block_r = m["rr_pool"].shape[1]
    y = empty((n_rows, d_out), dtype=x.dtype, device=x.device)
    h = empty((n_rows if store_h else 0, block_r), dtype=torch.float32, device=x.device)
    plan = {"block_r": block_r, **m}
    if decode and not store_h:
        _decode_launch(x, weight, bias, lora_a, lora_b, plan, scale_vec, scale, y, False)
    else:
        _fused_launch(x, weight, False, bias, lora_a, lora_a.stride(), lora_b, lora_b.stride(), m["tiles"],
                      m["seq_starts"], plan, scale_vec, scale, block_m, y, h if store_h else None, False)
    return y, h


@_lora_fwd_op.register_fake
def _(x, weight, bias, lora_a, lora_b, meta, scale_vec, scale, block_m, decode, store_h):
    y = x.new_empty((x.shape[0], lora_b.shape[1]))
    h = x.new_empty((x.shape[0] if store_h else 0, meta[2].shape[1]), dtype=torch.float32)
    return y, h


@torch.library.custom_op("f2l::lora_bwd", mutates_args=())
def _lora_bwd_op(
    dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], lora_a: torch.Tensor,
    lora_b: torch.Tensor, h: torch.Tensor, meta: list[torch.Tensor], scale_vec: Optional[torch.Tensor],
    scale: float, block_m: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    m = _meta_dict(meta)
    n_rows, d_in = x.shape
    P, r_max, _ = lora_a.shape
    d_out = lora_b.shape[1]
    block_r = m["rr_pool"].shape[1]
    plan = {"block_r": block_r, **m}
    dx = empty((n_rows, d_in), dtype=x.dtype, device=x.device)
    g = empty((n_rows, block_r), dtype=torch.float32, device=x.device)
    # dx = dy W + ((dy B̃ᵀ)·coef) Ã: the forward kernel with W transposed and A, B swapped
    _fused_launch(dy, weight, True, None,
                  lora_b, (lora_b.stride(0), lora_b.stride(2), lora_b.stride(1)),
                  lora_a, (lora_a.stride(0), lora_a.stride(2), lora_a.stride(1)),
                  m["tiles"], m["seq_starts"], plan, scale_vec, scale, block_m, dx, g, False)
    da = empty((P, r_max, d_in), dtype=lora_a.dtype, device=x.device)
    db = empty((P, d_out, r_max), dtype=lora_b.dtype, device=x.device)
    _grad_ab_launch(g, x, da, da.stride(), plan, m["seq_starts"], m["entry_w"], scale_vec, scale, r_max)
    _grad_ab_launch(h, dy, db, (db.stride(0), db.stride(2), db.stride(1)), plan, m["seq_starts"], m["entry_w"],
                    scale_vec, scale, r_max)
    return dx, da, db


@_lora_bwd_op.register_fake
def _(dy, x, weight, lora_a, lora_b, h, meta, scale_vec, scale, block_m):
    return torch.empty_like(x), torch.empty_like(lora_a), torch.empty_like(lora_b)


def _fwd_setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, meta, scale_vec, scale, block_m, decode, store_h = inputs
    ctx.scale = scale
    ctx.block_m = block_m
    ctx.n_meta = len(meta)
    ctx.has_weight = weight is not None
    ctx.has_scale_vec = scale_vec is not None
    ctx.save_for_backward(x, weight, lora_a, lora_b, output[1], scale_vec, *meta)


def _fwd_backward(ctx, dy, dh):
    """Backward of ``y = x Wᵀ + bias + Σ_q c_q u_q B̃_qᵀ`` with rank rows ``q`` of each row's
    sequence (``Ã_q = A_{p_q}[j_q]``, ``B̃_q = B_{p_q}[:, j_q]``, ``c_q = scale_{p_q} w_q``)
    and ``u_q = x Ã_qᵀ`` (saved by the forward, fp32, unscaled). With ``g_q = dy B̃_q``::

        dx        = dy W + Σ_q c_q g_q Ã_q
        dA_p[j]   = Σ_{(i, q) : p_q = p, j_q = j} c_q g_{i,q}ᵀ x_i
        dB_p[:,j] = Σ_{(i, q) : p_q = p, j_q = j} c_q dy_iᵀ u_{i,q}

    where ``i`` runs over sequences (rows ``x_i``, ``dy_i``). ``dx`` and ``g`` come from
    one pass of the fused kernel (K loop over d_out, W read transposed, B as the shrink,
    A as the expand). ``dA``/``dB`` are reduced per pool entry over its uses in
    ascending (sequence, list slot) order with fp32 accumulators: deterministic, no
    atomics. Rows ``j >= r_p`` of ``dA_p``/``dB_p`` are zero. ``scale`` and the composition
    weights are constants; the base weight is frozen.
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
                                        ctx.scale, ctx.block_m)
    return dx, None, None, da, db, [None] * ctx.n_meta, None, None, None, None, None


torch.library.register_autograd("f2l::lora_fwd", _fwd_backward, setup_context=_fwd_setup_context)


# --------------------------------------------------------------------------- public launchers


def _prepare(x, lora_a, batch: LoraBatch, scale):
    P, r_max, _ = lora_a.shape
    plan = batch.rank_plan(P, r_max)
    block_m = _block_m(batch.max_rows_per_seq, plan["block_r"])
    tiles = batch.tiles(block_m)
    meta = [tiles, batch.seq_starts, plan["rr_pool"], plan["rr_j"], plan["rr_w"], plan["ranks"],
            plan["entry_off"], plan["entry_seq"], batch.adapter_weight, plan["use_ptr"], plan["use_entry"]]
    if isinstance(scale, torch.Tensor):
        sv = scale.detach().to(torch.float32)
        scale_vec, scale_f = (sv.expand(P).contiguous() if sv.dim() == 0 else sv.contiguous()), 1.0
    else:
        scale_vec, scale_f = None, float(scale)
    return meta, scale_vec, scale_f, block_m, plan


def _run(x, weight, bias, lora_a, lora_b, batch, scale):
    meta, scale_vec, scale_f, block_m, plan = _prepare(x, lora_a, batch, scale)
    grad = torch.is_grad_enabled() and (x.requires_grad or lora_a.requires_grad or lora_b.requires_grad)
    y, _ = torch.ops.f2l.lora_fwd(x, weight, bias, lora_a, lora_b, meta, scale_vec, scale_f, block_m,
                                  batch.is_decode, grad)
    return y


def lora_linear_triton(x, weight, bias, lora_a, lora_b, batch: LoraBatch, scale) -> torch.Tensor:
    """``x [N, d_in]`` rows, inputs validated by :func:`f2l_kernels.lora_linear`."""
    return _run(x, weight, bias, lora_a, lora_b, batch, scale)


def lora_delta_triton(x, lora_a, lora_b, batch: LoraBatch, scale, out: torch.Tensor | None = None) -> torch.Tensor:
    """The delta alone; with ``out`` (no autograd) it is accumulated in place by the kernel."""
    if out is None:
        return _run(x, None, None, lora_a, lora_b, batch, scale)
    meta, scale_vec, scale_f, block_m, plan = _prepare(x, lora_a, batch, scale)
    if batch.is_decode:
        _decode_launch(x, None, None, lora_a, lora_b, plan, scale_vec, scale_f, out, True)
    else:
        _fused_launch(x, None, False, None, lora_a, lora_a.stride(), lora_b, lora_b.stride(), meta[0], meta[1],
                      plan, scale_vec, scale_f, block_m, out, None, True)
    return out
