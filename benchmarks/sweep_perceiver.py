"""Sweep of ``perceiver_attention``: the official cross-attention block over stacked layer states.

Workload: one Frames2LoRA encoder block (8 latents, 16 heads x 128, 4 KV heads, Dc = 512,
the 8 latents' own keys/values appended) over ``L·B`` sequences -- every layer of every
video is a sequence of ``frames x 64`` context rows, L = 32 -- for 12, 64, 256 and 1,024
frames. Backends, in the same run:

* ``triton``      -- the fused kernel (context K/V never formed, each row read once);
* ``reference``   -- ``f2l_kernels.perceiver.reference``: RMSNorm -> projections -> SDPA
                     per sequence;
* ``sdpa_padded`` -- the authors' formulation: padded batch, K/V projections of the padded
                     context, concat(context, latents), masked SDPA (the padding itself is
                     built once outside the timed region, as it is shared by 9 blocks);
* ``flash_varlen``-- projections of the packed rows + flash-attn's varlen kernel (only when
                     ``flash_attn`` is installed).

Per row: ``ms`` (median), ``gbps`` (the floor bytes over the time), ``floor_ms`` (the bytes
floor -- the context read once, plus queries, weights and output -- at nominal HBM
bandwidth), ``frac_of_floor`` (floor_ms / ms), ``frac_of_copy`` (against the copy
bandwidth measured in this run), ``tflops`` (flops of the standard formulation, the same
count for every backend), ``extra_mb`` (peak memory above inputs), the backward's ``ms``
and ``bwd_over_fwd`` for the differentiable backends, ``speedup`` over ``sdpa_padded`` and
``speedup_vs_reference`` over ``reference`` (both are "projections + SDPA"), and for the
fused path its own design counts (``design_bytes``/``design_flops``, backward
``bwd_design_bytes``/``bwd_design_flops``, see :func:`fused_bytes`) with ``bwd_floor_ms``,
``bwd_frac_of_floor`` and ``bwd_tflops``.

    python benchmarks/sweep_perceiver.py                 # H100: the official sweep
    python benchmarks/sweep_perceiver.py --quick         # tiny shapes on CPU (interpreter)
    python benchmarks/sweep_perceiver.py --batch 4 --ragged   # several videos, mixed lengths

Writes ``benchmarks/results/perceiver[_quick].json|csv`` and ``perceiver[_quick]_*.png``.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict, dataclass

import torch

if not torch.cuda.is_available():
    # The Triton path on CPU exists only under the interpreter (tiny shapes, --quick).
    os.environ.setdefault("TRITON_INTERPRET", "1")

HERE = os.path.dirname(os.path.abspath(__file__))
for p in (HERE, os.path.dirname(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

from _common import bench_env, copy_bandwidth_gbps, peaks, plot_lines, time_fn, write_results  # noqa: E402
from f2l_kernels import perceiver_attention  # noqa: E402
from f2l_kernels.perceiver.reference import rms_norm_ref  # noqa: E402

BACKENDS = ("triton", "reference", "sdpa_padded", "flash_varlen")


@dataclass(frozen=True)
class Shape:
    M: int = 8            # latent queries
    Mp: int = 8           # latent keys/values appended per sequence (the latents themselves)
    H: int = 16
    Hkv: int = 4
    Dh: int = 128
    Dc: int = 512
    L: int = 32           # layers: sequences per video
    tokens_per_frame: int = 64


OFFICIAL = Shape()
QUICK = Shape(M=2, Mp=2, H=4, Hkv=2, Dh=8, Dc=24, L=2, tokens_per_frame=4)


def has_flash_attn() -> bool:
    try:
        import flash_attn  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


def seq_lens(shape: Shape, frames: int, batch: int, ragged: bool) -> list[int]:
    """Rows per sequence, layer-major over videos; ``ragged`` halves each next video."""
    per_video = [max(1, frames // (2 ** b if ragged else 1)) * shape.tokens_per_frame for b in range(batch)]
    return [n for _ in range(shape.L) for n in per_video]


def make_inputs(shape: Shape, lens: list[int], dtype, device, *, requires_grad=False, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    S, N = len(lens), sum(lens)

    def rnd(*size, scale=1.0):
        t = (torch.randn(*size, generator=g) * scale).to(device=device, dtype=dtype)
        return t.requires_grad_(requires_grad)

    cu = torch.zeros(S + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lens), 0)
    return {
        "q": rnd(S, shape.M, shape.H, shape.Dh),
        "ctx": rnd(N, shape.Dc),
        "cu_seqlens": cu.to(device),
        "k_weight": rnd(shape.Hkv * shape.Dh, shape.Dc, scale=0.02),
        "v_weight": rnd(shape.Hkv * shape.Dh, shape.Dc, scale=0.02),
        "norm_weight": (1.0 + 0.1 * torch.randn(shape.Dc, generator=g)).to(device=device, dtype=dtype)
        .requires_grad_(requires_grad),
        "latent_k": rnd(S, shape.Mp, shape.Hkv, shape.Dh),
        "latent_v": rnd(S, shape.Mp, shape.Hkv, shape.Dh),
    }


def floor_bytes(shape: Shape, lens: list[int], elt: int) -> int:
    """Bytes that must move once: context, queries, latent K/V, weights, output."""
    S, N = len(lens), sum(lens)
    ctx = N * shape.Dc
    q_out = 2 * S * shape.M * shape.H * shape.Dh
    lat = 2 * S * shape.Mp * shape.Hkv * shape.Dh
    w = 2 * shape.Hkv * shape.Dh * shape.Dc + shape.Dc
    return elt * (ctx + q_out + lat + w)


def fused_bytes(shape: Shape, lens: list[int], elt: int, *, backward: bool = False) -> int:
    """HBM bytes the fused kernels move by design (the absorbed core; the tiny absorb and
    output-projection einsums are left out). Forward: the context once, the absorbed
    queries q̃ [S, H·M, Dc] in, ``a`` fp32 out. Backward (ds, dx, dq̃ passes): the context
    three times, G = [ds·r | p·r] [N, 2·H·M] written once and read 1.5 times, dctx
    written, 4 bytes per row of coefficients, q̃ and dA in twice, dq̃ fp32 out. The passes
    re-read q̃/dA once per 64 context rows from L2 (4x the context's bytes at H·M = 128,
    Dc = 512), which this HBM count leaves out."""
    S, N = len(lens), sum(lens)
    HM, Dc = shape.H * shape.M, shape.Dc
    if not backward:
        return N * Dc * elt + S * HM * Dc * (elt + 4)
    rows = N * (3 * Dc * elt + Dc * elt + int(2.5 * 2 * HM * elt) + 4)
    return rows + S * HM * Dc * (4 * elt + 4)


def fused_flops(shape: Shape, lens: list[int], *, backward: bool = False) -> float:
    """Flops of the fused core: 4·H·M·Dc per context row forward, 10·H·M·Dc backward."""
    return float((10 if backward else 4) * shape.H * shape.M * shape.Dc * sum(lens))


def standard_flops(shape: Shape, lens: list[int]) -> float:
    """Forward flops of projections + attention (what every backend computes, in effect)."""
    S, N = len(lens), sum(lens)
    proj = 2 * 2 * N * shape.Dc * shape.Hkv * shape.Dh
    attn = 2 * 2 * shape.H * shape.M * shape.Dh * (N + S * shape.Mp)
    return float(proj + attn)


# ------------------------------------------------------------------------------ backends


def fused_fn(inp, backend):
    def run():
        return perceiver_attention(
            inp["q"], inp["ctx"], inp["cu_seqlens"], inp["k_weight"], inp["v_weight"],
            norm_weight=inp["norm_weight"], latent_k=inp["latent_k"], latent_v=inp["latent_v"], backend=backend,
        )
    return run


def padded_fn(inp, shape: Shape, lens: list[int]):
    """The authors' formulation on a padded batch; padding prepared here, outside timing."""
    S, T = len(lens), max(lens)
    idx = torch.cat([torch.arange(n) + s * T for s, n in enumerate(lens)]).to(inp["ctx"].device)
    ctx_pad = inp["ctx"].new_zeros(S * T, shape.Dc)
    ctx_pad[idx] = inp["ctx"].detach()
    ctx_pad = ctx_pad.view(S, T, shape.Dc).requires_grad_(inp["ctx"].requires_grad)
    keep = torch.zeros(S, T + shape.Mp, dtype=torch.bool, device=ctx_pad.device)
    keep.view(-1)[torch.cat([torch.arange(n) + s * (T + shape.Mp) for s, n in enumerate(lens)]).to(keep.device)] = True
    keep[:, T:] = True
    mask = keep[:, None, None, :]
    rep = shape.H // shape.Hkv

    def run():
        n = (rms_norm_ref(ctx_pad, inp["norm_weight"], 1e-6)).to(ctx_pad.dtype)
        k = (n @ inp["k_weight"].t()).view(S, T, shape.Hkv, shape.Dh)
        v = (n @ inp["v_weight"].t()).view(S, T, shape.Hkv, shape.Dh)
        k = torch.cat([k, inp["latent_k"]], 1).transpose(1, 2)
        v = torch.cat([v, inp["latent_v"]], 1).transpose(1, 2)
        q = inp["q"].transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                           attn_mask=mask)
        return o.transpose(1, 2)
    return run, ctx_pad


def flash_varlen_fn(inp, shape: Shape, lens: list[int]):
    from flash_attn import flash_attn_varlen_func

    dev = inp["ctx"].device
    S, Mp = len(lens), shape.Mp
    # Where each context row and each latent key lands in the packed [N + S·M'] key buffer.
    starts = torch.tensor([0] + lens[:-1]).cumsum(0)
    ctx_pos = torch.cat([torch.arange(n) + int(starts[s]) + s * Mp for s, n in enumerate(lens)]).to(dev)
    lat_pos = torch.cat([torch.arange(Mp) + int(starts[s]) + lens[s] + s * Mp for s in range(S)]).to(dev)
    cu_k = torch.tensor([0] + [n + Mp for n in lens]).cumsum(0).to(dev, torch.int32)
    cu_q = (torch.arange(S + 1) * shape.M).to(dev, torch.int32)
    total = sum(lens) + S * Mp

    def run():
        n = rms_norm_ref(inp["ctx"], inp["norm_weight"], 1e-6).to(inp["ctx"].dtype)
        k = inp["ctx"].new_empty(total, shape.Hkv, shape.Dh)
        v = inp["ctx"].new_empty(total, shape.Hkv, shape.Dh)
        k[ctx_pos] = (n @ inp["k_weight"].t()).view(-1, shape.Hkv, shape.Dh)
        v[ctx_pos] = (n @ inp["v_weight"].t()).view(-1, shape.Hkv, shape.Dh)
        k[lat_pos] = inp["latent_k"].reshape(-1, shape.Hkv, shape.Dh)
        v[lat_pos] = inp["latent_v"].reshape(-1, shape.Hkv, shape.Dh)
        q = inp["q"].reshape(S * shape.M, shape.H, shape.Dh)
        o = flash_attn_varlen_func(q, k, v, cu_q, cu_k, shape.M, max(lens) + Mp)
        return o.view(S, shape.M, shape.H, shape.Dh)
    return run


def build(backend: str, shape: Shape, lens: list[int], dtype, device, *, grad: bool):
    inp = make_inputs(shape, lens, dtype, device, requires_grad=grad)
    leaves = [inp[k] for k in ("q", "ctx", "k_weight", "v_weight", "norm_weight", "latent_k", "latent_v")]
    if backend in ("triton", "reference"):
        return fused_fn(inp, backend), leaves
    if backend == "sdpa_padded":
        fn, ctx_pad = padded_fn(inp, shape, lens)
        return fn, [ctx_pad if t is inp["ctx"] else t for t in leaves]
    if backend == "flash_varlen":
        return flash_varlen_fn(inp, shape, lens), leaves
    raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")


def available_backends(quick: bool) -> list[str]:
    out = ["triton", "reference", "sdpa_padded"]
    if has_flash_attn() and not quick:
        out.append("flash_varlen")
    return out


# ------------------------------------------------------------------------------ measure


def measure(backend, shape, lens, dtype, device, *, backward: bool, rep: int) -> dict:
    row: dict = {}
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    fn, leaves = build(backend, shape, lens, dtype, device, grad=False)
    with torch.no_grad():
        fn()
        if cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            row["extra_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        row["ms"] = time_fn(fn, rep=rep)
    del fn, leaves
    if backward and backend != "flash_varlen":
        fn, leaves = build(backend, shape, lens, dtype, device, grad=True)
        out = fn()
        g = torch.randn_like(out)
        leaves = [t for t in leaves if t.requires_grad]
        row["bwd_ms"] = time_fn(lambda: torch.autograd.grad(out, leaves, g, retain_graph=True), rep=rep)
        row["bwd_over_fwd"] = row["bwd_ms"] / row["ms"]
        del fn, leaves, out, g
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes on CPU (interpreter), seconds")
    ap.add_argument("--frames", type=int, nargs="*", default=None, help="frames per video (default 12 64 256 1024)")
    ap.add_argument("--batch", type=int, default=1, help="videos per call (sequences = 32 layers x batch)")
    ap.add_argument("--ragged", action="store_true", help="video b has frames / 2**b (padding waste)")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    ap.add_argument("--backends", nargs="*", default=None, help=f"subset of {BACKENDS}")
    ap.add_argument("--no-backward", action="store_true")
    ap.add_argument("--split-rows", type=int, default=None,
                    help="force the rows per work item of the fused kernel (default: its own policy)")
    ap.add_argument("--rep", type=int, default=100, help="timing repetitions (ms budget for do_bench)")
    args = ap.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.split_rows is not None:
        import f2l_kernels.perceiver.triton as ptri

        ptri.FORCE_SPLIT_ROWS = args.split_rows
    if device.type == "cpu" and not args.quick:
        ap.error("no GPU here: the official sweep needs CUDA; use --quick for tiny CPU shapes")
    shape = QUICK if args.quick else OFFICIAL
    frames = args.frames or ([1, 4] if args.quick else [12, 64, 256, 1024])
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    backends = args.backends or available_backends(args.quick)
    elt = torch.tensor([], dtype=dtype).element_size()
    pk = peaks()
    copy_gbps = copy_bandwidth_gbps()
    env = bench_env() | {"copy_gbps": copy_gbps, "shape": asdict(shape), "dtype": args.dtype,
                         "batch": args.batch, "ragged": args.ragged, "split_rows": args.split_rows}

    rows = []
    jobs = [(f, b) for f in frames for b in backends]
    for f, backend in tqdm(jobs, desc="perceiver sweep"):
        lens = seq_lens(shape, f, args.batch, args.ragged)
        nbytes = floor_bytes(shape, lens, elt)
        row = {"op": "perceiver_attention", "case": f"{f}f_x{args.batch}{'_ragged' if args.ragged else ''}",
               "backend": backend, "frames": f, "seqs": len(lens), "rows_per_seq": max(lens),
               "rows": sum(lens), "dtype": args.dtype, "floor_bytes": nbytes}
        try:
            row |= measure(backend, shape, lens, dtype, device, backward=not args.no_backward,
                           rep=3 if args.quick else args.rep)
        except torch.cuda.OutOfMemoryError as e:  # the padded baselines at 1,024 frames
            row["error"] = f"out of memory: {str(e).splitlines()[0]}"
            torch.cuda.empty_cache()
        row["design_bytes"] = fused_bytes(shape, lens, elt)
        row["bwd_design_bytes"] = fused_bytes(shape, lens, elt, backward=True)
        row["design_flops"] = fused_flops(shape, lens)
        row["bwd_design_flops"] = fused_flops(shape, lens, backward=True)
        if "ms" in row:
            s = row["ms"] * 1e-3
            row["gbps"] = nbytes / s / 1e9
            row["tflops"] = standard_flops(shape, lens) / s / 1e12
            row["floor_ms"] = nbytes / (pk["hbm_gbps"] * 1e9) * 1e3
            row["frac_of_floor"] = row["floor_ms"] / row["ms"]
            row["frac_of_copy"] = row["gbps"] / copy_gbps if copy_gbps == copy_gbps else float("nan")
            if backend == "triton" and "bwd_ms" in row:
                # The fused backward against its own design bytes at nominal bandwidth.
                row["bwd_floor_ms"] = row["bwd_design_bytes"] / (pk["hbm_gbps"] * 1e9) * 1e3
                row["bwd_frac_of_floor"] = row["bwd_floor_ms"] / row["bwd_ms"]
                row["bwd_tflops"] = row["bwd_design_flops"] / (row["bwd_ms"] * 1e-3) / 1e12
        rows.append(row)

    for key, ref in (("speedup", "sdpa_padded"), ("speedup_vs_reference", "reference")):
        base = {r["frames"]: r.get("ms") for r in rows if r["backend"] == ref}
        for r in rows:
            if r.get("ms") and base.get(r["frames"]):
                r[key] = base[r["frames"]] / r["ms"]

    name = "perceiver_quick" if args.quick else f"perceiver{'_ragged' if args.ragged else ''}"
    jpath, cpath = write_results(name, rows, env)
    title = (f"perceiver_attention, M={shape.M} H={shape.H}x{shape.Dh} Hkv={shape.Hkv} Dc={shape.Dc}, "
             f"L={shape.L} x B={args.batch}, {args.dtype}, {env['device']}")
    out_png = os.path.dirname(jpath)
    pngs = [
        plot_lines(os.path.join(out_png, f"{name}_ms.png"), rows, x="frames", y="ms", series="backend",
                   title=title, logx=True, logy=True, ylabel="forward ms (median)"),
        plot_lines(os.path.join(out_png, f"{name}_speedup.png"), rows, x="frames", y="speedup", series="backend",
                   title=title, logx=True, ylabel="speed-up over padded SDPA (authors)"),
        plot_lines(os.path.join(out_png, f"{name}_frac_of_floor.png"), rows, x="frames", y="frac_of_floor",
                   series="backend", title=title, logx=True, ylabel="bytes floor / time (fraction of HBM)"),
    ]
    if not args.no_backward:
        pngs.append(plot_lines(os.path.join(out_png, f"{name}_bwd_over_fwd.png"), rows, x="frames",
                               y="bwd_over_fwd", series="backend", title=title, logx=True,
                               ylabel="backward ms / forward ms"))
    for r in rows:
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})
    print("wrote", jpath, cpath, *pngs, sep="\n  ")
    return rows


if __name__ == "__main__":
    main()
