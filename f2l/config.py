"""The configurations of a Frames2LoRA checkpoint, as plain data (no torch).

- :class:`HypernetConfig`: the sizes of the hypernetwork (:class:`f2l.hypernet.Frames2LoRAHypernet`
  is built from one; ``f2l.hypernet`` re-exports it, its public path).
- :class:`F2LConfig`: everything besides weights that a checkpoint needs -- which base it
  was trained on, the hypernetwork's architecture, how frames are sampled, and the
  internalization instruction.

Both sit below every module that reads or writes them (the hypernetwork, the model, the
converter, training), so each of those imports them and none imports another to get them.

The atomic file helpers and ``OutputLock`` live in :mod:`f2l.files`, the input guards in
:mod:`f2l.checks`; they are re-exported here because ``f2l.config`` was their path (and
:mod:`f2l.demo`, :mod:`f2l.eval` and :mod:`f2l.data.pretrain_tiny` import them from here).
New code imports them from their home.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from f2l.checks import check_device, check_finite
from f2l.files import (
    OutputBusyError,
    OutputLock,
    atomic_dir,
    atomic_save_safetensors,
    atomic_write_bytes,
    atomic_write_text,
    clean_stale_temps,
)

__all__ = ["F2LConfig", "HypernetConfig", "default_lora_alpha", "HYPERNET_PRESETS", "DEFAULT_INSTRUCTION",
           "DEFAULT_LONGEST_EDGE",
           # re-exported from f2l.files / f2l.checks (their old path)
           "atomic_write_bytes", "atomic_write_text", "atomic_save_safetensors", "atomic_dir", "clean_stale_temps",
           "OutputLock", "OutputBusyError", "check_finite", "check_device"]

DEFAULT_INSTRUCTION = "Internalize this video for later captioning."
DEFAULT_LONGEST_EDGE = 384  # frames' intermediate longest edge, the authors' setting (f2l.video uses it)
CONFIG_VERSION = 1
HYPERNET_PRESETS = ("frames2lora", "tiny")


def default_lora_alpha(rank: int) -> float:
    """The official scale: ``2 * r**1.5``, multiplying the delta directly."""
    return 2.0 * float(rank) ** 1.5


# --------------------------------------------------------------------------- HypernetConfig


@dataclass
class HypernetConfig:
    """Sizes of a :class:`f2l.hypernet.Frames2LoRAHypernet`.

    ``target_modules`` maps a module name of the base model's decoder layers (a short
    name such as ``"down_proj"``) to its ``(d_in, d_out)``. ``rank`` is the number of
    context-dependent ranks per adapter, ``bias_rank`` the number of context-free ranks
    appended after them (0 disables bias LoRA). ``lora_alpha=None`` means ``2*rank**1.5``.
    """

    num_layers: int
    hidden_size: int
    target_modules: dict[str, tuple[int, int]]
    rank: int = 16
    latent_dim: int = 512
    num_latents: int = 8
    num_blocks: int = 9
    num_heads: int = 16
    head_dim: int = 128
    num_kv_heads: int = 4
    ff_mult: int = 4
    proj_mult: int = 4
    bias_rank: int = 0
    lora_alpha: float | None = None
    num_pre_head_layers: int = 1
    pre_head_mult: int = 4
    rms_norm_eps: float = 1e-6
    layer_norm_eps: float = 1e-5
    init_std: float = 0.02
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.target_modules, Mapping) or not self.target_modules:
            raise ValueError(
                f"target_modules: expected a non-empty dict name -> (d_in, d_out), got {self.target_modules!r}"
            )
        tm = {}
        for name, shape in self.target_modules.items():
            if not isinstance(name, str) or not name.isidentifier():
                raise ValueError(
                    f"target_modules: expected short module names such as 'down_proj' (no dots), got {name!r}"
                )
            if (
                not isinstance(shape, (tuple, list))
                or len(shape) != 2
                or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
            ):
                raise ValueError(
                    f"target_modules[{name!r}]: expected (d_in, d_out) positive ints, got {shape!r}"
                )
            tm[name] = (int(shape[0]), int(shape[1]))
        self.target_modules = {k: tm[k] for k in sorted(tm)}
        for name in ("num_layers", "hidden_size", "rank", "latent_dim", "num_latents", "num_blocks",
                     "num_heads", "head_dim", "num_kv_heads", "ff_mult", "proj_mult", "pre_head_mult"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        for name in ("bias_rank", "num_pre_head_layers"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name}: expected a non-negative int, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_kv_heads: expected a divisor of num_heads={self.num_heads}, got {self.num_kv_heads}"
            )
        if self.lora_alpha is not None:
            if not isinstance(self.lora_alpha, (int, float)) or isinstance(self.lora_alpha, bool) \
                    or not math.isfinite(self.lora_alpha):
                raise ValueError(f"lora_alpha: expected a finite float or None, got {self.lora_alpha!r}")
            self.lora_alpha = float(self.lora_alpha)
        for name in ("rms_norm_eps", "layer_norm_eps", "init_std"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
                raise ValueError(f"{name}: expected a positive float, got {v!r}")
        if not isinstance(self.extra, dict):
            raise TypeError(f"extra: expected a dict, got {type(self.extra).__name__}")

    # derived sizes
    @property
    def scale(self) -> float:
        """Multiplier of the LoRA delta (``lora_alpha``, default ``2*rank**1.5``)."""
        return default_lora_alpha(self.rank) if self.lora_alpha is None else self.lora_alpha

    @property
    def module_names(self) -> tuple[str, ...]:
        return tuple(self.target_modules)

    @property
    def num_modules(self) -> int:
        return len(self.target_modules)

    @property
    def total_rank(self) -> int:
        return self.rank + self.bias_rank

    @property
    def d_lora(self) -> int:
        return max(a + b for a, b in self.target_modules.values())

    # serialisation
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["target_modules"] = {k: list(v) for k, v in self.target_modules.items()}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "HypernetConfig":
        if not isinstance(d, Mapping):
            raise TypeError(f"d: expected a dict, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"d: unknown HypernetConfig fields {unknown}; known fields are {sorted(known)}")
        kw = dict(d)
        if "target_modules" in kw and isinstance(kw["target_modules"], Mapping):
            kw["target_modules"] = {k: tuple(v) for k, v in kw["target_modules"].items()}
        return cls(**kw)

    # presets
    @staticmethod
    def _base_sizes(base, num_layers, hidden_size, target_modules, default_targets=("down_proj",)):
        if base is not None:
            for attr in ("num_layers", "hidden_size", "module_shapes"):
                if not hasattr(base, attr):
                    raise TypeError(
                        f"base: expected a BaseVLM-like object with .{attr}, got {type(base).__name__}"
                    )
            num_layers = base.num_layers if num_layers is None else num_layers
            hidden_size = base.hidden_size if hidden_size is None else hidden_size
            if target_modules is None or not isinstance(target_modules, Mapping):
                names = tuple(target_modules) if target_modules is not None else default_targets
                target_modules = dict(base.module_shapes(names))
        if num_layers is None or hidden_size is None or target_modules is None:
            raise ValueError(
                "base: pass a BaseVLM-like object, or all of num_layers, hidden_size and "
                "target_modules={name: (d_in, d_out)}"
            )
        return num_layers, hidden_size, target_modules

    @classmethod
    def frames2lora(cls, base=None, *, num_layers=None, hidden_size=None, target_modules=None,
                    **overrides) -> "HypernetConfig":
        """The official architecture: latent 512, 8 latents, 9 blocks, 16x128 heads with 4 KV
        heads, SwiGLU 4x, one pre-head block, ``down_proj`` only, r = 16 plus 16 bias ranks
        (the official checkpoints carry bias LoRA), ``lora_alpha = 2*r**1.5``."""
        L, H, tm = cls._base_sizes(base, num_layers, hidden_size, target_modules)
        kw: dict[str, Any] = dict(
            num_layers=L, hidden_size=H, target_modules=tm, rank=16, latent_dim=512, num_latents=8,
            num_blocks=9, num_heads=16, head_dim=128, num_kv_heads=4, ff_mult=4, proj_mult=4,
            num_pre_head_layers=1, pre_head_mult=4,
        )
        kw.update(overrides)
        kw.setdefault("bias_rank", kw["rank"])
        return cls(**kw)

    @classmethod
    def tiny(cls, base=None, *, num_layers=None, hidden_size=None, target_modules=None,
             **overrides) -> "HypernetConfig":
        """A small hypernetwork for CPU tests and demos (same architecture, small sizes)."""
        L, H, tm = cls._base_sizes(base, num_layers, hidden_size, target_modules)
        kw: dict[str, Any] = dict(
            num_layers=L, hidden_size=H, target_modules=tm, rank=4, latent_dim=32, num_latents=4,
            num_blocks=2, num_heads=4, head_dim=8, num_kv_heads=2, ff_mult=2, proj_mult=2,
            bias_rank=2, num_pre_head_layers=1, pre_head_mult=2,
        )
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def from_preset(cls, name: str, base=None, **kwargs) -> "HypernetConfig":
        if name not in HYPERNET_PRESETS:
            raise ValueError(f"name: expected one of {HYPERNET_PRESETS}, got {name!r}")
        return getattr(cls, name)(base, **kwargs)


# --------------------------------------------------------------------------- F2LConfig


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
