"""Ahead-of-time GPU-code gate: what every Triton launch compiles to on sm_90 / sm_80, with no GPU.

Three stages, each usable on its own (``benchmarks/gpu_suite.py`` and the tests import them):

1. **Capture** (:func:`capture`). The real public entry points (``lora_linear``,
   ``lora_delta`` incl. autograd backward, decode batches, composition lists, ragged ranks,
   ``perceiver_attention`` forward + backward) run with ``backend="triton"`` on CPU tensors
   in a process where ``TRITON_INTERPRET`` is not set, so the kernels carry their real
   autotune configs. ``JITFunction.run`` and ``Autotuner.run`` are patched to *record* each
   launch instead of running it: Triton's own binder (``create_function_from_signature`` with
   the CUDA backend of the target arch) and ``JITFunction._pack_args`` turn the bound
   arguments into exactly the signature (``*bf16``, ``i32``, ``constexpr`` ...) and
   specialisation (16-byte pointer alignment / ints divisible by 16 -> ``tt.divisibility=16``,
   ints == 1 -> constexpr) a GPU launch would compile. The SM count the launchers query is
   patched to the arch's (132 for H100, 108 for A100) so split decisions match a GPU.
   Outputs are garbage (nothing runs).
2. **Compile** (:func:`compile_launch`): ``triton.compile`` for ``GPUTarget("cuda", arch, 32)``
   of each deduplicated (kernel, signature, specialisation, constexprs, config); results are
   cached on disk keyed by the kernel's source hash and the Triton version
   (``$F2L_AOT_CACHE``, default ``~/.cache/f2l-aot``).
3. **Analyse** (:func:`analyse`): ptxas ``-v`` (the ptxas bundled with Triton) registers and
   spills, shared memory, occupancy, tensor-core instruction counts, MMA replication from
   the TTGIR, global-load widths inside loop bodies from the PTX; then verdicts
   (:func:`verdicts`) per config, per launch variant and per config across variants.

CLI::

    python benchmarks/aot.py                 # CI subset, sm90 + sm80, tables to benchmarks/results/aot
    python benchmarks/aot.py --full          # the full sweep (every shape, rank, dtype)
    python benchmarks/aot.py --repo PATH     # gate another checkout's f2l_kernels
    python benchmarks/aot.py --arch 90 --out /tmp/aot --jobs 2

Exit status 1 when the gate fails (see ``docs/aot.md`` for the rules and how to read the table).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable

ROOT = Path(__file__).resolve().parents[1]
TOOL_VERSION = "1"  # bump when the analysis changes, so cached results are recomputed


# --------------------------------------------------------------------------- arch facts


@dataclasses.dataclass(frozen=True)
class Arch:
    cc: int
    sms: int                 # SM count the launchers are told (H100 SXM / A100)
    smem_block_limit: int    # max dynamic shared memory per block (opt-in)
    smem_per_sm: int
    regs_per_sm: int = 65536
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    reg_alloc_unit: int = 256    # registers per warp are allocated in this unit
    smem_alloc_unit: int = 128
    smem_reserved_per_block: int = 1024

    @property
    def name(self) -> str:
        return f"sm{self.cc}"


ARCHS = {
    90: Arch(cc=90, sms=132, smem_block_limit=227 * 1024, smem_per_sm=228 * 1024),
    80: Arch(cc=80, sms=108, smem_block_limit=163 * 1024, smem_per_sm=164 * 1024),
}


def occupancy(arch: Arch, regs: int, smem: int, num_warps: int) -> dict:
    """Resident blocks per SM from registers, shared memory and warps (the CUDA occupancy
    calculator's rules for cc 8.x/9.x, without the per-sub-partition detail)."""
    regs_per_warp = math.ceil(max(regs, 1) * 32 / arch.reg_alloc_unit) * arch.reg_alloc_unit
    by_regs = (arch.regs_per_sm // regs_per_warp) // num_warps
    smem_block = math.ceil((smem + arch.smem_reserved_per_block) / arch.smem_alloc_unit) * arch.smem_alloc_unit
    by_smem = arch.smem_per_sm // smem_block
    by_warps = arch.max_warps_per_sm // num_warps
    blocks = max(0, min(by_regs, by_smem, by_warps, arch.max_blocks_per_sm))
    limiter = min((by_regs, "regs"), (by_smem, "smem"), (by_warps, "warps"), (arch.max_blocks_per_sm, "blocks"))[1]
    return {"blocks_per_sm": blocks, "warps_per_sm": blocks * num_warps,
            "occupancy": blocks * num_warps / arch.max_warps_per_sm, "limiter": limiter}


# --------------------------------------------------------------------------- parsers

_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(log: str) -> dict:
    """Registers, stack, spill stores/loads (bytes), static smem and warnings from ``ptxas -v``."""
    out = {"regs": None, "stack": 0, "spill_stores": 0, "spill_loads": 0, "static_smem": 0, "ptxas_warnings": []}
    m = _PTXAS_REGS.search(log)
    if m:
        out["regs"] = int(m.group(1))
    m = _PTXAS_SPILL.search(log)
    if m:
        out["stack"], out["spill_stores"], out["spill_loads"] = (int(g) for g in m.groups())
    m = _PTXAS_SMEM.search(log)
    if m:
        out["static_smem"] = int(m.group(1))
    out["ptxas_warnings"] = [ln.strip() for ln in log.splitlines() if "warning" in ln.lower()]
    return out


_MMA_DEF = re.compile(r"^(#[\w.]+)\s*=\s*#ttg\.nvidia_mma<\{(.*?)\}>", re.M)
_RESULT = re.compile(r"->\s*tensor<(\d+)x(\d+)x\w+,\s*(#[\w.]+(?:<\{.*?\}>)?)>")


def _ints(field: str, text: str) -> list[int] | None:
    m = re.search(field + r"\s*=\s*\[([\d,\s]+)\]", text)
    return [int(v) for v in m.group(1).split(",")] if m else None


def mma_replication(ttgir: str) -> list[dict]:
    """For each dot in a TTGIR module whose result is in an ``nvidia_mma`` layout:
    ``replication = max(1, wm·im/M) · max(1, wn·in/N)`` with ``warpsPerCTA = [wm, wn]``,
    ``instrShape = [im, in, ...]`` and result ``[M, N]``. > 1 means several warps compute
    the same output tile (on Hopper a warpgroup covers 64 rows: 4 warps × im = 16)."""
    layouts = {name: body for name, body in _MMA_DEF.findall(ttgir)}
    dots = []
    for line in ttgir.splitlines():
        if not re.search(r"\b(tt\.dot|ttng\.warp_group_dot|tt\.dot_scaled)\b", line):
            continue
        m = _RESULT.search(line)
        if not m:
            continue
        M, N, lay = int(m.group(1)), int(m.group(2)), m.group(3)
        body = layouts.get(lay)
        if body is None and "nvidia_mma" in lay:
            body = lay
        if body is None:
            dots.append({"shape": [M, N], "mma": None, "replication": None})
            continue
        wpc, ins = _ints("warpsPerCTA", body), _ints("instrShape", body)
        vmaj = re.search(r"versionMajor\s*=\s*(\d+)", body)
        wm, wn = wpc[0], wpc[1]
        im, in_ = ins[0], ins[1]
        rep = max(1, wm * im // M) * max(1, wn * in_ // N)
        dots.append({"shape": [M, N], "mma": int(vmaj.group(1)) if vmaj else None, "warps": [wm, wn],
                     "instr": ins, "replication": rep})
    return dots


_TTIR_DOT = re.compile(r"tt\.dot\s.*?(?:inputPrecision\s*=\s*(\w+))?.*?:\s*tensor<[\dx]+x(\w+)[,>]")


def dot_kinds(ttir: str) -> list[dict]:
    """Operand element type and input precision of each ``tt.dot`` in the TTIR."""
    out = []
    for line in ttir.splitlines():
        if not re.search(r"\btt\.dot\b", line):
            continue
        prec = re.search(r"inputPrecision\s*=\s*(\w+)", line)
        ty = re.search(r":\s*tensor<[\dx]+x(\w+)[,>]", line)
        # Triton prints inputPrecision only when it is not the default, IEEE
        out.append({"operand": ty.group(1) if ty else "?", "precision": prec.group(1) if prec else "ieee"})
    return out


def needs_tensor_cores(kind: dict) -> bool:
    """fp32 operands with IEEE precision legitimately run on FMA units; every other dot
    (bf16/fp16/fp8 operands, tf32) must reach the tensor cores."""
    return not (kind["operand"] == "f32" and kind["precision"] == "ieee")


def tensor_core_counts(ptx: str) -> dict:
    return {"wgmma": len(re.findall(r"\bwgmma\.mma_async\b", ptx)),
            "mma_sync": len(re.findall(r"\bmma\.sync\b", ptx))}


_LABEL = re.compile(r"^\s*(\$L\w+):")
_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L\w+)\s*;")
_TYPE_BYTES = {"b8": 1, "u8": 1, "s8": 1, "b16": 2, "u16": 2, "s16": 2, "f16": 2, "bf16": 2,
               "b32": 4, "u32": 4, "s32": 4, "f32": 4, "b64": 8, "u64": 8, "s64": 8, "f64": 8, "b128": 16}
_PARAM = re.compile(r"ld\.param\.\w+\s+(%\w+),\s*\[(\w+?)_param_(\d+)\]")
_REG = re.compile(r"%\w+")


def loop_ranges(lines: list[str]) -> list[tuple[int, int]]:
    """Loop bodies: [label line, branch line] for every branch back to an earlier label."""
    where = {}
    loops = []
    for i, ln in enumerate(lines):
        m = _LABEL.match(ln)
        if m:
            where[m.group(1)] = i
        b = _BRANCH.search(ln)
        if b and b.group(1) in where and where[b.group(1)] < i:
            loops.append((where[b.group(1)], i))
    return loops


def _load_width(instr: str) -> tuple[str, int | None]:
    """(kind, bytes) of a global load instruction's mnemonic+operands."""
    mnem = instr.split()[0]
    if mnem.startswith("cp.async.bulk"):
        return "bulk", None
    if mnem.startswith("cp.async"):
        m = re.search(r",\s*(0x[0-9a-fA-F]+|\d+)\s*(?:,|;)", instr)
        return "cp.async", int(m.group(1), 0) if m else None
    parts = mnem.split(".")
    vec = 1
    size = None
    for p in parts:
        if p in ("v2", "v4", "v8"):
            vec = int(p[1])
        if p in _TYPE_BYTES:
            size = _TYPE_BYTES[p]
    return "ld", vec * size if size else None


def _pointer_sources(lines: list[str], pointer_params: set[int]) -> dict[str, set[int]]:
    """Which pointer parameters each register's value derives from (address arithmetic only:
    the result of a load is data, it does not inherit its address's parameter)."""
    src: dict[str, set[int]] = defaultdict(set)
    for _ in range(6):  # fixed point over loop-carried registers
        changed = False
        for ln in lines:
            s = ln.strip()
            if not s or s.startswith(("//", ".", "$", "{", "}")):
                continue
            if s.startswith("@"):
                s = s.split(None, 1)[1] if " " in s else ""
            m = _PARAM.search(s)
            if m:
                if int(m.group(3)) in pointer_params and not src[m.group(1)] >= {int(m.group(3))}:
                    src[m.group(1)].add(int(m.group(3)))
                    changed = True
                continue
            mnem, _, ops = s.partition(" ")
            if mnem.startswith(("ld.", "st.", "cp.", "bra", "setp", "bar", "ret", "wgmma", "mma", "atom", "red")):
                continue
            regs = _REG.findall(ops)
            if len(regs) < 2 or ops.lstrip().startswith("{"):
                continue
            dest, srcs = regs[0], regs[1:]
            new = set().union(*(src.get(r, set()) for r in srcs))
            if not new <= src[dest]:
                src[dest] |= new
                changed = True
        if not changed:
            break
    return src


def global_loads(ptx: str, arg_names: list[str] | None = None) -> list[dict]:
    """Every global load (``ld.global*``, ``cp.async*``) with its width in bytes, whether it
    sits inside a loop body, and, where the address can be traced to a pointer parameter,
    that argument's name (``arg_names``: the kernel's non-constexpr arguments in order, as
    in the PTX params)."""
    lines = ptx.splitlines()
    loops = loop_ranges(lines)
    inside = set()
    for a, b in loops:
        inside.update(range(a, b + 1))
    params = {}
    for ln in lines:
        m = re.search(r"\.param\s+\.(\w+)(\s+\.ptr)?.*?_param_(\d+)", ln)
        if m and ".param" in ln and "ld.param" not in ln:
            params[int(m.group(3))] = bool(m.group(2)) or m.group(1) == "u64"
    pointer_params = {i for i, is_ptr in params.items() if is_ptr}
    src = _pointer_sources(lines, pointer_params)
    out = []
    for i in range(len(lines)):
        s = lines[i].strip()
        if s.startswith("@"):
            s = s.split(None, 1)[1] if " " in s else ""
        if not (s.startswith("ld.global") or s.startswith("cp.async")):
            continue
        if s.startswith(("cp.async.commit", "cp.async.wait", "cp.async.bulk.commit", "cp.async.bulk.wait")):
            continue
        kind, width = _load_width(s)
        addr = re.search(r"\[\s*(%\w+)", s.split(",", 1)[1] if s.startswith("cp.async") else s)
        ps = sorted(src.get(addr.group(1), set())) if addr else []
        names = [arg_names[p] if arg_names and p < len(arg_names) else f"param_{p}" for p in ps]
        out.append({"line": i, "kind": kind, "bytes": width, "args": names, "in_loop": i in inside})
    return out


def loop_loads(ptx: str, arg_names: list[str] | None = None) -> list[dict]:
    """The global loads inside loop bodies (labels targeted by a backward branch)."""
    return [ld for ld in global_loads(ptx, arg_names) if ld["in_loop"]]


def _scalar(ld: dict) -> bool:
    return ld["bytes"] is not None and ld["bytes"] <= 2


def summarize_loads(loads: list[dict]) -> dict:
    """Loop loads by ``kind:bytes``, the scalar (<= 2-byte) ones per argument; loads outside
    loops only as a count of scalar ones (reported, not a verdict)."""
    outside = [ld for ld in loads if not ld.get("in_loop", True)]
    loads = [ld for ld in loads if ld.get("in_loop", True)]
    by_width: dict[str, int] = defaultdict(int)
    scalar_args: dict[str, int] = defaultdict(int)
    for ld in loads:
        by_width[f"{ld['kind']}:{ld['bytes']}"] += 1
        if ld["bytes"] is not None and ld["bytes"] <= 2:
            for a in ld["args"] or ["?"]:
                scalar_args[a] += 1
    out_args: dict[str, int] = defaultdict(int)
    for ld in outside:
        if _scalar(ld):
            for a in ld["args"] or ["?"]:
                out_args[a] += 1
    return {"by_width": dict(sorted(by_width.items())), "scalar": sum(map(_scalar, loads)),
            "scalar_args": dict(scalar_args), "scalar_outside_loops": sum(map(_scalar, outside)),
            "scalar_outside_args": dict(out_args)}


# --------------------------------------------------------------------------- serialisation


def _enc(v):
    """JSON-able form of a constexpr / attr value (tl.dtype by name)."""
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_enc(x) for x in v]
    name = getattr(v, "name", None)
    if name is not None and type(v).__name__ in ("dtype", "pointer_type"):
        return {"tl_dtype": str(v)}
    return {"repr": repr(v)}


def _dec(v):
    import triton.language as tl
    if isinstance(v, dict) and "tl_dtype" in v:
        return getattr(tl, {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(v["tl_dtype"],
                                                                                          v["tl_dtype"]))
    if isinstance(v, dict) and "repr" in v:
        raise ValueError(f"constexpr value {v['repr']} cannot be rebuilt for compilation")
    return v


def _is_jit(obj) -> bool:
    from triton.runtime.jit import JITFunction
    return isinstance(obj, JITFunction)


def _jit_of(obj):
    while not _is_jit(obj):
        obj = obj.fn
    return obj


# --------------------------------------------------------------------------- capture


class Recorder:
    """Patches Triton's launch path to record launches; one per capture process."""

    def __init__(self, archs: Iterable[int]):
        from triton.backends.compiler import GPUTarget
        from triton.compiler.compiler import make_backend
        self.archs = list(archs)
        self.backends = {a: make_backend(GPUTarget("cuda", a, 32)) for a in self.archs}
        self.binders: dict = {}
        self.records: list[dict] = []
        self.scenario = ""
        self._tune: dict | None = None

    def _binder(self, jit, arch):
        from triton.runtime.jit import create_function_from_signature
        key = (id(jit), arch)
        if key not in self.binders:
            self.binders[key] = create_function_from_signature(jit.signature, jit.params, self.backends[arch])
        return self.binders[key]

    def record(self, jit, args, kwargs, grid):
        from triton import knobs
        kwargs = dict(kwargs)
        # the same option defaults JITFunction.run applies before binding
        kwargs["debug"] = kwargs.get("debug", jit.debug) or knobs.runtime.debug
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        tune = self._tune
        for arch in self.archs:
            be = self.backends[arch]
            bound, spec, opts = self._binder(jit, arch)(*args, **kwargs)
            options, signature, constexprs, attrs = jit._pack_args(be, kwargs, bound, spec, opts)
            fields = set(options.__dict__)
            opt_kwargs = {k: v for k, v in kwargs.items() if k in fields and k not in signature}
            g = grid(bound) if callable(grid) else grid
            g = [int(v) for v in (list(g) + [1, 1])[:3]]
            config_keys = set(tune["config_keys"]) if tune else {"num_warps", "num_stages", "num_ctas", "maxnreg"}
            config = {k: v for k, v in kwargs.items() if k in config_keys}
            config.setdefault("num_warps", options.num_warps)
            config.setdefault("num_stages", options.num_stages)
            const_items = [[list(p), _enc(v)] for p, v in sorted(constexprs.items())]
            names = [p.name for p in jit.params]
            self.records.append({
                "arch": arch,
                "kernel": f"{jit.fn.__module__}:{jit.fn.__qualname__}",
                "kernel_hash": jit.cache_key,
                "signature": signature,
                "constexprs": const_items,
                "attrs": [[list(p), _enc(v)] for p, v in sorted(attrs.items())],
                "opt_kwargs": {k: _enc(v) for k, v in sorted(opt_kwargs.items())},
                "config": {k: _enc(v) for k, v in sorted(config.items())},
                "config_index": tune["index"] if tune else 0,
                "num_configs": len(tune["configs"]) if tune else 1,
                "autotuned": bool(tune),
                "autotune_key": tune["key"] if tune else None,
                "grid": g,
                "arg_names": [n for n, t in zip(names, signature.values()) if t != "constexpr"],
                "scenario": self.scenario,
            })

    @contextlib.contextmanager
    def patched(self):
        from triton.runtime import autotuner as _at
        from triton.runtime import jit as _jit
        rec = self
        orig_jit_run, orig_tune_run = _jit.JITFunction.run, _at.Autotuner.run

        def jit_run(self, *args, grid, warmup, **kwargs):
            rec.record(self, args, kwargs, grid)
            return None

        def tune_run(self, *args, **kwargs):
            self.nargs = dict(zip(self.arg_names, args))
            configs = self.prune_configs(kwargs) if self.early_config_prune else self.configs
            all_args = {**self.nargs, **kwargs}
            key = {k: _enc(all_args[k]) for k in self.keys if k in all_args}
            ckeys = set()
            for c in configs:
                ckeys |= set(c.all_kwargs())
            ckeys |= {"num_warps", "num_stages", "num_ctas", "maxnreg"}
            try:
                for i, c in enumerate(configs):
                    rec._tune = {"index": i, "configs": configs, "config_keys": ckeys, "key": key}
                    self.fn.run(*args, **kwargs, **c.all_kwargs())
            finally:
                rec._tune = None
                self.nargs = None
            return None

        _jit.JITFunction.run, _at.Autotuner.run = jit_run, tune_run
        try:
            yield self
        finally:
            _jit.JITFunction.run, _at.Autotuner.run = orig_jit_run, orig_tune_run


@contextlib.contextmanager
def _gpu_facts(sms: int):
    """Make the launchers see a GPU of ``sms`` SMs and accept ``backend='triton'`` on CPU
    tensors. Generic over the kernel files: any module-level ``_num_sms``/``num_sms``/
    ``_sm_count`` helper in ``f2l_kernels`` is replaced (and its cache cleared), and so is
    ``torch.cuda.get_device_properties``; every module's ``resolve_backend`` binding lets
    an explicit ``triton`` through."""
    import types

    import torch

    import importlib
    import pkgutil

    import f2l_kernels
    from f2l_kernels import _backend
    # launchers import their kernel modules lazily: load them all first so every helper is
    # patched before the first launch
    for info in pkgutil.walk_packages(f2l_kernels.__path__, "f2l_kernels."):
        with contextlib.suppress(Exception):
            importlib.import_module(info.name)
    saved = []

    def setattr_saved(obj, name, value):
        saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    orig_resolve = _backend.resolve_backend

    def resolve(backend, device, **kw):
        if _backend.requested_backend(backend) == "triton":
            return "triton"
        return orig_resolve(backend, device, **kw)

    props = types.SimpleNamespace(multi_processor_count=sms, name=f"aot-{sms}sm",
                                  total_memory=80 << 30, major=9, minor=0)
    setattr_saved(torch.cuda, "get_device_properties", lambda *a, **k: props)
    for name, mod in list(sys.modules.items()):
        if not (name == "f2l_kernels" or name.startswith("f2l_kernels.")) or mod is None:
            continue
        for attr, val in list(vars(mod).items()):
            if val is orig_resolve:
                setattr_saved(mod, attr, resolve)
            elif callable(val) and attr in ("_num_sms", "num_sms", "_sm_count", "sm_count"):
                setattr_saved(mod, attr, lambda *a, **k: sms)
            elif isinstance(val, dict) and attr in ("_SM_COUNT", "_NUM_SMS"):
                setattr_saved(mod, attr, {})
            elif hasattr(val, "cache_clear"):
                val.cache_clear()  # plans cached under the CPU SM count
    try:
        yield
    finally:
        for obj, name, val in reversed(saved):
            setattr(obj, name, val)
        for name, mod in list(sys.modules.items()):
            if (name == "f2l_kernels" or name.startswith("f2l_kernels.")) and mod is not None:
                for val in list(vars(mod).values()):
                    if hasattr(val, "cache_clear"):
                        val.cache_clear()


# --------------------------------------------------------------------------- scenarios

MODEL_SHAPES = {"256M": (1536, 576), "500M": (2560, 960), "2.2B": (8192, 2048)}
DTYPES = ("bf16", "fp16", "fp32")


@dataclasses.dataclass
class Scenario:
    name: str
    fn: Callable[[Any], None]   # fn(torch dtype): calls the public API
    ci: tuple[str, ...] = ()    # dtypes this scenario runs with in the CI subset


def _lora_pool(torch, P, r_max, d_in, d_out, dtype, grad=False):
    a = torch.randn(P, r_max, d_in, dtype=dtype) * 0.02
    b = torch.randn(P, d_out, r_max, dtype=dtype) * 0.02
    if grad:
        a.requires_grad_(True)
        b.requires_grad_(True)
    return a, b


def _lora_scenario(shape, seq_lens, adapter_ids, r_max, *, ranks=None, mode="linear", grad=False,
                   out=False, scale_vec=False):
    def fn(dtype):
        import torch

        import f2l_kernels as fk
        d_in, d_out = MODEL_SHAPES[shape]
        flat = [i for ids in adapter_ids for i in (ids if isinstance(ids, list) else [ids]) if i is not None]
        P = max([4] + [i + 1 for i in flat])
        batch = fk.LoraBatch.build(seq_lens, adapter_ids, ranks=ranks)
        n = sum(seq_lens)
        x = torch.randn(n, d_in, dtype=dtype, requires_grad=grad)
        a, b = _lora_pool(torch, P, r_max, d_in, d_out, dtype, grad)
        scale = torch.full((P,), 2.0) if scale_vec else 2.0
        if mode == "linear":
            w = torch.randn(d_out, d_in, dtype=dtype) * 0.02
            bias = torch.randn(d_out, dtype=dtype)
            y = fk.lora_linear(x, w, bias, a, b, batch, scale, backend="triton")
        elif out:
            y = torch.zeros(n, d_out, dtype=dtype)
            fk.lora_delta(x, a, b, batch, scale, out=y, backend="triton")
        else:
            y = fk.lora_delta(x, a, b, batch, scale, backend="triton")
        if grad:
            y.float().sum().backward()
    return fn


def _perceiver_scenario(seq_rows, *, grad=False, latents=True):
    def fn(dtype):
        import itertools

        import torch

        import f2l_kernels as fk
        H, Hkv, Dh, M, Dc = 16, 4, 128, 8, 512
        S = len(seq_rows)
        cu = torch.tensor([0] + list(itertools.accumulate(seq_rows)), dtype=torch.int32)
        q = torch.randn(S, M, H, Dh, dtype=dtype, requires_grad=grad)
        ctx = torch.randn(int(cu[-1]), Dc, dtype=dtype, requires_grad=grad)
        wk = (torch.randn(Hkv * Dh, Dc, dtype=dtype) * 0.02).requires_grad_(grad)
        wv = (torch.randn(Hkv * Dh, Dc, dtype=dtype) * 0.02).requires_grad_(grad)
        nw = torch.ones(Dc, dtype=dtype, requires_grad=grad)
        lk = torch.randn(S, M, Hkv, Dh, dtype=dtype, requires_grad=grad) if latents else None
        lv = torch.randn(S, M, Hkv, Dh, dtype=dtype, requires_grad=grad) if latents else None
        out = fk.perceiver_attention(q, ctx, cu, wk, wv, norm_weight=nw, latent_k=lk, latent_v=lv,
                                     backend="triton")
        if grad:
            out.float().sum().backward()
    return fn


def scenarios(full: bool) -> list[Scenario]:
    """The launch sweep. ``ci`` marks the representative subset (500M shapes in bf16, with
    fp16 and fp32 checks; the 256M and 2.2B extremes): short prefill (BLOCK_M=16) and long
    prefill, decode at 1/16/64 rows, rank-128 compositions and ragged ranks in prefill and
    decode, the backward, a split + empty Perceiver batch."""
    B16, B16F32, F16 = ("bf16",), ("bf16", "fp32"), ("fp16",)
    out: list[Scenario] = []
    for shape in MODEL_SHAPES:
        main = shape == "500M"
        for r in (16, 32, 64):
            base = main and r == 16
            edge = shape != "500M" and r == 16  # the smallest and largest d_in/d_out
            for T in (7, 64, 300):
                lens = [T, T, max(1, T // 2)]
                ids = [0, 2, -1]
                ci = (B16 if T == 7 else B16F32 if T == 300 else F16) if base else \
                    (B16 if edge and T in (7, 300) else ())
                out.append(Scenario(f"lora_linear/{shape}/r{r}/prefill T{T}", _lora_scenario(shape, lens, ids, r),
                                    ci=ci))
                out.append(Scenario(f"lora_linear/{shape}/r{r}/prefill T{T}/backward",
                                    _lora_scenario(shape, lens, ids, r, grad=True), ci=B16 if base and T == 7 else ()))
                out.append(Scenario(f"lora_delta/{shape}/r{r}/prefill T{T}",
                                    _lora_scenario(shape, lens, ids, r, mode="delta")))
                out.append(Scenario(f"lora_delta/{shape}/r{r}/prefill T{T}/out=",
                                    _lora_scenario(shape, lens, ids, r, mode="delta", out=True)))
            for S in (1, 16, 64):
                ids = [i % 4 for i in range(S)]
                out.append(Scenario(f"lora_linear/{shape}/r{r}/decode S{S}", _lora_scenario(shape, [1] * S, ids, r),
                                    ci=B16 if base or (edge and S in (1, 64)) else ()))
                out.append(Scenario(f"lora_delta/{shape}/r{r}/decode S{S}/out=",
                                    _lora_scenario(shape, [1] * S, ids, r, mode="delta", out=True)))
                out.append(Scenario(f"lora_linear/{shape}/r{r}/decode S{S}/backward",
                                    _lora_scenario(shape, [1] * S, ids, r, grad=True)))
        # compositions up to rank 128 (two rank-64 entries), ragged ranks, per-entry scale
        comp = [[0, 1], [2, 3], 1]
        out.append(Scenario(f"lora_linear/{shape}/compose 2x64/prefill T64",
                            _lora_scenario(shape, [64, 64, 30], comp, 64), ci=B16 if main else ()))
        out.append(Scenario(f"lora_linear/{shape}/compose 2x64/decode S16",
                            _lora_scenario(shape, [1] * 16, [comp[i % 3] for i in range(16)], 64),
                            ci=B16 if main else ()))
        out.append(Scenario(f"lora_linear/{shape}/compose 2x64/prefill T64/backward",
                            _lora_scenario(shape, [64, 64, 30], comp, 64, grad=True)))
        ragged = [16, 32, 64, 8]
        out.append(Scenario(f"lora_linear/{shape}/ragged/prefill T300/scale[P]",
                            _lora_scenario(shape, [300, 7, 64], [0, [1, 2], 3], 64, ranks=ragged, scale_vec=True),
                            ci=B16 if main else ()))
        out.append(Scenario(f"lora_linear/{shape}/ragged/decode S64/scale[P]",
                            _lora_scenario(shape, [1] * 64, [[0, 1], 2, 3, -1] * 16, 64, ranks=ragged,
                                           scale_vec=True), ci=B16 if main else ()))
    # Perceiver: 12 frames x 64 tokens per (layer, video) and a 1,024-frame (65k-row) video
    # packed with an empty sequence
    out.append(Scenario("perceiver/12x64 x4", _perceiver_scenario([768] * 4), ci=F16))
    out.append(Scenario("perceiver/12x64 x4/backward", _perceiver_scenario([768] * 4, grad=True)))
    out.append(Scenario("perceiver/65k+empty+768", _perceiver_scenario([65536, 0, 768]), ci=("fp32",)))
    out.append(Scenario("perceiver/65k+empty+768/backward", _perceiver_scenario([65536, 0, 768], grad=True),
                        ci=B16))
    out.append(Scenario("perceiver/12x64 x4/no latents", _perceiver_scenario([768] * 4, latents=False)))
    return out if full else [s for s in out if s.ci]


def capture(full: bool = False, archs: Iterable[int] = (90, 80), dtypes: Iterable[str] = DTYPES,
            only: str | None = None) -> dict:
    """Run the scenarios with launches recorded (must run with ``TRITON_INTERPRET`` unset)."""
    import warnings

    import torch

    from f2l_kernels._backend import interpret_mode
    if interpret_mode():
        raise RuntimeError("capture: TRITON_INTERPRET=1 is set; the kernels would carry interpreter configs "
                           "(use run(), which starts a clean subprocess)")
    import f2l_kernels
    tdt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    records, errors = [], []
    torch.manual_seed(0)
    for arch in archs:
        rec = Recorder([arch])
        with _gpu_facts(ARCHS[arch].sms), rec.patched(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for sc in scenarios(full or bool(only)):
                if only and only not in sc.name:
                    continue
                for dt in [d for d in dtypes if full or only or d in sc.ci]:
                    rec.scenario = f"{sc.name}/{dt}"
                    try:
                        sc.fn(tdt[dt])
                    except Exception as e:  # a launcher that cannot even be captured fails the gate
                        errors.append({"arch": arch, "scenario": rec.scenario, "error": f"{type(e).__name__}: {e}"})
        records.extend(rec.records)
    return {"records": records, "capture_errors": errors, "f2l_kernels": str(Path(f2l_kernels.__file__).parent)}


# --------------------------------------------------------------------------- compile + analyse


def cache_dir() -> Path:
    return Path(os.environ.get("F2L_AOT_CACHE") or Path.home() / ".cache" / "f2l-aot")


def compile_key(rec: dict) -> str:
    import triton
    blob = json.dumps([TOOL_VERSION, triton.__version__, rec["kernel"], rec["kernel_hash"], rec["arch"],
                       rec["signature"], rec["constexprs"], rec["attrs"], rec["opt_kwargs"]], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _atomic_write(path: Path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


_PTXAS_LOGS: list[str] = []


def _capture_ptxas_logs():
    """Keep the ``ptxas -v`` log of Triton's own ptxas run (Triton discards it)."""
    from triton.backends.nvidia import compiler as nvc
    if getattr(nvc.subprocess, "_f2l_aot", False):
        return
    real = nvc.subprocess

    class _Sub:
        _f2l_aot = True

        def __getattr__(self, name):
            return getattr(real, name)

        @staticmethod
        def run(cmd, *a, **kw):
            r = real.run(cmd, *a, **kw)
            f = kw.get("stderr")
            if "-v" in cmd and hasattr(f, "name"):
                with open(f.name) as fh:
                    _PTXAS_LOGS.append(fh.read())
            return r

    nvc.subprocess = _Sub()


def _ptxas_v(ptx: str, arch: int) -> str:
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "k.ptx"
        p.write_text(ptx)
        r = subprocess.run([get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
                            f"--gpu-name={sm_arch_from_capability(arch)}", str(p), "-o", str(Path(d) / "k.o")],
                           capture_output=True, text=True)
        return r.stderr


def compile_launch(rec: dict, keep_asm: Path | None = None) -> dict:
    """Compile one recorded launch for its arch and measure it (no verdicts)."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend
    mod, qual = rec["kernel"].split(":")
    obj = importlib.import_module(mod)
    for part in qual.split("."):
        obj = getattr(obj, part)
    jit = _jit_of(obj)
    if jit.cache_key != rec["kernel_hash"]:
        raise RuntimeError(f"{rec['kernel']}: the kernel source changed between capture and compile")
    arch = rec["arch"]
    target = GPUTarget("cuda", arch, 32)
    be = make_backend(target)
    options = be.parse_options({k: _dec(v) for k, v in rec["opt_kwargs"].items()})
    constexprs = {tuple(p): _dec(v) for p, v in rec["constexprs"]}
    attrs = {tuple(p): v for p, v in rec["attrs"]}
    src = ASTSource(jit, dict(rec["signature"]), constexprs, attrs)
    _capture_ptxas_logs()
    _PTXAS_LOGS.clear()
    t0 = time.time()
    try:
        ck = triton.compile(src, target=target, options=options.__dict__)
    except Exception as e:
        msg = f"{type(e).__name__}: {e}"
        return {"ok": False, "error": msg[:2000], "compile_s": round(time.time() - t0, 2)}
    dt = time.time() - t0
    ptx, ttgir, ttir = ck.asm["ptx"], ck.asm.get("ttgir", ""), ck.asm.get("ttir", "")
    log = _PTXAS_LOGS[-1] if _PTXAS_LOGS else _ptxas_v(ptx, arch)  # Triton's cache skips ptxas
    res = {"ok": True, "compile_s": round(dt, 2), **parse_ptxas(log)}
    res["smem"] = int(ck.metadata.shared) + res["static_smem"]
    res["num_warps"] = int(ck.metadata.num_warps)
    res.update(occupancy(ARCHS[arch], res["regs"] or 0, res["smem"], res["num_warps"]))
    res["tensor_cores"] = tensor_core_counts(ptx)
    res["dots"] = dot_kinds(ttir)
    res["mma"] = mma_replication(ttgir)
    res["loop_loads"] = summarize_loads(global_loads(ptx, rec["arg_names"]))
    if keep_asm is not None:
        stem = f"{qual}-{compile_key(rec)[:12]}"
        keep_asm.mkdir(parents=True, exist_ok=True)
        for ext in ("ttgir", "ptx"):
            _atomic_write(keep_asm / f"{stem}.{ext}", ck.asm[ext])
    return res


class _Workers:
    """``n`` compile processes (``aot.py _worker``: one JSON record per stdin line, one JSON
    result per stdout line), fed from a shared queue so the load balances. Plain
    subprocesses rather than a multiprocessing pool: they run this file as a script, so
    they work however the caller imported the tool, with ``repo`` first on their path."""

    def __init__(self, n: int, env: dict, repo: Path, keep_asm: str | None):
        self.n, self.env, self.repo, self.keep_asm = n, env, repo, keep_asm
        self.logdir = tempfile.mkdtemp(prefix="f2l-aot-")
        self.procs = [self._start(i) for i in range(n)]

    def _start(self, i):
        cmd = [sys.executable, str(Path(__file__).resolve()), "_worker"]
        if self.keep_asm:
            cmd += ["--keep-asm", self.keep_asm]
        err = open(Path(self.logdir) / f"worker{i}.log", "a")
        return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
                                env=self.env, cwd=str(self.repo))

    def map(self, items: list[tuple[str, dict]], done: Callable[[str, dict], None]):
        import queue
        import threading
        q: queue.Queue = queue.Queue()
        for it in items:
            q.put(it)
        lock = threading.Lock()

        def loop(i):
            while True:
                try:
                    ck, rec = q.get_nowait()
                except queue.Empty:
                    return
                p = self.procs[i]
                try:
                    p.stdin.write(json.dumps(rec) + "\n")
                    p.stdin.flush()
                    line = p.stdout.readline()
                except (BrokenPipeError, OSError):
                    line = ""
                if line:
                    res = json.loads(line)
                else:  # the worker died (e.g. killed for memory): record it, start a new one
                    tail = (Path(self.logdir) / f"worker{i}.log").read_text()[-1500:]
                    res = {"ok": False, "error": f"compile worker died (rc {p.poll()}): {tail}"}
                    self.procs[i] = self._start(i)
                with lock:
                    done(ck, res)

        threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(self.n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            with contextlib.suppress(OSError):
                p.stdin.close()
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def _worker_main(keep_asm: str | None):
    # results go to a private copy of stdout; anything the compiler prints goes to stderr
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.path.insert(0, os.getcwd())
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    for line in sys.stdin:
        rec = json.loads(line)
        try:
            res = _compile_cached(rec, keep_asm)
        except Exception as e:
            res = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000]}
        out.write(json.dumps(res) + "\n")
        out.flush()


def _compile_cached(rec: dict, keep_asm: str | None) -> dict:
    path = cache_dir() / f"{compile_key(rec)}.json"
    if path.exists() and keep_asm is None:
        try:
            return {**json.loads(path.read_text()), "cached": True}
        except (OSError, ValueError):
            pass
    res = compile_launch(rec, Path(keep_asm) if keep_asm else None)
    _atomic_write(path, json.dumps(res))
    return {**res, "cached": False}


# --------------------------------------------------------------------------- verdicts

# Reviewed exceptions: (kernel qualname, rule, dtype or "*") -> reason. Keep empty unless a
# rule cannot apply (fp32 IEEE dots are already exempt from the tensor-core rules by kind).
ALLOW: dict[tuple[str, str, str], str] = {}


def launch_dtype(signature: dict) -> str:
    """The launch's dtype class: the 16-bit float of its tensors if it has one, else fp32."""
    tys = {t[1:] for t in signature.values() if isinstance(t, str) and t.startswith("*")}
    for t in ("bf16", "fp16", "fp8e4nv", "fp8e5"):
        if t in tys:
            return t
    return "fp32"


def config_failures(rec: dict, res: dict) -> list[str]:
    """The rules a compiled config breaks (empty: it passes)."""
    kernel = rec["kernel"].split(":")[1]
    dt = launch_dtype(rec["signature"])
    arch = ARCHS[rec["arch"]]
    fails = []

    def add(rule, text):
        if (kernel, rule, dt) not in ALLOW and (kernel, rule, "*") not in ALLOW:
            fails.append(f"{rule}: {text}")

    if not res.get("ok"):
        add("compile", res.get("error", "failed").splitlines()[0][:200])
        return fails
    if dt != "fp32" and (res["spill_stores"] or res["spill_loads"]):
        add("spill", f"{res['spill_stores']} B stores / {res['spill_loads']} B loads ({res['regs']} regs)")
    if res["smem"] > arch.smem_block_limit:
        add("smem", f"{res['smem']} B > {arch.smem_block_limit} B")
    if dt != "fp32" or any(needs_tensor_cores(d) for d in res["dots"]):
        if any(needs_tensor_cores(d) for d in res["dots"]) and not sum(res["tensor_cores"].values()):
            add("no-tensor-cores", f"{len(res['dots'])} tl.dot, no wgmma/mma.sync in PTX")
    for d in res["mma"]:
        if d.get("replication") and d["replication"] > 1:
            add("mma-replication", f"dot {d['shape'][0]}x{d['shape'][1]} warps {d['warps']} "
                                   f"instr {d['instr'][:2]} -> x{d['replication']}")
    if res["loop_loads"]["scalar"]:
        args = ", ".join(f"{a} x{n}" for a, n in sorted(res["loop_loads"]["scalar_args"].items()))
        add("scalar-loads", f"{res['loop_loads']['scalar']} <=2-byte global loads in loops ({args})")
    return fails


def variant_key(rec: dict) -> str:
    cfg_keys = set(rec["config"])
    names = list(rec["signature"])
    const = [[p, v] for p, v in rec["constexprs"] if names[p[0]] not in cfg_keys]
    blob = [rec["kernel"], rec["arch"], rec["signature"], rec["attrs"], const,
            {k: v for k, v in rec["opt_kwargs"].items() if k not in cfg_keys}]
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def variant_label(rec: dict) -> str:
    """Readable description of a launch variant: kernel, dtype, non-config constexprs and the
    integer arguments' specialisation (``/16``: divisible by 16)."""
    names = list(rec["signature"])
    cfg_keys = set(rec["config"])
    consts = {names[p[0]]: v for p, v in rec["constexprs"] if len(p) == 1}
    bits = []
    for n, v in consts.items():
        if n in cfg_keys or rec["signature"][n] != "constexpr" or not n.isupper():
            continue
        bits.append(f"{n}={int(v) if isinstance(v, bool) else v}")
    ones = [n for n, v in consts.items() if not n.isupper() and v == 1]
    div = {names[p[0]] for p, a in rec["attrs"] if a}
    ints = [n + ("/16" if n in div else "") for n, t in rec["signature"].items() if t in ("i32", "i64")]
    unaligned = [n for p, a in rec["attrs"] for n in [names[p[0]]]
                 if not a and str(rec["signature"][n]).startswith("*")]
    spec = " ".join(ints) + (f" ==1: {','.join(ones)}" if ones else "") + (
        f" unaligned: {','.join(unaligned)}" if unaligned else "")
    return f"{rec['kernel'].split(':')[1]} {launch_dtype(rec['signature'])} {' '.join(bits)} [{spec}]"


def config_label(cfg: dict) -> str:
    main = [f"{k}={v}" for k, v in cfg.items() if k not in ("num_warps", "num_stages", "num_ctas", "maxnreg")]
    return " ".join(main + [f"w{cfg.get('num_warps')}", f"s{cfg.get('num_stages')}"])


SKIPPED = {"ok": None, "skipped": True}


def analyse(captured: dict, results: dict[str, dict], dead_configs: bool = True) -> dict:
    """Group compiled configs into launch variants and decide the verdicts.

    - config: passes when it compiles and breaks no rule;
    - variant (kernel, signature, specialisation, non-config constexprs, arch): passes when at
      least one of its kept configs passes;
    - dead config (``dead_configs``, needs every config compiled): an autotune config
      (kernel, config values, arch) that fails in every variant that keeps it -- it can
      never be picked safely and should be dropped by the kernel owner.
    The gate passes when nothing failed to capture or compile, every variant passes and no
    config is dead. Configs missing from ``results`` (lazy mode) are reported as skipped."""
    variants: dict[str, dict] = {}
    for rec in captured["records"]:
        vk = variant_key(rec)
        v = variants.setdefault(vk, {"key": vk, "arch": rec["arch"], "kernel": rec["kernel"].split(":")[1],
                                     "dtype": launch_dtype(rec["signature"]), "label": variant_label(rec),
                                     "autotuned": rec["autotuned"], "configs": {}, "scenarios": set(),
                                     "grids": set(), "autotune_keys": set()})
        v["scenarios"].add(rec["scenario"])
        v["grids"].add(tuple(rec["grid"]))
        if rec["autotune_key"]:
            v["autotune_keys"].add(json.dumps(rec["autotune_key"], sort_keys=True))
        ck = compile_key(rec)
        if ck not in v["configs"]:
            res = results.get(ck, SKIPPED)
            v["configs"][ck] = {"config": rec["config"], "label": config_label(rec["config"]), "result": res,
                                "index": rec["config_index"],
                                "failures": [] if res.get("skipped") else config_failures(rec, res)}
    per_config: dict[tuple, list[bool]] = defaultdict(list)
    out = []
    for v in variants.values():
        v["configs"] = dict(sorted(v["configs"].items(), key=lambda kv: kv[1]["index"]))
        v["pass"] = any(not c["failures"] and not c["result"].get("skipped") for c in v["configs"].values())
        v["scenarios"] = sorted(v["scenarios"])
        v["grids"] = sorted(v["grids"])
        v["autotune_keys"] = sorted(v["autotune_keys"])
        if v["autotuned"]:
            for c in v["configs"].values():
                per_config[(v["kernel"], v["arch"], c["label"])].append(not c["failures"])
        out.append(v)
    dead = sorted([{"kernel": k, "arch": a, "config": lab, "variants": len(ok)}
                   for (k, a, lab), ok in per_config.items() if not any(ok)],
                  key=lambda d: (d["arch"], d["kernel"], d["config"])) if dead_configs else None
    compile_errors = [(v["label"], c["label"], c["result"].get("error", "")[:300])
                      for v in out for c in v["configs"].values() if c["result"].get("ok") is False]
    ok = (not captured["capture_errors"] and not compile_errors and all(v["pass"] for v in out) and not dead)
    return {"variants": sorted(out, key=lambda v: (-v["arch"], v["kernel"], v["label"])), "dead_configs": dead,
            "compile_errors": compile_errors, "capture_errors": captured["capture_errors"], "pass": ok}


# --------------------------------------------------------------------------- orchestration


def _git(repo: Path, *args) -> str:
    try:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                              timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def run(full: bool = False, archs: Iterable[int] = (90, 80), repo: str | Path | None = None,
        jobs: int | None = None, dtypes: Iterable[str] = DTYPES, only: str | None = None,
        keep_asm: str | None = None, lazy: bool | None = None, log=None) -> dict:
    """Capture, compile (cached, ``jobs`` processes) and analyse; returns the report dict.

    Runs the capture and the compiles in fresh processes whose ``TRITON_INTERPRET`` is unset
    and whose ``sys.path`` starts with ``repo`` (default: the tree holding this file), so it
    can be called from a test process in interpreter mode or pointed at another checkout.

    ``lazy`` (default: on for the CI subset, off for ``full``) compiles each variant's configs
    in autotune order only until one passes -- the variant verdict is the same, the configs
    after it are reported as skipped and dead configs are not computed."""
    import triton
    repo = Path(repo or ROOT).resolve()
    archs, dtypes = list(archs), list(dtypes)
    lazy = (not full) if lazy is None else lazy
    jobs = jobs or max(1, min(2, os.cpu_count() or 1))
    log = log or (lambda *_: None)
    t0 = time.time()
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "F2L_POISON_OUTPUTS")}
    env["PYTHONPATH"] = os.pathsep.join([str(repo)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "capture.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "_capture", "--out", str(out),
               "--arch", ",".join(map(str, archs)), "--dtypes", ",".join(dtypes)]
        if full:
            cmd.append("--full")
        if only:
            cmd += ["--only", only]
        r = subprocess.run(cmd, env=env, cwd=str(repo), capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"capture failed (rc {r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
        captured = json.loads(out.read_text())
    t_capture = time.time() - t0
    unique: dict[str, dict] = {}
    order: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for rec in captured["records"]:
        ck = compile_key(rec)
        unique.setdefault(ck, rec)
        item = (rec["config_index"], ck)
        vk = variant_key(rec)
        if item not in order[vk]:
            order[vk].append(item)
    order = {vk: [ck for _, ck in sorted(items)] for vk, items in order.items()}
    log(f"captured {len(captured['records'])} launches -> {len(order)} launch variants, {len(unique)} unique "
        f"compiles in {t_capture:.1f}s (f2l_kernels from {captured['f2l_kernels']})")
    results: dict[str, dict] = {}
    if keep_asm is None:
        for ck in unique:
            path = cache_dir() / f"{ck}.json"
            if path.exists():
                try:
                    results[ck] = {**json.loads(path.read_text()), "cached": True}
                except (OSError, ValueError):
                    pass
    n_cached = len(results)

    def next_batch() -> list[str]:
        if not lazy:
            return [ck for ck in unique if ck not in results]
        batch = []
        for cks in order.values():
            for ck in cks:
                if ck not in results:
                    batch.append(ck)
                    break
                if not config_failures(unique[ck], results[ck]):
                    break
        return list(dict.fromkeys(batch))

    compiled = 0
    batch = next_batch()
    if batch:
        log(f"{n_cached} cached; compiling with {jobs} processes{' (lazy: until a config passes)' if lazy else ''}")
        with _Workers(jobs, env, repo, keep_asm) as pool:
            while batch:
                def done(ck, res):
                    nonlocal compiled
                    results[ck] = res
                    compiled += 1
                    if compiled % 10 == 0:
                        log(f"  compiled {compiled} ({time.time() - t0:.0f}s)")
                pool.map([(ck, unique[ck]) for ck in batch], done)
                batch = next_batch()
    report = analyse(captured, results, dead_configs=not lazy)
    report["meta"] = {
        "triton": triton.__version__, "repo": str(repo), "commit": _git(repo, "rev-parse", "HEAD"),
        "kernels_commit": _git(repo, "log", "-1", "--format=%H", "--", "f2l_kernels"),
        "dirty": bool(_git(repo, "status", "--porcelain", "--", "f2l_kernels")),
        "full": full, "only": only, "archs": archs, "dtypes": dtypes, "launches": len(captured["records"]),
        "unique_compiles": len(unique), "compiled_now": compiled, "cached": n_cached, "lazy": lazy,
        "variants": len(order), "seconds": round(time.time() - t0, 1),
        "capture_seconds": round(t_capture, 1), "f2l_kernels": captured["f2l_kernels"],
    }
    return report


# --------------------------------------------------------------------------- outputs

CSV_FIELDS = ["arch", "kernel", "dtype", "variant", "variant_pass", "config", "config_pass", "failures", "regs",
              "spill_stores", "spill_loads", "smem", "num_warps", "blocks_per_sm", "occupancy", "limiter", "wgmma",
              "mma_sync", "max_replication", "loop_loads", "scalar_loop_loads", "compile_s", "scenarios"]


def rows(report: dict, arch: int) -> list[dict]:
    out = []
    for v in report["variants"]:
        if v["arch"] != arch:
            continue
        for c in v["configs"].values():
            r = c["result"]
            ok = bool(r.get("ok"))
            out.append({
                "arch": f"sm{arch}", "kernel": v["kernel"], "dtype": v["dtype"], "variant": v["label"],
                "variant_pass": v["pass"], "config": c["label"],
                "config_pass": "skipped" if r.get("skipped") else not c["failures"],
                "failures": "; ".join(c["failures"]),
                "regs": r.get("regs") if ok else "", "spill_stores": r.get("spill_stores") if ok else "",
                "spill_loads": r.get("spill_loads") if ok else "", "smem": r.get("smem") if ok else "",
                "num_warps": r.get("num_warps") if ok else "", "blocks_per_sm": r.get("blocks_per_sm") if ok else "",
                "occupancy": round(r["occupancy"], 3) if ok else "", "limiter": r.get("limiter") if ok else "",
                "wgmma": r["tensor_cores"]["wgmma"] if ok else "", "mma_sync": r["tensor_cores"]["mma_sync"] if ok else "",
                "max_replication": max([d["replication"] or 1 for d in r.get("mma", [])] or [""]) if ok else "",
                "loop_loads": " ".join(f"{k}x{n}" for k, n in r["loop_loads"]["by_width"].items()) if ok else "",
                "scalar_loop_loads": r["loop_loads"]["scalar"] if ok else "",
                "compile_s": r.get("compile_s", ""), "scenarios": len(v["scenarios"]),
            })
    return out


def _jsonable(report: dict, arch: int) -> dict:
    return {"meta": report["meta"], "arch": f"sm{arch}",
            "pass": all(v["pass"] for v in report["variants"] if v["arch"] == arch)
            and not [d for d in report["dead_configs"] or [] if d["arch"] == arch],
            "variants": [{**{k: v[k] for k in ("kernel", "dtype", "label", "autotuned", "pass", "scenarios")},
                          "grids": [list(g) for g in v["grids"]],
                          "configs": [{"config": c["config"], "label": c["label"], "failures": c["failures"],
                                       "result": {k: x for k, x in c["result"].items() if k != "cached"}}
                                      for c in v["configs"].values()]}
                         for v in report["variants"] if v["arch"] == arch],
            "dead_configs": None if report["dead_configs"] is None else [
                d for d in report["dead_configs"] if d["arch"] == arch],
            "capture_errors": [e for e in report["capture_errors"] if e["arch"] == arch]}


def markdown(report: dict) -> str:
    """The summary committed into docs/aot.md: per arch and kernel, variants passing, and one
    line per failing variant with its best config's reasons."""
    m = report["meta"]
    lines = [f"Triton {m['triton']}, f2l commit `{m['commit'][:12]}` (f2l_kernels last changed in "
             f"`{m.get('kernels_commit', '')[:12]}`){' with uncommitted kernel changes' if m['dirty'] else ''}, "
             f"{'full sweep' if m['full'] else 'CI subset'}{' filtered by --only ' + repr(m['only']) if m.get('only') else ''}: "
             f"{m['launches']} recorded launches, "
             f"{m['unique_compiles']} unique compiles, {len(report['variants'])} launch variants. "
             f"Gate: **{'PASS' if report['pass'] else 'FAIL'}**.", ""]
    lines += ["| arch | kernel | dtype | variants | pass | configs/variant | failing rules (configs) |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    groups: dict[tuple, list] = defaultdict(list)
    for v in report["variants"]:
        groups[(v["arch"], v["kernel"], v["dtype"])].append(v)
    for (arch, kernel, dt), vs in sorted(groups.items(), key=lambda kv: (-kv[0][0], kv[0][1], kv[0][2])):
        rules: dict[str, int] = defaultdict(int)
        for v in vs:
            for c in v["configs"].values():
                for f in c["failures"]:
                    rules[f.split(":")[0]] += 1
        ncfg = sorted({len(v["configs"]) for v in vs})
        lines.append(f"| sm{arch} | `{kernel}` | {dt} | {len(vs)} | {sum(v['pass'] for v in vs)} | "
                     f"{'/'.join(map(str, ncfg))} | {', '.join(f'{k} ({n})' for k, n in sorted(rules.items())) or '-'} |")
    failing = [v for v in report["variants"] if not v["pass"]]
    if failing:
        lines += ["", "Failing launch variants (each with the config that fails least):", ""]
        for v in failing:
            best = min((c for c in v["configs"].values() if not c["result"].get("skipped")),
                       key=lambda c: len(c["failures"]))
            r = best["result"]
            extra = f" regs {r.get('regs')}, smem {r.get('smem')}" if r.get("ok") else ""
            lines.append(f"- sm{v['arch']} `{v['label']}` — best `{best['label']}`{extra}: "
                         f"{'; '.join(best['failures'])}")
    notes = []
    for v in report["variants"]:
        ok = [c for c in v["configs"].values() if c["result"].get("ok") and not c["failures"]]
        if ok and ok[0]["result"]["loop_loads"].get("scalar_outside_loops"):
            args = ok[0]["result"]["loop_loads"]["scalar_outside_args"]
            notes.append(f"- sm{v['arch']} `{v['label']}` `{ok[0]['label']}`: "
                         + ", ".join(f"{a} x{n}" for a, n in sorted(args.items())))
    if notes:
        lines += ["", "Passing variants whose passing config still has scalar (<= 2-byte) global loads "
                  "outside loops (not judged; worth a look on decode paths):", ""] + notes
    if report["dead_configs"] is None:
        lines += ["", "Dead configs: not computed (lazy run: each variant's configs compiled until one passes).", ""]
    elif report["dead_configs"]:
        lines += ["", "Configs that fail in every variant that keeps them (drop them):", ""]
        for d in report["dead_configs"]:
            lines.append(f"- sm{d['arch']} `{d['kernel']}` `{d['config']}` ({d['variants']} variants)")
    for e in report["capture_errors"]:
        lines.append(f"- capture error sm{e['arch']} `{e['scenario']}`: {e['error'][:200]}")
    for lab, cfg, err in report["compile_errors"]:
        lines.append(f"- compile error `{lab}` `{cfg}`: {err.splitlines()[0][:200] if err else ''}")
    return "\n".join(lines) + "\n"


def write_outputs(report: dict, out_dir: Path):
    out_dir.mkdir(parents=True, exist_ok=True)
    for arch in report["meta"]["archs"]:
        name = f"aot_sm{arch}"
        _atomic_write(out_dir / f"{name}.json", json.dumps(_jsonable(report, arch), indent=1, default=list))
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=CSV_FIELDS)
        w.writeheader()
        w.writerows(rows(report, arch))
        _atomic_write(out_dir / f"{name}.csv", buf.getvalue())
    _atomic_write(out_dir / "summary.md", markdown(report))


BEGIN, END = "<!-- aot-table:begin -->", "<!-- aot-table:end -->"


def update_docs(report: dict, path: Path):
    """Replace the table between the markers of docs/aot.md with this report's summary."""
    text = path.read_text()
    a, b = text.index(BEGIN) + len(BEGIN), text.index(END)
    _atomic_write(path, text[:a] + "\n" + markdown(report) + text[b:])


def _capture_main(args):
    res = capture(full=args.full, archs=[int(a) for a in args.arch.split(",")], dtypes=args.dtypes.split(","),
                  only=args.only)
    _atomic_write(Path(args.out), json.dumps(res))


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_worker"]:
        _worker_main(argv[2] if argv[1:2] == ["--keep-asm"] else None)
        return 0
    if argv[:1] == ["_capture"]:
        p = argparse.ArgumentParser(prog="aot.py _capture")
        p.add_argument("--out", required=True)
        p.add_argument("--arch", default="90,80")
        p.add_argument("--dtypes", default=",".join(DTYPES))
        p.add_argument("--full", action="store_true")
        p.add_argument("--only")
        args = p.parse_args(argv[1:])
        sys.path.insert(0, os.getcwd())
        _capture_main(args)
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="every model shape, rank and launch shape")
    p.add_argument("--arch", default="90,80", help="comma-separated compute capabilities (90, 80)")
    p.add_argument("--dtypes", default=",".join(DTYPES))
    p.add_argument("--repo", default=None, help="checkout whose f2l_kernels is gated (default: this tree)")
    p.add_argument("--out", default=None, help="output folder (default: benchmarks/results/aot)")
    p.add_argument("--jobs", type=int, default=None, help="compile processes (default min(2, CPUs))")
    p.add_argument("--only", default=None, help="only scenarios whose name contains this")
    p.add_argument("--keep-asm", default=None, help="also write each compile's TTGIR and PTX here")
    p.add_argument("--all-configs", action="store_true", help="compile every config even in the CI subset")
    p.add_argument("--update-docs", action="store_true", help="rewrite the table in docs/aot.md")
    args = p.parse_args(argv)
    archs = [int(a) for a in args.arch.split(",")]
    for a in archs:
        if a not in ARCHS:
            p.error(f"--arch: expected some of {sorted(ARCHS)}, got {a}")
    report = run(full=args.full, archs=archs, repo=args.repo, jobs=args.jobs, dtypes=args.dtypes.split(","),
                 only=args.only, keep_asm=args.keep_asm, lazy=False if args.all_configs else None, log=lambda s: print(s, flush=True))
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / "aot"
    write_outputs(report, out)
    if args.update_docs:
        update_docs(report, ROOT / "docs" / "aot.md")
    print(markdown(report))
    print(f"wrote {out} in {report['meta']['seconds']}s")
    return 0 if report["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
