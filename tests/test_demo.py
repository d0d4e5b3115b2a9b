"""`f2l demo` smoke: the quick run produces the full report, the plot and the files."""
import argparse
import json
import math
import os

import pytest

from f2l import demo

REQUIRED = ("adapter_accuracy", "no_adapter_accuracy", "chance_accuracy", "composed_accuracy",
            "visual_tokens_in_context", "visual_tokens_with_adapter")


def test_demo_quick_smoke(tmp_path, capsys):
    out = tmp_path / "demo"
    report = demo.run_demo(str(out), quick=True, seed=0, progress=False)
    for key in REQUIRED:
        assert key in report, key
    on_disk = json.loads((out / "report.json").read_text())
    assert set(REQUIRED) <= set(on_disk) and on_disk["quick"] is True
    for key in ("adapter_accuracy", "no_adapter_accuracy", "composed_accuracy", "adapter_accuracy_greedy"):
        assert 0.0 <= report[key] <= 1.0, key
    assert 0.0 < report["chance_accuracy"] < 1.0
    assert report["visual_tokens_with_adapter"] == 0
    # 4 frames a segment, 9 tokens a frame for the tiny preset
    assert report["visual_tokens_in_context"] == 4 * report["base"]["tokens_per_frame"]
    assert report["train_steps"] == demo.DemoSettings.quick().single_steps + demo.DemoSettings.quick().compose_steps
    assert math.isfinite(report["final_loss"]) and report["query_ms_adapter"] > 0
    assert (out / "training_curve.png").stat().st_size > 1000
    assert os.path.isfile(out / "hypernet" / "model.safetensors")
    printed = capsys.readouterr().out
    assert "adapter accuracy" in printed and "visual tokens" in printed


def test_demo_arguments_and_validation(tmp_path):
    p = demo.add_demo_arguments(argparse.ArgumentParser())
    a = p.parse_args(["--out", "x", "--quick", "--seed", "3"])
    assert (a.out_dir, a.quick, a.seed, a.device) == ("x", True, 3, None)
    with pytest.raises(ValueError, match="seed"):
        demo.run_demo(str(tmp_path), seed=-1)
    with pytest.raises(TypeError, match="out_dir"):
        demo.run_demo(3)
    with pytest.raises(TypeError, match="settings"):
        demo.run_demo(str(tmp_path), settings={"steps": 1})
