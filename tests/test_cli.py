"""The ``f2l`` command: help, round trips on the tiny preset, and one-line errors (exit 2,
no traceback) for every bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from f2l.cli import _COMMANDS, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(argv, capsys):
    """(exit code, stdout, stderr) of ``f2l argv`` in this process."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Three small videos, a manifest over them and a saved tiny hypernetwork."""
    from f2l.data.synthetic import make_video, write_video
    from f2l.hypernet import Frames2LoRAHypernet, HypernetConfig
    from f2l.model import Frames2LoRA
    from f2l.presets import load_base

    d = tmp_path_factory.mktemp("cli")
    for i in range(3):
        write_video(make_video(i, frames_per_segment=4, size=32).frames, d / f"v{i}.mp4")
    torch.manual_seed(0)
    base = load_base("tiny")
    net = Frames2LoRAHypernet(HypernetConfig.tiny(base))
    with torch.no_grad():  # a trained-looking hypernetwork: B nonzero, so adapters differ per video
        for p in net.scaler_b.values():
            p.normal_()
    Frames2LoRA.from_pretrained(base, hypernet=net).save_hypernet(d / "hn")
    rows = [{"id": f"r{i}", "video_path": f"v{i % 3}.mp4", "prompt": "What shape is moving?",
             "target_text": "circle" if i % 2 else None, "dataset": "synthetic", "split": "test"} for i in range(5)]
    (d / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "notes.txt").write_text("not a model file\n")
    return d


def test_help_subprocess_is_fast_and_lists_commands():
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-m", "f2l.cli", "--help"], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0
    for c in _COMMANDS:
        assert f"  {c.name}" in r.stdout


def test_help_does_not_import_torch_modules():
    # --help must not pay for torch/transformers: check in a clean interpreter
    code = "import sys; from f2l.cli import main; main(['--help']); print('torch' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("False")


@pytest.mark.parametrize("name", [c.name for c in _COMMANDS])
def test_every_command_has_help(name, capsys):
    code, out, err = run([name, "--help"], capsys)
    assert code == 0, err
    assert f"f2l {name}" in out


def test_version_and_no_arguments(capsys):
    code, out, _ = run(["--version"], capsys)
    assert code == 0 and out.startswith("f2l ")
    code, _, err = run([], capsys)
    assert code == 2 and "usage: f2l" in err


def test_round_trip_internalize_ask_compose_export(work, tmp_path, capsys):
    code, out, err = run(["internalize", work / "v0.mp4", work / "v1.mp4", "-o", tmp_path / "ads",
                          "--hypernet", work / "hn"], capsys)
    assert code == 0, err
    a0, a1 = tmp_path / "ads" / "v0.safetensors", tmp_path / "ads" / "v1.safetensors"
    assert a0.is_file() and a1.is_file()

    from f2l.adapter import VideoAdapter
    from f2l.model import Frames2LoRA

    m = Frames2LoRA.from_pretrained("tiny", hypernet=work / "hn")
    ad0 = VideoAdapter.load(a0, base_fingerprint=m.base.fingerprint)
    want = m.answer([ad0, ad0], ["What shape is moving?", "What colour is it?"], max_new_tokens=6)
    code, out, err = run(["ask", a0, "What shape is moving?", "What colour is it?", "--max-new-tokens", 6, "--json"],
                         capsys)
    assert code == 0, err
    got = [json.loads(line)["answer"] for line in out.strip().splitlines()]
    assert got == want

    code, out, err = run(["compose", a0, a1, "-o", tmp_path / "both.safetensors", "--weights", 1, -0.5], capsys)
    assert code == 0, err
    both = VideoAdapter.load(tmp_path / "both.safetensors")
    ref = VideoAdapter.compose([ad0, VideoAdapter.load(a1)], weights=[1.0, -0.5])
    assert both.segments == ref.segments
    for k in both.lora_a:
        torch.testing.assert_close(both.lora_a[k], ref.lora_a[k], rtol=0, atol=0)
    code, out, err = run(["compose", a0, a1, "-o", tmp_path / "scaled.safetensors", "--bias-scaler", 0.5], capsys)
    assert code == 0, err
    scaled = VideoAdapter.load(tmp_path / "scaled.safetensors")
    ref = VideoAdapter.compose([ad0, VideoAdapter.load(a1)], bias_scaler=0.5)
    assert scaled.bias_rank == ref.bias_rank > 0 and scaled.metadata["bias_scaler"] == 0.5
    for k in scaled.lora_a:
        torch.testing.assert_close(scaled.lora_a[k], ref.lora_a[k], rtol=0, atol=0)
        torch.testing.assert_close(scaled.lora_b[k], ref.lora_b[k], rtol=0, atol=0)

    code, out, err = run(["export-peft", tmp_path / "both.safetensors", "-o", tmp_path / "peft", "--base", "tiny"],
                         capsys)
    assert code == 0, err
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["r"] == both.rank and cfg["lora_alpha"] / cfg["r"] == both.scale
    assert "--max-lora-rank" in out


def test_infer_is_batched_resumable_and_keeps_rows(work, tmp_path, capsys):
    out_path = tmp_path / "pred.jsonl"
    argv = ["infer", "--manifest", work / "m.jsonl", "--output", out_path, "--hypernet", work / "hn",
            "--batch-size", 2, "--max-new-tokens", 4, "--no-progress"]
    code, out, err = run(argv + ["--limit", 3], capsys)
    assert code == 0, err
    first = [json.loads(x) for x in out_path.read_text().splitlines()]
    assert [r["id"] for r in first] == ["r0", "r1", "r2"]
    # a crash mid-line: the partial line is dropped and redone
    with open(out_path, "a") as f:
        f.write('{"id": "r3", "predic')
    code, out, err = run(argv, capsys)
    assert code == 0, err
    assert "3 already done" in out
    rows = [json.loads(x) for x in out_path.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["r0", "r1", "r2", "r3", "r4"]
    for r in rows:
        assert isinstance(r["prediction"], str)
        assert r["prompt"] == "What shape is moving?" and r["dataset"] == "synthetic"
    assert rows[0]["prediction"] == rows[3]["prediction"]  # same video, same prompt, greedy
    assert rows[:3] == first


def test_infer_marks_unreadable_videos_and_retries(work, tmp_path, capsys):
    (tmp_path / "broken.mp4").write_bytes(b"\x00" * 64)
    import shutil

    shutil.copy(work / "v0.mp4", tmp_path / "v0.mp4")
    rows = [{"id": "good", "video_path": "v0.mp4", "prompt": "Q?"}, {"id": "bad", "video_path": "broken.mp4",
                                                                     "prompt": "Q?"}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["infer", "--manifest", tmp_path / "m.jsonl", "--output", tmp_path / "p.jsonl", "--hypernet", work / "hn",
            "--max-new-tokens", 2, "--no-progress"]
    code, out, err = run(argv, capsys)
    assert code == 1 and "1 errors" in out
    got = {r["id"]: r for r in map(json.loads, (tmp_path / "p.jsonl").read_text().splitlines())}
    assert isinstance(got["good"]["prediction"], str)
    assert got["bad"]["prediction"] is None and got["bad"]["error"]
    code, out, err = run(argv, capsys)  # retried, still broken, and listed once
    lines = (tmp_path / "p.jsonl").read_text().splitlines()
    assert code == 1 and len(lines) == 2 and "1 already done" in out


def test_teacher_fills_missing_targets(work, tmp_path, capsys):
    out_path = tmp_path / "m2.jsonl"
    code, out, err = run(["teacher", "--manifest", work / "m.jsonl", "--model", "tiny", "--output", out_path,
                          "--max-new-tokens", 3, "--batch-size", 2, "--no-progress"], capsys)
    assert code == 0, err
    rows = [json.loads(x) for x in out_path.read_text().splitlines()]
    assert len(rows) == 5
    for r in rows:
        if r["id"] in ("r1", "r3"):
            assert r["target_text"] == "circle"  # kept
        else:
            assert r["target_text"] and r["metadata"]["target_source"] == "teacher"
    assert not (tmp_path / "m2.jsonl.partial").exists()
    # the same manifest feeds training
    from f2l.data.manifest import read_manifest

    assert len(read_manifest(out_path, require_target=True, check_files=True)) == 5  # paths still resolve
    code, out, err = run(["train", "--manifest", out_path, "--split", "test", "--base", "tiny", "--hypernet-preset",
                          "tiny", "--steps", 1, "--batch-size", 2, "--out", tmp_path / "tr"], capsys)
    assert code == 0, err
    assert (tmp_path / "tr" / "hypernet" / "model.safetensors").is_file()


def write_official(path):
    """An official-format checkpoint for the tiny base (helpers of test_convert)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    try:
        from test_convert import _save_official, official_state_dict
    finally:
        sys.path.pop(0)
    from f2l.hypernet import HypernetConfig
    from f2l.presets import load_base

    cfg = HypernetConfig.tiny(load_base("tiny"), rank=2, bias_rank=2, head_dim=8)
    _save_official(path, official_state_dict(cfg), cfg)


def test_convert_then_use_as_hypernet(work, tmp_path, capsys):
    write_official(tmp_path / "ck.pt")
    code, out, err = run(["convert", tmp_path / "ck.pt", "-o", tmp_path / "hn", "--head-dim", 8, "--base", "tiny"],
                         capsys)
    assert code == 0, err
    code, out, err = run(["internalize", work / "v2.mp4", "-o", tmp_path / "ads", "--hypernet", tmp_path / "hn"],
                         capsys)
    assert code == 0, err
    from f2l.adapter import VideoAdapter

    assert VideoAdapter.load(tmp_path / "ads" / "v2.safetensors").rank == 4


def test_bench_missing_script(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("F2L_BENCH_SCRIPT", str(tmp_path / "nope.py"))
    code, _, err = run(["bench", "--quick"], capsys)
    assert code == 2 and err.count("\n") == 1 and "f2l bench: error:" in err


def test_bench_forwards_arguments(monkeypatch, tmp_path, capsys):
    script = tmp_path / "b.py"
    script.write_text("import argparse\n"
                      "def main(argv=None):\n"
                      "    p = argparse.ArgumentParser(prog='f2l bench')\n"
                      "    p.add_argument('--quick', action='store_true')\n"
                      "    a = p.parse_args(argv); print('quick' if a.quick else 'full'); return {}\n")
    monkeypatch.setenv("F2L_BENCH_SCRIPT", str(script))
    assert run(["bench", "--quick"], capsys)[:2] == (0, "quick\n")
    code, _, err = run(["bench", "--nope"], capsys)
    assert code == 2 and err.count("\n") == 1 and "unrecognized arguments: --nope" in err


def _bad_cases(w):
    """(id, argv) of user errors; every one must give exit 2 and one line on stderr."""
    return [
        ("unknown-command", ["frobnicate"]),
        ("ask-missing-adapter", ["ask", w / "nope.safetensors", "Q?"]),
        ("ask-not-an-adapter", ["ask", w / "notes.txt", "Q?", "--base", "tiny"]),
        ("ask-adapter-is-dir", ["ask", w, "Q?"]),
        ("ask-no-question", ["ask", w / "a.safetensors"]),
        ("ask-wrong-base", ["ask", w / "foreign.safetensors", "Q?", "--base", "tiny"]),
        ("ask-bad-max-tokens", ["ask", w / "a.safetensors", "Q?", "--max-new-tokens", "0"]),
        ("ask-unknown-base", ["ask", w / "a.safetensors", "Q?", "--base", "no-such-model"]),
        ("internalize-missing-video", ["internalize", w / "nope.mp4", "-o", w / "o", "--base", "tiny"]),
        ("internalize-no-output", ["internalize", w / "v0.mp4"]),
        ("internalize-output-is-file", ["internalize", w / "v0.mp4", "-o", w / "notes.txt", "--base", "tiny"]),
        ("internalize-missing-hypernet", ["internalize", w / "v0.mp4", "-o", w / "o", "--hypernet", w / "nohn"]),
        ("internalize-not-a-video", ["internalize", w / "notes.txt", "-o", w / "o", "--hypernet", w / "hn"]),
        ("internalize-official-no-base", ["internalize", w / "v0.mp4", "-o", w / "o", "--hypernet",
                                          w / "official.pt"]),
        ("internalize-official-hub-base", ["internalize", w / "v0.mp4", "-o", w / "o", "--hypernet",
                                           w / "official.pt", "--base", "HuggingFaceTB/SmolVLM2-500M-Video-Instruct"]),
        ("internalize-bad-dtype", ["internalize", w / "v0.mp4", "-o", w / "o", "--dtype", "int8"]),
        ("compose-weights-count", ["compose", w / "a.safetensors", w / "a.safetensors", "-o", w / "c.safetensors",
                                   "--weights", "1"]),
        ("compose-weight-nan", ["compose", w / "a.safetensors", "-o", w / "c.safetensors", "--weights", "nan"]),
        ("compose-mixed-bases", ["compose", w / "a.safetensors", w / "foreign.safetensors", "-o", w / "c.safetensors"]),
        ("compose-output-is-dir", ["compose", w / "a.safetensors", "-o", w]),
        ("compose-bias-scaler-nan", ["compose", w / "a.safetensors", "-o", w / "c.safetensors", "--bias-scaler",
                                     "nan"]),
        ("export-missing-adapter", ["export-peft", w / "nope.safetensors", "-o", w / "p"]),
        ("export-not-an-adapter", ["export-peft", w / "notes.txt", "-o", w / "p"]),
        ("export-wrong-base", ["export-peft", w / "foreign.safetensors", "-o", w / "p", "--base", "tiny"]),
        ("export-output-is-file", ["export-peft", w / "a.safetensors", "-o", w / "notes.txt"]),
        ("convert-missing", ["convert", w / "nope.pt", "-o", w / "c"]),
        ("convert-not-a-checkpoint", ["convert", w / "notes.txt", "-o", w / "c"]),
        ("convert-not-official", ["convert", w / "other.pt", "-o", w / "c"]),
        ("infer-missing-manifest", ["infer", "--manifest", w / "nope.jsonl", "--output", w / "p.jsonl"]),
        ("infer-bad-manifest", ["infer", "--manifest", w / "notes.txt", "--output", w / "p.jsonl", "--base", "tiny",
                                "--preset", "tiny"]),
        ("infer-output-is-dir", ["infer", "--manifest", w / "m.jsonl", "--output", w]),
        ("infer-no-base", ["infer", "--manifest", w / "m.jsonl", "--output", w / "p.jsonl"]),
        ("teacher-missing-manifest", ["teacher", "--manifest", w / "nope.jsonl", "--model", "tiny",
                                      "--output", w / "x.jsonl"]),
        ("teacher-unknown-model", ["teacher", "--manifest", w / "m.jsonl", "--model", "nonexistent",
                                   "--output", w / "x.jsonl"]),
        ("train-unknown-option", ["train", "--definitely-not-an-option"]),
        ("demo-bad-seed", ["demo", "--seed", "x"]),
    ]


@pytest.fixture(scope="module")
def bad_dir(work):
    from f2l.adapter import VideoAdapter
    from f2l.presets import load_base

    base = load_base("tiny")
    L, (di, do) = base.num_layers, base.module_shapes(("down_proj",))["down_proj"]
    kw = dict(lora_a={"down_proj": torch.randn(L, 2, di)}, lora_b={"down_proj": torch.randn(L, do, 2)}, scale=2.0)
    VideoAdapter(**kw, base_fingerprint=base.fingerprint, metadata={"base": "tiny"}).save(work / "a.safetensors")
    VideoAdapter(**kw, base_fingerprint="0000000000000000", metadata={"base": "tiny"}).save(
        work / "foreign.safetensors")
    torch.save({"encoder.weight": torch.zeros(2)}, work / "other.pt")
    write_official(work / "official.pt")
    return work


@pytest.mark.parametrize("case", [c[0] for c in _bad_cases(Path("."))])
def test_user_errors_are_one_line_exit_2(bad_dir, case, capsys):
    argv = dict(_bad_cases(bad_dir))[case]
    code, out, err = run(argv, capsys)
    assert code == 2, (out, err)
    lines = [x for x in err.splitlines() if x and ": warning: " not in x]
    assert len(lines) == 1, err
    assert lines[0].startswith(("f2l: error:", f"f2l {argv[0]}: error:")), err
    assert "Traceback" not in err
