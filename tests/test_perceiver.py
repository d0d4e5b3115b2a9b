"""perceiver_attention: the Triton path (interpreted on CPU) against the fp32 reference.

Forward and every gradient, fp32 and bf16, over an explicit list of awkward cases; the
reference itself against an independent padded/masked SDPA; input guards; determinism;
the registered torch ops through ``torch.library.opcheck``.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import f2l_kernels.perceiver.triton as ptri
from f2l_kernels import perceiver_attention
from f2l_kernels.perceiver.reference import perceiver_attention_ref, rms_norm_ref

NAMES = ("q", "ctx", "k_weight", "v_weight", "norm_weight", "latent_k", "latent_v")


@dataclass(frozen=True)
class Case:
    lens: tuple
    M: int = 4
    Mp: int = 2          # latent keys per sequence (M'); 0 with latent=False means none
    H: int = 4
    Hkv: int = 2
    Dh: int = 8
    Dc: int = 24
    latent: bool = True
    norm: bool = True
    split: int | None = None


CASES = {
    "one_seq": Case(lens=(23,)),
    "many_short": Case(lens=(3, 1, 5, 2, 4, 1, 6)),
    "empty_seq": Case(lens=(7, 0, 9)),
    "empty_seq_no_latent": Case(lens=(0, 11, 0), latent=False),
    "long_split": Case(lens=(5, 57), split=8),
    "m_ne_mprime": Case(lens=(9, 13), M=3, Mp=5),
    "mha_h_eq_hkv": Case(lens=(10, 14), H=3, Hkv=3),
    "gqa_h_4hkv": Case(lens=(12, 8), H=8, Hkv=2),
    "dc_not_pow2": Case(lens=(11, 17), Dc=40, Dh=16),
    "no_latent": Case(lens=(8, 15), latent=False),
    "no_norm": Case(lens=(13, 6), norm=False),
}


def _inputs(c: Case, dtype, wdtype=None, device="cpu"):
    wdtype = wdtype or dtype
    S, N = len(c.lens), sum(c.lens)
    cu = torch.zeros(S + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(c.lens), 0)
    # Scores of O(1): the weights are scaled so softmax is neither flat nor one-hot.
    t = {
        "q": torch.randn(S, c.M, c.H, c.Dh),
        "ctx": torch.randn(N, c.Dc) * 1.7 + 0.3,
        "k_weight": torch.randn(c.Hkv * c.Dh, c.Dc) * c.Dc ** -0.5 * 2.0,
        "v_weight": torch.randn(c.Hkv * c.Dh, c.Dc) * c.Dc ** -0.5,
        "norm_weight": 1.0 + 0.5 * torch.randn(c.Dc) if c.norm else None,
        "latent_k": torch.randn(S, c.Mp, c.Hkv, c.Dh) if c.latent else None,
        "latent_v": torch.randn(S, c.Mp, c.Hkv, c.Dh) if c.latent else None,
    }
    out = {}
    for k, v in t.items():
        if v is None:
            out[k] = None
            continue
        dt = wdtype if k in ("k_weight", "v_weight", "norm_weight") else dtype
        out[k] = v.to(device=device, dtype=dt).requires_grad_()
    return out, cu.to(device)


def _call(fn, t, cu, **kw):
    return fn(t["q"], t["ctx"], cu, t["k_weight"], t["v_weight"], norm_weight=t["norm_weight"],
              latent_k=t["latent_k"], latent_v=t["latent_v"], **kw)


def _grads(out, t, g):
    names = [n for n in NAMES if t[n] is not None]
    gs = torch.autograd.grad(out, [t[n] for n in names], g, allow_unused=True)
    return {n: (torch.zeros_like(t[n]) if x is None else x) for n, x in zip(names, gs)}


def _as64(t):
    return {k: None if v is None else v.detach().double().requires_grad_() for k, v in t.items()}


def _naive_lowp(q, ctx, cu, k_weight, v_weight, *, norm_weight=None, latent_k=None, latent_v=None):
    """Plain torch in the inputs' dtype (the error budget a fused kernel is held to)."""
    dt = q.dtype
    S, M, H, Dh = q.shape
    Hkv = k_weight.shape[0] // Dh
    x = ctx
    n = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(dt)
    if norm_weight is not None:
        n = n * norm_weight.to(dt)
    k_all = (n @ k_weight.to(dt).t()).view(-1, Hkv, Dh)
    v_all = (n @ v_weight.to(dt).t()).view(-1, Hkv, Dh)
    outs = []
    b = cu.tolist()
    for s in range(S):
        k, v = k_all[b[s]:b[s + 1]], v_all[b[s]:b[s + 1]]
        if latent_k is not None:
            k, v = torch.cat([k, latent_k[s]]), torch.cat([v, latent_v[s]])
        if k.shape[0] == 0:
            outs.append(q[s] * 0)
            continue
        kh = k.repeat_interleave(H // Hkv, 1).transpose(0, 1)
        vh = v.repeat_interleave(H // Hkv, 1).transpose(0, 1)
        sc = (q[s].transpose(0, 1) @ kh.transpose(1, 2)) * Dh ** -0.5
        outs.append((torch.softmax(sc.float(), -1).to(dt) @ vh).transpose(0, 1))
    return torch.stack(outs)


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.fixture
def small_split(monkeypatch):
    def _set(rows):
        monkeypatch.setattr(ptri, "FORCE_SPLIT_ROWS", rows)
    return _set


# ------------------------------------------------------------------ the kernel vs reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(CASES), ids=list(CASES))
def test_triton_matches_reference(name, dtype, small_split):
    c = CASES[name]
    # Default: a small split anyway so several cases exercise the multi-item merge.
    small_split(c.split or 16)
    t, cu = _inputs(c, dtype)
    out = _call(perceiver_attention, t, cu, backend="triton")
    assert out.dtype == dtype and out.shape == t["q"].shape
    g = torch.randn(out.shape, dtype=torch.float64)
    gt = _grads(out.double(), t, g)

    t64 = _as64(t)
    ref = _call(perceiver_attention_ref, t64, cu)
    gr = _grads(ref, t64, g)
    assert torch.isfinite(out).all()

    if dtype == torch.float32:
        tol = {n: 1e-5 for n in NAMES}
        tol_o = 1e-5
    else:
        # Held to 2x the error plain torch makes in bf16 (plus a small floor).
        tb = {k: None if v is None else v.detach().requires_grad_() for k, v in t.items()}
        nb = _call(_naive_lowp, tb, cu)
        gb = _grads(nb.double(), tb, g)
        tol_o = 2 * _rel(nb, ref) + 2e-3
        tol = {n: 2 * _rel(gb[n], gr[n]) + 5e-3 for n in gb}
    assert _rel(out, ref) <= tol_o, f"out: {_rel(out, ref):.3g} > {tol_o:.3g}"
    for n in gr:
        assert torch.isfinite(gt[n]).all(), n
        err = _rel(gt[n], gr[n])
        assert err <= tol[n], f"d{n}: rel err {err:.3g} > {tol[n]:.3g}"
        assert gt[n].dtype == t[n].dtype


def test_mixed_weight_dtype(small_split):
    """bf16 activations with fp32 master weights (autocast-style) give fp32 weight grads."""
    small_split(16)
    c = Case(lens=(9, 20))
    t, cu = _inputs(c, torch.bfloat16, torch.float32)
    out = _call(perceiver_attention, t, cu, backend="triton")
    ref = _call(perceiver_attention_ref, t, cu)
    assert out.dtype == torch.bfloat16
    assert _rel(out, ref) < 2e-2
    g = torch.randn(out.shape)
    gt, gr = _grads(out.float(), t, g), _grads(ref.float(), t, g)
    for n in ("k_weight", "v_weight", "norm_weight"):
        assert gt[n].dtype == torch.float32
        assert _rel(gt[n], gr[n]) < 3e-2, n


def test_empty_context_no_latent_is_zero(small_split):
    small_split(16)
    c = Case(lens=(0, 0), latent=False)
    t, cu = _inputs(c, torch.float32)
    for backend in ("reference", "triton"):
        out = _call(perceiver_attention, t, cu, backend=backend)
        assert torch.equal(out, torch.zeros_like(out)), backend
        g = _grads(out, t, torch.randn(out.shape))
        for n, v in g.items():
            assert torch.equal(v, torch.zeros_like(v)), (backend, n)


def test_custom_scale_and_eps(small_split):
    small_split(16)
    c = Case(lens=(10, 5))
    t, cu = _inputs(c, torch.float32)
    out = _call(perceiver_attention, t, cu, backend="triton", scale=0.37, eps=1e-2)
    ref = _call(perceiver_attention_ref, t, cu, scale=0.37, eps=1e-2)
    assert _rel(out, ref) < 1e-5


def test_backward_is_deterministic(small_split):
    small_split(8)
    c = Case(lens=(30, 3, 25))
    t, cu = _inputs(c, torch.bfloat16)
    g = torch.randn(t["q"].shape)
    runs = []
    for _ in range(2):
        out = _call(perceiver_attention, t, cu, backend="triton")
        runs.append((out, _grads(out.float(), t, g)))
    assert torch.equal(runs[0][0], runs[1][0])
    for n in runs[0][1]:
        assert torch.equal(runs[0][1][n], runs[1][1][n]), n


def test_split_does_not_change_result(small_split):
    c = Case(lens=(41, 2))
    t, cu = _inputs(c, torch.float32)
    outs = []
    for rows in (5, 64):
        small_split(rows)
        outs.append(_call(perceiver_attention, t, cu, backend="triton"))
    assert _rel(outs[0], outs[1]) < 1e-6


# ------------------------------------------------------------------ the reference itself


def test_reference_matches_padded_sdpa():
    """The reference against an independent padded batch with a key mask (the authors'
    formulation: K/V of concat(context, latents), GQA by repeat_kv)."""
    c = Case(lens=(6, 0, 11), H=4, Hkv=2)
    t, cu = _inputs(c, torch.float64)
    ref = _call(perceiver_attention_ref, t, cu)
    S, M, H, Dh = t["q"].shape
    Tm = max(c.lens)
    ctx_pad = torch.zeros(S, Tm, c.Dc, dtype=torch.float64)
    mask = torch.zeros(S, Tm + c.Mp, dtype=torch.bool)
    b = cu.tolist()
    for s in range(S):
        ctx_pad[s, : c.lens[s]] = t["ctx"][b[s]:b[s + 1]]
        mask[s, : c.lens[s]] = True
        mask[s, Tm:] = True
    n = rms_norm_ref(ctx_pad, t["norm_weight"], 1e-6).double()
    k = torch.cat([(n @ t["k_weight"].t()).view(S, Tm, c.Hkv, Dh), t["latent_k"]], 1)
    v = torch.cat([(n @ t["v_weight"].t()).view(S, Tm, c.Hkv, Dh), t["latent_v"]], 1)
    k = k.repeat_interleave(H // c.Hkv, 2).transpose(1, 2)
    v = v.repeat_interleave(H // c.Hkv, 2).transpose(1, 2)
    o = F.scaled_dot_product_attention(t["q"].transpose(1, 2), k, v, attn_mask=mask[:, None, None, :])
    assert torch.allclose(ref, o.transpose(1, 2), atol=1e-10)


@pytest.mark.parametrize("latent", [True, False])
def test_reference_length_buckets_match_per_sequence(latent):
    """A ragged batch (short, long, empty, out of order) is cut into length buckets, each a
    padded SDPA: values and gradients equal attending sequence by sequence."""
    from f2l_kernels.perceiver.reference import _length_buckets

    c = Case(lens=(3, 40, 0, 4, 41, 5, 2, 39, 0), latent=latent)
    extra = c.Mp if latent else 0
    buckets = _length_buckets(list(c.lens), extra)
    assert 1 < len(buckets) < len(c.lens) and sorted(i for b in buckets for i in b) == list(range(len(c.lens)))
    t, cu = _inputs(c, torch.float64)
    out = _call(perceiver_attention_ref, t, cu)
    S, M, H, Dh = t["q"].shape
    b = cu.tolist()
    want = []
    for s in range(S):
        n = rms_norm_ref(t["ctx"][b[s]:b[s + 1]], t["norm_weight"], 1e-6)
        k, v = (n @ t["k_weight"].t()).view(-1, c.Hkv, Dh), (n @ t["v_weight"].t()).view(-1, c.Hkv, Dh)
        if latent:
            k, v = torch.cat([k, t["latent_k"][s]]), torch.cat([v, t["latent_v"][s]])
        if k.shape[0] == 0:
            want.append(t["q"][s] * 0.0)
            continue
        k, v = k.repeat_interleave(H // c.Hkv, 1).transpose(0, 1), v.repeat_interleave(H // c.Hkv, 1).transpose(0, 1)
        want.append(F.scaled_dot_product_attention(t["q"][s].transpose(0, 1), k, v).transpose(0, 1))
    want = torch.stack(want)
    assert torch.allclose(out, want, atol=1e-10)
    g = torch.randn_like(out)
    leaves = [x for x in t.values() if x is not None]
    got = torch.autograd.grad(out, leaves, g)
    exp = torch.autograd.grad(want, leaves, g)
    for a, e in zip(got, exp):
        assert torch.allclose(a, e, atol=1e-10)


# ------------------------------------------------------------------ input guards

def _good():
    c = Case(lens=(4, 3))
    t, cu = _inputs(c, torch.float32)
    return {k: (None if v is None else v.detach()) for k, v in t.items()}, cu


BAD = {
    "q_3d": (lambda t, cu: t.update(q=t["q"][0]), ValueError, "q"),
    "q_int": (lambda t, cu: t.update(q=t["q"].long()), TypeError, "q"),
    "ctx_dtype": (lambda t, cu: t.update(ctx=t["ctx"].double()), TypeError, "ctx"),
    "ctx_dc": (lambda t, cu: t.update(ctx=t["ctx"][:, :-1]), ValueError, "k_weight"),
    "k_weight_rows": (lambda t, cu: t.update(k_weight=t["k_weight"][:-1]), ValueError, "k_weight"),
    "hkv_not_divisor": (lambda t, cu: t.update(k_weight=torch.randn(3 * 8, 24), v_weight=torch.randn(3 * 8, 24)),
                        ValueError, "Hkv"),
    "v_weight_shape": (lambda t, cu: t.update(v_weight=t["v_weight"][:, :-1]), ValueError, "v_weight"),
    "norm_weight_shape": (lambda t, cu: t.update(norm_weight=t["norm_weight"][:-1]), ValueError, "norm_weight"),
    "latent_k_only": (lambda t, cu: t.update(latent_v=None), ValueError, "latent_v"),
    "latent_heads": (lambda t, cu: t.update(latent_k=t["latent_k"][:, :, :1], latent_v=t["latent_v"][:, :, :1]),
                     ValueError, "latent_k"),
    "latent_dtype": (lambda t, cu: t.update(latent_k=t["latent_k"].half(), latent_v=t["latent_v"].half()),
                     TypeError, "latent_k"),
    "cu_float": (lambda t, cu: t.update(cu=cu.float()), TypeError, "cu_seqlens"),
    "cu_list": (lambda t, cu: t.update(cu=cu.tolist()), TypeError, "cu_seqlens"),
    "cu_len": (lambda t, cu: t.update(cu=cu[:-1]), ValueError, "cu_seqlens"),
    "cu_start": (lambda t, cu: t.update(cu=cu + 1), ValueError, "cu_seqlens"),
    "cu_end": (lambda t, cu: t.update(cu=torch.tensor([0, 4, 6], dtype=torch.int32)), ValueError, "cu_seqlens"),
    "cu_non_monotonic": (lambda t, cu: t.update(cu=torch.tensor([0, 8, 7], dtype=torch.int32)),
                         ValueError, "non-decreasing"),
    "eps_negative": (lambda t, cu: t.update(eps=-1.0), ValueError, "eps"),
    "scale_str": (lambda t, cu: t.update(scale="x"), TypeError, "scale"),
    "backend_name": (lambda t, cu: t.update(backend="nope"), ValueError, "backend"),
    "weight_device": (lambda t, cu: t.update(k_weight=t["k_weight"].to("meta")), ValueError, "k_weight"),
}


@pytest.mark.parametrize("name", list(BAD), ids=list(BAD))
def test_bad_inputs(name):
    t, cu = _good()
    t["cu"] = cu
    mutate, exc, word = BAD[name]
    mutate(t, cu)
    kw = {k: t[k] for k in ("norm_weight", "latent_k", "latent_v") if k in t}
    for k in ("eps", "scale", "backend"):
        if k in t:
            kw[k] = t[k]
    with pytest.raises(exc, match=word):
        perceiver_attention(t["q"], t["ctx"], t["cu"], t["k_weight"], t["v_weight"], **kw)


# ------------------------------------------------------------------ torch op registration


def test_opcheck_registered_ops(small_split):
    small_split(8)
    c = Case(lens=(12, 0, 5), H=2, Hkv=1, M=2)
    S, HM, Dc = len(c.lens), c.H * c.M, c.Dc
    bounds = [0, 12, 12, 17]
    plan = ptri.plan_work(bounds, torch.device("cpu"))
    assert plan.num_slots == 2  # the 12-row sequence is split in two, the 5-row one is not
    idx = (plan.work_seq, plan.work_start, plan.work_end, plan.work_ptr, plan.work_slot)
    qt = torch.randn(S, HM, Dc, requires_grad=True)
    x = torch.randn(17, Dc, requires_grad=True)
    args = (qt, x, *idx, plan.num_slots, 1e-6)
    torch.library.opcheck(torch.ops.f2l.perceiver_ctx_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    a, lse = torch.ops.f2l.perceiver_ctx_fwd(*args)
    bargs = (qt.detach(), x.detach(), a.detach(), lse.detach(), torch.randn_like(a), torch.randn_like(lse),
             *idx, plan.num_slots, plan.max_rows, 1e-6)
    torch.library.opcheck(torch.ops.f2l.perceiver_ctx_bwd.default, bargs,
                          test_utils=("test_schema", "test_faketensor"))
    # The op-level autograd (register_autograd) agrees with the Function.
    g_a, g_l = torch.randn_like(a), torch.randn_like(lse)
    d_op = torch.autograd.grad((a * g_a).sum() + (lse * g_l).sum(), (qt, x))
    a2, lse2 = ptri.CtxAttentionFunction.apply(qt, x, plan, 1e-6)
    d_fn = torch.autograd.grad((a2 * g_a).sum() + (lse2 * g_l).sum(), (qt, x))
    for u, v in zip(d_op, d_fn):
        assert torch.allclose(u, v, atol=1e-6)


def test_fp16_and_strided_inputs(small_split):
    """fp16, and inputs that are views (non-contiguous q, ctx, latents)."""
    small_split(8)
    c = Case(lens=(14, 0, 9))
    t, cu = _inputs(c, torch.float16)
    tv = dict(t)
    tv["q"] = t["q"].detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    tv["ctx"] = torch.cat([t["ctx"].detach(), t["ctx"].detach()], 1)[:, : c.Dc].requires_grad_()
    tv["latent_k"] = t["latent_k"].detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    assert not tv["q"].is_contiguous() and not tv["ctx"].is_contiguous()
    out = _call(perceiver_attention, tv, cu, backend="triton")
    t64 = _as64(t)
    ref = _call(perceiver_attention_ref, t64, cu)
    assert out.dtype == torch.float16
    assert _rel(out, ref) < 5e-3
    g = torch.randn(out.shape, dtype=torch.float64)
    gt, gr = _grads(out.double(), tv, g), _grads(ref, t64, g)
    for n in gr:
        assert _rel(gt[n], gr[n]) < 2e-2, n


@pytest.mark.parametrize("bounds,split", [
    ([0, 0], 4), ([0, 3], 4), ([0, 4, 4, 13], 4), ([0, 1, 2, 3], 1), ([0, 100, 101], 64),
], ids=["only_empty", "one_short", "empty_mid_split", "all_single_rows", "long_then_short"])
def test_plan_covers_every_row_once(bounds, split):
    plan = ptri.plan_work(bounds, torch.device("cpu"), split_rows=split)
    seq, lo, hi = plan.work_seq.tolist(), plan.work_start.tolist(), plan.work_end.tolist()
    ptr, slot = plan.work_ptr.tolist(), plan.work_slot.tolist()
    rows = [r for a, b in zip(lo, hi) for r in range(a, b)]
    assert rows == list(range(bounds[-1]))
    assert all(0 < b - a <= split for a, b in zip(lo, hi))
    used = []
    for s in range(len(bounds) - 1):
        items = range(ptr[s], ptr[s + 1])
        assert all(seq[w] == s and bounds[s] <= lo[w] and hi[w] <= bounds[s + 1] for w in items)
        if len(items) == 1:
            assert slot[items[0]] == -1
        else:
            used += [slot[w] for w in items]
    assert sorted(used) == list(range(plan.num_slots))


def test_default_split_policy():
    dev = torch.device("cpu")  # counts as 4 SMs
    # Never below 8 query rows' worth (the partial traffic bound), multiple of 64.
    r = ptri.default_split_rows(1000, 128, dev)
    assert r >= 8 * 128 and r % 64 == 0
    # Enough rows per item that the programs stay near four per SM for a huge call.
    assert ptri.default_split_rows(10**8, 128, dev) == -(-(10**8 // 4) // 64) * 64


# ------------------------------------------------------------------ GPU compile, no GPU needed

_AOT = r'''
import sys, triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
import f2l_kernels.perceiver.triton as T

P, X, F = "*i32", "*bf16", "*fp32"
SIGS = {
    "_ctx_attn_fwd_kernel": dict(QT=X, X=X, WORK_SEQ=P, WORK_START=P, WORK_END=P, WORK_SLOT=P, PM=F, PL=F,
                                 PACC=F, A=F, LSE=F, eps="fp32"),
    "_ctx_attn_merge_kernel": dict(PM=F, PL=F, PACC=F, WORK_PTR=P, WORK_SLOT=P, A=F, LSE=F),
    "_ctx_attn_bwd_ds_kernel": dict(QT=X, X=X, DA=X, LSE=F, DELTA=F, WORK_SEQ=P, WORK_START=P, WORK_END=P,
                                    G=X, COEF=F, eps="fp32"),
    "_ctx_attn_bwd_dx_kernel": dict(G=X, QDA=X, X=X, COEF=F, WORK_SEQ=P, WORK_START=P, WORK_END=P, DX=X),
    "_ctx_attn_bwd_dq_kernel": dict(G=X, X=X, WORK_SEQ=P, WORK_START=P, WORK_END=P, WORK_SLOT=P, PDQ=F, DQ=F),
    "_segment_sum_kernel": dict(P=F, WORK_PTR=P, WORK_SLOT=P, OUT=F, numel="i32"),
}
for name, sig in SIGS.items():
    k = getattr(T, name)
    assert isinstance(k, triton.runtime.jit.JITFunction), name  # the autotuners wrap these
    cons = dict(HM=24, DC=40, BLOCK_D=64, BLOCK_Q=16, BLOCK_N=16, DOT_PREC="tf32", BLOCK=256, WRITE_P=True)
    cons = {n: v for n, v in cons.items() if n in k.arg_names}
    full = {n: ("constexpr" if n in cons else sig[n]) for n in k.arg_names}
    src = ASTSource(fn=k, signature=full, constexprs={(k.arg_names.index(n),): v for n, v in cons.items()})
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=2))
    print("compiled", name)
'''


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile these kernels for real")
def test_kernels_compile_for_sm90():
    """The interpreter accepts code the GPU compiler rejects (and vice versa): compile every
    kernel for sm_90 in a clean process, without the interpreter (no GPU needed)."""
    import os
    import subprocess
    import sys

    try:
        import triton.backends.nvidia  # noqa: F401
    except Exception:
        pytest.skip("triton has no NVIDIA backend here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", _AOT], env=env, capture_output=True, text=True, timeout=300)
    if res.returncode != 0 and ("ptxas" in res.stderr and "not found" in res.stderr):
        pytest.skip("no ptxas for the sm_90 target")
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("compiled") == 6


@pytest.mark.parametrize("which", ["ctx_frozen", "q_frozen"])
def test_partial_requires_grad(which, small_split):
    """Only the needed backward passes run; the gradients that are asked for still match."""
    small_split(8)
    c = Case(lens=(13, 4))
    t, cu = _inputs(c, torch.float32)
    frozen = "ctx" if which == "ctx_frozen" else "q"
    t[frozen] = t[frozen].detach()
    out = _call(perceiver_attention, t, cu, backend="triton")
    ref = _call(perceiver_attention_ref, t, cu)
    g = torch.randn(out.shape)
    live = [n for n in NAMES if n != frozen]
    gt = torch.autograd.grad(out, [t[n] for n in live], g)
    gr = torch.autograd.grad(ref, [t[n] for n in live], g)
    for n, a, b in zip(live, gt, gr):
        assert _rel(a, b) < 1e-5, n


def test_kept_configs_keep_every_warp_on_its_own_mma_tile():
    """The layout rules the config tables rely on (checked ahead of time with the compiler):
    chained products get all W warps along one axis, and an MMA tile is 16 rows (64 per
    4-warp group on sm_90) by 8 columns, so those axes must cover the warps."""
    fwd, ds, dx, dq = ptri._FWD_16, ptri._DS_16, ptri._DX_16, ptri._DQ_16
    # Forward: [BQ, BN] scores chained into [BQ, Dc]; BQ < Dc puts the warps along BN.
    assert all(bn >= 8 * w and bq < 512 for bq, bn, w, _ in fwd)
    # ds pass: [BN, BQ] scores (two products sharing the row tile): warps along BN.
    assert all(bn >= 16 * w and w % 4 == 0 for bq, bn, w, _ in ds)
    # dq̃ / dx: one [64, Dc] product, one 4-warp group per 64 rows and the rest along Dc.
    assert all(bq == 64 and w == 8 for bq, bn, w, _ in dq)
    assert all(bn == 64 and w == 8 for bq, bn, w, _ in dx)
    # Every list is in its autotuner, which keys on model sizes only.
    for table, tuners in ((fwd, ptri._FWD), (ds, ptri._DS), (dx, ptri._DX), (dq, ptri._DQ)):
        assert set(tuners) == {"16", "ieee", "tf32"}
        assert all(t.keys == ["HM", "DC"] for t in tuners.values())
        if not ptri._INTERPRET:
            assert len(tuners["16"].configs) == len(table)
    # TF32 products follow the same rule (IEEE fp32 products run on FMA units, no tiles).
    assert all(bn >= 8 * w for bq, bn, w, _ in ptri._FWD_TF32)


def test_tf32_only_where_allowed(small_split):
    """fp32 stays IEEE unless the user allows TF32 for fp32 matmuls; 16-bit ignores it."""
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert ptri._dot_prec(torch.float32) == "ieee"
        assert ptri._dot_prec(torch.bfloat16) == "ieee"
        torch.set_float32_matmul_precision("high")
        assert ptri.tf32_allowed() and ptri._dot_prec(torch.float32) == "tf32"
        assert ptri._dot_prec(torch.float16) == "ieee"
        # The TF32 variant still computes the same function (the interpreter's products are
        # exact fp32; on a GPU they round the operands to TF32).
        small_split(8)
        c = Case(lens=(13, 0, 6))
        t, cu = _inputs(c, torch.float32)
        out = _call(perceiver_attention, t, cu, backend="triton")
        ref = _call(perceiver_attention_ref, t, cu)
        assert _rel(out, ref) < (1e-5 if ptri._INTERPRET else 5e-3)
    finally:
        torch.set_float32_matmul_precision(old)
