"""The ahead-of-time GPU-code gate (benchmarks/aot.py) and the parsers it relies on.

The parser tests pin each rule to a hand-written IR/PTX/ptxas snippet, so the gate cannot
silently pass because a parser stopped matching. The gate itself (marked slow, part of
CI) compiles the representative launch subset for sm_90 and sm_80 -- no GPU needed -- and
fails on any broken rule; ``python benchmarks/aot.py`` prints the same table.
"""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_tool():
    spec = importlib.util.spec_from_file_location("f2l_aot_tool", os.path.join(ROOT, "benchmarks", "aot.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


aot = _load_tool()


# ----------------------------------------------------------------------------- ptxas -v

PTXAS_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_k' for 'sm_90a'
ptxas info    : Function properties for _k
    96 bytes stack frame, 252 bytes spill stores, 248 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 512 bytes smem, 400 bytes cmem[0]
ptxas warning : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized
"""


def test_parse_ptxas_spills_and_registers():
    r = aot.parse_ptxas(PTXAS_LOG)
    assert (r["regs"], r["stack"], r["spill_stores"], r["spill_loads"], r["static_smem"]) == (255, 96, 252, 248, 512)
    assert len(r["ptxas_warnings"]) == 1 and "serialized" in r["ptxas_warnings"][0]


def test_parse_ptxas_clean():
    log = ("ptxas info    : Function properties for _k\n"
           "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
           "ptxas info    : Used 40 registers, used 0 barriers\n")
    r = aot.parse_ptxas(log)
    assert (r["regs"], r["spill_stores"], r["spill_loads"], r["static_smem"]) == (40, 0, 0, 0)


# ----------------------------------------------------------------------------- MMA replication

TTGIR = """\
#blocked = #ttg.blocked<{sizePerThread = [1, 8], threadsPerWarp = [4, 8], warpsPerCTA = [4, 1], order = [1, 0]}>
#mma = #ttg.nvidia_mma<{versionMajor = 3, versionMinor = 0, warpsPerCTA = [4, 1], instrShape = [16, 64, 16]}>
#mma1 = #ttg.nvidia_mma<{versionMajor = 2, versionMinor = 0, warpsPerCTA = [1, 8], instrShape = [16, 8]}>
#mma2 = #ttg.nvidia_mma<{versionMajor = 2, versionMinor = 0, warpsPerCTA = [2, 2], instrShape = [16, 8]}>
module attributes {"ttg.num-warps" = 4 : i32} {
  tt.func public @_k() {
    %0 = ttng.warp_group_dot %a, %b, %c {inputPrecision = 0 : i32, isAsync = true} : !ttg.memdesc<16x64xbf16, #shared, #smem> * !ttg.memdesc<64x64xbf16, #shared1, #smem> -> tensor<16x64xf32, #mma>
    %1 = tt.dot %d, %e, %f, inputPrecision = tf32 : tensor<16x32xbf16, #ttg.dot_op<{opIdx = 0, parent = #mma1, kWidth = 8}>> * tensor<32x32xbf16, #ttg.dot_op<{opIdx = 1, parent = #mma1, kWidth = 8}>> -> tensor<16x32xf32, #mma1>
    %2 = tt.dot %g, %h, %i, inputPrecision = tf32 : tensor<64x32xbf16, #ttg.dot_op<{opIdx = 0, parent = #mma2, kWidth = 8}>> * tensor<32x64xbf16, #ttg.dot_op<{opIdx = 1, parent = #mma2, kWidth = 8}>> -> tensor<64x64xf32, #mma2>
    %3 = tt.dot %j, %k, %l, inputPrecision = ieee : tensor<16x16xf32, #ttg.dot_op<{opIdx = 0, parent = #blocked}>> * tensor<16x16xf32, #ttg.dot_op<{opIdx = 1, parent = #blocked}>> -> tensor<16x16xf32, #blocked>
    tt.return
  }
}
"""


def test_mma_replication():
    dots = aot.mma_replication(TTGIR)
    assert [d["shape"] for d in dots] == [[16, 64], [16, 32], [64, 64], [16, 16]]
    # Hopper: a warpgroup (4 warps x 16 rows) on a 16-row tile computes it four times
    assert dots[0]["replication"] == 4 and dots[0]["mma"] == 3
    # 8 warps x 8 columns on a 32-column tile: twice
    assert dots[1]["replication"] == 2
    assert dots[2]["replication"] == 1
    # an FMA (blocked-layout) dot is not an MMA
    assert dots[3]["mma"] is None and dots[3]["replication"] is None


def test_mma_replication_inline_layout():
    line = ("%0 = tt.dot %a, %b, %c : tensor<32x16xf16, #x> * tensor<16x64xf16, #y> -> tensor<32x64xf32, "
            "#ttg.nvidia_mma<{versionMajor = 2, versionMinor = 0, warpsPerCTA = [4, 1], instrShape = [16, 8]}>>")
    assert aot.mma_replication(line)[0]["replication"] == 2


def test_dot_kinds_and_fp32_ieee_exemption():
    ttir = ("%0 = tt.dot %a, %b, %c, inputPrecision = ieee : tensor<16x16xf32> * tensor<16x16xf32> -> tensor<16x16xf32>\n"
            "%1 = tt.dot %a, %b, %c : tensor<16x16xbf16> * tensor<16x16xbf16> -> tensor<16x16xf32>\n"
            "%2 = tt.dot %a, %b, %c, inputPrecision = tf32 : tensor<16x16xf32> * tensor<16x16xf32> -> tensor<16x16xf32>\n"
            # IEEE is the default and is not printed
            "%3 = tt.dot %a, %b, %c : tensor<16x16xf32> * tensor<16x16xf32> -> tensor<16x16xf32> loc(#loc1)\n")
    kinds = aot.dot_kinds(ttir)
    assert kinds == [{"operand": "f32", "precision": "ieee"}, {"operand": "bf16", "precision": "ieee"},
                     {"operand": "f32", "precision": "tf32"}, {"operand": "f32", "precision": "ieee"}]
    assert [aot.needs_tensor_cores(k) for k in kinds] == [False, True, True, False]


def test_tensor_core_counts():
    ptx = ("\twgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {...};\n"
           "\tmma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {...};\n"
           "\tmma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {...};\n"
           "\twgmma.fence.sync.aligned;\n")
    assert aot.tensor_core_counts(ptx) == {"wgmma": 1, "mma_sync": 2}


# ----------------------------------------------------------------------------- loop loads

PTX = """\
.visible .entry _k(
	.param .u64 .ptr .global .align 1 _k_param_0,
	.param .u64 .ptr .global .align 1 _k_param_1,
	.param .u32 _k_param_2,
	.param .u64 .ptr .global .align 1 _k_param_3
)
{
	ld.param.b64 	%rd1, [_k_param_0];
	ld.param.b64 	%rd2, [_k_param_1];
	ld.param.b32 	%r1, [_k_param_2];
	ld.param.b64 	%rd9, [_k_param_3];
	ld.global.b16 	%rs9, [ %rd9 + 0 ];
	mov.b64 	%rd3, %rd1;
$L__BB0_2:
	mad.wide.s32 	%rd4, %r2, 2, %rd3;
	@%p1 ld.global.v4.b32 { %r4, %r5, %r6, %r7 }, [ %rd4 + 0 ];
	ld.global.b32 	%r8, [ %rd2 + 0 ];
	mul.wide.s32 	%rd5, %r8, 2;
	add.s64 	%rd6, %rd2, %rd5;
	@%p2 ld.global.b16 	%rs1, [ %rd6 + 0 ];
	cp.async.cg.shared.global [ %r9 + 0 ], [ %rd4 + 0 ], 0x10, %r10;
	cp.async.ca.shared.global [ %r9 + 16 ], [ %rd6 + 0 ], 0x2, %r10;
	cp.async.commit_group;
	add.s64 	%rd3, %rd3, 128;
	setp.lt.s32 	%p3, %r2, %r1;
	@%p3 bra 	$L__BB0_2;
	ld.global.b16 	%rs2, [ %rd6 + 0 ];
	ret;
}
"""


def test_loop_ranges():
    lines = PTX.splitlines()
    (a, b), = aot.loop_ranges(lines)
    assert lines[a].startswith("$L__BB0_2") and "bra" in lines[b]


def test_loop_loads_widths_and_arguments():
    loads = aot.loop_loads(PTX, ["X", "IDX", "n", "Z"])
    got = [(ld["kind"], ld["bytes"], ld["args"]) for ld in loads]
    assert got == [("ld", 16, ["X"]), ("ld", 4, ["IDX"]), ("ld", 2, ["IDX"]),
                   ("cp.async", 16, ["X"]), ("cp.async", 2, ["IDX"])]
    s = aot.summarize_loads(aot.global_loads(PTX, ["X", "IDX", "n", "Z"]))
    assert s["scalar"] == 2 and s["scalar_args"] == {"IDX": 2}
    assert s["by_width"] == {"cp.async:16": 1, "cp.async:2": 1, "ld:16": 1, "ld:2": 1, "ld:4": 1}
    # loads before and after the loop are not hot-loop loads: reported, not judged
    assert s["scalar_outside_loops"] == 2 and s["scalar_outside_args"] == {"Z": 1, "IDX": 1}


def test_bulk_tensor_loads_count_as_vector():
    ptx = ("$L__BB0_1:\n\tcp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes "
           "[%r1], [%rd1, {%r2, %r3}], [%r4];\n\t@%p1 bra $L__BB0_1;\n")
    (ld,) = aot.loop_loads(ptx)
    assert ld["kind"] == "bulk" and not aot.summarize_loads([ld])["scalar"]


# ----------------------------------------------------------------------------- occupancy + verdicts


def test_occupancy():
    h100 = aot.ARCHS[90]
    assert aot.occupancy(h100, 128, 0, 4)["blocks_per_sm"] == 4          # 64K regs / (128·128)
    assert aot.occupancy(h100, 255, 0, 8)["blocks_per_sm"] == 1
    o = aot.occupancy(h100, 32, 100 * 1024, 4)
    assert o["blocks_per_sm"] == 2 and o["limiter"] == "smem"
    assert aot.occupancy(aot.ARCHS[80], 32, 100 * 1024, 4)["blocks_per_sm"] == 1
    assert aot.occupancy(h100, 16, 0, 1)["blocks_per_sm"] == 32          # the block limit


def _rec(sig=None, arch=90):
    return {"kernel": "m:_k", "arch": arch, "signature": sig or {"X": "*bf16", "n": "i32", "B": "constexpr"}}


def _res(**kw):
    base = {"ok": True, "regs": 100, "spill_stores": 0, "spill_loads": 0, "smem": 1024, "dots": [],
            "tensor_cores": {"wgmma": 0, "mma_sync": 0}, "mma": [],
            "loop_loads": {"scalar": 0, "scalar_args": {}}}
    base.update(kw)
    return base


def test_config_rules():
    bf16_dot = [{"operand": "bf16", "precision": "tf32"}]
    assert aot.config_failures(_rec(), _res()) == []
    assert aot.config_failures(_rec(), _res(ok=False, error="CompilationError: boom"))[0].startswith("compile")
    assert aot.config_failures(_rec(), _res(spill_stores=8))[0].startswith("spill")
    # spills in fp32 launches are reported in the table but are not a failure
    assert aot.config_failures(_rec({"X": "*fp32"}), _res(spill_stores=8)) == []
    assert aot.config_failures(_rec(), _res(smem=228 * 1024))[0].startswith("smem")
    assert aot.config_failures(_rec(arch=80), _res(smem=164 * 1024))[0].startswith("smem")
    assert aot.config_failures(_rec(arch=90), _res(smem=164 * 1024)) == []
    assert aot.config_failures(_rec(), _res(dots=bf16_dot))[0].startswith("no-tensor-cores")
    assert aot.config_failures(_rec(), _res(dots=bf16_dot, tensor_cores={"wgmma": 2, "mma_sync": 0})) == []
    ieee = [{"operand": "f32", "precision": "ieee"}]
    assert aot.config_failures(_rec({"X": "*fp32"}), _res(dots=ieee)) == []
    rep = [{"shape": [16, 64], "warps": [4, 1], "instr": [16, 64, 16], "replication": 4}]
    assert aot.config_failures(_rec(), _res(mma=rep))[0].startswith("mma-replication")
    scal = {"scalar": 3, "scalar_args": {"B": 3}}
    assert aot.config_failures(_rec(), _res(loop_loads=scal))[0].startswith("scalar-loads")


def test_variant_and_dead_config_verdicts():
    def rec(i, block, cfg):
        return {"kernel": "m:_k", "arch": 90, "kernel_hash": "h", "signature": {"X": "*bf16", "BM": "constexpr",
                                                                               "BN": "constexpr"},
                "constexprs": [[[1], block], [[2], cfg]], "attrs": [[[0], [["tt.divisibility", 16]]]],
                "opt_kwargs": {"num_warps": 4}, "config": {"BN": cfg, "num_warps": 4, "num_stages": 3},
                "config_index": i, "num_configs": 2, "autotuned": True, "autotune_key": {"BM": block},
                "grid": [1, 1, 1], "arg_names": ["X"], "scenario": f"s{block}"}
    recs = [rec(0, 16, 32), rec(1, 16, 64), rec(0, 64, 32), rec(1, 64, 64)]
    keys = [aot.compile_key(r) for r in recs]
    assert len(set(keys)) == 4 and len({aot.variant_key(r) for r in recs}) == 2
    bad = _res(spill_stores=4)
    results = {keys[0]: _res(), keys[1]: bad, keys[2]: _res(), keys[3]: bad}
    rep = aot.analyse({"records": recs, "capture_errors": []}, results)
    assert all(v["pass"] for v in rep["variants"])
    # BN=64 spills in every variant that keeps it: flagged and the gate fails
    assert [d["config"] for d in rep["dead_configs"]] == ["BN=64 w4 s3"] and not rep["pass"]
    results[keys[3]] = _res()
    assert aot.analyse({"records": recs, "capture_errors": []}, results)["pass"]
    # a variant with no passing config fails the gate
    results = {keys[0]: bad, keys[1]: bad, keys[2]: _res(), keys[3]: _res()}
    rep = aot.analyse({"records": recs, "capture_errors": []}, results, dead_configs=False)
    assert [v["pass"] for v in rep["variants"]].count(False) == 1 and not rep["pass"]
    # lazy runs: configs never compiled are skipped, not failed
    rep = aot.analyse({"records": recs, "capture_errors": []}, {keys[0]: _res(), keys[2]: _res()},
                      dead_configs=False)
    assert rep["pass"] and rep["dead_configs"] is None


def test_gpu_facts_patch_every_sm_count_helper():
    """Every SM-count helper in f2l_kernels (including lazily imported kernel modules) and
    torch.cuda.get_device_properties report the target GPU's SMs during capture, and are
    restored afterwards."""
    import torch

    with aot._gpu_facts(132):
        assert torch.cuda.get_device_properties(0).multi_processor_count == 132
        mods = {n: m for n, m in sys.modules.items() if n.startswith("f2l_kernels.") and m is not None}
        assert "f2l_kernels.perceiver.triton" in mods and "f2l_kernels.lora.triton" in mods
        helpers = [getattr(m, h) for m in mods.values() for h in ("_num_sms", "num_sms", "_sm_count")
                   if callable(getattr(m, h, None))]
        assert helpers and all(h(torch.device("cpu")) == 132 for h in helpers)
    assert all(getattr(m, "_num_sms", lambda d: 0)(torch.device("cpu")) != 132 for m in mods.values())


# ----------------------------------------------------------------------------- the gate


@pytest.fixture(scope="module")
def gate():
    return aot.run(full=False, archs=(90, 80))


@pytest.mark.slow
def test_gate_captured_real_launches(gate):
    """The capture saw real (non-interpreter) kernels at GPU specialisations on both archs."""
    assert gate["meta"]["launches"] > 0 and not gate["capture_errors"]
    assert gate["meta"]["f2l_kernels"].startswith(ROOT)
    assert {v["arch"] for v in gate["variants"]} == {90, 80}
    assert any(v["autotuned"] and len(v["configs"]) > 1 for v in gate["variants"])
    assert {v["dtype"] for v in gate["variants"]} >= {"bf16", "fp32"}


@pytest.mark.slow
def test_gate(gate):
    """Every launch variant has a config that compiles with no spills (bf16/fp16), fits shared
    memory, reaches the tensor cores, has no MMA replication and no scalar hot-loop loads."""
    failing = [v for v in gate["variants"] if not v["pass"]]
    lines = []
    for v in failing:
        tried = [c for c in v["configs"].values() if not c["result"].get("skipped")]
        lines.append(f"sm{v['arch']} {v['label']}")
        lines += [f"    {c['label']}: {'; '.join(c['failures'])}" for c in tried]
    for lab, cfg, err in gate["compile_errors"]:
        lines.append(f"compile error {lab} {cfg}: {err[:300]}")
    assert not failing and not gate["compile_errors"], (
        f"{len(failing)} of {len(gate['variants'])} launch variants fail the AOT gate "
        "(python benchmarks/aot.py prints the table):\n" + "\n".join(lines))
