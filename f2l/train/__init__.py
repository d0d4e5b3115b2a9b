"""Training the Frames2LoRA hypernetwork.

The base VLM is frozen; only the hypernetwork learns. One step:

1. the videos of the step's examples are encoded by the frozen VLM (no grad; an
   in-memory cache makes this free after the first epoch when it is enabled),
2. the hypernetwork maps their stacked layer states to LoRA factors,
3. the frozen text model, carrying each example's adapter and seeing **only** the
   question prompt (zero visual tokens), is teacher-forced on the target answer;
   the loss is the cross-entropy on the answer tokens (the prompt is masked), plus
   optionally ``kl_weight`` · KL(teacher ‖ student) where the teacher is the same frozen
   model with the video in its context.

An example may name several videos -- the non-overlapping *segments* of one video. Their
adapters are composed in rank space (the per-sequence adapter lists of the LoRA kernel)
and the question is about the whole video; the composition stage trains exactly that.

Optimisation: AdamW (weight decay on matrices only), linear warm-up then cosine decay,
gradient clipping, gradient accumulation, bf16 autocast on CUDA. Checkpoints are
directories of safetensors + JSON (hypernetwork, optimizer state, RNG states, step);
resuming from one reproduces the uninterrupted run exactly, because the data order is a
pure function of (seed, step). Multi-GPU: launch with ``torchrun``; every rank computes
its share of the global batch and the gradients are averaged with one all-reduce per
step (NCCL on GPUs, gloo on CPUs).

Entry points: :class:`TrainConfig`, :func:`train` (what ``f2l train`` runs), and the
pieces it is built from (:class:`Trainer`, :class:`VideoStore`, the example sources),
which :mod:`f2l.demo` reuses with pre-encoded synthetic videos.

Each concern has its module; this package re-exports the public names, so
``from f2l.train import ...`` is the path to use:

- :mod:`f2l.train.config` -- ``TrainConfig`` and its ``f2l train`` options;
- :mod:`f2l.train.store` -- ``VideoStore`` (encoded videos by key, segment keys);
- :mod:`f2l.train.sources` -- ``Example``, ``ShuffledSource``, ``SegmentSource``, ``Stage``;
- :mod:`f2l.train.optim` -- ``answer_loss``, ``cosine_schedule``, the AdamW groups;
- :mod:`f2l.train.checkpoint` -- checkpoints, ``latest.json``, retention, ``metrics.jsonl``;
- :mod:`f2l.train.distributed` -- the ``torchrun`` process group and DDP wrapping;
- :mod:`f2l.train.trainer` -- ``Trainer``;
- :mod:`f2l.train.run` -- ``train(cfg)``.

Imports run one way: ``config`` and ``store`` import no other part of the package;
``sources`` imports ``store``, ``checkpoint`` imports ``config``; ``trainer`` imports those,
``optim`` and ``distributed``; ``run`` imports ``trainer``; this ``__init__`` imports them all
(and nothing in the package imports it).
"""
from __future__ import annotations

from f2l.train.checkpoint import (
    CHECKPOINT_DIR,
    LATEST,
    METRICS,
    _write_json_atomic,  # f2l.demo writes its report with it
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from f2l.train.config import PRECISIONS, TrainConfig, add_train_arguments, config_from_args
from f2l.train.optim import answer_loss, cosine_schedule
from f2l.train.run import train
from f2l.train.sources import Example, SegmentSource, ShuffledSource, Stage
from f2l.train.store import VideoStore, segment_key
from f2l.train.trainer import Trainer

__all__ = [
    "TrainConfig",
    "Example",
    "Stage",
    "VideoStore",
    "ShuffledSource",
    "SegmentSource",
    "Trainer",
    "answer_loss",
    "cosine_schedule",
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "train",
    "add_train_arguments",
    "config_from_args",
    "segment_key",
    "PRECISIONS",
    "CHECKPOINT_DIR",
    "LATEST",
    "METRICS",
]
