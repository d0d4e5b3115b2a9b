"""``Trainer``: the training loop over explicit stages, what :func:`f2l.train.train` and
:mod:`f2l.demo` drive.

One step: the step's videos are encoded by the frozen VLM (:class:`~f2l.train.store.VideoStore`),
the hypernetwork maps their layer states to LoRA factors, and the frozen text model,
carrying each example's adapter and seeing only the question prompt, is teacher-forced on
the target answer (:func:`~f2l.train.optim.answer_loss`, plus optionally ``kl_weight`` ·
KL to the same model with the video in context). Gradient accumulation, clipping, bf16
autocast on CUDA; rank 0 logs and checkpoints.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from f2l.train.checkpoint import (
    CHECKPOINT_DIR,
    LATEST,
    METRICS,
    _append_metrics,
    _prune_checkpoints,
    _read_metrics,
    _write_json_atomic,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from f2l.train.config import TrainConfig
from f2l.train.distributed import _dist, _wrap_ddp
from f2l.train.optim import _param_groups, answer_loss, cosine_schedule
from f2l.train.sources import Example, Stage
from f2l.train.store import VideoStore

__all__ = ["Trainer"]


class Trainer:
    """The training loop over explicit stages (what :func:`train` and the demo drive).

    ``model`` is a :class:`f2l.Frames2LoRA`; only ``model.hypernet`` is optimised.
    ``on_step(step, metrics)`` is called on every rank after each optimizer step.
    """

    def __init__(self, model, cfg: TrainConfig, stages: Sequence[Stage], store: VideoStore, *,
                 on_step: Callable[[int, dict], None] | None = None):
        if not isinstance(cfg, TrainConfig):
            raise TypeError(f"cfg: expected a TrainConfig, got {type(cfg).__name__}")
        if not isinstance(store, VideoStore):
            raise TypeError(f"store: expected a VideoStore, got {type(store).__name__}")
        stages = [s for s in stages if s.steps > 0]
        if not stages:
            raise ValueError("stages: expected at least one stage with steps > 0")
        for s in stages:
            if not hasattr(s.source, "global_batch"):
                raise TypeError(f"stages: stage {s.name!r} source has no global_batch(step, n)")
        self.model, self.cfg, self.stages, self.store, self.on_step = model, cfg, stages, store, on_step
        self.total_steps = sum(s.steps for s in stages)
        dist = _dist()
        self.rank = dist.get_rank() if dist else 0
        self.world = dist.get_world_size() if dist else 1
        self.device = model.base.device
        self.hypernet = model.hypernet
        self.hypernet.train()
        # the module the forward runs through: DDP under torchrun, the hypernet itself otherwise
        self.net = _wrap_ddp(self.hypernet, self.device)
        self.params = [p for p in self.hypernet.parameters() if p.requires_grad]
        # the fused step (one kernel over all tensors) on CPU too: ~7x the per-tensor loop
        # for a hypernetwork of many small tensors
        fused = {"fused": True} if self.device.type in ("cuda", "cpu") else {}
        self.optimizer = torch.optim.AdamW(_param_groups(self.hypernet, cfg.weight_decay), lr=cfg.lr,
                                           betas=cfg.betas, eps=cfg.eps, **fused)
        warm = cfg.warmup_steps if cfg.warmup_steps is not None else int(round(cfg.warmup_ratio * self.total_steps))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, cosine_schedule(self.total_steps, min(warm, self.total_steps), cfg.min_lr_ratio))
        self.step = 0
        self.history: list[dict] = []
        prec = cfg.precision
        if prec == "auto":
            prec = "bf16" if self.device.type == "cuda" else "fp32"
        self.precision = prec

    # -- data
    def stage_at(self, step: int) -> tuple[Stage, int]:
        """The stage of global step ``step`` and the step index within it."""
        for s in self.stages:
            if step < s.steps:
                return s, step
            step -= s.steps
        raise IndexError(f"step {step} is past the last stage")

    def micro_batches(self, step: int) -> list[list[Example]]:
        """This rank's micro-batches of ``step`` (a slice of the global batch)."""
        stage, local = self.stage_at(step)
        b, acc = self.cfg.batch_size, self.cfg.grad_accum
        n = b * acc * self.world
        exs = stage.source.global_batch(local, n)
        if len(exs) != n:
            raise RuntimeError(f"stage {stage.name!r}: source returned {len(exs)} examples, expected {n}")
        mine = exs[self.rank * b * acc:(self.rank + 1) * b * acc]
        return [mine[i * b:(i + 1) * b] for i in range(acc)]

    # -- model
    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def _lora_backend(self):
        """Run the LoRA layers on ``cfg.backend`` (the patch's own setting otherwise)."""
        patch = getattr(self.model, "patch", None)
        if self.cfg.backend is None or patch is None or not hasattr(patch, "backend"):
            yield
            return
        old = patch.backend
        patch.backend = self.cfg.backend
        try:
            yield
        finally:
            patch.backend = old

    def forward(self, examples: Sequence[Example]) -> tuple[torch.Tensor, dict]:
        """Loss of one micro-batch (differentiable w.r.t. the hypernetwork)."""
        keys = list(dict.fromkeys(k for ex in examples for k in ex.videos))
        index = {k: i for i, k in enumerate(keys)}
        enc = self.store.encode(keys)
        ids = [[index[k] for k in ex.videos] for ex in examples]
        adapter_ids = [i[0] if len(i) == 1 else i for i in ids]
        input_ids, attn, labels = self.model.question_ids([ex.prompt for ex in examples],
                                                          [ex.target for ex in examples])
        with self.autocast(), self._lora_backend():
            adapters = self.model.adapter_tensors(enc, backend=self.cfg.backend, module=self.net)
            logits = self.model.lm_forward(input_ids, attn, adapters, adapter_ids)
        ce, n_tok = answer_loss(logits, labels)
        loss = ce
        stats = {"ce": float(ce.detach()), "answer_tokens": n_tok}
        if self.cfg.kl_weight > 0:
            kl = self._kl(examples, logits, labels)
            loss = loss + self.cfg.kl_weight * kl
            stats["kl"] = float(kl.detach())
        return loss, stats

    @torch.no_grad()
    def _teacher_logits(self, ex: Example, answer_ids: torch.Tensor) -> torch.Tensor:
        """Logits of the frozen model with the video in context, predicting ``answer_ids``."""
        from f2l.encode import multimodal_embeds, prompt_ids
        from f2l.video import Video

        base = self.model.base
        vids = [self.store._load(k) for k in ex.videos]
        if len(vids) == 1:
            video = vids[0]
        else:  # segments back to back: the whole video in context
            video = Video(pixel_values=torch.cat([v.pixel_values for v in vids]),
                          timestamps=[t for v in vids for t in v.timestamps], duration=vids[0].duration)
        ids = torch.cat([prompt_ids(base, video, ex.prompt), answer_ids.cpu()])
        x = multimodal_embeds(base, ids, video)[None]
        with self.autocast():
            h = base.text_model(inputs_embeds=x, use_cache=False).last_hidden_state
            logits = base.lm_head(h)[0]
        n = answer_ids.numel()
        return logits[-n - 1:-1].float()

    def _kl(self, examples, logits, labels) -> torch.Tensor:
        t = self.cfg.kl_temperature
        total, count = logits.new_zeros((), dtype=torch.float32), 0
        for i, ex in enumerate(examples):
            pos = (labels[i, 1:] != -100).nonzero(as_tuple=True)[0]
            if pos.numel() == 0:
                continue
            ans = labels[i, 1:][pos]
            teacher = self._teacher_logits(ex, ans)
            student = logits[i, pos].float()
            kl = F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), log_target=True,
                          reduction="sum") * (t * t)
            total = total + kl
            count += pos.numel()
        return total / max(count, 1)

    # -- loop
    def train_step(self) -> dict:
        t0 = time.perf_counter()
        cfg = self.cfg
        stage, _ = self.stage_at(self.step)
        total_loss, stats_sum = 0.0, {}
        mbs = self.micro_batches(self.step)
        for i, mb in enumerate(mbs):
            # gradients are all-reduced once per step: DDP skips it on all but the last micro-batch
            sync = i == len(mbs) - 1 or not hasattr(self.net, "no_sync")
            with contextlib.nullcontext() if sync else self.net.no_sync():
                loss, stats = self.forward(mb)
                (loss / cfg.grad_accum).backward()
            total_loss += float(loss.detach()) / cfg.grad_accum
            for k, v in stats.items():
                stats_sum[k] = stats_sum.get(k, 0.0) + (v / cfg.grad_accum if k != "answer_tokens" else v)
        if cfg.clip_grad_norm > 0:
            gn = float(torch.nn.utils.clip_grad_norm_(self.params, cfg.clip_grad_norm))
        else:
            gn = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in self.params if p.grad is not None])))
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        dist = _dist()
        if dist is not None and self.world > 1:
            t = torch.tensor([total_loss], dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
            dist.all_reduce(t)
            total_loss = float(t) / self.world
        self.step += 1
        m = {"step": self.step, "stage": stage.name, "loss": total_loss, "lr": lr, "grad_norm": gn,
             "step_time_s": time.perf_counter() - t0, **stats_sum}
        return m

    def fit(self, until: int | None = None) -> list[dict]:
        """Train from the current step to ``until`` (default: the end). Rank 0 logs and saves."""
        cfg = self.cfg
        end = self.total_steps if until is None else min(until, self.total_steps)
        metrics_path = os.path.join(cfg.out_dir, METRICS)
        is_main = self.rank == 0
        if is_main:
            os.makedirs(cfg.out_dir, exist_ok=True)
        bar = tqdm(total=end, initial=self.step, desc="train", unit="step",
                   disable=not (cfg.progress and is_main), dynamic_ncols=True)
        t_start = time.perf_counter()
        pending = []
        try:
            while self.step < end:
                m = self.train_step()
                m["elapsed_s"] = time.perf_counter() - t_start
                self.history.append(m)
                pending.append(m)
                if self.on_step is not None:
                    self.on_step(self.step, m)
                bar.update(1)
                bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}", stage=m["stage"])
                saving = bool(cfg.save_every) and self.step % cfg.save_every == 0 and self.step < self.total_steps
                if is_main and (self.step % cfg.log_every == 0 or self.step == end or saving):
                    # rows reach the disk before any checkpoint that covers them: resume never loses one
                    _append_metrics(metrics_path, pending)
                    pending = []
                elif not is_main:
                    pending = []
                if saving:
                    self.save()
        finally:
            bar.close()
        return self.history

    def checkpoint_path(self, step: int | None = None) -> str:
        return os.path.join(self.cfg.out_dir, CHECKPOINT_DIR, f"step-{self.step if step is None else step:07d}")

    def save(self, path: str | None = None) -> str | None:
        """Checkpoint on rank 0 (others wait); keeps the newest ``keep_checkpoints``."""
        dist = _dist()
        path = path or self.checkpoint_path()
        if self.rank == 0:
            save_checkpoint(path, hypernet=self.hypernet, optimizer=self.optimizer, scheduler=self.scheduler,
                            step=self.step, config=self.cfg)
            ckdir = os.path.dirname(path)
            if os.path.abspath(ckdir) == os.path.abspath(os.path.join(self.cfg.out_dir, CHECKPOINT_DIR)):
                _write_json_atomic(os.path.join(ckdir, LATEST), {"path": os.path.basename(path), "step": self.step})
                if self.cfg.keep_checkpoints:
                    _prune_checkpoints(ckdir, os.path.basename(path), self.step, self.cfg.keep_checkpoints)
        if dist is not None:
            dist.barrier()
        return path

    def resume(self, path: str) -> int:
        """Load a checkpoint (a checkpoint dir or an out_dir with ``latest.json``); returns its step."""
        if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "trainer_state.json")):
            found = latest_checkpoint(path)
            if found is None:
                raise FileNotFoundError(f"resume: no checkpoint in {path!r}")
            path = found
        state = load_checkpoint(path, hypernet=self.hypernet, optimizer=self.optimizer, scheduler=self.scheduler)
        self.step = int(state["step"])
        if self.step > self.total_steps:
            raise ValueError(f"resume: checkpoint is at step {self.step}, past this run's {self.total_steps} steps")
        # Drop metric rows from beyond the checkpoint (a run that died after saving).
        mpath = os.path.join(self.cfg.out_dir, METRICS)
        if self.rank == 0 and os.path.isfile(mpath):
            by_step: dict[int, dict] = {}
            for r in _read_metrics(mpath):  # one row per step: the last one written wins
                if r["step"] <= self.step:
                    by_step[r["step"]] = r
            from f2l.files import atomic_write_text

            atomic_write_text(mpath, "".join(json.dumps(by_step[k]) + "\n" for k in sorted(by_step)))
        return self.step
