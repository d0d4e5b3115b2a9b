"""Sweep of the per-example LoRA kernels against their baselines.

    python benchmarks/sweep_lora.py            # H100-sized sweep (CUDA), a few minutes
    python benchmarks/sweep_lora.py --quick    # tiny shapes, runs anywhere (CPU: reference path)

Writes ``benchmarks/results/lora_sweep.{json,csv}``, PNG plots next to them and prints
the issue's targets (prefill ≤ 1.10× the base GEMM; decode batch 64 ≥ 70 % of HBM
bandwidth on the bytes that must move; backward ≤ 2× the forward, ≥ 1.5× faster than
autograd through the einsum path, ≥ 5× less peak memory than per-token copies).

Implementations in every case (same inputs, same run):
- ``base``: the frozen GEMM alone, ``x @ Wᵀ`` (the prefill target's yardstick);
- ``f2l``: :func:`f2l_kernels.lora_linear` (auto backend: Triton on CUDA);
- ``f2l_cuda``: the CUDA decode kernel, where built (decode cases only);
- ``einsum``: ``reference.py``'s padded per-sequence einsums in the input dtype -- the
  authors' approach;
- ``unfused``: base GEMM, then shrink and expand as separate launches on per-sequence
  gathered adapters (vLLM-style unfused LoRA);
- ``per_token``: base GEMM plus A, B gathered for every token, then bmm (Text-to-LoRA style).

Every row carries ms, GB/s and TFLOP/s on the *floor* bytes/FLOPs of the case (what must
move / be computed once), ``floor_ms = max(bytes / peak_bw, flops / peak_flops)`` and the
fraction of that floor achieved, plus speed-ups of f2l over each baseline. The ``f2l`` rows
also carry ``design_bytes``/``design_flops``: the traffic and tensor-core work of the kernels'
own schedule (shrink once per row into fp32 rank slots, base GEMM + expand epilogue; split-K
partials in row mode; per-entry partials in the backward), with ``frac_of_design``.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import (  # noqa: E402
    RESULTS_DIR, bench_env, copy_bandwidth_gbps, peaks, plot_lines, time_fn, write_results,
)
from f2l_kernels.lora import LoraBatch, lora_linear  # noqa: E402
from f2l_kernels.lora.reference import lora_linear_ref  # noqa: E402

try:
    from f2l_kernels.lora import cuda as _lora_cuda  # noqa: E402
except ImportError:
    _lora_cuda = None

SHAPES = {
    "down_proj_500m": (2560, 960),
    "down_proj_2.2b": (8192, 2048),
    "q_proj_500m": (960, 960),
}
QUICK_SHAPES = {"tiny_down": (96, 48), "tiny_q": (64, 64)}


# --------------------------------------------------------------------------- cases


class Case:
    """Inputs of one benchmark case (bf16 on CUDA, fp32 on CPU)."""

    def __init__(self, shape, d_in, d_out, r, seq_lens, ids, pool, *, device, dtype, grad=False):
        self.shape, self.d_in, self.d_out, self.r = shape, d_in, d_out, r
        self.seq_lens, self.ids, self.pool = seq_lens, ids, pool
        n = sum(seq_lens)
        g = torch.Generator(device="cpu").manual_seed(0)

        def rnd(*s, scale=1.0):
            return (torch.randn(*s, generator=g) * scale).to(device=device, dtype=dtype)

        self.x = rnd(n, d_in)
        self.w = rnd(d_out, d_in, scale=d_in ** -0.5)
        self.a = rnd(pool, r, d_in, scale=d_in ** -0.5)
        self.b = rnd(pool, d_out, r, scale=0.1)
        self.dy = rnd(n, d_out) if grad else None
        self.scale = 2.0
        self.batch = LoraBatch.build(seq_lens, ids, device=device)
        # per-token and per-sequence index maps for the baselines
        lists = [e if isinstance(e, list) else [e] for e in ids]
        self.slots = max(len(e) for e in lists)
        self.seq_ids = torch.tensor([e + [-1] * (self.slots - len(e)) for e in lists], device=device)  # [S, m]
        self.tok_ids = torch.repeat_interleave(self.seq_ids, torch.tensor(seq_lens, device=device), dim=0)
        self.uniform = len(set(seq_lens)) == 1

    def rotations(self) -> list:
        """Copies of (x, A, B, W) whose total exceeds twice the L2 (the first is the original)."""
        if not self.x.is_cuda:
            return [(self.x, self.a, self.b, self.w)]
        if getattr(self, "_rot", None) is None:
            l2 = getattr(torch.cuda.get_device_properties(self.x.device), "L2_cache_size", 50 << 20)
            ws = sum(t.numel() * t.element_size() for t in (self.x, self.a, self.b, self.w))
            n = max(1, min(32, -(-2 * l2 // ws)))
            self._rot = [(self.x, self.a, self.b, self.w)] + [
                tuple(t.clone() for t in (self.x, self.a, self.b, self.w)) for _ in range(n - 1)]
        return self._rot

    # bytes and FLOPs that must move / be computed once (bf16 element = 2 bytes)
    def floor(self, mode: str, elt: int) -> tuple[float, float]:
        n, d_in, d_out = sum(self.seq_lens), self.d_in, self.d_out
        entries = sum(len(e) if isinstance(e, list) else 1 for e in self.ids)
        used = len({p for e in self.ids for p in (e if isinstance(e, list) else [e])})
        rank_rows = entries * self.r  # per-sequence total ranks, summed
        tok_rank = sum(L * (len(e) if isinstance(e, list) else 1) * self.r for L, e in zip(self.seq_lens, self.ids))
        fwd_bytes = elt * (n * d_in + d_out * d_in + n * d_out + used * self.r * (d_in + d_out))
        fwd_flops = 2 * n * d_in * d_out + 2 * tok_rank * (d_in + d_out)
        del rank_rows
        if mode == "fwd":
            return fwd_bytes, fwd_flops
        # backward alone: read dy, x, W, A, B; write dx, dA, dB
        bwd_bytes = elt * (n * d_out + 2 * n * d_in + d_out * d_in + 2 * used * self.r * (d_in + d_out))
        bwd_flops = 2 * n * d_in * d_out + 4 * tok_rank * (d_in + d_out)
        if mode == "bwd":
            return bwd_bytes, bwd_flops
        return fwd_bytes + bwd_bytes, fwd_flops + bwd_flops

    def design(self, mode: str, elt: int) -> tuple[float, float]:
        """Bytes and FLOPs of the kernels' own schedule (``f2l_kernels/lora/triton.py``): what
        the f2l rows are measured against in ``frac_of_design``. Counts every tensor a launch
        reads or writes once per launch (re-reads served by the L2 are not counted), and the
        tensor-core work including tile and rank-slot padding."""
        from f2l_kernels.lora import triton as lt

        n, d_in, d_out = sum(self.seq_lens), self.d_in, self.d_out
        lists = [e if isinstance(e, list) else [e] for e in self.ids]
        E = max(len(e) for e in lists)
        be = lt._block_e(self.r)
        hw = E * be
        slots_rows = sum(L * len(e) for L, e in zip(self.seq_lens, lists))  # Σ_rows entries
        used = len({p for e in lists for p in e})
        ab = used * self.r * (d_in + d_out) * elt
        row_mode = max(self.seq_lens) < lt.ROW_MODE_MAX_ROWS
        if row_mode:
            # rows: shrink GEMV partials, split-K base partials, per-row reduce + expand
            bk = max(32, 4096 // be)
            hs, _ = lt._splits(d_in, bk, n, self.x.device) if mode == "fwd" else (1, 0)
            bs = 16
            while bs < n and bs < 64:
                bs *= 2
            cap = lt._split_cap(d_in, elt, n)
            ys, _ = lt._splits(d_in, 128, -(-d_out // 64) * -(-n // bs), self.x.device, cap)
            partial = 4 * 2 * (hs * n * hw + ys * n * d_out)
            per_row_ab = slots_rows * self.r * (d_in + d_out) * elt  # each row reads its own A, B
            fwd_b = elt * (2 * n * d_in + d_out * d_in + n * d_out) + per_row_ab + partial
            fwd_f = 2 * n * d_in * d_out + 2 * slots_rows * be * (d_in + d_out)
        else:
            bm = lt._block_m(max(self.seq_lens), be)
            padded = sum(-(-L // bm) * bm for L in self.seq_lens)
            padded_slots = sum(-(-L // bm) * bm * len(e) for L, e in zip(self.seq_lens, lists))
            h_io = 4 * n * hw * 2  # h written by the shrink, read by the linear kernel
            fwd_b = elt * (2 * n * d_in + d_out * d_in + n * d_out) + ab + h_io
            fwd_f = 2 * padded * d_in * d_out + 2 * padded_slots * be * (d_in + d_out)
        if mode == "fwd":
            return fwd_b, fwd_f
        # backward: g̃ shrink (dy, B), dx (dy, W, A; dx written), dA/dB partials + reduce
        items = sum(len(e) * -(-L // lt.GRAD_CHUNK) for L, e in zip(self.seq_lens, lists))
        parts = 4 * 2 * items * be * (d_in + d_out)
        bwd_b = (elt * (2 * n * d_out + d_out * d_in + n * d_in + n * d_in + n * d_out) + 2 * ab
                 + 4 * n * hw * 3 + parts)
        bwd_f = fwd_f + 2 * slots_rows * be * (d_in + d_out)
        return bwd_b, bwd_f


def impls(c: Case, with_cuda: bool):
    """name -> callable(x, a, b, w=c.w) -> y for the forward; all share ``c``'s metadata."""
    batch, s = c.batch, c.scale
    S = len(c.seq_lens)

    def base(x, a, b, w=c.w):
        return torch.nn.functional.linear(x, w)

    def f2l(x, a, b, w=c.w):
        return lora_linear(x, w, None, a, b, batch, s)

    def f2l_cuda(x, a, b, w=c.w):
        return lora_linear(x, w, None, a, b, batch, s, backend="cuda")

    def einsum(x, a, b, w=c.w):
        # the reference's padded per-sequence einsums, run in the input dtype
        return lora_linear_ref(x, w, None, a, b, batch, s, compute_dtype=x.dtype)

    def unfused(x, a, b, w=c.w):
        # separate launches: base GEMM, then per list slot a shrink and an expand over
        # per-sequence gathered adapters (uniform lengths: batched matmuls)
        y = torch.nn.functional.linear(x, w)
        for j in range(c.slots):
            ids = c.seq_ids[:, j]
            keep = (ids >= 0).to(x.dtype)
            aj = a[ids.clamp_min(0)] * keep[:, None, None]  # [S, r, d_in]
            bj = b[ids.clamp_min(0)]  # [S, d_out, r]
            if c.uniform:
                xs = x.view(S, -1, c.d_in)
                h = torch.bmm(xs, aj.transpose(1, 2)) * s  # shrink
                y = y + torch.bmm(h, bj.transpose(1, 2)).reshape(-1, c.d_out)  # expand
            else:
                parts, start = [], 0
                for i, L in enumerate(c.seq_lens):
                    h = x[start:start + L] @ aj[i].t() * s
                    parts.append(h @ bj[i].t())
                    start += L
                y = y + torch.cat(parts)
        return y

    def per_token(x, a, b, w=c.w):
        y = torch.nn.functional.linear(x, w)
        for j in range(c.slots):
            ids = c.tok_ids[:, j]
            keep = (ids >= 0).to(x.dtype)
            at = a[ids.clamp_min(0)] * keep[:, None, None]  # [N, r, d_in]: A copied for every token
            bt = b[ids.clamp_min(0)]  # [N, d_out, r]
            h = torch.bmm(at, x[:, :, None]) * s  # [N, r, 1]
            y = y + torch.bmm(bt, h)[:, :, 0]
        return y

    out = {"base": base, "f2l": f2l}
    if with_cuda:
        out["f2l_cuda"] = f2l_cuda
    out.update({"einsum": einsum, "unfused": unfused, "per_token": per_token})
    return out


# --------------------------------------------------------------------------- measuring


def _row(c: Case, mode: str, impl: str, ms: float, bytes_, flops, pk, extra=None):
    floor_ms = max(bytes_ / (pk["hbm_gbps"] * 1e9), flops / (pk["bf16_tflops"] * 1e12)) * 1e3
    if impl == "f2l":
        db, dfl = c.design("fwd" if mode != "backward" else "bwd", c.x.element_size())
        design_ms = max(db / (pk["hbm_gbps"] * 1e9), dfl / (pk["bf16_tflops"] * 1e12)) * 1e3
        extra = dict(extra or {}, design_bytes=db, design_flops=dfl, design_ms=design_ms,
                     frac_of_design=design_ms / ms)
    r = {
        "op": "lora_linear", "case": mode, "backend": impl, "shape": c.shape, "d_in": c.d_in, "d_out": c.d_out,
        "r": c.r, "seqs": len(c.seq_lens), "rows": sum(c.seq_lens), "segments": c.slots,
        "ms": ms, "gbps": bytes_ / (ms * 1e-3) / 1e9, "tflops": flops / (ms * 1e-3) / 1e12,
        "floor_bytes": bytes_, "floor_flops": flops, "floor_ms": floor_ms, "frac_of_floor": floor_ms / ms,
    }
    r.update(extra or {})
    return r


def _time(fn, quick, graph=False):
    try:
        return time_fn(fn, warmup=3 if quick else 10, rep=5 if quick else 100, cuda_graph=graph)
    except torch.cuda.OutOfMemoryError:
        gc.collect()
        torch.cuda.empty_cache()
        return float("nan")


def run_forward(c: Case, mode: str, pk, quick, with_cuda):
    rows = []
    elt = c.x.element_size()
    bytes_, flops = c.floor("fwd", elt)
    cuda = c.x.is_cuda
    for name, fn in impls(c, with_cuda and mode.startswith("decode")).items():
        if name == "per_token" and sum(c.seq_lens) * c.r * (c.d_in + c.d_out) * c.slots * elt > 8e9:
            continue  # the copies alone would not fit
        with torch.no_grad():
            call = lambda fn=fn: fn(c.x, c.a, c.b)  # noqa: E731
            try:
                call()
            except Exception as e:  # a baseline that cannot run this shape is reported, not fatal
                rows.append({"op": "lora_linear", "case": mode, "backend": name, "shape": c.shape, "r": c.r,
                             "error": f"{type(e).__name__}: {e}"[:200]})
                continue
            extra = {}
            if cuda and mode.startswith("decode"):
                # CUDA graphs do not flush the L2 between replays: cycle through enough
                # copies of the inputs that none is still cached when it is used again
                sets = c.rotations()
                many = lambda fn=fn, sets=sets: [fn(x, a, b, w) for x, a, b, w in sets]  # noqa: E731
                ms = _time(many, quick, graph=True) / len(sets)
                extra["ms_eager"] = _time(many, quick) / len(sets)
                extra["dispatch_overhead_ms"] = extra["ms_eager"] - ms
                extra["rotated_buffers"] = len(sets)
            else:
                ms = _time(call, quick)
        rows.append(_row(c, mode, name, ms, bytes_, flops, pk, extra))
    _speedups(rows)
    return rows


def _peak_mem(fn) -> float:
    if not torch.cuda.is_available():
        return float("nan")
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def run_backward(c: Case, pk, quick):
    rows = []
    elt = c.x.element_size()
    for name, fn in impls(c, False).items():
        if name == "base":
            continue
        if name == "per_token" and sum(c.seq_lens) * c.r * (c.d_in + c.d_out) * c.slots * elt * 3 > 24e9:
            continue
        x, a, b = (t.detach().clone().requires_grad_() for t in (c.x, c.a, c.b))

        def fwd(fn=fn, x=x, a=a, b=b):
            with torch.no_grad():
                return fn(x, a, b)

        def fwd_bwd(fn=fn, x=x, a=a, b=b):
            x.grad = a.grad = b.grad = None
            y = fn(x, a, b)
            y.backward(c.dy)

        try:
            fwd_bwd()
        except Exception as e:
            rows.append({"op": "lora_linear", "case": "backward", "backend": name, "shape": c.shape, "r": c.r,
                         "error": f"{type(e).__name__}: {e}"[:200]})
            continue
        ms_f = _time(fwd, quick)
        ms_fb = _time(fwd_bwd, quick)
        mem = _peak_mem(fwd_bwd)
        ms_b = ms_fb - ms_f
        bytes_, flops = c.floor("bwd", elt)
        rows.append(_row(c, "backward", name, ms_b, bytes_, flops, pk,
                         {"ms_fwd": ms_f, "ms_fwd_bwd": ms_fb, "bwd_over_fwd": ms_b / ms_f, "peak_mib": mem}))
    _speedups(rows, key="ms_fwd_bwd")
    f2l = next((r for r in rows if r.get("backend") == "f2l"), None)
    if f2l is not None:
        for r in rows:
            if "peak_mib" in r and r["peak_mib"] == r["peak_mib"] and f2l["peak_mib"] > 0:
                r["f2l_mem_saving"] = r["peak_mib"] / f2l["peak_mib"]
    return rows


def _speedups(rows, key="ms"):
    f2l = next((r for r in rows if r.get("backend") == "f2l" and key in r), None)
    if f2l is None:
        return
    for r in rows:
        if key in r and r.get("backend") != "f2l":
            r["f2l_speedup"] = r[key] / f2l[key]
            r["f2l_over"] = f2l[key] / r[key]


# --------------------------------------------------------------------------- sweep


def sweep(quick: bool):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shapes = QUICK_SHAPES if quick else SHAPES
    ranks = [8, 16] if quick else [8, 16, 64]
    prefill = (2, 16) if quick else (8, 1024)
    decode_batches = [1, 4] if quick else [1, 16, 64, 256]
    comp_batch = 4 if quick else 64
    with_cuda = device == "cuda" and _lora_cuda is not None and _lora_cuda.available()
    pk = peaks()
    if device == "cpu":  # nominal numbers so the floor columns are defined in quick CPU runs
        pk = {"hbm_gbps": 50.0, "bf16_tflops": 1.0}
    rows = []
    cases = []
    for shape, (d_in, d_out) in shapes.items():
        for r in ranks:
            S, T = prefill
            cases.append(("prefill", Case(shape, d_in, d_out, r, [T] * S, list(range(S)), S, device=device,
                                          dtype=dtype, grad=True)))
            for B in decode_batches:
                cases.append((f"decode_b{B}", Case(shape, d_in, d_out, r, [1] * B, list(range(B)), B,
                                                   device=device, dtype=dtype)))
        for nseg in (2, 4):
            r = 16 if not quick else 8
            S, T = prefill
            ids = [list(range(i * nseg, (i + 1) * nseg)) for i in range(S)]
            cases.append((f"prefill_comp{nseg}", Case(shape, d_in, d_out, r, [T] * S, ids, S * nseg,
                                                      device=device, dtype=dtype)))
            ids = [list(range(i * nseg, (i + 1) * nseg)) for i in range(comp_batch)]
            cases.append((f"decode_comp{nseg}_b{comp_batch}",
                          Case(shape, d_in, d_out, r, [1] * comp_batch, ids, comp_batch * nseg, device=device,
                               dtype=dtype)))
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        def tqdm(it, **_):
            return it
    for mode, c in tqdm(cases, desc="lora sweep"):
        rows += run_forward(c, mode, pk, quick, with_cuda)
        if mode == "prefill":
            rows += run_backward(c, pk, quick)
        del c
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows, pk


def summarize(rows, copy_bw):
    """The issue's targets, one line each (numbers from this run)."""
    out = []

    def get(case, backend, shape, r):
        return next((x for x in rows if x.get("case") == case and x.get("backend") == backend
                     and x.get("shape") == shape and x.get("r") == r and "ms" in x), None)

    shapes = sorted({x["shape"] for x in rows if "shape" in x})
    for shape in shapes:
        r = 16 if any(x.get("r") == 16 for x in rows) else 8
        f, b = get("prefill", "f2l", shape, r), get("prefill", "base", shape, r)
        if f and b:
            out.append(f"{shape} r={r} prefill: f2l/base = {f['ms'] / b['ms']:.3f}x (target <= 1.10x)")
        dec = [x for x in rows if x.get("case") == "decode_b64" and x.get("shape") == shape and x.get("r") == r
               and x.get("backend") in ("f2l", "f2l_cuda") and "ms" in x]
        for d in dec:
            frac = d["gbps"] / (copy_bw if copy_bw == copy_bw else d["gbps"])
            out.append(f"{shape} r={r} decode b64 [{d['backend']}]: {d['gbps']:.0f} GB/s on the floor bytes = "
                       f"{100 * d['gbps'] / peaks().get('hbm_gbps', float('nan')):.0f}% of nominal HBM, "
                       f"{100 * frac:.0f}% of measured copy bandwidth (target >= 70%)")
        bf = get("backward", "f2l", shape, r)
        be = get("backward", "einsum", shape, r)
        bp = get("backward", "per_token", shape, r)
        if bf:
            line = f"{shape} r={r} backward: bwd/fwd = {bf['bwd_over_fwd']:.2f} (target <= 2)"
            if be:
                line += f"; fwd+bwd vs einsum autograd {be['ms_fwd_bwd'] / bf['ms_fwd_bwd']:.2f}x (target >= 1.5x)"
            if bp and bf.get("peak_mib", 0) > 0:
                line += f"; peak memory vs per-token copies {bp['peak_mib'] / bf['peak_mib']:.1f}x less (target >= 5x)"
            out.append(line)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes, few repetitions (runs on CPU)")
    ap.add_argument("--name", default=None, help="results file stem (default lora_sweep / lora_sweep_quick)")
    args = ap.parse_args(argv)
    name = args.name or ("lora_sweep_quick" if args.quick else "lora_sweep")
    rows, pk = sweep(args.quick)
    env = bench_env()
    copy_bw = copy_bandwidth_gbps()
    env["measured_copy_gbps"] = copy_bw
    summary = summarize(rows, copy_bw)
    env["targets"] = summary
    jpath, cpath = write_results(name, rows, env)
    pngs = []
    ok = [r for r in rows if "ms" in r and r["ms"] == r["ms"]]
    for shape in sorted({r["shape"] for r in ok}):
        sel = [r for r in ok if r["shape"] == shape]
        r16 = 16 if any(r["r"] == 16 for r in sel) else 8
        dec = [dict(r, batch=r["seqs"]) for r in sel if r["case"].startswith("decode_b") and r["r"] == r16]
        if dec:
            pngs.append(plot_lines(os.path.join(RESULTS_DIR, f"{name}_{shape}_decode.png"), dec, x="batch", y="ms",
                                   series="backend", title=f"decode, {shape}, r={r16} (distinct adapters)",
                                   logx=True, logy=True, xlabel="sequences (one token each)", ylabel="ms"))
        pre = [r for r in sel if r["case"] == "prefill"]
        if pre:
            pngs.append(plot_lines(os.path.join(RESULTS_DIR, f"{name}_{shape}_prefill.png"), pre, x="r", y="ms",
                                   series="backend", title=f"prefill forward, {shape}, {pre[0]['rows']} rows",
                                   logy=True, xlabel="rank", ylabel="ms"))
        bwd = [r for r in sel if r["case"] == "backward"]
        if bwd:
            pngs.append(plot_lines(os.path.join(RESULTS_DIR, f"{name}_{shape}_backward.png"), bwd, x="r",
                                   y="ms_fwd_bwd", series="backend", title=f"forward+backward, {shape}",
                                   logy=True, xlabel="rank", ylabel="ms"))
    print(f"wrote {jpath}\n      {cpath}")
    for p in pngs:
        print(f"      {p}")
    print("targets (this run):")
    for line in summary:
        print("  " + line)
    if not torch.cuda.is_available():
        print("  (CPU run: the f2l rows use the reference backend; the targets are for an H100)")


if __name__ == "__main__":
    main()
