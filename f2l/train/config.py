"""``TrainConfig``: everything a training run needs besides the data on disk, and its
``f2l train`` options (:func:`add_train_arguments` adds one per field, :func:`config_from_args`
reads them back).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass

__all__ = ["TrainConfig", "PRECISIONS", "add_train_arguments", "config_from_args"]


PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class TrainConfig:
    """Everything a training run needs besides the data on disk.

    Data: ``manifest`` (JSONL, the authors' format; relative video paths resolve against
    ``data_root``, default the manifest's directory) rows with ``split`` are the examples.
    Without a manifest, ``synthetic`` > 0 trains on that many synthetic moving-shapes
    videos (single-segment questions; see :mod:`f2l.data.synthetic`).

    Steps: ``steps`` single-adapter steps, then ``compose_steps`` composition steps in
    which each example's video is split into 1..``max_segments`` non-overlapping
    segments whose adapters are composed in rank space. One optimizer and one schedule
    span both stages. A step consumes ``batch_size · grad_accum · world_size`` examples.
    """

    # model
    base: str = "tiny"
    hypernet: str | None = None  # an f2l hypernetwork directory to start from
    hypernet_preset: str | None = None  # "tiny" | "frames2lora"; None: the model's default
    # data
    manifest: str | None = None
    data_root: str | None = None
    confine_data_root: bool = False  # refuse manifest videos that resolve outside data_root
    split: str | None = "train"
    synthetic: int = 0
    instruction: str | None = None
    max_frames: int | None = None
    cache_encoded: bool = False
    # stages
    steps: int = 1000
    compose_steps: int = 0
    max_segments: int = 3
    # optimisation
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_ratio: float = 0.03
    warmup_steps: int | None = None
    min_lr_ratio: float = 0.0
    clip_grad_norm: float = 1.0
    kl_weight: float = 0.0
    kl_temperature: float = 1.0
    precision: str = "auto"
    backend: str | None = None
    # bookkeeping
    out_dir: str = "f2l_train_out"
    save_every: int = 0
    keep_checkpoints: int = 2
    log_every: int = 10
    resume: str | None = None  # a checkpoint dir, an out_dir, or "auto" (latest in out_dir)
    overwrite: bool = False  # a fresh run may replace an earlier run's outputs in out_dir
    seed: int = 0
    device: str | None = None
    progress: bool = True

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        def pos_int(name, lo=1):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name}: expected an int >= {lo}, got {v!r}")

        def num(name, lo=None, hi=None, lo_open=False):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name}: expected a finite number, got {v!r}")
            if lo is not None and (v <= lo if lo_open else v < lo):
                raise ValueError(f"{name}: expected {'>' if lo_open else '>='} {lo}, got {v!r}")
            if hi is not None and v > hi:
                raise ValueError(f"{name}: expected <= {hi}, got {v!r}")
            setattr(self, name, float(v))

        if not isinstance(self.base, str) or not self.base:
            raise TypeError(f"base: expected a preset name or checkpoint directory, got {self.base!r}")
        for name in ("hypernet", "hypernet_preset", "manifest", "data_root", "split", "instruction", "resume",
                     "device", "backend"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, str):
                raise TypeError(f"{name}: expected a str or None, got {type(v).__name__}")
        pos_int("synthetic", 0)
        pos_int("steps", 0)
        pos_int("compose_steps", 0)
        if self.steps + self.compose_steps < 1:
            raise ValueError(f"steps: expected steps + compose_steps >= 1, got {self.steps} + {self.compose_steps}")
        pos_int("max_segments")
        pos_int("batch_size")
        pos_int("grad_accum")
        pos_int("save_every", 0)
        pos_int("keep_checkpoints", 0)
        pos_int("log_every")
        pos_int("seed", 0)
        if self.max_frames is not None:
            pos_int("max_frames")
        if self.warmup_steps is not None:
            pos_int("warmup_steps", 0)
        num("lr", 0.0, lo_open=True)
        num("weight_decay", 0.0)
        num("eps", 0.0, lo_open=True)
        num("warmup_ratio", 0.0, 1.0)
        num("min_lr_ratio", 0.0, 1.0)
        num("clip_grad_norm", 0.0)
        num("kl_weight", 0.0)
        num("kl_temperature", 0.0, lo_open=True)
        betas = tuple(self.betas)
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas: expected two numbers in [0, 1), got {self.betas!r}")
        self.betas = (float(betas[0]), float(betas[1]))
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision: expected one of {PRECISIONS}, got {self.precision!r}")
        if not isinstance(self.out_dir, str) or not self.out_dir:
            raise TypeError(f"out_dir: expected a non-empty str, got {self.out_dir!r}")
        if not isinstance(self.overwrite, bool):
            raise TypeError(f"overwrite: expected a bool, got {type(self.overwrite).__name__}")

    @property
    def total_steps(self) -> int:
        return self.steps + self.compose_steps

    def warmup(self) -> int:
        if self.warmup_steps is not None:
            return min(self.warmup_steps, self.total_steps)
        return int(round(self.warmup_ratio * self.total_steps))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        if not isinstance(d, dict):
            raise TypeError(f"d: expected a dict, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"d: unknown TrainConfig keys {unknown}")
        d = dict(d)
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``f2l train`` options (one per :class:`TrainConfig` field) to ``parser``."""
    d = TrainConfig()
    g = parser.add_argument_group("model")
    g.add_argument("--base", default=d.base, help="base preset or SmolVLM2 checkpoint dir (default: %(default)s)")
    g.add_argument("--hypernet", default=None, help="f2l hypernetwork dir to start from")
    g.add_argument("--hypernet-preset", default=None, choices=("tiny", "frames2lora"),
                   help="hypernetwork architecture for a fresh start")
    g = parser.add_argument_group("data")
    g.add_argument("--manifest", default=None, help="JSONL manifest (id, video_path, prompt, target_text, ...)")
    g.add_argument("--data-root", default=None, help="root of relative video paths (default: the manifest's dir)")
    g.add_argument("--confine-to-data-root", dest="confine_data_root", action="store_true",
                   help="refuse rows whose video resolves outside the data root ('..', absolute paths, symlinks)")
    g.add_argument("--split", default=d.split, help="manifest split to train on (default: %(default)s)")
    g.add_argument("--synthetic", type=int, default=0, help="train on N synthetic videos instead of a manifest")
    g.add_argument("--instruction", default=None, help="internalization instruction")
    g.add_argument("--max-frames", type=int, default=None, help="frames per video (default: the base's)")
    g.add_argument("--cache-encoded", action="store_true", help="keep encoded videos in memory")
    g = parser.add_argument_group("schedule")
    g.add_argument("--steps", type=int, default=d.steps, help="single-adapter steps (default: %(default)s)")
    g.add_argument("--compose-steps", type=int, default=d.compose_steps, help="composition steps after them")
    g.add_argument("--max-segments", type=int, default=d.max_segments, help="segments per composed example")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="examples per micro-batch per rank")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per step")
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio)
    g.add_argument("--warmup-steps", type=int, default=None)
    g.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio)
    g.add_argument("--clip-grad-norm", type=float, default=d.clip_grad_norm)
    g.add_argument("--kl-weight", type=float, default=d.kl_weight, help="weight of KL to the in-context teacher")
    g.add_argument("--kl-temperature", type=float, default=d.kl_temperature)
    g.add_argument("--precision", default=d.precision, choices=PRECISIONS)
    g.add_argument("--backend", default=None, choices=("auto", "reference", "triton", "cuda"),
                   help="kernel backend (default: F2L_BACKEND or auto)")
    g = parser.add_argument_group("run")
    g.add_argument("--out", dest="out_dir", default=d.out_dir, help="output dir (default: %(default)s)")
    g.add_argument("--save-every", type=int, default=d.save_every)
    g.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints)
    g.add_argument("--log-every", type=int, default=d.log_every)
    g.add_argument("--resume", default=None, help="checkpoint dir, out dir, or 'auto'")
    g.add_argument("--overwrite", action="store_true",
                   help="replace an earlier run's checkpoints, metrics and hypernet in --out (default: refuse)")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--device", default=None)
    g.add_argument("--no-progress", dest="progress", action="store_false")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` of parsed ``f2l train`` arguments."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    kw = {k: v for k, v in vars(args).items() if k in names}
    return TrainConfig(**kw)
