"""Decode-time per-example LoRA: the CUDA kernel (csrc/) against Triton and the reference.

    python benchmarks/bench_lora_decode.py             # full sweep (a CUDA GPU), minutes
    python benchmarks/bench_lora_decode.py --quick     # a few cases, seconds

Sweep: decode batch S in {1, 16, 64, 256, 1024}, rank r in {8, 16, 64}, d_in = d_out = d
in {960, 2048} (SmolVLM2-500M / 2.2B hidden sizes), bf16, every sequence with its own
adapter ("distinct") or all sharing one ("shared"); each backend timed eagerly (one call,
L2 flushed before it) and inside a CUDA graph.

Bytes that must move per call: x, each distinct adapter in use read once (A and B), and
y: ``2 * (S*d + U*r*(d_in + d_out) + S*d)`` in bf16. GB/s is reported against those bytes,
as a fraction of the device-to-device copy bandwidth measured in the same run and of the
nominal HBM peak. The graph rows replay one graph of ``layers`` launches, each layer with
its own x and adapter pool (like a model's layers), after an L2 flush, and report the time
per layer: what one decode step pays per LoRA layer with launch overhead amortised.

Also measured: the host-side cost of one call through each layer of the Python stack
(extension entry point, the custom op wrapper, the public ``lora_delta``), and a
(tiles, cluster) sweep of the CUDA kernel on the issue's target shape.

Writes ``benchmarks/results/lora_decode_cuda.{json,csv}`` and PNG plots, and prints the
issue's targets: batch 64, distinct adapters, r = 16, d = 2048 at >= 80 % of HBM bandwidth
and <= 5 us per layer inside a CUDA graph; faster than the Triton decode path at every
batch <= 256.
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
for _p in (HERE, os.path.dirname(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from _common import RESULTS_DIR, bench_env, copy_bandwidth_gbps, plot_lines, time_fn, write_results  # noqa: E402

NAME = "lora_decode_cuda"
BATCHES = (1, 16, 64, 256, 1024)
RANKS = (8, 16, 64)
DIMS = (960, 2048)
MODES = ("distinct", "shared")
TARGET = dict(batch=64, rank=16, d=2048, adapters="distinct")
LAYERS_MAX = 32           # layers captured in one graph
ROTATION_BYTES = 4 << 30  # cap on the memory the rotated layers may take


def _tqdm(it, **kw):
    try:
        from tqdm import tqdm

        return tqdm(it, **kw)
    except Exception:
        return it


def must_move_bytes(S: int, r: int, d_in: int, d_out: int, distinct_adapters: int, elt: int = 2) -> int:
    """x, every distinct adapter in use once (A and B), y."""
    return elt * (S * d_in + distinct_adapters * r * (d_in + d_out) + S * d_out)


class Layers:
    """``n`` independent layers (x, A, B) sharing one decode batch."""

    def __init__(self, S, r, d, mode, n, dtype, device):
        from f2l_kernels.lora import LoraBatch

        P = S if mode == "distinct" else 1
        self.P = P
        ids = list(range(S)) if mode == "distinct" else [0] * S
        # A permutation keeps every pool slot in use but not in sequence order, as in serving.
        if mode == "distinct" and S > 1:
            perm = torch.randperm(S).tolist()
            ids = [perm[i] for i in range(S)]
        self.batch = LoraBatch.build([1] * S, ids, device=device)
        self.x = [torch.randn(S, d, device=device, dtype=dtype) for _ in range(n)]
        self.a = [(torch.randn(P, r, d, device=device) / math.sqrt(d)).to(dtype) for _ in range(n)]
        self.b = [torch.randn(P, d, r, device=device, dtype=dtype) for _ in range(n)]
        self.scale = 2.0 * r ** 1.5
        self.n = n


def backends(have_cuda: bool):
    from f2l_kernels.lora import lora_delta

    def mk(name):
        return lambda L, i: lora_delta(L.x[i], L.a[i], L.b[i], L.batch, L.scale, backend=name)

    out = {"triton": mk("triton"), "reference": mk("reference")}
    if have_cuda:
        out = {"cuda": mk("cuda"), **out}
    return out


def time_graph(fn, L: Layers, rep: int) -> float | None:
    """ms per layer: one graph over all L.n layers, replayed after an L2 flush."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(L.n):
            fn(L, i)  # warm-up: autotuning, lazy caches, module loading
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(L.n):
            fn(L, i)
    ms = time_fn(g.replay, warmup=5, rep=rep)
    del g
    return ms / L.n


def host_overhead_us(fn, n: int = 200) -> float:
    """Host wall-clock per call of back-to-back calls (the GPU is not the bottleneck)."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


def run(args) -> dict:
    from f2l_kernels.lora import cuda as lcuda
    from f2l_kernels.lora.reference import lora_delta_ref

    dev = torch.device("cuda")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    elt = torch.finfo(dtype).bits // 8
    have_cuda = lcuda.available()
    if not have_cuda:
        print(f"note: the CUDA extension is not available ({lcuda.unavailable_reason()}); "
              "timing the Triton and reference baselines only", file=sys.stderr)
    env = bench_env()
    copy_bw = copy_bandwidth_gbps()
    env["copy_gbps"] = copy_bw
    env["dtype"] = args.dtype
    env["sms"] = torch.cuda.get_device_properties(dev).multi_processor_count
    peak = env.get("peak_hbm_gbps", float("nan"))
    impls = backends(have_cuda)

    batches = (1, 64, 256) if args.quick else BATCHES
    ranks = (16,) if args.quick else RANKS
    dims = (2048,) if args.quick else DIMS
    rep = 20 if args.quick else 100
    cases = [(S, r, d, m) for m in MODES for d in dims for r in ranks for S in batches]
    rows: list[dict] = []
    for S, r, d, mode in _tqdm(cases, desc="lora decode"):
        U = S if mode == "distinct" else 1
        nbytes = must_move_bytes(S, r, d, d, U, elt)
        n = max(1, min(LAYERS_MAX, ROTATION_BYTES // max(1, nbytes)))
        try:
            L = Layers(S, r, d, mode, n, dtype, dev)
        except torch.cuda.OutOfMemoryError:
            print(f"skip S={S} r={r} d={d} {mode}: out of memory", file=sys.stderr)
            continue
        want = lora_delta_ref(L.x[0], L.a[0], L.b[0], L.batch, L.scale)
        common = dict(op="lora_delta_decode", batch=S, rank=r, d=d, adapters=mode, dtype=args.dtype,
                      bytes=nbytes, layers=n, floor_ms=nbytes / (peak * 1e9) * 1e3 if peak == peak else None)
        for name, fn in impls.items():
            err = (fn(L, 0).float() - want).abs().max().item()
            for how in ("eager", "graph"):
                try:
                    ms = time_fn(lambda fn=fn, L=L: fn(L, 0), warmup=5, rep=rep) if how == "eager" else time_graph(fn, L, rep)
                except Exception as e:  # a path that cannot be captured still gets its eager row
                    print(f"{name} {how} S={S} r={r} d={d}: {type(e).__name__}: {e}", file=sys.stderr)
                    ms = None
                row = dict(common, case=f"S{S}-r{r}-d{d}-{mode}", backend=name, mode=how, ms=ms,
                           max_err_vs_ref=err)
                if ms:
                    gbps = nbytes / (ms * 1e-3) / 1e9
                    row.update(us=ms * 1e3, gbps=gbps, frac_of_copy_bw=gbps / copy_bw, frac_of_peak=gbps / peak,
                               frac_of_floor=(common["floor_ms"] / ms) if common["floor_ms"] else None)
                rows.append(row)
        del L, want
        gc.collect()
        torch.cuda.empty_cache()

    # speed-ups over the baselines, per (case, mode)
    by = {(r_["case"], r_["mode"], r_["backend"]): r_ for r_ in rows}
    for r_ in rows:
        if r_["backend"] == "cuda" and r_.get("ms"):
            for base in ("triton", "reference"):
                b = by.get((r_["case"], r_["mode"], base))
                if b and b.get("ms"):
                    r_[f"speedup_vs_{base}"] = b["ms"] / r_["ms"]

    if have_cuda:
        rows += tiles_sweep(dtype, rep, copy_bw, peak, elt)
        rows += dispatch_overhead(dtype)
    return {"env": env, "rows": rows}


def tiles_sweep(dtype, rep, copy_bw, peak, elt) -> list[dict]:
    """(tiles, cluster) of the CUDA kernel on the target shape at several batches, in a graph."""
    from f2l_kernels.lora import cuda as lcuda

    dev = torch.device("cuda")
    major = torch.cuda.get_device_capability()[0]
    r, d = TARGET["rank"], TARGET["d"]
    rows = []
    for S in (1, 16, 64, 256):
        nbytes = must_move_bytes(S, r, d, d, S, elt)
        L = Layers(S, r, d, "distinct", max(1, min(LAYERS_MAX, ROTATION_BYTES // nbytes)), dtype, dev)
        auto = lcuda.launch_config(S, d, dev)
        for tiles in (1, 2, 4, 8, 16, 32):
            for cluster in ((1, 2, 4, 8) if major >= 9 else (1,)):
                if tiles % cluster:
                    continue

                def fn(L_, i, t=tiles, c=cluster):
                    return lcuda.lora_delta_decode(L_.x[i], L_.a[i], L_.b[i], L_.batch, L_.scale, tiles=t, cluster=c)

                ms = time_graph(fn, L, rep)
                gbps = nbytes / (ms * 1e-3) / 1e9
                rows.append(dict(op="lora_delta_decode", case=f"S{S}-r{r}-d{d}-distinct", backend="cuda",
                                 mode="graph-tiles", batch=S, rank=r, d=d, adapters="distinct", tiles=tiles,
                                 cluster=cluster, is_auto=(tiles, cluster) == auto, ms=ms, us=ms * 1e3,
                                 bytes=nbytes, gbps=gbps, frac_of_copy_bw=gbps / copy_bw, frac_of_peak=gbps / peak))
        del L
        torch.cuda.empty_cache()
    return rows


def dispatch_overhead(dtype) -> list[dict]:
    """Host microseconds per call through each layer of the stack (S = 64, r = 16, d = 2048)."""
    from f2l_kernels.lora import cuda as lcuda
    from f2l_kernels.lora import lora_delta

    dev = torch.device("cuda")
    S, r, d = TARGET["batch"], TARGET["rank"], TARGET["d"]
    L = Layers(S, r, d, "distinct", 1, dtype, dev)
    x, a, b, batch = L.x[0], L.a[0], L.b[0], L.batch
    out = torch.empty(S, d, device=dev, dtype=dtype)
    tiles, cluster = lcuda.launch_config(S, d, dev)
    ext = lcuda._extension()
    calls = {
        "extension": lambda: ext.lora_delta_decode_out(x, a, b, batch.adapter_ptr, batch.adapter_idx,
                                                       batch.adapter_weight, None, None, L.scale, out, False,
                                                       batch.max_adapters_per_seq, tiles, cluster),
        "custom_op": lambda: torch.ops.f2l.lora_delta_decode_into(
            x, a, b, batch.adapter_ptr, batch.adapter_idx, batch.adapter_weight, None, None, L.scale, out, False,
            batch.max_adapters_per_seq, tiles, cluster),
        "lora_delta_decode": lambda: lcuda.lora_delta_decode(x, a, b, batch, L.scale, out=out),
        "lora_delta(cuda)": lambda: lora_delta(x, a, b, batch, L.scale, backend="cuda"),
        "lora_delta(triton)": lambda: lora_delta(x, a, b, batch, L.scale, backend="triton"),
    }
    return [dict(op="lora_delta_decode", case=f"S{S}-r{r}-d{d}-distinct", backend=k, mode="host",
                 batch=S, rank=r, d=d, host_us_per_call=host_overhead_us(fn)) for k, fn in calls.items()]


def report(res: dict) -> dict:
    rows, env = res["rows"], res["env"]
    main = [r for r in rows if r.get("mode") in ("eager", "graph") and r.get("ms")]

    def pick(backend, mode, **kw):
        return [r for r in main if r["backend"] == backend and r["mode"] == mode
                and all(r.get(k) == v for k, v in kw.items())]

    print(f"\n{env['device']}: copy bandwidth {env['copy_gbps']:.0f} GB/s, nominal HBM "
          f"{env.get('peak_hbm_gbps', float('nan')):.0f} GB/s")
    hdr = (f"{'case':28s} {'mode':6s} {'backend':10s} {'us':>9s} {'GB/s':>8s} {'%copy':>6s} {'%peak':>6s} "
           f"{'x triton':>8s}")
    print(hdr)
    for r in main:
        if r["rank"] == TARGET["rank"] and r["d"] == TARGET["d"]:
            print(f"{r['case']:28s} {r['mode']:6s} {r['backend']:10s} {r['us']:9.2f} {r['gbps']:8.0f} "
                  f"{100 * r['frac_of_copy_bw']:6.1f} {100 * r['frac_of_peak']:6.1f} "
                  f"{r.get('speedup_vs_triton', float('nan')):8.2f}")
    verdict = {}
    t = pick("cuda", "graph", batch=TARGET["batch"], rank=TARGET["rank"], d=TARGET["d"], adapters="distinct")
    if t:
        verdict["target_b64_graph_us"] = t[0]["us"]
        verdict["target_b64_frac_of_peak"] = t[0]["frac_of_peak"]
        verdict["target_b64_frac_of_copy_bw"] = t[0]["frac_of_copy_bw"]
        verdict["target_b64_met"] = t[0]["us"] <= 5.0 and t[0]["frac_of_peak"] >= 0.8
    slower = [f"{r['case']}/{r['mode']}" for r in main if r["backend"] == "cuda" and r["batch"] <= 256
              and r.get("speedup_vs_triton") is not None and r["speedup_vs_triton"] < 1.0]
    if any(r["backend"] == "cuda" for r in main):
        verdict["faster_than_triton_le256"] = not slower
        verdict["slower_than_triton_cases"] = ";".join(slower)
    for k, v in verdict.items():
        print(f"{k}: {v}")
    return verdict


def plots(rows: list[dict], name: str = NAME) -> list[str]:
    paths = []
    for mode in ("graph", "eager"):
        for d in DIMS:
            sel = [dict(r, series=f"{r['backend']} {r['adapters']}") for r in rows if r.get("mode") == mode
                   and r.get("rank") == TARGET["rank"] and r.get("d") == d and r.get("gbps")]
            if not sel:
                continue
            path = os.path.join(RESULTS_DIR, f"{name}_{mode}_r{TARGET['rank']}_d{d}.png")
            paths.append(plot_lines(path, sel, x="batch", y="gbps", series="series", logx=True, logy=True,
                                    title=f"decode LoRA delta, r={TARGET['rank']}, d={d}, {mode} "
                                          "(GB/s on the bytes that must move)",
                                    xlabel="decode batch (sequences)", ylabel="GB/s"))
    sel = [dict(r, series=f"r={r['rank']} d={r['d']} {r['adapters']}") for r in rows
           if r.get("mode") == "graph" and r.get("backend") == "cuda" and r.get("speedup_vs_triton")]
    if sel:
        path = os.path.join(RESULTS_DIR, f"{name}_speedup_vs_triton.png")
        paths.append(plot_lines(path, sel, x="batch", y="speedup_vs_triton", series="series", logx=True,
                                title="CUDA decode kernel over Triton (CUDA graph)", xlabel="decode batch",
                                ylabel="speed-up (x)"))
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few cases only (r=16, d=2048, S in 1/64/256)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_lora_decode.py needs a CUDA GPU: it times the CUDA decode kernel against Triton "
              "and the reference on the device (none found; torch "
              f"{torch.__version__}, CUDA {torch.version.cuda}).", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    res = run(args)
    res["env"].update(report(res))
    name = NAME + ("_quick" if args.quick else "")
    jpath, cpath = write_results(name, res["rows"], res["env"])
    pngs = plots(res["rows"], name)
    print("wrote", jpath, cpath, *pngs, sep="\n  ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
