"""CUDA decode kernel (csrc/): matches the reference and the Triton path on a GPU, replays
bit-exactly inside CUDA graphs, and falls back to Triton with one warning when the
extension is missing. The compile-only checks of csrc/ (nvcc, no GPU) live in
tests/test_csrc_compile.py."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings
from dataclasses import dataclass

import pytest
import torch

import f2l_kernels
from f2l_kernels.lora import LoraBatch, lora_delta, lora_linear
from f2l_kernels.lora import cuda as lcuda
from f2l_kernels.lora.reference import lora_delta_ref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HAS_GPU = torch.cuda.is_available()
HAS_EXT = HAS_GPU and lcuda.available()
needs_ext = pytest.mark.skipif(not HAS_EXT, reason="needs a CUDA GPU and the built f2l CUDA extension "
                               f"({lcuda.unavailable_reason() if HAS_GPU else 'no GPU'})")
CC_MAJOR = torch.cuda.get_device_capability()[0] if HAS_GPU else 0
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DT_ID = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


# ----------------------------------------------------------------------------- (a) setup.py
def _setup_function(name: str):
    """One helper function of setup.py, without running setup()."""
    import ast

    src = open(os.path.join(ROOT, "setup.py")).read()
    fn = next(n for n in ast.parse(src).body if isinstance(n, ast.FunctionDef) and n.name == name)
    ns: dict = {"os": os}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), "setup.py", "exec"), ns)
    return ns[name]


@pytest.mark.parametrize("spec,want", [
    ("80;90", ["80", "90"]), ("8.0 9.0", ["80", "90"]), ("sm_90a,80", ["90a", "80"]), ("90", ["90"]),
], ids=["semicolons", "dotted", "suffix-and-comma", "single"])
def test_setup_arch_flags(spec, want):
    flags = _setup_function("_gencode_flags")(spec)
    sass = [f for f in flags if f.startswith("arch=") and "code=sm_" in f]
    assert sass == [f"arch=compute_{a},code=sm_{a}" for a in want]
    top = max(want, key=lambda a: int(a.rstrip("a")))
    assert flags[-1] == f"arch=compute_{top},code=compute_{top}"  # PTX for newer GPUs
    with pytest.raises(RuntimeError, match="F2L_CUDA_ARCHS"):
        _setup_function("_gencode_flags")("hopper")


def test_setup_default_and_forced(tmp_path):
    """The pure-Python install works without CUDA; F2L_BUILD_CUDA=1 fails loudly when it
    cannot build; F2L_SKIP_CUDA_BUILD=1 wins."""
    def run(**env):
        e = {k: v for k, v in os.environ.items() if not k.startswith("F2L_")}
        e.update(env)
        return subprocess.Popen([sys.executable, "setup.py", "--version"], cwd=ROOT, env=e, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    plain, skip = run(), run(F2L_SKIP_CUDA_BUILD="1", F2L_BUILD_CUDA="1")
    forced = run(F2L_BUILD_CUDA="1") if torch.version.cuda is None else None
    for proc in (plain, skip):
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0 and out.strip().splitlines()[-1] == f2l_kernels.__version__, err[-2000:]
    if forced is not None:
        _, err = forced.communicate(timeout=300)
        assert forced.returncode != 0 and "CPU-only build" in err


# ----------------------------------------------------------------------- CPU-side behaviour
def test_fake_shapes_on_meta():
    x = torch.empty(5, 40, device="meta", dtype=torch.bfloat16)
    a = torch.empty(3, 4, 40, device="meta", dtype=torch.bfloat16)
    b = torch.empty(3, 24, 4, device="meta", dtype=torch.bfloat16)
    ptr = torch.empty(6, device="meta", dtype=torch.int32)
    idx = torch.empty(5, device="meta", dtype=torch.int32)
    w = torch.empty(5, device="meta")
    y = torch.ops.f2l.lora_delta_decode(x, a, b, ptr, idx, w, None, None, 1.0, 1, 1, 1)
    assert y.shape == (5, 24) and y.dtype == torch.bfloat16 and y.device.type == "meta"
    out = torch.empty(5, 24, device="meta", dtype=torch.bfloat16)
    assert torch.ops.f2l.lora_delta_decode_into(x, a, b, ptr, idx, w, None, None, 1.0, out, True, 1, 1, 1) is None


def _small(S=3, P=2, r=4, d_in=16, d_out=12, dtype=torch.float32):
    x = torch.randn(S, d_in, dtype=dtype)
    a = torch.randn(P, r, d_in, dtype=dtype)
    b = torch.randn(P, d_out, r, dtype=dtype)
    return x, a, b, LoraBatch.build([1] * S, [i % P for i in range(S)])


ERROR_CASES = [
    ("x3d", ValueError, "x: expected 2 dims"),
    ("x_int", TypeError, "x: expected dtype"),
    ("a_din", ValueError, "lora_a: expected shape"),
    ("b_rank", ValueError, "lora_b: expected shape"),
    ("b_dtype", TypeError, "lora_b: expected dtype"),
    ("not_batch", TypeError, "batch: expected a LoraBatch"),
    ("prefill", ValueError, "batch: expected a decode batch"),
    ("id_range", ValueError, "out of range"),
    ("scale_str", TypeError, "scale:"),
    ("scale_shape", ValueError, "scale: expected"),
    ("acc_no_out", ValueError, "accumulate"),
    ("out_shape", ValueError, "out: expected shape"),
    ("cpu", ValueError, "x: expected a CUDA tensor"),
]


@pytest.mark.parametrize("mutate,exc,words", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_input_errors_name_the_argument(mutate, exc, words):
    x, a, b, batch = _small()
    kw = {}
    if mutate == "x3d":
        x = x[None]
    elif mutate == "x_int":
        x = x.to(torch.int32)
    elif mutate == "a_din":
        a = a[..., :-1]
    elif mutate == "b_rank":
        b = b[..., :-1]
    elif mutate == "b_dtype":
        b = b.double()
    elif mutate == "not_batch":
        batch = [0, 1, 0]
    elif mutate == "prefill":
        batch = LoraBatch.build([2, 1, 0], [0, 1, 0])
    elif mutate == "id_range":
        batch = LoraBatch.build([1] * 3, [0, 1, 2])
    elif mutate == "scale_str":
        kw["scale"] = "2"
    elif mutate == "scale_shape":
        kw["scale"] = torch.ones(5)
    elif mutate == "acc_no_out":
        kw["accumulate"] = True
    elif mutate == "out_shape":
        kw["out"] = torch.empty(3, 11)
    with pytest.raises(exc, match=words):
        lcuda.lora_delta_decode(x, a, b, batch, **kw)


@pytest.mark.parametrize("sms,major,S,d_out,want", [
    (132, 9, 64, 2048, (4, 4)),
    (132, 9, 1, 2048, (16, 8)),
    (132, 9, 256, 2048, (2, 2)),
    (132, 9, 1024, 960, (1, 1)),
    (108, 8, 64, 2048, (2, 1)),
    (108, 8, 1, 960, (8, 1)),
], ids=["h100-b64", "h100-b1", "h100-b256", "h100-b1024", "a100-b64", "a100-b1-d960"])
def test_launch_config(monkeypatch, sms, major, S, d_out, want):
    monkeypatch.setattr(lcuda, "_device_info", lambda device: (sms, major))
    tiles, cluster = lcuda.launch_config(S, d_out, torch.device("cuda", 0))
    assert (tiles, cluster) == want
    assert tiles % cluster == 0 and cluster in (1, 2, 4, 8)
    monkeypatch.setenv("F2L_CUDA_CLUSTER", "0")
    assert lcuda.launch_config(S, d_out, torch.device("cuda", 0))[1] == 1


# --------------------------------------------------------------- (c) fallback, one warning
@pytest.fixture
def no_extension(monkeypatch):
    """A machine with a GPU but without the built extension."""
    def fail():
        raise ImportError("No module named 'f2l_kernels._C'")

    monkeypatch.setattr(lcuda, "_cuda_present", lambda: True)
    monkeypatch.setattr(lcuda, "_load_extension", fail)
    lcuda._reset_for_tests()
    yield
    monkeypatch.undo()
    lcuda._reset_for_tests()


def test_fallback_to_triton_warns_once(no_extension, device):
    S, P, r, d_in, d_out = 4, 3, 4, 32, 24
    x = torch.randn(S, d_in, device=device)
    a = torch.randn(P, r, d_in, device=device)
    b = torch.randn(P, d_out, r, device=device)
    batch = LoraBatch.build([1] * S, [0, 2, -1, [1, 0]], device=device)
    want = lora_delta_ref(x, a, b, batch, 0.5)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert not lcuda.available()
        for _ in range(3):
            got = lora_delta(x, a, b, batch, 0.5, backend="triton" if device.type == "cpu" else None)
            torch.testing.assert_close(got.float(), want, rtol=1e-4, atol=1e-4)
        assert not lcuda.available()
    ours = [w for w in rec if issubclass(w.category, lcuda.CudaExtensionUnavailableWarning)]
    assert len(ours) == 1, [str(w.message) for w in rec]
    assert "Triton" in str(ours[0].message) and "F2L_BUILD_CUDA" in str(ours[0].message)
    with pytest.raises(RuntimeError, match="not available"):
        lcuda._launch(*([None] * 14))


def test_no_warning_without_gpu(monkeypatch):
    monkeypatch.setattr(lcuda, "_cuda_present", lambda: False)
    lcuda._reset_for_tests()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert not lcuda.available()
            assert lcuda.unavailable_reason() == "no CUDA device"
    finally:
        lcuda._reset_for_tests()


# ---------------------------------------------------------------- (b) GPU parity and graphs
@dataclass
class Case:
    id: str
    d_in: int
    d_out: int
    r_max: int
    P: int
    ids: list
    ranks: list | None = None
    weights: list | None = None
    scale: object = 0.75          # float, or "vec" for a per-pool-entry tensor


CASES = [
    Case("distinct-r16", 256, 192, 16, 8, list(range(8))),
    Case("rank1", 64, 48, 1, 4, [0, 1, 2, 3, 3]),
    Case("rank3", 72, 40, 3, 4, [3, 0, 1, 2]),
    Case("d-not-multiple", 100, 77, 8, 3, [0, 1, 2, 1]),
    Case("single-seq", 128, 96, 16, 2, [1]),
    Case("none-minus-1", 64, 64, 8, 3, [-1, 0, None, 2, -1]),
    Case("all-none", 64, 32, 8, 2, [-1, None, -1]),
    Case("repeated-ids", 96, 80, 16, 4, [2, 2, 2, 0, 2]),
    Case("composition-weights", 128, 64, 8, 4, [[0, 1], [2], [1, 3, 0], -1, [3, None, 3]],
         weights=[[0.5, -1.5], [2.0], [1.0, 1.0, 0.25], None, [1.0, 9.0, -0.5]]),
    Case("ragged-ranks", 128, 96, 16, 5, [0, 1, 2, 3, 4, [0, 2]], ranks=[16, 3, 8, 1, 0]),
    Case("last-pool-slot", 64, 48, 8, 6, [5, 0, 5]),
    Case("scale-vector", 64, 48, 8, 4, [0, 1, 2, 3, [3, 0]], scale="vec"),
    Case("many-entries", 64, 40, 4, 8, [list(range(8)), [7, 6, 5], 1]),
    Case("model-size", 2048, 960, 16, 64, list(range(64))),
]


def _build(case: Case, dtype, *, nan_tail: bool, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev = torch.device("cuda")
    S = len(case.ids)
    x = torch.randn(S, case.d_in, device=dev, generator=g).to(dtype)
    a = (torch.randn(case.P, case.r_max, case.d_in, device=dev, generator=g) / math.sqrt(case.d_in)).to(dtype)
    b = torch.randn(case.P, case.d_out, case.r_max, device=dev, generator=g).to(dtype)
    if case.ranks is not None:
        # columns past an adapter's rank are not part of it: poison them
        fill = float("nan") if nan_tail else 1e3
        for p, r in enumerate(case.ranks):
            a[p, r:] = fill
            b[p, :, r:] = fill
    scale = case.scale
    if scale == "vec":
        scale = torch.rand(case.P, device=dev, generator=g) * 2 - 0.5
    batch = LoraBatch.build([1] * S, case.ids, ranks=case.ranks, weights=case.weights, device=dev)
    return x, a, b, batch, scale


def _naive(x, a, b, batch, scale, dtype):
    """The delta with plain torch ops in ``dtype``, one sequence and list entry at a time.
    float64: the ground truth; the inputs' dtype: the error yardstick."""
    P = a.shape[0]
    svec = scale.tolist() if isinstance(scale, torch.Tensor) else [float(scale)] * P
    ranks = batch.ranks_host or [a.shape[1]] * P
    x, a, b = x.to(dtype), a.to(dtype), b.to(dtype)
    out = torch.zeros(x.shape[0], b.shape[1], device=x.device, dtype=dtype)
    ptr, idx, wts = batch.adapter_ptr_host, batch.adapter_idx_host, batch.adapter_weight_host
    for s in range(x.shape[0]):
        for k in range(ptr[s], ptr[s + 1]):
            p, r = idx[k], ranks[idx[k]]
            h = (x[s:s + 1] @ a[p, :r].t()) * (wts[k] * svec[p])  # columns past r never enter
            out[s:s + 1] += h @ b[p, :, :r].t()
    return out


def _check(got, x, a, b, batch, scale, what):
    """Error vs the float64 truth at most 2x that of plain torch in the same dtype (plus a
    floor for fp32, where both are at rounding level), and the same against the fp32
    reference module, which defines the semantics. Returns the tolerance used."""
    dtype = x.dtype
    truth = _naive(x, a, b, batch, scale, torch.float64)
    lowp_err = (_naive(x, a, b, batch, scale, dtype).double() - truth).abs().max().item()
    mag = max(1.0, truth.abs().max().item())
    floor = (1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps) * mag
    err = (got.double() - truth).abs().max().item()
    assert math.isfinite(err), f"{what}: non-finite output"
    assert err <= 2 * lowp_err + floor, f"{what}: max error {err:.3g} vs plain torch in {dtype} {lowp_err:.3g}"
    ref = lora_delta_ref(x, a, b, batch, scale)
    ref_err = (ref.double() - truth).abs().max().item()
    diff = (got.double() - ref.double()).abs().max().item()
    assert diff <= 2 * lowp_err + ref_err + floor, f"{what}: differs from the reference by {diff:.3g}"
    return 2 * lowp_err + floor


def _configs():
    cfgs = [("auto", None, None), ("t1", 1, 1), ("t3", 3, 1)]
    if CC_MAJOR >= 9:
        cfgs += [("c2", 2, 2), ("c4x2", 8, 4), ("c8", 8, 8)]
    return cfgs


@needs_ext
@pytest.mark.parametrize("cfg", _configs(), ids=lambda c: c[0])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DT_ID[d])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_reference(case, dtype, cfg):
    _, tiles, cluster = cfg
    x, a, b, batch, scale = _build(case, dtype, nan_tail=True)
    got = lcuda.lora_delta_decode(x, a, b, batch, scale, tiles=tiles, cluster=cluster)
    assert got.dtype == dtype and got.shape == (x.shape[0], case.d_out)
    _check(got, x, a, b, batch, scale, case.id)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DT_ID[d])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_triton(case, dtype):
    x, a, b, batch, scale = _build(case, dtype, nan_tail=False, seed=1)
    got = lcuda.lora_delta_decode(x, a, b, batch, scale)
    tol = _check(got, x, a, b, batch, scale, case.id)
    tri = lora_delta(x, a, b, batch, scale, backend="triton")
    assert tri.dtype == got.dtype and tri.shape == got.shape
    assert (got.double() - tri.double()).abs().max().item() <= 2 * tol, "CUDA and Triton disagree"


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DT_ID[d])
def test_out_and_accumulate(dtype):
    case = CASES[8]  # composition with weights
    x, a, b, batch, scale = _build(case, dtype, nan_tail=False, seed=2)
    want = _naive(x, a, b, batch, scale, torch.float64)
    base = torch.randn(x.shape[0], case.d_out, device="cuda").to(dtype)
    out = base.clone()
    assert lcuda.lora_delta_decode(x, a, b, batch, scale, out=out, accumulate=True) is out
    # two roundings (the delta's, then the sum's) of values bounded by |base| + |delta|
    mag = base.double().abs().max().item() + want.abs().max().item()
    tol = 2 * torch.finfo(dtype).eps * mag + 1e-5 * max(1.0, mag)
    assert (out.double() - (base.double() + want)).abs().max().item() <= tol
    poisoned = torch.full_like(base, float("nan"))
    lcuda.lora_delta_decode(x, a, b, batch, scale, out=poisoned)  # overwrites every element
    torch.testing.assert_close(poisoned, lcuda.lora_delta_decode(x, a, b, batch, scale), rtol=0, atol=0)
    # a row-strided out view is written in place too
    wide = torch.zeros(x.shape[0], 2 * case.d_out, device="cuda", dtype=dtype)
    lcuda.lora_delta_decode(x, a, b, batch, scale, out=wide[:, : case.d_out])
    assert torch.equal(wide[:, : case.d_out], poisoned) and not wide[:, case.d_out:].any()


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DT_ID[d])
def test_public_ops_dispatch_to_cuda(dtype):
    case = CASES[0]
    x, a, b, batch, scale = _build(case, dtype, nan_tail=False, seed=3)
    direct = lcuda.lora_delta_decode(x, a, b, batch, scale)
    assert torch.equal(lora_delta(x, a, b, batch, scale, backend="cuda"), direct)
    w = (torch.randn(case.d_out, case.d_in, device="cuda") / math.sqrt(case.d_in)).to(dtype)
    y = lora_linear(x, w, None, a, b, batch, scale, backend="cuda")
    # the CUDA path is the base GEMM plus the kernel accumulating into its output
    base = torch.nn.functional.linear(x, w, None)
    assert torch.equal(y, lcuda.lora_delta_decode(x, a, b, batch, scale, out=base, accumulate=True))


@needs_ext
def test_opcheck():
    case = CASES[9]
    x, a, b, batch, _ = _build(case, torch.bfloat16, nan_tail=False, seed=4)
    args = (x, a, b, batch.adapter_ptr, batch.adapter_idx, batch.adapter_weight, batch.ranks, None, 0.5,
            batch.max_adapters_per_seq, 2, 1)
    torch.library.opcheck(torch.ops.f2l.lora_delta_decode.default, args)
    out = torch.randn(x.shape[0], case.d_out, device="cuda").to(torch.bfloat16)
    torch.library.opcheck(torch.ops.f2l.lora_delta_decode_into.default, args[:9] + (out, True) + args[9:])


@needs_ext
@pytest.mark.parametrize("cfg", _configs(), ids=lambda c: c[0])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=lambda d: DT_ID[d])
def test_cuda_graph_replay_with_new_adapters(dtype, cfg):
    """Capture once; rewrite the batch's adapter ids and weights in place between replays
    (last: some ids set to -1); every replay is bit-identical to an eager launch on the
    same inputs and matches the float64 truth."""
    _, tiles, cluster = cfg
    dev = torch.device("cuda")
    S, P, r, d_in, d_out = 16, 10, 16, 256, 192
    g = torch.Generator(device="cuda").manual_seed(5)
    x = torch.randn(S, d_in, device=dev, generator=g).to(dtype)
    a = torch.randn(P, r, d_in, device=dev, generator=g).to(dtype)
    b = torch.randn(P, d_out, r, device=dev, generator=g).to(dtype)
    ranks = [16, 8, 3, 16, 1, 16, 12, 16, 16, 5]
    # two adapters per sequence: the list shape (adapter_ptr) stays fixed across replays
    def ids_for(step):
        return [[(s + step) % P, (3 * s + 2 * step + 1) % P] for s in range(S)]

    def weights_for(step):
        return [[1.0 + 0.1 * step, -0.5 * (s % 3)] for s in range(S)]

    batch = LoraBatch.build([1] * S, ids_for(0), ranks=ranks, weights=weights_for(0), device=dev)
    out = torch.empty(S, d_out, device=dev, dtype=dtype)

    def step():
        lcuda.lora_delta_decode(x, a, b, batch, 0.5, out=out, tiles=tiles, cluster=cluster)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm-up outside the capture (lazy loading, allocator)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    for k in range(5):
        ids = ids_for(k)
        if k == 4:
            # "no adapter" written in place: -1 in the device list, the entry dropped on the host
            for i in range(0, S, 3):
                ids[i][1] = -1
        fresh = LoraBatch.build([1] * S, ids, ranks=ranks, weights=weights_for(k), device=dev)
        flat_ids = [p for row in ids for p in row]
        flat_w = [w for row in weights_for(k) for w in row]
        batch.adapter_idx.copy_(torch.tensor(flat_ids, dtype=torch.int32, device=dev))
        batch.adapter_weight.copy_(torch.tensor(flat_w, dtype=torch.float32, device=dev))
        x.copy_(torch.randn(S, d_in, device=dev, generator=g).to(dtype))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        eager = lcuda.lora_delta_decode(x, a, b, fresh, 0.5, tiles=tiles, cluster=cluster)
        assert torch.equal(out, eager), f"replay {k} differs from eager"
        _check(out, x, a, b, fresh, 0.5, f"replay {k}")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
