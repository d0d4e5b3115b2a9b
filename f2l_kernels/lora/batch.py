"""LoraBatch: per-forward metadata of a per-example LoRA batch.

Built once per forward (host side, from Python lists) and shared by every layer. The
field names and meanings are the contract with the CUDA decode kernel
(``docs/internals.md``); the Triton kernels' tile schedule and per-entry plan (rank-slot
width, row -> sequence map, the backward's work items) are computed lazily and cached,
because they depend on the launch (``BLOCK_M``, the pool's ``r_max``) or only matter for
the backward.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Sequence

import torch

__all__ = ["LoraBatch"]


def _as_int_list(name: str, v) -> list[int]:
    if isinstance(v, torch.Tensor):
        if v.dim() != 1 or v.dtype.is_floating_point or v.dtype == torch.bool or v.is_complex():
            raise TypeError(f"{name}: expected a 1-D integer tensor or a sequence of ints, "
                            f"got a {v.dim()}-D {v.dtype} tensor")
        return [int(t) for t in v.tolist()]
    if isinstance(v, (str, bytes)) or not isinstance(v, Sequence):
        raise TypeError(f"{name}: expected a sequence of ints, got {type(v).__name__}")
    out = []
    for i, t in enumerate(v):
        if isinstance(t, bool) or not isinstance(t, numbers.Integral):
            raise TypeError(f"{name}[{i}]: expected an int, got {type(t).__name__} ({t!r})")
        out.append(int(t))
    return out


def _entry_ids(i: int, entry) -> list[int]:
    """Pool ids of sequence ``i``'s adapter entry (``-1``/``None`` means none)."""
    if entry is None:
        return []
    if isinstance(entry, torch.Tensor):
        if entry.dim() > 1 or entry.dtype.is_floating_point:
            raise TypeError(f"adapter_ids[{i}]: expected an int, None or a list of ints, "
                            f"got a {entry.dim()}-D {entry.dtype} tensor")
        entry = entry.tolist()
    if isinstance(entry, numbers.Integral) and not isinstance(entry, bool):
        ids = [int(entry)]
    elif isinstance(entry, (list, tuple)):
        ids = []
        for j, e in enumerate(entry):
            if e is None:
                ids.append(-1)
            elif isinstance(e, numbers.Integral) and not isinstance(e, bool):
                ids.append(int(e))
            else:
                raise TypeError(f"adapter_ids[{i}][{j}]: expected an int or None, got {type(e).__name__} ({e!r})")
    else:
        raise TypeError(f"adapter_ids[{i}]: expected an int, None or a list of ints, "
                        f"got {type(entry).__name__} ({entry!r})")
    for j, p in enumerate(ids):
        if p < -1:
            where = f"adapter_ids[{i}]" if len(ids) == 1 and not isinstance(entry, (list, tuple)) \
                else f"adapter_ids[{i}][{j}]"
            raise ValueError(f"{where}: expected a pool index >= 0 or -1 (no adapter), got {p}")
    return ids


def _entry_weights(i: int, w, n: int) -> list[float]:
    """Weights of sequence ``i``'s ``n`` listed adapters (a scalar broadcasts)."""
    if w is None:
        return [1.0] * n
    if isinstance(w, torch.Tensor):
        w = w.tolist()
    if isinstance(w, numbers.Real) and not isinstance(w, bool):
        return [float(w)] * n
    if isinstance(w, (list, tuple)):
        if len(w) != n:
            raise ValueError(f"weights[{i}]: expected {n} weights (one per entry of adapter_ids[{i}]), "
                             f"got {len(w)}")
        out = []
        for j, t in enumerate(w):
            if isinstance(t, bool) or not isinstance(t, numbers.Real):
                raise TypeError(f"weights[{i}][{j}]: expected a float, got {type(t).__name__}")
            out.append(float(t))
        return out
    raise TypeError(f"weights[{i}]: expected None, a float or a list of floats, got {type(w).__name__}")


@dataclass(eq=False)
class LoraBatch:
    """Which rows belong to which sequence and which adapters each sequence uses.

    Build with :meth:`LoraBatch.build`; pass the same object to every layer's
    :func:`~f2l_kernels.lora_linear` / :func:`~f2l_kernels.lora_delta` call.

    Fields (index tensors are int32 on ``device``; host values are Python ints):

    - ``seq_starts [S+1]``: sequence ``i`` owns rows ``seq_starts[i]:seq_starts[i+1]``.
    - ``adapter_ptr [S+1]``: sequence ``i`` uses list entries ``adapter_ptr[i]:adapter_ptr[i+1]``.
    - ``adapter_idx [K]`` (int32) / ``adapter_weight [K]`` (float32): pool index and
      weight of each list entry (``-1``/``None`` entries are dropped at build time).
    - ``ranks [P] | None``: effective rank of each pool entry (None: ``r_max`` for all).
    - ``max_rows_per_seq``, ``max_adapters_per_seq``, ``is_decode``: host values for
      grid sizing and dispatch.
    """

    num_seqs: int
    num_rows: int
    pool_size: int | None
    r_max: int | None
    seq_starts: torch.Tensor
    adapter_ptr: torch.Tensor
    adapter_idx: torch.Tensor
    adapter_weight: torch.Tensor
    ranks: torch.Tensor | None
    max_rows_per_seq: int
    max_adapters_per_seq: int
    is_decode: bool
    device: torch.device
    # host mirrors, used for validation without device syncs
    seq_lens_host: list[int] = field(repr=False, default_factory=list)
    adapter_ptr_host: list[int] = field(repr=False, default_factory=list)
    adapter_idx_host: list[int] = field(repr=False, default_factory=list)
    adapter_weight_host: list[float] = field(repr=False, default_factory=list)
    ranks_host: list[int] | None = field(repr=False, default=None)
    max_pool_index: int = -1
    _cache: dict = field(repr=False, default_factory=dict)

    # ------------------------------------------------------------------ build
    @classmethod
    def build(cls, seq_lens, adapter_ids, *, ranks=None, weights=None, device=None) -> "LoraBatch":
        """Build the metadata.

        ``seq_lens[i]``: rows of sequence ``i`` in the packed activations (``[T]*S`` for
        a padded ``[S, T, d]`` batch, ``[1]*S`` for decode; 0 is allowed).
        ``adapter_ids[i]``: pool index, ``-1``/``None`` (no adapter) or a list of pool
        indices (rank-space composition). ``ranks[p]``: effective rank of pool entry
        ``p`` (default: the pool's ``r_max``). ``weights[i]``: None, a float, or one float
        per entry of ``adapter_ids[i]`` (multiplies that adapter's A).
        """
        lens = _as_int_list("seq_lens", seq_lens)
        for i, n in enumerate(lens):
            if n < 0:
                raise ValueError(f"seq_lens[{i}]: expected a length >= 0, got {n}")
        if isinstance(adapter_ids, torch.Tensor):
            if adapter_ids.dim() != 1 or adapter_ids.dtype.is_floating_point:
                raise TypeError(f"adapter_ids: expected a 1-D integer tensor or a list, "
                                f"got a {adapter_ids.dim()}-D {adapter_ids.dtype} tensor")
            adapter_ids = adapter_ids.tolist()
        if isinstance(adapter_ids, (str, bytes)) or not isinstance(adapter_ids, Sequence):
            raise TypeError(f"adapter_ids: expected a sequence (one entry per sequence), "
                            f"got {type(adapter_ids).__name__}")
        S = len(lens)
        if len(adapter_ids) != S:
            raise ValueError(f"adapter_ids: expected {S} entries (one per sequence in seq_lens), "
                             f"got {len(adapter_ids)}")
        if weights is not None:
            if isinstance(weights, torch.Tensor):
                if weights.dim() != 1:
                    raise ValueError(f"weights: expected a 1-D tensor (one weight per sequence) or a list, "
                                     f"got shape {list(weights.shape)}")
                weights = weights.tolist()
            if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
                raise TypeError(f"weights: expected a sequence (one entry per sequence), got {type(weights).__name__}")
            if len(weights) != S:
                raise ValueError(f"weights: expected {S} entries (one per sequence), got {len(weights)}")

        ptr, idx, wts = [0], [], []
        for i, entry in enumerate(adapter_ids):
            ids = _entry_ids(i, entry)
            ws = _entry_weights(i, None if weights is None else weights[i], len(ids))
            for p, w in zip(ids, ws):
                if p >= 0:
                    idx.append(p)
                    wts.append(w)
            ptr.append(len(idx))

        ranks_host = None
        if ranks is not None:
            ranks_host = _as_int_list("ranks", ranks)
            for p, r in enumerate(ranks_host):
                if r < 0:
                    raise ValueError(f"ranks[{p}]: expected a rank >= 0, got {r}")
            top = max(idx, default=-1)
            if top >= len(ranks_host):
                raise ValueError(f"adapter_ids: pool index {top} is out of range for ranks of length "
                                 f"{len(ranks_host)} (the pool size)")

        if device is None:
            device = ranks.device if isinstance(ranks, torch.Tensor) else torch.device("cpu")
        device = torch.device(device)
        starts = [0]
        for n in lens:
            starts.append(starts[-1] + n)

        def it(v):
            return torch.tensor(v, dtype=torch.int32).to(device)

        seq_starts = it(starts)
        device = seq_starts.device  # "cuda" -> "cuda:0": compare like with like later
        return cls(
            num_seqs=S,
            num_rows=starts[-1],
            pool_size=None if ranks_host is None else len(ranks_host),
            r_max=None,
            seq_starts=seq_starts,
            adapter_ptr=it(ptr),
            adapter_idx=it(idx),
            adapter_weight=torch.tensor(wts, dtype=torch.float32).to(device),
            ranks=None if ranks_host is None else it(ranks_host),
            max_rows_per_seq=max(lens, default=0),
            max_adapters_per_seq=max((ptr[i + 1] - ptr[i] for i in range(S)), default=0),
            is_decode=S > 0 and all(n == 1 for n in lens),
            device=device,
            seq_lens_host=lens,
            adapter_ptr_host=ptr,
            adapter_idx_host=idx,
            adapter_weight_host=wts,
            ranks_host=ranks_host,
            max_pool_index=max(idx, default=-1),
        )

    # ------------------------------------------------------------- derived
    @property
    def num_entries(self) -> int:
        return len(self.adapter_idx_host)

    @property
    def max_rank(self) -> int | None:
        """Largest effective rank in use (None when ``ranks`` was not given)."""
        if self.ranks_host is None:
            return None
        return max((self.ranks_host[p] for p in self.adapter_idx_host), default=0)

    def validate(self, *, num_rows: int, pool_size: int, r_max: int, device: torch.device) -> None:
        """Check the batch against one call's tensors (host-only, no device syncs)."""
        if self.num_rows != num_rows:
            raise ValueError(f"batch: seq_lens sum to {self.num_rows} rows but x has {num_rows} rows")
        if self.max_pool_index >= pool_size:
            raise ValueError(f"batch: adapter id {self.max_pool_index} is out of range for a pool of "
                             f"{pool_size} adapters (lora_a.shape[0])")
        if self.ranks_host is not None:
            if len(self.ranks_host) != pool_size:
                raise ValueError(f"batch: ranks has {len(self.ranks_host)} entries but the pool has "
                                 f"{pool_size} adapters (lora_a.shape[0])")
            for p, r in enumerate(self.ranks_host):
                if r > r_max:
                    raise ValueError(f"batch: ranks[{p}] = {r} exceeds r_max = {r_max} (lora_a.shape[1])")
        if self.seq_starts.device != device:
            raise ValueError(f"batch: built on {self.seq_starts.device} but x is on {device}; "
                             f"pass device= to LoraBatch.build")

    def rank_vector(self, pool_size: int, r_max: int) -> torch.Tensor:
        """int32 ``[P]`` effective ranks (``r_max`` everywhere when ``ranks`` is None)."""
        key = ("ranks", pool_size, r_max)
        t = self._cache.get(key)
        if t is None:
            if self.ranks is not None:
                t = self.ranks
            else:
                t = torch.full((pool_size,), r_max, dtype=torch.int32, device=self.device)
            self._cache[key] = t
        return t

    def tiles(self, block_m: int) -> torch.Tensor:
        """Segment-aware row-tile schedule for ``BLOCK_M``: int32 ``[T, 2]`` of
        ``(sequence, first row)``; a tile never straddles two sequences, so its adapter
        list is uniform. Empty sequences get no tile; their (zero) rows do not exist."""
        key = ("tiles", block_m)
        t = self._cache.get(key)
        if t is None:
            rows = []
            for i, n in enumerate(self.seq_lens_host):
                start = self._starts_host[i]
                for r0 in range(start, start + n, block_m):
                    rows.append((i, r0))
            t = torch.tensor(rows, dtype=torch.int32).reshape(-1, 2).to(self.device)
            self._cache[key] = t
        return t

    @property
    def _starts_host(self) -> list[int]:
        s = self._cache.get("starts_host")
        if s is None:
            s = [0]
            for n in self.seq_lens_host:
                s.append(s[-1] + n)
            self._cache["starts_host"] = s
        return s

    def to(self, device) -> "LoraBatch":
        """The same batch with its index tensors on ``device``."""
        device = torch.device(device)
        if device == self.device:
            return self
        return LoraBatch(
            num_seqs=self.num_seqs, num_rows=self.num_rows, pool_size=self.pool_size, r_max=self.r_max,
            seq_starts=self.seq_starts.to(device), adapter_ptr=self.adapter_ptr.to(device),
            adapter_idx=self.adapter_idx.to(device), adapter_weight=self.adapter_weight.to(device),
            ranks=None if self.ranks is None else self.ranks.to(device),
            max_rows_per_seq=self.max_rows_per_seq, max_adapters_per_seq=self.max_adapters_per_seq,
            is_decode=self.is_decode, device=device, seq_lens_host=self.seq_lens_host,
            adapter_ptr_host=self.adapter_ptr_host, adapter_idx_host=self.adapter_idx_host,
            adapter_weight_host=self.adapter_weight_host, ranks_host=self.ranks_host,
            max_pool_index=self.max_pool_index,
        )

    # ---------------------------------------------------------- kernel plans
    def entry_plan(self, pool_size: int, r_max: int, chunk: int) -> dict:
        """Per-entry metadata of the Triton kernels, cached per ``(P, r_max, chunk)``.

        The kernels walk each sequence's list entries (``adapter_ptr`` / ``adapter_idx`` /
        ``adapter_weight``); entry ``k`` of a sequence owns slot ``k`` of the rank-space
        buffers ``h``/``g`` (columns ``k·block_e : k·block_e + r_p``), so every slot starts
        at a multiple of ``block_e`` and all A/B/h loads are contiguous runs from a scalar
        base. ``block_e`` (a power of two >= 16 and >= ``r_max``) depends on the pool only.

        Also: ``ranks [P]`` (effective ranks, ``r_max`` when not given), ``row_seq [N]``
        (sequence of each row, for the row-wise kernels), and the backward's work items:
        each list entry's rows split into chunks of ``chunk`` rows, ordered by pool entry,
        then entry, then chunk (``item_entry``, ``item_slot``, ``item_row0``, ``item_row1``
        ``[I]``, and the pool-indexed CSR ``item_ptr [P+1]``). Partial sums of the items of
        one pool entry are added in that fixed order: the same bits every run.
        """
        key = ("entries", pool_size, r_max, chunk)
        plan = self._cache.get(key)
        if plan is not None:
            return plan
        rk = self.ranks_host if self.ranks_host is not None else [r_max] * pool_size
        ptr, idx = self.adapter_ptr_host, self.adapter_idx_host
        starts = self._starts_host
        block_e = 16
        while block_e < r_max:
            block_e *= 2
        row_seq = [i for i, n in enumerate(self.seq_lens_host) for _ in range(n)]
        items = []  # (pool, entry, slot, row0, row1)
        for i in range(self.num_seqs):
            for k in range(ptr[i], ptr[i + 1]):
                if rk[idx[k]] == 0:
                    continue
                for r0 in range(starts[i], starts[i + 1], chunk):
                    items.append((idx[k], k, k - ptr[i], r0, min(r0 + chunk, starts[i + 1])))
        items.sort(key=lambda t: (t[0], t[1], t[3]))
        item_ptr = [0] * (pool_size + 1)
        for t in items:
            item_ptr[t[0] + 1] += 1
        for p in range(pool_size):
            item_ptr[p + 1] += item_ptr[p]
        dev = self.device

        def it(v):
            return torch.tensor(v, dtype=torch.int32).to(dev)

        plan = {
            "block_e": block_e,
            "h_width": max(1, self.max_adapters_per_seq) * block_e,
            "num_items": len(items),
            "ranks": it(rk),
            "row_seq": it(row_seq),
            "item_entry": it([t[1] for t in items]),
            "item_slot": it([t[2] for t in items]),
            "item_row0": it([t[3] for t in items]),
            "item_row1": it([t[4] for t in items]),
            "item_ptr": it(item_ptr),
        }
        self._cache[key] = plan
        return plan
