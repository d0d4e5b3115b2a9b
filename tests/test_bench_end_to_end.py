"""The end-to-end benchmark's --quick mode runs the same code as the GPU sweep on the
tiny preset; CI exercises it so the GPU run cannot rot."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))


@pytest.mark.slow
def test_quick_run_writes_results(tmp_path):
    import bench_end_to_end as e2e

    out = e2e.main(["--quick", "--out", str(tmp_path), "--reps", "1", "--frames", "2", "--concurrency", "2"])
    data = json.loads(open(out["json"]).read())
    assert data["env"]["device"] and data["env"]["torch"] and data["env"]["commit"]
    kinds = {r["kind"] for r in data["rows"]}
    assert kinds == {"question", "amortised", "serving", "training"}
    q = [r for r in data["rows"] if r["kind"] == "question"]
    assert {r["sweep"] for r in q} == {"frames", "resolution"}
    for r in q:
        # zero visual tokens with the adapter: only the question is in the prompt
        assert r["adapter_input_tokens"] == r["question_tokens"]
        assert r["in_context_input_tokens"] > r["visual_tokens"] > 0
        assert r["ttft_adapter_ms"] > 0 and r["internalize_ms"] > 0
        assert r["kv_bytes_per_video"] > 0 and r["adapter_bytes_per_video"] > 0
    res = [r for r in q if r["sweep"] == "resolution"]
    assert all(r["images"] == r["frames"] * 5 for r in res)  # 2x2 tiles + the global image
    train = [r for r in data["rows"] if r["kind"] == "training"]
    assert {r["backend"] for r in train} == {"reference", "auto"}
    for p in out["plots"]:
        assert os.path.getsize(p) > 1000
