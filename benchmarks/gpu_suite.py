"""One command for a GPU run: build, check, measure and summarise f2l on the device.

    python benchmarks/gpu_suite.py                      # every step within --budget-s (480 s)
    python benchmarks/gpu_suite.py --dry-run            # CPU / CI: the same plan on tiny shapes
    python benchmarks/gpu_suite.py --list               # steps, budgets, what each measures
    python benchmarks/gpu_suite.py --only decode lora   # some steps (results add to --out)
    python benchmarks/gpu_suite.py --update-dispatch    # run, then write the decode winner table
    python benchmarks/gpu_suite.py --update-dispatch --from benchmarks/results/nvidia-h200

Steps, in priority order (a global deadline drops the tail, never the head):

``env``       device, versions, commit; the two ceilings measured once (device-to-device
              copy bandwidth, bf16 GEMM rate on random data);
``build``     the CUDA extension, in place (``setup.py build_ext --inplace``, or ``pip install
              -e .`` with ``--build pip``), for this GPU's architecture; a failure is recorded
              and the suite goes on (Triton covers every op);
``aot``       dry run only: ``benchmarks/aot.py`` (ahead-of-time compile gate) when present;
``tests``     ``tests/test_cuda.py`` and anything marked ``gpu`` (dry run: collection only);
``parity``    the Triton LoRA and Perceiver kernels and the CUDA decode kernel against the
              torch reference on the device (awkward cases and model sizes, forward and
              gradients, NaN-poisoned outputs), Triton decode replayed in a CUDA graph, and
              the tiny model answering with fused backends vs the reference: same greedy text;
``decode``    CUDA vs Triton decode (eager and CUDA graph, L2-rotated inputs) over the real
              (d_in, d_out) of the models' LoRA targets, ranks and batch sizes: the source
              of ``--update-dispatch``;
``lora``      ``sweep_lora.py``'s cases at representative sizes: prefill vs the base GEMM,
              decode, composition, backward vs einsum autograd and per-token copies;
``perceiver`` ``sweep_perceiver.py`` on the official block at 12 / 64 / 256 frames;
``e2e``       ``bench_end_to_end.py`` on the 500M preset (random weights): TTFT adapter vs
              video in context, decode throughput, a training step.

Every step runs in its own process with its own time limit; each result file is written
as soon as it exists (and rewritten as rows arrive), so a limit leaves partial results.
Files land in ``benchmarks/results/<device-slug>/`` (``--out``); ``--export DIR`` also
keeps ``DIR/gpu_suite_results.tar.gz`` plus the summary and the log up to date there (a
remote GPU machine may return only a few files from one folder). The last thing printed
is the summary: each speed target with its floor, baseline and ratio. ``docs/gpu.md``
says how to run it.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass
from typing import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
DISPATCH_PATH = os.path.join(ROOT, "f2l_kernels", "tuned", "decode_dispatch.json")
for _p in (ROOT, HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

DEFAULT_BUDGET_S = 480.0
DRY_BUDGET_S = 1500.0    # dry run: generous wall-clock guards (about a minute of CPU in all)
DRY_STEP_LIMIT_S = 300.0
MIN_STEP_S = 12.0        # a step that would get less than this is skipped
RESERVE_S = 4.0          # kept back from the deadline for the summary and the export
SOFT_FRACTION = 0.85     # a step stops starting new cases after this share of its limit

# Targets of the kernel work items (see the module docstring of each sweep).
TARGETS = {
    "prefill_over_base": 1.10,
    "decode_frac_of_floor": 0.70,
    "bwd_over_fwd": 2.0,
    "bwd_vs_einsum": 1.5,
    "bwd_mem_vs_per_token": 5.0,
    "perceiver_frac_of_floor": 0.60,
    "cuda_vs_triton": 1.0,
}


# =============================================================================== plumbing


def log(msg: str) -> None:
    print(msg, flush=True)


def slug(name: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return s or "unknown"


def atomic_write(path: str, data: str | bytes) -> str:
    """Write beside, then rename: a reader never sees half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
    os.replace(tmp, path)
    return path


def write_json(path: str, obj) -> str:
    return atomic_write(path, json.dumps(obj, indent=1, default=_json_default, allow_nan=True))


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and v not in (float("inf"), float("-inf"))


@dataclass
class Ctx:
    """What a step's code gets in its own process."""

    out: str
    dry_run: bool
    deadline: float        # soft: start no new case after this (epoch seconds)
    hard_deadline: float   # the step is killed a little after this
    args: argparse.Namespace

    def time_left(self) -> float:
        return self.deadline - time.time()

    def hard_left(self) -> float:
        return self.hard_deadline - time.time()

    def env(self) -> dict:
        """The run's env record (written by the env step), else a fresh one."""
        env = read_json(os.path.join(self.out, "env.json"))
        if env is None:
            env = base_env(self)
        return env

    def write_rows(self, name: str, rows: list[dict], env: dict | None = None) -> list[str]:
        from _common import write_results

        return list(write_results(name, rows, env or self.env(), out_dir=self.out))


def base_env(ctx: Ctx) -> dict:
    from _common import bench_env

    env = bench_env()
    commit = ctx.args.commit or os.environ.get("F2L_COMMIT") or env.get("commit")
    env["commit"] = commit or "unknown (no git metadata here; pass --commit)"
    env["dry_run"] = ctx.dry_run
    env["suite"] = "benchmarks/gpu_suite.py"
    return env


def run_cmd(cmd: list[str], *, timeout: float, log_path: str, env: dict | None = None, cwd: str = ROOT) -> dict:
    """Run a command in its own process group, teeing its output to ``log_path`` and to
    stdout; kill the whole group at ``timeout``. Returns rc, seconds, timed_out, tail."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    t0 = time.time()
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    with open(log_path, "a") as lf:
        lf.write(f"$ {' '.join(shlex.quote(c) for c in cmd)}\n")
        lf.flush()
        proc = subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", bufsize=1, start_new_session=True)
        tail: list[str] = []

        def pump():
            for line in proc.stdout:
                lf.write(line)
                lf.flush()
                print("    " + line.rstrip("\n"), flush=True)
                tail.append(line)
                del tail[:-40]

        th = threading.Thread(target=pump, daemon=True)
        th.start()
        timed_out = False
        try:
            proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            timed_out = True
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        th.join(timeout=5)
        lf.write(f"[rc={proc.returncode} after {time.time() - t0:.1f}s{' (time limit)' if timed_out else ''}]\n")
    return {"rc": proc.returncode, "seconds": time.time() - t0, "timed_out": timed_out, "tail": "".join(tail)}


# =============================================================================== steps


def step_env(ctx: Ctx) -> dict:
    import torch

    env = base_env(ctx)
    note = []
    if torch.cuda.is_available():
        from _common import copy_bandwidth_gbps, time_fn

        p = torch.cuda.get_device_properties(0)
        env.update(capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                   l2_mib=getattr(p, "L2_cache_size", 0) / 2**20, memory_gib=p.total_memory / 2**30)
        smi = shutil.which("nvidia-smi")
        if smi:
            q = subprocess.run([smi, "--query-gpu=driver_version,clocks.max.sm,clocks.max.mem,power.limit",
                                "--format=csv,noheader"], capture_output=True, text=True)
            env["nvidia_smi"] = q.stdout.strip()
        nvcc = shutil.which("nvcc")
        if nvcc:
            v = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
            env["nvcc"] = v[-1] if v else None
        env["measured_copy_gbps"] = copy_bandwidth_gbps(1 << 31)
        n = 8192
        g = torch.Generator(device="cuda").manual_seed(0)
        a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16, generator=g)
        b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16, generator=g)
        ms = time_fn(lambda: a @ b, warmup=25, rep=200)
        env["measured_bf16_tflops"] = 2 * n ** 3 / (ms * 1e-3) / 1e12
        note.append(f"copy {env['measured_copy_gbps']:.0f} GB/s, bf16 GEMM {env['measured_bf16_tflops']:.0f} TFLOP/s")
        del a, b
    else:
        env.update(measured_copy_gbps=None, measured_bf16_tflops=None)
        note.append("no GPU: no ceilings measured (dry run)" if ctx.dry_run else "no GPU")
    write_json(os.path.join(ctx.out, "env.json"), env)
    return {"status": "ok", "note": "; ".join(note), "files": ["env.json"]}


def _arch_list() -> str:
    import torch

    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return f"{major}{minor}"
    return os.environ.get("F2L_CUDA_ARCHS", "80;90")


def step_build(ctx: Ctx) -> dict:
    log_path = os.path.join(ctx.out, "build.log")
    archs = os.environ.get("F2L_CUDA_ARCHS") or _arch_list()
    benv = {"F2L_BUILD_CUDA": "1", "F2L_CUDA_ARCHS": archs,
            "MAX_JOBS": os.environ.get("MAX_JOBS", str(max(1, min(16, os.cpu_count() or 1))))}
    if ctx.args.build == "pip":
        cmd = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."]
    else:
        cmd = [sys.executable, "setup.py", "build_ext", "--inplace"]
    rec = {"command": " ".join(cmd), "build_env": benv, "files": ["build.log"]}
    if ctx.dry_run:
        # No CUDA build of torch here: evaluate setup.py with the same arch list instead
        # (its flag parsing and extension logic run; nothing is compiled).
        res = run_cmd([sys.executable, "setup.py", "--version"], timeout=max(5, ctx.time_left()), log_path=log_path,
                      env={"F2L_CUDA_ARCHS": archs})
        ok = res["rc"] == 0
        rec.update(status="ok" if ok else "failed", built=False, extension_available=False,
                   note=f"dry run: would run `{rec['command']}` with F2L_CUDA_ARCHS={archs}; "
                        f"setup.py evaluates ({'ok' if ok else 'rc=%s' % res['rc']})")
        write_json(os.path.join(ctx.out, "build.json"), rec)
        rec["files"].append("build.json")
        return rec
    res = run_cmd(cmd, timeout=max(5, ctx.hard_left() - 5), log_path=log_path, env=benv)
    probe = subprocess.run([sys.executable, "-c",
                            "import f2l_kernels.lora.cuda as c, json; "
                            "print(json.dumps([c.available(), c.unavailable_reason()]))"],
                           cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    try:
        avail, reason = json.loads(probe.stdout.strip().splitlines()[-1])
    except Exception:
        avail, reason = False, (probe.stderr or probe.stdout)[-500:]
    rec.update(rc=res["rc"], seconds=res["seconds"], timed_out=res["timed_out"], built=res["rc"] == 0,
               extension_available=bool(avail), reason=reason)
    ok = res["rc"] == 0 and avail
    rec["status"] = "ok" if ok else "failed"
    last = [ln.strip() for ln in res["tail"].splitlines() if ln.strip()][-1:] or [""]
    rec["note"] = (f"built in {res['seconds']:.0f}s for sm_{archs}, extension loads" if ok else
                   f"build rc={res['rc']}{' (time limit)' if res['timed_out'] else ''}"
                   f"{': ' + last[0][:200] if res['rc'] else ''}; extension: {reason}")
    write_json(os.path.join(ctx.out, "build.json"), rec)
    rec["files"].append("build.json")
    return rec


def step_aot(ctx: Ctx) -> dict:
    script = os.path.join(HERE, "aot.py")
    if not ctx.dry_run:
        return {"status": "skipped", "note": "the ahead-of-time gate is a CPU check; on the device kernels compile for real"}
    if not os.path.exists(script):
        return {"status": "skipped", "note": "benchmarks/aot.py is not in this checkout"}
    res = run_cmd([sys.executable, script], timeout=max(5, ctx.hard_left()), log_path=os.path.join(ctx.out, "aot.log"),
                  env={"TRITON_INTERPRET": "0"})
    ok = res["rc"] == 0
    return {"status": "ok" if ok else "failed", "files": ["aot.log"],
            "note": f"benchmarks/aot.py rc={res['rc']}{' (time limit)' if res['timed_out'] else ''}"}


_PYTEST_LINE = re.compile(r"^(tests/\S+::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)")


def _pytest_counts(text: str) -> dict:
    out: dict = {"passed": 0, "failed": 0, "error": 0, "skipped": 0, "xfail": 0, "xpass": 0, "failures": []}
    for line in text.splitlines():
        m = _PYTEST_LINE.match(line.strip())
        if m:
            kind = m.group(2).lower()
            out[kind] += 1
            if kind in ("failed", "error"):
                out["failures"].append(m.group(1))
    return out


def step_tests(ctx: Ctx) -> dict:
    log_path = os.path.join(ctx.out, "tests_collect.log")
    base = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rfE"]
    env = {"PYTHONPATH": ROOT}
    runs = []
    if ctx.dry_run:
        res = run_cmd(base + ["--collect-only", "-q", "tests/test_cuda.py"], timeout=max(5, ctx.hard_left()),
                      log_path=log_path, env=env)
        m = re.search(r"(\d+) tests? collected", res["tail"])
        runs.append({"run": "test_cuda", "rc": res["rc"], "collected": int(m.group(1)) if m else 0})
        ok = runs[0]["rc"] == 0 and runs[0]["collected"] > 0
        rec = {"status": "ok" if ok else "failed", "runs": runs, "files": ["tests_collect.log", "tests.json"],
               "note": f"dry run: collection of tests/test_cuda.py only ({runs[0]['collected']} tests); "
                       "CPU CI runs the test files itself, the GPU run adds `pytest -m gpu tests`"}
        write_json(os.path.join(ctx.out, "tests.json"), rec)
        return rec
    # The compile/setup checks run in CPU CI wherever nvcc exists and the build step did the
    # real build: skip them here. Triton-vs-CUDA parity compiles many Triton kernels, so it
    # runs last, with whatever time is left.
    plan = [
        ("cuda kernel", ["tests/test_cuda.py", "-v", "-k",
                         "not test_cu_compiles and not test_binding_syntax and not test_setup and not matches_triton"]),
        ("cuda vs triton", ["tests/test_cuda.py", "-v", "-k", "matches_triton"]),
        ("marked gpu", ["tests", "-v", "-m", "gpu"]),
    ]
    files = ["tests.json"]
    for i, (label, extra) in enumerate(plan):
        left = ctx.hard_left()
        if left < 5:
            runs.append({"run": label, "status": "not run (time limit)"})
            continue
        one_log = os.path.join(ctx.out, f"tests_{i}.log")
        res = run_cmd(base + extra, timeout=left, log_path=one_log, env=env)
        files.append(os.path.basename(one_log))
        with open(one_log) as f:
            counts = _pytest_counts(f.read())
        runs.append({"run": label, "rc": res["rc"], "seconds": res["seconds"], "timed_out": res["timed_out"],
                     "log": os.path.basename(one_log), **counts})
    bad = [r for r in runs if r.get("failed") or r.get("error") or r.get("timed_out")
           or r.get("rc") not in (None, 0, 5)]
    total = {k: sum(r.get(k, 0) for r in runs) for k in ("passed", "failed", "error", "skipped")}
    note = ", ".join(f"{v} {k}" for k, v in total.items())
    for r in bad:
        why = r.get("status") or ("time limit" if r.get("timed_out") else f"rc={r.get('rc')}")
        note += f"; {r['run']}: {why}" + (f" ({', '.join(r['failures'][:5])})" if r.get("failures") else "")
    rec = {"status": "failed" if bad else "ok", "runs": runs, "totals": total, "files": files, "note": note}
    write_json(os.path.join(ctx.out, "tests.json"), rec)
    return rec


# ------------------------------------------------------------------------------ parity


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    den = b.norm().item()
    err = (a - b).norm().item()
    if not (err == err):
        return float("nan")
    return err / den if den > 0 else (0.0 if err == 0 else float("inf"))


# Relative L2 error allowed against the fp32 reference (METHOD.md's ranges: fp32 math far
# under 1e-3, bf16 operands 1e-3..1e-2; fp16 carries three more mantissa bits).
REL_TOL = {"float32": 2e-5, "bfloat16": 2e-2, "float16": 4e-3}

# (id, seq_lens, adapter_ids, pool, r_max, d_in, d_out, ranks, weights)
LORA_CASES = [
    ("rank1", [5, 3], [0, 1], 3, 1, 100, 77, None, None),
    ("rank3_composition", [4, 6, 3], [[0, 2], 1, [2, 2, 0]], 3, 3, 100, 77, None, [[0.5, -2.0], None, [1.0, 0.25, 3.0]]),
    ("empty_seq_no_adapter", [4, 0, 6, 2], [0, 1, -1, None], 3, 16, 100, 77, None, None),
    ("ragged_last_slot", [37, 5, 9], [4, [0, 4], 2], 5, 16, 100, 77, [16, 3, 8, 1, 16], None),
    ("decode_mixed", [1] * 9, [0, 1, -1, [2, 0], 2, 2, [1, 1], None, 2], 3, 16, 100, 77, None, None),
]
LORA_MODEL_CASES = [  # real sizes: SmolVLM2-500M down_proj, r = 16
    ("prefill_500m_down", [300, 1, 700], [0, -1, [1, 2]], 3, 16, 2560, 960, None, None),
    ("decode_500m_down_b64", [1] * 64, list(range(64)), 64, 16, 2560, 960, None, None),
]
# (id, lens, M, M', H, Hkv, Dh, Dc)
PERCEIVER_CASES = [
    ("small_empty_seq", (7, 0, 9), 4, 2, 4, 2, 8, 24),
    ("small_gqa_dc_odd", (11, 17), 3, 5, 8, 2, 16, 40),
]
PERCEIVER_MODEL_CASES = [  # the official block: 8 latents, 16 heads x 128, 4 KV heads, Dc 512
    ("official_768_0_100", (768, 0, 100), 8, 8, 16, 4, 128, 512),
]


def _lora_case(case, dtype, device, seed):
    import torch

    from f2l_kernels.lora import LoraBatch

    cid, lens, ids, P, r, d_in, d_out, ranks, weights = case
    g = torch.Generator().manual_seed(seed)
    n = sum(lens)

    def rnd(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(device=device, dtype=dtype)

    t = {"x": rnd(n, d_in), "weight": rnd(d_out, d_in, scale=d_in ** -0.5), "bias": rnd(d_out),
         "lora_a": rnd(P, r, d_in, scale=d_in ** -0.5), "lora_b": rnd(P, d_out, r)}
    batch = LoraBatch.build(lens, ids, ranks=ranks, weights=weights, device=device)
    return t, batch, 0.75


def _lora_checks(device, dtype, cases, backends, rows, ctx) -> None:
    import torch

    from f2l_kernels.lora import lora_delta, lora_linear

    dname = str(dtype).replace("torch.", "")
    for i, case in enumerate(cases):
        if time.time() > ctx.deadline:
            rows.append({"check": "lora", "case": case[0], "dtype": dname, "ok": None, "note": "not run (time limit)"})
            continue
        t, batch, scale = _lora_case(case, dtype, device, seed=100 + i)
        f32 = {k: v.float() for k, v in t.items()}
        leaves = {k: f32[k].clone().requires_grad_() for k in ("x", "lora_a", "lora_b")}
        ref = lora_linear(leaves["x"], f32["weight"], f32["bias"], leaves["lora_a"], leaves["lora_b"], batch, scale,
                          backend="reference")
        dy = torch.randn(ref.shape, generator=torch.Generator().manual_seed(7 + i)).to(device)
        ref.backward(dy)
        ref_d = lora_delta(f32["x"], f32["lora_a"], f32["lora_b"], batch, scale, backend="reference")
        for be in backends:
            if be == "cuda" and not batch.is_decode:
                continue
            got = {}
            with torch.no_grad():
                got["forward"] = lora_linear(t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], batch, scale,
                                             backend=be)
                got["delta"] = lora_delta(t["x"], t["lora_a"], t["lora_b"], batch, scale, backend=be)
            want = {"forward": ref.detach(), "delta": ref_d}
            if be == "triton":
                tl = {k: t[k].clone().requires_grad_() for k in ("x", "lora_a", "lora_b")}
                y = lora_linear(tl["x"], t["weight"], t["bias"], tl["lora_a"], tl["lora_b"], batch, scale, backend=be)
                y.backward(dy.to(dtype))
                for k in tl:
                    got[f"grad_{k}"] = tl[k].grad
                    want[f"grad_{k}"] = leaves[k].grad
            for what, v in got.items():
                err = _rel(v, want[what]) if v is not None else float("nan")
                tol = REL_TOL[dname] * (2 if what.startswith("grad") else 1)
                ok = bool(err <= tol) and v.dtype == dtype and tuple(v.shape) == tuple(want[what].shape)
                rows.append({"check": "lora", "case": case[0], "dtype": dname, "backend": be, "what": what,
                             "rel_err": err, "tol": tol, "ok": ok})


def _perceiver_checks(device, dtype, cases, rows, ctx) -> None:
    import torch

    from f2l_kernels import perceiver_attention

    dname = str(dtype).replace("torch.", "")
    names = ("q", "ctx", "k_weight", "v_weight", "norm_weight", "latent_k", "latent_v")
    for i, (cid, lens, M, Mp, H, Hkv, Dh, Dc) in enumerate(cases):
        if time.time() > ctx.deadline:
            rows.append({"check": "perceiver", "case": cid, "dtype": dname, "ok": None, "note": "not run (time limit)"})
            continue
        g = torch.Generator().manual_seed(200 + i)
        S, N = len(lens), sum(lens)
        shapes = {"q": (S, M, H, Dh), "ctx": (N, Dc), "k_weight": (Hkv * Dh, Dc), "v_weight": (Hkv * Dh, Dc),
                  "norm_weight": (Dc,), "latent_k": (S, Mp, Hkv, Dh), "latent_v": (S, Mp, Hkv, Dh)}
        scale = {"k_weight": Dc ** -0.5, "v_weight": Dc ** -0.5}
        base = {k: torch.randn(*s, generator=g) * scale.get(k, 1.0) for k, s in shapes.items()}
        base["norm_weight"] = 1.0 + 0.1 * base["norm_weight"]
        cu = torch.zeros(S + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(lens), 0)
        cu = cu.to(device)
        outs = {}
        for tag, dt, be in (("ref", torch.float32, "reference"), ("got", dtype, "triton")):
            # the reference sees the same (rounded) inputs as the kernel, in fp32
            t = {k: v.to(dtype).to(device=device, dtype=dt).requires_grad_() for k, v in base.items()}
            o = perceiver_attention(t["q"], t["ctx"], cu, t["k_weight"], t["v_weight"], norm_weight=t["norm_weight"],
                                    latent_k=t["latent_k"], latent_v=t["latent_v"], backend=be)
            go = torch.randn(o.shape, generator=torch.Generator().manual_seed(9 + i)).to(device=device, dtype=dt)
            grads = torch.autograd.grad(o, [t[k] for k in names], go)
            outs[tag] = (o, dict(zip(names, grads)))
        (o_ref, g_ref), (o_got, g_got) = outs["ref"], outs["got"]
        for what, v, w in [("forward", o_got, o_ref)] + [(f"grad_{k}", g_got[k], g_ref[k]) for k in names]:
            err = _rel(v, w)
            tol = REL_TOL[dname] * (2 if what.startswith("grad") else 1)
            rows.append({"check": "perceiver", "case": cid, "dtype": dname, "backend": "triton", "what": what,
                         "rel_err": err, "tol": tol, "ok": bool(err <= tol) and v.dtype == dtype})


def _graph_replay_check(device, rows) -> None:
    """The Triton decode path captured once, replayed on new inputs: equal to eager."""
    import torch

    from f2l_kernels.lora import LoraBatch, lora_delta

    S, P, r, d_in, d_out = 16, 6, 16, 256, 192
    g = torch.Generator(device=device).manual_seed(11)
    x = torch.randn(S, d_in, device=device, generator=g, dtype=torch.float32).to(torch.bfloat16)
    a = torch.randn(P, r, d_in, device=device, generator=g).div_(d_in ** 0.5).to(torch.bfloat16)
    b = torch.randn(P, d_out, r, device=device, generator=g).to(torch.bfloat16)
    batch = LoraBatch.build([1] * S, [(3 * s) % P for s in range(S)], device=device)
    out = torch.empty(S, d_out, device=device, dtype=torch.bfloat16)
    eager = torch.empty_like(out)

    def step(dst=out):
        dst.zero_()
        lora_delta(x, a, b, batch, 0.5, out=dst, backend="triton")

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    worst, ok = 0.0, True
    for k in range(3):
        x.copy_(torch.randn(S, d_in, device=device, generator=g).to(torch.bfloat16))
        out.fill_(float("nan"))
        graph.replay()
        step(eager)
        torch.cuda.synchronize()
        ok = ok and bool(torch.equal(out, eager)) and not bool(out.isnan().any())
        worst = max(worst, (out.float() - eager.float()).abs().max().item())
    rows.append({"check": "graph_replay", "case": "triton_decode_S16_r16", "dtype": "bfloat16", "backend": "triton",
                 "what": "replay == eager", "rel_err": worst, "tol": 0.0, "ok": ok})


def _answer_check(device, rows, ctx, cuda_ok: bool) -> None:
    """The tiny model answering: every fused backend gives the reference's greedy text."""
    import torch

    from f2l import Frames2LoRA
    from f2l.adapter import VideoAdapter

    torch.manual_seed(0)
    m = Frames2LoRA.from_pretrained("tiny", preset="tiny", device=device, dtype=torch.float32)
    shapes = m.base.module_shapes(tuple(m.hypernet.config.target_modules))
    L, r = m.base.num_layers, 4
    g = torch.Generator().manual_seed(3)
    ads = []
    for i in range(3):
        a = {k: torch.randn(L, r, di, generator=g) * di ** -0.5 for k, (di, do) in shapes.items()}
        b = {k: torch.randn(L, do, r, generator=g) for k, (di, do) in shapes.items()}
        ads.append(VideoAdapter(lora_a=a, lora_b=b, scale=2.0, base_fingerprint=m.base.fingerprint, num_frames=1,
                                source="gpu_suite", metadata={}, segments=[r]))
    adapters = [ads[0], None, [ads[1], ads[2]], ads[2]]
    prompts = ["What is in the video?", "Who moves first?", "What colour is the square?", "Where does it go?"]
    if ctx.dry_run:  # the interpreter runs every kernel on the CPU: fewer tokens, same path
        adapters, prompts = adapters[:3], prompts[:3]
    tokens = 2 if ctx.dry_run else 12
    # The hypernetwork's Perceiver on the fused kernel vs the reference, on one video's states.
    video = torch.rand(2, 3, m.base.image_size, m.base.image_size)
    from f2l.video import Video

    enc = m.encode([Video(pixel_values=video * 2 - 1, timestamps=[0.0, 1.0], duration=2.0)])
    t_ref = m.adapter_tensors(enc, backend="reference")
    t_tri = m.adapter_tensors(enc, backend="triton")
    for mod in t_ref.lora_a:
        err = _rel(t_tri.lora_a[mod], t_ref.lora_a[mod])
        rows.append({"check": "hypernet", "case": f"tiny lora_a[{mod}]", "dtype": "float32", "backend": "triton",
                     "what": "adapter tensors", "rel_err": err, "tol": 1e-4, "ok": bool(err <= 1e-4)})
    old = os.environ.get("F2L_BACKEND")
    answers = {}
    try:
        for be in ["reference", "triton"] + (["cuda", "auto"] if cuda_ok else []):
            if time.time() > ctx.deadline and be != "reference":
                rows.append({"check": "answer", "case": "tiny", "backend": be, "ok": None, "note": "not run (time limit)"})
                continue
            os.environ["F2L_BACKEND"] = be
            answers[be] = m.answer(adapters, prompts, max_new_tokens=tokens)
    finally:
        if old is None:
            os.environ.pop("F2L_BACKEND", None)
        else:
            os.environ["F2L_BACKEND"] = old
    for be, ans in answers.items():
        if be == "reference":
            continue
        same = [a == b for a, b in zip(ans, answers["reference"])]
        rows.append({"check": "answer", "case": f"tiny, {len(prompts)} prompts x {tokens} tokens", "dtype": "float32",
                     "backend": be, "what": "same greedy text as reference", "rel_err": 1 - sum(same) / len(same),
                     "tol": 0.0, "ok": all(same), "answers": ans, "reference": answers["reference"]})


def step_parity(ctx: Ctx) -> dict:
    import torch

    from f2l_kernels.lora import cuda as lcuda

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    cuda_ok = cuda and lcuda.available()
    rows: list[dict] = []
    env = ctx.env()
    # The dry run interprets every kernel on the CPU (where tests/test_lora.py and
    # tests/test_perceiver.py cover the cases in full): a subset, the same code.
    lora_cases = LORA_CASES if cuda else [c for c in LORA_CASES if c[0] in ("rank3_composition", "decode_mixed")]
    be = ["triton"] + (["cuda"] if cuda_ok else [])
    lora32 = ("lora fp32", lambda: _lora_checks(device, torch.float32, lora_cases, be, rows, ctx))
    per32 = ("perceiver fp32", lambda: _perceiver_checks(device, torch.float32, PERCEIVER_CASES, rows, ctx))
    answer = ("answer", lambda: _answer_check(device, rows, ctx, cuda_ok))
    if cuda:
        # Most important first: each new shape costs Triton compilations (autotuning), and
        # the step stops starting checks at its soft deadline.
        parts = [
            ("lora bf16 model sizes", lambda: _lora_checks(device, torch.bfloat16, LORA_MODEL_CASES, be, rows, ctx)),
            answer,
            lora32,
            ("perceiver bf16 official", lambda: _perceiver_checks(device, torch.bfloat16, PERCEIVER_MODEL_CASES,
                                                                  rows, ctx)),
            per32,
            ("graph replay", lambda: _graph_replay_check(device, rows)),
        ]
    else:
        parts = [lora32, ("lora bf16", lambda: _lora_checks(device, torch.bfloat16, [LORA_CASES[2]], ["triton"],
                                                              rows, ctx)), per32, answer]
    errors = []
    for name, fn in parts:
        if time.time() > ctx.deadline:
            rows.append({"check": name, "ok": None, "note": "not run (time limit)"})
            continue
        try:
            fn()
        except Exception as e:  # one broken check must not hide the others' results
            errors.append(f"{name}: {type(e).__name__}: {e}"[:400])
            rows.append({"check": name, "ok": False, "error": errors[-1]})
        ctx.write_rows("parity", rows, env)
    failed = [r for r in rows if r.get("ok") is False]
    skipped = [r for r in rows if r.get("ok") is None]
    note = f"{sum(1 for r in rows if r.get('ok'))} checks pass, {len(failed)} fail, {len(skipped)} not run"
    if not cuda_ok:
        note += "; CUDA decode kernel not checked (" + (lcuda.unavailable_reason() if cuda else "no GPU") + ")"
    if failed:
        note += "; first failure: " + json.dumps({k: failed[0].get(k) for k in ("check", "case", "dtype", "backend",
                                                                               "what", "rel_err", "error")})
    return {"status": "failed" if failed else "ok", "note": note, "files": ["parity.json", "parity.csv"]}


# ------------------------------------------------------------------------------ decode

# (name, d_in, d_out): the LoRA targets' real shapes (down_proj of each SmolVLM2 text model)
# and the square d = 2048 of bench_lora_decode.py's target.
DECODE_SHAPES = [("down_proj_500m", 2560, 960), ("down_proj_2.2b", 8192, 2048), ("square_2048", 2048, 2048),
                 ("down_proj_256m", 1536, 576)]
DECODE_RANKS = [16, 8, 64]
DECODE_SEQS = [1, 16, 64, 256, 1024]
DRY_DECODE_SHAPES = [("tiny", 40, 24)]
DRY_DECODE_RANKS = [16]
DRY_DECODE_SEQS = [1, 5]


def decode_bytes(S: int, r: int, d_in: int, d_out: int, elt: int = 2) -> int:
    """Bytes that must move: x, each distinct adapter once (A and B), y."""
    return elt * (S * d_in + S * r * (d_in + d_out) + S * d_out)


def step_decode(ctx: Ctx) -> dict:
    import torch

    from _common import time_fn
    from f2l_kernels.lora import LoraBatch, lora_delta
    from f2l_kernels.lora import cuda as lcuda
    from f2l_kernels.lora.reference import lora_delta_ref

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    env = ctx.env()
    bw = env.get("measured_copy_gbps") or env.get("peak_hbm_gbps")
    backends = (["cuda"] if cuda and lcuda.available() else []) + ["triton"]
    shapes, ranks, seqs = ((DECODE_SHAPES, DECODE_RANKS, DECODE_SEQS) if cuda else
                           (DRY_DECODE_SHAPES, DRY_DECODE_RANKS, DRY_DECODE_SEQS))
    l2 = torch.cuda.get_device_properties(0).L2_cache_size if cuda else 0
    cases = [(sh, r, S) for r in ranks for sh in shapes for S in seqs]
    rows: list[dict] = []
    done = 0
    for (name, d_in, d_out), r, S in cases:
        if time.time() > ctx.deadline:
            break
        nbytes = decode_bytes(S, r, d_in, d_out, torch.tensor([], dtype=dtype).element_size())
        # enough independent layers that the rotation is twice the L2 (graphs do not flush it)
        n = max(1, min(32, -(-2 * l2 // nbytes), (2 << 30) // nbytes)) if cuda else 1
        # a permutation: every pool slot in use, not in sequence order (as in serving)
        perm = torch.randperm(S, generator=torch.Generator().manual_seed(S * 131 + r)).tolist()
        batch = LoraBatch.build([1] * S, perm, device=device)
        g = torch.Generator(device=device).manual_seed(S * 131 + r)

        def rnd(*shape, scale=1.0):
            return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

        sets = [(rnd(S, d_in), rnd(S, r, d_in, scale=d_in ** -0.5), rnd(S, d_out, r, scale=0.1)) for _ in range(n)]
        ref = lora_delta_ref(*sets[0], batch, 2.0)
        for be in backends:
            def one(i, be=be):
                x, a, b = sets[i]
                return lora_delta(x, a, b, batch, 2.0, backend=be)

            err = _rel(one(0), ref)
            row = {"op": "lora_delta_decode", "shape": name, "d_in": d_in, "d_out": d_out, "r": r, "S": S,
                   "dtype": str(dtype).replace("torch.", ""), "backend": be, "bytes": nbytes, "rotated": n,
                   "rel_err_vs_ref": err}
            for mode in ("eager", "graph"):
                try:
                    if mode == "eager":
                        ms = time_fn(lambda: one(0), warmup=5, rep=25) if cuda else _once_ms(lambda: one(0))
                    elif cuda:
                        ms = _graph_ms(lambda: [one(i) for i in range(n)], time_fn) / n
                    else:
                        continue  # no CUDA graphs on the CPU
                except Exception as e:
                    rows.append(dict(row, mode=mode, error=f"{type(e).__name__}: {e}"[:300]))
                    continue
                us = ms * 1e3
                r_ = dict(row, mode=mode, us=us, gbps=nbytes / (ms * 1e-3) / 1e9)
                if _finite(bw):
                    r_["floor_us"] = nbytes / (bw * 1e9) * 1e6
                    r_["frac_of_floor"] = r_["floor_us"] / us
                rows.append(r_)
        del sets
        if cuda:
            torch.cuda.empty_cache()
        done += 1
        ctx.write_rows("decode", rows, env)
    _speedups_decode(rows)
    files = ctx.write_rows("decode", rows, env)
    files += _decode_plots(ctx, rows)
    note = f"{done}/{len(cases)} cases, backends {backends}"
    if done < len(cases):
        note += " (stopped at the step's time limit)"
    if "cuda" not in backends:
        note += "; CUDA decode kernel not available" + ("" if cuda else " (no GPU)")
    bad = [r for r in rows if r.get("rel_err_vs_ref", 0) > REL_TOL.get(r.get("dtype"), 1)]
    if bad:
        note += f"; {len(bad)} rows disagree with the reference"
    return {"status": "failed" if bad or not rows else "ok", "note": note,
            "files": [os.path.basename(f) for f in files]}


def _once_ms(fn) -> float:
    """Dry run: one call on the clock, only so that every writer downstream has a number."""
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _graph_ms(fn, time_fn) -> float:
    import torch

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return time_fn(g.replay, warmup=5, rep=25)


def _speedups_decode(rows: list[dict]) -> None:
    by = {(r["shape"], r["r"], r["S"], r["mode"], r["backend"]): r for r in rows if "us" in r}
    for (shape, r, S, mode, be), row in by.items():
        if be == "cuda":
            t = by.get((shape, r, S, mode, "triton"))
            if t:
                row["speedup_vs_triton"] = t["us"] / row["us"]


def _decode_plots(ctx: Ctx, rows: list[dict]) -> list[str]:
    from _common import plot_lines

    paths = []
    for name in sorted({r["shape"] for r in rows}):
        r16 = 16 if any(r["r"] == 16 for r in rows) else rows[0]["r"]
        sel = [dict(r, series=f"{r['backend']} {r['mode']}") for r in rows
               if r["shape"] == name and r["r"] == r16 and r.get("gbps")]
        if sel:
            paths.append(plot_lines(os.path.join(ctx.out, f"decode_{name}_r{r16}.png"), sel, x="S", y="gbps",
                                    series="series", logx=True, logy=True, xlabel="decode batch (sequences)",
                                    ylabel="GB/s on the bytes that must move",
                                    title=f"decode LoRA delta {name} r={r16}: CUDA vs Triton"))
    return paths


# ------------------------------------------------------------------------------ lora sweep


def _require(mod, names: list[str]) -> None:
    missing = [n for n in names if not hasattr(mod, n)]
    if missing:
        raise RuntimeError(f"{mod.__file__} no longer defines {missing}: update benchmarks/gpu_suite.py "
                           "(it calls the sweep's functions at its own sizes)")


def step_lora(ctx: Ctx) -> dict:
    import torch

    from benchmarks import sweep_lora as sl

    _require(sl, ["Case", "run_forward", "run_backward", "summarize", "SHAPES", "QUICK_SHAPES"])
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    with_cuda = cuda and sl._lora_cuda is not None and sl._lora_cuda.available()
    from _common import peaks

    pk = peaks() if cuda else {"hbm_gbps": 50.0, "bf16_tflops": 1.0}
    env = ctx.env()
    quick = not cuda
    if cuda:
        shapes = [(n, sl.SHAPES[n]) for n in ("down_proj_500m", "down_proj_2.2b") if n in sl.SHAPES]
        r, prefill, b = 16, [1024] * 8, 64
    else:
        shapes = [(n, sl.QUICK_SHAPES[n]) for n in list(sl.QUICK_SHAPES)[:1]]
        r, prefill, b = 8, [16] * 2, 4
    plan = []
    for name, (d_in, d_out) in shapes:
        S = len(prefill)
        plan.append(("prefill", name, d_in, d_out, prefill, list(range(S)), S, True))
        plan.append((f"decode_b{b}", name, d_in, d_out, [1] * b, list(range(b)), b, False))
    for name, (d_in, d_out) in shapes:
        if cuda:
            plan.append(("decode_b1", name, d_in, d_out, [1], [0], 1, False))
        ids = [[2 * i, 2 * i + 1] for i in range(b)]
        plan.append((f"decode_comp2_b{b}", name, d_in, d_out, [1] * b, ids, 2 * b, False))
    rows: list[dict] = []
    done = 0
    for mode, name, d_in, d_out, lens, ids, pool, grad in plan:
        if time.time() > ctx.deadline:
            break
        c = sl.Case(name, d_in, d_out, r, lens, ids, pool, device=device, dtype=dtype, grad=grad)
        rows += sl.run_forward(c, mode, pk, quick, with_cuda)
        if grad:
            rows += sl.run_backward(c, pk, quick)
        done += 1
        del c
        if cuda:
            torch.cuda.empty_cache()
        ctx.write_rows("lora", rows, env)
    copy_bw = env.get("measured_copy_gbps") or float("nan")
    env = dict(env, targets=sl.summarize(rows, copy_bw))
    files = ctx.write_rows("lora", rows, env)
    from _common import plot_lines

    ok_rows = [r_ for r_ in rows if _finite(r_.get("ms"))]
    for name, _ in shapes:
        sel = [r_ for r_ in ok_rows if r_.get("shape") == name and re.fullmatch(r"decode_b\d+", str(r_.get("case")))]
        if sel:
            files.append(plot_lines(os.path.join(ctx.out, f"lora_{name}_decode.png"), sel, x="seqs", y="ms",
                                    series="backend", logx=True, logy=True, xlabel="sequences (one token each)",
                                    title=f"LoRA decode forward, {name}, r={r}, distinct adapters"))
    errors = [r_ for r_ in rows if "error" in r_]
    note = f"{done}/{len(plan)} cases" + (" (stopped at the step's time limit)" if done < len(plan) else "")
    if errors:
        note += f"; {len(errors)} implementations could not run a case (see rows with 'error')"
    return {"status": "ok" if rows else "failed", "note": note, "files": [os.path.basename(f) for f in files]}


# ------------------------------------------------------------------------------ perceiver


def step_perceiver(ctx: Ctx) -> dict:
    import torch

    import sweep_perceiver as sp

    _require(sp, ["measure", "seq_lens", "floor_bytes", "standard_flops", "OFFICIAL", "QUICK", "available_backends"])
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    shape = sp.OFFICIAL if cuda else sp.QUICK
    frames = [12, 64, 256] if cuda else [1]
    backends = sp.available_backends(not cuda)
    elt = torch.tensor([], dtype=dtype).element_size()
    env = ctx.env()
    bw = env.get("measured_copy_gbps") or env.get("peak_hbm_gbps")
    rows: list[dict] = []
    done = 0
    jobs = [(f, be) for f in frames for be in backends]
    for f, be in jobs:
        if time.time() > ctx.deadline:
            break
        lens = sp.seq_lens(shape, f, 1, False)
        nbytes = sp.floor_bytes(shape, lens, elt)
        flops = sp.standard_flops(shape, lens)
        # fewest FLOPs any formulation needs: the projections absorbed into the queries
        # (scores and values against the normed context rows), plus the latent keys
        S_, N_ = len(lens), sum(lens)
        absorbed = (4 * N_ * shape.M * shape.H * shape.Dc + 4 * S_ * shape.M * shape.H * shape.Dh * shape.Dc
                    + 4 * S_ * shape.M * shape.H * shape.Mp * shape.Dh)
        row = {"op": "perceiver_attention", "case": f"{f}f_x1", "backend": be, "frames": f, "seqs": len(lens),
               "rows_per_seq": max(lens), "rows": sum(lens), "dtype": str(dtype).replace("torch.", ""),
               "floor_bytes": nbytes, "flops": flops, "min_flops": min(flops, absorbed)}
        try:
            row.update(sp.measure(be, shape, lens, dtype, device, backward=True, rep=50 if cuda else 3))
        except Exception as e:  # an out-of-memory baseline is a row, not a crash
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            if cuda:
                torch.cuda.empty_cache()
        if _finite(row.get("ms")):
            s = row["ms"] * 1e-3
            row["gbps"] = nbytes / s / 1e9
            row["tflops"] = flops / s / 1e12
        rows.append(row)
        done += 1
        ctx.write_rows("perceiver", rows, env)
    for r in rows:
        base = next((x for x in rows if x["frames"] == r["frames"] and x["backend"] == "sdpa_padded"), None)
        if base and _finite(base.get("ms")) and _finite(r.get("ms")):
            r["speedup_vs_sdpa_padded"] = base["ms"] / r["ms"]
    files = ctx.write_rows("perceiver", rows, env)
    from _common import plot_lines

    ok_rows = [r for r in rows if _finite(r.get("ms"))]
    if ok_rows:
        files.append(plot_lines(os.path.join(ctx.out, "perceiver_ms.png"), ok_rows, x="frames", y="ms",
                                series="backend", logx=True, logy=True, ylabel="forward ms (median)",
                                title=f"perceiver_attention (official block), {env.get('device')}"))
    note = f"{done}/{len(jobs)} (frames, backend) jobs" + (" (stopped at the step's time limit)" if done < len(jobs) else "")
    return {"status": "ok" if ok_rows else "failed", "note": note, "files": [os.path.basename(f) for f in files]}


# ------------------------------------------------------------------------------ end to end


E2E_GPU_ARGS = ["--models", "smolvlm2-500m", "--frames", "8", "64", "--skip", "resolution",
                "--concurrency", "16", "64", "--decode-steps", "16", "--reps", "5",
                "--train-frames", "12", "--train-batch", "4"]
E2E_DRY_ARGS = ["--quick", "--frames", "2", "--reps", "1", "--skip", "resolution", "serving", "training"]


def step_e2e(ctx: Ctx) -> dict:
    script = os.path.join(HERE, "bench_end_to_end.py")
    if ctx.dry_run:
        # the GPU run's arguments must still parse (the script's options may change)
        import bench_end_to_end

        try:
            bench_end_to_end.parse_args(E2E_GPU_ARGS + ["--out", ctx.out])
        except SystemExit as e:
            return {"status": "failed", "note": f"bench_end_to_end.py rejects the GPU run's arguments (exit {e.code})"}
        extra = E2E_DRY_ARGS
    else:
        extra = E2E_GPU_ARGS
    cmd = [sys.executable, script] + extra + ["--out", ctx.out, "--name", "end_to_end"]
    hard = max(5.0, ctx.hard_left())
    res = run_cmd(cmd, timeout=hard, log_path=os.path.join(ctx.out, "end_to_end.log"), env={"PYTHONPATH": ROOT})
    data = read_json(os.path.join(ctx.out, "end_to_end.json"))
    if data is not None:  # the script stamps its own env: give it the run's (commit, ceilings)
        ctx.write_rows("end_to_end", data.get("rows", []), dict(data.get("env", {}), **ctx.env()))
    ok = res["rc"] == 0 and data is not None
    files = ["end_to_end.log"] + [f for f in os.listdir(ctx.out) if f.startswith("end_to_end") and
                                  f.endswith((".json", ".csv", ".png"))]
    note = ("500M preset, random weights" if not ctx.dry_run else "dry run: tiny preset, --quick") + (
        f"; rc={res['rc']}{' (time limit: the script writes its files only at the end)' if res['timed_out'] else ''}"
        if not ok else "")
    return {"status": "ok" if ok else "failed", "note": note, "files": sorted(set(files))}


@dataclass(frozen=True)
class Step:
    name: str
    budget_s: float
    run: Callable[[Ctx], dict]
    what: str
    min_s: float = MIN_STEP_S   # less time than this left: skipped (nothing useful would finish)


STEPS = [
    Step("env", 30, step_env, "device, versions, commit; measured copy bandwidth and bf16 GEMM rate"),
    Step("build", 120, step_build, "CUDA extension in place for this GPU's arch; failure recorded, suite goes on"),
    Step("aot", 120, step_aot, "dry run only: benchmarks/aot.py, the ahead-of-time compile gate, when present"),
    Step("tests", 75, step_tests, "tests/test_cuda.py (CUDA decode parity, graph replay) and tests marked gpu"),
    Step("parity", 90, step_parity, "Triton LoRA/Perceiver and CUDA decode vs reference on device; greedy answers"),
    Step("decode", 60, step_decode, "CUDA vs Triton decode, eager + graph, model shapes x ranks x batch"),
    Step("lora", 60, step_lora, "prefill vs base GEMM, decode, composition, backward vs einsum / per-token"),
    Step("perceiver", 45, step_perceiver, "official Perceiver block fwd/bwd at 12/64/256 frames vs padded SDPA"),
    Step("e2e", 100, step_e2e, "500M preset: TTFT adapter vs video in context, decode throughput, training step",
         min_s=45),
]
STEP_NAMES = [s.name for s in STEPS]


# =============================================================================== summary


def _fmt(v, unit: str = "", spec: str = ".3g") -> str:
    if not _finite(v):
        return "-"
    return f"{format(v, spec)}{unit}"


def _metric(rows, name, value, floor, baseline, ratio, target, passed, src, dry):
    verdict = "n/a (dry run)" if dry else ("no data" if passed is None else ("PASS" if passed else "MISS"))
    rows.append({"metric": name, "value": value, "floor": floor, "baseline": baseline, "ratio": ratio,
                 "target": target, "verdict": verdict, "source": src})


def build_summary(out: str) -> dict:
    """Each speed target from whatever result files exist in ``out``."""
    env = read_json(os.path.join(out, "env.json")) or {}
    dry = bool(env.get("dry_run"))
    bw = env.get("measured_copy_gbps") if _finite(env.get("measured_copy_gbps")) else env.get("peak_hbm_gbps")
    fl = env.get("measured_bf16_tflops") if _finite(env.get("measured_bf16_tflops")) else env.get("peak_bf16_tflops")
    if dry:  # nominal CPU numbers so that every ratio is computed (and meaningless)
        bw, fl = bw if _finite(bw) else 50.0, fl if _finite(fl) else 1.0
    metrics: list[dict] = []

    def floor_ms(nbytes, flops=0.0):
        if not _finite(bw):
            return float("nan")
        t = nbytes / (bw * 1e9)
        if _finite(fl) and flops:
            t = max(t, flops / (fl * 1e12))
        return t * 1e3

    lora = (read_json(os.path.join(out, "lora.json")) or {}).get("rows", [])
    for shape in sorted({r.get("shape") for r in lora if r.get("shape")}):
        def get(case, be):
            return next((r for r in lora if r.get("shape") == shape and r.get("case") == case
                         and r.get("backend") == be and _finite(r.get("ms"))), None)

        f, b = get("prefill", "f2l"), get("prefill", "base")
        if f and b:
            ratio = f["ms"] / b["ms"]
            _metric(metrics, f"LoRA prefill {shape} r={f['r']} ({f['rows']} rows)", _fmt(f["ms"], " ms"),
                    _fmt(floor_ms(f["floor_bytes"], f["floor_flops"]), " ms"), f"base GEMM {_fmt(b['ms'], ' ms')}",
                    _fmt(ratio, "x"), f"<= {TARGETS['prefill_over_base']:.2f}x base", ratio <= TARGETS["prefill_over_base"],
                    "lora.json", dry)
        for case in sorted({r.get("case") for r in lora if str(r.get("case", "")).startswith("decode_b")}):
            for be in ("f2l", "f2l_cuda"):
                d = get(case, be)
                if d:
                    fm = floor_ms(d["floor_bytes"])
                    ratio = fm / d["ms"] if _finite(fm) else float("nan")
                    e = get(case, "einsum")
                    _metric(metrics, f"LoRA {case} {shape} r={d['r']} [{be}]", _fmt(d["ms"] * 1e3, " us"),
                            _fmt(fm * 1e3, " us"), f"einsum {_fmt(e['ms'] * 1e3, ' us')}" if e else "-",
                            _fmt(ratio, " of floor"), f">= {TARGETS['decode_frac_of_floor']:.0%} of bytes floor",
                            (ratio >= TARGETS["decode_frac_of_floor"]) if _finite(ratio) else None, "lora.json", dry)
        bf, be_, bp = get("backward", "f2l"), get("backward", "einsum"), get("backward", "per_token")
        if bf:
            _metric(metrics, f"LoRA backward {shape} r={bf['r']}: bwd / fwd", _fmt(bf["ms"], " ms"),
                    _fmt(floor_ms(bf["floor_bytes"], bf["floor_flops"]), " ms"), f"fwd {_fmt(bf['ms_fwd'], ' ms')}",
                    _fmt(bf["bwd_over_fwd"], "x"), f"<= {TARGETS['bwd_over_fwd']:.1f}x fwd",
                    bf["bwd_over_fwd"] <= TARGETS["bwd_over_fwd"], "lora.json", dry)
            if be_ and _finite(be_.get("ms_fwd_bwd")):
                ratio = be_["ms_fwd_bwd"] / bf["ms_fwd_bwd"]
                _metric(metrics, f"LoRA fwd+bwd {shape}: einsum autograd / f2l", _fmt(bf["ms_fwd_bwd"], " ms"), "-",
                        f"einsum {_fmt(be_['ms_fwd_bwd'], ' ms')}", _fmt(ratio, "x"),
                        f">= {TARGETS['bwd_vs_einsum']:.1f}x faster", ratio >= TARGETS["bwd_vs_einsum"], "lora.json", dry)
            if bp and _finite(bp.get("peak_mib")) and _finite(bf.get("peak_mib")) and bf["peak_mib"] > 0:
                ratio = bp["peak_mib"] / bf["peak_mib"]
                _metric(metrics, f"LoRA fwd+bwd {shape}: peak memory per-token / f2l", _fmt(bf["peak_mib"], " MiB"), "-",
                        f"per-token {_fmt(bp['peak_mib'], ' MiB')}", _fmt(ratio, "x"),
                        f">= {TARGETS['bwd_mem_vs_per_token']:.0f}x less", ratio >= TARGETS["bwd_mem_vs_per_token"],
                        "lora.json", dry)

    dec = (read_json(os.path.join(out, "decode.json")) or {}).get("rows", [])
    dec = [r for r in dec if _finite(r.get("us"))]
    mode = "graph" if any(r["mode"] == "graph" for r in dec) else "eager"
    for shape in sorted({r["shape"] for r in dec}):
        rs = sorted({r["r"] for r in dec if r["shape"] == shape})
        r16 = 16 if 16 in rs else rs[0]
        sel = {(r["S"], r["backend"]): r for r in dec if r["shape"] == shape and r["r"] == r16 and r["mode"] == mode}
        if not sel:
            continue
        S_t = 64 if any(k[0] == 64 for k in sel) else max(k[0] for k in sel)
        for be in ("cuda", "triton"):
            d = sel.get((S_t, be))
            if d:
                ratio = d.get("frac_of_floor", float("nan"))
                _metric(metrics, f"decode S={S_t} {shape} r={r16} [{be}, {mode}]", _fmt(d["us"], " us"),
                        _fmt(d.get("floor_us"), " us"), "-", _fmt(ratio, " of floor"),
                        f">= {TARGETS['decode_frac_of_floor']:.0%} of bytes floor",
                        (ratio >= TARGETS["decode_frac_of_floor"]) if _finite(ratio) else None, "decode.json", dry)
        speed = {S: sel[(S, "triton")]["us"] / sel[(S, "cuda")]["us"]
                 for S in sorted({k[0] for k in sel}) if S <= 256 and (S, "cuda") in sel and (S, "triton") in sel}
        if speed:
            worst = min(speed, key=speed.get)
            _metric(metrics, f"CUDA vs Triton decode {shape} r={r16} [{mode}], S<=256",
                    " ".join(f"S{S}:{v:.2f}x" for S, v in speed.items()), "-",
                    f"Triton {_fmt(sel[(worst, 'triton')]['us'], ' us')} at S={worst}", _fmt(speed[worst], "x (worst)"),
                    ">= 1.0x at every S <= 256", speed[worst] >= TARGETS["cuda_vs_triton"], "decode.json", dry)
        elif dec and not any(r["backend"] == "cuda" for r in dec):
            _metric(metrics, f"CUDA vs Triton decode {shape}", "-", "-", "-", "-", ">= 1.0x at every S <= 256", None,
                    "decode.json (no CUDA rows: extension not available)", dry)
            break

    per = (read_json(os.path.join(out, "perceiver.json")) or {}).get("rows", [])
    for r in per:
        if r.get("backend") != "triton" or not _finite(r.get("ms")):
            continue
        mf = r.get("min_flops", r.get("flops", 0.0))
        fm = floor_ms(r["floor_bytes"], mf)
        bound = "bytes"
        if _finite(fl) and _finite(bw) and mf / (fl * 1e12) > r["floor_bytes"] / (bw * 1e9):
            bound = "FLOPs"
        base = next((x for x in per if x.get("frames") == r["frames"] and x.get("backend") == "sdpa_padded"
                     and _finite(x.get("ms"))), None)
        ratio = fm / r["ms"] if _finite(fm) else float("nan")
        _metric(metrics, f"Perceiver fwd {r['frames']} frames ({r['seqs']} seqs x {r['rows_per_seq']} rows)",
                _fmt(r["ms"], " ms"), _fmt(fm, f" ms ({bound})"), f"padded SDPA {_fmt(base['ms'], ' ms')}" if base else "-",
                _fmt(ratio, " of floor"), f">= {TARGETS['perceiver_frac_of_floor']:.0%} of floor",
                (ratio >= TARGETS["perceiver_frac_of_floor"]) if _finite(ratio) else None, "perceiver.json", dry)

    e2e = (read_json(os.path.join(out, "end_to_end.json")) or {}).get("rows", [])
    for r in e2e:
        if r.get("kind") == "question" and r.get("sweep") == "frames" and _finite(r.get("ttft_adapter_ms")):
            ic = r.get("ttft_in_context_ms")
            ratio = ic / r["ttft_adapter_ms"] if _finite(ic) else float("nan")
            _metric(metrics, f"query TTFT {r['model']} {r['frames']} frames: in context / adapter",
                    _fmt(r["ttft_adapter_ms"], " ms"), "-",
                    f"in context {_fmt(ic, ' ms')} ({r.get('in_context_input_tokens')} tokens)", _fmt(ratio, "x"),
                    "> 1x (reported)", (ratio > 1.0) if _finite(ratio) else None, "end_to_end.json", dry)
    steps = (read_json(os.path.join(out, "suite.json")) or {}).get("steps", {})
    return {"env": env, "dry_run": dry, "ceilings": {"copy_gbps": bw, "bf16_tflops": fl}, "metrics": metrics,
            "steps": steps}


def render_summary(s: dict) -> str:
    env = s["env"]
    lines = []
    title = "f2l GPU suite" + (" -- DRY RUN on CPU: no number below measures anything" if s["dry_run"] else "")
    lines.append(f"# {title}\n")
    lines.append(f"device: {env.get('device')} | torch {env.get('torch')} | CUDA {env.get('cuda')} | "
                 f"triton {env.get('triton')} | commit {env.get('commit')} | {env.get('time')}")
    c = s["ceilings"]
    src = "measured" if _finite(env.get("measured_copy_gbps")) else "nominal"
    lines.append(f"ceilings ({src}): copy {_fmt(c['copy_gbps'], ' GB/s', '.0f')}, bf16 GEMM "
                 f"{_fmt(c['bf16_tflops'], ' TFLOP/s', '.0f')}; floor = max(bytes / copy bandwidth, FLOPs / GEMM rate)\n")
    if s["steps"]:
        lines.append("| step | status | seconds | note |")
        lines.append("|---|---|---|---|")
        for name, st in s["steps"].items():
            note = str(st.get("note", "")).replace("|", "/").replace("\n", " ")
            lines.append(f"| {name} | {st.get('status')} | {_fmt(st.get('seconds'), '', '.0f')} | {note[:300]} |")
        lines.append("")
    cols = ("metric", "value", "floor", "baseline", "ratio", "target", "verdict")
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "---|" * len(cols))
    for m in s["metrics"]:
        lines.append("| " + " | ".join(str(m[k]) for k in cols) + " |")
    if not s["metrics"]:
        lines.append("| (no result files yet) |" + " |" * (len(cols) - 1))
    return "\n".join(lines) + "\n"


def write_summary(out: str) -> dict:
    try:
        s = build_summary(out)
    except Exception as e:  # a malformed result file must not take the run down
        s = {"env": read_json(os.path.join(out, "env.json")) or {}, "dry_run": False,
             "ceilings": {"copy_gbps": None, "bf16_tflops": None}, "steps": {},
             "metrics": [{"metric": "summary failed", "value": f"{type(e).__name__}: {e}"[:200], "floor": "-",
                          "baseline": "-", "ratio": "-", "target": "-", "verdict": "error", "source": "-"}]}
    write_json(os.path.join(out, "summary.json"), s)
    atomic_write(os.path.join(out, "summary.md"), render_summary(s))
    return s


# =============================================================================== dispatch table


def dispatch_entries(rows: list[dict], device: str, *, margin: float = 0.03) -> list[dict]:
    """Winner per (d_in, d_out, rank bucket, S bucket, dtype) from decode rows: CUDA only
    where it beat Triton by ``margin`` in every timing mode measured for that key (eager
    and graph), else Triton (the safer choice)."""
    from f2l_kernels._tuned import RANK_EDGES, SEQ_EDGES, bucket

    short = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
    keyed: dict = {}
    for r in rows:
        if not _finite(r.get("us")) or r.get("backend") not in ("cuda", "triton"):
            continue
        rb, sb = bucket(r["r"], RANK_EDGES), bucket(r["S"], SEQ_EDGES)
        if rb is None or sb is None or rb != r["r"] or sb != r["S"]:
            continue  # only points measured at a bucket's edge stand for the bucket
        key = (short.get(r["dtype"], r["dtype"]), r["d_in"], r["d_out"], rb, sb)
        keyed.setdefault(key, {}).setdefault(r["mode"], {})[r["backend"]] = r["us"]
    out = []
    for (dt, d_in, d_out, rb, sb), modes in sorted(keyed.items()):
        both = {m: v for m, v in modes.items() if "cuda" in v and "triton" in v}
        if not both:
            continue
        cuda_wins = all(v["cuda"] * (1 + margin) <= v["triton"] for v in both.values())
        out.append({"device": device, "dtype": dt, "d_in": d_in, "d_out": d_out, "rank_bucket": rb, "seq_bucket": sb,
                    "winner": "cuda" if cuda_wins else "triton",
                    "cuda_us": {m: v["cuda"] for m, v in both.items()},
                    "triton_us": {m: v["triton"] for m, v in both.items()}})
    return out


def update_dispatch(results_dir: str, path: str = DISPATCH_PATH) -> dict:
    """Merge the decode winners measured in ``results_dir`` into the table at ``path``
    (entries of other devices and dtypes are kept; this device's are replaced)."""
    from f2l_kernels._tuned import RANK_EDGES, SCHEMA, SEQ_EDGES, VERSION, validate_decode_table

    data = read_json(os.path.join(results_dir, "decode.json"))
    if data is None:
        raise SystemExit(f"--update-dispatch: no readable decode.json in {results_dir} (run the decode step first)")
    env = data.get("env", {})
    if env.get("dry_run"):
        raise SystemExit(f"--update-dispatch: {results_dir}/decode.json is from a dry run: nothing was measured")
    device = env.get("device")
    if not device or device.startswith("cpu"):
        raise SystemExit(f"--update-dispatch: decode.json was not measured on a GPU (device {device!r})")
    new = dispatch_entries(data.get("rows", []), device)
    if not new:
        raise SystemExit("--update-dispatch: decode.json has no key timed on both CUDA and Triton "
                         "(was the extension built?)")
    for e in new:
        e.update(commit=env.get("commit"), measured=env.get("time"))
    old = read_json(path) if os.path.exists(path) else None
    kept = []
    if old is not None:
        try:
            validate_decode_table(old, where=path)
            dts = {e["dtype"] for e in new}
            kept = [e for e in old["entries"] if not (e["device"] == device and e["dtype"] in dts)]
        except ValueError as e:
            log(f"note: replacing the unusable table {path} ({e})")
    table = {"schema": SCHEMA, "version": VERSION, "rank_edges": list(RANK_EDGES), "seq_edges": list(SEQ_EDGES),
             "rule": "cuda where the CUDA decode kernel beat Triton by >= 3% in every mode timed (eager median, "
                     "CUDA-graph replay of L2-rotated layers) at the bucket's edge; triton otherwise and wherever "
                     "no entry matches",
             "entries": kept + new}
    validate_decode_table(table, where="the table being written")
    write_json(path, table)
    n_cuda = sum(e["winner"] == "cuda" for e in new)
    log(f"wrote {path}: {len(new)} entries for {device} ({n_cuda} cuda, {len(new) - n_cuda} triton), "
        f"{len(kept)} kept from other devices/dtypes")
    return table


# =============================================================================== orchestration


def export(out: str, dest: str | None) -> None:
    """Keep ``dest`` (e.g. the folder a remote GPU machine returns) current: one tarball of ``out`` plus the
    summary and the log as plain files (the tool brings back a few files, not trees)."""
    if not dest:
        return
    os.makedirs(dest, exist_ok=True)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(out, arcname=os.path.basename(os.path.normpath(out)))
    atomic_write(os.path.join(dest, "gpu_suite_results.tar.gz"), buf.getvalue())
    for name in ("summary.md", "summary.json", "suite.log", "decode_dispatch.json"):
        src = os.path.join(out, name)
        if os.path.exists(src):
            with open(src, "rb") as f:
                atomic_write(os.path.join(dest, name), f.read())


class Tee:
    def __init__(self, path: str):
        self.f = open(path, "a")
        self.out = sys.stdout

    def write(self, s):
        self.out.write(s)
        self.f.write(s)
        return len(s)

    def flush(self):
        self.out.flush()
        self.f.flush()


def default_out(dry_run: bool) -> str:
    if dry_run:
        return os.path.join(RESULTS, "dry-run")
    import torch

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return os.path.join(RESULTS, slug(name))


def orchestrate(args) -> int:
    t_start = time.time()
    if args.budget_s is None:
        args.budget_s = DRY_BUDGET_S if args.dry_run else DEFAULT_BUDGET_S
    deadline = t_start + args.budget_s
    out = os.path.abspath(args.out or default_out(args.dry_run))
    os.makedirs(out, exist_ok=True)
    if args.dry_run and not os.path.exists(os.path.join(out, ".gitignore")) and out.startswith(RESULTS):
        atomic_write(os.path.join(out, ".gitignore"), "*\n")
    suite_path = os.path.join(out, "suite.json")
    prev = read_json(suite_path) or {}
    if not args.only:  # a full run starts clean: drop the files an earlier run wrote here
        for st in prev.get("steps", {}).values():
            for f in st.get("files", []):
                p = os.path.join(out, f)
                if os.path.isfile(p) and os.path.dirname(os.path.abspath(p)) == out:
                    os.remove(p)
        for f in ("suite.log", "summary.md", "summary.json"):
            if os.path.exists(os.path.join(out, f)):
                os.remove(os.path.join(out, f))
        prev = {}
    sys.stdout = Tee(os.path.join(out, "suite.log"))
    steps = [s for s in STEPS if not args.only or s.name in args.only]
    record = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t_start)), "budget_s": args.budget_s,
              "dry_run": args.dry_run, "argv": sys.argv[1:], "steps": dict(prev.get("steps", {}))}
    log(f"f2l gpu suite{' (dry run)' if args.dry_run else ''}: {len(steps)} steps, budget {args.budget_s:.0f}s, "
        f"results in {out}")
    for s in steps:
        left = deadline - time.time() - RESERVE_S
        # dry run: the limits only guard against a hang (a shared CI machine may be slow)
        limit = min(s.budget_s if not args.dry_run else max(s.budget_s, DRY_STEP_LIMIT_S), left)
        if limit < s.min_s:
            record["steps"][s.name] = {"status": "skipped", "seconds": 0.0,
                                       "note": f"global deadline ({left:.0f}s left of --budget-s {args.budget_s:.0f})"}
            log(f"[{s.name}] skipped: global deadline")
            write_json(suite_path, record)
            continue
        log(f"[{s.name}] {s.what} (limit {limit:.0f}s)")
        t0 = time.time()
        soft = t0 + SOFT_FRACTION * limit
        cmd = [sys.executable, os.path.abspath(__file__), "--_child", s.name, "--out", out, "--_deadline", f"{soft:.3f}",
               "--_hard", f"{t0 + limit - 3:.3f}", "--build", args.build]
        if args.dry_run:
            cmd.append("--dry-run")
        if args.commit:
            cmd += ["--commit", args.commit]
        env = {"PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "TRITON_CACHE_AUTOTUNING": os.environ.get("TRITON_CACHE_AUTOTUNING", "1"),
               "TQDM_DISABLE": os.environ.get("TQDM_DISABLE", "1")}  # progress bars: noise in the logs
        if args.dry_run:
            # the CPU plan even where a GPU exists: the interpreter, tiny shapes
            env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
        if s.name == "parity":
            env["F2L_POISON_OUTPUTS"] = "1"  # unwritten output elements become NaN and fail
        elif s.name != "tests":  # tests/conftest.py sets its own; timings must not pay for the fill
            env["F2L_POISON_OUTPUTS"] = "0"
        res = run_cmd(cmd, timeout=limit, log_path=os.path.join(out, "logs", f"{s.name}.log"), env=env)
        st = read_json(os.path.join(out, f"step_{s.name}.json"))
        if res["timed_out"]:
            st = dict(st or {}, status="timeout", note=f"killed at its {limit:.0f}s limit; partial files kept")
        elif st is None or res["rc"] != 0:
            last = [ln for ln in res["tail"].splitlines() if ln.strip()][-1:] or [""]
            st = dict(st or {}, status="crashed", note=f"rc={res['rc']}: {last[0][:300]}")
        st["seconds"] = round(time.time() - t0, 1)
        st.setdefault("files", [])
        st["files"] = sorted(set(st["files"]) | {f"step_{s.name}.json", os.path.join("logs", f"{s.name}.log")})
        record["steps"][s.name] = st
        write_json(suite_path, record)
        log(f"[{s.name}] {st['status']} in {st['seconds']:.0f}s: {st.get('note', '')}")
        write_summary(out)
        export(out, args.export)
    if args.update_dispatch:
        if args.dry_run:
            log("--update-dispatch: skipped in a dry run (nothing is measured)")
        else:
            try:
                update_dispatch(out, args.dispatch_out or DISPATCH_PATH)
                shutil.copyfile(args.dispatch_out or DISPATCH_PATH, os.path.join(out, "decode_dispatch.json"))
            except SystemExit as e:
                log(str(e))
    record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    record["seconds"] = round(time.time() - t_start, 1)
    write_json(suite_path, record)
    s = write_summary(out)
    log("")
    log(render_summary(s))
    log(f"total {record['seconds']:.0f}s; files in {out}")
    export(out, args.export)
    failed = [n for n, st in record["steps"].items() if st.get("status") not in ("ok", "skipped")]
    return 1 if failed else 0


def child(args) -> int:
    step = next(s for s in STEPS if s.name == args._child)
    ctx = Ctx(out=os.path.abspath(args.out), dry_run=args.dry_run, deadline=args._deadline,
              hard_deadline=args._hard or args._deadline, args=args)
    path = os.path.join(ctx.out, f"step_{step.name}.json")
    try:
        rec = step.run(ctx) or {}
    except Exception as e:
        import traceback

        traceback.print_exc()
        rec = {"status": "failed", "note": f"{type(e).__name__}: {e}"[:500]}
    rec.setdefault("status", "ok")
    write_json(path, rec)
    return 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--dry-run", action="store_true", help="CPU / CI: the same plan on tiny shapes, nothing timed "
                   "that means anything; Triton through the interpreter")
    p.add_argument("--only", nargs="+", choices=STEP_NAMES, metavar="STEP", help=f"run only these ({', '.join(STEP_NAMES)})")
    p.add_argument("--list", action="store_true", help="print the steps and exit")
    p.add_argument("--budget-s", type=float, default=None,
                   help=f"global deadline in seconds (default {DEFAULT_BUDGET_S:.0f}; dry run {DRY_BUDGET_S:.0f})")
    p.add_argument("--out", default=None, help="results directory (default benchmarks/results/<device-slug>, "
                   "benchmarks/results/dry-run for --dry-run)")
    p.add_argument("--export", default=None, metavar="DIR", help="also keep DIR/gpu_suite_results.tar.gz, "
                   "summary.md/json and suite.log current (a folder a remote run returns)")
    p.add_argument("--commit", default=None, help="git commit to stamp on results where the tree has no .git")
    p.add_argument("--build", choices=("inplace", "pip"), default="inplace",
                   help="how the build step builds the extension (default: setup.py build_ext --inplace)")
    p.add_argument("--update-dispatch", action="store_true",
                   help="write the measured decode winner table to f2l_kernels/tuned/decode_dispatch.json")
    p.add_argument("--from", dest="from_dir", default=None, metavar="DIR",
                   help="with --update-dispatch: use DIR's decode.json, run nothing")
    p.add_argument("--dispatch-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_deadline", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--_hard", type=float, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._child:
        return child(args)
    if args.list:
        for s in STEPS:
            print(f"{s.name:10s} {s.budget_s:5.0f}s  {s.what}")
        print(f"global deadline: --budget-s {DEFAULT_BUDGET_S:.0f}; steps run in this order, each in its own process")
        return 0
    if args.from_dir:
        if not args.update_dispatch:
            raise SystemExit("--from needs --update-dispatch")
        update_dispatch(os.path.abspath(args.from_dir), args.dispatch_out or DISPATCH_PATH)
        return 0
    if not args.dry_run and not _has_gpu():
        raise SystemExit("gpu_suite.py: no CUDA GPU here; run with --dry-run for the CPU plan (tiny shapes, no timing)")
    return orchestrate(args)


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
