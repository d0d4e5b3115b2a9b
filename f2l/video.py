"""Video in: decode (PyAV), sample frames the SmolVLM2 way, resize and normalise.

Frames are prepared exactly as the authors' pipeline prepares them: transformers 4.51.3's
SmolVLM image processor with ``video_size = {"longest_edge": 384}`` (their setting for
every model size), no torchvision:

1. each uint8 RGB frame is resized with PIL's Lanczos filter so that its longest edge is
   ``longest_edge`` (up or down), the other edge ``int(longest_edge / aspect)`` rounded up
   to an even number, at least 1 (:func:`resize_output_size`);
2. that uint8 image is resized again with PIL Lanczos to the vision tower's square
   ``image_size`` (512 for 256M/500M, 384 for 2.2B; PIL returns an already-square image of
   that size untouched);
3. rescale in float64 (``x * (1/255)``), cast to float32, then ``(x - mean) / std`` in float32.

A ``longest_edge`` above ``image_size`` is capped at ``image_size``: SmolVLM's processor
would cut such frames into tiles, which Frames2LoRA never encodes. See
``docs/preprocessing.md`` for the derivation and the golden-file check.

Sampling (SmolVLM2's rule): ``n = clamp(round(fps · duration), 1, max_frames)`` frame
indices spread uniformly (``linspace``) over the video, skipping ``skip_secs`` at both
ends when the video is long enough. ``sampling="uniform"`` (and any source without a
frame rate) takes ``max_frames`` uniformly spread frames instead. A file's duration is
``frames / average frame rate``, as transformers' video readers compute it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from f2l.config import DEFAULT_LONGEST_EDGE  # the authors' processor setting (384) for every model size

DEFAULT_IMAGE_SIZE = 512
MAX_IMAGE_SIZE = 4096  # the processor's absolute cap on an edge
RESCALE_FACTOR = 1 / 255
DEFAULT_MAX_FRAMES = 64
DEFAULT_FPS = 1.0
SAMPLING = ("fps", "uniform")


class VideoDecodeError(ValueError):
    """A file that exists but cannot be decoded as a video (truncated, corrupt, not a video)."""


@dataclass
class Video:
    """Frames ready for the vision tower.

    pixel_values: float32 ``[F, 3, S, S]``, normalised with the model's mean/std.
    timestamps: seconds of each sampled frame. duration: seconds of the whole video.
    """

    pixel_values: torch.Tensor
    timestamps: list[float]
    duration: float
    source: str = "<frames>"
    indices: list[int] = field(default_factory=list)

    @property
    def num_frames(self) -> int:
        return int(self.pixel_values.shape[0])

    def __post_init__(self):
        pv = self.pixel_values
        if not isinstance(pv, torch.Tensor) or pv.dim() != 4 or pv.shape[1] != 3 or pv.shape[0] < 1:
            shape = tuple(pv.shape) if isinstance(pv, torch.Tensor) else type(pv).__name__
            raise ValueError(f"pixel_values: expected a tensor [F>=1, 3, S, S], got {shape}")
        if len(self.timestamps) != pv.shape[0]:
            raise ValueError(f"timestamps: expected {pv.shape[0]} entries (one per frame), got {len(self.timestamps)}")


def sample_indices(total_frames: int, video_fps: float | None, *, max_frames: int = DEFAULT_MAX_FRAMES,
                   fps: float = DEFAULT_FPS, skip_secs: float = 1.0, sampling: str = "fps") -> list[int]:
    """Indices of the frames to keep, by SmolVLM2's rule (see the module docstring)."""
    if not isinstance(total_frames, int) or total_frames < 1:
        raise ValueError(f"total_frames: expected an int >= 1, got {total_frames!r}")
    _check_sampling_args(max_frames, fps, sampling)
    if sampling == "uniform" or not video_fps or video_fps <= 0:
        n = min(max_frames, total_frames)
        return np.unique(np.linspace(0, total_frames - 1, n).round().astype(int)).tolist()
    duration = total_frames / video_fps
    desired = max(1, min(int(round(fps * duration)), max_frames))
    start, end = 0, total_frames - 1
    if skip_secs > 0 and (duration - 2 * skip_secs) > (max_frames * fps):
        start = int(skip_secs * video_fps)
        end = int(total_frames - skip_secs * video_fps)
    start, end = max(0, start), min(end, total_frames - 1)
    if start >= end:
        start, end = 0, total_frames - 1
    return np.unique(np.linspace(start, end, desired, dtype=int)).tolist()


def _check_sampling_args(max_frames, fps, sampling):
    if isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < 1:
        raise ValueError(f"max_frames: expected an int >= 1, got {max_frames!r}")
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0:
        raise ValueError(f"fps: expected a number > 0, got {fps!r}")
    if sampling not in SAMPLING:
        raise ValueError(f"sampling: expected one of {SAMPLING}, got {sampling!r}")


def _probe(path: str):
    import av

    try:
        container = av.open(path)
    except av.error.FFmpegError as e:
        raise VideoDecodeError(f"video {path!r} could not be opened as a video ({e.__class__.__name__}: {e})") from None
    if not container.streams.video:
        container.close()
        raise VideoDecodeError(f"video {path!r} has no decodable video stream (truncated or not a video file)")
    return container


def _stream_info(container):
    stream = container.streams.video[0]
    rate = stream.average_rate or stream.guessed_rate
    video_fps = float(rate) if rate else None
    duration = None
    if stream.duration is not None and stream.time_base is not None:
        duration = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        duration = container.duration / 1_000_000
    total = int(stream.frames or 0)
    if total <= 0 and duration and video_fps:
        total = max(1, int(round(duration * video_fps)))
    return stream, video_fps, duration, total


def _decode_selected(path: str, wanted: set[int]) -> tuple[dict[int, np.ndarray], int]:
    """Decode the file once, keeping frames whose running index is in ``wanted``."""
    import av

    container = _probe(path)
    kept: dict[int, np.ndarray] = {}
    count = 0
    last = max(wanted) if wanted else -1
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            if count in wanted:
                kept[count] = frame.to_ndarray(format="rgb24")
            count += 1
            if count > last:
                break
    except av.error.FFmpegError as e:
        if not kept:
            raise VideoDecodeError(f"video {path!r} could not be decoded ({e.__class__.__name__}: {e})") from None
    finally:
        container.close()
    return kept, count


def decode_video(path, *, max_frames: int = DEFAULT_MAX_FRAMES, fps: float = DEFAULT_FPS, skip_secs: float = 1.0,
                 sampling: str = "fps"):
    """Decode the sampled frames of a video file.

    Returns ``(frames uint8 [F, H, W, 3], timestamps (s), duration (s), indices)``.
    Raises ``FileNotFoundError`` for a missing file and :class:`VideoDecodeError` (a
    ``ValueError``) for an empty, truncated, corrupt or non-video file.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a str or os.PathLike, got {type(path).__name__}")
    _check_sampling_args(max_frames, fps, sampling)
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"video {path!r} does not exist")
    if os.path.isdir(path):
        raise VideoDecodeError(f"video {path!r} is a directory, expected a video file")
    if os.path.getsize(path) == 0:
        raise VideoDecodeError(f"video {path!r} is empty (0 bytes)")
    container = _probe(path)
    try:
        _, video_fps, duration, total = _stream_info(container)
    finally:
        container.close()
    if total <= 0:
        # No frame count in the container: count by decoding (cheap next to the model).
        _, total = _count_frames(path)
    if total <= 0:
        raise VideoDecodeError(f"video {path!r} contains no frames (truncated or not a video file)")
    indices = sample_indices(total, video_fps, max_frames=max_frames, fps=fps, skip_secs=skip_secs, sampling=sampling)
    kept, count = _decode_selected(path, set(indices))
    if count <= indices[-1]:
        # The container promised more frames than the stream holds: resample on what exists.
        if count == 0:
            raise VideoDecodeError(f"video {path!r} has no decodable frames (truncated or corrupt)")
        total = count
        indices = sample_indices(total, video_fps, max_frames=max_frames, fps=fps, skip_secs=skip_secs,
                                 sampling=sampling)
        kept, count = _decode_selected(path, set(indices))
        indices = [i for i in indices if i in kept]
        if not indices:
            raise VideoDecodeError(f"video {path!r} has no decodable frames (truncated or corrupt)")
    frames = np.stack([kept[i] for i in indices])
    rate = video_fps if video_fps else fps
    timestamps = [i / rate for i in indices]
    if video_fps:
        # transformers' readers (PyAV and decord alike) report frames / average rate, not the
        # container's duration; the prompt's H:MM:SS and the frame count follow from it.
        duration = total / video_fps
    elif not duration or duration <= 0:
        duration = total / rate
    return frames, timestamps, float(duration), indices


def _count_frames(path: str) -> tuple[None, int]:
    import av

    container = _probe(path)
    n = 0
    try:
        for _ in container.decode(container.streams.video[0]):
            n += 1
    except av.error.FFmpegError:
        pass
    finally:
        container.close()
    return None, n


def _frames_to_tensor(frames, name: str) -> torch.Tensor:
    """uint8 ``[F, 3, H, W]`` from a tensor/array ``[F, H, W, 3]`` or ``[F, 3, H, W]`` or PIL list."""
    if isinstance(frames, np.ndarray):
        frames = torch.from_numpy(np.ascontiguousarray(frames))
    if isinstance(frames, (list, tuple)):
        if not frames:
            raise ValueError(f"{name}: expected at least one frame, got an empty list")
        try:
            from PIL import Image
        except ImportError:  # pragma: no cover - pillow is a dependency
            Image = None
        arrays = []
        for i, im in enumerate(frames):
            if Image is not None and isinstance(im, Image.Image):
                arrays.append(np.asarray(im.convert("RGB")))
            else:
                raise TypeError(f"{name}[{i}]: expected a PIL.Image.Image, got {type(im).__name__}")
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            raise ValueError(f"{name}: all frames must have the same size, got sizes {sorted(shapes)}")
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    if not isinstance(frames, torch.Tensor):
        raise TypeError(f"{name}: expected a path, a frame tensor [F, H, W, 3] / [F, 3, H, W] or a list of PIL "
                        f"images, got {type(frames).__name__}")
    if frames.dim() != 4 or (frames.shape[-1] != 3 and frames.shape[1] != 3):
        raise ValueError(f"{name}: expected a frame tensor [F, H, W, 3] or [F, 3, H, W], got shape {tuple(frames.shape)}")
    if frames.shape[0] < 1 or frames.numel() == 0:
        raise ValueError(f"{name}: expected at least one non-empty frame, got shape {tuple(frames.shape)}")
    if frames.shape[1] != 3:
        frames = frames.permute(0, 3, 1, 2)
    if frames.dtype == torch.uint8:
        return frames.contiguous()
    if frames.is_floating_point():
        f = frames.float()
        if not torch.isfinite(f).all() or f.min() < 0 or f.max() > 1:
            raise ValueError(f"{name}: float frames must be finite and in [0, 1]")
        return (f * 255).round().to(torch.uint8).contiguous()
    raise TypeError(f"{name}: expected uint8 (or float in [0, 1]) frames, got dtype {frames.dtype}")


def resize_output_size(height: int, width: int, longest_edge: int) -> tuple[int, int]:
    """``(height, width)`` of the aspect-preserving resize to ``longest_edge``, rounded as
    SmolVLM's image processor rounds it: the long side becomes ``longest_edge``, the short
    side ``int(long / aspect)`` (``int(long · aspect)`` for portrait frames) bumped to the next
    even number, at least 1; then both are scaled below ``MAX_IMAGE_SIZE``.

    >>> resize_output_size(9, 17, 384), resize_output_size(40, 64, 384), resize_output_size(17, 9, 384)
    ((204, 384), (240, 384), (384, 204))
    """
    for name, v in (("height", height), ("width", width), ("longest_edge", longest_edge)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
    aspect = width / height
    if width >= height:
        width = longest_edge
        height = int(width / aspect)
        height += height % 2
    else:
        height = longest_edge
        width = int(height * aspect)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    aspect = width / height
    if width >= height and width > MAX_IMAGE_SIZE:
        width, height = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE / aspect)
    elif height > width and height > MAX_IMAGE_SIZE:
        height, width = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE * aspect)
    return max(height, 1), max(width, 1)


def _check_longest_edge(longest_edge) -> None:
    if isinstance(longest_edge, bool) or not isinstance(longest_edge, int) or longest_edge < 1:
        raise ValueError(f"longest_edge: expected an int >= 1, got {longest_edge!r}")


def resize_frame(frame: np.ndarray, *, image_size: int, longest_edge: int = DEFAULT_LONGEST_EDGE) -> np.ndarray:
    """uint8 ``[H, W, 3]`` -> uint8 ``[S, S, 3]``: PIL Lanczos to ``min(longest_edge, image_size)``
    on the long side (aspect kept), then PIL Lanczos to the ``image_size`` square."""
    from PIL import Image

    if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"frame: expected a uint8 array [H, W, 3], got "
                         f"{getattr(frame, 'dtype', type(frame).__name__)} {getattr(frame, 'shape', '')}")
    edge = min(longest_edge, image_size)
    im = Image.fromarray(np.ascontiguousarray(frame))
    h, w = resize_output_size(int(frame.shape[0]), int(frame.shape[1]), edge)
    lanczos = Image.Resampling.LANCZOS
    im = im.resize((w, h), resample=lanczos)
    im = im.resize((image_size, image_size), resample=lanczos)
    return np.asarray(im)


def preprocess_frames(frames: torch.Tensor, *, image_size: int, longest_edge: int = DEFAULT_LONGEST_EDGE,
                      mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5)) -> torch.Tensor:
    """uint8 ``[F, 3, H, W]`` -> float32 ``[F, 3, S, S]``, the SmolVLM processor's arithmetic:
    two PIL Lanczos resizes on uint8 (:func:`resize_frame`), rescale in float64 and cast to
    float32, normalise in float32.

    >>> x = torch.randint(0, 256, (2, 3, 40, 64), dtype=torch.uint8)
    >>> preprocess_frames(x, image_size=48).shape
    torch.Size([2, 3, 48, 48])
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size: expected an int >= 1, got {image_size!r}")
    _check_longest_edge(longest_edge)
    if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
        raise ValueError(f"mean/std: expected 3 values each (std > 0), got mean={mean!r} std={std!r}")
    if not isinstance(frames, torch.Tensor) or frames.dtype != torch.uint8 or frames.dim() != 4 \
            or frames.shape[1] != 3:
        raise ValueError(f"frames: expected a uint8 tensor [F, 3, H, W], got "
                         f"{getattr(frames, 'dtype', type(frames).__name__)} {tuple(getattr(frames, 'shape', ()))}")
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    out = torch.empty(frames.shape[0], 3, image_size, image_size, dtype=torch.float32)
    hwc = frames.permute(0, 2, 3, 1).cpu().numpy()
    for i in range(frames.shape[0]):
        px = torch.from_numpy(resize_frame(hwc[i], image_size=image_size, longest_edge=longest_edge).copy())
        # float64 rescale then float32, as transformers' rescale(); (x - mean) / std in float32.
        x = (px.permute(2, 0, 1).to(torch.float64) * RESCALE_FACTOR).to(torch.float32)
        out[i] = (x - m) / s
    return out


def load_video(source, *, image_size: int = DEFAULT_IMAGE_SIZE, max_frames: int = DEFAULT_MAX_FRAMES,
               fps: float = DEFAULT_FPS, mean: Sequence[float] = (0.5, 0.5, 0.5),
               std: Sequence[float] = (0.5, 0.5, 0.5), sampling: str = "fps", skip_secs: float = 1.0,
               video_fps: float | None = None, longest_edge: int = DEFAULT_LONGEST_EDGE) -> Video:
    """Load one video as model-ready frames.

    source: a path (decoded with PyAV and sampled by SmolVLM2's rule), a uint8 frame
      tensor/array ``[F, H, W, 3]`` or ``[F, 3, H, W]`` (float in [0, 1] accepted), a list
      of PIL images, or a :class:`Video` (returned as is when it already has the size).
    video_fps: frame rate of in-memory frames. When None they are taken as already
      sampled at ``fps`` (timestamps ``i / fps``) and only thinned uniformly down to
      ``max_frames``.
    longest_edge: the processor's intermediate resize (see the module docstring); the
      authors' 384 by default, capped at ``image_size``.

    >>> v = load_video(torch.randint(0, 256, (4, 20, 30, 3), dtype=torch.uint8), image_size=32)
    >>> v.pixel_values.shape, v.timestamps
    (torch.Size([4, 3, 32, 32]), [0.0, 1.0, 2.0, 3.0])
    """
    _check_sampling_args(max_frames, fps, sampling)
    _check_longest_edge(longest_edge)
    if video_fps is not None and (isinstance(video_fps, bool) or not isinstance(video_fps, (int, float))
                                  or not video_fps > 0):
        raise ValueError(f"video_fps: expected None or a number > 0, got {video_fps!r}")
    if isinstance(source, Video):
        if source.pixel_values.shape[-1] == image_size and source.pixel_values.shape[-2] == image_size:
            return source
        raise ValueError(f"source: a Video of size {tuple(source.pixel_values.shape[-2:])} was given, "
                         f"expected frames of {image_size}x{image_size}")
    if isinstance(source, (str, os.PathLike)):
        frames, timestamps, duration, indices = decode_video(source, max_frames=max_frames, fps=fps,
                                                             skip_secs=skip_secs, sampling=sampling)
        u8 = torch.from_numpy(frames).permute(0, 3, 1, 2)
        name = os.fspath(source)
    else:
        u8 = _frames_to_tensor(source, "source")
        total = int(u8.shape[0])
        if video_fps is None:
            indices = sample_indices(total, None, max_frames=max_frames, fps=fps, sampling="uniform")
            rate = float(fps)
        else:
            indices = sample_indices(total, float(video_fps), max_frames=max_frames, fps=fps, skip_secs=skip_secs,
                                     sampling=sampling)
            rate = float(video_fps)
        u8 = u8[indices]
        timestamps = [i / rate for i in indices]
        duration = total / rate
        name = "<frames>"
    pv = preprocess_frames(u8, image_size=image_size, longest_edge=longest_edge, mean=mean, std=std)
    return Video(pixel_values=pv, timestamps=[float(t) for t in timestamps], duration=float(duration), source=name,
                 indices=list(indices))


__all__ = ["Video", "VideoDecodeError", "load_video", "decode_video", "sample_indices", "preprocess_frames",
           "resize_frame", "resize_output_size", "DEFAULT_LONGEST_EDGE"]
