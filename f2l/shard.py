"""Splitting a corpus between workers: ``--shard i/n`` for ``f2l internalize`` and ``f2l infer``.

Shard ``i`` of ``n`` owns the items whose key (a manifest row's id, a video's path) hashes to
``i`` modulo ``n`` (SHA-1, so the split is the same on every machine and Python version and
does not depend on the order of the rows). Every item belongs to exactly one shard: n workers
together cover the corpus once, with no overlap. ``--shard rank`` takes ``i/n`` from the
``RANK`` / ``WORLD_SIZE`` variables that ``torchrun`` sets.

Sharded ``infer`` writes ``P.shard-I-of-N.jsonl`` beside the requested ``P.jsonl`` (each
shard file has its own lock and resumes on its own); :func:`merge_predictions` (``f2l infer
--merge``) joins them into ``P.jsonl`` in manifest order, one row per id.

:func:`read_predictions` reads a predictions file (what resuming and merging both need);
it lives here, below :mod:`f2l.infer`, which writes those files and re-exports it.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Sequence

__all__ = ["parse_shard", "in_shard", "select", "shard_path", "shard_paths", "read_predictions",
           "merge_predictions"]

_SPEC = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def parse_shard(spec: str | None) -> tuple[int, int] | None:
    """``"i/n"`` (0 <= i < n) or ``"rank"`` -> ``(i, n)``; ``None`` -> ``None`` (no sharding)."""
    if spec is None:
        return None
    if not isinstance(spec, str):
        raise TypeError(f"shard: expected a str like '0/4' or 'rank', got {type(spec).__name__}")
    if spec.strip() == "rank":
        try:
            i, n = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        except ValueError:
            raise ValueError("shard: 'rank' needs integer RANK and WORLD_SIZE variables (as torchrun sets them), "
                             f"got RANK={os.environ.get('RANK')!r} WORLD_SIZE={os.environ.get('WORLD_SIZE')!r}") from None
    else:
        m = _SPEC.match(spec)
        if not m:
            raise ValueError(f"shard: expected 'i/n' (e.g. '0/4') or 'rank', got {spec!r}")
        i, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"shard: expected 0 <= i < n, got {i}/{n}")
    return i, n


def in_shard(key: str, shard: tuple[int, int] | None) -> bool:
    """Whether ``key`` belongs to ``shard`` (always, without sharding)."""
    if shard is None or shard[1] == 1:
        return True
    h = int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big")
    return h % shard[1] == shard[0]


def select(items: Sequence, keys: Sequence[str], shard: tuple[int, int] | None) -> list:
    """The items of ``shard``, in their order."""
    return [it for it, k in zip(items, keys) if in_shard(k, shard)]


def shard_path(output: str, shard: tuple[int, int] | None) -> str:
    """Where shard ``i/n`` of predictions ``output`` is written (``output`` itself unsharded)."""
    if shard is None:
        return output
    stem, ext = os.path.splitext(output)
    return f"{stem}.shard-{shard[0]}-of-{shard[1]}{ext or '.jsonl'}"


def shard_paths(output: str, n: int) -> list[str]:
    return [shard_path(output, (i, n)) for i in range(n)]


def read_predictions(path: str | os.PathLike) -> tuple[dict[str, dict], int]:
    """Rows of an existing output file that have a prediction, by id, and how many other
    lines (errors, a truncated last line, repeats of an id) the file held."""
    path = os.fspath(path)
    done: dict[str, dict] = {}
    dropped = 0
    if not os.path.exists(path):
        return done, 0
    if not os.path.isfile(path):
        raise ValueError(f"output: {path!r} exists and is not a file")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                s = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise ValueError(f"output: {path}:{lineno} is not UTF-8 text; is {path!r} an f2l predictions "
                                 f"file?") from None
            if not s:
                continue
            try:
                obj = json.loads(s)
            except json.JSONDecodeError:
                dropped += 1  # a line cut off by an interrupted run
                continue
            if isinstance(obj, dict) and isinstance(obj.get("id"), str) and isinstance(obj.get("prediction"), str):
                if obj["id"] in done:
                    dropped += 1  # written twice (by two writers before outputs were locked)
                done[obj["id"]] = obj
            else:
                dropped += 1
    return done, dropped


def merge_predictions(manifest: str, output: str, n: int, *, data_root=None, split: str | None = None) -> dict:
    """Join the ``n`` shard files of ``output`` into ``output`` (atomically, in manifest order,
    one row per id; rows without a prediction -- errors, cut-off lines -- are left out).

    Returns ``{"rows", "missing", "output"}``: ``missing`` lists the manifest ids that no shard
    has answered yet (rerun their shards: they resume); the merge writes what there is.
    """
    from f2l.files import atomic_write_text
    from f2l.data.manifest import read_manifest

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected the number of shards (an int >= 1), got {n!r}")
    paths = shard_paths(output, n)
    absent = [p for p in paths if not os.path.isfile(p)]
    if absent:
        raise FileNotFoundError(f"merge: shard file {absent[0]!r} does not exist ({len(absent)} of {n} missing); "
                                "run every shard first")
    rows = read_manifest(manifest, data_root=data_root, split=split)
    found: dict[str, dict] = {}
    for p in paths:
        done, _ = read_predictions(p)
        for k, row in done.items():
            found.setdefault(k, row)
    out_rows, missing = [], []
    for r in rows:
        if r.id in found:
            out_rows.append(found[r.id])
        else:
            missing.append(r.id)
    atomic_write_text(output, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out_rows))
    return {"rows": len(out_rows), "missing": missing, "output": output}
