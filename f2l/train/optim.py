"""What a training step minimises and how the optimiser moves: :func:`answer_loss` (the
cross-entropy on the answer tokens), :func:`cosine_schedule` (warm-up, then cosine decay)
and the AdamW parameter groups (weight decay on matrices only).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["answer_loss", "cosine_schedule"]


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over the labelled (answer) positions.

    ``logits [S, T, V]`` at position t predict token t+1; ``labels [S, T]`` are the input
    ids with ``-100`` on everything that is not answer. Returns ``(loss, n_tokens)``.
    """
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(f"logits/labels: expected [S, T, V] and [S, T], got {list(logits.shape)} and "
                         f"{list(labels.shape)}")
    tgt = labels[:, 1:]
    n = int((tgt != -100).sum())
    if n == 0:
        raise ValueError("labels: no answer tokens to train on (every label is -100)")
    loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                           ignore_index=-100, reduction="sum")
    return loss / n, n


def cosine_schedule(total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.0) -> Callable[[int], float]:
    """LR multiplier: linear warm-up from 1/(warmup+1) to 1, then cosine to ``min_lr_ratio``."""
    if total_steps < 1:
        raise ValueError(f"total_steps: expected >= 1, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps: expected in [0, {total_steps}], got {warmup_steps}")

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        span = max(1, total_steps - warmup_steps)
        t = min(1.0, (step - warmup_steps) / span)
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))

    return f


def _param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: norms, scalers, latents and 1-D weights are left alone."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        is_matrix = p.dim() >= 2 and "scaler" not in name and "latents" not in name and "norm" not in name
        (decay if is_matrix else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups
