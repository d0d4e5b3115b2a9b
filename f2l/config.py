"""``F2LConfig``: everything besides weights that a Frames2LoRA checkpoint needs --
which base it was trained on, the hypernetwork's architecture, how frames are sampled,
and the internalization instruction.

The atomic file helpers and ``OutputLock`` live in :mod:`f2l.files`, the input guards in
:mod:`f2l.checks`; they are re-exported here because ``f2l.config`` was their path (and
:mod:`f2l.demo`, :mod:`f2l.eval` and :mod:`f2l.data.pretrain_tiny` import them from here).
New code imports them from their home.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from f2l.checks import check_device, check_finite  # noqa: F401  (re-export: the old path)
from f2l.files import (  # noqa: F401  (re-export: the old path)
    OutputBusyError,
    OutputLock,
    atomic_dir,
    atomic_save_safetensors,
    atomic_write_bytes,
    atomic_write_text,
    clean_stale_temps,
)

DEFAULT_INSTRUCTION = "Internalize this video for later captioning."
DEFAULT_LONGEST_EDGE = 384  # frames' intermediate longest edge, the authors' setting (f2l.video uses it)
CONFIG_VERSION = 1


@dataclass
class F2LConfig:
    """Top-level configuration of a :class:`f2l.Frames2LoRA`.

    base: preset name or checkpoint directory of the frozen VLM.
    hypernet: ``HypernetConfig`` of the hypernetwork (None until a model is built).
    target_modules: decoder-layer linears that receive the predicted LoRA.
    max_frames / fps: frame sampling (SmolVLM2's rule: ``min(round(fps·duration), max_frames)``).
    longest_edge: the SmolVLM processor's intermediate resize of every frame (PIL Lanczos to
      this longest edge, aspect kept, before the tower's square); the authors' 384 for every
      model size (``processor.video_size = {"longest_edge": 384}``), capped at the tower's square.
      Recorded in every adapter's metadata. See ``docs/preprocessing.md``.
    instruction: the text after the frames in the encoding prompt.
    base_fingerprint: :func:`f2l.presets.fingerprint` of the base the hypernet was trained on.
    chunk_videos / chunk_frames: memory bounds of the frozen encoding pass.
    """

    base: str = "tiny"
    hypernet: Any = None
    target_modules: tuple[str, ...] = ("down_proj",)
    max_frames: int = 12
    fps: float = 1.0
    longest_edge: int = DEFAULT_LONGEST_EDGE
    instruction: str = DEFAULT_INSTRUCTION
    base_fingerprint: str = ""
    chunk_videos: int | None = None
    chunk_frames: int = 64
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.base, str) or not self.base:
            raise TypeError(f"base: expected a non-empty str, got {self.base!r}")
        if isinstance(self.target_modules, str):
            self.target_modules = (self.target_modules,)
        self.target_modules = tuple(self.target_modules)
        if not self.target_modules or not all(isinstance(m, str) and m for m in self.target_modules):
            raise ValueError(f"target_modules: expected a non-empty tuple of module names, got {self.target_modules!r}")
        if isinstance(self.max_frames, bool) or not isinstance(self.max_frames, int) or self.max_frames < 1:
            raise ValueError(f"max_frames: expected an int >= 1, got {self.max_frames!r}")
        if isinstance(self.fps, bool) or not isinstance(self.fps, (int, float)) or not self.fps > 0:
            raise ValueError(f"fps: expected a number > 0, got {self.fps!r}")
        self.fps = float(self.fps)
        if isinstance(self.longest_edge, bool) or not isinstance(self.longest_edge, int) or self.longest_edge < 1:
            raise ValueError(f"longest_edge: expected an int >= 1 (the frames' intermediate longest edge), "
                             f"got {self.longest_edge!r}")
        if not isinstance(self.instruction, str):
            raise TypeError(f"instruction: expected a str, got {type(self.instruction).__name__}")
        if self.chunk_videos is not None and (not isinstance(self.chunk_videos, int) or self.chunk_videos < 1):
            raise ValueError(f"chunk_videos: expected None or an int >= 1, got {self.chunk_videos!r}")
        if not isinstance(self.chunk_frames, int) or self.chunk_frames < 1:
            raise ValueError(f"chunk_frames: expected an int >= 1, got {self.chunk_frames!r}")

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["target_modules"] = list(self.target_modules)
        hn = self.hypernet
        out["hypernet"] = hn.to_dict() if hasattr(hn, "to_dict") else hn
        out["version"] = CONFIG_VERSION
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "F2LConfig":
        if not isinstance(data, dict):
            raise TypeError(f"data: expected a dict, got {type(data).__name__}")
        data = dict(data)
        version = data.pop("version", CONFIG_VERSION)
        if version != CONFIG_VERSION:
            raise ValueError(f"data: config version {version} is not supported (expected {CONFIG_VERSION})")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"data: unknown F2LConfig keys {unknown}; expected a subset of {sorted(known)}")
        hn = data.get("hypernet")
        if isinstance(hn, dict):
            from f2l.hypernet import HypernetConfig

            data["hypernet"] = HypernetConfig.from_dict(hn)
        if "target_modules" in data:
            data["target_modules"] = tuple(data["target_modules"])
        return cls(**data)

    def save(self, path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path) -> "F2LConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"path: no F2L config at {str(path)!r}")
        with open(path) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"path: {str(path)!r} is not valid JSON ({e})") from None
        return cls.from_dict(data)
