"""Where a training step's examples come from: :class:`Example`, the seeded endless
:class:`ShuffledSource`, the composition :class:`SegmentSource` built on it, and the
:class:`Stage` that runs a source for a number of steps.

Every source's ``global_batch(step, n)`` is a pure function of its seed and the step,
which is what lets a resumed run see exactly the examples of the uninterrupted one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from f2l.train.store import segment_key

__all__ = ["Example", "ShuffledSource", "SegmentSource", "Stage"]


@dataclass(frozen=True)
class Example:
    """One training example.

    ``videos``: keys of a :class:`VideoStore`. One key: a single adapter. Several keys: the
    non-overlapping segments of one video, whose adapters are composed in rank space.
    """

    videos: tuple[str, ...]
    prompt: str
    target: str

    def __post_init__(self):
        if isinstance(self.videos, str) or not isinstance(self.videos, tuple) or not self.videos:
            raise TypeError(f"videos: expected a non-empty tuple of keys, got {self.videos!r}")
        if not isinstance(self.prompt, str) or not isinstance(self.target, str):
            raise TypeError("prompt, target: expected str")


class ShuffledSource:
    """Epochs of a fixed example list, each in a fresh seeded permutation.

    ``global_batch(step, n)`` is a pure function of ``(seed, step, n)``: the examples of
    global positions ``step·n .. step·n + n - 1`` of the endless shuffled stream -- which is
    what makes resuming exact without saving any iterator state.
    """

    def __init__(self, examples: Sequence[Example], *, seed: int = 0):
        examples = list(examples)
        if not examples:
            raise ValueError("examples: expected at least one example, got none")
        if not all(isinstance(e, Example) for e in examples):
            raise TypeError("examples: expected a sequence of Example")
        self.examples = examples
        self.seed = int(seed)
        self._perm_epoch, self._perm = -1, None

    def __len__(self) -> int:
        return len(self.examples)

    def _permutation(self, epoch: int) -> list[int]:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(len(self.examples), generator=g).tolist()
            self._perm_epoch = epoch
        return self._perm

    def global_batch(self, step: int, n: int) -> list[Example]:
        out = []
        for g in range(step * n, step * n + n):
            epoch, pos = divmod(g, len(self.examples))
            out.append(self.examples[self._permutation(epoch)[pos]])
        return out


class SegmentSource:
    """Composition examples from whole-video examples.

    Each drawn example's (single) video is split into ``k`` non-overlapping, contiguous,
    near-equal segments, ``k`` uniform in ``[1, max_segments]``; the example then names the
    ``k`` segment keys (``"<key>#seg<j>of<k>"``, which :class:`VideoStore` resolves) and keeps
    its question about the whole video. Deterministic in ``(seed, step)``.
    """

    def __init__(self, base: ShuffledSource, *, max_segments: int = 3, seed: int = 0):
        if not isinstance(base, ShuffledSource):
            raise TypeError(f"base: expected a ShuffledSource, got {type(base).__name__}")
        if isinstance(max_segments, bool) or not isinstance(max_segments, int) or max_segments < 1:
            raise ValueError(f"max_segments: expected an int >= 1, got {max_segments!r}")
        self.base, self.max_segments, self.seed = base, max_segments, int(seed)

    def global_batch(self, step: int, n: int) -> list[Example]:
        rng = np.random.default_rng([self.seed, 0x5E6, step])
        out = []
        for ex in self.base.global_batch(step, n):
            if len(ex.videos) != 1:
                raise ValueError(f"SegmentSource: example {ex.prompt!r} already names {len(ex.videos)} videos")
            k = int(rng.integers(1, self.max_segments + 1))
            keys = (ex.videos[0],) if k == 1 else tuple(segment_key(ex.videos[0], j, k) for j in range(k))
            out.append(Example(keys, ex.prompt, ex.target))
        return out


@dataclass
class Stage:
    """``steps`` steps drawing examples from ``source`` (anything with ``global_batch(step, n)``)."""

    name: str
    steps: int
    source: Any
