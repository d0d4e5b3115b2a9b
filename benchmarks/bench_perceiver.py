"""pytest-benchmark suite for ``perceiver_attention`` (the official encoder block).

    pytest benchmarks/bench_perceiver.py --benchmark-enable                 # GPU
    pytest benchmarks/bench_perceiver.py --benchmark-enable -k "cpu"        # tiny CPU smoke

Cases: 12, 64, 256 and 1,024 frames x 64 tokens x 32 layers (one video), forward and
backward, for the fused Triton path and the baselines of ``sweep_perceiver.py`` (which
also writes the result files and plots). ``extra_info`` carries the bytes floor and the
achieved fraction of it, so ``--benchmark-json`` output is self-describing.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import sweep_perceiver as sp  # noqa: E402  (sets TRITON_INTERPRET on CPU-only machines)
from _common import peaks, sync  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
FRAMES = (12, 64, 256, 1024)


def _run(benchmark, backend, shape, lens, dtype, device, *, backward):
    fn, leaves = sp.build(backend, shape, lens, dtype, device, grad=backward)
    if backward:
        out = fn()
        g = torch.randn_like(out)
        leaves = [t for t in leaves if t.requires_grad]

        def step():
            torch.autograd.grad(out, leaves, g, retain_graph=True)
            sync()
    else:
        def step():
            with torch.no_grad():
                fn()
            sync()
    step()
    benchmark.pedantic(step, rounds=20 if HAS_CUDA else 3, iterations=1, warmup_rounds=2 if HAS_CUDA else 0)
    nbytes = sp.floor_bytes(shape, lens, torch.tensor([], dtype=dtype).element_size())
    benchmark.extra_info.update({"floor_bytes": nbytes, "rows": sum(lens), "seqs": len(lens)})
    hbm = peaks()["hbm_gbps"]
    if benchmark.stats is not None and hbm == hbm:
        median_s = benchmark.stats.stats.median
        benchmark.extra_info["frac_of_floor"] = nbytes / (hbm * 1e9) / median_s


@gpu
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
@pytest.mark.parametrize("backend", ["triton", "reference", "sdpa_padded", "flash_varlen"])
@pytest.mark.parametrize("frames", FRAMES, ids=[f"{f}f" for f in FRAMES])
def test_official_block(benchmark, frames, backend, backward):
    if backend == "flash_varlen" and (backward or not sp.has_flash_attn()):
        pytest.skip("flash-attn not installed (forward baseline only)")
    lens = sp.seq_lens(sp.OFFICIAL, frames, 1, False)
    try:
        _run(benchmark, backend, sp.OFFICIAL, lens, torch.bfloat16, torch.device("cuda"), backward=backward)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        pytest.skip(f"{backend} ran out of memory at {frames} frames")


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
@pytest.mark.parametrize("backend", ["triton", "reference", "sdpa_padded"])
def test_cpu_tiny(benchmark, backend, backward):
    """Smoke case on tiny shapes (the Triton path runs interpreted): proves the suite runs."""
    lens = sp.seq_lens(sp.QUICK, 2, 1, False)
    device = torch.device("cuda" if HAS_CUDA else "cpu")
    _run(benchmark, backend, sp.QUICK, lens, torch.float32, device, backward=backward)
