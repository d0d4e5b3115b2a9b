"""KV-cached batched decoding: left-padded prompts, greedy or sampled, per-sequence stop.

The decode loop is model-agnostic: it drives a ``step`` callable

    step(input_ids | None, inputs_embeds | None, attention_mask, position_ids, cache) -> logits [S, V]

which runs the model on the new positions (the whole prompt at prefill, one token per
sequence after) with the cache, and returns the next-token logits. Whatever context the
caller holds around :func:`generate` (the per-example LoRA of :class:`f2l.layers.F2LPatch`)
applies to every step, prefill and decode alike.

A finished sequence keeps its row (fed the pad token, masked out of attention) so that
the batch layout -- and with it each row's adapter -- never changes mid-generation;
the loop ends when every sequence has stopped or ``max_new_tokens`` is reached.
"""
from __future__ import annotations

import functools

from dataclasses import dataclass
from typing import Callable, Sequence

import torch


@dataclass
class SamplingConfig:
    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: expected an int >= 1, got {self.max_new_tokens!r}")
        if not isinstance(self.do_sample, bool):
            raise TypeError(f"do_sample: expected a bool, got {type(self.do_sample).__name__}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) or not self.temperature > 0:
            raise ValueError(f"temperature: expected a number > 0, got {self.temperature!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: expected a number in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise TypeError(f"seed: expected None or an int, got {type(self.seed).__name__}")


def left_pad(seqs: Sequence[torch.Tensor], pad_id: int, *, device=None):
    """Left-pad 1-D id tensors to ``[S, T]``; returns ``(ids, attention_mask)``."""
    if not seqs:
        raise ValueError("seqs: expected at least one sequence, got none")
    T = max(int(s.numel()) for s in seqs)
    if T == 0:
        raise ValueError("seqs: every sequence is empty")
    ids = torch.full((len(seqs), T), int(pad_id), dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        n = int(s.numel())
        if n == 0:
            raise ValueError(f"seqs[{i}]: expected a non-empty sequence")
        ids[i, T - n:] = s
        mask[i, T - n:] = 1
    return ids.to(device), mask.to(device)


def pad_labelled(rows: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], pad_id: int, *,
                 side: str = "right"):
    """Pad id rows and their labels to ``[B, T]`` on ``side``; returns ``(ids, attention_mask,
    labels)`` (labels -100 on the padding)."""
    T = max(len(r) for r in rows)
    B = len(rows)
    ids = torch.full((B, T), int(pad_id), dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    lab = torch.full((B, T), -100, dtype=torch.long)
    for i, (r, lb) in enumerate(zip(rows, labels)):
        sl = slice(0, len(r)) if side == "right" else slice(T - len(r), T)
        ids[i, sl] = torch.tensor(r, dtype=torch.long)
        mask[i, sl] = 1
        lab[i, sl] = torch.tensor(lb, dtype=torch.long)
    return ids, mask, lab


def left_pad_embeds(embeds: Sequence[torch.Tensor]):
    """Left-pad ``[T_i, H]`` embeddings to ``[S, T, H]`` (zeros); returns ``(x, attention_mask)``."""
    T = max(int(e.shape[0]) for e in embeds)
    H = embeds[0].shape[-1]
    x = embeds[0].new_zeros(len(embeds), T, H)
    mask = torch.zeros(len(embeds), T, dtype=torch.long, device=embeds[0].device)
    for i, e in enumerate(embeds):
        x[i, T - e.shape[0]:] = e
        mask[i, T - e.shape[0]:] = 1
    return x, mask


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions counting real tokens only, so left padding does not shift RoPE."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def _top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    # Drop a token when the mass strictly before it already reaches top_p (the best one stays).
    drop = probs.cumsum(-1) - probs >= top_p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def next_tokens(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    logits = logits.float()
    if not cfg.do_sample:
        return logits.argmax(-1)
    logits = _top_p_filter(logits / float(cfg.temperature), float(cfg.top_p))
    probs = logits.softmax(-1)
    if generator is not None and generator.device != probs.device:
        return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(probs.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def cache_kwargs(model, cache) -> dict:
    """``{name: cache}`` for ``model``'s forward: transformers renamed ``past_key_values`` to
    ``cache`` (the old name warns of its removal); older releases only know the old one."""
    return {_cache_arg(type(model)): cache}


@functools.lru_cache(maxsize=None)
def _cache_arg(cls) -> str:
    import inspect

    try:
        names = inspect.signature(cls.forward).parameters
    except (AttributeError, TypeError, ValueError):
        names = {}
    return "cache" if "cache" in names else "past_key_values"


def _make_cache(config):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=config)
    except TypeError:  # older signatures take no config
        return DynamicCache()


@torch.no_grad()
def generate(step: Callable, *, attention_mask: torch.Tensor, input_ids: torch.Tensor | None = None,
             inputs_embeds: torch.Tensor | None = None, cfg: SamplingConfig, stop_ids: Sequence[int], pad_id: int,
             cache_config=None, stop_strings: Sequence[str] | None = None,
             decode: Callable | None = None) -> list[list[int]]:
    """Decode from a left-padded prompt; returns the new token ids of each sequence
    (the stop token and anything after it excluded)."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("input_ids / inputs_embeds: pass exactly one of them")
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask: expected [S, T], got {tuple(attention_mask.shape)}")
    S = attention_mask.shape[0]
    dev = attention_mask.device
    if stop_strings and decode is None:
        raise ValueError("decode: needed to check stop_strings")
    stops = torch.tensor(sorted({int(i) for i in stop_ids}), dtype=torch.long, device=dev)
    generator = None
    if cfg.do_sample and cfg.seed is not None:
        generator = torch.Generator(device=dev).manual_seed(int(cfg.seed))
    cache = _make_cache(cache_config)
    mask = attention_mask.long()
    pos = position_ids_from_mask(mask)
    logits = step(input_ids, inputs_embeds, mask, pos, cache)
    out: list[list[int]] = [[] for _ in range(S)]
    done = torch.zeros(S, dtype=torch.bool, device=dev)
    last_pos = pos[:, -1:]
    for t in range(cfg.max_new_tokens):
        tok = next_tokens(logits, cfg, generator)
        tok = torch.where(done, torch.full_like(tok, int(pad_id)), tok)
        hit = torch.isin(tok, stops) & ~done
        tok_list, hit_list, done_list = tok.tolist(), hit.tolist(), done.tolist()
        for i in range(S):
            if done_list[i] or hit_list[i]:
                continue
            out[i].append(tok_list[i])
            if stop_strings:
                text = decode(out[i])
                if any(s in text for s in stop_strings):
                    hit_list[i] = True
        done = done | torch.tensor(hit_list, dtype=torch.bool, device=dev)
        if bool(done.all()) or t == cfg.max_new_tokens - 1:
            break
        # A finished row keeps attending to nothing new: its mask entry is 0.
        mask = torch.cat([mask, (~done).long()[:, None]], dim=1)
        last_pos = last_pos + 1
        feed = torch.where(done, torch.full_like(tok, int(pad_id)), tok)
        logits = step(feed[:, None], None, mask, last_pos, cache)
    return out


def trim_stop_strings(text: str, stop_strings: Sequence[str] | None) -> str:
    if not stop_strings:
        return text
    cut = min((text.find(s) for s in stop_strings if s in text), default=-1)
    return text if cut < 0 else text[:cut]
