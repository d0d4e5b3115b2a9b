"""Pretrain the ``tiny-seeing`` base: a SmolVLM2-architecture model that answers questions
about synthetic videos *with the video in context* -- the role SmolVLM2 plays for the
paper, in miniature.

    python -m f2l.data.pretrain_tiny                   # writes f2l/assets/tiny_seeing/
    python -m f2l.data.pretrain_tiny --out DIR --steps 3000 --seed 0

What is trained: the whole model (vision tower, connector, text model and head) from a
seeded random initialisation, by teacher-forced cross-entropy on the single-word answer
of one question per video, the video's frames in the prompt exactly as
:meth:`f2l.Frames2LoRA.answer_in_context` builds it (SmolVLM2 video prompt, the question,
``<end_of_utterance>\\nAssistant:``). Videos are fresh renders of
:mod:`f2l.data.synthetic` every step (a seeded stream; the held-out evaluation uses a
disjoint seed stream). Question kinds: ``colour``, ``shape``, ``direction``, ``count`` of
one-segment videos, and for videos of 2-3 segments ``colour_of`` ("What colour is the
circle?"), ``first_shape`` (which segment came first) and ``has_colour``. Frame counts
vary per step (1 to 4 frames a segment in the first half, 4 to 16 in the second), so the base
reads longer videos in context too.

The architecture is the ``tiny`` preset's (48 px frames, 8 px patches, pixel shuffle 2:
9 visual tokens a frame; 4 decoder layers) with the
``tiny`` widths (text 64, vision 48). The result is a normal checkpoint directory (``config.json``, ``model.safetensors``,
tokenizer files, ``preprocessor_config.json``) that :func:`f2l.presets.load_base` reads,
plus ``pretrain_report.json`` with the held-out in-context accuracy per kind.
Everything is seeded: the same command gives the same weights on the same software stack.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from f2l.data import synthetic as syn
from f2l.generate import pad_labelled
from f2l.presets import TINY_TEXT, TINY_VISION

__all__ = ["ASSET_DIR", "SEEING_TEXT", "SEEING_VISION", "SINGLE", "MULTI", "FRAME_CHOICES", "build_untrained",
           "sample_items", "closed_set_accuracy", "pretrain", "load_seeing_base", "main"]

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny_seeing"

# the tiny preset's architecture; the text model's MLP a little wider and a longer context
SEEING_TEXT = dict(
    TINY_TEXT,
    intermediate_size=192,
    max_position_embeddings=8192,
    # 0.02 (the HF default) leaves attention from the answer to the image tokens so weak that
    # a from-scratch model sits at chance for many hundred steps; ~1/sqrt(width) learns at once.
    initializer_range=0.1,
)
SEEING_VISION = dict(TINY_VISION)
SCALE_FACTOR = 2
SINGLE = ("colour", "shape", "direction", "count")
MULTI = ("colour_of", "first_shape", "has_colour")
# (frames per segment, probability) of a training step, per phase. The first half sees short
# videos: with few positions to attend to, the answer finds the image tokens sooner; the
# second half moves to the demo's 4 frames a segment and longer videos (rarer: they cost more).
FRAME_CHOICES = (((1, 0.35), (2, 0.35), (4, 0.3)), ((4, 0.8), (8, 0.15), (16, 0.05)))


def build_untrained(seed: int = 0):
    """A :class:`f2l.presets.BaseVLM` with the ``tiny-seeing`` architecture, random weights."""
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

    from f2l.presets import BaseVLM, tokens_per_frame
    from f2l.tokenizer import IMAGE_TOKEN, build_tokenizer

    tok = build_tokenizer()
    text = dict(SEEING_TEXT, vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id)
    cfg = SmolVLMConfig(text_config=text, vision_config=dict(SEEING_VISION), scale_factor=SCALE_FACTOR,
                        image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN), tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SmolVLMForConditionalGeneration(cfg)
    return BaseVLM(model=model, tokenizer=tok, name="tiny-seeing", image_size=SEEING_VISION["image_size"],
                   tokens_per_frame=tokens_per_frame(cfg), max_frames=64, fps=1.0)


def sample_items(rng: np.random.Generator, n: int, frames: int, *, multi_prob: float = 0.4,
                 size: int = 48) -> list[tuple[torch.Tensor, syn.QA]]:
    """``n`` (frames uint8 [F, S, S, 3], question) pairs of fresh renders.

    With probability ``multi_prob`` the batch is of videos of 2-3 segments, asked one of
    :data:`MULTI` each, else of one-segment videos asked one of :data:`SINGLE` (not
    ``direction`` when ``frames == 1``); kinds are equally likely within their group.
    """
    out = []
    # One kind of video per batch: padding one-segment videos to the length of a
    # three-segment one would more than double a batch's cost.
    multi = bool(rng.random() < multi_prob)
    single = SINGLE if frames > 1 else tuple(k for k in SINGLE if k != "direction")  # one frame: no motion
    for _ in range(n):
        k = int(rng.integers(2, len(syn.SHAPES) + 1)) if multi else 1
        specs: list[syn.SegmentSpec] = []
        for _ in range(k):
            specs.append(syn.sample_segment(rng, exclude_shapes=[s.shape for s in specs]))
        parts = [syn.render_segment(s, frames, size, rng=rng, radius=syn.seeing_radius(s.count)) for s in specs]
        vid = syn.SyntheticVideo(id="", frames=torch.from_numpy(np.concatenate(parts)), segments=specs,
                                 frames_per_segment=frames, seed=0)
        kinds = MULTI if multi else single
        kind = kinds[int(rng.integers(len(kinds)))]
        qs = vid.questions([kind])
        out.append((vid.frames, qs[int(rng.integers(len(qs)))]))
    return out


def _batch_inputs(base, items, *, with_answers: bool):
    """Padded ``inputs_embeds`` (differentiable w.r.t. the vision side), mask, labels."""
    from f2l.encode import prompt_ids
    from f2l.prompt import answer_text
    from f2l.video import load_video

    tok = base.tokenizer
    vids = [load_video(f, image_size=base.image_size, max_frames=f.shape[0], mean=base.image_mean,
                       std=base.image_std) for f, _ in items]
    rows, labs = [], []
    cache = base.extra.setdefault("prompt_ids", {})
    for v, (_, qa) in zip(vids, items):
        # In-memory frames get timestamps i / fps: the prompt depends on the count and question only.
        key = (v.num_frames, v.duration, qa.question)
        if key not in cache:
            cache[key] = prompt_ids(base, v, qa.question).tolist()
        q = cache[key]
        if with_answers:
            akey = ("answer", qa.answer)
            if akey not in cache:
                cache[akey] = tok(answer_text(qa.answer), add_special_tokens=False)["input_ids"]
            a = cache[akey]
        else:
            a = []
        rows.append(q + a)
        labs.append([-100] * len(q) + a)
    px = torch.cat([v.pixel_values for v in vids]).to(base.device)
    grid = base.image_size // int(base.model.config.vision_config.patch_size)
    pmask = torch.ones(px.shape[0], grid, grid, dtype=torch.bool, device=px.device)
    hs = base.vision_model(pixel_values=px, patch_attention_mask=pmask).last_hidden_state
    feats = base.connector(hs).reshape(-1, base.hidden_size)
    ids, mask, labels = pad_labelled(rows, labs, tok.pad_token_id)
    B, T = ids.shape
    ids, mask, labels = ids.to(base.device), mask.to(base.device), labels.to(base.device)
    x = base.text_model.embed_tokens(ids)
    img = (ids == base.image_token_id).reshape(-1)
    x = x.reshape(-1, x.shape[-1]).clone()
    x[img] = feats.to(x.dtype)
    return x.reshape(B, T, -1), mask, labels


def _hidden(base, items, *, with_answers: bool):
    """Final hidden states ``[B, T, H]`` (the head is applied only where it is needed)."""
    from f2l.generate import position_ids_from_mask

    x, mask, labels = _batch_inputs(base, items, with_answers=with_answers)
    out = base.text_model(inputs_embeds=x, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                          use_cache=False)
    return out.last_hidden_state, mask, labels


def answer_loss(base, items) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens (the head runs on those positions only)."""
    h, _, labels = _hidden(base, items, with_answers=True)
    tgt = labels[:, 1:]
    sel = tgt != -100
    logits = base.lm_head(h[:, :-1][sel]).float()
    return torch.nn.functional.cross_entropy(logits, tgt[sel])


@torch.no_grad()
def closed_set_accuracy(base, items, *, batch: int = 64) -> dict[str, float]:
    """In-context accuracy per kind: argmax over the kind's answer words at the answer position."""
    from f2l.prompt import answer_text

    tok = base.tokenizer
    first = {}
    hits: dict[str, list[int]] = {}
    for s in range(0, len(items), batch):
        chunk = items[s:s + batch]
        h, mask, _ = _hidden(base, chunk, with_answers=False)
        last = mask.sum(1) - 1
        row = base.lm_head(h[torch.arange(len(chunk), device=h.device), last]).float()
        for i, (_, qa) in enumerate(chunk):
            for w in qa.choices:
                if w not in first:
                    first[w] = tok(answer_text(w), add_special_tokens=False)["input_ids"][0]
            cand = torch.tensor([first[w] for w in qa.choices], device=row.device)
            pred = qa.choices[int(row[i, cand].argmax())]
            hits.setdefault(qa.kind, []).append(int(pred == qa.answer))
    return {k: float(np.mean(v)) for k, v in sorted(hits.items())}


def _frames_schedule(rng: np.random.Generator, phase: int) -> int:
    fs, ps = zip(*FRAME_CHOICES[phase])
    return int(rng.choice(fs, p=np.array(ps) / sum(ps)))


def pretrain(out_dir: str | os.PathLike = ASSET_DIR, *, steps: int = 700, batch_size: int = 12, lr: float = 3e-3,
             seed: int = 0, eval_videos: int = 70, progress: bool = True) -> dict:
    """Train the base, evaluate it held out, write the checkpoint directory. Returns the report."""
    from f2l.config import atomic_write_text
    from f2l.presets import fingerprint, save_base
    from f2l.train import cosine_schedule

    for name, v in (("steps", steps), ("batch_size", batch_size), ("eval_videos", eval_videos)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: expected an int >= 0, got {seed!r}")
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    base = build_untrained(seed)
    model = base.model
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_schedule(steps, max(1, steps // 30), 0.05))
    rng = np.random.default_rng([seed, 0x7E11])
    history = []
    bar = tqdm(range(steps), desc="pretrain base", unit="step", disable=not progress)
    ema = None
    for step in bar:
        frames = _frames_schedule(rng, int(step >= steps // 2))
        # Keep a step's token count roughly constant: long videos come in smaller batches.
        n = min(2 * batch_size, max(4, batch_size * 4 // frames))
        items = sample_items(rng, n, frames)
        loss = answer_loss(base, items)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        v = float(loss)
        ema = v if ema is None else 0.98 * ema + 0.02 * v
        history.append({"step": step + 1, "loss": v, "frames": frames})
        bar.set_postfix(loss=f"{ema:.3f}")
    bar.close()
    train_s = time.perf_counter() - t0
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    # Held-out: a disjoint seed stream; every kind at the training frame count 4 and longer.
    report_acc = {}
    erng = np.random.default_rng([seed, 0xE7A1, 1])
    for frames in (4, 16):
        items = _eval_items(erng, eval_videos, frames)
        report_acc[str(frames)] = closed_set_accuracy(base, items, batch=32 if frames <= 4 else 8)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base.model.config.use_cache = True
    save_base(base, out_dir)
    report = {
        "what": "tiny-seeing base: in-context accuracy on held-out synthetic videos (closed-set argmax)",
        "accuracy_by_frames_per_segment": report_acc,
        "chance": {k: 1.0 / len(syn.answer_choices(k)) for k in SINGLE + MULTI},
        "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "train_time_s": train_s,
        "final_loss_mean_last_100": float(np.mean([h["loss"] for h in history[-100:]])),
        "fingerprint": fingerprint(base.model),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "text_config": SEEING_TEXT, "vision_config": SEEING_VISION, "frame_choices": FRAME_CHOICES,
    }
    atomic_write_text(out_dir / "pretrain_report.json", json.dumps(report, indent=2) + "\n")
    return report


def _eval_items(rng: np.random.Generator, n: int, frames: int):
    """About ``n`` videos in all, the same number per kind of :data:`SINGLE` and :data:`MULTI`."""
    out = []
    for kind in SINGLE + MULTI:
        for _ in range(max(1, n // len(SINGLE + MULTI))):
            k = int(rng.integers(2, len(syn.SHAPES) + 1)) if kind in MULTI else 1
            specs: list[syn.SegmentSpec] = []
            for _ in range(k):
                specs.append(syn.sample_segment(rng, exclude_shapes=[s.shape for s in specs]))
            parts = [syn.render_segment(s, frames, 48, rng=rng, radius=syn.seeing_radius(s.count)) for s in specs]
            vid = syn.SyntheticVideo(id="", frames=torch.from_numpy(np.concatenate(parts)), segments=specs,
                                     frames_per_segment=frames, seed=0)
            qs = vid.questions([kind])
            out.append((vid.frames, qs[int(rng.integers(len(qs)))]))
    return out


def load_seeing_base(path: str | os.PathLike | None = None, *, device=None, dtype=None):
    """The shipped ``tiny-seeing`` base (or the checkpoint directory ``path``)."""
    from f2l.presets import load_base

    p = Path(path) if path is not None else ASSET_DIR
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"path: no tiny-seeing checkpoint at {str(p)!r}; build it with "
                                "`python -m f2l.data.pretrain_tiny`")
    base = load_base(str(p), device=device, dtype=dtype)
    base.name = "tiny-seeing"
    return base


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m f2l.data.pretrain_tiny", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ASSET_DIR), help="checkpoint directory to write (default: %(default)s)")
    p.add_argument("--steps", type=int, default=700)
    p.add_argument("--batch-size", type=int, default=12)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-videos", type=int, default=70)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared 2-core machine more threads run slower)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    r = pretrain(a.out, steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed, eval_videos=a.eval_videos)
    print(json.dumps({"accuracy_by_frames_per_segment": r["accuracy_by_frames_per_segment"],
                      "train_time_s": round(r["train_time_s"], 1)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
