"""Synthetic moving-shapes videos with questions and single-word answers.

A video is a sequence of *segments*. Each segment shows ``count`` copies of one shape
in one colour, all moving in one direction across a plain background. Every attribute
is drawn from a small closed vocabulary, so each question has a known set of answer
classes and a known chance level. Everything is a pure function of the seed: the same
seed gives the same frames, byte for byte, on every machine (numpy's PCG64 stream and
integer rasterisation, no anti-aliasing, no font rendering).

Questions about a one-segment video ask for its colour, shape, direction or count.
Questions about a multi-segment video name a segment by its shape (segments of one
video always have distinct shapes) and ask for that segment's colour, direction or
count; they also ask which shape appears first or last. The shape-keyed questions do
not depend on segment order, so they are answerable from segment adapters composed in
rank space (a sum, which is order-free); the order questions need timing information
and are there for models that get it (e.g. from per-segment timestamps).

Example::

    >>> vid = make_video(seed=3, num_segments=2, frames_per_segment=4, size=32)
    >>> vid.frames.shape
    torch.Size([8, 32, 32, 3])
    >>> [(qa.question, qa.answer) for qa in vid.questions()][:1]   # doctest: +SKIP
    [('What colour is the circle?', 'red')]
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

import numpy as np
import torch

__all__ = [
    "COLOURS",
    "SHAPES",
    "DIRECTIONS",
    "COUNTS",
    "QUESTION_KINDS",
    "SINGLE_KINDS",
    "COMPOSED_KINDS",
    "SegmentSpec",
    "QA",
    "SyntheticVideo",
    "sample_segment",
    "render_segment",
    "seeing_radius",
    "make_video",
    "make_videos",
    "answer_choices",
    "write_video",
    "write_synthetic_dataset",
]

# RGB values far apart in every channel so that a randomly initialised vision tower still
# separates them; the background is a dark grey none of them is close to.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 200, 60),
    "blue": (40, 70, 235),
    "yellow": (240, 220, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
COUNTS: tuple[str, ...] = ("one", "two", "three")
BACKGROUND = (24, 24, 24)

_ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth")

# kind -> (answer vocabulary, needs a multi-segment video)
_KIND_VOCAB: dict[str, tuple[tuple[str, ...], bool]] = {
    "colour": (tuple(COLOURS), False),
    "shape": (SHAPES, False),
    "direction": (DIRECTIONS, False),
    "count": (COUNTS, False),
    "colour_of": (tuple(COLOURS), True),
    "direction_of": (DIRECTIONS, True),
    "count_of": (COUNTS, True),
    "first_shape": (SHAPES, True),
    "last_shape": (SHAPES, True),
    "colour_at": (tuple(COLOURS), True),
    "has_colour": (("yes", "no"), None),  # None: asked of one-segment and composed videos
}
QUESTION_KINDS: tuple[str, ...] = tuple(_KIND_VOCAB)
SINGLE_KINDS: tuple[str, ...] = tuple(k for k, (_, multi) in _KIND_VOCAB.items() if multi is False)
# Order-free questions about one named segment of a composed video.
COMPOSED_KINDS: tuple[str, ...] = ("colour_of", "direction_of", "count_of")


def answer_choices(kind: str) -> tuple[str, ...]:
    """The closed answer vocabulary of a question kind (chance = 1 / its length)."""
    if kind not in _KIND_VOCAB:
        raise ValueError(f"kind: expected one of {QUESTION_KINDS}, got {kind!r}")
    return _KIND_VOCAB[kind][0]


@dataclass(frozen=True)
class SegmentSpec:
    """What one segment shows: ``count`` copies of a ``colour`` ``shape`` moving ``direction``."""

    colour: str
    shape: str
    direction: str
    count: int

    def __post_init__(self):
        if self.colour not in COLOURS:
            raise ValueError(f"colour: expected one of {tuple(COLOURS)}, got {self.colour!r}")
        if self.shape not in SHAPES:
            raise ValueError(f"shape: expected one of {SHAPES}, got {self.shape!r}")
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction: expected one of {DIRECTIONS}, got {self.direction!r}")
        if not isinstance(self.count, int) or not 1 <= self.count <= len(COUNTS):
            raise ValueError(f"count: expected an int in [1, {len(COUNTS)}], got {self.count!r}")

    @property
    def count_word(self) -> str:
        return COUNTS[self.count - 1]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SegmentSpec":
        if not isinstance(d, dict):
            raise TypeError(f"d: expected a dict, got {type(d).__name__}")
        return cls(colour=d["colour"], shape=d["shape"], direction=d["direction"], count=int(d["count"]))


@dataclass(frozen=True)
class QA:
    """One question with its single-word answer and the closed set it is drawn from."""

    question: str
    answer: str
    kind: str
    choices: tuple[str, ...]
    segment: int | None = None  # the segment the answer comes from, when it is one segment

    @property
    def chance(self) -> float:
        return 1.0 / len(self.choices)


@dataclass
class SyntheticVideo:
    """Frames ``uint8 [F, H, W, 3]`` plus the segment specs they were rendered from."""

    id: str
    frames: torch.Tensor
    segments: list[SegmentSpec]
    frames_per_segment: int
    seed: int
    fps: float = 1.0
    metadata: dict = field(default_factory=dict)

    @property
    def num_segments(self) -> int:
        return len(self.segments)

    def segment_frames(self, k: int) -> torch.Tensor:
        """Frames of segment ``k`` (non-overlapping, in order)."""
        if not isinstance(k, int) or not 0 <= k < self.num_segments:
            raise ValueError(f"k: expected a segment index in [0, {self.num_segments}), got {k!r}")
        f = self.frames_per_segment
        return self.frames[k * f:(k + 1) * f]

    def questions(self, kinds: Sequence[str] | None = None) -> list[QA]:
        """Every question of the requested kinds that this video can answer.

        ``kinds`` defaults to the single-segment kinds for a one-segment video and to the
        order-free composed kinds otherwise. Kinds that do not apply (a multi-segment kind on
        a one-segment video, or the reverse) are skipped.
        """
        if kinds is None:
            kinds = SINGLE_KINDS if self.num_segments == 1 else COMPOSED_KINDS
        if isinstance(kinds, str):
            raise TypeError("kinds: expected a sequence of kind names, got a str (wrap it in a list)")
        for k in kinds:
            answer_choices(k)  # validates
        out: list[QA] = []
        segs = self.segments
        single = self.num_segments == 1
        for kind in kinds:
            choices = answer_choices(kind)
            multi = _KIND_VOCAB[kind][1]
            if multi is not None and multi == single:
                continue
            if kind == "colour":
                out.append(QA("What colour is the shape?", segs[0].colour, kind, choices, 0))
            elif kind == "shape":
                out.append(QA("What shape is it?", segs[0].shape, kind, choices, 0))
            elif kind == "direction":
                out.append(QA("Which way does it move?", segs[0].direction, kind, choices, 0))
            elif kind == "count":
                out.append(QA("How many shapes are there?", segs[0].count_word, kind, choices, 0))
            elif kind == "colour_of":
                out += [QA(f"What colour is the {s.shape}?", s.colour, kind, choices, i) for i, s in enumerate(segs)]
            elif kind == "direction_of":
                out += [QA(f"Which way does the {s.shape} move?", s.direction, kind, choices, i)
                        for i, s in enumerate(segs)]
            elif kind == "count_of":
                out += [QA(f"How many {s.shape}s are there?", s.count_word, kind, choices, i)
                        for i, s in enumerate(segs)]
            elif kind == "first_shape":
                out.append(QA("Which shape appears first?", segs[0].shape, kind, choices, 0))
            elif kind == "last_shape":
                out.append(QA("Which shape appears last?", segs[-1].shape, kind, choices, len(segs) - 1))
            elif kind == "has_colour":
                # Presence is a union over segments: each segment's adapter can answer for
                # itself, so composed adapters answer for the whole video.
                # As many absent colours as present ones (the next ones round the palette),
                # so that "yes" and "no" are equally likely and the prior cannot score.
                names = list(COLOURS)
                present = [c for c in names if any(sg.colour == c for sg in segs)]
                start = names.index(present[0])
                absent = [names[(start + j) % len(names)] for j in range(1, len(names))
                          if names[(start + j) % len(names)] not in present][:len(present)]
                for c in present:
                    hit = next(i for i, sg in enumerate(segs) if sg.colour == c)
                    out.append(QA(f"Is there a {c} shape?", "yes", kind, choices, hit))
                out += [QA(f"Is there a {c} shape?", "no", kind, choices, None) for c in absent]
            elif kind == "colour_at":
                out += [QA(f"What colour is the shape in the {_ORDINALS[i]} part?", s.colour, kind, choices, i)
                        for i, s in enumerate(segs)]
        return out

    def to_metadata(self) -> dict:
        return {
            "seed": self.seed,
            "frames_per_segment": self.frames_per_segment,
            "segments": [s.to_dict() for s in self.segments],
            **self.metadata,
        }


def _check_int(name: str, value, lo: int, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < lo or (hi is not None and value > hi):
        rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name}: expected {rng}, got {value}")


def sample_segment(rng: np.random.Generator, *, exclude_shapes: Iterable[str] = ()) -> SegmentSpec:
    """Draw one segment spec uniformly, with a shape not in ``exclude_shapes``."""
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng: expected a numpy.random.Generator, got {type(rng).__name__}")
    shapes = [s for s in SHAPES if s not in set(exclude_shapes)]
    if not shapes:
        raise ValueError(f"exclude_shapes: excludes every shape {SHAPES}")
    colour = tuple(COLOURS)[rng.integers(len(COLOURS))]
    shape = shapes[rng.integers(len(shapes))]
    direction = DIRECTIONS[rng.integers(len(DIRECTIONS))]
    count = int(rng.integers(1, len(COUNTS) + 1))
    return SegmentSpec(colour, shape, direction, count)


def _shape_mask(shape: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    dy, dx = yy - cy, xx - cx
    if shape == "circle":
        return dy * dy + dx * dx <= r * r
    if shape == "square":
        h = r * 0.85  # same visual area as the circle, roughly
        return (np.abs(dy) <= h) & (np.abs(dx) <= h)
    # upward triangle: apex at the top, base at the bottom, width grows linearly downwards
    t = (dy + r) / (2 * r)
    return (t >= 0) & (t <= 1) & (np.abs(dx) <= t * r * 1.1)


def seeing_radius(count: int) -> float:
    """Shape radius (fraction of the frame) for ``count`` copies on small frames.

    One copy is drawn large (its outline survives a coarse patch grid); two and three
    copies shrink so that side-by-side copies never touch (lanes are ``size/(count+1)``
    apart), which keeps every copy countable.
    """
    _check_int("count", count, 1, len(COUNTS))
    return {1: 0.2, 2: 0.15, 3: 0.11}[int(count)]


def render_segment(spec: SegmentSpec, num_frames: int, size: int, *, rng: np.random.Generator | None = None,
                   noise: int = 8, radius: float | None = None) -> np.ndarray:
    """Render one segment to ``uint8 [num_frames, size, size, 3]``.

    The shapes travel along ``spec.direction`` from one side of the frame to the other
    over the segment; copies sit side by side across the direction of travel. ``rng``
    jitters the start offset and adds mild pixel noise (``noise`` = max |delta| per
    channel, 0 disables) so that no two segments are pixel-identical. ``radius`` is the
    shapes' radius as a fraction of ``size`` (default 1/9); small frames read by a coarse
    patch grid need larger shapes for their outline to survive patching.
    """
    if not isinstance(spec, SegmentSpec):
        raise TypeError(f"spec: expected a SegmentSpec, got {type(spec).__name__}")
    _check_int("num_frames", num_frames, 1)
    _check_int("size", size, 8)
    _check_int("noise", noise, 0, 64)
    if radius is not None and not (isinstance(radius, (int, float)) and 0.0 < radius <= 0.5):
        raise ValueError(f"radius: expected a fraction of the frame in (0, 0.5], got {radius!r}")
    rng = rng if rng is not None else np.random.default_rng(0)
    r = size * radius if radius is not None else size / 9.0
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    # progress along the travel axis, from margin to far margin
    lo, hi = r * 1.2, size - r * 1.2
    jitter = float(rng.uniform(-0.5, 0.5)) * r
    # lanes across the travel axis for the copies, evenly spaced, jittered together
    lanes = [(i + 1) * size / (spec.count + 1) + jitter for i in range(spec.count)]
    frames = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    colour = np.array(COLOURS[spec.colour], dtype=np.int16)
    for f in range(num_frames):
        t = f / max(num_frames - 1, 1)
        along = lo + (hi - lo) * t
        if spec.direction in ("left", "up"):
            along = lo + hi - along
        img = np.empty((size, size, 3), dtype=np.int16)
        img[:] = BACKGROUND
        for lane in lanes:
            cy, cx = (lane, along) if spec.direction in ("left", "right") else (along, lane)
            img[_shape_mask(spec.shape, yy, xx, cy, cx, r)] = colour
        if noise:
            img += rng.integers(-noise, noise + 1, size=img.shape, dtype=np.int16)
        frames[f] = np.clip(img, 0, 255).astype(np.uint8)
    return frames


def make_video(seed: int, *, num_segments: int = 1, frames_per_segment: int = 4, size: int = 32,
               segments: Sequence[SegmentSpec] | None = None, noise: int = 8, fps: float = 1.0,
               video_id: str | None = None) -> SyntheticVideo:
    """One synthetic video, a pure function of its arguments.

    ``segments`` fixes the specs (their shapes must be distinct); otherwise they are drawn
    from ``seed`` with distinct shapes, so ``num_segments <= len(SHAPES)``.
    """
    _check_int("seed", seed, 0)
    _check_int("frames_per_segment", frames_per_segment, 1)
    _check_int("size", size, 8)
    if not isinstance(fps, (int, float)) or fps <= 0:
        raise ValueError(f"fps: expected a positive number, got {fps!r}")
    rng = np.random.default_rng([int(seed), 0x5EED])
    if segments is None:
        _check_int("num_segments", num_segments, 1, len(SHAPES))
        specs: list[SegmentSpec] = []
        for _ in range(num_segments):
            specs.append(sample_segment(rng, exclude_shapes=[s.shape for s in specs]))
    else:
        specs = list(segments)
        if not specs or not all(isinstance(s, SegmentSpec) for s in specs):
            raise TypeError("segments: expected a non-empty sequence of SegmentSpec")
        if len({s.shape for s in specs}) != len(specs):
            raise ValueError(f"segments: shapes must be distinct within a video, got {[s.shape for s in specs]}")
    parts = [render_segment(s, frames_per_segment, size, rng=rng, noise=noise) for s in specs]
    frames = torch.from_numpy(np.concatenate(parts, axis=0))
    return SyntheticVideo(
        id=video_id if video_id is not None else f"shapes-{seed:06d}-{len(specs)}",
        frames=frames,
        segments=specs,
        frames_per_segment=frames_per_segment,
        seed=int(seed),
        fps=float(fps),
    )


def make_videos(count: int, *, seed: int = 0, num_segments: int | tuple[int, int] = 1, **kwargs) -> list[SyntheticVideo]:
    """``count`` videos with seeds derived from ``seed``; ``num_segments`` may be a (lo, hi) range."""
    _check_int("count", count, 0)
    _check_int("seed", seed, 0)
    rng = np.random.default_rng([int(seed), 0xC0DE])
    out = []
    for i in range(count):
        if isinstance(num_segments, tuple):
            lo, hi = num_segments
            n = int(rng.integers(lo, hi + 1))
        else:
            n = num_segments
        vid_seed = int(rng.integers(0, 2**31 - 1))
        out.append(make_video(vid_seed, num_segments=n, video_id=f"shapes-{seed}-{i:05d}", **kwargs))
    return out


def write_video(frames: torch.Tensor | np.ndarray, path: str | os.PathLike, *, fps: float = 1.0) -> str:
    """Write ``uint8 [F, H, W, 3]`` frames to ``path``.

    ``.mp4`` is encoded with PyAV (lossless-ish H.264 where available, else MPEG-4 at a
    high bitrate); a path without a video suffix is a directory of ``frame_%05d.png``.
    The file appears atomically (written under a temporary name, then renamed).
    """
    arr = frames.numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"frames: expected uint8 [F, H, W, 3], got {arr.dtype} {list(arr.shape)}")
    if arr.shape[0] == 0:
        raise ValueError("frames: expected at least one frame, got 0")
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    ext = os.path.splitext(path)[1].lower()
    if ext in (".mp4", ".mkv", ".avi", ".mov"):
        import av

        fd, tmp = tempfile.mkstemp(suffix=ext, dir=parent)
        os.close(fd)
        try:
            with av.open(tmp, mode="w") as container:
                # H.264 needs even sides; pad by edge replication rather than resample.
                h, w = arr.shape[1:3]
                ph, pw = h + (h % 2), w + (w % 2)
                if (ph, pw) != (h, w):
                    arr = np.pad(arr, ((0, 0), (0, ph - h), (0, pw - w), (0, 0)), mode="edge")
                codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
                stream = container.add_stream(codec, rate=int(round(fps)))
                stream.width, stream.height = pw, ph
                stream.pix_fmt = "yuv444p" if codec == "libx264" else "yuv420p"
                if codec == "libx264":
                    stream.options = {"crf": "0", "preset": "ultrafast"}
                else:
                    stream.bit_rate = 8_000_000
                for img in arr:
                    for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")):
                        container.mux(packet)
                for packet in stream.encode():
                    container.mux(packet)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        return path
    if ext:
        raise ValueError(f"path: expected a .mp4/.mkv/.avi/.mov file or a directory name, got suffix {ext!r}")
    from PIL import Image

    tmpdir = tempfile.mkdtemp(dir=parent, prefix=".frames-")
    try:
        for i, img in enumerate(arr):
            Image.fromarray(img).save(os.path.join(tmpdir, f"frame_{i:05d}.png"))
        if os.path.isdir(path):
            import shutil

            shutil.rmtree(path)
        os.replace(tmpdir, path)
    except BaseException:
        import shutil

        shutil.rmtree(tmpdir, ignore_errors=True)
        raise
    return path


def write_synthetic_dataset(out_dir: str | os.PathLike, *, num_videos: int = 16, seed: int = 0,
                            num_segments: int | tuple[int, int] = 1, frames_per_segment: int = 4,
                            size: int = 64, fmt: str = "mp4", split: str = "train",
                            kinds: Sequence[str] | None = None, progress: bool = True) -> str:
    """Render videos to ``out_dir/videos/`` and write ``out_dir/manifest.jsonl``.

    Rows follow the authors' manifest format, one per question, with paths relative to
    ``out_dir`` and the answer in ``target_text`` (the ground truth, no teacher needed).
    ``fmt`` is ``"mp4"`` or ``"frames"`` (a directory of PNGs per video). Returns the
    manifest path.
    """
    from tqdm.auto import tqdm

    from f2l.data.manifest import ManifestRow, write_manifest

    if fmt not in ("mp4", "frames"):
        raise ValueError(f"fmt: expected 'mp4' or 'frames', got {fmt!r}")
    if not isinstance(split, str) or not split:
        raise ValueError(f"split: expected a non-empty str, got {split!r}")
    out_dir = os.fspath(out_dir)
    videos = make_videos(num_videos, seed=seed, num_segments=num_segments,
                         frames_per_segment=frames_per_segment, size=size)
    rows = []
    for vid in tqdm(videos, desc="render", unit="video", disable=not progress):
        rel = os.path.join("videos", vid.id + (".mp4" if fmt == "mp4" else ""))
        write_video(vid.frames, os.path.join(out_dir, rel), fps=vid.fps)
        for j, qa in enumerate(vid.questions(kinds)):
            rows.append(ManifestRow(
                id=f"{vid.id}-q{j}", video_path=rel, prompt=qa.question, target_text=qa.answer,
                task_type="qa", dataset="synthetic-shapes", split=split,
                metadata={"kind": qa.kind, "choices": list(qa.choices), "segment": qa.segment,
                          **vid.to_metadata()},
            ))
    return write_manifest(rows, os.path.join(out_dir, "manifest.jsonl"))
