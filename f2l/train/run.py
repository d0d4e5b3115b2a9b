"""``train(cfg)``: one training run as a :class:`~f2l.train.config.TrainConfig` describes it
(what ``f2l train`` runs): claim and lock ``out_dir``, build the model, gather the examples
(a manifest or synthetic videos), run the stages, resume when asked, and write the final
hypernetwork. Under ``torchrun`` every rank runs it.
"""
from __future__ import annotations

import os
import random
import shutil
import time

import numpy as np
import torch

from f2l.train.checkpoint import CHECKPOINT_DIR, METRICS, _atomic_dir, _write_json_atomic, latest_checkpoint
from f2l.train.config import TrainConfig
from f2l.train.distributed import _dist, _maybe_init_distributed
from f2l.train.sources import Example, SegmentSource, ShuffledSource, Stage
from f2l.train.store import VideoStore
from f2l.train.trainer import Trainer

__all__ = ["train"]


def _resolve_device(device) -> torch.device:
    if device is None:
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0"))
            return torch.device("cuda", local)
        return torch.device("cpu")
    from f2l.checks import check_device

    return check_device(device)


def _build_model(cfg: TrainConfig, device: torch.device):
    from f2l.model import Frames2LoRA

    kwargs = {"device": device}
    if cfg.hypernet is not None:
        kwargs["hypernet"] = cfg.hypernet
    if cfg.hypernet_preset is not None:
        kwargs["preset"] = cfg.hypernet_preset
    if device.type == "cuda" and cfg.precision in ("auto", "bf16"):
        kwargs["dtype"] = torch.bfloat16
    model = Frames2LoRA.from_pretrained(cfg.base, **kwargs)
    # The hypernetwork trains in fp32 (AdamW master weights); autocast runs its matmuls in bf16.
    model.hypernet.to(dtype=torch.float32)
    return model


def _synthetic_examples(cfg: TrainConfig, store: VideoStore) -> list[Example]:
    from f2l.data.synthetic import make_videos

    size = store.base.image_size
    vids = make_videos(cfg.synthetic, seed=cfg.seed, num_segments=1, frames_per_segment=4, size=size)
    out = []
    for v in vids:
        store.add(v.id, v.frames)
        out += [Example((v.id,), qa.question, qa.answer) for qa in v.questions()]
    return out


def _manifest_examples(cfg: TrainConfig, store: VideoStore) -> list[Example]:
    from f2l.data.manifest import read_manifest

    rows = read_manifest(cfg.manifest, data_root=cfg.data_root, split=cfg.split, require_target=True,
                         confine=cfg.confine_data_root)
    if not rows:
        raise ValueError(f"manifest: no rows with split {cfg.split!r} in {cfg.manifest!r}")
    out = []
    for r in rows:
        path = r.resolved_video_path()
        if path not in store:
            store.add(path, path)
        out.append(Example((path,), r.prompt, r.target_text))
    return out


def train(cfg: TrainConfig) -> dict:
    """Train a hypernetwork as ``cfg`` says; returns a summary dict.

    Writes ``out_dir/metrics.jsonl`` (one row per step), checkpoints under
    ``out_dir/checkpoints/`` (every ``save_every`` steps and at the end) and the final
    hypernetwork to ``out_dir/hypernet/`` (``Frames2LoRA.from_pretrained(base,
    hypernet=out_dir/hypernet)`` loads it). Under ``torchrun`` every rank runs this.
    """
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg: expected a TrainConfig, got {type(cfg).__name__}")
    if cfg.manifest is None and cfg.synthetic == 0:
        raise ValueError("manifest: expected a manifest path (or synthetic > 0 for synthetic videos), got neither")
    device = _resolve_device(cfg.device)
    created = _maybe_init_distributed(device)
    lock = None
    try:
        dist = _dist()
        if dist is None or dist.get_rank() == 0:  # rank 0 writes out_dir; it alone holds the lock
            from f2l.files import OutputLock

            lock = OutputLock(cfg.out_dir).acquire()
            _claim_out_dir(cfg)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        model = _build_model(cfg, device)
        store = VideoStore(model, cache=cfg.cache_encoded, instruction=cfg.instruction, max_frames=cfg.max_frames)
        examples = _synthetic_examples(cfg, store) if cfg.manifest is None else _manifest_examples(cfg, store)
        source = ShuffledSource(examples, seed=cfg.seed)
        stages = [Stage("single", cfg.steps, source)]
        if cfg.compose_steps:
            stages.append(Stage("compose", cfg.compose_steps,
                                SegmentSource(source, max_segments=cfg.max_segments, seed=cfg.seed)))
        trainer = Trainer(model, cfg, stages, store)
        resumed = None
        if cfg.resume:
            where = cfg.out_dir if cfg.resume == "auto" else cfg.resume
            if cfg.resume != "auto" or latest_checkpoint(cfg.out_dir) is not None:
                resumed = trainer.resume(where)
            elif trainer.rank == 0 and os.path.isfile(os.path.join(cfg.out_dir, METRICS)):
                os.remove(os.path.join(cfg.out_dir, METRICS))  # no checkpoint yet: the run restarts at step 1
        t0 = time.perf_counter()
        history = trainer.fit()
        wall = time.perf_counter() - t0
        ckpt = trainer.save()
        hdir = os.path.join(cfg.out_dir, "hypernet")
        if trainer.rank == 0:
            if hasattr(model, "save_hypernet"):
                _atomic_dir(hdir, model.save_hypernet)
            else:
                _atomic_dir(hdir, model.hypernet.save_pretrained)
            _write_json_atomic(os.path.join(cfg.out_dir, "train_config.json"), cfg.to_dict())
        return {
            "steps": trainer.step,
            "resumed_from": resumed,
            "final_loss": history[-1]["loss"] if history else None,
            "history": history,
            "train_time_s": wall,
            "examples": len(examples),
            "world_size": trainer.world,
            "checkpoint": ckpt,
            "hypernet_dir": hdir,
            "out_dir": cfg.out_dir,
        }
    finally:
        if lock is not None:
            lock.release()
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()


_RUN_OUTPUTS = (CHECKPOINT_DIR, METRICS, "hypernet", "train_config.json")


def _claim_out_dir(cfg: TrainConfig) -> None:
    """A fresh run (no ``resume``) never mixes with an earlier run's outputs: it refuses an
    out_dir that holds them, unless ``overwrite`` (then they are removed first)."""
    if cfg.resume or not os.path.isdir(cfg.out_dir):
        return
    found = [n for n in _RUN_OUTPUTS if os.path.lexists(os.path.join(cfg.out_dir, n))]
    if not found:
        return
    if not cfg.overwrite:
        raise ValueError(f"out_dir: {cfg.out_dir!r} holds an earlier training run ({', '.join(found)}); pass "
                         f"--resume auto to continue it or --overwrite to replace it, or choose another --out")
    for n in found:
        p = os.path.join(cfg.out_dir, n)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        else:
            os.remove(p)
