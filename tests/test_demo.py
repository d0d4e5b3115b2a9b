"""`f2l demo` and the tiny-seeing base: the quick run produces the full report, plots and
files; the shipped base loads, is the one its report describes, and sees."""
import argparse
import dataclasses
import json
import math
import os

import numpy as np
import pytest
import torch

from f2l import demo
from f2l.data import pretrain_tiny as pt
from f2l.data import synthetic as syn

KIND_KEYS = ("chance", "no_adapter", "in_context", "adapter", "delta", "ci_low", "ci_high", "eq", "ni", "n")


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, demo.run_demo(str(out), quick=True, seed=0, progress=False, verbose=False)


def test_demo_quick_report(quick_report):
    out, r = quick_report
    expected = [*demo.SINGLE_KINDS, *demo.ORDER_KINDS, *(f"{k} (composed)" for k in demo.COMPOSED_KINDS)]
    assert list(r["kinds"]) == expected
    for k, v in r["kinds"].items():
        assert set(KIND_KEYS) <= set(v), k
        for key in ("no_adapter", "in_context", "adapter"):
            assert 0.0 <= v[key] <= 1.0, (k, key)
        assert v["delta"] == pytest.approx(v["adapter"] - v["in_context"])
        assert v["ci_low"] <= v["delta"] <= v["ci_high"]
        assert v["chance"] == pytest.approx(1 / len(syn.answer_choices(k.split()[0])))
    sw = r["frame_sweep"]
    s = demo.DemoSettings.quick()
    assert [p["frames"] for p in sw["points"]] == [s.frames * m for m in s.sweep]
    tpf = r["base"]["tokens_per_frame"]
    assert tpf == 9 and all(p["visual_tokens"] == p["frames"] * tpf for p in sw["points"])
    for p in r["cost"]["points"]:
        assert p["ttft_ms_adapter"] > 0 and p["ttft_ms_in_context"] > 0 and p["visual_tokens_with_adapter"] == 0
        assert p["ttft_ratio"] == pytest.approx(p["ttft_ms_in_context"] / p["ttft_ms_adapter"])
    assert set(r["criteria"]) >= {"in_context_ge_0.90_every_kind", "adapter_non_inferior_every_kind",
                                  "composed_ge_0.90", "adapter_at_max_frames_within_margin", "ttft_ratio"}
    assert r["train"]["steps"] == s.single_steps + s.compose_steps and math.isfinite(r["train"]["final_loss"])
    assert r["teacher"]["rows"] > 0 and r["quick"] is True
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["kinds"] == json.loads(json.dumps(r["kinds"]))
    for png in ("accuracy.png", "frame_sweep.png", "ttft.png", "training_curve.png"):
        assert (out / png).stat().st_size > 1000, png
    assert os.path.isfile(out / "hypernet" / "model.safetensors")
    assert os.path.isfile(out / "teacher" / "train_teacher.jsonl")


def test_demo_predictions_rescore_with_f2l_eval(quick_report):
    from f2l.eval import evaluate

    out, r = quick_report
    ev = out / "eval"
    res = evaluate(str(ev / "in_context.jsonl"), str(ev / "adapter.jsonl"), str(ev / "manifest.jsonl"),
                   margin=r["margin"], n_boot=r["settings"]["n_boot"], seed=r["seed"], metrics=("em",))
    for k, v in r["kinds"].items():
        g = res["groups"]["em"][k]
        assert (g["base"], g["v2l"], g["ci_low"], g["ci_high"]) == (v["in_context"], v["adapter"], v["ci_low"],
                                                                     v["ci_high"])


def test_demo_splits_are_disjoint_and_cover_every_kind():
    tr = demo._build_split("train", 6, 3, 3, 4, 0)
    te = demo._build_split("test", 6, 3, 3, 4, 1_000_003)
    assert {r.kind for r in tr.rows} == set(demo.SINGLE_KINDS + demo.ORDER_KINDS + demo.COMPOSED_KINDS)
    for k in tr.frames:
        assert not any(torch.equal(tr.frames[k], f) for f in te.frames.values() if f.shape == tr.frames[k].shape)
    join = next(k for k in tr.frames if "/join" in k)
    row = next(r for r in tr.rows if r.video == join)
    assert len(row.keys) >= 2 and torch.equal(tr.frames[join], torch.cat([tr.frames[x] for x in row.keys]))
    # pure in the seed
    again = demo._build_split("train", 6, 3, 3, 4, 0)
    assert [r.id for r in again.rows] == [r.id for r in tr.rows]
    assert all(torch.equal(again.frames[k], tr.frames[k]) for k in tr.frames)


def test_grouped_source_is_pure_in_step():
    from f2l.train import Example

    groups = [[Example((f"v{i}",), f"q{j}", "a") for j in range(3)] for i in range(5)]
    src = demo._GroupedSource([(groups, 1.0)], per_video=2, seed=4)
    a, b = src.global_batch(7, 8), src.global_batch(7, 8)
    assert a == b and len(a) == 8
    assert all(a[i].videos == a[i + 1].videos for i in range(0, 8, 2))
    with pytest.raises(ValueError, match="per_video"):
        src.global_batch(0, 7)
    with pytest.raises(ValueError, match="pools"):
        demo._GroupedSource([(groups, 0.0), ([], 1.0)], per_video=2, seed=4)


def test_grouped_source_draws_pools_by_weight():
    from f2l.train import Example

    few = [[Example(("few",), "q", "a")]]  # one group, weighted up
    many = [[Example((f"m{i}",), "q", "a")] for i in range(50)]
    src = demo._GroupedSource([(many, 0.25), (few, 0.75)], per_video=1, seed=0)
    got = [e.videos[0] == "few" for step in range(40) for e in src.global_batch(step, 20)]
    assert abs(np.mean(got) - 0.75) < 0.06  # 800 draws: one standard deviation is 0.015


def test_demo_arguments_and_validation(tmp_path):
    p = demo.add_demo_arguments(argparse.ArgumentParser())
    a = p.parse_args(["--out", "x", "--quick", "--seed", "3"])
    assert (a.out_dir, a.quick, a.seed, a.device, a.base) == ("x", True, 3, None, None)
    with pytest.raises(ValueError, match="seed"):
        demo.run_demo(str(tmp_path), seed=-1)
    with pytest.raises(TypeError, match="out_dir"):
        demo.run_demo(3)
    with pytest.raises(TypeError, match="settings"):
        demo.run_demo(str(tmp_path), settings={"steps": 1})
    with pytest.raises(FileNotFoundError, match="path"):
        demo.run_demo(str(tmp_path), quick=True, base=str(tmp_path / "missing"))
    for bad in (dict(compose_mix=(0.5, 0.5)), dict(single_mix=(1.0, -0.1)), dict(compose_mix=(0, 0, 0))):
        with pytest.raises(ValueError, match="mix"):
            demo.run_demo(str(tmp_path), settings=dataclasses.replace(demo.DemoSettings.quick(), **bad))


# --------------------------------------------------------------------------- the seeing base


def test_shipped_base_matches_its_report_and_sees():
    base = pt.load_seeing_base()
    rep = json.loads((pt.ASSET_DIR / "pretrain_report.json").read_text())
    assert base.fingerprint == rep["fingerprint"]
    assert (base.tokens_per_frame, base.image_size, base.num_layers) == (9, 48, 4)
    assert set(rep["accuracy_by_frames_per_segment"]["4"]) == set(pt.SINGLE + pt.MULTI)
    # a fresh held-out sample (a seed stream neither the pretraining nor its report used):
    # it answers every kind, not only colour
    rng = np.random.default_rng([12345, 1])
    items = pt._eval_items(rng, 8 * len(pt.SINGLE + pt.MULTI), 4)
    acc = pt.closed_set_accuracy(base, items, batch=16)
    assert set(acc) == set(pt.SINGLE + pt.MULTI)
    assert all(v >= 0.75 for v in acc.values()), acc


def test_probe_loss_reads_every_frame_and_each_segment_direction():
    base = pt.build_untrained(3)
    probes = pt.Probes(base.tokens_per_frame, base.hidden_size)
    rng = np.random.default_rng(7)
    items = pt.sample_items(rng, 3, 2, multi_prob=1.0)  # 2-3 segments of 2 frames each
    n_frames = sum(f.shape[0] for f, _, _ in items)
    tokens = torch.randn(n_frames, base.tokens_per_frame, base.hidden_size, requires_grad=True)
    pt.probe_loss(probes, tokens, items).backward()
    assert bool((tokens.grad.abs().sum((1, 2)) > 0).all())  # every frame is supervised
    # one frame a segment: no direction term, only the per-frame classes
    items1 = pt.sample_items(np.random.default_rng(8), 2, 1, multi_prob=0.0)
    t1 = torch.randn(2, base.tokens_per_frame, base.hidden_size)
    specs = [segs[0] for _, _, segs in items1]
    assert torch.allclose(pt.probe_loss(probes, t1, items1), probes.frame_loss(t1, specs))
    # with two frames the direction term is added (and is positive)
    assert float(pt.probe_loss(probes, tokens.detach(), items)) > float(
        probes.frame_loss(tokens.detach(), [sp for f, _, segs in items for sp in segs for _ in range(2)]))


def _state_probe_case(loss_fn, frames: int):
    """A fresh base and probes, 3 videos of 2-3 segments of ``frames`` frames, random text
    states; checks that ``loss_fn`` supervises every token of every frame."""
    base = pt.build_untrained(3)
    probes = pt.Probes(base.tokens_per_frame, base.hidden_size)
    items = pt.sample_items(np.random.default_rng(9), 3, frames, multi_prob=1.0)
    n_frames = sum(f.shape[0] for f, _, _ in items)
    states = torch.randn(n_frames, base.tokens_per_frame, base.hidden_size, requires_grad=True)
    loss_fn(probes, states, items).backward()
    assert bool((states.grad.abs().sum(2) > 0).all())
    return base, probes, items, n_frames


def test_order_loss_labels_every_token_with_its_segment():
    base, probes, items, n_frames = _state_probe_case(pt.order_loss, 2)
    # states that carry the segment index one-hot, read by an identity head: loss ~0
    idx = [j for _, _, segs in items for j in range(len(segs)) for _ in range(2)]
    exact = torch.zeros(n_frames, base.tokens_per_frame, base.hidden_size)
    exact[torch.arange(n_frames), :, torch.tensor(idx)] = 1.0
    with torch.no_grad():
        probes.order.weight.copy_(torch.eye(len(syn.SHAPES), base.hidden_size) * 50)
        probes.order.bias.zero_()
    assert float(pt.order_loss(probes, exact, items).detach()) < 1e-6
    exact_wrong = exact.roll(1, dims=2)
    assert float(pt.order_loss(probes, exact_wrong, items).detach()) > 10


def test_state_loss_reads_every_frame_of_the_text_states():
    base, probes, items, n_frames = _state_probe_case(pt.state_loss, 3)
    specs = [sp for _, _, segs in items for sp in segs for _ in range(3)]
    nc, ns = len(syn.COLOURS), len(syn.SHAPES)
    exact = torch.zeros(n_frames, base.tokens_per_frame, base.hidden_size)
    for i, sp in enumerate(specs):  # states that carry the frame's answers one-hot
        exact[i, :, list(syn.COLOURS).index(sp.colour)] = 1
        exact[i, :, nc + syn.SHAPES.index(sp.shape)] = 1
        exact[i, :, nc + ns + sp.count - 1] = 1
    with torch.no_grad():  # read by an identity head
        probes.state.weight.copy_(torch.eye(probes.state.out_features, base.hidden_size) * 50)
        probes.state.bias.zero_()
    assert float(pt.state_loss(probes, exact, items).detach()) < 1e-6
    # answer_loss adds the order and state terms only with a weight
    items1 = pt.sample_items(np.random.default_rng(10), 2, 2, multi_prob=0.0)
    a = float(pt.answer_loss(base, items1, probes).detach())
    assert float(pt.answer_loss(base, items1, probes, state_weight=1.0).detach()) > a
    assert float(pt.answer_loss(base, items1, probes, order_weight=1.0).detach()) > a


def test_stage_3_from_a_stage_2_checkpoint_is_the_full_run(tmp_path, monkeypatch):
    monkeypatch.setattr(pt, "PROBE_WARMUP_STEPS", 2)
    kw = dict(vision_steps=2, steps=4, eval_videos=6, progress=False)
    s2 = pt.pretrain(tmp_path / "s2", long_steps=0, **kw)
    full = pt.pretrain(tmp_path / "full", long_steps=2, **kw)
    cont = pt.pretrain(tmp_path / "cont", long_steps=2, init=tmp_path / "s2", eval_videos=6, progress=False)
    assert cont["init_fingerprint"] == s2["fingerprint"] != full["fingerprint"]
    assert cont["fingerprint"] == full["fingerprint"]
    assert pt.load_seeing_base(tmp_path / "cont").fingerprint == full["fingerprint"]
    with pytest.raises(FileNotFoundError, match="init"):
        pt.pretrain(tmp_path / "x", init=tmp_path / "missing", progress=False)


def test_vision_stage_lowers_the_probe_loss():
    torch.manual_seed(0)
    base = pt.build_untrained(3)
    probes = pt.Probes(base.tokens_per_frame, base.hidden_size)
    params = [*base.vision_model.parameters(), *base.connector.parameters(), *probes.parameters()]
    opt = torch.optim.AdamW(params, lr=3e-3)
    losses = []
    for _ in range(8):  # the same 16 frames each step
        loss = pt.vision_probe_loss(base, probes, np.random.default_rng(5))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] * 0.8, losses


def test_pretrain_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="vision_steps"):
        pt.pretrain(tmp_path, vision_steps=-1)
    with pytest.raises(ValueError, match="aux_weight"):
        pt.pretrain(tmp_path, aux_weight=-0.5)
    with pytest.raises(ValueError, match="steps"):
        pt.pretrain(tmp_path, steps=0)
    with pytest.raises(ValueError, match="long_steps"):
        pt.pretrain(tmp_path, long_steps=-1)
    with pytest.raises(ValueError, match="long_lr"):
        pt.pretrain(tmp_path, long_lr=0.0)
    with pytest.raises(ValueError, match="order_weight"):
        pt.pretrain(tmp_path, order_weight=-1.0)
    with pytest.raises(ValueError, match="state_weight"):
        pt.pretrain(tmp_path, state_weight=float("nan"))


def test_answer_stage_walks_its_frame_phases_in_order(monkeypatch):
    seen = []

    def fake_items(rng, n, frames, **kw):
        seen.append(frames)
        return real(rng, 4, 1)

    real = pt.sample_items
    monkeypatch.setattr(pt, "sample_items", fake_items)
    base = pt.build_untrained(3)
    probes = pt.Probes(base.tokens_per_frame, base.hidden_size)
    hist = pt.answer_stage(base, probes, 6, lr=1e-3, batch_size=4, aux_weight=0.3, motion_weight=0.0,
                           rng=np.random.default_rng(0), phases=(((1, 1.0),), ((2, 0.5), (3, 0.5)), ((64, 1.0),)),
                           progress=False)
    assert seen[:2] == [1, 1] and set(seen[2:4]) <= {2, 3} and seen[4:] == [64, 64]
    assert [h["frames"] for h in hist] == seen and all(math.isfinite(h["loss"]) for h in hist)


def test_pretraining_lowers_the_answer_loss():
    base = pt.build_untrained(3)
    rng = np.random.default_rng(0)
    items = pt.sample_items(rng, 4, 2)
    opt = torch.optim.AdamW([p for p in base.model.parameters()], lr=3e-3)
    losses = []
    for _ in range(6):
        loss = pt.answer_loss(base, items)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] * 0.8, losses
