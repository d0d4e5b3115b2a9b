"""Training: loss, schedule, checkpoints and exact resume, composition, DDP, the fused path."""
import json
import math
import os

import numpy as np
import pytest
import torch

from f2l import train as tr
from f2l.data import synthetic as syn

FRAMES = 3


@pytest.fixture(scope="module")
def model():
    from f2l.model import Frames2LoRA

    torch.manual_seed(0)
    m = Frames2LoRA.from_pretrained("tiny", preset="tiny")
    m._init_state = {k: v.clone() for k, v in m.hypernet.state_dict().items()}
    return m


@pytest.fixture
def fresh(model):
    """The module's model with the hypernetwork back at its initial weights."""
    model.hypernet.load_state_dict(model._init_state)
    model.hypernet.zero_grad(set_to_none=True)
    return model


def _store_and_examples(model, n=6, seed=0, cache=True):
    store = tr.VideoStore(model, cache=cache)
    examples = []
    for v in syn.make_videos(n, seed=seed, frames_per_segment=FRAMES, size=model.base.image_size):
        store.add(v.id, v.frames)
        examples += [tr.Example((v.id,), qa.question, qa.answer) for qa in v.questions()]
    return store, examples


def _cfg(tmp_path, **kw):
    base = dict(steps=4, batch_size=4, lr=3e-3, warmup_steps=1, out_dir=str(tmp_path), progress=False, log_every=1,
                weight_decay=0.01)
    base.update(kw)
    return tr.TrainConfig(**base)


def _params(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# --------------------------------------------------------------------------- pieces


def test_answer_loss_matches_manual():
    torch.manual_seed(1)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 1, -100], [-100, 2, 6, -100, -100]])
    loss, n = tr.answer_loss(logits, labels)
    # position t predicts labels[t + 1]
    terms = [(0, 1, 3), (0, 2, 1), (1, 0, 2), (1, 1, 6)]
    ref = -sum(torch.log_softmax(logits[s, t], -1)[y] for s, t, y in terms) / len(terms)
    assert n == 4 and torch.allclose(loss, ref, atol=1e-6)
    with pytest.raises(ValueError, match="labels: no answer tokens"):
        tr.answer_loss(logits, torch.full((2, 5), -100))
    with pytest.raises(ValueError, match="logits/labels"):
        tr.answer_loss(logits, labels[:, :4])


def test_cosine_schedule():
    f = tr.cosine_schedule(10, 2, 0.1)
    vals = [f(i) for i in range(11)]
    assert vals[0] == pytest.approx(1 / 3) and vals[1] == pytest.approx(2 / 3) and vals[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(vals[2:], vals[3:]))  # monotone decay after warm-up
    assert vals[10] == pytest.approx(0.1) and vals[6] == pytest.approx(0.1 + 0.9 * 0.5)
    assert tr.cosine_schedule(5, 0)(0) == 1.0
    with pytest.raises(ValueError, match="warmup_steps"):
        tr.cosine_schedule(5, 6)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(steps=-1), "steps"),
        (dict(steps=0, compose_steps=0), "steps"),
        (dict(batch_size=0), "batch_size"),
        (dict(lr=0.0), "lr"),
        (dict(lr=float("nan")), "lr"),
        (dict(warmup_ratio=1.5), "warmup_ratio"),
        (dict(betas=(0.9, 1.0)), "betas"),
        (dict(precision="fp8"), "precision"),
        (dict(grad_accum=True), "grad_accum"),
        (dict(manifest=3), "manifest"),
        (dict(out_dir=""), "out_dir"),
    ],
    ids=["negative-steps", "no-steps", "zero-batch", "zero-lr", "nan-lr", "warmup>1", "beta=1", "precision",
         "bool-accum", "manifest-type", "empty-out"],
)
def test_config_validation(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        tr.TrainConfig(**kw)


def test_config_roundtrip_and_cli(tmp_path):
    import argparse

    cfg = tr.TrainConfig(steps=7, compose_steps=3, betas=(0.8, 0.95), out_dir=str(tmp_path))
    assert tr.TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown TrainConfig keys"):
        tr.TrainConfig.from_dict({"stepz": 1})
    p = tr.add_train_arguments(argparse.ArgumentParser())
    args = p.parse_args(["--manifest", "m.jsonl", "--steps", "5", "--compose-steps", "2", "--out", "o",
                         "--kl-weight", "0.5", "--no-progress", "--cache-encoded"])
    c = tr.config_from_args(args)
    assert (c.manifest, c.steps, c.compose_steps, c.out_dir, c.kl_weight, c.progress, c.cache_encoded) == \
        ("m.jsonl", 5, 2, "o", 0.5, False, True)


def test_sources_are_pure_functions_of_step():
    exs = [tr.Example((f"v{i}",), f"q{i}", "a") for i in range(5)]
    a, b = tr.ShuffledSource(exs, seed=3), tr.ShuffledSource(exs, seed=3)
    # out-of-order queries (as after a resume) give the same batches
    assert [a.global_batch(s, 3) for s in (0, 1, 2, 3)] == [b.global_batch(s, 3) for s in (3, 2, 1, 0)][::-1]
    epoch0 = [e.prompt for s in range(5) for e in a.global_batch(s, 1)]
    assert sorted(epoch0) == sorted(e.prompt for e in exs)  # an epoch visits every example once
    seg = tr.SegmentSource(a, max_segments=3, seed=1)
    batch = seg.global_batch(4, 8)
    assert batch == tr.SegmentSource(b, max_segments=3, seed=1).global_batch(4, 8)
    for ex in batch:
        k = len(ex.videos)
        assert 1 <= k <= 3
        if k > 1:
            assert ex.videos == tuple(tr.segment_key(ex.videos[0].split("#")[0], j, k) for j in range(k))
    with pytest.raises(ValueError, match="examples"):
        tr.ShuffledSource([])
    with pytest.raises(ValueError, match="max_segments"):
        tr.SegmentSource(a, max_segments=0)


def test_checkpoint_state_roundtrip():
    p = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(p.parameters(), lr=0.1, betas=(0.8, 0.9))
    p(torch.randn(4, 3)).sum().backward()
    opt.step()
    tensors = {}
    skel = tr.checkpoint._flatten(opt.state_dict(), "o", tensors)
    json.dumps(skel)  # plain JSON
    back = tr.checkpoint._unflatten(json.loads(json.dumps(skel)), tensors)
    ref = opt.state_dict()
    assert back["param_groups"][0]["betas"] == (0.8, 0.9)
    for pid, st in ref["state"].items():
        for k, v in st.items():
            assert torch.equal(back["state"][pid][k], v)
    rng = tr.checkpoint._flatten(tr.checkpoint._rng_state(), "r", tensors)
    a = torch.rand(3), np.random.rand(2)
    tr.checkpoint._set_rng_state(tr.checkpoint._unflatten(json.loads(json.dumps(rng)), tensors))
    b = torch.rand(3), np.random.rand(2)
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1])


# --------------------------------------------------------------------------- the loop on the tiny model


def test_store_segments_and_packing(fresh):
    store, _ = _store_and_examples(fresh, n=2)
    key = next(iter(store._sources))
    enc = store.encode([key, tr.segment_key(key, 0, 3), tr.segment_key(key, 2, 3), key])
    assert enc.num_videos == 4 and enc.cu_seqlens.tolist()[0] == 0
    assert enc.num_frames == [FRAMES, 1, 1, FRAMES]
    assert torch.equal(enc.video(0), enc.video(3))
    # cached states equal a one-video encoding through the public model path
    ref = fresh.encode([store._sources[key]])
    assert torch.allclose(enc.video(0), ref.video(0), atol=1e-5)
    with pytest.raises(KeyError, match="unknown video"):
        store.encode(["nope"])
    with pytest.raises(ValueError, match="4 segments"):
        store.encode([tr.segment_key(key, 0, 4)])


def test_trainer_learns_and_grad_accum_matches(fresh, tmp_path):
    store, exs = _store_and_examples(fresh, n=3)
    src = tr.ShuffledSource(exs, seed=0)

    def run(batch, accum, steps):
        fresh.hypernet.load_state_dict(fresh._init_state)
        cfg = _cfg(tmp_path, steps=steps, batch_size=batch, grad_accum=accum, lr=1e-2, clip_grad_norm=0.0)
        t = tr.Trainer(fresh, cfg, [tr.Stage("single", steps, src)], store)
        return t, t.fit()

    t1, h1 = run(4, 1, 1)
    p1 = _params(fresh.hypernet)
    t2, h2 = run(2, 2, 1)
    p2 = _params(fresh.hypernet)
    # every answer has the same token count, so the two normalisations agree
    assert h1[0]["loss"] == pytest.approx(h2[0]["loss"], rel=1e-5)
    for k in p1:
        assert torch.allclose(p1[k], p2[k], atol=1e-6, rtol=1e-4), k
    # a short run on a few examples brings the loss down
    _, h = run(4, 1, 8)
    assert h[-1]["loss"] < h[0]["loss"] - 0.05
    assert all(math.isfinite(x["loss"]) and x["answer_tokens"] > 0 for x in h)
    rows = [json.loads(x) for x in open(tmp_path / tr.METRICS)]
    assert [r["step"] for r in rows][-8:] == list(range(1, 9))


def test_resume_reproduces_uninterrupted_run(fresh, tmp_path):
    """N steps straight vs N/2, checkpoint, a new trainer resuming, N/2: bit-for-bit."""
    store, exs = _store_and_examples(fresh, n=3)
    src = tr.ShuffledSource(exs, seed=5)
    comp = tr.SegmentSource(src, max_segments=3, seed=5)
    store.precompute(list(store._sources) + [tr.segment_key(k, j, n) for k in list(store._sources)
                                              for n in (2, 3) for j in range(n)], progress=False)

    def trainer(out):
        cfg = _cfg(out, steps=2, compose_steps=2, lr=5e-3, weight_decay=0.05, grad_accum=2, batch_size=1)
        return tr.Trainer(fresh, cfg, [tr.Stage("single", 2, src), tr.Stage("compose", 2, comp)], store)

    fresh.hypernet.load_state_dict(fresh._init_state)
    full = trainer(tmp_path / "a")
    ha = [h["loss"] for h in full.fit()]
    pa = _params(fresh.hypernet)

    fresh.hypernet.load_state_dict(fresh._init_state)
    first = trainer(tmp_path / "b")
    hb = [h["loss"] for h in first.fit(until=2)]
    ck = first.save()
    assert tr.latest_checkpoint(str(tmp_path / "b")) == ck
    torch.manual_seed(123)  # disturb the RNG and the weights: the checkpoint must restore both
    fresh.hypernet.load_state_dict(fresh._init_state)
    second = trainer(tmp_path / "b")
    assert second.resume(str(tmp_path / "b")) == 2
    hb += [h["loss"] for h in second.fit()]
    pb = _params(fresh.hypernet)
    assert ha == hb
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k
    rows = [json.loads(x) for x in open(tmp_path / "b" / tr.METRICS)]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # the hypernetwork inside a checkpoint loads on its own
    from f2l.hypernet import Frames2LoRAHypernet

    net = Frames2LoRAHypernet.from_pretrained(os.path.join(ck, "hypernet"))
    assert net.config.to_dict() == fresh.hypernet.config.to_dict()


def test_checkpoint_errors(fresh, tmp_path):
    opt = torch.optim.AdamW(fresh.hypernet.parameters())
    with pytest.raises(FileNotFoundError, match="path"):
        tr.load_checkpoint(str(tmp_path / "missing"), hypernet=fresh.hypernet)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not an f2l training checkpoint"):
        tr.load_checkpoint(str(tmp_path / "empty"), hypernet=fresh.hypernet)
    with pytest.raises(ValueError, match="step"):
        tr.save_checkpoint(str(tmp_path / "c"), hypernet=fresh.hypernet, optimizer=opt, scheduler=None, step=-1)
    assert not (tmp_path / "c").exists()


def test_composition_uses_adapter_lists(fresh, tmp_path):
    """A composed example's loss equals the loss with the materialised rank-space concat."""
    store, exs = _store_and_examples(fresh, n=2)
    keys = list(store._sources)
    cfg = _cfg(tmp_path)
    t = tr.Trainer(fresh, cfg, [tr.Stage("s", 1, tr.ShuffledSource(exs))], store)
    ex = tr.Example((keys[0], keys[1]), "What colour is the circle?", "red")
    with torch.no_grad():
        loss, _ = t.forward([ex])
        enc = store.encode(keys)
        ad = fresh.adapter_tensors(enc)
        cat_a = {m: torch.cat([a[:, 0], a[:, 1]], dim=1)[:, None] for m, a in ad.lora_a.items()}
        cat_b = {m: torch.cat([b[:, 0], b[:, 1]], dim=2)[:, None] for m, b in ad.lora_b.items()}
        # give the B factors some size so the check is not vacuous (B starts at zero)
        ids, mask, labels = fresh.question_ids([ex.prompt], [ex.target])
        import dataclasses

        ad2 = dataclasses.replace(ad, lora_a=cat_a, lora_b=cat_b, rank=2 * ad.rank)
        ref, _ = tr.answer_loss(fresh.lm_forward(ids, mask, ad2, [0]), labels)
    assert torch.allclose(loss, ref, atol=1e-6)


def test_kl_to_in_context_teacher(fresh, tmp_path):
    store, exs = _store_and_examples(fresh, n=2)
    cfg = _cfg(tmp_path, steps=1, kl_weight=0.5, batch_size=3)
    t = tr.Trainer(fresh, cfg, [tr.Stage("s", 1, tr.ShuffledSource(exs))], store)
    m = t.train_step()
    assert math.isfinite(m["kl"]) and m["kl"] >= 0
    assert m["loss"] == pytest.approx(m["ce"] + 0.5 * m["kl"], rel=1e-5)


def test_train_end_to_end_from_manifest(tmp_path):
    """train(cfg) on a manifest of mp4 files: single then composition stage, resume='auto'."""
    man = syn.write_synthetic_dataset(tmp_path / "data", num_videos=3, seed=2, frames_per_segment=4, size=48,
                                      progress=False)
    out = tmp_path / "run"
    cfg = tr.TrainConfig(manifest=man, steps=2, compose_steps=2, max_segments=2, batch_size=2, out_dir=str(out),
                         progress=False, log_every=1, save_every=2, hypernet_preset="tiny", cache_encoded=True)
    res = tr.train(cfg)
    assert res["steps"] == 4 and math.isfinite(res["final_loss"]) and res["examples"] == 12
    assert [h["stage"] for h in res["history"]] == ["single", "single", "compose", "compose"]
    from f2l.model import Frames2LoRA

    m = Frames2LoRA.from_pretrained("tiny", hypernet=res["hypernet_dir"])
    assert m.hypernet.config.rank == 4
    cfg2 = tr.TrainConfig(**{**cfg.to_dict(), "compose_steps": 3, "resume": "auto", "betas": cfg.betas})
    res2 = tr.train(cfg2)
    assert res2["resumed_from"] == 4 and res2["steps"] == 5 and len(res2["history"]) == 1
    with pytest.raises(ValueError, match="manifest"):
        tr.train(tr.TrainConfig(out_dir=str(out)))


# --------------------------------------------------------------------------- fused vs reference


def test_fused_and_reference_paths_give_the_same_loss_curve(fresh, tmp_path):
    """Liger-style convergence check: the Triton kernels (interpreted on CPU) and the
    reference path train the tiny model along the same loss curve."""
    store, exs = _store_and_examples(fresh, n=3)
    store.precompute(progress=False)
    src = tr.ShuffledSource(exs, seed=1)
    curves = {}
    for backend in ("reference", "triton"):
        fresh.hypernet.load_state_dict(fresh._init_state)
        cfg = _cfg(tmp_path / backend, steps=3, batch_size=3, lr=1e-2, backend=backend)
        curves[backend] = [h["loss"] for h in tr.Trainer(fresh, cfg, [tr.Stage("s", 3, src)], store).fit()]
    np.testing.assert_allclose(curves["triton"], curves["reference"], rtol=2e-4, atol=2e-5)


# --------------------------------------------------------------------------- DDP


DDP_STEPS, DDP_ACCUM = 4, 2


def _ddp_cfg(out_dir, world, **kw):
    # per rank: DDP_ACCUM micro-batches of one example; global batch = DDP_ACCUM * world
    return tr.TrainConfig(steps=DDP_STEPS, batch_size=1, grad_accum=DDP_ACCUM * (2 // world), lr=1e-2, warmup_steps=1,
                          out_dir=out_dir, progress=False, log_every=1, save_every=2, keep_checkpoints=0, **kw)


def _ddp_worker(rank, world, port, out_dir, result_dir, resume):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch.nn.parallel import DistributedDataParallel

        from f2l.model import Frames2LoRA

        # different inits per rank (and per run): DDP must start every rank from rank 0's
        # weights, and a resume must overwrite them all
        torch.manual_seed(100 + rank + (50 if resume else 0))
        m = Frames2LoRA.from_pretrained("tiny", preset="tiny")
        store, exs = _store_and_examples(m, n=4)
        cfg = _ddp_cfg(out_dir, world)
        t = tr.Trainer(m, cfg, [tr.Stage("s", DDP_STEPS, tr.ShuffledSource(exs, seed=0))], store)
        assert isinstance(t.net, DistributedDataParallel)
        if resume:
            t.resume(os.path.join(out_dir, "checkpoints", "step-0000002"))
        hist = t.fit()
        from safetensors.torch import save_file

        tag = f"{'resume' if resume else 'fit'}{rank}"
        save_file({k: v.contiguous() for k, v in m.hypernet.state_dict().items()},
                  os.path.join(result_dir, f"{tag}.safetensors"))
        with open(os.path.join(result_dir, f"{tag}.json"), "w") as f:
            json.dump([h["loss"] for h in hist], f)
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path, out_dir, res, resume):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(out_dir), str(res), resume), nprocs=2, join=True)


def test_ddp_two_processes_equal_single_process_and_resume_exactly(tmp_path):
    """2 gloo ranks under DistributedDataParallel (grad accumulation with no_sync) give the
    parameters of one process on the same global batch, and a resume under DDP from a
    mid-run checkpoint ends bit-identical to the uninterrupted DDP run."""
    import shutil

    from safetensors.torch import load_file

    from f2l.model import Frames2LoRA

    res = tmp_path / "res"
    res.mkdir()
    _spawn(tmp_path, tmp_path / "ddp", res, resume=False)
    l0, l1 = (json.load(open(res / f"fit{r}.json")) for r in (0, 1))
    assert len(l0) == DDP_STEPS and all(math.isfinite(x) for x in l0)
    assert l0 == l1  # the logged loss is the all-reduced mean
    p0, p1 = load_file(res / "fit0.safetensors"), load_file(res / "fit1.safetensors")
    for k in p0:
        assert torch.equal(p0[k], p1[k]), k
    assert tr.latest_checkpoint(str(tmp_path / "ddp")) is not None

    # one process, same global batch (4 micro-batches of one example), rank 0's init
    torch.manual_seed(100)
    m = Frames2LoRA.from_pretrained("tiny", preset="tiny")
    init = {k: v.clone() for k, v in m.hypernet.state_dict().items()}
    store, exs = _store_and_examples(m, n=4)
    single = tr.Trainer(m, _ddp_cfg(str(tmp_path / "single"), 1), [tr.Stage("s", DDP_STEPS, tr.ShuffledSource(exs, seed=0))],
                        store)
    assert single.net is m.hypernet
    ls = [h["loss"] for h in single.fit()]
    np.testing.assert_allclose(l0, ls, rtol=1e-5, atol=1e-6)
    # fp32 rounding only: DDP sums the ranks' averaged gradients in another order than one
    # process accumulating four micro-batches. AdamW divides by sqrt(v), so on the few
    # elements whose gradient is at rounding level that order moves an update by up to
    # ~1% of lr (measured: 2.5e-5 on 0.2% of one matrix, lr 1e-2, 4 steps).
    for k, v in m.hypernet.state_dict().items():
        torch.testing.assert_close(p0[k], v, rtol=1e-4, atol=1e-4, msg=k)
    # ... and far from the init: the comparison is not between two untrained copies
    assert max(float((p0[k] - init[k]).abs().max()) for k in init) > 1e-2
    # resume: a fresh run dir holding the DDP run's step-2 checkpoint, DDP ranks with other inits
    shutil.copytree(tmp_path / "ddp" / "checkpoints", tmp_path / "again" / "checkpoints")
    _spawn(tmp_path, tmp_path / "again", res, resume=True)
    r0 = load_file(res / "resume0.safetensors")
    for k in p0:
        assert torch.equal(r0[k], p0[k]), k
    assert json.load(open(res / "resume0.json")) == l0[2:]


def test_video_store_resizes_frames_with_the_models_longest_edge(fresh):
    """Training sees the frames internalize makes: F2LConfig.longest_edge reaches the store."""
    import dataclasses

    from f2l.video import load_video

    frames = torch.randint(0, 256, (2, 40, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    old = fresh.config
    try:
        fresh.config = dataclasses.replace(old, longest_edge=20)
        store = tr.VideoStore(fresh)
        store.add("v", frames)
        b = fresh.base
        want = load_video(frames, image_size=b.image_size, max_frames=store.max_frames, fps=store.fps,
                          mean=b.image_mean, std=b.image_std, longest_edge=20).pixel_values
        other = load_video(frames, image_size=b.image_size, max_frames=store.max_frames, fps=store.fps,
                           mean=b.image_mean, std=b.image_std).pixel_values
        got = store._load("v").pixel_values
        assert torch.equal(got, want) and not torch.equal(want, other)
    finally:
        fresh.config = old
