"""``f2l infer``: answer every row of a JSONL manifest through video adapters.

Each output line is the input row (the manifest fields) plus ``"prediction"`` -- the
shape the official inference script writes -- so the same evaluation scripts read both.
Rows are processed ``batch_size`` at a time: the batch's distinct videos are internalized
together (rows that share a video share its adapter) and all its prompts are answered
in one KV-cached batch, each with its own adapter.

Resumable: lines are appended and flushed per batch, and a rerun skips every id already
in the output with a prediction (a line cut off by a crash is dropped and redone; an id
found more than once is kept once, so the output never holds duplicates). One writer per
output: the CLI holds :class:`f2l.files.OutputLock` on it. A
video that cannot be read does not stop the run: its rows are written with
``"prediction": null`` and ``"error"``, and the next run retries them.
"""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

from tqdm.auto import tqdm

from f2l.shard import read_predictions, select

__all__ = ["run_inference", "read_predictions"]


def _rewrite(path: str, rows: Sequence[dict]) -> None:
    from f2l.files import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _append(f, rows: Sequence[dict]) -> None:
    f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    f.flush()
    os.fsync(f.fileno())  # a crash after this point never loses a finished batch


def _check_int(name: str, v, lo: int = 1) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name}: expected an int >= {lo}, got {v!r}")


def _internalize_robust(model, paths: list[str], instruction):
    """Adapters for ``paths``; when the batch fails on a bad video, find it by retrying
    one at a time. Returns ``(adapters_by_path, errors_by_path)``."""
    try:
        return dict(zip(paths, model.internalize(paths, instruction, batch_size=len(paths)))), {}
    except (ValueError, OSError, RuntimeError) as e:
        if len(paths) == 1:
            return {}, {paths[0]: f"{type(e).__name__}: {' '.join(str(e).split())}"}
    ok, bad = {}, {}
    for p in paths:
        a, b = _internalize_robust(model, [p], instruction)
        ok.update(a)
        bad.update(b)
    return ok, bad


def run_inference(model, manifest: str | os.PathLike, output: str | os.PathLike, *,
                  data_root: str | os.PathLike | None = None, split: str | None = None, batch_size: int = 8,
                  max_new_tokens: int = 32, limit: int | None = None, instruction: str | None = None,
                  checkpoint: str | None = None, progress: bool = True, confine: bool = False,
                  shard: tuple[int, int] | None = None) -> dict[str, Any]:
    """Answer the manifest's rows with ``model`` (a :class:`f2l.Frames2LoRA`) into ``output``.

    ``shard``: ``(i, n)`` -- only the rows of shard ``i`` of ``n`` (:mod:`f2l.shard`; ``total``
    then counts that shard's rows).

    ``confine``: refuse rows whose video resolves outside ``data_root`` (see
    :func:`f2l.data.manifest.read_manifest`).

    Returns ``{"written", "skipped", "errors", "total", "output"}``.
    """
    from f2l.data.manifest import read_manifest

    for name, v in (("manifest", manifest), ("output", output)):
        if not isinstance(v, (str, os.PathLike)):
            raise TypeError(f"{name}: expected a str or os.PathLike, got {type(v).__name__}")
    _check_int("batch_size", batch_size)
    _check_int("max_new_tokens", max_new_tokens)
    if limit is not None:
        _check_int("limit", limit, 0)
    if not hasattr(model, "internalize") or not hasattr(model, "answer"):
        raise TypeError(f"model: expected a Frames2LoRA (internalize + answer), got {type(model).__name__}")
    manifest, output = os.fspath(manifest), os.fspath(output)
    if os.path.exists(output) and os.path.exists(manifest) and os.path.samefile(manifest, output):
        raise ValueError(f"output: {output!r} is the input manifest; choose another file")
    rows = read_manifest(manifest, data_root=data_root, split=split, confine=confine)
    if shard is not None:
        rows = select(rows, [r.id for r in rows], shard)
    done, dropped = read_predictions(output)
    if dropped:  # drop error rows / a truncated tail so each id appears once
        _rewrite(output, list(done.values()))
    todo = [r for r in rows if r.id not in done]
    if limit is not None:
        todo = todo[:limit]
    parent = os.path.dirname(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    written = errors = 0
    bar = tqdm(total=len(todo), desc="infer", unit="row", disable=not progress)
    with open(output, "a", encoding="utf-8") as f:
        for s in range(0, len(todo), batch_size):
            batch = todo[s:s + batch_size]
            paths = list(dict.fromkeys(r.resolved_video_path() for r in batch))
            adapters, bad = _internalize_robust(model, paths, instruction)
            good = [r for r in batch if r.resolved_video_path() in adapters]
            answers = model.answer([adapters[r.resolved_video_path()] for r in good], [r.prompt for r in good],
                                   max_new_tokens=max_new_tokens) if good else []
            by_id = dict(zip((r.id for r in good), answers))
            out_rows = []
            for r in batch:
                row = r.to_dict()
                if r.id in by_id:
                    row["prediction"] = by_id[r.id]
                else:
                    row["prediction"] = None
                    row["error"] = bad.get(r.resolved_video_path(), "not processed")
                    errors += 1
                if checkpoint:
                    row["checkpoint"] = checkpoint
                out_rows.append(row)
            _append(f, out_rows)
            written += len(good)
            bar.update(len(batch))
            bar.set_postfix(errors=errors)
    bar.close()
    return {"written": written, "skipped": len(done), "errors": errors, "total": len(rows), "output": output}
