"""f2l.video: decoding, SmolVLM2 frame sampling, resize/normalise, and every bad input."""
import random

import numpy as np
import pytest
import torch

av = pytest.importorskip("av")

from f2l.video import (  # noqa: E402
    Video,
    VideoDecodeError,
    decode_video,
    load_video,
    preprocess_frames,
    sample_indices,
)

FRAMES, SIDE, RATE = 10, 32, 5


def _levels(i):
    # Distinct, well-separated grey levels survive lossy compression in order.
    return 20 + 22 * i


def write_mp4(path, n=FRAMES, side=SIDE, rate=RATE):
    c = av.open(str(path), "w")
    s = c.add_stream("mpeg4", rate=rate)
    s.width = s.height = side
    s.pix_fmt = "yuv420p"
    for i in range(n):
        img = np.full((side, side, 3), _levels(i), np.uint8)
        for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
            c.mux(p)
    for p in s.encode():
        c.mux(p)
    c.close()
    return path


@pytest.fixture(scope="module")
def mp4(tmp_path_factory):
    return write_mp4(tmp_path_factory.mktemp("video") / "clip.mp4")


# ------------------------------------------------------------------ decoding


def test_decode_all_frames_uniform(mp4):
    frames, ts, dur, idx = decode_video(mp4, max_frames=64, sampling="uniform")
    assert frames.shape == (FRAMES, SIDE, SIDE, 3) and frames.dtype == np.uint8
    assert idx == list(range(FRAMES))
    np.testing.assert_allclose(ts, [i / RATE for i in range(FRAMES)])
    assert dur == pytest.approx(FRAMES / RATE)
    means = frames.reshape(FRAMES, -1).mean(1)
    np.testing.assert_allclose(means, [_levels(i) for i in range(FRAMES)], atol=4)


def test_decode_fps_rule(mp4):
    # 2 s at 1 fps -> two frames, first and last (SmolVLM2's linspace over the clip).
    frames, ts, _, idx = decode_video(mp4, fps=1.0, max_frames=64)
    assert idx == [0, FRAMES - 1] and frames.shape[0] == 2
    np.testing.assert_allclose(ts, [0.0, (FRAMES - 1) / RATE])


def test_load_video_path(mp4):
    v = load_video(mp4, image_size=24, max_frames=4, fps=5.0)
    assert isinstance(v, Video) and v.pixel_values.shape == (4, 3, 24, 24)
    assert v.pixel_values.dtype == torch.float32 and v.source == str(mp4)
    # constant frames stay constant after resizing; normalised with mean = std = 0.5
    want = torch.tensor([_levels(i) for i in v.indices], dtype=torch.float32) / 255 * 2 - 1
    torch.testing.assert_close(v.pixel_values.mean((1, 2, 3)), want, atol=0.04, rtol=0)


# ------------------------------------------------------------------ sampling


SAMPLE_CASES = [
    pytest.param(10, 5.0, 64, 1.0, "fps", [0, 9], id="short-1fps"),
    pytest.param(10, 5.0, 1, 1.0, "fps", [0], id="max-frames-1"),
    pytest.param(10, 5.0, 64, 5.0, "fps", list(range(10)), id="native-rate"),
    pytest.param(10, 5.0, 4, 5.0, "fps", [0, 3, 6, 9], id="capped-by-max-frames"),
    pytest.param(300, 10.0, 8, 1.0, "fps", [10, 50, 90, 130, 170, 210, 250, 290], id="long-skips-1s-ends"),
    pytest.param(1, 30.0, 8, 1.0, "fps", [0], id="single-frame"),
    pytest.param(10, None, 4, 1.0, "fps", [0, 3, 6, 9], id="no-rate-falls-back-uniform"),
    pytest.param(100, 25.0, 5, 1.0, "uniform", [0, 25, 50, 74, 99], id="uniform"),
]


@pytest.mark.parametrize("total,rate,max_frames,fps,sampling,want", SAMPLE_CASES)
def test_sample_indices_cases(total, rate, max_frames, fps, sampling, want):
    assert sample_indices(total, rate, max_frames=max_frames, fps=fps, sampling=sampling) == want


def test_sample_indices_match_smolvlm2_processor():
    from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor
    from transformers.video_utils import VideoMetadata

    proc = SmolVLMVideoProcessor()
    rng = random.Random(0)
    for _ in range(120):
        total = rng.randint(1, 3000)
        rate = rng.choice([1.0, 5.0, 12.5, 24.0, 29.97, 30.0, 60.0])
        max_frames = rng.randint(1, 96)
        fps = rng.choice([0.5, 1.0, 2.0, 4.0])
        meta = VideoMetadata(total_num_frames=total, fps=rate, duration=total / rate)
        want = proc.sample_frames(meta, num_frames=max_frames, fps=fps).tolist()
        assert sample_indices(total, rate, max_frames=max_frames, fps=fps) == want, (total, rate, max_frames, fps)


# ------------------------------------------------------------------ in-memory frames


def test_tensor_layouts_and_pil_agree():
    from PIL import Image

    g = torch.Generator().manual_seed(1)
    hwc = torch.randint(0, 256, (5, 20, 30, 3), dtype=torch.uint8, generator=g)
    a = load_video(hwc, image_size=16)
    b = load_video(hwc.permute(0, 3, 1, 2).contiguous(), image_size=16)
    c = load_video([Image.fromarray(f.numpy()) for f in hwc], image_size=16)
    d = load_video(hwc.numpy(), image_size=16)
    e = load_video(hwc.float() / 255, image_size=16)
    for v in (b, c, d, e):
        torch.testing.assert_close(v.pixel_values, a.pixel_values)
    assert a.timestamps == [0.0, 1.0, 2.0, 3.0, 4.0] and a.duration == 5.0


def test_tensor_thinned_to_max_frames_and_video_fps():
    x = torch.randint(0, 256, (40, 8, 8, 3), dtype=torch.uint8)
    v = load_video(x, image_size=8, max_frames=4)
    assert v.indices == [0, 13, 26, 39]
    # With a known frame rate the SmolVLM2 rule applies: 40 frames at 10 fps = 4 s -> 4 frames at 1 fps.
    w = load_video(x, image_size=8, max_frames=64, fps=1.0, video_fps=10.0)
    assert w.num_frames == 4 and w.duration == pytest.approx(4.0)


def test_preprocess_matches_manual_reference():
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 256, (3, 3, 12, 12), dtype=torch.uint8, generator=g)
    mean, std = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)
    # Already square at the tower size and below the longest edge: both Lanczos resizes are identities.
    got = preprocess_frames(x, image_size=12, mean=mean, std=std)
    want = (x.double() / 255 - torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)) / torch.tensor(
        std, dtype=torch.float64).view(1, 3, 1, 1)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)
    up = preprocess_frames(x, image_size=24)
    assert up.shape == (3, 3, 24, 24) and torch.isfinite(up).all()


def test_video_passthrough():
    v = load_video(torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8), image_size=8)
    assert load_video(v, image_size=8) is v
    with pytest.raises(ValueError, match="expected frames of 16x16"):
        load_video(v, image_size=16)


# ------------------------------------------------------------------ bad inputs


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_video(tmp_path / "nope.mp4")


def test_truncated_file(mp4, tmp_path):
    data = mp4.read_bytes()
    bad = tmp_path / "truncated.mp4"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoDecodeError, match="truncated"):
        load_video(bad)


BAD_FILES = [
    pytest.param(b"this is not a video", "could not be opened", id="text-file"),
    pytest.param(b"", "empty", id="empty-file"),
    pytest.param(bytes(range(256)) * 8, "could not be opened|no decodable", id="random-bytes"),
]


@pytest.mark.parametrize("content,match", BAD_FILES)
def test_non_video_files(tmp_path, content, match):
    p = tmp_path / "bad.mp4"
    p.write_bytes(content)
    with pytest.raises(VideoDecodeError, match=match):
        load_video(p)
    assert issubclass(VideoDecodeError, ValueError)


def test_directory_is_not_a_video(tmp_path):
    with pytest.raises(VideoDecodeError, match="directory"):
        load_video(tmp_path)


BAD_SOURCES = [
    pytest.param(torch.zeros(4, 8, 8), ValueError, "expected a frame tensor", id="3d-tensor"),
    pytest.param(torch.zeros(4, 8, 8, 4, dtype=torch.uint8), ValueError, "expected a frame tensor", id="4-channels"),
    pytest.param(torch.zeros(0, 8, 8, 3, dtype=torch.uint8), ValueError, "at least one", id="no-frames"),
    pytest.param(torch.zeros(2, 8, 8, 3, dtype=torch.int32), TypeError, "uint8", id="int32-frames"),
    pytest.param(torch.full((2, 8, 8, 3), 2.0), ValueError, r"\[0, 1\]", id="float-out-of-range"),
    pytest.param(torch.full((2, 8, 8, 3), float("nan")), ValueError, "finite", id="float-nan"),
    pytest.param([], ValueError, "empty list", id="empty-list"),
    pytest.param(["a.png"], TypeError, "PIL", id="list-of-str"),
    pytest.param(42, TypeError, "expected a path", id="int"),
]


@pytest.mark.parametrize("source,exc,match", BAD_SOURCES)
def test_bad_sources(source, exc, match):
    with pytest.raises(exc, match=match):
        load_video(source, image_size=8)


def test_pil_sizes_must_match():
    from PIL import Image

    with pytest.raises(ValueError, match="same size"):
        load_video([Image.new("RGB", (8, 8)), Image.new("RGB", (9, 8))], image_size=8)


BAD_ARGS = [
    pytest.param(dict(max_frames=0), "max_frames", id="max-frames-0"),
    pytest.param(dict(max_frames=2.5), "max_frames", id="max-frames-float"),
    pytest.param(dict(fps=0), "fps", id="fps-0"),
    pytest.param(dict(fps=-1.0), "fps", id="fps-negative"),
    pytest.param(dict(sampling="random"), "sampling", id="bad-sampling"),
    pytest.param(dict(video_fps=0), "video_fps", id="video-fps-0"),
    pytest.param(dict(image_size=0), "image_size", id="image-size-0"),
    pytest.param(dict(std=(0.5, 0.0, 0.5)), "std", id="zero-std"),
]


@pytest.mark.parametrize("kwargs", [p.values[0] for p in BAD_ARGS], ids=[p.id for p in BAD_ARGS])
def test_bad_arguments(kwargs):
    match = next(p.values[1] for p in BAD_ARGS if p.values[0] is kwargs)
    kw = dict(image_size=8)
    kw.update(kwargs)
    with pytest.raises(ValueError, match=match):
        load_video(torch.zeros(2, 8, 8, 3, dtype=torch.uint8), **kw)
