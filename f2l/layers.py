"""Per-example LoRA inside any Hugging Face model.

- :func:`apply_f2l` patches the *instance's* decoder-layer linears (never the class, never
  a vision tower's same-named modules) so that, inside ``with patch.use(...)``, every
  sequence of a batch gets its own adapter (or a rank-space composition of several) through
  :func:`f2l_kernels.lora_linear`. One :class:`~f2l_kernels.LoraBatch` is built per input
  shape and shared by every patched layer. Outside a ``use`` block the modules run their
  original forward; :meth:`F2LPatch.remove` restores them exactly; ``state_dict`` keys
  never change (only the bound ``forward`` is replaced).
- :class:`AdapterPool` keeps many videos' adapters resident in pooled tensors (one slot
  per adapter, add/remove by key, no re-stacking per batch); ``patch.use_pool(pool, slots)``
  feeds them to ``LoraBatch`` directly (a composition is a list of slots): the basis for
  serving many videos in one batch.
- :class:`LoRALinear` is a drop-in ``nn.Linear`` (same Parameters, same ``state_dict``
  keys) for model code that is not a Hugging Face decoder stack.

Example::

    patch = apply_f2l(model, target_modules=("down_proj",))
    with patch.use(out.lora_a, out.lora_b, [0, 1, [0, 1], -1], scale=out.scale):
        logits = model(input_ids=ids, attention_mask=mask).logits   # ids [4, T]
    patch.remove()

Length: ``F2LPatch``, ``AdapterPool`` and ``LoRALinear`` are three faces of one mechanism:
they share the adapter-id, scale, rank and sequence-length checks and the one
``LoraBatch`` built per input shape, and ``F2LPatch.use_pool`` reads the pool's layout
directly; apart, one contract (docs/internals.md, "Per-example LoRA in a model") would be
spread over several files.
"""
from __future__ import annotations

import contextlib
import heapq
import math
from dataclasses import dataclass, field
from typing import Any, Hashable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from f2l.adapter import VideoAdapter
from f2l_kernels import LoraBatch, lora_delta, lora_linear

__all__ = ["apply_f2l", "F2LPatch", "AdapterPool", "LoRALinear", "find_decoder_layers"]

# Known places of the text decoder stack, most specific first.
_KNOWN_LAYER_PATHS = (
    "model.text_model.layers",       # SmolVLM / Idefics3 ForConditionalGeneration
    "text_model.layers",             # SmolVLMModel
    "model.language_model.layers",   # Llava-style VLMs in transformers >= 4.52
    "language_model.model.layers",
    "language_model.layers",
    "model.layers",                  # LlamaForCausalLM and friends
    "layers",                        # LlamaModel
)
# Path components that mark a non-text tower; its "layers" are never patched.
_NON_TEXT_WORDS = ("vision", "visual", "image", "img", "audio", "speech", "connector", "projector", "vit")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return ``(path, layers)`` of the text decoder stack of ``model``.

    Tries the known paths (SmolVLM2: ``model.text_model.layers``; Llama: ``model.layers``),
    then any ``nn.ModuleList`` named ``layers`` outside a vision/audio tower; more than one
    such candidate is an error (pass ``layers=`` to :func:`apply_f2l`).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    for path in _KNOWN_LAYER_PATHS:
        try:
            mod = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            return path, mod
    cands = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0 or name.split(".")[-1] != "layers":
            continue
        if any(w in part.lower() for part in name.split(".") for w in _NON_TEXT_WORDS):
            continue
        cands.append((name, mod))
    if len(cands) == 1:
        return cands[0]
    if not cands:
        raise ValueError(
            f"model: found no decoder layer list (an nn.ModuleList named 'layers' outside a vision tower) "
            f"in {type(model).__name__}; pass layers='path.to.layers'"
        )
    raise ValueError(
        f"model: several candidate decoder layer lists {[n for n, _ in cands]}; pass layers='path.to.layers'"
    )


# --------------------------------------------------------------------------- shared core


def _check_adapter_ids(adapter_ids, P: int, name: str = "adapter_ids") -> list:
    if isinstance(adapter_ids, Tensor):
        adapter_ids = adapter_ids.tolist()
    if not isinstance(adapter_ids, (list, tuple)) or len(adapter_ids) == 0:
        raise ValueError(f"{name}: expected a non-empty list (one entry per sequence), got {adapter_ids!r}")
    out = []
    for i, e in enumerate(adapter_ids):
        if e is None or (_is_int(e) and e == -1):
            out.append(-1)
            continue
        items = e if isinstance(e, (list, tuple)) else [e]
        for j in items:
            if isinstance(e, (list, tuple)) and (j is None or (_is_int(j) and j == -1)):
                continue  # a no-adapter entry inside a composition list is dropped by LoraBatch
            if not _is_int(j) or not 0 <= j < P:
                raise ValueError(
                    f"{name}[{i}]: expected a pool index in [0, {P}), -1/None, or a list of pool indices; got {e!r}"
                )
        out.append(list(items) if isinstance(e, (list, tuple)) else int(e))
    return out


def _check_scale(scale, P: int, device) -> float | Tensor:
    if isinstance(scale, Tensor):
        if scale.dim() != 1 or scale.shape[0] != P or not scale.is_floating_point():
            raise ValueError(f"scale: expected a float or a float tensor of shape [P={P}], got {scale.dtype} "
                             f"{list(scale.shape)}")
        return scale.to(device=device, dtype=torch.float32)
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise ValueError(f"scale: expected a finite float or a tensor [P], got {scale!r}")
    return float(scale)


def _check_batch_args(ids: list, ranks, weights, r_max: int, device) -> None:
    """Surface bad ``ranks``/``weights`` when the block starts, not inside the first layer."""
    probe = LoraBatch.build([0] * len(ids), ids, ranks=ranks, weights=weights, device=device)
    if probe.ranks_host is not None and probe.ranks_host and max(probe.ranks_host) > r_max:
        raise ValueError(f"ranks: expected ranks <= r_max={r_max}, got {probe.ranks_host}")


def _check_seq_lens(seq_lens, S: int):
    if seq_lens is None:
        return None
    if isinstance(seq_lens, Tensor):
        seq_lens = seq_lens.tolist()
    if (not isinstance(seq_lens, (list, tuple)) or len(seq_lens) != S
            or not all(_is_int(n) and n >= 0 for n in seq_lens)):
        raise ValueError(f"seq_lens: expected {S} non-negative ints (one per sequence), got {seq_lens!r}")
    return [int(n) for n in seq_lens]


@dataclass
class _Active:
    """State of one ``use`` block: the pool and per-sequence adapter lists."""

    lora_a: dict[str, Tensor]  # module -> [L, P, r_max, d_in]
    lora_b: dict[str, Tensor]  # module -> [L, P, d_out, r_max]
    adapter_ids: list
    scale: float | Tensor
    ranks: Any
    weights: Any
    seq_lens: list[int] | None
    backend: str | None
    batches: dict = field(default_factory=dict)

    def batch_for(self, x: Tensor) -> tuple[LoraBatch, Tensor]:
        """The LoraBatch for input ``x`` (cached per shape) and ``x`` flattened to rows."""
        S = len(self.adapter_ids)
        d = x.shape[-1]
        if self.seq_lens is not None:
            n = x.numel() // d
            if n != sum(self.seq_lens):
                raise ValueError(f"x: expected {sum(self.seq_lens)} rows (sum of seq_lens), got shape {list(x.shape)}")
            key, lens = ("packed", n), self.seq_lens
        elif x.dim() == 3:
            if x.shape[0] != S:
                raise ValueError(
                    f"x: expected a batch of {S} sequences (len(adapter_ids)), got shape {list(x.shape)}"
                )
            key, lens = ("padded", x.shape[1]), None
        elif x.dim() == 2 and x.shape[0] == S:
            key, lens = ("decode", 1), None
        else:
            raise ValueError(
                f"x: expected [S={S}, T, d] or [S={S}, d] (or pass seq_lens= for packed rows), got {list(x.shape)}"
            )
        b = self.batches.get(key)
        if b is None:
            if lens is None:
                lens = [key[1]] * S
            b = LoraBatch.build(lens, self.adapter_ids, ranks=self.ranks, weights=self.weights, device=x.device)
            self.batches[key] = b
        return b, x.reshape(-1, d)


def _lora_forward(base_forward, weight: Tensor, bias: Tensor | None, x: Tensor, a: Tensor, b: Tensor,
                  act: _Active, fusable: bool = True) -> Tensor:
    """``base(x) + scale * per-sequence LoRA delta``, fused when the base is a plain frozen linear."""
    batch, x2 = act.batch_for(x)
    if a.dtype != x.dtype:
        a, b = a.to(x.dtype), b.to(x.dtype)
    if (fusable and not weight.requires_grad and (bias is None or not bias.requires_grad)
            and weight.dtype == x.dtype):
        y = lora_linear(x2, weight, bias, a, b, batch, scale=act.scale, backend=act.backend)
        return y.reshape(*x.shape[:-1], weight.shape[0])
    # trainable, mixed-dtype (autocast) or custom (e.g. quantised) base: its own forward owns
    # the base product and only the delta goes through the kernel
    base = base_forward(x)
    delta = lora_delta(x2, a, b, batch, scale=act.scale, backend=act.backend)
    return base + delta.reshape(base.shape).to(base.dtype)


# --------------------------------------------------------------------------- patch


class F2LPatch:
    """Handle returned by :func:`apply_f2l`.

    Attributes: ``model``, ``layers_path`` (e.g. ``"model.text_model.layers"``), ``layer_ids``
    (patched decoder layers; position ``i`` of the adapters' layer axis drives
    ``layer_ids[i]``), ``target_modules``, ``module_paths`` (module -> path inside a layer,
    e.g. ``{"down_proj": "mlp.down_proj"}``), ``module_shapes`` (module -> (d_in, d_out)),
    ``backend``.

    The patch replaces each module's bound ``forward`` on the instance; ``remove()`` it
    before deep-copying or pickling the model (a copy would share the patched closures).
    Usable as a context manager: ``with apply_f2l(model) as patch: ...`` removes on exit.
    """

    def __init__(self, model, layers_path, layer_ids, sites, module_paths, backend):
        self.model = model
        self.layers_path = layers_path
        self.layer_ids = list(layer_ids)
        self._sites = sites  # (pos, name) -> nn.Linear
        self.module_paths = dict(module_paths)
        self.target_modules = tuple(module_paths)
        self.module_shapes = {
            m: (sites[(0, m)].in_features, sites[(0, m)].out_features) for m in self.target_modules
        }
        self.backend = backend
        self._stack: list[_Active] = []
        self._saved: dict[int, Any] = {}
        self.removed = False

    @property
    def num_layers(self) -> int:
        return len(self.layer_ids)

    @property
    def active(self) -> bool:
        return bool(self._stack)

    def _install(self) -> None:
        for (pos, name), mod in self._sites.items():
            if getattr(mod, "_f2l_patched", False):
                raise ValueError(f"model: {self.layers_path}.{self.layer_ids[pos]}.{self.module_paths[name]} "
                                 f"is already patched; remove() the previous patch first")
        for (pos, name), mod in self._sites.items():
            had = "forward" in mod.__dict__
            self._saved[id(mod)] = mod.__dict__["forward"] if had else None
            orig = mod.__dict__["forward"] if had else type(mod).forward.__get__(mod)
            mod.forward = self._make_forward(mod, orig, pos, name)
            mod._f2l_patched = True

    def _make_forward(self, mod: nn.Linear, orig, pos: int, name: str):
        patch = self
        # only a plain nn.Linear may be replaced by the fused kernel; subclasses with their own
        # forward (quantised, hooked) keep it and get the delta added
        fusable = type(mod).forward is nn.Linear.forward and "forward" not in mod.__dict__

        def forward(x, *args, **kwargs):
            act = patch._stack[-1] if patch._stack else None
            if act is None or name not in act.lora_a or args or kwargs:
                return orig(x, *args, **kwargs)
            return _lora_forward(orig, mod.weight, mod.bias, x, act.lora_a[name][pos], act.lora_b[name][pos], act,
                                 fusable)

        return forward

    def remove(self) -> None:
        """Restore every patched module's original forward (idempotent)."""
        if self.removed:
            return
        for mod in self._sites.values():
            saved = self._saved.pop(id(mod), None)
            if saved is None:
                mod.__dict__.pop("forward", None)
            else:
                mod.forward = saved
            mod.__dict__.pop("_f2l_patched", None)
        self._stack.clear()
        self.removed = True

    # ------------------------------------------------------------------ contexts

    @contextlib.contextmanager
    def use(self, lora_a: Mapping[str, Tensor], lora_b: Mapping[str, Tensor], adapter_ids: Sequence, *,
            scale: float | Tensor, ranks=None, weights=None, seq_lens=None):
        """Run the model with per-sequence adapters from a pool.

        ``lora_a[m]`` ``[L, P, r_max, d_in]`` and ``lora_b[m]`` ``[L, P, d_out, r_max]`` with
        ``L = len(layer_ids)`` (modules left out run without LoRA); ``adapter_ids[i]`` is a pool
        index, ``-1``/``None`` or a list of indices (rank-space composition) for sequence i;
        ``scale``: float or float tensor ``[P]``; ``ranks`` / ``weights`` as in
        :meth:`f2l_kernels.LoraBatch.build`. Inputs are padded ``[S, T, d]`` batches or
        decode steps ``[S, d]``; pass ``seq_lens`` for packed rows. Gradients flow to
        ``lora_a``/``lora_b``. Blocks nest (the innermost wins).
        """
        act = self._activate(lora_a, lora_b, adapter_ids, scale=scale, ranks=ranks, weights=weights,
                             seq_lens=seq_lens)
        self._stack.append(act)
        try:
            yield self
        finally:
            self._stack.remove(act)

    def use_pool(self, pool: "AdapterPool", adapter_ids: Sequence, *, weights=None, seq_lens=None):
        """:meth:`use` with the adapters resident in ``pool``: ``adapter_ids[i]`` is a slot
        (``pool.add`` returns it; ``pool.slots(keys)`` translates keys), ``-1``/``None`` (no
        adapter) or a list of slots (composition). Per-slot ranks and scales come from the pool."""
        if not isinstance(pool, AdapterPool):
            raise TypeError(f"pool: expected an AdapterPool, got {type(pool).__name__}")
        ids = _check_adapter_ids(adapter_ids, pool.capacity)
        occupied = set(pool._slots.values())
        for i, e in enumerate(ids):
            for s in (e if isinstance(e, list) else [e]):
                if s != -1 and s not in occupied:
                    raise ValueError(f"adapter_ids[{i}]: slot {s} of the pool is empty")
        return self.use(pool.lora_a, pool.lora_b, ids, scale=pool.scales, ranks=pool.ranks,
                        weights=weights, seq_lens=seq_lens)

    def _activate(self, lora_a, lora_b, adapter_ids, *, scale, ranks, weights, seq_lens) -> _Active:
        if self.removed:
            raise RuntimeError("patch: this F2LPatch was removed; call apply_f2l again")
        for nm, d in (("lora_a", lora_a), ("lora_b", lora_b)):
            if not isinstance(d, Mapping) or not d:
                raise TypeError(f"{nm}: expected a non-empty dict module -> Tensor, got {type(d).__name__}")
        if set(lora_a) != set(lora_b):
            raise ValueError(f"lora_b: expected the modules of lora_a {sorted(lora_a)}, got {sorted(lora_b)}")
        unknown = sorted(set(lora_a) - set(self.target_modules))
        if unknown:
            raise ValueError(f"lora_a: modules {unknown} are not patched (patched: {list(self.target_modules)})")
        L = self.num_layers
        P = r_max = None
        cast_a, cast_b = {}, {}
        for m in lora_a:
            a, b = lora_a[m], lora_b[m]
            d_in, d_out = self.module_shapes[m]
            for nm, t in (("lora_a", a), ("lora_b", b)):
                if not isinstance(t, Tensor):
                    raise TypeError(f"{nm}[{m!r}]: expected a torch.Tensor, got {type(t).__name__}")
                if not t.is_floating_point():
                    raise TypeError(f"{nm}[{m!r}]: expected a floating dtype, got {t.dtype}")
            if P is None:
                P, r_max = (a.shape[1], a.shape[2]) if a.dim() == 4 else (None, None)
            if a.dim() != 4 or tuple(a.shape) != (L, P, r_max, d_in):
                raise ValueError(f"lora_a[{m!r}]: expected shape [L={L}, P={P}, r_max={r_max}, d_in={d_in}], "
                                 f"got {list(a.shape)}")
            if b.dim() != 4 or tuple(b.shape) != (L, P, d_out, r_max):
                raise ValueError(f"lora_b[{m!r}]: expected shape [L={L}, P={P}, d_out={d_out}, r_max={r_max}], "
                                 f"got {list(b.shape)}")
            w = self._sites[(0, m)].weight
            if a.device != w.device or b.device != w.device:
                raise ValueError(f"lora_a[{m!r}]: expected tensors on the model's device {w.device}, "
                                 f"got {a.device} / {b.device}")
            # one cast per block (not per layer); differentiable, so hypernet training works
            cast_a[m] = a if a.dtype == w.dtype else a.to(w.dtype)
            cast_b[m] = b if b.dtype == w.dtype else b.to(w.dtype)
        ids = _check_adapter_ids(adapter_ids, P)
        device = next(iter(cast_a.values())).device
        sc = _check_scale(scale, P, device)
        if ranks is not None:
            if isinstance(ranks, Tensor):
                if ranks.dim() != 1 or ranks.shape[0] != P:
                    raise ValueError(f"ranks: expected shape [P={P}], got {list(ranks.shape)}")
            elif not isinstance(ranks, (list, tuple)) or len(ranks) != P:
                raise ValueError(f"ranks: expected {P} ints (one per pool entry), got {ranks!r}")
        _check_batch_args(ids, ranks, weights, r_max, device)
        return _Active(cast_a, cast_b, ids, sc, ranks, weights, _check_seq_lens(seq_lens, len(ids)), self.backend)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    def __repr__(self) -> str:
        return (f"F2LPatch(layers_path={self.layers_path!r}, layers={len(self.layer_ids)}, "
                f"modules={self.module_paths}, removed={self.removed})")


def apply_f2l(model: nn.Module, target_modules: str | Sequence[str] = ("down_proj",), *,
              layer_ids: Iterable[int] | None = None, layers: str | nn.ModuleList | None = None,
              backend: str | None = None) -> F2LPatch:
    """Patch ``model``'s text-decoder linears for per-example LoRA; returns an :class:`F2LPatch`.

    ``target_modules``: module names inside a decoder layer (``"down_proj"`` or a dotted path
    ``"mlp.down_proj"``); each layer must hold exactly one ``nn.Linear`` per name.
    ``layer_ids``: decoder layers to patch (default: all); the adapters' layer axis follows
    this order. ``layers``: the decoder ``nn.ModuleList`` or its path, when it cannot be
    found automatically (see :func:`find_decoder_layers`). ``backend``: the
    ``lora_linear`` backend (default automatic).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if isinstance(target_modules, str):
        target_modules = (target_modules,)
    if (not isinstance(target_modules, (list, tuple)) or not target_modules
            or not all(isinstance(t, str) and t for t in target_modules)):
        raise ValueError(f"target_modules: expected module names such as ('down_proj',), got {target_modules!r}")
    short = [t.split(".")[-1] for t in target_modules]
    if len(set(short)) != len(short):
        raise ValueError(f"target_modules: expected distinct module names, got {list(target_modules)}")
    if layers is None:
        layers_path, layer_list = find_decoder_layers(model)
    elif isinstance(layers, str):
        try:
            layer_list = model.get_submodule(layers)
        except AttributeError:
            raise ValueError(f"layers: model has no submodule {layers!r}") from None
        layers_path = layers
    elif isinstance(layers, nn.ModuleList):
        found = [n for n, m in model.named_modules() if m is layers]
        if not found:
            raise ValueError("layers: the given ModuleList is not a submodule of model")
        layers_path, layer_list = found[0], layers
    else:
        raise TypeError(f"layers: expected a path or an nn.ModuleList, got {type(layers).__name__}")
    if not isinstance(layer_list, nn.ModuleList) or len(layer_list) == 0:
        raise ValueError(f"layers: {layers_path!r} is not a non-empty nn.ModuleList")
    n = len(layer_list)
    if layer_ids is None:
        layer_ids = list(range(n))
    else:
        layer_ids = list(layer_ids)
        if (not layer_ids or not all(_is_int(i) and 0 <= i < n for i in layer_ids)
                or len(set(layer_ids)) != len(layer_ids)):
            raise ValueError(f"layer_ids: expected distinct ints in [0, {n}), got {layer_ids!r}")
    sites, module_paths = {}, {}
    for pos, li in enumerate(layer_ids):
        layer = layer_list[li]
        for t, m in zip(target_modules, short):
            if "." in t:
                try:
                    found = [(t, layer.get_submodule(t))]
                except AttributeError:
                    found = []
            else:
                found = [(p, mod) for p, mod in layer.named_modules() if p.split(".")[-1] == t]
            if len(found) != 1:
                raise ValueError(
                    f"target_modules: expected exactly one module {t!r} in {layers_path}.{li}, "
                    f"found {[p for p, _ in found]}"
                )
            rel, mod = found[0]
            if not isinstance(mod, nn.Linear):
                raise TypeError(f"target_modules: {layers_path}.{li}.{rel} is a {type(mod).__name__}, "
                                f"expected an nn.Linear")
            prev = module_paths.setdefault(m, rel)
            if prev != rel:
                raise ValueError(f"target_modules: {m!r} sits at {prev!r} in one layer and {rel!r} in another")
            if pos and (mod.in_features, mod.out_features) != (sites[(0, m)].in_features,
                                                               sites[(0, m)].out_features):
                raise ValueError(f"target_modules: {layers_path}.{li}.{rel} has a different shape than in "
                                 f"layer {layer_ids[0]}")
            sites[(pos, m)] = mod
    patch = F2LPatch(model, layers_path, layer_ids, sites, module_paths, backend)
    patch._install()
    return patch


# --------------------------------------------------------------------------- pool


class AdapterPool:
    """Adapters resident in pooled tensors, one slot each, for serving many videos at once.

    ``lora_a[m]`` ``[L, P, r_max, d_in]``, ``lora_b[m]`` ``[L, P, d_out, r_max]``, ``ranks``
    int32 ``[P]`` (0 for a free slot), ``scales`` float32 ``[P]``. ``add`` writes one slot in
    place (the lowest free one); when the pool is full it doubles its capacity (one copy,
    amortised; tensors handed out earlier then refer to the old storage) unless
    ``grow=False``, in which case ``add`` raises. ``remove`` zeroes the slot. Adapters of
    rank < ``r_max`` are zero-padded and their rank recorded in ``ranks``.
    """

    def __init__(self, num_layers: int, module_shapes: Mapping[str, tuple[int, int]], r_max: int, capacity: int,
                 *, device=None, dtype: torch.dtype = torch.float32, grow: bool = True,
                 base_fingerprint: str | None = None):
        for nm, v in (("num_layers", num_layers), ("r_max", r_max), ("capacity", capacity)):
            if not _is_int(v) or v < 1:
                raise ValueError(f"{nm}: expected a positive int, got {v!r}")
        if not isinstance(module_shapes, Mapping) or not module_shapes:
            raise ValueError(f"module_shapes: expected a non-empty dict module -> (d_in, d_out), got {module_shapes!r}")
        for m, s in module_shapes.items():
            if (not isinstance(m, str) or not isinstance(s, (tuple, list)) or len(s) != 2
                    or not all(_is_int(d) and d > 0 for d in s)):
                raise ValueError(f"module_shapes[{m!r}]: expected (d_in, d_out) positive ints, got {s!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype: expected a floating torch.dtype, got {dtype!r}")
        self.num_layers, self.r_max = num_layers, r_max
        self.module_shapes = {m: (int(s[0]), int(s[1])) for m, s in sorted(module_shapes.items())}
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype, self.grow, self.base_fingerprint = dtype, grow, base_fingerprint
        self._slots: dict[Hashable, int] = {}
        self._free: list[int] = []
        self._alloc(capacity)

    def _alloc(self, capacity: int) -> None:
        old = getattr(self, "lora_a", None)
        L, r = self.num_layers, self.r_max
        kw = dict(device=self.device, dtype=self.dtype)
        new_a = {m: torch.zeros(L, capacity, r, di, **kw) for m, (di, _) in self.module_shapes.items()}
        new_b = {m: torch.zeros(L, capacity, do, r, **kw) for m, (_, do) in self.module_shapes.items()}
        ranks = torch.zeros(capacity, dtype=torch.int32, device=self.device)
        scales = torch.zeros(capacity, dtype=torch.float32, device=self.device)
        start = 0
        if old is not None:
            start = self.capacity
            for m in new_a:
                new_a[m][:, :start] = self.lora_a[m]
                new_b[m][:, :start] = self.lora_b[m]
            ranks[:start] = self.ranks
            scales[:start] = self.scales
        self.lora_a, self.lora_b, self.ranks, self.scales = new_a, new_b, ranks, scales
        for s in range(start, capacity):
            heapq.heappush(self._free, s)

    @property
    def capacity(self) -> int:
        return self.ranks.shape[0]

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, key) -> bool:
        return key in self._slots

    def keys(self) -> list:
        return list(self._slots)

    def slot(self, key) -> int:
        try:
            return self._slots[key]
        except (KeyError, TypeError):
            raise KeyError(f"key: no adapter {key!r} in the pool (keys: {list(self._slots)[:8]})") from None

    def slots(self, keys: Sequence) -> list:
        """Translate per-sequence keys (``None`` = no adapter, a list = composition) to the
        slot ids :meth:`F2LPatch.use_pool` takes."""
        if not isinstance(keys, (list, tuple)) or not keys:
            raise ValueError(f"keys: expected a non-empty list of pool keys, got {keys!r}")
        return [-1 if k is None else [self.slot(j) for j in k] if isinstance(k, list) else self.slot(k)
                for k in keys]

    def add(self, key: Hashable, adapter: VideoAdapter) -> int:
        """Copy ``adapter`` into a free slot; returns the slot."""
        if key is None or isinstance(key, list):
            raise TypeError(f"key: expected a hashable key other than None or a list, got {key!r}")
        if key in self._slots:
            raise ValueError(f"key: {key!r} is already in the pool; remove it first")
        if not isinstance(adapter, VideoAdapter):
            raise TypeError(f"adapter: expected a VideoAdapter, got {type(adapter).__name__}")
        adapter.check_base(self.base_fingerprint, what="adapter")
        if adapter.module_shapes != self.module_shapes or adapter.num_layers != self.num_layers:
            raise ValueError(
                f"adapter: expected {self.num_layers} layers with modules {self.module_shapes}, "
                f"got {adapter.num_layers} layers with {adapter.module_shapes}"
            )
        r = adapter.rank
        if r > self.r_max:
            raise ValueError(f"adapter: rank {r} exceeds the pool's r_max={self.r_max}")
        if not self._free:
            if not self.grow:
                raise ValueError(f"capacity: the pool is full ({self.capacity} adapters) and grow=False")
            self._alloc(2 * self.capacity)
        s = heapq.heappop(self._free)
        with torch.no_grad():
            for m in self.module_shapes:
                self.lora_a[m][:, s, :r] = adapter.lora_a[m]
                self.lora_a[m][:, s, r:] = 0
                self.lora_b[m][:, s, :, :r] = adapter.lora_b[m]
                self.lora_b[m][:, s, :, r:] = 0
            self.ranks[s] = r
            self.scales[s] = adapter.scale
        self._slots[key] = s
        return s

    def remove(self, key: Hashable) -> None:
        s = self.slot(key)
        with torch.no_grad():
            for m in self.module_shapes:
                self.lora_a[m][:, s] = 0
                self.lora_b[m][:, s] = 0
            self.ranks[s] = 0
            self.scales[s] = 0
        del self._slots[key]
        heapq.heappush(self._free, s)

    def __repr__(self) -> str:
        return (f"AdapterPool(size={len(self)}, capacity={self.capacity}, layers={self.num_layers}, "
                f"r_max={self.r_max}, modules={self.module_shapes}, dtype={self.dtype}, device={self.device})")


# --------------------------------------------------------------------------- drop-in


class LoRALinear(nn.Linear):
    """Drop-in replacement for an existing ``nn.Linear`` with per-example LoRA.

    Shares the original ``weight``/``bias`` Parameters (same ``state_dict`` keys; still an
    ``nn.Linear``). Without adapters it is exactly the wrapped linear.

    Example::

        layer.proj = LoRALinear(layer.proj)
        layer.proj.set_adapters(lora_a, lora_b, [0, -1, [0, 1]], scale=2.0)  # [P, r, d_in] / [P, d_out, r]
        y = layer.proj(x)                                                     # x [3, T, d_in]
        layer.proj.clear_adapters()
    """

    def __init__(self, linear: nn.Linear, *, backend: str | None = None):
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.backend = backend
        self._active: _Active | None = None

    def set_adapters(self, lora_a: Tensor, lora_b: Tensor, adapter_ids: Sequence, *, scale: float | Tensor = 1.0,
                     ranks=None, weights=None, seq_lens=None) -> None:
        """``lora_a [P, r_max, d_in]``, ``lora_b [P, d_out, r_max]``; ids as in :meth:`F2LPatch.use`."""
        for nm, t in (("lora_a", lora_a), ("lora_b", lora_b)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{nm}: expected a torch.Tensor, got {type(t).__name__}")
            if not t.is_floating_point():
                raise TypeError(f"{nm}: expected a floating dtype, got {t.dtype}")
        if lora_a.dim() != 3 or lora_a.shape[2] != self.in_features:
            raise ValueError(f"lora_a: expected shape [P, r_max, d_in={self.in_features}], got {list(lora_a.shape)}")
        P, r = lora_a.shape[:2]
        if tuple(lora_b.shape) != (P, self.out_features, r):
            raise ValueError(f"lora_b: expected shape [P={P}, d_out={self.out_features}, r_max={r}], "
                             f"got {list(lora_b.shape)}")
        if lora_a.device != self.weight.device or lora_b.device != self.weight.device:
            raise ValueError(f"lora_a: expected tensors on {self.weight.device}, got {lora_a.device} / {lora_b.device}")
        ids = _check_adapter_ids(adapter_ids, P)
        a = lora_a if lora_a.dtype == self.weight.dtype else lora_a.to(self.weight.dtype)
        b = lora_b if lora_b.dtype == self.weight.dtype else lora_b.to(self.weight.dtype)
        _check_batch_args(ids, ranks, weights, r, a.device)
        self._active = _Active({"": a[None]}, {"": b[None]}, ids, _check_scale(scale, P, a.device), ranks, weights,
                               _check_seq_lens(seq_lens, len(ids)), self.backend)

    def clear_adapters(self) -> None:
        self._active = None

    def forward(self, x: Tensor) -> Tensor:
        act = self._active
        if act is None:
            return F.linear(x, self.weight, self.bias)
        return _lora_forward(lambda t: F.linear(t, self.weight, self.bias), self.weight, self.bias, x,
                             act.lora_a[""][0], act.lora_b[""][0], act)
