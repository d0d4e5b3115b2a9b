"""What a training run keeps on disk and reads back to resume.

A checkpoint is a directory of safetensors + JSON (the hypernetwork, the optimizer state,
the RNG states, the step), written atomically; ``checkpoints/latest.json`` names the newest,
and retention keeps ``keep_checkpoints`` of them. ``metrics.jsonl`` gets one row per step,
on disk before any checkpoint that covers it, so a resume (which drops the rows past its
checkpoint) never loses or repeats one.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
from typing import Callable

import numpy as np
import torch

from f2l.train.config import TrainConfig

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "CHECKPOINT_DIR", "LATEST", "METRICS"]


CHECKPOINT_DIR = "checkpoints"
LATEST = "latest.json"
METRICS = "metrics.jsonl"


def _flatten(obj, prefix: str, tensors: dict[str, torch.Tensor]):
    """JSON skeleton of a nested state, with every tensor moved into ``tensors``."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {"__dict__": [[_flatten(k, f"{prefix}.k{i}", tensors), _flatten(v, f"{prefix}.{i}", tensors)]
                             for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        if isinstance(obj, float) and not math.isfinite(obj):
            return {"__float__": repr(obj)}
        return obj
    raise TypeError(f"cannot checkpoint a value of type {type(obj).__name__} at {prefix!r}")


def _unflatten(obj, tensors: dict[str, torch.Tensor]):
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in obj["__dict__"]}
        if "__tuple__" in obj:
            return tuple(_unflatten(v, tensors) for v in obj["__tuple__"])
        if "__ndarray__" in obj:
            return np.asarray(obj["__ndarray__"], dtype=obj["dtype"])
        if "__float__" in obj:
            return float(obj["__float__"])
        raise ValueError(f"malformed checkpoint skeleton entry {sorted(obj)}")
    return obj


def _rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np.random.set_state(tuple(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def _atomic_dir(final: str, write: Callable[[str], None]) -> None:
    """Build a directory under a temporary name, then move it into place."""
    from f2l.files import atomic_dir

    atomic_dir(final, write)


def save_checkpoint(path: str, *, hypernet: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler, step: int, config: TrainConfig | None = None, extra: dict | None = None) -> str:
    """Write a resumable checkpoint directory (atomically).

    Layout: ``hypernet/`` (``config.json`` + ``model.safetensors``, loadable on its own by
    ``Frames2LoRAHypernet.from_pretrained``), ``optimizer.safetensors`` (every optimizer
    and RNG tensor), ``trainer_state.json`` (step, schedule, optimizer skeleton, RNG
    skeleton, train config, ``extra``).
    """
    from safetensors.torch import save_file

    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step: expected an int >= 0, got {step!r}")
    tensors: dict[str, torch.Tensor] = {}
    opt_skel = _flatten(optimizer.state_dict(), "optimizer", tensors)
    rng_skel = _flatten(_rng_state(), "rng", tensors)
    state = {
        "format": "f2l.train_checkpoint",
        "version": 1,
        "step": step,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "optimizer": opt_skel,
        "rng": rng_skel,
        "config": config.to_dict() if config is not None else None,
        "extra": extra or {},
    }

    def write(d: str) -> None:
        hypernet.save_pretrained(os.path.join(d, "hypernet"))
        save_file(tensors, os.path.join(d, "optimizer.safetensors"))
        with open(os.path.join(d, "trainer_state.json"), "w") as f:
            json.dump(state, f)

    _atomic_dir(path, write)
    return path


def load_checkpoint(path: str, *, hypernet: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler=None, restore_rng: bool = True) -> dict:
    """Restore what :func:`save_checkpoint` wrote; returns the trainer state dict (``step``, ...)."""
    from safetensors.torch import load_file

    if not isinstance(path, str) or not os.path.isdir(path):
        raise FileNotFoundError(f"path: checkpoint directory {path!r} does not exist")
    sfile = os.path.join(path, "trainer_state.json")
    if not os.path.isfile(sfile):
        raise ValueError(f"path: {path!r} is not an f2l training checkpoint (no trainer_state.json)")
    with open(sfile) as f:
        state = json.load(f)
    if state.get("format") != "f2l.train_checkpoint":
        raise ValueError(f"path: {sfile!r} has format {state.get('format')!r}, expected 'f2l.train_checkpoint'")
    sd = load_file(os.path.join(path, "hypernet", "model.safetensors"))
    own = hypernet.state_dict()
    if set(sd) != set(own):
        raise ValueError(f"path: hypernetwork weights do not match the model (missing "
                         f"{sorted(set(own) - set(sd))[:5]}, unexpected {sorted(set(sd) - set(own))[:5]})")
    from f2l.checks import check_finite

    for k, v in own.items():
        if sd[k].shape != v.shape:
            raise ValueError(f"path: hypernetwork weight {k!r} has shape {list(sd[k].shape)}, expected {list(v.shape)}")
        check_finite(f"path: {path!r}: hypernetwork weight {k!r}", sd[k])
    hypernet.load_state_dict(sd)
    tensors = load_file(os.path.join(path, "optimizer.safetensors"))
    if optimizer is not None:
        osd = _unflatten(state["optimizer"], tensors)
        optimizer.load_state_dict(osd)
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        _set_rng_state(_unflatten(state["rng"], tensors))
    return state


def latest_checkpoint(out_dir: str) -> str | None:
    """The checkpoint ``out_dir/checkpoints/latest.json`` points to, or None."""
    p = os.path.join(out_dir, CHECKPOINT_DIR, LATEST)
    if not os.path.isfile(p):
        return None
    try:
        with open(p, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"resume: {p!r} is damaged ({e}); pass the checkpoint directory to --resume") from None
    name = data.get("path") if isinstance(data, dict) else None
    full = os.path.join(out_dir, CHECKPOINT_DIR, os.path.basename(name)) if isinstance(name, str) and name else None
    return full if full and os.path.isdir(full) else None


def _checkpoint_step(name: str) -> int:
    """The step of a ``step-NNNNNNN`` checkpoint name (-1 for anything else): retention
    orders by this number, never by the name."""
    head, _, num = name.partition("step-")
    return int(num) if not head and num.isdigit() else -1


def _prune_checkpoints(ckdir: str, current: str, step: int, keep: int) -> None:
    """Keep ``current`` (what latest.json names) and the newest ``keep - 1`` others at or
    before ``step``; checkpoints past ``step`` belong to a future that a resume from an
    earlier checkpoint abandoned, as do its metric rows (which resume drops)."""
    names = [d for d in os.listdir(ckdir) if _checkpoint_step(d) >= 0 and os.path.isdir(os.path.join(ckdir, d))]
    older = sorted((d for d in names if d != current and _checkpoint_step(d) <= step), key=_checkpoint_step)
    stale = [d for d in names if d != current and _checkpoint_step(d) > step]
    drop = stale + (older[:max(0, len(older) - (keep - 1))] if keep else [])
    for d in drop:
        shutil.rmtree(os.path.join(ckdir, d), ignore_errors=True)


def _read_metrics(path: str) -> list[dict]:
    """Rows of ``metrics.jsonl``. A last line cut off by a kill is dropped (its step comes
    after the newest checkpoint, which is written only once the rows it covers are on disk);
    a damaged line elsewhere is an error naming the file and line."""
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    rows = []
    last = max((i for i, x in enumerate(lines) if x.strip()), default=-1)
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
            if not isinstance(row, dict) or isinstance(row.get("step"), bool) or not isinstance(row.get("step"), int):
                raise ValueError("expected an object with an int 'step'")
        except ValueError as e:
            if i == last:
                import warnings

                warnings.warn(f"{path}:{i + 1}: dropped a truncated metrics row (the run was killed while "
                              f"writing it; its step is redone)", stacklevel=3)
                continue
            raise ValueError(f"{path}:{i + 1}: damaged metrics row ({e}); remove or repair that line") from None
        rows.append(row)
    return rows


def _write_json_atomic(path: str, obj) -> None:
    from f2l.files import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def _append_metrics(path: str, rows: list[dict]) -> None:
    if not rows:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
        f.flush()
        os.fsync(f.fileno())
