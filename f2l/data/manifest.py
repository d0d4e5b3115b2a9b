"""JSONL data manifests in the authors' format.

One JSON object per line::

    {"id": "msrvtt-7010-q0", "video_path": "videos/video7010.mp4", "task_type": "qa",
     "prompt": "What is the man holding?", "target_text": "A guitar.",
     "dataset": "msrvtt", "split": "train", "metadata": {...}}

``video_path`` may be absolute or relative; relative paths resolve against the *data
root* (by default the directory that holds the manifest). Paths are taken as written, so
a manifest can name any file the process may read (``../..``, absolute paths, symlinks);
for manifests you did not write, ``confine=True`` (``--confine-to-data-root``) refuses
every row whose video, after resolving ``..`` and symlinks, lies outside the data root. ``target_text`` may be empty
or null in a manifest that a teacher has not filled yet (:func:`fill_targets`). Blank
lines and lines starting with ``#`` are skipped. Every parse error names the file and
the 1-based line number.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

from tqdm.auto import tqdm

__all__ = [
    "REQUIRED_FIELDS",
    "ManifestError",
    "ManifestRow",
    "read_manifest",
    "write_manifest",
    "fill_targets",
]

REQUIRED_FIELDS: tuple[str, ...] = ("id", "video_path", "prompt")
_STR_FIELDS: tuple[str, ...] = ("id", "video_path", "task_type", "prompt", "target_text", "dataset", "split")
_KNOWN_FIELDS = frozenset(_STR_FIELDS + ("metadata",))


class ManifestError(ValueError):
    """A malformed manifest row; the message starts with ``path:line:``."""

    def __init__(self, path: str, line: int, message: str):
        self.path, self.line = path, line
        super().__init__(f"{path}:{line}: {message}")


@dataclass
class ManifestRow:
    """One training/evaluation example: a video, a prompt and (once filled) its target."""

    id: str
    video_path: str
    prompt: str
    target_text: str | None = None
    task_type: str = "qa"
    dataset: str = ""
    split: str = "train"
    metadata: dict = field(default_factory=dict)
    # where the row came from and how its path resolves; not written back
    data_root: str | None = field(default=None, repr=False, compare=False)
    line: int | None = field(default=None, repr=False, compare=False)

    def resolved_video_path(self, data_root: str | os.PathLike | None = None) -> str:
        """``video_path`` made absolute against ``data_root`` (else the row's own root)."""
        root = os.fspath(data_root) if data_root is not None else self.data_root
        if os.path.isabs(self.video_path) or root is None:
            return self.video_path
        return os.path.normpath(os.path.join(root, self.video_path))

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "video_path": self.video_path,
            "task_type": self.task_type,
            "prompt": self.prompt,
            "target_text": self.target_text,
            "dataset": self.dataset,
            "split": self.split,
            "metadata": self.metadata,
        }


def _parse_row(obj, path: str, line: int, data_root: str | None, require_target: bool) -> ManifestRow:
    if not isinstance(obj, dict):
        raise ManifestError(path, line, f"expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in REQUIRED_FIELDS if k not in obj]
    if missing:
        raise ManifestError(path, line, f"missing required field(s) {missing}; a row needs {list(REQUIRED_FIELDS)}")
    for k in _STR_FIELDS:
        v = obj.get(k)
        if v is None and k in ("target_text", "task_type", "dataset", "split"):
            continue
        if not isinstance(v, str):
            raise ManifestError(path, line, f"field {k!r}: expected a string, got {type(v).__name__} ({v!r:.60})")
    for k in ("id", "video_path", "prompt"):
        if not obj[k].strip():
            raise ManifestError(path, line, f"field {k!r}: expected a non-empty string")
    meta = obj.get("metadata")
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise ManifestError(path, line, f"field 'metadata': expected an object, got {type(meta).__name__}")
    target = obj.get("target_text")
    if require_target and (target is None or not target.strip()):
        raise ManifestError(path, line, f"row {obj['id']!r} has no target_text (run `f2l teacher` to fill it)")
    return ManifestRow(
        id=obj["id"],
        video_path=obj["video_path"],
        prompt=obj["prompt"],
        target_text=target,
        task_type=obj.get("task_type") or "qa",
        dataset=obj.get("dataset") or "",
        split=obj.get("split") or "train",
        metadata=meta,
        data_root=data_root,
        line=line,
    )


def read_manifest(
    path: str | os.PathLike,
    *,
    data_root: str | os.PathLike | None = None,
    split: str | Sequence[str] | None = None,
    require_target: bool = False,
    check_files: bool = False,
    confine: bool = False,
) -> list[ManifestRow]:
    """Parse a JSONL manifest into :class:`ManifestRow` s.

    Args:
        path: the ``.jsonl`` file.
        data_root: where relative ``video_path`` s resolve (default: the manifest's directory).
        split: keep only rows of this split (or these splits); ``None`` keeps all.
        require_target: every kept row must have a non-empty ``target_text`` (training).
        check_files: every kept row's video must exist (a directory of frames counts).
        confine: every row's video must resolve (``..`` and symlinks followed) inside the
            data root; absolute paths elsewhere are refused too.

    Raises:
        FileNotFoundError: the manifest (or, with ``check_files``, a video) is missing.
        ManifestError: a row is malformed; the message names ``path:line``. Duplicate ids
            are an error too (they would silently double-weight examples).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path: manifest {path!r} does not exist")
    if data_root is not None and not isinstance(data_root, (str, os.PathLike)):
        raise TypeError(f"data_root: expected a str or os.PathLike, got {type(data_root).__name__}")
    root = os.path.abspath(os.fspath(data_root)) if data_root is not None else os.path.dirname(os.path.abspath(path))
    if split is not None:
        splits = {split} if isinstance(split, str) else set(split)
        if not splits or not all(isinstance(s, str) for s in splits):
            raise TypeError(f"split: expected a str or a non-empty sequence of str, got {split!r}")
    else:
        splits = None
    rows: list[ManifestRow] = []
    seen: dict[str, int] = {}
    real_root = os.path.realpath(root)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                s = raw.decode("utf-8").strip()
            except UnicodeDecodeError as e:
                raise ManifestError(path, lineno, f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                                                  f"{e.start + 1}); manifests are UTF-8 JSONL") from None
            if not s or s.startswith("#"):
                continue
            try:
                obj = json.loads(s)
            except json.JSONDecodeError as e:
                raise ManifestError(path, lineno, f"invalid JSON ({e.msg} at column {e.colno})") from None
            row = _parse_row(obj, path, lineno, root, require_target=False)
            if confine:
                real = os.path.realpath(row.resolved_video_path())
                if os.path.commonpath([real, real_root]) != real_root:
                    raise ManifestError(path, lineno, f"video_path {row.video_path!r} of row {row.id!r} resolves "
                                                      f"to {real!r}, outside the data root {real_root!r}")
            if row.id in seen:
                raise ManifestError(path, lineno, f"duplicate id {row.id!r} (first seen on line {seen[row.id]})")
            seen[row.id] = lineno
            if splits is not None and row.split not in splits:
                continue
            if require_target and (row.target_text is None or not row.target_text.strip()):
                raise ManifestError(path, lineno, f"row {row.id!r} has no target_text (run `f2l teacher` to fill it)")
            if check_files and not os.path.exists(row.resolved_video_path()):
                raise ManifestError(path, lineno, f"video {row.resolved_video_path()!r} of row {row.id!r} does not exist")
            rows.append(row)
    return rows


def write_manifest(rows: Iterable[ManifestRow | dict], path: str | os.PathLike) -> str:
    """Write rows as JSONL, atomically (temp file in the same directory, then rename).

    Rows may be :class:`ManifestRow` s or dicts in the manifest format; dicts are validated
    the same way :func:`read_manifest` validates lines (errors name the 1-based row index).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    lines = []
    for i, row in enumerate(rows, start=1):
        if isinstance(row, ManifestRow):
            d = row.to_dict()
        elif isinstance(row, dict):
            d = _parse_row(row, "<rows>", i, None, require_target=False).to_dict()
            d.update({k: v for k, v in row.items() if k not in _KNOWN_FIELDS})  # keep extra keys
        else:
            raise TypeError(f"rows[{i - 1}]: expected a ManifestRow or dict, got {type(row).__name__}")
        lines.append(json.dumps(d, ensure_ascii=False))
    from f2l.files import atomic_write_text

    atomic_write_text(path, "\n".join(lines) + ("\n" if lines else ""))
    return path


def fill_targets(
    rows: Sequence[ManifestRow],
    teacher,
    *,
    data_root: str | os.PathLike | None = None,
    batch_size: int = 4,
    max_new_tokens: int = 64,
    overwrite: bool = False,
    load_video: Callable | None = None,
    progress: bool = True,
) -> list[ManifestRow]:
    """Fill ``target_text`` by generating with a frozen VLM that sees the video in context.

    ``teacher`` is either an object with ``answer_in_context(videos, prompts, *,
    max_new_tokens)`` (a :class:`f2l.Frames2LoRA`, possibly on a larger base than the one
    being trained) or a callable ``teacher(videos, prompts) -> list[str]``. Videos are
    passed as resolved paths unless ``load_video`` is given (then its results are passed).
    Rows that already have a target are kept unless ``overwrite``. Returns new rows (the
    inputs are not modified), in input order.
    """
    rows = list(rows)
    if not all(isinstance(r, ManifestRow) for r in rows):
        raise TypeError("rows: expected a sequence of ManifestRow")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected a positive int, got {max_new_tokens!r}")
    if hasattr(teacher, "answer_in_context"):
        def generate(videos, prompts):
            return teacher.answer_in_context(videos, prompts, max_new_tokens=max_new_tokens)
    elif callable(teacher):
        generate = teacher
    else:
        raise TypeError(f"teacher: expected an object with answer_in_context(...) or a callable, "
                        f"got {type(teacher).__name__}")
    out = [ManifestRow(**{**r.to_dict()}, data_root=r.data_root, line=r.line) for r in rows]
    todo = [i for i, r in enumerate(out) if overwrite or not (r.target_text and r.target_text.strip())]
    batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    for batch in tqdm(batches, desc="teacher", unit="batch", disable=not progress):
        paths = [out[i].resolved_video_path(data_root) for i in batch]
        videos = [load_video(p) for p in paths] if load_video is not None else paths
        texts = generate(videos, [out[i].prompt for i in batch])
        if not isinstance(texts, (list, tuple)) or len(texts) != len(batch):
            raise ValueError(f"teacher: expected {len(batch)} strings back, got {texts!r:.200}")
        for i, t in zip(batch, texts):
            if not isinstance(t, str):
                raise TypeError(f"teacher: expected str outputs, got {type(t).__name__}")
            out[i].target_text = t.strip()
            out[i].metadata = {**out[i].metadata, "target_source": "teacher"}
    return out
