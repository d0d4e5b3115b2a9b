"""f2l: Frames2LoRA -- videos to LoRA adapters for a frozen SmolVLM2.

    from f2l import Frames2LoRA, load_video
    m = Frames2LoRA.from_pretrained("tiny", preset="tiny")
    adapters = m.internalize(["clip.mp4"])
    print(m.answer(adapters, ["What is moving?"]))

Submodules are imported on first use, so ``import f2l`` stays cheap (no transformers).
"""
from __future__ import annotations

import importlib

__all__ = ["Frames2LoRA", "VideoAdapter", "F2LConfig", "load_video", "apply_f2l", "load_base", "encode_videos",
           "EncodedVideos", "HypernetConfig", "Frames2LoRAHypernet", "AdapterPool"]

_LAZY = {
    "Frames2LoRA": "f2l.model",
    "VideoAdapter": "f2l.adapter",
    "F2LConfig": "f2l.config",
    "load_video": "f2l.video",
    "apply_f2l": "f2l.layers",
    "AdapterPool": "f2l.layers",
    "load_base": "f2l.presets",
    "encode_videos": "f2l.encode",
    "EncodedVideos": "f2l.encode",
    "HypernetConfig": "f2l.config",
    "Frames2LoRAHypernet": "f2l.hypernet",
}


def __getattr__(name: str):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'f2l' has no attribute {name!r}")
    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
