"""Reliability guarantees (docs/guarantees.md): what an adversarial user tried, one test each.

Outputs appear atomically (files and directories), one writer per output (a lock file with
the owner's pid), non-finite tensors are refused at load, nothing is unpickled, resume never
loses or duplicates work, and every user error is one line with exit code 2.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_cli import run  # (exit code, stdout, stderr) of f2l argv in this process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_line_error(code, err):
    lines = [x for x in err.splitlines() if x and ": warning: " not in x]
    return code == 2 and len(lines) == 1 and ": error: " in lines[0] and "Traceback" not in err


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.fixture(scope="module")
def base():
    from f2l.presets import load_base

    return load_base("tiny")


def _adapter(base, *, fill=None, rank=2, dtype=torch.float32, **kw):
    from f2l.adapter import VideoAdapter

    L, (di, do) = base.num_layers, base.module_shapes(("down_proj",))["down_proj"]
    a, b = torch.randn(L, rank, di, dtype=dtype), torch.randn(L, do, rank, dtype=dtype)
    if fill is not None:
        b[0, 0, 0] = fill
    kw.setdefault("base_fingerprint", base.fingerprint)
    kw.setdefault("metadata", {"base": "tiny"})
    return VideoAdapter(lora_a={"down_proj": a}, lora_b={"down_proj": b}, scale=2.0, **kw)


@pytest.fixture(scope="module")
def work(tmp_path_factory, base):
    from f2l.data.synthetic import make_video, write_video
    from f2l.hypernet import Frames2LoRAHypernet, HypernetConfig
    from f2l.model import Frames2LoRA

    d = tmp_path_factory.mktemp("rel")
    for i in range(2):
        write_video(make_video(i, frames_per_segment=4, size=32).frames, d / f"v{i}.mp4")
    torch.manual_seed(0)
    net = Frames2LoRAHypernet(HypernetConfig.tiny(base))
    Frames2LoRA.from_pretrained(base, hypernet=net).save_hypernet(d / "hn")
    rows = [{"id": f"r{i}", "video_path": f"v{i % 2}.mp4", "prompt": "What shape?", "target_text": "circle",
             "split": "train"} for i in range(4)]
    (d / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _adapter(base).save(d / "a.safetensors")
    _adapter(base).save(d / "b.safetensors")
    _adapter(base, fill=float("nan")).save(d / "nan.safetensors", allow_nonfinite=True)
    _adapter(base, fill=float("inf")).save(d / "inf.safetensors", allow_nonfinite=True)
    return d


def _train_cfg(out, **kw):
    from f2l import train as tr

    c = dict(synthetic=2, steps=4, batch_size=2, save_every=2, keep_checkpoints=2, out_dir=str(out),
             progress=False, log_every=1, hypernet_preset="tiny", warmup_steps=0)
    c.update(kw)
    return tr.TrainConfig(**c)


def _metrics_steps(out):
    return [json.loads(x)["step"] for x in Path(out, "metrics.jsonl").read_text().splitlines() if x.strip()]


# --------------------------------------------------------------------------- 1. checkpoints of an earlier run


def test_train_refuses_a_run_dir_of_another_run(tmp_path):
    from f2l import train as tr

    out = tmp_path / "D"
    tr.train(_train_cfg(out, steps=6))
    with pytest.raises(ValueError, match="--resume.*--overwrite"):
        tr.train(_train_cfg(out, steps=2))
    res = tr.train(_train_cfg(out, steps=2, overwrite=True))
    assert res["steps"] == 2
    latest = tr.latest_checkpoint(str(out))
    assert latest is not None and latest.endswith("step-0000002")
    assert sorted(os.listdir(out / "checkpoints")) == ["latest.json", "step-0000002"]
    assert _metrics_steps(out) == [1, 2]


def test_retention_is_by_step_and_never_deletes_latest(tmp_path):
    """Resuming from an older checkpoint with higher-numbered ones around: the new checkpoint
    survives, latest.json names it, and resume continues from it without duplicate rows."""
    from f2l import train as tr

    out = tmp_path / "D"
    tr.train(_train_cfg(out, steps=6, save_every=2, keep_checkpoints=3))  # step-2, step-4, step-6
    ck = out / "checkpoints"
    assert sorted(os.listdir(ck))[-3:] == ["step-0000002", "step-0000004", "step-0000006"]
    tr.train(_train_cfg(out, steps=6, save_every=3, keep_checkpoints=1, resume=str(ck / "step-0000002")))
    assert tr.latest_checkpoint(str(out)).endswith("step-0000006")
    assert _metrics_steps(out) == [1, 2, 3, 4, 5, 6]
    # keep_checkpoints=1 kept exactly the newest; a 10-million-step name sorts after the 7-digit ones
    assert sorted(d for d in os.listdir(ck) if d.startswith("step-")) == ["step-0000006"]
    assert sorted(["step-10000000", "step-9999999"], key=tr.checkpoint._checkpoint_step)[-1] == "step-10000000"


def test_prune_keeps_what_it_should(tmp_path):
    from f2l import train as tr

    for s in (1, 2, 3, 10):
        (tmp_path / f"step-{s:07d}").mkdir()
    tr.checkpoint._prune_checkpoints(str(tmp_path), "step-0000010", 10, 5)  # fewer than keep: nothing goes
    assert len(os.listdir(tmp_path)) == 4
    tr.checkpoint._prune_checkpoints(str(tmp_path), "step-0000002", 2, 2)  # resumed at 2: 3 and 10 are its dead future
    assert sorted(os.listdir(tmp_path)) == ["step-0000001", "step-0000002"]


def test_resume_tolerates_a_truncated_metrics_line_and_names_a_bad_one(tmp_path):
    from f2l import train as tr

    out = tmp_path / "D"
    tr.train(_train_cfg(out, steps=2, save_every=2))
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # killed mid-write
    res = tr.train(_train_cfg(out, steps=3, resume="auto"))
    assert res["resumed_from"] == 2 and _metrics_steps(out) == [1, 2, 3]
    p = out / "metrics.jsonl"
    p.write_text(p.read_text().replace('"step": 2', '"step": 2 garbage', 1))
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2"):
        tr.train(_train_cfg(out, steps=4, resume="auto"))


def test_metrics_are_on_disk_before_the_checkpoint_that_covers_them(tmp_path):
    """log_every > save_every: a kill right after a save must not lose the rows it covers."""
    from f2l import train as tr

    out = tmp_path / "D"
    cfg = _train_cfg(out, steps=3, save_every=2, log_every=100)
    seen = {}

    def on_step(step, m):
        if step == 3:  # the checkpoint at step 2 exists: the rows of steps 1-2 must too
            seen["rows"] = _metrics_steps(out)

    from f2l.model import Frames2LoRA

    model = Frames2LoRA.from_pretrained("tiny", preset="tiny")
    store = tr.VideoStore(model)
    exs = tr.run._synthetic_examples(cfg, store)
    t = tr.Trainer(model, cfg, [tr.Stage("single", 3, tr.ShuffledSource(exs))], store, on_step=on_step)
    t.fit()
    assert seen["rows"] == [1, 2]


# --------------------------------------------------------------------------- 2. + 3. atomic exports, finite tensors


def test_failed_export_leaves_nothing_loadable(work, tmp_path, capsys):
    out = tmp_path / "peft"
    code, _, err = run(["export-peft", work / "nan.safetensors", "-o", out], capsys)
    assert one_line_error(code, err) and "non-finite" in err and not out.exists()
    code, _, err = run(["export-peft", work / "a.safetensors", "-o", out, "--base", "tiny",
                        "--layers-path", "model.layers"], capsys)
    assert one_line_error(code, err) and not out.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")], os.listdir(tmp_path)


def test_failed_export_keeps_the_previous_export(work, tmp_path, capsys):
    out = tmp_path / "peft"
    assert run(["export-peft", work / "a.safetensors", "-o", out], capsys)[0] == 0
    before = {p: (out / p).read_bytes() for p in os.listdir(out)}
    code, _, err = run(["export-peft", work / "b.safetensors", "-o", out, "--base", "tiny",
                        "--layers-path", "model.layers"], capsys)
    assert code == 2 and {p: (out / p).read_bytes() for p in os.listdir(out)} == before
    assert run(["export-peft", work / "b.safetensors", "-o", out], capsys)[0] == 0  # replaced atomically
    assert {p: (out / p).read_bytes() for p in os.listdir(out)} != before


def test_export_refuses_to_replace_a_foreign_directory(work, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    code, _, err = run(["export-peft", work / "a.safetensors", "-o", out], capsys)
    assert one_line_error(code, err) and (out / "thesis.tex").read_text() == "precious"


@pytest.mark.parametrize("name", ["nan", "inf"])
def test_non_finite_adapters_are_rejected_at_load(work, name):
    from f2l.adapter import VideoAdapter

    with pytest.raises(ValueError, match=r"lora_b\['down_proj'\].*non-finite"):
        VideoAdapter.load(work / f"{name}.safetensors")
    ad = VideoAdapter.load(work / f"{name}.safetensors", allow_nonfinite=True)  # the debugging opt-out
    assert not torch.isfinite(ad.lora_b["down_proj"]).all()


def test_ask_and_compose_refuse_non_finite_adapters(work, tmp_path, capsys):
    code, out, err = run(["ask", work / "nan.safetensors", "Q?"], capsys)
    assert one_line_error(code, err) and "non-finite" in err and out == ""
    code, _, err = run(["compose", work / "a.safetensors", work / "inf.safetensors", "-o", tmp_path / "c.st"],
                       capsys)
    assert one_line_error(code, err) and not (tmp_path / "c.st").exists()


def test_compose_refuses_an_overflowing_result(base):
    from f2l.adapter import VideoAdapter

    big = _adapter(base, dtype=torch.float16)
    big.lora_a["down_proj"].fill_(60000.0)
    with pytest.raises(ValueError, match="non-finite"):
        VideoAdapter.compose([big, big], weights=[2.0, 1.0])


def test_saving_a_non_finite_adapter_is_refused(base, tmp_path):
    with pytest.raises(ValueError, match="non-finite"):
        _adapter(base, fill=float("nan")).save(tmp_path / "x.safetensors")
    assert not os.listdir(tmp_path)


# --------------------------------------------------------------------------- 4. composed adapters carry the base


def test_composed_adapter_can_be_asked_without_base(work, tmp_path, capsys):
    from f2l.adapter import VideoAdapter

    c = tmp_path / "c.safetensors"
    assert run(["compose", work / "a.safetensors", work / "b.safetensors", "-o", c], capsys)[0] == 0
    assert VideoAdapter.load(c).metadata["base"] == "tiny"
    code, out, err = run(["ask", c, "What shape?", "--max-new-tokens", "2"], capsys)
    assert code == 0, err


def test_internalize_long_records_the_base(work, tmp_path, capsys):
    from f2l.adapter import VideoAdapter

    o = tmp_path / "o"
    code, _, err = run(["internalize", work / "v0.mp4", "-o", o, "--hypernet", work / "hn", "--long",
                        "--segment-frames", "2"], capsys)
    assert code == 0, err
    ad = VideoAdapter.load(o / "v0.safetensors")
    assert len(ad.segments) >= 2 and ad.metadata["base"] == "tiny" and ad.metadata.get("instruction")
    assert run(["ask", o / "v0.safetensors", "Q?", "--max-new-tokens", "1"], capsys)[0] == 0


# --------------------------------------------------------------------------- 5. one writer per output


def test_second_infer_writer_gets_a_clear_error(work, tmp_path, capsys):
    from f2l.files import OutputLock

    out = tmp_path / "p.jsonl"
    with OutputLock(out):
        assert json.loads(Path(str(out) + ".lock").read_text())["pid"] == os.getpid()
        code, _, err = run(["infer", "--manifest", work / "m.jsonl", "--output", out, "--hypernet", work / "hn",
                            "--no-progress"], capsys)
    assert one_line_error(code, err) and str(os.getpid()) in err and "in use" in err
    assert not out.exists() and not Path(str(out) + ".lock").exists()


def test_stale_lock_is_taken_over_and_resume_deduplicates(work, tmp_path, capsys):
    out = tmp_path / "p.jsonl"
    Path(str(out) + ".lock").write_text(json.dumps({"pid": _dead_pid(), "host": os.uname().nodename}))
    dup = {"id": "r0", "video_path": "v0.mp4", "prompt": "What shape?", "prediction": "x"}
    out.write_text(json.dumps(dup) + "\n" + json.dumps(dup) + "\n")  # two writers ran before the fix
    code, _, err = run(["infer", "--manifest", work / "m.jsonl", "--output", out, "--hypernet", work / "hn",
                        "--no-progress", "--max-new-tokens", "1"], capsys)
    assert code == 0, err
    ids = [json.loads(x)["id"] for x in out.read_text().splitlines()]
    assert sorted(ids) == ["r0", "r1", "r2", "r3"]
    assert not Path(str(out) + ".lock").exists()


def test_second_train_writer_gets_a_clear_error(tmp_path):
    from f2l import train as tr
    from f2l.files import OutputBusyError, OutputLock

    out = tmp_path / "D"
    with OutputLock(out):
        with pytest.raises(OutputBusyError, match=str(os.getpid())):
            tr.train(_train_cfg(out, steps=1))
    assert not (out / "metrics.jsonl").exists()


def test_lock_is_exclusive_across_processes(tmp_path):
    code = ("import sys, time; from f2l.files import OutputLock\n"
            "with OutputLock(sys.argv[1]):\n    print('held', flush=True); time.sleep(30)\n")
    env = {**os.environ, "PYTHONPATH": ROOT}
    p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "o")], stdout=subprocess.PIPE, env=env,
                         text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        from f2l.files import OutputBusyError, OutputLock

        with pytest.raises(OutputBusyError, match=str(p.pid)):
            with OutputLock(tmp_path / "o"):
                pass
    finally:
        p.kill()
        p.wait()
    with OutputLock(tmp_path / "o"):  # the holder died: its lock is stale and taken over
        pass


# --------------------------------------------------------------------------- 6. fingerprint


def test_fingerprint_identifies_weights_not_dtype(base):
    from f2l.presets import load_base

    fps = {dt: load_base("tiny", dtype=dt).fingerprint for dt in (torch.float16, torch.bfloat16)}
    assert fps == {torch.float16: base.fingerprint, torch.bfloat16: base.fingerprint}


def test_fingerprint_of_a_checkpoint_dir_ignores_load_dtype(base, tmp_path):
    from f2l.presets import load_base

    base.model.save_pretrained(tmp_path / "ck")
    base.tokenizer.save_pretrained(tmp_path / "ck")
    fp = {dt: load_base(str(tmp_path / "ck"), dtype=dt).fingerprint for dt in (None, torch.float16, torch.bfloat16)}
    assert len(set(fp.values())) == 1, fp


def test_ask_fp16_adapter_on_fp32_base_and_the_mismatch_message_names_the_base(work, tmp_path, capsys):
    o = tmp_path / "o"
    assert run(["internalize", work / "v0.mp4", "-o", o, "--hypernet", work / "hn", "--dtype", "float16"],
               capsys)[0] == 0
    code, _, err = run(["ask", o / "v0.safetensors", "Q?", "--max-new-tokens", "1", "--dtype", "float32"], capsys)
    assert code == 0, err
    code, _, err = run(["ask", _foreign(tmp_path), "Q?", "--base", "tiny"], capsys)
    assert one_line_error(code, err) and "'tiny'" in err and "0000000" in err


def _foreign(d):
    from f2l.presets import load_base

    p = d / "foreign.safetensors"
    _adapter(load_base("tiny"), base_fingerprint="0000000000000000", metadata={"base": "other-model"}).save(p)
    return p


# --------------------------------------------------------------------------- 7. one-line errors


@pytest.mark.parametrize("device", ["foo", "cuda:7" if torch.cuda.is_available() else "cuda"])
def test_bad_device_is_one_line(work, tmp_path, capsys, device):
    code, _, err = run(["internalize", work / "v0.mp4", "-o", tmp_path / "o", "--hypernet", work / "hn",
                        "--device", device], capsys)
    assert one_line_error(code, err) and "--device" in err
    code, _, err = run(["train", "--synthetic", "2", "--steps", "1", "--out", tmp_path / "t", "--device", device,
                        "--no-progress"], capsys)
    assert one_line_error(code, err) and "device" in err


def test_int32_adapter_is_one_line(work, tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    with safe_open(str(work / "a.safetensors"), "pt") as f:
        meta = f.metadata()
    t = {k: v.to(torch.int32) for k, v in load_file(str(work / "a.safetensors")).items()}
    save_file(t, str(tmp_path / "i.safetensors"), metadata=meta)
    for argv in (["ask", tmp_path / "i.safetensors", "Q?"], ["export-peft", tmp_path / "i.safetensors", "-o",
                                                            tmp_path / "p"]):
        code, _, err = run(argv, capsys)
        assert one_line_error(code, err) and "i.safetensors" in err and "int32" in err


def test_non_utf8_manifest_names_file_and_line(work, tmp_path, capsys):
    from f2l.data.manifest import ManifestError, read_manifest

    m = tmp_path / "bad.jsonl"
    m.write_bytes(b'{"id": "a", "video_path": "v.mp4", "prompt": "p", "target_text": "t"}\n{"id": "b\xff\xfe", "video_path": "v"}\n')
    with pytest.raises(ManifestError, match=r"bad\.jsonl:2: .*UTF-8"):
        read_manifest(m)
    code, _, err = run(["train", "--manifest", m, "--steps", "1", "--out", tmp_path / "t", "--no-progress"], capsys)
    assert one_line_error(code, err) and "bad.jsonl:2" in err


def test_malicious_zip_pickle_is_refused_without_unsafe_advice(tmp_path, capsys):
    evil = tmp_path / "evil.pt"
    code = ("import os, torch\nclass E:\n    def __reduce__(self):\n        return (os.system, ('touch PWNED',))\n"
            f"torch.save({{'x': E()}}, {str(evil)!r})\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
    code, _, err = run(["convert", evil, "-o", tmp_path / "c"], capsys)
    assert one_line_error(code, err) and "will not unpickle" in err
    assert "weights_only" not in err and "False" not in err
    assert not (tmp_path / "PWNED").exists()


# --------------------------------------------------------------------------- 8. smaller


def test_lora_linear_blames_lora_b_for_a_wrong_d_out():
    from f2l_kernels import LoraBatch, lora_linear

    x, w = torch.randn(3, 8), torch.randn(6, 8)
    a, b = torch.randn(1, 2, 8), torch.randn(1, 5, 2)
    with pytest.raises(ValueError, match=r"^lora_b: .*d_out=6"):
        lora_linear(x, w, None, a, b, LoraBatch.build([3], [0]))


def test_lm_forward_accepts_video_adapters():
    from f2l.hypernet import Frames2LoRAHypernet, HypernetConfig
    from f2l.model import Frames2LoRA
    from f2l.presets import load_base

    base = load_base("tiny")  # its own copy: a Frames2LoRA patches the base it is given
    m = Frames2LoRA.from_pretrained(base, hypernet=Frames2LoRAHypernet(HypernetConfig.tiny(base)))
    ad = _adapter(base)
    ids = torch.randint(0, 50, (3, 5))
    y = m.lm_forward(ids, adapters=[ad, None, [ad, ad]])
    assert y.shape[:2] == (3, 5) and torch.isfinite(y).all()
    torch.testing.assert_close(y[1], m.lm_forward(ids[1:2])[0])
    assert not torch.allclose(y[0], y[1])


def test_bench_writes_under_cwd(tmp_path, monkeypatch):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import bench_end_to_end as b
    finally:
        sys.path.pop(0)
    monkeypatch.chdir(tmp_path)
    assert b.results_dir(None) == str(tmp_path / "benchmarks" / "results")
    assert b.results_dir("x") == str(tmp_path / "x")


def test_outputs_respect_the_umask(base, tmp_path):
    from f2l.files import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "f.txt", "x")
        _adapter(base).save(tmp_path / "a.safetensors")
        _adapter(base).to_peft(tmp_path / "peft")
    finally:
        os.umask(old)
    assert oct((tmp_path / "f.txt").stat().st_mode & 0o777) == oct(0o644)
    assert oct((tmp_path / "a.safetensors").stat().st_mode & 0o777) == oct(0o644)
    assert oct((tmp_path / "peft").stat().st_mode & 0o777) == oct(0o755)
    assert oct((tmp_path / "peft" / "adapter_config.json").stat().st_mode & 0o777) == oct(0o644)


def test_data_root_confinement(tmp_path, capsys):
    from f2l.data.manifest import ManifestError, read_manifest

    root = tmp_path / "data"
    (root / "v").mkdir(parents=True)
    (root / "v" / "ok.mp4").write_bytes(b"")
    os.symlink("/etc/passwd", root / "v" / "link.mp4")
    rows = [("ok", "v/ok.mp4"), ("up", "../../etc/passwd"), ("abs", "/etc/passwd"), ("sym", "v/link.mp4")]
    m = tmp_path / "m.jsonl"
    m.write_text("".join(json.dumps({"id": i, "video_path": p, "prompt": "q"}) + "\n" for i, p in rows))
    assert len(read_manifest(m, data_root=root)) == 4  # the documented default: paths taken as written
    for line, (i, p) in enumerate(rows[1:], start=2):
        one = tmp_path / f"{i}.jsonl"
        one.write_text(json.dumps({"id": "ok", "video_path": "v/ok.mp4", "prompt": "q"}) + "\n"
                       + json.dumps({"id": i, "video_path": p, "prompt": "q"}) + "\n")
        with pytest.raises(ManifestError, match=rf"{i}\.jsonl:2: .*outside the data root"):
            read_manifest(one, data_root=root, confine=True)
    code, _, err = run(["infer", "--manifest", tmp_path / "up.jsonl", "--output", tmp_path / "o.jsonl",
                        "--base", "tiny", "--preset", "tiny", "--data-root", root, "--confine-to-data-root",
                        "--no-progress"], capsys)
    assert one_line_error(code, err) and "outside the data root" in err


def test_stale_temp_files_are_cleaned(base, tmp_path):
    from f2l.files import atomic_write_text

    dead = _dead_pid()
    stale = tmp_path / f".a.safetensors.{dead}.k1ll.tmp"
    stale.write_bytes(b"half")
    stale_dir = tmp_path / f".peft.{dead}.k1ll.tmp"
    stale_dir.mkdir()
    live = tmp_path / f".a.safetensors.{os.getpid()}.live.tmp"  # a writer still at work
    live.write_bytes(b"busy")
    _adapter(base).save(tmp_path / "a.safetensors")
    _adapter(base).to_peft(tmp_path / "peft")
    atomic_write_text(tmp_path / "other.txt", "x")
    assert not stale.exists() and not stale_dir.exists() and live.exists()
