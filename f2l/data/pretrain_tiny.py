"""Pretrain the ``tiny-seeing`` base: a SmolVLM2-architecture model that answers questions
about synthetic videos *with the video in context* -- the role SmolVLM2 plays for the
paper, in miniature.

    python -m f2l.data.pretrain_tiny                   # writes f2l/assets/tiny_seeing/
    python -m f2l.data.pretrain_tiny --out DIR --steps 4500 --seed 0

What is trained, from a seeded random initialisation, in three stages:

1. **Vision** (``vision_steps``): the vision tower and connector alone, on single frames,
   through linear *probes* of a frame's visual tokens (colour, shape, count as classes,
   the object's position as a regression). The probes are scaffolding: they are not part
   of the SmolVLM2 architecture and are not saved. They give the tower a direct signal;
   through the language model alone, shape and count take thousands of steps to emerge.
2. **Answers** (``steps``): the whole model (vision tower, connector, text model, head)
   by teacher-forced cross-entropy on the single-word answer of one question per video,
   the video's frames in the prompt exactly as :meth:`f2l.Frames2LoRA.answer_in_context`
   builds it (SmolVLM2 video prompt, the question, ``<end_of_utterance>\\nAssistant:``),
   plus ``aux_weight`` times the probes' losses on every frame (and the direction of each
   segment from its first and last frames), so the tower keeps what stage 1 taught it,
   plus ``motion_weight`` times a *motion* probe: the direction of each segment read from
   the text model's residual stream at every image token of the segment's later frames,
   entering decoder layer :data:`MOTION_LAYER`. Without it the base finds the direction
   only where it answers (after the question); the hypernetwork reads the states of the
   *video* (it never sees a question), where nothing asked the base to work out the
   motion, and its adapters stay at chance on direction although the base is perfect in
   context (measured: 0.21 vs 1.00). A real SmolVLM2 gets no such probe; the tiny base is
   asked for motion directly.
3. **Long videos** (``long_steps``): the same losses at a lower rate (``long_lr``) on
   videos of 4 to 64 frames a segment, with two more probes on the states entering
   :data:`MOTION_LAYER`, both at every image token: ``order`` (the index of the token's
   segment in its video, ``order_weight``) and ``state`` (the colour, shape and count of
   its frame, ``state_weight``). Fresh seeded probes, first fitted to the frozen stage-2
   model, so the stage depends on the stage-2 weights and the seed alone (``init``). Why:
   after stage 2 (at most 32 frames a segment) the motion fades along a 64-frame
   segment's states (a linear read-out fitted on 4-frame segments: 0.97-1.00 of the states
   in its first half, 0.54-0.64 in its last quarter) and the adapters, which read those
   states, lost a third of the 64-frame direction questions while the base in context did
   not; and nothing put the order of the segments into the states, so the adapter of a
   2-3 segment video took the second segment's shape for the first one's in 2-5 % of
   "which shape came first" (the hypernetwork has no positions to go by).

Videos are fresh renders of :mod:`f2l.data.synthetic` every step (a seeded stream; the
held-out evaluation uses a disjoint seed stream). Question kinds: ``colour``, ``shape``,
``direction``, ``count`` of one-segment videos, and for videos of 2-3 segments
``colour_of`` ("What colour is the circle?") and ``first_shape`` (which segment came
first). Frame counts vary per step (1 to 4 frames a segment in the first half of stage 2,
4 to 32 in the second, 4 to 64 in stage 3), so the base reads longer videos in context too.

The architecture is the ``tiny`` preset's (48 px frames, 8 px patches, pixel shuffle 2:
9 visual tokens a frame; 4 decoder layers) with the ``tiny`` widths (text 64, vision 48).
The result is a normal checkpoint directory (``config.json``, ``model.safetensors``,
tokenizer files, ``preprocessor_config.json``) that :func:`f2l.presets.load_base` reads,
plus ``pretrain_report.json`` with the held-out in-context accuracy per kind.
Everything is seeded: the same command gives the same weights on the same software stack.

Length: one training recipe (the model, its probes and their losses, three stages, the
held-out report) read top to bottom; its parts are used nowhere else.
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
           "Probes", "vision_probe_loss", "sample_items", "answer_loss", "probe_loss", "motion_loss", "order_loss",
           "state_loss",
           "closed_set_accuracy", "answer_stage", "long_stage", "pretrain", "load_seeing_base", "main"]

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
MULTI = ("colour_of", "first_shape")
MULTI_WEIGHTS = (0.7, 0.3)
# (frames per segment, probability) of a training step, per phase. The first half sees short
# videos: with few positions to attend to, the answer finds the image tokens sooner; the
# second half moves to the demo's 4 frames a segment and longer videos (rarer: they cost more).
STEPS = 4500  # stage 2
VISION_STEPS = 2500  # stage 1
AUX_WEIGHT = 0.3
MOTION_WEIGHT = 1.0
MOTION_LAYER = 2  # the residual stream entering decoder layer 2 (after two layers)
ORDER_WEIGHT = 0.25  # stage 3's segment-index probe (same states as the motion probe)
STATE_WEIGHT = 0.2  # stage 3's colour/shape/count probe (same states)
PROBE_WARMUP_STEPS = 150  # stage 3 first fits its fresh probes to the frozen stage-2 model
# stage 3; 800 rather than 400: the in-context colour of a named shape on held-out 4-frame
# joins went 0.90-0.92 -> 0.93-0.97 (three demo test sets), 0.65 -> 0.78 at 16 frames a segment
LONG_STEPS = 800
LONG_LR = 1e-3
FRAME_CHOICES = (((1, 0.35), (2, 0.35), (4, 0.3)), ((4, 0.75), (8, 0.15), (16, 0.05), (32, 0.05)),
                 ((4, 0.45), (8, 0.15), (16, 0.15), (32, 0.15), (64, 0.1)))


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


class Probes(torch.nn.Module):
    """Linear read-outs of one frame's visual tokens ``[tokens_per_frame, hidden]``.

    Scaffolding for :func:`pretrain` only (not part of the model, not saved): ``colour``,
    ``shape``, ``count`` are classes of the frame, ``position`` regresses the object's
    place along its travel in [-1, 1] (x for left/right, y for up/down), ``direction``
    classifies a segment from its first and last frames' tokens side by side,
    ``motion`` reads the direction from one text-model state (:func:`motion_loss`),
    ``order`` which segment of its video a state belongs to (:func:`order_loss`), and
    ``state`` the colour, shape and count of the frame a state belongs to
    (:func:`state_loss`).
    """

    def __init__(self, tokens_per_frame: int, hidden: int):
        super().__init__()
        d = tokens_per_frame * hidden
        self.colour = torch.nn.Linear(d, len(syn.COLOURS))
        self.shape = torch.nn.Linear(d, len(syn.SHAPES))
        self.count = torch.nn.Linear(d, len(syn.COUNTS))
        self.position = torch.nn.Linear(d, 2)
        self.direction = torch.nn.Linear(2 * d, len(syn.DIRECTIONS))
        self.motion = torch.nn.Linear(hidden, len(syn.DIRECTIONS))
        # created last: the heads above draw the initial values they drew before these existed
        self.order = torch.nn.Linear(hidden, len(syn.SHAPES))  # at most one segment a shape
        self.state = torch.nn.Linear(hidden, len(syn.COLOURS) + len(syn.SHAPES) + len(syn.COUNTS))

    def frame_loss(self, feats: torch.Tensor, specs: list[syn.SegmentSpec]) -> torch.Tensor:
        """Sum of the class losses of frames ``feats [n, T, H]`` showing ``specs[i]``."""
        f = feats.reshape(feats.shape[0], -1)
        return _attribute_loss((self.colour(f), self.shape(f), self.count(f)), specs)


def _attribute_loss(logits, specs: list[syn.SegmentSpec], repeat: int = 1) -> torch.Tensor:
    """Sum of the cross-entropies of ``(colour, shape, count)`` logits against ``specs``,
    each spec labelling ``repeat`` consecutive rows."""
    y = lambda xs: torch.tensor(xs, device=logits[0].device).repeat_interleave(repeat)
    F = torch.nn.functional
    return (F.cross_entropy(logits[0], y([list(syn.COLOURS).index(sp.colour) for sp in specs]))
            + F.cross_entropy(logits[1], y([syn.SHAPES.index(sp.shape) for sp in specs]))
            + F.cross_entropy(logits[2], y([sp.count - 1 for sp in specs])))


def _position(spec: syn.SegmentSpec, frame: int, frames: int) -> tuple[float, float]:
    t = frame / max(frames - 1, 1)
    along = (t if spec.direction in ("right", "down") else 1.0 - t) * 2.0 - 1.0
    return (along, 0.0) if spec.direction in ("left", "right") else (0.0, along)


def _tokens(base, pixel_values: torch.Tensor) -> torch.Tensor:
    """Connector output ``[frames, tokens_per_frame, hidden]`` of normalised frames."""
    grid = base.image_size // int(base.model.config.vision_config.patch_size)
    pmask = torch.ones(pixel_values.shape[0], grid, grid, dtype=torch.bool, device=pixel_values.device)
    hs = base.vision_model(pixel_values=pixel_values, patch_attention_mask=pmask).last_hidden_state
    return base.connector(hs)


def vision_probe_loss(base, probes: Probes, rng: np.random.Generator, n: int = 16) -> torch.Tensor:
    """Stage 1: probe losses of ``n`` single frames of fresh one-segment renders."""
    from f2l.video import load_video

    specs = [syn.sample_segment(rng) for _ in range(n)]
    frames, pos = [], []
    for sp in specs:
        fr = syn.render_segment(sp, 4, base.image_size, rng=rng, radius=syn.seeing_radius(sp.count))
        j = int(rng.integers(len(fr)))
        frames.append(fr[j])
        pos.append(_position(sp, j, len(fr)))
    v = load_video(torch.from_numpy(np.stack(frames)), image_size=base.image_size, max_frames=n,
                   mean=base.image_mean, std=base.image_std)
    feats = _tokens(base, v.pixel_values.to(base.device))
    reg = torch.nn.functional.mse_loss(probes.position(feats.reshape(n, -1)), torch.tensor(pos, device=feats.device))
    return probes.frame_loss(feats, specs) + reg


def sample_items(rng: np.random.Generator, n: int, frames: int, *, multi_prob: float = 0.5,
                 size: int = 48) -> list[tuple[torch.Tensor, syn.QA, list[syn.SegmentSpec]]]:
    """``n`` (frames uint8 [F, S, S, 3], question, segment specs) triples of fresh renders.

    With probability ``multi_prob`` the batch is of videos of 2-3 segments, asked one of
    :data:`MULTI` each, else of one-segment videos asked one of :data:`SINGLE` (not
    ``direction`` when ``frames == 1``). Single kinds are equally likely; multi-segment
    kinds are drawn with :data:`MULTI_WEIGHTS`.
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
        if multi:  # binding a named shape to its colour is the slowest kind to learn: ask it most
            kind = MULTI[int(rng.choice(len(MULTI), p=MULTI_WEIGHTS))]
        else:
            kind = single[int(rng.integers(len(single)))]
        qs = vid.questions([kind])
        out.append((vid.frames, qs[int(rng.integers(len(qs)))], specs))
    return out


def _batch_inputs(base, items, *, with_answers: bool):
    """Padded ``inputs_embeds`` (differentiable w.r.t. the vision side), mask, labels, and
    the visual tokens ``[frames, tokens_per_frame, hidden]`` of all items in order."""
    from f2l.encode import prompt_ids
    from f2l.prompt import answer_text
    from f2l.video import load_video

    tok = base.tokenizer
    vids = [load_video(f, image_size=base.image_size, max_frames=f.shape[0], mean=base.image_mean,
                       std=base.image_std) for f, *_ in items]
    rows, labs = [], []
    cache = base.extra.setdefault("prompt_ids", {})
    for v, (_, qa, *_) in zip(vids, items):
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
    tokens = _tokens(base, torch.cat([v.pixel_values for v in vids]).to(base.device))
    feats = tokens.reshape(-1, base.hidden_size)
    ids, mask, labels = pad_labelled(rows, labs, tok.pad_token_id)
    B, T = ids.shape
    ids, mask, labels = ids.to(base.device), mask.to(base.device), labels.to(base.device)
    x = base.text_model.embed_tokens(ids)
    img = (ids == base.image_token_id).reshape(-1)
    x = x.reshape(-1, x.shape[-1]).clone()
    x[img] = feats.to(x.dtype)
    return x.reshape(B, T, -1), mask, labels, tokens, img.nonzero().squeeze(1)


def _hidden(base, items, *, with_answers: bool, state_layer: int | None = None):
    """Final hidden states ``[B, T, H]`` (the head is applied only where it is needed), mask,
    labels, the visual tokens, and with ``state_layer`` the text model's residual stream
    entering that layer at the image positions ``[frames, tokens_per_frame, H]``."""
    from f2l.generate import position_ids_from_mask

    x, mask, labels, tokens, img_pos = _batch_inputs(base, items, with_answers=with_answers)
    out = base.text_model(inputs_embeds=x, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                          use_cache=False, output_hidden_states=state_layer is not None)
    states = None
    if state_layer is not None:
        hs = out.hidden_states[state_layer]
        states = hs.reshape(-1, hs.shape[-1])[img_pos].reshape(tokens.shape[0], tokens.shape[1], -1)
    return out.last_hidden_state, mask, labels, tokens, states


def _segment_frames(items):
    """``(spec, index of its first frame, frames, index of the segment in its video)`` of
    every segment of ``items``, with frame indices counted over all items in order (the
    order of :func:`_batch_inputs`' tokens)."""
    off = 0
    for frames, _, segs in items:
        fps = frames.shape[0] // len(segs)
        for j, sp in enumerate(segs):
            yield sp, off, fps, j
            off += fps


def motion_loss(probes: Probes, states: torch.Tensor, items) -> torch.Tensor | None:
    """Cross-entropy of a segment's direction read by ``probes.motion`` from the text
    model's state at *every* image token of the segment's second and later frames (causal
    attention lets those positions see the earlier frames), so the motion is spread over
    the video's states rather than left to a few positions."""
    sel, dirs = [], []
    for sp, first, fps, _ in _segment_frames(items):
        sel += range(first + 1, first + fps)
        dirs += [syn.DIRECTIONS.index(sp.direction)] * (fps - 1)
    if not dirs:
        return None
    x = states[sel]  # [frames, tokens_per_frame, H]
    y = torch.tensor(dirs, device=states.device).repeat_interleave(x.shape[1])
    return torch.nn.functional.cross_entropy(probes.motion(x.reshape(-1, x.shape[-1])), y)


def order_loss(probes: Probes, states: torch.Tensor, items) -> torch.Tensor:
    """Cross-entropy of the index of the segment (0, 1, 2 in its video) read by
    ``probes.order`` from the text model's state at every image token. Causal attention
    lets a token see whether the video changed before it; the probe asks the states to
    keep that, so which segment came first can be read from the video's states alone
    (the hypernetwork has no positions to go by)."""
    idx = [j for _, _, fps, j in _segment_frames(items) for _ in range(fps)]
    y = torch.tensor(idx, device=states.device).repeat_interleave(states.shape[1])
    return torch.nn.functional.cross_entropy(probes.order(states.reshape(-1, states.shape[-1])), y)


def state_loss(probes: Probes, states: torch.Tensor, items) -> torch.Tensor:
    """Sum of the cross-entropies of the colour, shape and count of a token's frame, read by
    ``probes.state`` from the text model's state at every image token: what a frame shows
    stays bound to that frame's states however far into a long video it is (the
    hypernetwork must find a named shape's colour in the states of its own segment)."""
    specs = [sp for sp, _, fps, _ in _segment_frames(items) for _ in range(fps)]
    x = probes.state(states.reshape(-1, states.shape[-1]))
    nc, ns = len(syn.COLOURS), len(syn.SHAPES)
    return _attribute_loss((x[:, :nc], x[:, nc:nc + ns], x[:, nc + ns:]), specs, repeat=states.shape[1])


def probe_loss(probes: Probes, tokens: torch.Tensor, items) -> torch.Tensor:
    """Stage 2's auxiliary term: the probes on every frame of ``items`` (visual tokens
    ``tokens`` in item order) and the direction of every segment of more than one frame."""
    specs, first, last, dirs = [], [], [], []
    for sp, start, fps, _ in _segment_frames(items):
        specs += [sp] * fps
        if fps > 1:
            first.append(start)
            last.append(start + fps - 1)
            dirs.append(syn.DIRECTIONS.index(sp.direction))
    loss = probes.frame_loss(tokens, specs)
    if dirs:
        flat = tokens.reshape(tokens.shape[0], -1)
        pair = torch.cat([flat[first], flat[last]], dim=1)
        loss = loss + torch.nn.functional.cross_entropy(probes.direction(pair), torch.tensor(dirs, device=flat.device))
    return loss


def answer_loss(base, items, probes: Probes | None = None, aux_weight: float = 0.0,
                motion_weight: float = 0.0, order_weight: float = 0.0, state_weight: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens (the head runs on those positions only),
    plus ``aux_weight`` times :func:`probe_loss`, and ``motion_weight``, ``order_weight``,
    ``state_weight`` times :func:`motion_loss`, :func:`order_loss`, :func:`state_loss` (all
    on the states entering :data:`MOTION_LAYER`) when ``probes`` are given."""
    on_states = probes is not None and bool(motion_weight or order_weight or state_weight)
    h, _, labels, tokens, states = _hidden(base, items, with_answers=True,
                                           state_layer=MOTION_LAYER if on_states else None)
    tgt = labels[:, 1:]
    sel = tgt != -100
    logits = base.lm_head(h[:, :-1][sel]).float()
    loss = torch.nn.functional.cross_entropy(logits, tgt[sel])
    if probes is not None and aux_weight:
        loss = loss + aux_weight * probe_loss(probes, tokens, items)
    if on_states and motion_weight:
        m = motion_loss(probes, states, items)
        if m is not None:
            loss = loss + motion_weight * m
    if on_states and order_weight:
        loss = loss + order_weight * order_loss(probes, states, items)
    if on_states and state_weight:
        loss = loss + state_weight * state_loss(probes, states, items)
    return loss


@torch.no_grad()
def closed_set_accuracy(base, items, *, batch: int = 64) -> dict[str, float]:
    """In-context accuracy per kind: argmax over the kind's answer words at the answer position."""
    from f2l.prompt import answer_text

    tok = base.tokenizer
    first = {}
    hits: dict[str, list[int]] = {}
    for s in range(0, len(items), batch):
        chunk = items[s:s + batch]
        h, mask, _, _, _ = _hidden(base, chunk, with_answers=False)
        last = mask.sum(1) - 1
        row = base.lm_head(h[torch.arange(len(chunk), device=h.device), last]).float()
        for i, (_, qa, *_) in enumerate(chunk):
            for w in qa.choices:
                if w not in first:
                    first[w] = tok(answer_text(w), add_special_tokens=False)["input_ids"][0]
            cand = torch.tensor([first[w] for w in qa.choices], device=row.device)
            pred = qa.choices[int(row[i, cand].argmax())]
            hits.setdefault(qa.kind, []).append(int(pred == qa.answer))
    return {k: float(np.mean(v)) for k, v in sorted(hits.items())}


def answer_stage(base, probes: Probes, steps: int, *, lr: float, batch_size: int, aux_weight: float,
                 motion_weight: float, rng: np.random.Generator, phases, order_weight: float = 0.0,
                 state_weight: float = 0.0, min_videos: int = 4, desc: str = "pretrain",
                 progress: bool = True) -> list[dict]:
    """``steps`` of :func:`answer_loss` on the whole model and the probes (fresh AdamW, cosine
    schedule from ``lr``); the frame counts of a step come from ``phases`` (lists of
    ``(frames per segment, probability)``, each an equal share of the steps, in order). A
    step has ``batch_size * 4 / frames`` videos, at least ``min_videos``, at most twice
    ``batch_size``: roughly the same number of tokens whatever the frame count. Parameters
    of the model with ``requires_grad`` off stay as they are."""
    from f2l.train import cosine_schedule

    params = [p for p in base.model.parameters() if p.requires_grad] + list(probes.parameters())
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_schedule(steps, max(1, steps // 30), 0.05))
    history = []
    bar = tqdm(range(steps), desc=desc, unit="step", disable=not progress)
    ema = None
    for step in bar:
        phase = max(k for k in range(len(phases)) if step >= k * steps // len(phases))
        fs, ps = zip(*phases[phase])
        frames = int(rng.choice(fs, p=np.array(ps) / sum(ps)))
        n = min(2 * batch_size, max(min_videos, batch_size * 4 // frames))
        items = sample_items(rng, n, frames)
        loss = answer_loss(base, items, probes, aux_weight, motion_weight, order_weight, state_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        v = float(loss.detach())
        ema = v if ema is None else 0.98 * ema + 0.02 * v
        history.append({"step": step + 1, "loss": v, "frames": frames})
        bar.set_postfix(loss=f"{ema:.3f}")
    bar.close()
    return history


def long_stage(base, steps: int, *, lr: float, batch_size: int, aux_weight: float, motion_weight: float,
               order_weight: float, state_weight: float, seed: int, progress: bool = True) -> list[dict]:
    """Stage 3 on a stage-2 model: fresh seeded probes, fitted to the frozen model for
    :data:`PROBE_WARMUP_STEPS`, then ``steps`` of :func:`answer_stage` on everything with the
    order and state probes added, on videos of 4 to 64 frames a segment. A function of the stage-2
    weights and ``seed`` alone, so ``pretrain(init=...)`` from a saved stage-2 checkpoint
    gives what the full run gives."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 0x10E6)
        probes = Probes(base.tokens_per_frame, base.hidden_size).to(base.device)
    params = list(base.model.parameters())
    for p in params:
        p.requires_grad_(False)
    answer_stage(base, probes, PROBE_WARMUP_STEPS, lr=3e-3, batch_size=batch_size, aux_weight=aux_weight,
                 motion_weight=motion_weight, order_weight=order_weight, state_weight=state_weight,
                 rng=np.random.default_rng([seed, 0x1047]),
                 phases=FRAME_CHOICES[1:2], desc="pretrain long (probes)", progress=progress)
    for p in params:
        p.requires_grad_(True)
    return answer_stage(base, probes, steps, lr=lr, batch_size=batch_size, aux_weight=aux_weight,
                        motion_weight=motion_weight, order_weight=order_weight, state_weight=state_weight,
                        rng=np.random.default_rng([seed, 0x1046]), phases=FRAME_CHOICES[2:], min_videos=2,
                        desc="pretrain long", progress=progress)


def _stages_1_2(seed: int, *, vision_steps: int, steps: int, lr: float, batch_size: int, aux_weight: float,
                motion_weight: float, progress: bool):
    """Stages 1 and 2 from the seeded random initialisation: ``(base, vision losses, history)``."""
    torch.manual_seed(seed)
    base = build_untrained(seed)
    model = base.model
    model.train()
    probes = Probes(base.tokens_per_frame, base.hidden_size).to(base.device)
    # stage 1: the vision tower and connector through the probes (constant lr; own stream)
    vis_params = [*base.vision_model.parameters(), *base.connector.parameters(), *probes.parameters()]
    vopt = torch.optim.AdamW(vis_params, lr=lr, weight_decay=0.0)
    vrng = np.random.default_rng([seed, 0x7151])
    vision_history = []
    bar = tqdm(range(vision_steps), desc="pretrain vision", unit="step", disable=not progress)
    for step in bar:
        loss = vision_probe_loss(base, probes, vrng)
        vopt.zero_grad(set_to_none=True)
        loss.backward()
        vopt.step()
        vision_history.append(float(loss.detach()))
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(vision_history[-50:]):.3f}")
    bar.close()
    del vopt
    # stage 2: everything on answers, the probes kept as an auxiliary term
    history = answer_stage(base, probes, steps, lr=lr, batch_size=batch_size, aux_weight=aux_weight,
                           motion_weight=motion_weight, rng=np.random.default_rng([seed, 0x7E11]),
                           phases=FRAME_CHOICES[:2], desc="pretrain base", progress=progress)
    return base, vision_history, history


def pretrain(out_dir: str | os.PathLike = ASSET_DIR, *, steps: int = STEPS, vision_steps: int = VISION_STEPS,
             long_steps: int = LONG_STEPS, batch_size: int = 12, lr: float = 3e-3, long_lr: float = LONG_LR,
             aux_weight: float = AUX_WEIGHT, motion_weight: float = MOTION_WEIGHT,
             order_weight: float = ORDER_WEIGHT, state_weight: float = STATE_WEIGHT, seed: int = 0,
             eval_videos: int = 140,
             init: str | os.PathLike | None = None, progress: bool = True) -> dict:
    """Train the base (stage 1: ``vision_steps`` of probes; stage 2: ``steps`` of answers;
    stage 3: ``long_steps`` of answers on longer videos, :func:`long_stage`), evaluate it held
    out, write the checkpoint directory. Returns the report. ``init``: a stage-2 checkpoint
    directory (written with ``long_steps=0``) to run stage 3 on instead of stages 1-2."""
    from f2l.config import atomic_write_text
    from f2l.presets import fingerprint, save_base

    for name, v in (("steps", steps), ("batch_size", batch_size), ("eval_videos", eval_videos)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
    for name, v in (("vision_steps", vision_steps), ("long_steps", long_steps)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name}: expected an int >= 0, got {v!r}")
    for name, v in (("lr", lr), ("long_lr", long_lr)):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
            raise ValueError(f"{name}: expected a number > 0, got {v!r}")
    for name, v in (("aux_weight", aux_weight), ("motion_weight", motion_weight), ("order_weight", order_weight),
                    ("state_weight", state_weight)):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= 0:
            raise ValueError(f"{name}: expected a number >= 0, got {v!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: expected an int >= 0, got {seed!r}")
    t0 = time.perf_counter()
    if init is None:
        base, vision_history, history = _stages_1_2(seed, vision_steps=vision_steps, steps=steps, lr=lr,
                                                    batch_size=batch_size, aux_weight=aux_weight,
                                                    motion_weight=motion_weight, progress=progress)
        init_fingerprint = None
    else:  # a stage-2 checkpoint (this function's own output with long_steps=0)
        if not (Path(init) / "config.json").is_file():
            raise FileNotFoundError(f"init: no checkpoint directory at {str(init)!r}")
        base = load_seeing_base(init)
        for k in ("is_local", "local_files_only"):  # loading notes, not the tokenizer's settings
            base.tokenizer.init_kwargs.pop(k, None)
        vision_history, history, init_fingerprint = [], [], base.fingerprint
    model = base.model
    model.train()
    # stage 3: longer videos (up to 64 frames a segment) at a lower rate, so the states the
    # hypernetwork reads keep the motion on videos far longer than the demo's 4 frames
    long_history = long_stage(base, long_steps, lr=long_lr, batch_size=batch_size, aux_weight=aux_weight,
                              motion_weight=motion_weight, order_weight=order_weight,
                              state_weight=state_weight, seed=seed,
                              progress=progress) if long_steps else []
    train_s = time.perf_counter() - t0
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    # Held-out: a disjoint seed stream; every kind at the training frame count 4 and longer.
    report_acc = {}
    erng = np.random.default_rng([seed, 0xE7A1, 1])
    for frames in (4, 16, 64):
        items = _eval_items(erng, eval_videos, frames)
        report_acc[str(frames)] = closed_set_accuracy(base, items, batch={4: 32, 16: 8}.get(frames, 2))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base.model.config.use_cache = True
    save_base(base, out_dir)
    report = {
        "what": "tiny-seeing base: in-context accuracy on held-out synthetic videos (closed-set argmax)",
        "accuracy_by_frames_per_segment": report_acc,
        "chance": {k: 1.0 / len(syn.answer_choices(k)) for k in SINGLE + MULTI},
        "steps": steps, "vision_steps": vision_steps, "long_steps": long_steps, "long_lr": long_lr,
        "aux_weight": aux_weight, "motion_weight": motion_weight, "order_weight": order_weight,
        "state_weight": state_weight, "probe_warmup_steps": PROBE_WARMUP_STEPS, "init_fingerprint": init_fingerprint,
        "motion_layer": MOTION_LAYER, "multi": MULTI, "multi_weights": MULTI_WEIGHTS,
        "batch_size": batch_size, "lr": lr, "seed": seed, "train_time_s": train_s,
        "final_vision_probe_loss_mean_last_100": float(np.mean(vision_history[-100:])) if vision_history else None,
        "final_loss_mean_last_100": float(np.mean([h["loss"] for h in history[-100:]])) if history else None,
        "final_long_loss_mean_last_100": (float(np.mean([h["loss"] for h in long_history[-100:]]))
                                          if long_history else None),
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
            out.append((vid.frames, qs[int(rng.integers(len(qs)))], specs))
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
    p.add_argument("--steps", type=int, default=STEPS, help="stage 2 (answers) steps (default: %(default)s)")
    p.add_argument("--vision-steps", type=int, default=VISION_STEPS,
                   help="stage 1 (vision probes) steps (default: %(default)s)")
    p.add_argument("--long-steps", type=int, default=LONG_STEPS,
                   help="stage 3 (answers on videos of up to 64 frames a segment) steps (default: %(default)s)")
    p.add_argument("--long-lr", type=float, default=LONG_LR, help="stage 3 learning rate (default: %(default)s)")
    p.add_argument("--aux-weight", type=float, default=AUX_WEIGHT,
                   help="weight of the probes' loss in stage 2 (default: %(default)s)")
    p.add_argument("--motion-weight", type=float, default=MOTION_WEIGHT,
                   help="weight of the direction probe on the text model's states (default: %(default)s)")
    p.add_argument("--order-weight", type=float, default=ORDER_WEIGHT,
                   help="stage 3 weight of the segment-index probe on the text model's states (default: %(default)s)")
    p.add_argument("--state-weight", type=float, default=STATE_WEIGHT,
                   help="stage 3 weight of the colour/shape/count probe on the text model's states "
                        "(default: %(default)s)")
    p.add_argument("--init", default=None,
                   help="a stage-2 checkpoint (written with --long-steps 0): run stage 3 on it instead of stages 1-2")
    p.add_argument("--batch-size", type=int, default=12)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-videos", type=int, default=140)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared 2-core machine more threads run slower)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    r = pretrain(a.out, steps=a.steps, vision_steps=a.vision_steps, long_steps=a.long_steps, long_lr=a.long_lr,
                 batch_size=a.batch_size, lr=a.lr,
                 aux_weight=a.aux_weight, motion_weight=a.motion_weight, order_weight=a.order_weight,
                 state_weight=a.state_weight, seed=a.seed, eval_videos=a.eval_videos, init=a.init)
    print(json.dumps({"accuracy_by_frames_per_segment": r["accuracy_by_frames_per_segment"],
                      "train_time_s": round(r["train_time_s"], 1)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
