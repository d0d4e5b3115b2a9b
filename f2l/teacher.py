"""``f2l teacher``: fill a manifest's ``target_text`` by greedy generation with the video
in context (the training targets of the official recipe come from SmolVLM2-2.2B this way).

The teacher is a frozen base VLM (preset name or checkpoint directory, typically a
larger one than the base being trained) answering each row's prompt with the video's
frames in its prompt (:meth:`f2l.Frames2LoRA.answer_in_context`); no hypernetwork is
involved. Rows that already have a target are kept unless ``overwrite``.

Resumable: finished targets are appended (flushed per batch) to ``OUTPUT.partial``;
a rerun picks them up, and the complete manifest is written to ``OUTPUT`` atomically at
the end (then the partial file is removed). Relative ``video_path`` s are rewritten
relative to ``OUTPUT``'s directory, so the filled manifest feeds ``f2l train`` wherever
it is written.
"""
from __future__ import annotations

import json
import os
from typing import Any

from tqdm.auto import tqdm

__all__ = ["run_teacher", "load_teacher", "PARTIAL_SUFFIX"]

PARTIAL_SUFFIX = ".partial"


def load_teacher(model: str, *, device=None, dtype=None):
    """A frozen base VLM ready for ``answer_in_context`` (its hypernetwork is a small
    placeholder: in-context answering never runs it)."""
    from f2l.model import Frames2LoRA

    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model: expected a preset name or a checkpoint directory, got {type(model).__name__}")
    return Frames2LoRA.from_pretrained(os.fspath(model), preset="tiny", device=device, dtype=dtype)


def _read_partial(path: str) -> dict[str, str]:
    out: dict[str, str] = {}
    if not os.path.isfile(path):
        return out
    with open(path, "r", encoding="utf-8") as f:
        for text in f:
            try:
                obj = json.loads(text)
            except json.JSONDecodeError:
                continue  # the line an interrupted run was writing
            if isinstance(obj, dict) and isinstance(obj.get("id"), str) and isinstance(obj.get("target_text"), str):
                out[obj["id"]] = obj["target_text"]
    return out


def run_teacher(teacher, manifest: str | os.PathLike, output: str | os.PathLike, *,
                data_root: str | os.PathLike | None = None, split: str | None = None, batch_size: int = 4,
                max_new_tokens: int = 64, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Fill ``target_text`` of the manifest's rows with ``teacher`` and write ``output``.

    ``teacher``: an object with ``answer_in_context(videos, prompts, *, max_new_tokens)``
    or a callable ``teacher(video_paths, prompts) -> list[str]``. Returns
    ``{"filled", "resumed", "kept", "total", "output"}``.
    """
    from f2l.data.manifest import fill_targets, read_manifest, write_manifest

    for name, v in (("manifest", manifest), ("output", output)):
        if not isinstance(v, (str, os.PathLike)):
            raise TypeError(f"{name}: expected a str or os.PathLike, got {type(v).__name__}")
    for name, v in (("batch_size", batch_size), ("max_new_tokens", max_new_tokens)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
    if not (hasattr(teacher, "answer_in_context") or callable(teacher)):
        raise TypeError(f"teacher: expected an object with answer_in_context(...) or a callable, "
                        f"got {type(teacher).__name__}")
    output = os.fspath(output)
    if os.path.isdir(output):
        raise ValueError(f"output: {output!r} is a directory; expected a .jsonl file path")
    rows = read_manifest(manifest, data_root=data_root, split=split)
    partial_path = output + PARTIAL_SUFFIX
    resumed = _read_partial(partial_path)
    for r in rows:
        if r.id in resumed:
            r.target_text = resumed[r.id]
            r.metadata = {**r.metadata, "target_source": "teacher"}
    todo = [r for r in rows if r.id not in resumed and (overwrite or not (r.target_text and r.target_text.strip()))]
    kept = len(rows) - len(todo) - sum(r.id in resumed for r in rows)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    filled: dict[str, str] = {}
    bar = tqdm(total=len(todo), desc="teacher", unit="row", disable=not progress)
    with open(partial_path, "a", encoding="utf-8") as f:
        for s in range(0, len(todo), batch_size):
            chunk = todo[s:s + batch_size]
            done = fill_targets(chunk, teacher, data_root=data_root, batch_size=batch_size,
                                max_new_tokens=max_new_tokens, overwrite=True, progress=False)
            f.write("".join(json.dumps({"id": r.id, "target_text": r.target_text}, ensure_ascii=False) + "\n"
                            for r in done))
            f.flush()
            os.fsync(f.fileno())
            filled.update((r.id, r.target_text) for r in done)
            bar.update(len(chunk))
    bar.close()
    for r in rows:
        if r.id in filled:
            r.target_text = filled[r.id]
            r.metadata = {**r.metadata, "target_source": "teacher"}
    out_root = os.path.dirname(os.path.abspath(output))
    for r in rows:  # keep relative video paths valid from the output manifest's directory
        if not os.path.isabs(r.video_path):
            src = r.resolved_video_path(data_root)
            r.video_path = os.path.relpath(os.path.abspath(src), out_root)
    write_manifest(rows, output)
    os.remove(partial_path)
    return {"filled": len(filled), "resumed": len(resumed), "kept": kept, "total": len(rows), "output": output}
