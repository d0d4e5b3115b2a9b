"""f2l against golden outputs of the authors' stack (transformers 4.51.3's SmolVLM processor,
its chat template, their label cut and feature extraction), written by ``tools/goldens.py``.

Exact where the arithmetic allows it: token ids and labels bit for bit, pixel values bit for
bit (SHA-256 of the whole float32 array) when Pillow is the version the goldens were made
with -- otherwise within one uint8 step on the stored grid -- and stacked layer states within
1e-5 relative in fp32.
"""
import importlib.util
import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
GOLDENS = ROOT / "tests" / "goldens"

_spec = importlib.util.spec_from_file_location("_goldens_tool", ROOT / "tools" / "goldens.py")
gt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gt)

from f2l.encode import encode_videos, prompt_ids  # noqa: E402
from f2l.model import Frames2LoRA  # noqa: E402
from f2l.prompt import CHAT_TEMPLATE, IMAGE_TOKEN, video_prompt  # noqa: E402
from f2l.tokenizer import build_tokenizer  # noqa: E402
from f2l.video import load_video, preprocess_frames, resize_output_size  # noqa: E402

ONE_STEP = 2 / 255  # one uint8 step after (x/255 - 0.5) / 0.5


def _read(name):
    with safe_open(str(GOLDENS / f"{name}.safetensors"), framework="np") as f:
        meta = json.loads(f.metadata()["golden"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return meta, tensors


PIXELS, PIXEL_T = _read("pixels")
VIDEOS, VIDEO_T = _read("videos")
LABELS, LABEL_T = _read("labels")
STATES, STATE_T = _read("states")


def _same_pillow(meta) -> bool:
    import PIL

    return PIL.__version__ == meta["provenance"]["pillow"]


def _check_pixels(pv: np.ndarray, grid: np.ndarray, sha: str, meta, what: str):
    diff = float(np.abs(gt.grid(pv) - grid).max())
    assert diff <= ONE_STEP + 1e-6, f"{what}: pixel values differ from the processor's by {diff} on the grid"
    if _same_pillow(meta):
        assert gt.sha256(pv) == sha, f"{what}: pixel values are not bit-identical to the processor's (grid diff {diff})"


def test_goldens_were_made_with_the_authors_pin():
    for meta in (PIXELS, VIDEOS, LABELS, STATES):
        assert meta["provenance"]["transformers"] == gt.TRANSFORMERS_VERSION
    assert STATES["case"]["weights_sha256"]


def test_generator_rebuilds_the_same_inputs():
    # The synthetic frames are integer arithmetic on PCG64: any drift would void every other check.
    for key, c in PIXELS["cases"].items():
        assert gt.sha256(gt.synthetic_frame(c["height"], c["width"], c["seed"])) == c["input_sha256"], key


@pytest.mark.parametrize("key", sorted(PIXELS["cases"]))
def test_frame_pixels_match_the_processor(key):
    c = PIXELS["cases"][key]
    frame = gt.synthetic_frame(c["height"], c["width"], c["seed"])
    assert list(resize_output_size(c["height"], c["width"], c["longest_edge"])) == c["intermediate"]
    u8 = torch.from_numpy(frame).permute(2, 0, 1)[None]
    pv = preprocess_frames(u8, image_size=c["tower"], longest_edge=c["longest_edge"])[0].numpy()
    assert pv.dtype == np.float32 and pv.shape == (3, c["tower"], c["tower"])
    _check_pixels(pv, PIXEL_T[f"{key}.grid"], c["sha256"], PIXELS, key)


def _ns_base(tokenizer, tokens_per_frame):
    return types.SimpleNamespace(tokenizer=tokenizer, tokens_per_frame=tokens_per_frame,
                                 image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))


@pytest.mark.parametrize("key", sorted(VIDEOS["cases"]))
def test_video_sampling_prompt_ids_and_pixels_match(key):
    c = VIDEOS["cases"][key]
    frames = gt.synthetic_video(c["frames"], c["height"], c["width"], c["seed"])
    assert gt.sha256(frames) == c["input_sha256"]
    v = load_video(torch.from_numpy(frames), image_size=c["tower"], max_frames=c["max_frames"], fps=c["target_fps"],
                   video_fps=c["fps"], longest_edge=gt.LONGEST_EDGE)
    assert v.indices == c["indices"] and v.num_frames == c["num_frames"]
    # The exact string the processor tokenized (template rendered, video block replaced, images expanded).
    got_text = video_prompt(v.timestamps, v.duration, c["tokens_per_frame"], c["text"], add_generation_prompt=False)
    assert got_text == c["prompt"]
    tok = build_tokenizer()
    ids = prompt_ids(_ns_base(tok, c["tokens_per_frame"]), v, c["text"], add_generation_prompt=False)
    assert ids.tolist() == VIDEO_T[f"{key}.input_ids"].tolist()
    pv = v.pixel_values.numpy()
    if _same_pillow(VIDEOS):
        assert [gt.sha256(p) for p in pv] == c["pixel_sha256"]
    _check_pixels(pv[0], VIDEO_T[f"{key}.grid0"], c["pixel_sha256"][0], VIDEOS, key)


def test_training_labels_match_build_labels():
    cases = [LABELS["cases"][f"case{i}"] for i in range(len(LABELS["cases"]))]
    owner = types.SimpleNamespace(base=types.SimpleNamespace(tokenizer=build_tokenizer()), device=torch.device("cpu"))
    ids, mask, labels = Frames2LoRA.question_ids(owner, [c["prompt"] for c in cases], [c["target"] for c in cases])
    for i, c in enumerate(cases):
        n = int(mask[i].sum())
        assert ids[i, :n].tolist() == LABEL_T[f"case{i}.input_ids"].tolist(), c
        assert labels[i, :n].tolist() == LABEL_T[f"case{i}.labels"].tolist(), c
        assert (labels[i, n:] == -100).all()
        # The target runs through <end_of_utterance> and the newline after it.
        assert owner.base.tokenizer.decode(labels[i, :n][labels[i, :n] != -100].tolist()).endswith(
            "<end_of_utterance>\n")


def test_chat_template_renders_the_f2l_strings():
    # The same template, rendered by this environment's transformers, gives f2l's strings.
    from f2l.prompt import answer_text, question_prompt

    tok = build_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    user = [{"role": "user", "content": [{"type": "text", "text": "Why?"}]}]
    full = user + [{"role": "assistant", "content": [{"type": "text", "text": "Because."}]}]
    assert tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True) == question_prompt("Why?")
    assert tok.apply_chat_template(full, tokenize=False) == question_prompt("Why?") + answer_text("Because.")


def test_stacked_states_match_the_authors_extraction():
    from f2l.presets import load_base

    c = STATES["case"]
    base = load_base("tiny")
    assert (base.image_size, base.tokens_per_frame) == (c["tower"], c["tokens_per_frame"])
    sd = base.model.state_dict()
    weights = gt.deterministic_weights({k: tuple(v.shape) for k, v in sd.items()})
    base.model.load_state_dict({k: torch.from_numpy(w) for k, w in weights.items()}, strict=True)
    frames = gt.synthetic_video(c["frames"], c["height"], c["width"], c["seed"])
    v = load_video(torch.from_numpy(frames), image_size=base.image_size, max_frames=c["max_frames"], fps=1.0,
                   video_fps=c["fps"], longest_edge=c["longest_edge"], mean=base.image_mean, std=base.image_std)
    assert v.num_frames == c["num_frames"]
    assert prompt_ids(base, v, c["text"], add_generation_prompt=False).tolist() == STATE_T["input_ids"].tolist()
    enc = encode_videos(base, [v], c["text"])
    got = enc.video(0).float()
    want = torch.from_numpy(STATE_T["states"])
    assert got.shape == want.shape
    rel = float((got - want).norm() / want.norm())
    worst = float(((got - want).norm(dim=-1) / want.norm(dim=-1)).max())
    assert rel <= 1e-5 and worst <= 1e-5, f"stacked states: relative error {rel:.2e} (worst position {worst:.2e})"
