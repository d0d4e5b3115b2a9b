"""``VideoStore``: the training videos by key, encoded by the frozen base on demand
(optionally cached), and the key format of a video's segments (:func:`segment_key`).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch
from tqdm.auto import tqdm

__all__ = ["VideoStore", "segment_key"]


def segment_key(key: str, j: int, k: int) -> str:
    return f"{key}#seg{j}of{k}"


def _parse_segment_key(key: str) -> tuple[str, int, int] | None:
    head, sep, tail = key.rpartition("#seg")
    if not sep or "of" not in tail:
        return None
    j, _, k = tail.partition("of")
    if not (j.isdigit() and k.isdigit()):
        return None
    return head, int(j), int(k)


class VideoStore:
    """Videos by key, encoded by the frozen base on demand (optionally cached).

    A key's video comes from :meth:`add` (frames, a :class:`f2l.video.Video`, or a path),
    from :meth:`add_encoded` (states computed elsewhere), or from ``resolver(key)``. Keys
    of the form ``"<key>#seg<j>of<k>"`` are segment ``j`` of ``k`` near-equal contiguous
    segments of ``<key>``'s sampled frames, keeping their original timestamps.

    With ``cache=True`` each video is encoded *alone* the first time it is needed, so its
    states never depend on which other videos shared a batch (exact resume needs that);
    without it, a step's videos are encoded together and dropped afterwards.
    """

    def __init__(self, model, *, cache: bool = False, instruction: str | None = None,
                 max_frames: int | None = None, resolver: Callable[[str], Any] | None = None):
        self.model = model
        self.base = model.base
        self.cache = bool(cache)
        mcfg = getattr(model, "config", None)
        # Same frame sampling and instruction as Frames2LoRA.encode/internalize, so that the
        # adapters a trained model makes at inference see the states it trained on.
        self.instruction = instruction or getattr(mcfg, "instruction", None)
        self.max_frames = max_frames or getattr(mcfg, "max_frames", None) or self.base.max_frames
        self.fps = float(getattr(mcfg, "fps", None) or self.base.fps)
        from f2l.config import DEFAULT_LONGEST_EDGE

        # the frames' intermediate resize, as internalize does it (F2LConfig.longest_edge)
        self.longest_edge = int(getattr(mcfg, "longest_edge", None) or DEFAULT_LONGEST_EDGE)
        self.resolver = resolver
        self._sources: dict[str, Any] = {}
        self._encoded: dict[str, tuple[torch.Tensor, int, int]] = {}  # key -> (states [L, T, H], frames, visual)

    def __len__(self) -> int:
        return len(set(self._sources) | set(self._encoded))

    def __contains__(self, key: str) -> bool:
        return key in self._sources or key in self._encoded

    def add(self, key: str, source) -> None:
        if not isinstance(key, str) or not key:
            raise TypeError(f"key: expected a non-empty str, got {key!r}")
        self._sources[key] = source
        self._encoded.pop(key, None)

    def add_encoded(self, key: str, states: torch.Tensor, *, num_frames: int, visual_tokens: int) -> None:
        if not isinstance(key, str) or not key:
            raise TypeError(f"key: expected a non-empty str, got {key!r}")
        L, H = self.base.num_layers, self.base.hidden_size
        if not isinstance(states, torch.Tensor) or states.dim() != 3 or states.shape[0] != L or states.shape[2] != H:
            got = list(states.shape) if isinstance(states, torch.Tensor) else type(states).__name__
            raise ValueError(f"states: expected [L={L}, T, H={H}], got {got}")
        self._encoded[key] = (states, int(num_frames), int(visual_tokens))

    def _video(self, key: str):
        from f2l.video import Video, load_video

        if key in self._sources:
            src = self._sources[key]
        else:
            seg = _parse_segment_key(key)
            if seg is not None:
                parent, j, k = seg
                v = self._load(parent)
                n = v.num_frames
                if k > n:
                    raise ValueError(f"key {key!r}: {k} segments requested but the video has {n} frames")
                lo, hi = (j * n) // k, ((j + 1) * n) // k
                return Video(pixel_values=v.pixel_values[lo:hi], timestamps=list(v.timestamps[lo:hi]),
                             duration=v.duration, source=f"{v.source}#seg{j}of{k}",
                             indices=list(v.indices[lo:hi]) if v.indices else [])
            if self.resolver is None:
                raise KeyError(f"key: unknown video {key!r} (not added and no resolver)")
            src = self.resolver(key)
        return load_video(src, image_size=self.base.image_size, max_frames=self.max_frames, fps=self.fps,
                          mean=self.base.image_mean, std=self.base.image_std, longest_edge=self.longest_edge)

    def _load(self, key: str):
        v = self._video(key)
        if self.cache and key in self._sources:
            self._sources[key] = v  # decoded and resized once
        return v

    def _encode_now(self, keys: Sequence[str]):
        from f2l.encode import encode_videos

        videos = [self._load(k) for k in keys]
        return encode_videos(self.base, videos, self.instruction, max_frames=self.max_frames, progress=False)

    @torch.no_grad()
    def precompute(self, keys: Iterable[str] | None = None, *, progress: bool = True) -> None:
        """Encode and cache ``keys`` (default: every added video), one video per pass."""
        keys = list(self._sources) if keys is None else list(keys)
        for k in tqdm(keys, desc="encode", unit="video", disable=not progress, leave=False):
            if k not in self._encoded:
                enc = self._encode_now([k])
                self._encoded[k] = (enc.states, enc.num_frames[0], enc.visual_tokens[0])

    @torch.no_grad()
    def encode(self, keys: Sequence[str]):
        """Packed :class:`f2l.encode.EncodedVideos` of ``keys``, in order."""
        from f2l.encode import EncodedVideos

        keys = list(keys)
        if not keys:
            raise ValueError("keys: expected at least one key, got none")
        missing = [k for k in dict.fromkeys(keys) if k not in self._encoded]
        if missing and not self.cache:
            enc = self._encode_now(missing)
            fresh = {k: (enc.video(i), enc.num_frames[i], enc.visual_tokens[i]) for i, k in enumerate(missing)}
        else:
            self.precompute(missing, progress=False)
            fresh = {}
        parts = [fresh[k] if k in fresh else self._encoded[k] for k in keys]
        dev = self.base.device
        states = torch.cat([p[0].to(dev) for p in parts], dim=1)
        cu = torch.zeros(len(parts) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor([p[0].shape[1] for p in parts]).cumsum(0)
        return EncodedVideos(states=states, cu_seqlens=cu.to(dev), num_frames=[p[1] for p in parts],
                             visual_tokens=[p[2] for p in parts], sources=list(keys))

    def visual_tokens(self, key: str) -> int:
        if key not in self._encoded:
            self.precompute([key], progress=False)
        return self._encoded[key][2]
