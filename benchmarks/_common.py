"""Shared benchmark plumbing: timing, environment stamp, result files, plots.

Every sweep writes rows ``{op, case, backend, shape..., ms, gbps, tflops, floor_ms,
frac_of_floor, ...}`` plus one ``env`` record (device, versions, commit) to
``benchmarks/results/<name>.json`` and ``.csv``, and renders PNGs next to them.
"""
from __future__ import annotations

import csv
import json
import os
import platform
import subprocess
import time
from typing import Callable, Iterable

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# Nominal peaks for the floor model (dense bf16 tensor-core, HBM). Achieved fractions
# are also reported against the copy bandwidth measured in the same run.
PEAKS = {
    "H100": {"hbm_gbps": 3350.0, "bf16_tflops": 989.0},
    "H200": {"hbm_gbps": 4800.0, "bf16_tflops": 989.0},
    "A100": {"hbm_gbps": 2039.0, "bf16_tflops": 312.0},
}


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def peaks() -> dict:
    name = device_name()
    for key, val in PEAKS.items():
        if key in name:
            return dict(val)
    return {"hbm_gbps": float("nan"), "bf16_tflops": float("nan")}


def git_commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True).stdout
        return out.stdout.strip() + ("+dirty" if dirty.strip() else "")
    except Exception:
        return "unknown"


def bench_env() -> dict:
    env = {
        "device": device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "commit": git_commit(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    env.update({f"peak_{k}": v for k, v in peaks().items()})
    return env


def time_fn(fn: Callable[[], object], *, warmup: int = 10, rep: int = 50, cuda_graph: bool = False) -> float:
    """Median milliseconds of ``fn()``.

    CUDA: ``triton.testing.do_bench`` (L2 flushed between reps) or, with ``cuda_graph``,
    ``do_bench_cudagraph``. CPU: ``time.perf_counter`` median.
    """
    if torch.cuda.is_available():
        import triton.testing as tt

        if cuda_graph:
            return float(tt.do_bench_cudagraph(fn, rep=rep, return_mode="median"))
        return float(tt.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    for _ in range(min(warmup, 2)):
        fn()
    times = []
    for _ in range(max(3, min(rep, 10))):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def copy_bandwidth_gbps(nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth (read + write), the practical ceiling."""
    if not torch.cuda.is_available():
        return float("nan")
    a = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = time_fn(lambda: b.copy_(a))
    return 2 * a.numel() / (ms * 1e-3) / 1e9


def sync() -> None:
    """Wait for queued GPU work (no-op on CPU) so a timer brackets the work itself."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def write_results(name: str, rows: list[dict], env: dict | None = None, out_dir: str | None = None) -> tuple[str, str]:
    """Write ``<out_dir>/<name>.json`` (env + rows) and ``.csv`` atomically
    (``out_dir`` defaults to ``benchmarks/results``)."""
    out_dir = out_dir or RESULTS_DIR
    os.makedirs(out_dir, exist_ok=True)
    env = env or bench_env()
    jpath = os.path.join(out_dir, f"{name}.json")
    cpath = os.path.join(out_dir, f"{name}.csv")
    tmp = jpath + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"env": env, "rows": rows}, f, indent=1, default=str)
    os.replace(tmp, jpath)
    keys: list[str] = []
    for r in rows:
        for k in r:
            if k not in keys:
                keys.append(k)
    keys += [f"env_{k}" for k in env]
    tmp = cpath + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({**r, **{f"env_{k}": v for k, v in env.items()}})
    os.replace(tmp, cpath)
    return jpath, cpath


def plot_lines(
    path: str,
    rows: Iterable[dict],
    *,
    x: str,
    y: str,
    series: str,
    title: str,
    logx: bool = False,
    logy: bool = False,
    xlabel: str | None = None,
    ylabel: str | None = None,
) -> str:
    """One line per value of ``series``: ``y`` against ``x``. Saves a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if r.get(y) is None or r.get(x) is None:
            continue
        groups.setdefault(str(r[series]), []).append((float(r[x]), float(r[y])))
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for label, pts in groups.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or y)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
