"""Training data: JSONL manifests (the authors' format) and synthetic moving-shapes videos."""
from f2l.data.manifest import ManifestError, ManifestRow, fill_targets, read_manifest, write_manifest
from f2l.data.synthetic import (
    QA,
    SegmentSpec,
    SyntheticVideo,
    answer_choices,
    make_video,
    make_videos,
    write_synthetic_dataset,
    write_video,
)

__all__ = [
    "ManifestError",
    "ManifestRow",
    "read_manifest",
    "write_manifest",
    "fill_targets",
    "QA",
    "SegmentSpec",
    "SyntheticVideo",
    "answer_choices",
    "make_video",
    "make_videos",
    "write_video",
    "write_synthetic_dataset",
]
