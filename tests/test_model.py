"""Frames2LoRA end to end on the tiny preset: internalize -> answer, the KV-cached decode
loop against a full-recompute reference, batching, composition, persistence, the
Triton path, the in-context baseline and every bad input."""
import numpy as np
import pytest
import torch

from f2l.adapter import VideoAdapter
from f2l.generate import SamplingConfig, generate, left_pad
from f2l.model import Frames2LoRA
from f2l.prompt import question_prompt

QUESTIONS = ["What colour is the circle?", "Which direction is the square moving?", "How many frames?",
             "Describe the video.", "what is first"]


def _frames(n, seed, side=40):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, side, side, 3), dtype=torch.uint8, generator=g)


def write_mp4(path, n=10, side=32, rate=5):
    import av

    c = av.open(str(path), "w")
    s = c.add_stream("mpeg4", rate=rate)
    s.width = s.height = side
    s.pix_fmt = "yuv420p"
    for i in range(n):
        img = np.full((side, side, 3), 20 + 22 * i, np.uint8)
        for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
            c.mux(p)
    for p in s.encode():
        c.mux(p)
    c.close()
    return path


def _randomise_hypernet(m, seed=0):
    """A fresh hypernet predicts a zero delta (B scalers start at zero); give it a real one."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.hypernet.scaler_b.values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        if m.hypernet.bias_b is not None:
            for p in m.hypernet.bias_b.values():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Frames2LoRA.from_pretrained("tiny", preset="tiny")
    _randomise_hypernet(m)
    return m


@pytest.fixture(scope="module")
def videos():
    return [_frames(3, 1), _frames(6, 2), _frames(2, 3)]


@pytest.fixture(scope="module")
def adapters(model, videos):
    return model.internalize(videos)


def _greedy_reference(model, adapter, question, n):
    """Greedy decoding by full recomputation (no cache) through lm_forward."""
    from f2l.hypernet import AdapterTensors

    tok = model.base.tokenizer
    ids = torch.tensor([tok(question_prompt(question), add_special_tokens=False)["input_ids"]])
    at = None
    if adapter is not None:
        at = AdapterTensors(lora_a={k: v[:, None] for k, v in adapter.lora_a.items()},
                            lora_b={k: v[:, None] for k, v in adapter.lora_b.items()},
                            scale=adapter.scale, rank=adapter.rank)
    out = []
    stops = set(model.base.stop_token_ids())
    with torch.no_grad():
        for _ in range(n):
            t = int(model.lm_forward(ids, None, at, [0] if at is not None else None)[0, -1].argmax())
            if t in stops:
                break
            out.append(t)
            ids = torch.cat([ids, torch.tensor([[t]])], dim=1)
    return tok.decode(out, skip_special_tokens=True).strip()


# ------------------------------------------------------------------ end to end


def test_internalize_and_answer_end_to_end(model, adapters, tmp_path):
    assert len(adapters) == 3 and all(isinstance(a, VideoAdapter) for a in adapters)
    assert [a.num_frames for a in adapters] == [3, 6, 2]
    a = adapters[0]
    assert a.base_fingerprint == model.base.fingerprint and a.target_modules == ("down_proj",)
    assert a.num_layers == model.base.num_layers and a.lora_a["down_proj"].shape[-1] == 160
    # a real file through the same path
    path = write_mp4(tmp_path / "clip.mp4")
    (fa,) = model.internalize([str(path)])
    assert fa.num_frames == 2 and fa.source == str(path)
    answers = model.answer([fa, a], QUESTIONS[:2], max_new_tokens=6)
    assert len(answers) == 2 and all(isinstance(s, str) and s for s in answers)
    # the adapter changes what the model says
    base_answers = model.answer([None] * 3, QUESTIONS[:3], max_new_tokens=6)
    assert model.answer(adapters, QUESTIONS[:3], max_new_tokens=6) != base_answers


@pytest.mark.parametrize("which", [0, 1, None], ids=["adapter-0", "adapter-1", "no-adapter"])
def test_kv_cached_answer_equals_full_recompute(model, adapters, which):
    ad = adapters[which] if which is not None else None
    got = model.answer([ad], [QUESTIONS[1]], max_new_tokens=8)[0]
    assert got == _greedy_reference(model, ad, QUESTIONS[1], 8)


def test_zero_adapter_answers_like_base():
    torch.manual_seed(1)
    fresh = Frames2LoRA.from_pretrained("tiny", preset="tiny")  # B scalers at zero
    zero = fresh.internalize([_frames(2, 4)])[0]
    assert all(float(b.abs().max()) == 0 for b in zero.lora_b.values())
    assert fresh.answer([zero] * 3, QUESTIONS[:3], max_new_tokens=10) == \
        fresh.answer([None] * 3, QUESTIONS[:3], max_new_tokens=10)
    ids, mask, _ = fresh.question_ids(QUESTIONS[:2])
    at = fresh.adapter_tensors(fresh.encode([_frames(2, 4), _frames(3, 5)]))
    torch.testing.assert_close(fresh.lm_forward(ids, mask, at), fresh.lm_forward(ids, mask, None),
                               rtol=0, atol=1e-6)


def test_batched_answers_equal_one_by_one(model, adapters):
    batch_adapters = [adapters[0], adapters[1], None, [adapters[0], adapters[2]], adapters[1]]
    batched = model.answer(batch_adapters, QUESTIONS, max_new_tokens=6)
    single = [model.answer([a], [q], max_new_tokens=6)[0] for a, q in zip(batch_adapters, QUESTIONS)]
    assert batched == single


def test_composed_adapter_equals_concatenated(model, adapters):
    composed = VideoAdapter.compose([adapters[0], adapters[1]])
    assert composed.rank == adapters[0].rank + adapters[1].segments[0]
    qs = QUESTIONS[:2]
    assert model.answer([[adapters[0], adapters[1]]] * 2, qs, max_new_tokens=8) == \
        model.answer([composed] * 2, qs, max_new_tokens=8)


def test_internalize_long_composes_segments(model):
    from f2l.video import Video, load_video

    frames = _frames(10, 12)
    long = model.internalize_long(frames, segment_frames=4)
    full = load_video(frames, image_size=model.base.image_size, max_frames=64)
    parts = [Video(full.pixel_values[i:i + 4], full.timestamps[i:i + 4], full.duration) for i in (0, 4, 8)]
    want = VideoAdapter.compose([model.internalize([p])[0] for p in parts])
    assert long.segments == want.segments == [model.hypernet.config.rank] * 3
    assert long.num_frames == 10
    for m in want.lora_a:
        torch.testing.assert_close(long.lora_a[m], want.lora_a[m], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(long.lora_b[m], want.lora_b[m], rtol=1e-5, atol=1e-6)
    short = model.internalize_long(_frames(3, 13), segment_frames=4)
    assert short.segments == [model.hypernet.config.rank]
    with pytest.raises(ValueError, match="segment_frames"):
        model.internalize_long(frames, segment_frames=0)


def test_kernel_composition_equals_concatenation(model):
    """lm_forward with a per-row list of pool entries == the rank-concatenated adapter."""
    from f2l.hypernet import AdapterTensors

    g = torch.Generator().manual_seed(7)
    L, (di, do) = model.base.num_layers, model.base.module_shapes()["down_proj"]
    a = torch.randn(L, 2, 3, di, generator=g) * 0.2
    b = torch.randn(L, 2, do, 3, generator=g) * 0.2
    pool = AdapterTensors({"down_proj": a}, {"down_proj": b}, scale=2.0, rank=3)
    cat = AdapterTensors({"down_proj": a.reshape(L, 1, 6, di)},
                         {"down_proj": b.permute(0, 2, 1, 3).reshape(L, 1, do, 6)}, scale=2.0, rank=6)
    ids, mask, _ = model.question_ids([QUESTIONS[0]])
    torch.testing.assert_close(model.lm_forward(ids, mask, pool, [[0, 1]]), model.lm_forward(ids, mask, cat, [0]),
                               rtol=1e-5, atol=1e-5)


def test_lm_forward_gradients_reach_hypernet(model, videos):
    enc = model.encode(videos[:2])
    at = model.adapter_tensors(enc)
    ids, mask, labels = model.question_ids(QUESTIONS[:2], ["red circle", "left"])
    logits = model.lm_forward(ids, mask, at)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    loss.backward()
    grads = [p.grad for p in model.hypernet.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)
    assert all(p.grad is None for p in model.base.model.parameters())
    model.hypernet.zero_grad(set_to_none=True)


def test_adapters_record_the_frame_preprocessing(model, adapters):
    # The longest edge of the processor's first resize, capped at the tower (48 px for tiny).
    assert model.config.longest_edge == 384
    for ad in adapters:
        assert ad.metadata["longest_edge"] == min(384, model.base.image_size) == 48
        assert ad.metadata["image_size"] == model.base.image_size


def test_question_ids_layout(model):
    tok = model.base.tokenizer
    ids, mask, labels = model.question_ids(["Why?", "What colour is it?"], ["Because.", "Red."])
    for i, ans in enumerate(["Because.", "Red."]):
        kept = labels[i][labels[i] != -100].tolist()
        # Labels run through <end_of_utterance> and the newline the chat template puts after it.
        assert tok.decode(kept) == " " + ans + "<end_of_utterance>\n"
        assert tok.decode(ids[i][mask[i].bool()].tolist()).startswith("<|im_start|>User: ")
    assert mask[0, -1] == 0 or mask[1, -1] == 0  # right padding
    lids, lmask, _ = model.question_ids(["Why?", "What colour is it?"], padding_side="left")
    assert bool(lmask[:, -1].all())
    _, _, nolab = model.question_ids(["Why?"])
    assert bool((nolab == -100).all())


# ------------------------------------------------------------------ decoding details


def test_sampling_is_seeded_and_top_p_tiny_is_greedy(model, adapters):
    kw = dict(max_new_tokens=8, do_sample=True, temperature=1.5)
    a = model.answer(adapters[:2], QUESTIONS[:2], seed=11, **kw)
    assert a == model.answer(adapters[:2], QUESTIONS[:2], seed=11, **kw)
    many = {tuple(model.answer(adapters[:2], QUESTIONS[:2], seed=s, **kw)) for s in range(4)}
    assert len(many) > 1
    greedy = model.answer(adapters[:2], QUESTIONS[:2], max_new_tokens=8)
    assert model.answer(adapters[:2], QUESTIONS[:2], max_new_tokens=8, do_sample=True, top_p=1e-6, seed=3) == greedy


def test_generate_stops_each_sequence_on_its_own():
    """A scripted model: row i emits tokens 10, 11, ... and its stop token after i+1 steps."""
    S, V, STOP, PAD = 3, 32, 5, 0
    calls = []

    def step(ids, emb, mask, pos, cache):
        calls.append((None if ids is None else ids.clone(), mask.clone(), pos.clone()))
        t = len(calls) - 1
        logits = torch.full((S, V), -1.0)
        for i in range(S):
            logits[i, STOP if t == i + 1 else 10 + t] = 1.0
        return logits

    ids, mask = left_pad([torch.tensor([7, 8, 9]), torch.tensor([7]), torch.tensor([8, 9])], PAD)
    out = generate(step, input_ids=ids, attention_mask=mask, cfg=SamplingConfig(max_new_tokens=10),
                   stop_ids=[STOP], pad_id=PAD)
    assert out == [[10], [10, 11], [10, 11, 12]]
    assert len(calls) == 4  # prefill + until the last row stops
    # left padding: positions count real tokens only; finished rows are masked out afterwards
    assert calls[0][2].tolist() == [[0, 1, 2], [0, 0, 0], [0, 0, 1]]
    assert calls[1][2].tolist() == [[3], [1], [2]]
    assert calls[2][1][:, -1].tolist() == [0, 1, 1]
    assert calls[2][0][0, 0].item() == PAD


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.999, 1.0])
def test_top_p_filter_matches_reference(top_p):
    from f2l.generate import _top_p_filter

    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(5)) * 3
    got = _top_p_filter(logits, top_p)
    for row, out in zip(logits, got):
        probs = row.softmax(-1)
        order = probs.argsort(descending=True).tolist()
        keep, mass = [], 0.0
        for i in order:  # the smallest prefix of the sorted tokens reaching top_p
            keep.append(i)
            mass += float(probs[i])
            if mass >= top_p:
                break
        kept = torch.isfinite(out).nonzero().flatten().tolist()
        assert sorted(kept) == sorted(keep)
        torch.testing.assert_close(out[kept], row[kept])


def test_generate_argument_errors():
    step = lambda *a: torch.zeros(1, 4)  # noqa: E731
    mask = torch.ones(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="exactly one"):
        generate(step, attention_mask=mask, cfg=SamplingConfig(), stop_ids=[0], pad_id=0)
    with pytest.raises(ValueError, match="exactly one"):
        generate(step, attention_mask=mask, input_ids=torch.zeros(1, 2, dtype=torch.long),
                 inputs_embeds=torch.zeros(1, 2, 3), cfg=SamplingConfig(), stop_ids=[0], pad_id=0)
    with pytest.raises(ValueError, match="stop_strings"):
        generate(step, attention_mask=mask, input_ids=torch.zeros(1, 2, dtype=torch.long), cfg=SamplingConfig(),
                 stop_ids=[0], pad_id=0, stop_strings=["x"])
    with pytest.raises(ValueError, match="empty"):
        left_pad([torch.tensor([1]), torch.tensor([], dtype=torch.long)], 0)


def test_stop_strings(model, adapters):
    full = model.answer([adapters[0]], [QUESTIONS[0]], max_new_tokens=10)[0]
    words = full.split()
    if len(words) < 2:
        pytest.skip("the tiny model's answer is a single word")
    cut = model.answer([adapters[0]], [QUESTIONS[0]], max_new_tokens=10, stop_strings=[words[1]])[0]
    assert words[1] not in cut and full.startswith(cut.strip())


def test_answer_in_context_matches_hf_generate(model, videos):
    from f2l.encode import prompt_ids
    from f2l.video import load_video

    got = model.answer_in_context(videos[:2], QUESTIONS[:2], max_new_tokens=6)
    base = model.base
    for v, q, g in zip(videos[:2], QUESTIONS[:2], got):
        vid = load_video(v, image_size=base.image_size, max_frames=model.config.max_frames)
        ids = prompt_ids(base, vid, q)[None]
        with torch.no_grad():
            ref = base.model.generate(input_ids=ids, pixel_values=vid.pixel_values[None], max_new_tokens=6,
                                      do_sample=False, eos_token_id=base.stop_token_ids(),
                                      pad_token_id=base.tokenizer.pad_token_id)
        assert g == base.tokenizer.decode(ref[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_answer_in_context_shares_a_repeated_video(model, videos, tmp_path):
    """Questions about one video (the same frames object, or the same path twice) run its
    vision tower once; the answers equal asking each row on its own."""
    path = str(write_mp4(tmp_path / "v.mp4"))
    rows = [videos[1], videos[0], videos[1], path, videos[2], path, videos[1]]
    qs = [QUESTIONS[i % len(QUESTIONS)] for i in range(len(rows))]
    calls = []
    tower = model.base.vision_model.forward

    def counting(*a, **kw):
        calls.append(kw["pixel_values"].shape[0])
        return tower(*a, **kw)

    model.base.vision_model.forward = counting
    try:
        got = model.answer_in_context(rows, qs, max_new_tokens=6)
    finally:
        del model.base.vision_model.forward
    n_path = model._load([path])[0].num_frames
    assert sum(calls) == 6 + 3 + 2 + n_path  # every distinct video's frames once
    assert got == [model.answer_in_context([v], [q], max_new_tokens=6)[0] for v, q in zip(rows, qs)]


# ------------------------------------------------------------------ persistence


def test_save_load_round_trip(model, videos, adapters, tmp_path):
    model.save_hypernet(tmp_path / "hn")
    back = Frames2LoRA.from_pretrained("tiny", tmp_path / "hn")
    assert back.config.max_frames == model.config.max_frames
    assert back.config.hypernet.to_dict() == model.config.hypernet.to_dict()
    again = back.internalize(videos)
    for x, y in zip(again, adapters):
        for m in x.lora_a:
            assert torch.equal(x.lora_a[m], y.lora_a[m]) and torch.equal(x.lora_b[m], y.lora_b[m])
    adapters[1].save(tmp_path / "a1.safetensors")
    loaded = VideoAdapter.load(tmp_path / "a1.safetensors", base_fingerprint=model.base.fingerprint)
    assert model.answer([loaded], [QUESTIONS[0]], max_new_tokens=8) == \
        model.answer([adapters[1]], [QUESTIONS[0]], max_new_tokens=8)


def test_from_pretrained_local_checkpoint_dir(model, adapters, tmp_path):
    from f2l.presets import load_base, save_base

    save_base(load_base("tiny"), tmp_path / "base")
    m = Frames2LoRA.from_pretrained(str(tmp_path / "base"), preset="tiny")
    assert m.base.tokens_per_frame == 9 and m.config.base == str(tmp_path / "base")
    assert m.base.fingerprint == model.base.fingerprint
    assert len(m.answer([adapters[0]], ["hi"], max_new_tokens=3)) == 1
    # another base: loading a hypernet trained elsewhere warns, old adapters are refused
    other = load_base("tiny")
    with torch.no_grad():
        other.text_model.layers[1].mlp.down_proj.weight.mul_(1.5)
    save_base(other, tmp_path / "other")
    model.save_hypernet(tmp_path / "hn")
    with pytest.warns(UserWarning, match="fingerprint"):
        m2 = Frames2LoRA.from_pretrained(str(tmp_path / "other"), tmp_path / "hn")
    with pytest.raises(ValueError, match="base model"):
        m2.answer([adapters[0]], ["hi"], max_new_tokens=2)


# ------------------------------------------------------------------ triton path


def test_triton_path_equals_reference(model, videos, monkeypatch):
    pytest.importorskip("triton")
    from f2l_kernels._backend import interpret_mode

    if not interpret_mode() and not torch.cuda.is_available():
        pytest.skip("needs TRITON_INTERPRET=1 or a GPU")
    enc = model.encode(videos[:2])
    ids, mask, _ = model.question_ids(QUESTIONS[:2])
    monkeypatch.setenv("F2L_BACKEND", "reference")
    ref_at = model.adapter_tensors(enc)
    ref = model.lm_forward(ids, mask, ref_at)
    monkeypatch.setenv("F2L_BACKEND", "triton")
    tri_at = model.adapter_tensors(enc)
    for m in ref_at.lora_a:
        torch.testing.assert_close(tri_at.lora_a[m], ref_at.lora_a[m], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(tri_at.lora_b[m], ref_at.lora_b[m], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.lm_forward(ids, mask, ref_at), ref, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ bad inputs


def _other_base_adapter(a):
    return a._replace(base_fingerprint="0123456789abcdef")


BAD_ANSWER = [
    pytest.param(lambda m, a: m.answer(a[:2], QUESTIONS[:3]), ValueError, "one per prompt", id="count-mismatch"),
    pytest.param(lambda m, a: m.answer(a[0], QUESTIONS[:1]), ValueError, "one per prompt", id="adapter-not-list"),
    pytest.param(lambda m, a: m.answer([a[0]], "What?"), TypeError, "list of str", id="prompt-str"),
    pytest.param(lambda m, a: m.answer([], []), ValueError, "empty", id="empty"),
    pytest.param(lambda m, a: m.answer(["x"], ["q"]), TypeError, "VideoAdapter", id="adapter-str"),
    pytest.param(lambda m, a: m.answer([[]], ["q"]), TypeError, "composition", id="empty-composition"),
    pytest.param(lambda m, a: m.answer([_other_base_adapter(a[0])], ["q"]), ValueError, "base model",
                 id="other-base"),
    pytest.param(lambda m, a: m.answer([a[0]], ["q"], max_new_tokens=0), ValueError, "max_new_tokens",
                 id="zero-tokens"),
    pytest.param(lambda m, a: m.answer([a[0]], ["q"], do_sample=True, temperature=0), ValueError, "temperature",
                 id="zero-temperature"),
    pytest.param(lambda m, a: m.answer([a[0]], ["q"], do_sample=True, top_p=0), ValueError, "top_p", id="top-p-0"),
    pytest.param(lambda m, a: m.answer([a[0]], ["q"], stop_strings="x"), TypeError, "stop_strings",
                 id="stop-strings-str"),
    pytest.param(lambda m, a: m.answer_in_context([_frames(2, 0)], ["a", "b"]), ValueError, "one per video",
                 id="in-context-count"),
    pytest.param(lambda m, a: m.internalize("clip.mp4"), TypeError, "list of videos", id="internalize-str"),
    pytest.param(lambda m, a: m.internalize([]), ValueError, "empty", id="internalize-empty"),
    pytest.param(lambda m, a: m.internalize(["/nonexistent/clip.mp4"]), FileNotFoundError, "does not exist",
                 id="internalize-missing-file"),
    pytest.param(lambda m, a: m.internalize([_frames(2, 0)], batch_size=0), ValueError, "batch_size",
                 id="batch-size-0"),
    pytest.param(lambda m, a: m.encode([_frames(2, 0)], instruction=3), TypeError, "instruction",
                 id="instruction-int"),
    pytest.param(lambda m, a: m.adapter_tensors("x"), TypeError, "EncodedVideos", id="adapter-tensors-str"),
    pytest.param(lambda m, a: m.lm_forward(torch.zeros(3, dtype=torch.long)), ValueError, "input_ids",
                 id="lm-forward-1d"),
    pytest.param(lambda m, a: m.lm_forward(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 4)), ValueError,
                 "attention_mask", id="lm-forward-mask-shape"),
    pytest.param(lambda m, a: m.question_ids(["a"], ["x", "y"]), ValueError, "one per prompt",
                 id="answers-count"),
    pytest.param(lambda m, a: m.question_ids(["a"], padding_side="middle"), ValueError, "padding_side",
                 id="padding-side"),
]


@pytest.mark.parametrize("call,exc,match", BAD_ANSWER)
def test_bad_inputs(model, adapters, call, exc, match):
    with pytest.raises(exc, match=match):
        call(model, adapters)


def test_from_pretrained_bad_inputs(tmp_path, model):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Frames2LoRA.from_pretrained("tiny", tmp_path / "missing")
    other = tmp_path / "weights.txt"
    other.write_text("x")
    with pytest.raises(ValueError, match="neither a saved"):
        Frames2LoRA.from_pretrained("tiny", other)
    with pytest.raises(TypeError, match="hypernet"):
        Frames2LoRA.from_pretrained("tiny", 3)
    with pytest.raises(ValueError, match="preset"):
        Frames2LoRA.from_pretrained("tiny", preset="huge")
    model.save_hypernet(tmp_path / "hn")
    with pytest.raises(ValueError, match="preset"):
        Frames2LoRA.from_pretrained("tiny", tmp_path / "hn", preset="tiny")
    # a hypernet built for another architecture
    from f2l.hypernet import Frames2LoRAHypernet, HypernetConfig

    wrong = Frames2LoRAHypernet(HypernetConfig.tiny(num_layers=3, hidden_size=64, target_modules={"down_proj": (160, 64)}))
    with pytest.raises(ValueError, match="layers"):
        Frames2LoRA.from_pretrained("tiny", wrong)
    fake_pt = tmp_path / "official.pt"
    torch.save({"x": torch.zeros(1)}, fake_pt)
    with pytest.raises((RuntimeError, ValueError, KeyError)):
        Frames2LoRA.from_pretrained("tiny", fake_pt, preset="tiny")


def test_numpy_and_pil_videos_accepted(model):
    from PIL import Image

    f = _frames(2, 9)
    a = model.internalize([f.numpy(), [Image.fromarray(x) for x in f.numpy()]])
    for m in a[0].lora_a:
        torch.testing.assert_close(a[0].lora_a[m], a[1].lora_a[m])
    assert np.isfinite(a[0].lora_a["down_proj"].numpy()).all()
