"""f2l.prompt + f2l.encode: the SmolVLM2 video prompt layout and the stacked layer states,
checked against the Hugging Face model's own multimodal forward."""
import pytest
import torch

from f2l.encode import EncodedVideos, _groups, encode_videos, image_features, prompt_ids
from f2l.presets import load_base
from f2l.prompt import (
    answer_text,
    format_duration,
    format_timestamp,
    number_words,
    question_prompt,
    video_block,
    video_prompt,
)
from f2l.tokenizer import EOS_TOKEN, FAKE_IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN, IMAGE_TOKEN
from f2l.video import load_video


@pytest.fixture(scope="module")
def tiny():
    return load_base("tiny")


def _frames(n, seed, side=40):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, side, side, 3), dtype=torch.uint8, generator=g)


# ------------------------------------------------------------------ prompt


def test_video_block_matches_smolvlm2_processor_text():
    from transformers.models.smolvlm import processing_smolvlm as P

    ts, dur, tpf = [0.0, 1.5, 61.2, 3599.9], 3600.4, 7
    img = P._prompt_single_image(tpf, fake_token_around_image=FAKE_IMAGE_TOKEN, image_token=IMAGE_TOKEN,
                                 global_image_token=GLOBAL_IMAGE_TOKEN)
    want = P.DEFAULT_VIDEO_INTRO.format(frame_count="four", video_duration="1:00:00")
    for t in ts:
        want += P.FRAME_TIMESTAMP_MESSAGE.format(timestamp=f"{int(t // 60):02d}:{int(t % 60):02d}") + img
    want += P.DEFAULT_MEDIA_OUTTRO
    assert video_block(ts, dur, tpf) == want


@pytest.mark.parametrize("n,words", [(1, "one"), (12, "twelve"), (21, "twenty-one"), (64, "sixty-four"),
                                     (100, "one hundred")])
def test_number_words(n, words):
    assert number_words(n) == words


@pytest.mark.parametrize("sec,ts,dur", [(0.0, "00:00", "0:00:00"), (59.9, "00:59", "0:00:59"),
                                        (61.0, "01:01", "0:01:01"), (3725.0, "62:05", "1:02:05")])
def test_time_formats(sec, ts, dur):
    assert format_timestamp(sec) == ts and format_duration(sec) == dur


@pytest.mark.parametrize("num_frames", [1, 3, 8])
def test_prompt_layout_token_counts(tiny, num_frames):
    tok = tiny.tokenizer
    v = load_video(_frames(num_frames, 0), image_size=tiny.image_size, max_frames=num_frames)
    ids = prompt_ids(tiny, v, "Internalize this video for later captioning.").tolist()
    fake, glob, img = (tok.convert_tokens_to_ids(t) for t in (FAKE_IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN, IMAGE_TOKEN))
    assert ids.count(img) == num_frames * tiny.tokens_per_frame
    assert ids.count(glob) == num_frames and ids.count(fake) == 2 * num_frames
    # each frame: <fake><global> <image>×T <fake>, contiguous
    starts = [i for i, t in enumerate(ids) if t == glob]
    for s in starts:
        assert ids[s - 1] == fake
        assert ids[s + 1:s + 1 + tiny.tokens_per_frame] == [img] * tiny.tokens_per_frame
        assert ids[s + 1 + tiny.tokens_per_frame] == fake
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>User: You are provided the following series of ")
    assert text.endswith("\n\nInternalize this video for later captioning.<end_of_utterance>\nAssistant:")
    assert text.count("\nFrame from 00:0") == num_frames
    # The encoding prompt (what the hypernetwork reads) closes the turn and stops: no "Assistant:".
    enc = prompt_ids(tiny, v, "Internalize this video for later captioning.", add_generation_prompt=False).tolist()
    assert tok.decode(enc).endswith("captioning.<end_of_utterance>\n")
    assert ids[:len(enc)] == enc and len(ids) > len(enc)


def test_question_and_answer_format():
    assert question_prompt("Why?") == "<|im_start|>User: Why?<end_of_utterance>\nAssistant:"
    # The assistant turn as the chat template renders it: verbatim text, then "<end_of_utterance>\n".
    assert answer_text("Red. ") == " Red. " + EOS_TOKEN + "\n"
    assert video_prompt([0.0], 1.0, 2, "x", add_generation_prompt=False).endswith("x" + EOS_TOKEN + "\n")
    assert video_prompt([0.0], 1.0, 2, "x").endswith("x" + EOS_TOKEN + "\nAssistant:")


@pytest.mark.parametrize("call,exc", [
    pytest.param(lambda: video_block([], 1.0, 4), ValueError, id="no-frames"),
    pytest.param(lambda: video_block([0.0], 1.0, 0), ValueError, id="zero-tokens"),
    pytest.param(lambda: question_prompt(None), TypeError, id="question-none"),
    pytest.param(lambda: number_words(-1), ValueError, id="negative-count"),
])
def test_prompt_bad_inputs(call, exc):
    with pytest.raises(exc):
        call()


# ------------------------------------------------------------------ encoding


def _hf_reference_states(base, video, text):
    """Decoder-layer inputs of the Hugging Face multimodal forward (pixel_values path)."""
    ids = prompt_ids(base, video, text, add_generation_prompt=False)[None]
    captured = []
    hooks = [layer.register_forward_pre_hook(
        lambda mod, args, kwargs: captured.append((args[0] if args else kwargs["hidden_states"]).clone()),
        with_kwargs=True) for layer in base.text_model.layers]
    try:
        with torch.no_grad():
            out = base.model.model(input_ids=ids, pixel_values=video.pixel_values[None], output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    ref = torch.stack(out.hidden_states[:-1])[:, 0]
    torch.testing.assert_close(torch.stack(captured)[:, 0], ref, rtol=0, atol=0)
    return ref


def test_states_match_hf_forward(tiny):
    v = load_video(_frames(3, 1), image_size=tiny.image_size, max_frames=3)
    enc = encode_videos(tiny, [v], "Internalize this video for later captioning.")
    ref = _hf_reference_states(tiny, v, "Internalize this video for later captioning.")
    assert isinstance(enc, EncodedVideos)
    assert enc.states.shape == (tiny.num_layers, ref.shape[1], tiny.hidden_size)
    assert enc.cu_seqlens.dtype == torch.int32 and enc.cu_seqlens.tolist() == [0, ref.shape[1]]
    assert enc.num_frames == [3] and enc.visual_tokens == [3 * tiny.tokens_per_frame]
    torch.testing.assert_close(enc.states, ref, rtol=1e-5, atol=1e-5)


def test_batched_packed_equals_one_by_one(tiny):
    vids = [_frames(n, s) for n, s in ((2, 2), (7, 3), (1, 4), (5, 5))]
    enc = encode_videos(tiny, vids, max_frames=8)
    assert enc.num_frames == [2, 7, 1, 5]
    lens = enc.seq_lens
    assert sum(lens) == enc.states.shape[1] and len(set(lens)) == 4  # packed, no padding rows
    for b, v in enumerate(vids):
        one = encode_videos(tiny, [v], max_frames=8)
        torch.testing.assert_close(enc.video(b), one.video(0), rtol=1e-5, atol=1e-5)
    # chunking (per video, by token budget, vision frames one at a time) changes nothing
    for kw in (dict(chunk_videos=1), dict(max_batch_tokens=200), dict(chunk_frames=1)):
        other = encode_videos(tiny, vids, max_frames=8, **kw)
        assert torch.equal(other.cu_seqlens, enc.cu_seqlens)
        torch.testing.assert_close(other.states, enc.states, rtol=1e-5, atol=1e-5)


def test_per_video_instructions(tiny):
    vids = [_frames(2, 6), _frames(2, 7)]
    enc = encode_videos(tiny, vids, ["Describe.", "Internalize this video for later captioning."])
    assert enc.seq_lens[0] < enc.seq_lens[1]


def test_image_features_chunked(tiny):
    v = load_video(_frames(5, 8), image_size=tiny.image_size)
    a = image_features(tiny, v.pixel_values, chunk_frames=2)
    b = image_features(tiny, v.pixel_values, chunk_frames=64)
    assert a.shape == (5 * tiny.tokens_per_frame, tiny.hidden_size)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_encoded_cat_and_to(tiny):
    a = encode_videos(tiny, [_frames(2, 9)])
    b = encode_videos(tiny, [_frames(3, 10), _frames(1, 11)])
    c = EncodedVideos.cat([a, b])
    assert c.num_videos == 3 and c.seq_lens == a.seq_lens + b.seq_lens
    assert torch.equal(c.video(2), b.video(1))
    assert c.to(dtype=torch.float64).states.dtype == torch.float64
    with pytest.raises(IndexError):
        c.video(3)


@pytest.mark.parametrize("lengths,chunk,budget,want", [
    pytest.param([5, 5, 5], None, 100, [[0, 1, 2]], id="fits"),
    pytest.param([5, 5, 5], 2, 100, [[0, 1], [2]], id="chunk-videos"),
    pytest.param([5, 30, 5], None, 40, [[0], [1], [2]], id="budget"),
    pytest.param([50], None, 10, [[0]], id="one-longer-than-budget"),
])
def test_groups(lengths, chunk, budget, want):
    assert _groups(lengths, chunk, budget) == want


@pytest.mark.parametrize("kwargs,exc,match", [
    pytest.param(dict(videos=[]), ValueError, "empty", id="no-videos"),
    pytest.param(dict(videos="clip.mp4"), TypeError, "list of videos", id="str-not-list"),
    pytest.param(dict(instruction=["a", "b"]), ValueError, "one per video", id="instruction-count"),
    pytest.param(dict(chunk_videos=0), ValueError, "chunk_videos", id="chunk-videos-0"),
    pytest.param(dict(chunk_frames=0), ValueError, "chunk_frames", id="chunk-frames-0"),
    pytest.param(dict(max_batch_tokens=0), ValueError, "max_batch_tokens", id="budget-0"),
])
def test_encode_bad_inputs(tiny, kwargs, exc, match):
    args = dict(videos=[_frames(2, 0)])
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        encode_videos(tiny, **args)


def test_encode_wrong_frame_size(tiny):
    v = load_video(_frames(2, 0), image_size=32)
    with pytest.raises(ValueError, match="expected frames of 48x48"):
        encode_videos(tiny, [v])
