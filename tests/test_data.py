"""Data: synthetic moving-shapes videos and JSONL manifests."""
import json
import os

import numpy as np
import pytest
import torch

from f2l.data import manifest as mf
from f2l.data import synthetic as syn

# --------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_by_seed():
    a = syn.make_video(11, num_segments=3, frames_per_segment=3, size=24)
    b = syn.make_video(11, num_segments=3, frames_per_segment=3, size=24)
    c = syn.make_video(12, num_segments=3, frames_per_segment=3, size=24)
    assert torch.equal(a.frames, b.frames) and a.segments == b.segments
    assert not torch.equal(a.frames, c.frames)
    assert a.frames.dtype == torch.uint8 and a.frames.shape == (9, 24, 24, 3)
    vids1 = syn.make_videos(5, seed=3, num_segments=(1, 3), size=16)
    vids2 = syn.make_videos(5, seed=3, num_segments=(1, 3), size=16)
    assert [v.segments for v in vids1] == [v.segments for v in vids2]
    assert all(torch.equal(x.frames, y.frames) for x, y in zip(vids1, vids2))


def _centroid(frame: np.ndarray, colour) -> tuple[float, float]:
    m = (np.abs(frame.astype(int) - np.array(colour)).sum(-1) < 60)
    ys, xs = np.nonzero(m)
    assert len(xs) > 0, "the shape is not visible"
    return float(ys.mean()), float(xs.mean())


@pytest.mark.parametrize("direction", syn.DIRECTIONS, ids=list(syn.DIRECTIONS))
def test_shapes_move_in_their_direction(direction):
    spec = syn.SegmentSpec("yellow", "square", direction, 2)
    frames = syn.render_segment(spec, 4, 40, rng=np.random.default_rng(0))
    (y0, x0), (y1, x1) = _centroid(frames[0], syn.COLOURS["yellow"]), _centroid(frames[-1], syn.COLOURS["yellow"])
    dy, dx = y1 - y0, x1 - x0
    expect = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}[direction]
    assert np.sign(round(dy)) == expect[0] and np.sign(round(dx)) == expect[1]


def _components(mask: np.ndarray) -> int:
    seen = np.zeros_like(mask, dtype=bool)
    n = 0
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        n += 1
        stack = [(y, x)]
        while stack:
            a, b = stack.pop()
            if 0 <= a < mask.shape[0] and 0 <= b < mask.shape[1] and mask[a, b] and not seen[a, b]:
                seen[a, b] = True
                stack += [(a + 1, b), (a - 1, b), (a, b + 1), (a, b - 1)]
    return n


@pytest.mark.parametrize("count", [1, 2, 3], ids=["one", "two", "three"])
@pytest.mark.parametrize("shape", syn.SHAPES, ids=list(syn.SHAPES))
def test_rendered_count(count, shape):
    spec = syn.SegmentSpec("red", shape, "right", count)
    frames = syn.render_segment(spec, 2, 48, rng=np.random.default_rng(1))
    mask = np.abs(frames[0].astype(int) - np.array(syn.COLOURS["red"])).sum(-1) < 60
    assert _components(mask) == count


def test_questions_single_and_composed():
    single = syn.make_video(5, num_segments=1, size=16)
    qs = single.questions()
    assert [q.kind for q in qs] == list(syn.SINGLE_KINDS)
    s = single.segments[0]
    assert [q.answer for q in qs] == [s.colour, s.shape, s.direction, s.count_word]
    assert all(q.answer in q.choices for q in qs)
    multi = syn.make_video(6, num_segments=3, frames_per_segment=2, size=16)
    assert len({seg.shape for seg in multi.segments}) == 3
    qm = multi.questions()
    assert len(qm) == 3 * len(syn.COMPOSED_KINDS)
    for q in qm:
        seg = multi.segments[q.segment]
        assert seg.shape in q.question
        assert q.answer == {"colour_of": seg.colour, "direction_of": seg.direction, "count_of": seg.count_word}[q.kind]
    order = multi.questions(["first_shape", "last_shape", "colour_at"])
    assert order[0].answer == multi.segments[0].shape and order[1].answer == multi.segments[-1].shape
    # kinds that do not apply are skipped, not answered wrongly
    assert single.questions(["colour_of"]) == [] and multi.questions(["colour"]) == []
    assert torch.equal(multi.segment_frames(1), multi.frames[2:4])


@pytest.mark.parametrize(
    "call, err",
    [
        (lambda: syn.SegmentSpec("pink", "circle", "left", 1), "colour"),
        (lambda: syn.SegmentSpec("red", "star", "left", 1), "shape"),
        (lambda: syn.SegmentSpec("red", "circle", "north", 1), "direction"),
        (lambda: syn.SegmentSpec("red", "circle", "left", 4), "count"),
        (lambda: syn.make_video(0, num_segments=4), "num_segments"),
        (lambda: syn.make_video(-1), "seed"),
        (lambda: syn.make_video(0, size=4), "size"),
        (lambda: syn.answer_choices("mood"), "kind"),
        (lambda: syn.make_video(0).questions("colour"), "kinds"),
        (lambda: syn.make_video(0).segment_frames(1), "k"),
        (lambda: syn.make_video(0, segments=[syn.SegmentSpec("red", "circle", "left", 1)] * 2), "segments"),
        (lambda: syn.write_video(np.zeros((2, 8, 8, 3), np.float32), "/tmp/x.mp4"), "frames"),
    ],
    ids=["colour", "shape", "direction", "count", "too-many-segments", "negative-seed", "tiny-size", "unknown-kind",
         "kinds-str", "segment-index", "duplicate-shapes", "float-frames"],
)
def test_synthetic_validation(call, err):
    with pytest.raises((ValueError, TypeError), match=err):
        call()


@pytest.mark.parametrize("fmt", ["mp4", "frames"])
def test_write_dataset_roundtrip(tmp_path, fmt):
    path = syn.write_synthetic_dataset(tmp_path, num_videos=2, seed=1, num_segments=(1, 2), frames_per_segment=3,
                                       size=31, fmt=fmt, progress=False)
    rows = mf.read_manifest(path, require_target=True, check_files=True)
    vids = syn.make_videos(2, seed=1, num_segments=(1, 2), frames_per_segment=3, size=31)
    assert len(rows) == sum(len(v.questions()) for v in vids)
    assert rows[0].dataset == "synthetic-shapes" and not os.path.isabs(rows[0].video_path)
    assert rows[0].metadata["choices"] and rows[0].target_text in rows[0].metadata["choices"]
    first = rows[0].resolved_video_path()
    if fmt == "mp4":
        import av

        with av.open(first) as c:
            frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    else:
        from PIL import Image

        frames = [np.asarray(Image.open(os.path.join(first, f))) for f in sorted(os.listdir(first))]
    ref = vids[0].frames.numpy()
    assert len(frames) == ref.shape[0]
    # PNG is exact; H.264 at crf 0 in yuv444 is near-lossless (colour conversion rounding only)
    err = np.abs(frames[0][:31, :31].astype(int) - ref[0].astype(int)).max()
    assert err <= (0 if fmt == "frames" else 8)


# --------------------------------------------------------------------------- manifests


GOOD = {"id": "a", "video_path": "v/a.mp4", "task_type": "qa", "prompt": "What?", "target_text": "That.",
        "dataset": "d", "split": "train", "metadata": {"k": 1}}


def _write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_manifest_roundtrip_and_paths(tmp_path):
    rows = [dict(GOOD), dict(GOOD, id="b", video_path="/abs/b.mp4", split="val", target_text=None)]
    p = mf.write_manifest(rows, tmp_path / "m.jsonl")
    got = mf.read_manifest(p)
    assert [r.id for r in got] == ["a", "b"] and got[0].to_dict() == GOOD
    assert got[0].resolved_video_path() == str(tmp_path / "v" / "a.mp4")
    assert got[1].resolved_video_path() == "/abs/b.mp4"
    assert mf.read_manifest(p, data_root="/data")[0].resolved_video_path() == "/data/v/a.mp4"
    assert [r.id for r in mf.read_manifest(p, split="val")] == ["b"]
    assert [r.id for r in mf.read_manifest(p, split=["train", "val"])] == ["a", "b"]
    with pytest.raises(mf.ManifestError, match=r"m.jsonl:2: .*no target_text"):
        mf.read_manifest(p, require_target=True)
    # comments and blank lines are skipped; optional fields default
    p2 = _write_lines(tmp_path / "c.jsonl", ["# comment", "", json.dumps({"id": "x", "video_path": "x.mp4",
                                                                            "prompt": "q"})])
    (r,) = mf.read_manifest(p2)
    assert (r.task_type, r.split, r.metadata, r.target_text, r.line) == ("qa", "train", {}, None, 3)


BAD_ROWS = [
    ("{not json", r"bad.jsonl:2: invalid JSON"),
    ("[1, 2]", r"bad.jsonl:2: expected a JSON object"),
    (json.dumps({"id": "b", "prompt": "q"}), r"bad.jsonl:2: missing required field\(s\) \['video_path'\]"),
    (json.dumps(dict(GOOD, id="b", prompt=3)), r"bad.jsonl:2: field 'prompt': expected a string, got int"),
    (json.dumps(dict(GOOD, id="b", video_path="  ")), r"bad.jsonl:2: field 'video_path': expected a non-empty"),
    (json.dumps(dict(GOOD, id="b", metadata=[1])), r"bad.jsonl:2: field 'metadata': expected an object"),
    (json.dumps(dict(GOOD)), r"bad.jsonl:2: duplicate id 'a' \(first seen on line 1\)"),
]


@pytest.mark.parametrize("line, msg", BAD_ROWS,
                         ids=["invalid-json", "not-object", "missing-field", "wrong-type", "empty-path",
                              "bad-metadata", "duplicate-id"])
def test_manifest_bad_row_names_the_line(tmp_path, line, msg):
    p = _write_lines(tmp_path / "bad.jsonl", [json.dumps(GOOD), line])
    with pytest.raises(mf.ManifestError, match=msg) as info:
        mf.read_manifest(p)
    assert info.value.line == 2 and isinstance(info.value, ValueError)


def test_manifest_argument_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="path"):
        mf.read_manifest(tmp_path / "nope.jsonl")
    with pytest.raises(TypeError, match="path"):
        mf.read_manifest(3)
    p = mf.write_manifest([GOOD], tmp_path / "m.jsonl")
    with pytest.raises(TypeError, match="split"):
        mf.read_manifest(p, split=[3])
    with pytest.raises(mf.ManifestError, match="m.jsonl:1: video .* does not exist"):
        mf.read_manifest(p, check_files=True)
    with pytest.raises(TypeError, match=r"rows\[0\]"):
        mf.write_manifest([3], tmp_path / "x.jsonl")
    with pytest.raises(mf.ManifestError, match="<rows>:1: missing"):
        mf.write_manifest([{"id": "x"}], tmp_path / "x.jsonl")
    assert not os.path.exists(tmp_path / "x.jsonl")  # nothing half-written


def test_fill_targets_with_callable_and_object(tmp_path):
    rows = mf.read_manifest(mf.write_manifest(
        [dict(GOOD, id=f"r{i}", target_text=None if i % 2 else "kept") for i in range(5)], tmp_path / "m.jsonl"))
    calls = []

    def teacher(videos, prompts):
        calls.append(list(videos))
        return [f"  gen {os.path.basename(v)} {p} " for v, p in zip(videos, prompts)]

    out = mf.fill_targets(rows, teacher, batch_size=2, progress=False)
    assert [r.target_text for r in out] == ["kept", "gen a.mp4 What?", "kept", "gen a.mp4 What?", "kept"]
    assert calls == [[str(tmp_path / "v" / "a.mp4")] * 2]
    assert out[1].metadata["target_source"] == "teacher" and rows[1].target_text is None  # inputs untouched

    class Model:
        def answer_in_context(self, videos, prompts, *, max_new_tokens):
            return ["x" * max_new_tokens for _ in prompts]

    out2 = mf.fill_targets(rows, Model(), overwrite=True, max_new_tokens=3, load_video=lambda p: p.upper(),
                           progress=False)
    assert all(r.target_text == "xxx" for r in out2)
    with pytest.raises(ValueError, match="teacher: expected 1 strings"):
        mf.fill_targets(rows[1:2], lambda v, p: [], progress=False)
    with pytest.raises(TypeError, match="teacher"):
        mf.fill_targets(rows, 3)
    with pytest.raises(ValueError, match="batch_size"):
        mf.fill_targets(rows, teacher, batch_size=0)


@pytest.mark.parametrize("colours", [("red",), ("red", "blue"), ("green", "yellow", "blue")], ids=["one", "two", "three"])
def test_has_colour_is_balanced_and_composes(colours):
    shapes = syn.SHAPES[:len(colours)]
    segs = [syn.SegmentSpec(c, s, "left", 1) for c, s in zip(colours, shapes)]
    vid = syn.SyntheticVideo(id="v", frames=torch.empty(0), segments=segs, frames_per_segment=0, seed=0)
    qs = vid.questions(["has_colour"])
    yes = [q for q in qs if q.answer == "yes"]
    no = [q for q in qs if q.answer == "no"]
    assert len(yes) == len(colours) and len(no) == min(len(colours), len(syn.COLOURS) - len(colours))
    assert {q.question.split()[3] for q in yes} == set(colours)
    assert not {q.question.split()[3] for q in no} & set(colours)
    assert all(segs[q.segment].colour in q.question for q in yes) and all(q.segment is None for q in no)
    assert "has_colour" not in syn.SINGLE_KINDS and "has_colour" not in syn.COMPOSED_KINDS
