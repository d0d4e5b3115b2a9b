"""Measured dispatch tables: which decode LoRA backend wins where it was measured.

``auto`` dispatch of a decode-shaped LoRA call may pick the CUDA decode kernel or the
Triton kernel. Which is faster depends on the GPU, the layer's shape, the rank and the
batch, so the choice is read from a table written from measurements
(``benchmarks/gpu_suite.py --update-dispatch``) and committed as package data in
``f2l_kernels/tuned/decode_dispatch.json``. Where no measured entry matches, the answer
is Triton: it covers every call (backward too) and needs no compiled extension, so it is
the safer default.

Table format (``schema`` ``f2l.decode_dispatch``, ``version`` 1)::

    {"schema": "f2l.decode_dispatch", "version": 1,
     "rank_edges": [8, 16, 32, 64, 128], "seq_edges": [1, 16, 64, 256, 1024],
     "rule": "<how winners were decided>",
     "entries": [{"device": "NVIDIA H200", "dtype": "bf16", "d_in": 2560, "d_out": 960,
                  "rank_bucket": 16, "seq_bucket": 64, "winner": "cuda", ...}, ...]}

A value is put in the bucket of the first edge at or above it (rank 3 -> 8, 40 sequences
-> 64); values above the last edge have no bucket (Triton). Entries may carry extra
measured fields (times, commit); the reader ignores them. The rank looked up is the
largest total rank one sequence uses (``r_max`` times the adapters it lists), since
that is what the kernels' work grows with.

``F2L_DECODE_DISPATCH``: a path to another table, or ``0``/``off`` to ignore tables
(then ``auto`` takes the CUDA kernel for every decode call it supports, the behaviour
before tables existed); read at the first decode dispatch of the process. A missing, unreadable or foreign table never fails an import or
a call: one :class:`DispatchTableWarning` names the problem and every decode call falls
back to Triton.
"""
from __future__ import annotations

import json
import os
import threading
import warnings
from dataclasses import dataclass

import torch

__all__ = ["SCHEMA", "VERSION", "RANK_EDGES", "SEQ_EDGES", "DEFAULT_PATH", "DispatchTableWarning", "DecodeTable",
           "bucket", "dtype_name", "validate_decode_table", "load_decode_table", "decode_table", "decode_choice",
           "decode_prefers_cuda", "reset_cache"]

SCHEMA = "f2l.decode_dispatch"
VERSION = 1
RANK_EDGES = (8, 16, 32, 64, 128)
SEQ_EDGES = (1, 16, 64, 256, 1024)
WINNERS = ("cuda", "triton")
DEFAULT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuned", "decode_dispatch.json")
_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


class DispatchTableWarning(UserWarning):
    """The measured dispatch table could not be used; decode dispatch falls back to Triton."""


def bucket(value: int, edges) -> int | None:
    """The first edge ``>= value`` (values below 1 count as 1), or None above the last edge."""
    v = max(1, int(value))
    for e in edges:
        if v <= e:
            return e
    return None


def dtype_name(dtype: torch.dtype) -> str:
    name = _DTYPES.get(dtype)
    if name is None:
        raise ValueError(f"dtype: expected one of {sorted(_DTYPES.values())}, got {dtype}")
    return name


@dataclass(frozen=True)
class DecodeTable:
    """A validated table: ``winners[(device, dtype, d_in, d_out, rank_bucket, seq_bucket)]``."""

    winners: dict
    path: str
    rule: str = ""

    def __len__(self) -> int:
        return len(self.winners)

    def lookup(self, device: str, dtype: str, d_in: int, d_out: int, rank: int, num_seqs: int) -> str | None:
        rb, sb = bucket(rank, RANK_EDGES), bucket(num_seqs, SEQ_EDGES)
        if rb is None or sb is None:
            return None
        return self.winners.get((device, dtype, int(d_in), int(d_out), rb, sb))


def _field(entry: dict, i: int, name: str, kind, where: str):
    if name not in entry:
        raise ValueError(f"{where}: entries[{i}] has no {name!r} field")
    v = entry[name]
    if kind is int:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{where}: entries[{i}].{name}: expected a positive integer, got {v!r}")
    elif not isinstance(v, kind):
        raise ValueError(f"{where}: entries[{i}].{name}: expected {kind.__name__}, got {type(v).__name__}")
    return v


def validate_decode_table(obj, where: str = "decode dispatch table") -> dict:
    """Check a parsed table; returns ``{key: winner}``. Raises ValueError naming the field."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if obj.get("schema") != SCHEMA:
        raise ValueError(f"{where}: expected schema {SCHEMA!r}, got {obj.get('schema')!r} (not a dispatch table)")
    if obj.get("version") != VERSION:
        raise ValueError(f"{where}: expected version {VERSION}, got {obj.get('version')!r}")
    for name, edges in (("rank_edges", RANK_EDGES), ("seq_edges", SEQ_EDGES)):
        if list(obj.get(name, [])) != list(edges):
            raise ValueError(f"{where}: expected {name} {list(edges)} (this f2l's buckets), got {obj.get(name)!r}")
    entries = obj.get("entries")
    if not isinstance(entries, list):
        raise ValueError(f"{where}: expected 'entries' to be a list, got {type(entries).__name__}")
    winners: dict = {}
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            raise ValueError(f"{where}: entries[{i}]: expected an object, got {type(e).__name__}")
        device = _field(e, i, "device", str, where)
        dtype = _field(e, i, "dtype", str, where)
        if dtype not in _DTYPES.values():
            raise ValueError(f"{where}: entries[{i}].dtype: expected one of {sorted(_DTYPES.values())}, got {dtype!r}")
        d_in, d_out = _field(e, i, "d_in", int, where), _field(e, i, "d_out", int, where)
        rb, sb = _field(e, i, "rank_bucket", int, where), _field(e, i, "seq_bucket", int, where)
        if rb not in RANK_EDGES:
            raise ValueError(f"{where}: entries[{i}].rank_bucket: expected one of {list(RANK_EDGES)}, got {rb}")
        if sb not in SEQ_EDGES:
            raise ValueError(f"{where}: entries[{i}].seq_bucket: expected one of {list(SEQ_EDGES)}, got {sb}")
        winner = _field(e, i, "winner", str, where)
        if winner not in WINNERS:
            raise ValueError(f"{where}: entries[{i}].winner: expected one of {list(WINNERS)}, got {winner!r}")
        key = (device, dtype, d_in, d_out, rb, sb)
        if key in winners and winners[key] != winner:
            raise ValueError(f"{where}: entries[{i}]: conflicting winners for {key}")
        winners[key] = winner
    return winners


def load_decode_table(path: str | None = None) -> DecodeTable:
    """Read and validate a table (default: the packaged one). Raises OSError/ValueError."""
    path = path or DEFAULT_PATH
    with open(path, encoding="utf-8") as f:
        try:
            obj = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
    winners = validate_decode_table(obj, where=path)
    return DecodeTable(winners=winners, path=path, rule=str(obj.get("rule", "")))


_lock = threading.Lock()
_cache: dict = {}


def reset_cache() -> None:
    """Forget the loaded table and device names (tests; after rewriting the file)."""
    with _lock:
        _cache.clear()
        _memo.clear()


def _setting() -> str | None:
    """None: tables disabled; else the table path."""
    v = os.environ.get("F2L_DECODE_DISPATCH", "").strip()
    if v.lower() in ("0", "off", "false", "no", "none"):
        return None
    return v or DEFAULT_PATH


def decode_table() -> DecodeTable | None:
    """The table in use (cached per path), an empty one after a warning if it is unusable,
    or None when ``F2L_DECODE_DISPATCH`` disables tables."""
    path = _setting()
    if path is None:
        return None
    table = _cache.get(("table", path))
    if table is None:
        with _lock:
            table = _cache.get(("table", path))
            if table is None:
                try:
                    table = load_decode_table(path)
                except (OSError, ValueError) as e:
                    warnings.warn(f"f2l: the decode dispatch table is unusable ({e}); decode-time LoRA "
                                  "uses the Triton kernel wherever auto would have consulted it",
                                  DispatchTableWarning, stacklevel=3)
                    table = DecodeTable(winners={}, path=path, rule="unusable")
                _cache[("table", path)] = table
    return table


def decode_choice(device: str, dtype: str, d_in: int, d_out: int, rank: int, num_seqs: int,
                  table: DecodeTable | None) -> str:
    """``"cuda"`` where the table measured the CUDA kernel faster for this key, else ``"triton"``."""
    if table is None:
        return "cuda"
    return "cuda" if table.lookup(device, dtype, d_in, d_out, rank, num_seqs) == "cuda" else "triton"


def _device_name(device: torch.device) -> str:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    name = _cache.get(("device", idx))
    if name is None:
        name = torch.cuda.get_device_name(idx)
        _cache[("device", idx)] = name
    return name


_memo: dict = {}


def decode_prefers_cuda(device: torch.device, dtype: torch.dtype, d_in: int, d_out: int, rank: int,
                        num_seqs: int) -> bool:
    """Whether ``auto`` should run this decode call on the CUDA kernel (for ``_pick``).

    Called on every decode-shaped LoRA call, so answers are memoised per call shape (a
    dict hit instead of the table walk: decode steps cost microseconds); the setting and
    the table are read once, at the first call (:func:`reset_cache` reads them again)."""
    key = (device.index, dtype, d_in, d_out, rank, num_seqs)
    hit = _memo.get(key)
    if hit is not None:
        return hit
    table = decode_table()
    if table is None:
        res = True
    elif not table.winners or dtype not in _DTYPES:
        res = False
    else:
        res = decode_choice(_device_name(device), _DTYPES[dtype], d_in, d_out, rank, num_seqs, table) == "cuda"
    if len(_memo) > 4096:  # many distinct batch sizes: start over rather than grow
        _memo.clear()
    _memo[key] = res
    return res
