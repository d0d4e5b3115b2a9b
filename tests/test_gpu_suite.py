"""benchmarks/gpu_suite.py and the measured decode dispatch (f2l_kernels/_tuned.py).

The suite's dry run executes the GPU run's plan on the CPU (tiny shapes, Triton
through the interpreter) and must write every result file and the summary; the summary
arithmetic, the dispatch-table writer, the table reader and the ``auto`` decode decision
are checked on synthetic GPU-like numbers, since no GPU runs here.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tarfile
import warnings

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITE = os.path.join(ROOT, "benchmarks", "gpu_suite.py")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import gpu_suite  # noqa: E402

from f2l_kernels import _tuned  # noqa: E402


def _run(*argv, timeout=1800):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, SUITE, *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


# ------------------------------------------------------------------------------ the dry run


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    base = tmp_path_factory.mktemp("gpu_suite")
    out, exp = base / "results", base / "export"
    res = _run("--dry-run", "--out", str(out), "--export", str(exp), "--commit", "abc1234")
    return out, exp, res


def _load(out, name):
    with open(os.path.join(out, name)) as f:
        return json.load(f)


@pytest.mark.slow
def test_dry_run_completes_every_step(dry):
    out, _, res = dry
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    suite = _load(out, "suite.json")
    assert list(suite["steps"]) == gpu_suite.STEP_NAMES
    for name, st in suite["steps"].items():
        want = ("ok", "skipped") if name == "aot" else ("ok",)
        assert st["status"] in want, (name, st)
        for f in st["files"]:
            assert os.path.exists(os.path.join(out, f)), (name, f)
    env = _load(out, "env.json")
    assert env["dry_run"] is True and env["commit"] == "abc1234"
    assert env["device"].startswith("cpu") and env["torch"] and "triton" in env


@pytest.mark.slow
def test_dry_run_result_files(dry):
    out, _, _ = dry
    parity = _load(out, "parity.json")["rows"]
    assert {r["check"] for r in parity} >= {"lora", "perceiver", "hypernet", "answer"}
    assert parity and all(r["ok"] is True for r in parity), [r for r in parity if r["ok"] is not True]
    assert {r["what"] for r in parity if r["check"] == "lora"} >= {"forward", "delta", "grad_x", "grad_lora_a",
                                                                   "grad_lora_b"}
    dec = _load(out, "decode.json")
    assert dec["env"]["dry_run"] is True
    assert {(r["backend"], r["S"]) for r in dec["rows"]} == {("triton", S) for S in gpu_suite.DRY_DECODE_SEQS}
    assert all(r["rel_err_vs_ref"] < 1e-5 for r in dec["rows"])
    lora = _load(out, "lora.json")["rows"]
    assert {(r["case"], r["backend"]) for r in lora} >= {("prefill", "base"), ("prefill", "f2l"),
                                                         ("backward", "f2l"), ("backward", "einsum")}
    per = _load(out, "perceiver.json")["rows"]
    assert {r["backend"] for r in per} >= {"triton", "reference", "sdpa_padded"}
    assert all(r["min_flops"] <= r["flops"] for r in per)
    e2e = _load(out, "end_to_end.json")["rows"]
    assert any(r["kind"] == "question" and r["ttft_adapter_ms"] > 0 for r in e2e)
    for stem in ("parity", "decode", "lora", "perceiver", "end_to_end"):
        with open(os.path.join(out, f"{stem}.csv")) as f:
            rows = list(csv.DictReader(f))
        assert rows and "env_commit" in rows[0] and rows[0]["env_commit"] == "abc1234", stem
    pngs = [f for f in os.listdir(out) if f.endswith(".png")]
    assert any(p.startswith("decode_") for p in pngs) and "perceiver_ms.png" in pngs
    assert all(os.path.getsize(os.path.join(out, p)) > 1000 for p in pngs)


@pytest.mark.slow
def test_dry_run_summary_and_export(dry):
    out, exp, res = dry
    s = _load(out, "summary.json")
    assert s["dry_run"] is True
    names = " | ".join(m["metric"] for m in s["metrics"])
    for family in ("LoRA prefill", "LoRA decode", "LoRA backward", "decode S=", "CUDA vs Triton", "Perceiver fwd",
                   "query TTFT"):
        assert family in names, family
    assert {m["verdict"] for m in s["metrics"]} == {"n/a (dry run)"}
    md = open(os.path.join(out, "summary.md")).read()
    assert "DRY RUN" in md and "| metric | value | floor | baseline | ratio | target | verdict |" in md
    assert "| metric | value" in res.stdout  # the table is printed last
    assert res.stdout.rstrip().splitlines()[-1].startswith("total ")
    for f in ("summary.md", "summary.json", "suite.log", "gpu_suite_results.tar.gz"):
        assert os.path.exists(os.path.join(exp, f)), f
    with tarfile.open(os.path.join(exp, "gpu_suite_results.tar.gz")) as tar:
        names = tar.getnames()
    assert "results/summary.md" in names and "results/decode.json" in names
    # nothing was measured: the dispatch table is never written from a dry run
    bad = _run("--update-dispatch", "--from", str(out), "--dispatch-out", str(out / "table.json"), timeout=120)
    assert bad.returncode != 0 and "dry run" in (bad.stdout + bad.stderr)
    assert not os.path.exists(out / "table.json")


def test_list_and_bad_step():
    res = _run("--list", timeout=120)
    assert res.returncode == 0
    for name in gpu_suite.STEP_NAMES:
        assert name in res.stdout
    bad = _run("--only", "nosuchstep", "--dry-run", timeout=120)
    assert bad.returncode == 2 and "nosuchstep" in bad.stderr


def test_global_deadline_skips_steps(tmp_path):
    res = _run("--dry-run", "--only", "env", "decode", "--budget-s", "5", "--out", str(tmp_path), timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    steps = _load(tmp_path, "suite.json")["steps"]
    assert list(steps) == ["env", "decode"]
    assert all(st["status"] == "skipped" and "deadline" in st["note"] for st in steps.values())
    assert os.path.exists(tmp_path / "summary.md")


def test_run_cmd_kills_at_its_limit(tmp_path):
    res = gpu_suite.run_cmd([sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"],
                            timeout=2, log_path=str(tmp_path / "x.log"))
    assert res["timed_out"] and res["seconds"] < 20 and "started" in res["tail"]
    assert "(time limit)" in open(tmp_path / "x.log").read()


# ------------------------------------------------------------------------------ summary arithmetic


def _write(out, name, env, rows):
    with open(os.path.join(out, name), "w") as f:
        json.dump({"env": env, "rows": rows}, f)


def test_summary_ratios_and_verdicts(tmp_path):
    env = {"device": "NVIDIA H200", "dry_run": False, "measured_copy_gbps": 4000.0, "measured_bf16_tflops": 800.0,
           "peak_hbm_gbps": 4800.0, "peak_bf16_tflops": 989.0, "commit": "x"}
    with open(tmp_path / "env.json", "w") as f:
        json.dump(env, f)
    common = {"shape": "down_proj_500m", "r": 16, "rows": 8192}
    _write(tmp_path, "lora.json", env, [
        dict(common, case="prefill", backend="f2l", ms=1.05, floor_bytes=4e7, floor_flops=4e10),
        dict(common, case="prefill", backend="base", ms=1.0, floor_bytes=4e7, floor_flops=4e10),
        dict(common, case="decode_b64", backend="f2l", ms=0.01, floor_bytes=2.4e7),     # floor 6 us: 60 %
        dict(common, case="backward", backend="f2l", ms=1.8, ms_fwd=1.0, ms_fwd_bwd=2.8, bwd_over_fwd=1.8,
             peak_mib=100.0, floor_bytes=8e7, floor_flops=8e10),
        dict(common, case="backward", backend="einsum", ms=5.0, ms_fwd_bwd=5.6, peak_mib=300.0),
        dict(common, case="backward", backend="per_token", ms=9.0, ms_fwd_bwd=9.9, peak_mib=900.0),
    ])
    dec = []
    for S, cu, tr in ((1, 4.0, 8.0), (64, 10.0, 12.0), (256, 30.0, 27.0)):
        for be, us in (("cuda", cu), ("triton", tr)):
            dec.append({"shape": "down_proj_500m", "d_in": 2560, "d_out": 960, "r": 16, "S": S, "dtype": "bfloat16",
                        "backend": be, "mode": "graph", "us": us, "floor_us": 7.5, "frac_of_floor": 7.5 / us})
    _write(tmp_path, "decode.json", env, dec)
    _write(tmp_path, "perceiver.json", env, [
        {"backend": "triton", "frames": 64, "seqs": 32, "rows_per_seq": 4096, "ms": 0.1, "floor_bytes": 2e8,
         "flops": 1e9, "min_flops": 1e9},   # bytes floor 0.05 ms: 50 %
        {"backend": "sdpa_padded", "frames": 64, "ms": 0.5},
    ])
    _write(tmp_path, "end_to_end.json", env, [
        {"kind": "question", "sweep": "frames", "model": "smolvlm2-500m", "frames": 64, "ttft_adapter_ms": 10.0,
         "ttft_in_context_ms": 200.0, "in_context_input_tokens": 4200},
    ])
    s = gpu_suite.build_summary(str(tmp_path))
    m = {x["metric"]: x for x in s["metrics"]}
    pre = m["LoRA prefill down_proj_500m r=16 (8192 rows)"]
    assert pre["ratio"] == "1.05x" and pre["verdict"] == "PASS"
    assert m["LoRA decode_b64 down_proj_500m r=16 [f2l]"]["verdict"] == "MISS"      # 60 % < 70 %
    assert m["LoRA backward down_proj_500m r=16: bwd / fwd"]["verdict"] == "PASS"
    assert m["LoRA fwd+bwd down_proj_500m: einsum autograd / f2l"]["ratio"] == "2x"
    assert m["LoRA fwd+bwd down_proj_500m: peak memory per-token / f2l"]["ratio"] == "9x"
    cvt = m["CUDA vs Triton decode down_proj_500m r=16 [graph], S<=256"]
    assert cvt["verdict"] == "MISS" and cvt["ratio"] == "0.9x (worst)"             # slower at S = 256
    assert m["decode S=64 down_proj_500m r=16 [cuda, graph]"]["ratio"] == "0.75 of floor"
    assert m["decode S=64 down_proj_500m r=16 [cuda, graph]"]["verdict"] == "PASS"
    assert m["decode S=64 down_proj_500m r=16 [triton, graph]"]["verdict"] == "MISS"
    per = m["Perceiver fwd 64 frames (32 seqs x 4096 rows)"]
    assert per["verdict"] == "MISS" and "(bytes)" in per["floor"] and per["ratio"] == "0.5 of floor"
    assert m["query TTFT smolvlm2-500m 64 frames: in context / adapter"]["ratio"] == "20x"
    md = gpu_suite.render_summary(s)
    assert "ceilings (measured): copy 4000 GB/s" in md


# ------------------------------------------------------------------------------ the table reader


def _table(entries, **over):
    t = {"schema": _tuned.SCHEMA, "version": _tuned.VERSION, "rank_edges": list(_tuned.RANK_EDGES),
         "seq_edges": list(_tuned.SEQ_EDGES), "rule": "test", "entries": entries}
    t.update(over)
    return t


ENTRY = {"device": "NVIDIA H200", "dtype": "bf16", "d_in": 2560, "d_out": 960, "rank_bucket": 16, "seq_bucket": 64,
         "winner": "cuda"}


def test_committed_table_is_valid():
    table = _tuned.load_decode_table()
    assert table.path == _tuned.DEFAULT_PATH
    with open(_tuned.DEFAULT_PATH) as f:
        raw = json.load(f)
    assert len(table) == len(raw["entries"])


def test_buckets():
    assert [_tuned.bucket(v, _tuned.SEQ_EDGES) for v in (0, 1, 2, 16, 17, 64, 65, 1024, 1025)] == \
        [1, 1, 16, 16, 64, 64, 256, 1024, None]
    assert [_tuned.bucket(v, _tuned.RANK_EDGES) for v in (1, 3, 8, 9, 33, 128, 129)] == [8, 8, 8, 16, 64, 128, None]


BAD_TABLES = [
    ("not_object", [1, 2], "JSON object"),
    ("schema", _table([], schema="something.else"), "schema"),
    ("version", _table([], version=2), "version"),
    ("edges", _table([], seq_edges=[1, 8, 64]), "seq_edges"),
    ("entries_type", _table({}), "entries"),
    ("missing_field", _table([{k: v for k, v in ENTRY.items() if k != "d_out"}]), "d_out"),
    ("bad_int", _table([dict(ENTRY, d_in="2560")]), "entries[0].d_in"),
    ("bad_bucket", _table([dict(ENTRY, seq_bucket=32)]), "seq_bucket"),
    ("bad_dtype", _table([dict(ENTRY, dtype="bfloat16")]), "dtype"),
    ("bad_winner", _table([dict(ENTRY, winner="reference")]), "winner"),
    ("conflict", _table([ENTRY, dict(ENTRY, winner="triton")]), "conflicting"),
]


@pytest.mark.parametrize("obj,words", [c[1:] for c in BAD_TABLES], ids=[c[0] for c in BAD_TABLES])
def test_validation_names_the_field(obj, words):
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
        _tuned.validate_decode_table(obj)


@pytest.fixture
def table_env(monkeypatch, tmp_path):
    """Point F2L_DECODE_DISPATCH at a table of our own; the cache is reset around the test."""
    def use(content):
        path = tmp_path / "table.json"
        path.write_text(content if isinstance(content, str) else json.dumps(content))
        monkeypatch.setenv("F2L_DECODE_DISPATCH", str(path))
        _tuned.reset_cache()
        return path

    monkeypatch.setattr(_tuned, "_device_name", lambda device: "NVIDIA H200")
    _tuned.reset_cache()
    yield use
    _tuned.reset_cache()


def test_decode_choice(table_env):
    table_env(_table([ENTRY, dict(ENTRY, seq_bucket=256, winner="triton")]))
    t = _tuned.decode_table()
    assert _tuned.decode_choice("NVIDIA H200", "bf16", 2560, 960, 16, 64, t) == "cuda"
    assert _tuned.decode_choice("NVIDIA H200", "bf16", 2560, 960, 12, 40, t) == "cuda"    # same buckets
    assert _tuned.decode_choice("NVIDIA H200", "bf16", 2560, 960, 16, 65, t) == "triton"  # measured: triton
    assert _tuned.decode_choice("NVIDIA H200", "bf16", 2560, 960, 16, 16, t) == "triton"  # no entry
    assert _tuned.decode_choice("NVIDIA H100 80GB HBM3", "bf16", 2560, 960, 16, 64, t) == "triton"
    assert _tuned.decode_choice("NVIDIA H200", "fp16", 2560, 960, 16, 64, t) == "triton"
    assert _tuned.decode_choice("NVIDIA H200", "bf16", 960, 2560, 16, 64, t) == "triton"
    assert _tuned.decode_choice("NVIDIA H200", "bf16", 2560, 960, 16, 5000, t) == "triton"
    assert _tuned.decode_choice("NVIDIA H200", "bf16", 2560, 960, 200, 64, t) == "triton"
    dev = torch.device("cuda", 0)
    assert _tuned.decode_prefers_cuda(dev, torch.bfloat16, 2560, 960, 16, 64)
    assert not _tuned.decode_prefers_cuda(dev, torch.float32, 2560, 960, 16, 64)


@pytest.mark.parametrize("content", ["{not json", json.dumps(_table([], schema="other")), None],
                         ids=["corrupt", "foreign", "missing"])
def test_unusable_table_warns_once_and_falls_back(table_env, content, monkeypatch, tmp_path):
    if content is None:
        monkeypatch.setenv("F2L_DECODE_DISPATCH", str(tmp_path / "does_not_exist.json"))
        _tuned.reset_cache()
    else:
        table_env(content)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for _ in range(3):
            assert not _tuned.decode_prefers_cuda(torch.device("cuda", 0), torch.bfloat16, 2560, 960, 16, 64)
    ours = [w for w in rec if issubclass(w.category, _tuned.DispatchTableWarning)]
    assert len(ours) == 1 and "Triton" in str(ours[0].message)


def test_tables_can_be_switched_off(table_env, monkeypatch):
    table_env(_table([]))
    assert not _tuned.decode_prefers_cuda(torch.device("cuda", 0), torch.bfloat16, 2560, 960, 16, 64)
    monkeypatch.setenv("F2L_DECODE_DISPATCH", "off")
    assert not _tuned.decode_prefers_cuda(torch.device("cuda", 0), torch.bfloat16, 2560, 960, 16, 64)  # memoised
    _tuned.reset_cache()
    assert _tuned.decode_prefers_cuda(torch.device("cuda", 0), torch.bfloat16, 2560, 960, 16, 64)


def test_import_never_reads_the_table(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{corrupt")
    env = dict(os.environ, F2L_DECODE_DISPATCH=str(bad), PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, "-c",
                          "import f2l_kernels, f2l_kernels.lora, f2l_kernels._tuned as t; print(len(t._cache))"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "0", res.stderr[-2000:]


# ------------------------------------------------------------------------------ the auto decision in _pick


@pytest.fixture
def fake_cuda_dispatch(monkeypatch, table_env):
    """``_pick`` as it runs on a GPU with the extension built: resolve to 'cuda', the
    kernel supports the batch; only the measured table decides."""
    import f2l_kernels.lora as lora

    class FakeCuda:
        @staticmethod
        def supports(batch, r_max, dtype):
            return True

    monkeypatch.setattr(lora, "resolve_backend", lambda backend, device, has_cuda_kernel=False:
                        "cuda" if (backend or "auto") in ("auto", "cuda") else backend)
    monkeypatch.setattr(lora, "_cuda_ready", lambda: True)
    monkeypatch.setattr(lora, "_cuda", FakeCuda)
    monkeypatch.delenv("F2L_BACKEND", raising=False)
    table_env(_table([dict(ENTRY, d_in=64, d_out=48, rank_bucket=16, seq_bucket=16)]))
    return lora


def test_auto_decode_follows_the_table(fake_cuda_dispatch):
    lora = fake_cuda_dispatch
    x = torch.randn(4, 64).to(torch.bfloat16)
    dec = lora.LoraBatch.build([1] * 4, [0, 1, -1, 3])
    assert lora._pick(None, x, dec, False, 16, 48) == "cuda"            # measured: CUDA wins
    assert lora._pick(None, x, dec, False, 16, 40) == "triton"          # no entry for d_out 40
    assert lora._pick(None, x.float(), dec, False, 16, 48) == "triton"  # no fp32 entry
    assert lora._pick(None, x, dec, False, 32, 48) == "triton"          # rank bucket 32
    comp = lora.LoraBatch.build([1] * 4, [[0, 1], 1, 2, 3])             # 2 adapters x r 16 = bucket 32
    assert lora._pick(None, x, comp, False, 16, 48) == "triton"
    assert lora._pick(None, x, dec, True, 16, 48) == "triton"           # backward: Triton only
    assert lora._pick(None, x, lora.LoraBatch.build([3, 1], [0, 1]), False, 16, 48) == "triton"  # prefill
    assert lora._pick("cuda", x, dec, False, 16, 40) == "cuda"          # an explicit request is obeyed


# ------------------------------------------------------------------------------ the table writer


def _decode_rows():
    rows = []

    def add(d_in, d_out, r, S, mode, cuda_us, triton_us):
        for be, us in (("cuda", cuda_us), ("triton", triton_us)):
            rows.append({"shape": "s", "d_in": d_in, "d_out": d_out, "r": r, "S": S, "dtype": "bfloat16",
                         "backend": be, "mode": mode, "us": us})

    add(2560, 960, 16, 64, "eager", 10.0, 20.0)
    add(2560, 960, 16, 64, "graph", 5.0, 8.0)        # faster in both modes: cuda
    add(2560, 960, 16, 256, "eager", 10.0, 20.0)
    add(2560, 960, 16, 256, "graph", 9.0, 8.0)       # slower in graphs: triton
    add(2560, 960, 16, 16, "eager", 9.9, 10.0)       # 1 % faster: within the margin, triton
    add(2560, 960, 16, 40, "eager", 1.0, 9.0)        # not at a bucket edge: ignored
    rows.append({"shape": "s", "d_in": 2560, "d_out": 960, "r": 8, "S": 1, "dtype": "bfloat16", "backend": "triton",
                 "mode": "eager", "us": 3.0})          # no CUDA time: no entry
    return rows


def test_dispatch_entries_rule():
    got = {(e["seq_bucket"], e["rank_bucket"]): e for e in gpu_suite.dispatch_entries(_decode_rows(), "NVIDIA H200")}
    assert set(got) == {(64, 16), (256, 16), (16, 16)}
    assert got[(64, 16)]["winner"] == "cuda" and got[(64, 16)]["cuda_us"] == {"eager": 10.0, "graph": 5.0}
    assert got[(256, 16)]["winner"] == "triton"
    assert got[(16, 16)]["winner"] == "triton"
    assert all(e["dtype"] == "bf16" and e["device"] == "NVIDIA H200" for e in got.values())


def test_update_dispatch_merges_and_validates(tmp_path, table_env):
    res_dir = tmp_path / "res"
    res_dir.mkdir()
    env = {"device": "NVIDIA H200", "dry_run": False, "commit": "c0ffee", "time": "2026-12-01T00:00:00Z"}
    _write(res_dir, "decode.json", env, _decode_rows())
    path = tmp_path / "tuned.json"
    other = dict(ENTRY, device="NVIDIA H100 80GB HBM3")
    stale = dict(ENTRY, seq_bucket=1024)               # this device's old entry: replaced
    path.write_text(json.dumps(_table([other, stale])))
    gpu_suite.update_dispatch(str(res_dir), str(path))
    table = _tuned.load_decode_table(str(path))
    assert len(table) == 4
    assert table.lookup("NVIDIA H100 80GB HBM3", "bf16", 2560, 960, 16, 64) == "cuda"   # kept
    assert table.lookup("NVIDIA H200", "bf16", 2560, 960, 16, 1024) is None              # replaced
    assert table.lookup("NVIDIA H200", "bf16", 2560, 960, 16, 64) == "cuda"
    assert table.lookup("NVIDIA H200", "bf16", 2560, 960, 16, 256) == "triton"
    raw = json.loads(path.read_text())
    assert all(e.get("commit") == "c0ffee" for e in raw["entries"] if e["device"] == "NVIDIA H200")
    # the reader in use picks the new file up
    table_env(path.read_text())
    assert _tuned.decode_prefers_cuda(torch.device("cuda", 0), torch.bfloat16, 2560, 960, 16, 50)


def test_update_dispatch_refuses_cpu_results(tmp_path):
    _write(tmp_path, "decode.json", {"device": "cpu (x86_64, 2 cores)", "dry_run": False}, _decode_rows())
    with pytest.raises(SystemExit, match="not measured on a GPU"):
        gpu_suite.update_dispatch(str(tmp_path), str(tmp_path / "t.json"))
    with pytest.raises(SystemExit, match="no readable decode.json"):
        gpu_suite.update_dispatch(str(tmp_path / "nowhere"), str(tmp_path / "t.json"))


def test_pytest_log_counts():
    log = ("tests/test_cuda.py::test_matches_reference[rank1-bf16-auto] PASSED  [  1%]\n"
           "tests/test_cuda.py::test_opcheck FAILED                            [  2%]\n"
           "tests/test_cuda.py::test_graph[fp32-c2] SKIPPED (needs sm_90)      [  3%]\n"
           "FAILED tests/test_cuda.py::test_opcheck - AssertionError\n")
    got = gpu_suite._pytest_counts(log)
    assert (got["passed"], got["failed"], got["skipped"]) == (1, 1, 1)
    assert got["failures"] == ["tests/test_cuda.py::test_opcheck"]
