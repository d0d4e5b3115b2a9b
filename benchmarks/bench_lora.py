"""pytest-benchmark suite for per-example LoRA (tiny shapes on CPU, real shapes on CUDA).

    python -m pytest benchmarks/bench_lora.py --benchmark-enable            # time it
    python -m pytest benchmarks/bench_lora.py --benchmark-enable -k decode  # one family

Without ``--benchmark-enable`` (the repository default) every case runs once as a smoke
test. The full sweep with floors, baselines and plots is ``benchmarks/sweep_lora.py``.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import sync  # noqa: E402
from benchmarks.sweep_lora import Case, impls  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
SHAPES = {"down_proj_500m": (2560, 960), "down_proj_2.2b": (8192, 2048), "q_proj_500m": (960, 960)} if CUDA \
    else {"tiny_down": (96, 48)}
RANKS = [8, 16, 64] if CUDA else [16]
PREFILL = (8, 1024) if CUDA else (2, 16)
DECODE = [1, 16, 64, 256] if CUDA else [4]
IMPLS = ["base", "f2l", "einsum", "unfused", "per_token"]


def _run(benchmark, fn):
    def call():
        fn()
        sync()

    call()  # compile / autotune outside the timed region
    benchmark(call)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_prefill_forward(benchmark, shape, r, impl):
    d_in, d_out = SHAPES[shape]
    S, T = PREFILL
    c = Case(shape, d_in, d_out, r, [T] * S, list(range(S)), S, device=DEVICE, dtype=DTYPE)
    fn = impls(c, False)[impl]
    benchmark.group = f"prefill {shape} r={r}"
    with torch.no_grad():
        _run(benchmark, lambda: fn(c.x, c.a, c.b))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch", DECODE)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_decode_forward(benchmark, shape, batch, impl):
    d_in, d_out = SHAPES[shape]
    c = Case(shape, d_in, d_out, 16, [1] * batch, list(range(batch)), batch, device=DEVICE, dtype=DTYPE)
    fn = impls(c, False)[impl]
    benchmark.group = f"decode {shape} r=16 batch={batch}"
    with torch.no_grad():
        _run(benchmark, lambda: fn(c.x, c.a, c.b))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("segments", [2, 4])
def test_composition_forward(benchmark, segments, impl):
    shape = next(iter(SHAPES))
    d_in, d_out = SHAPES[shape]
    S, T = PREFILL
    ids = [list(range(i * segments, (i + 1) * segments)) for i in range(S)]
    c = Case(shape, d_in, d_out, 16, [T] * S, ids, S * segments, device=DEVICE, dtype=DTYPE)
    fn = impls(c, False)[impl]
    benchmark.group = f"composition {shape} x{segments}"
    with torch.no_grad():
        _run(benchmark, lambda: fn(c.x, c.a, c.b))


@pytest.mark.parametrize("impl", ["f2l", "einsum", "unfused", "per_token"])
@pytest.mark.parametrize("r", RANKS)
def test_prefill_forward_backward(benchmark, r, impl):
    shape = next(iter(SHAPES))
    d_in, d_out = SHAPES[shape]
    S, T = PREFILL
    c = Case(shape, d_in, d_out, r, [T] * S, list(range(S)), S, device=DEVICE, dtype=DTYPE, grad=True)
    fn = impls(c, False)[impl]
    x, a, b = (t.detach().clone().requires_grad_() for t in (c.x, c.a, c.b))
    benchmark.group = f"forward+backward {shape} r={r}"

    def step():
        x.grad = a.grad = b.grad = None
        fn(x, a, b).backward(c.dy)

    _run(benchmark, step)
