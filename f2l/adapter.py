"""VideoAdapter: the LoRA adapter one video internalises into, with its provenance.

Layout (PEFT's, per layer): ``lora_a[module]`` is ``[L, r, d_in]`` and ``lora_b[module]``
``[L, d_out, r]``; the delta of layer l is ``scale * (x A_l^T) B_l^T`` (``scale`` multiplies
directly; the official value is ``2 * r**1.5`` for r = 16).

Ranks are ordered ``[segment_0 | segment_1 | ... | bias]``: ``segments`` lists the
context-dependent ranks of each composed part (one entry when not composed) and the last
``bias_rank`` ranks are the hypernetwork's context-free "bias LoRA" (shared by every
video of one hypernetwork; kept once when composing).

Files are safetensors only (tensors ``lora_a.<module>`` / ``lora_b.<module>``, provenance in
the string metadata) and are written atomically.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from safetensors import safe_open
from torch import Tensor

from f2l.checks import check_finite
from f2l.files import atomic_dir, atomic_save_safetensors, atomic_write_text

__all__ = ["VideoAdapter", "FORMAT", "DEFAULT_LAYERS_PATH", "default_module_path"]

FORMAT = "f2l.video_adapter"
FORMAT_VERSION = 1
# SmolVLMForConditionalGeneration keeps its decoder layers here (a plain Llama: "model.layers").
DEFAULT_LAYERS_PATH = "model.text_model.layers"
_MLP = ("gate_proj", "up_proj", "down_proj")
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


def _library_version() -> str:
    try:
        from f2l_kernels import __version__
        return __version__
    except Exception:  # the version string must never block saving an adapter
        return "unknown"


def default_module_path(name: str) -> str:
    """Path of a target module inside a Llama-style decoder layer (``down_proj`` -> ``mlp.down_proj``)."""
    if name in _MLP:
        return f"mlp.{name}"
    if name in _ATTN:
        return f"self_attn.{name}"
    raise ValueError(
        f"module_paths: no default path inside a decoder layer for module {name!r}; "
        f"pass module_paths={{{name!r}: 'submodule.{name}'}}"
    )


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(eq=False)
class VideoAdapter:
    """LoRA factors for every (layer, target module) of a base model, plus provenance.

    Example::

        ad = VideoAdapter.load("clip.safetensors", base_fingerprint=base.fingerprint)
        both = VideoAdapter.compose([ad, other], weights=[1.0, 0.5])
        both.save("both.safetensors"); both.to_peft("peft_dir", layers_path="model.layers")
    """

    lora_a: dict[str, Tensor]  # module -> [L, r, d_in]
    lora_b: dict[str, Tensor]  # module -> [L, d_out, r]
    scale: float
    base_fingerprint: str = ""
    num_frames: int = 0
    source: str = ""
    metadata: dict = field(default_factory=dict)
    segments: list[int] | None = None
    bias_rank: int = 0

    def __post_init__(self):
        for name in ("lora_a", "lora_b"):
            d = getattr(self, name)
            if not isinstance(d, Mapping) or not d:
                raise TypeError(f"{name}: expected a non-empty dict module name -> Tensor, got {type(d).__name__}")
            for k, t in d.items():
                if not isinstance(k, str) or not k:
                    raise TypeError(f"{name}: expected str module names, got {k!r}")
                if not isinstance(t, Tensor):
                    raise TypeError(f"{name}[{k!r}]: expected a torch.Tensor, got {type(t).__name__}")
        if set(self.lora_a) != set(self.lora_b):
            raise ValueError(
                f"lora_b: expected the same modules as lora_a {sorted(self.lora_a)}, got {sorted(self.lora_b)}"
            )
        self.lora_a = {k: self.lora_a[k] for k in sorted(self.lora_a)}
        self.lora_b = {k: self.lora_b[k] for k in sorted(self.lora_b)}
        first = next(iter(self.lora_a.values()))
        L, r = (first.shape[0], first.shape[1]) if first.dim() == 3 else (None, None)
        for m in self.lora_a:
            a, b = self.lora_a[m], self.lora_b[m]
            if a.dim() != 3 or a.shape[0] != L or a.shape[1] != r:
                raise ValueError(f"lora_a[{m!r}]: expected shape [L={L}, r={r}, d_in], got {list(a.shape)}")
            if b.dim() != 3 or b.shape[0] != L or b.shape[2] != r:
                raise ValueError(f"lora_b[{m!r}]: expected shape [L={L}, d_out, r={r}], got {list(b.shape)}")
            for name, t in (("lora_a", a), ("lora_b", b)):
                if not t.is_floating_point():
                    raise TypeError(f"{name}[{m!r}]: expected a floating dtype, got {t.dtype}")
                if t.dtype != first.dtype or t.device != first.device:
                    raise ValueError(
                        f"{name}[{m!r}]: expected {first.dtype} on {first.device} like the other factors, "
                        f"got {t.dtype} on {t.device}"
                    )
        if L == 0 or r == 0:
            raise ValueError(f"lora_a: expected at least one layer and one rank, got shape {list(first.shape)}")
        if not isinstance(self.scale, (int, float)) or isinstance(self.scale, bool) or not math.isfinite(self.scale):
            raise ValueError(f"scale: expected a finite float, got {self.scale!r}")
        self.scale = float(self.scale)
        if not _is_int(self.bias_rank) or not 0 <= self.bias_rank < r:
            raise ValueError(f"bias_rank: expected an int in [0, rank={r}), got {self.bias_rank!r}")
        if self.segments is None:
            self.segments = [r - self.bias_rank]
        if (not isinstance(self.segments, (list, tuple)) or not self.segments
                or not all(_is_int(s) and s > 0 for s in self.segments)
                or sum(self.segments) + self.bias_rank != r):
            raise ValueError(
                f"segments: expected positive ints summing to rank - bias_rank = {r - self.bias_rank}, "
                f"got {self.segments!r}"
            )
        self.segments = list(self.segments)
        if not isinstance(self.base_fingerprint, str):
            raise TypeError(f"base_fingerprint: expected a str, got {type(self.base_fingerprint).__name__}")
        if not isinstance(self.source, str):
            raise TypeError(f"source: expected a str, got {type(self.source).__name__}")
        if not _is_int(self.num_frames) or self.num_frames < 0:
            raise ValueError(f"num_frames: expected a non-negative int, got {self.num_frames!r}")
        if not isinstance(self.metadata, dict):
            raise TypeError(f"metadata: expected a dict, got {type(self.metadata).__name__}")

    # ------------------------------------------------------------------ properties

    @property
    def rank(self) -> int:
        return next(iter(self.lora_a.values())).shape[1]

    @property
    def target_modules(self) -> tuple[str, ...]:
        return tuple(self.lora_a)

    @property
    def num_layers(self) -> int:
        return next(iter(self.lora_a.values())).shape[0]

    @property
    def module_shapes(self) -> dict[str, tuple[int, int]]:
        return {m: (self.lora_a[m].shape[2], self.lora_b[m].shape[1]) for m in self.lora_a}

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.lora_a.values())).dtype

    @property
    def device(self) -> torch.device:
        return next(iter(self.lora_a.values())).device

    def __repr__(self) -> str:
        return (f"VideoAdapter(modules={list(self.target_modules)}, layers={self.num_layers}, rank={self.rank}, "
                f"segments={self.segments}, bias_rank={self.bias_rank}, scale={self.scale:g}, "
                f"frames={self.num_frames}, source={self.source!r}, dtype={self.dtype}, device={self.device})")

    def _replace(self, **kw) -> "VideoAdapter":
        d = dict(lora_a=self.lora_a, lora_b=self.lora_b, scale=self.scale, base_fingerprint=self.base_fingerprint,
                 num_frames=self.num_frames, source=self.source, metadata=dict(self.metadata),
                 segments=list(self.segments), bias_rank=self.bias_rank)
        d.update(kw)
        return VideoAdapter(**d)

    def to(self, device=None, dtype: torch.dtype | None = None) -> "VideoAdapter":
        """A copy on ``device`` / in ``dtype`` (floating)."""
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise TypeError(f"dtype: expected a floating torch.dtype, got {dtype!r}")
        return self._replace(lora_a={m: t.to(device=device, dtype=dtype) for m, t in self.lora_a.items()},
                             lora_b={m: t.to(device=device, dtype=dtype) for m, t in self.lora_b.items()})

    def check_base(self, base_fingerprint: str | None, *, what: str = "base_fingerprint",
                   base_name: str | None = None) -> None:
        """Raise ValueError when this adapter was made for another base model (``base_name``:
        the name of the base checked against, for the message)."""
        if base_fingerprint is None:
            return
        if not isinstance(base_fingerprint, str):
            raise TypeError(f"{what}: expected a str, got {type(base_fingerprint).__name__}")
        if self.base_fingerprint and base_fingerprint and self.base_fingerprint != base_fingerprint:
            made = self.metadata.get("base")
            made = f"{made!r} (fingerprint {self.base_fingerprint})" if isinstance(made, str) and made \
                else repr(self.base_fingerprint)
            have = f"{base_name!r} (fingerprint {base_fingerprint})" if base_name else repr(base_fingerprint)
            raise ValueError(
                f"{what}: this adapter was made for base model {made} but the base model is {have}; "
                f"adapters only work on the base model whose hidden states produced them"
            )

    def check_finite(self) -> None:
        """Raise ValueError naming the first factor that holds NaN or Inf."""
        for name in ("lora_a", "lora_b"):
            for m, t in getattr(self, name).items():
                check_finite(f"{name}[{m!r}]", t)

    # ------------------------------------------------------------------ persistence

    def _header(self) -> dict[str, str]:
        try:
            meta = json.dumps(self.metadata, sort_keys=True)
        except (TypeError, ValueError) as e:
            raise ValueError(f"metadata: expected JSON-serialisable values ({e})") from None
        return {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "library_version": _library_version(),
            "base_fingerprint": self.base_fingerprint,
            "target_modules": json.dumps(list(self.target_modules)),
            "module_shapes": json.dumps({m: list(s) for m, s in self.module_shapes.items()}),
            "num_layers": str(self.num_layers),
            "rank": str(self.rank),
            "bias_rank": str(self.bias_rank),
            "segments": json.dumps(self.segments),
            "lora_alpha": json.dumps(self.scale),
            "num_frames": str(self.num_frames),
            "source": self.source,
            "metadata": meta,
        }

    def save(self, path: str | os.PathLike, *, allow_nonfinite: bool = False) -> None:
        """Write a safetensors file (atomic: temp file + rename). Factors holding NaN/Inf are
        refused (``allow_nonfinite=True`` writes them anyway, for debugging)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            raise ValueError(f"path: expected a file path, got the directory {path!r}")
        if not allow_nonfinite:
            self.check_finite()
        header = self._header()
        tensors = {}
        for m in self.lora_a:
            tensors[f"lora_a.{m}"] = self.lora_a[m].detach().to("cpu").contiguous()
            tensors[f"lora_b.{m}"] = self.lora_b[m].detach().to("cpu").contiguous()
        atomic_save_safetensors(tensors, path, metadata=header)

    @classmethod
    def load(cls, path: str | os.PathLike, *, base_fingerprint: str | None = None, device=None,
             dtype: torch.dtype | None = None, allow_nonfinite: bool = False) -> "VideoAdapter":
        """Read a file written by :meth:`save`. With ``base_fingerprint``, loading an adapter made
        for another base model raises ValueError. Factors holding NaN/Inf raise ValueError
        unless ``allow_nonfinite`` (for debugging). Only safetensors: nothing is unpickled."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"path: no adapter file at {path!r}")
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                header = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise ValueError(f"path: {path!r} is not a safetensors file ({e})") from None
        if header.get("format") != FORMAT:
            raise ValueError(f"path: {path!r} is not an f2l VideoAdapter (metadata format "
                             f"{header.get('format')!r}, expected {FORMAT!r})")
        try:
            modules = json.loads(header["target_modules"])
            segments = json.loads(header["segments"])
            scale = json.loads(header["lora_alpha"])
            meta = json.loads(header.get("metadata", "{}"))
            bias_rank = int(header.get("bias_rank", "0"))
            num_frames = int(header.get("num_frames", "0"))
        except (KeyError, ValueError) as e:
            raise ValueError(f"path: {path!r} has a damaged adapter header ({e!r})") from None
        want = {f"lora_{ab}.{m}" for m in modules for ab in "ab"}
        if set(tensors) != want:
            raise ValueError(f"path: {path!r} holds tensors {sorted(tensors)}, expected {sorted(want)}")
        try:
            ad = cls(
                lora_a={m: tensors[f"lora_a.{m}"] for m in modules},
                lora_b={m: tensors[f"lora_b.{m}"] for m in modules},
                scale=scale, base_fingerprint=header.get("base_fingerprint", ""), num_frames=num_frames,
                source=header.get("source", ""), metadata=meta, segments=segments, bias_rank=bias_rank,
            )
            if not allow_nonfinite:
                ad.check_finite()
        except (TypeError, ValueError) as e:  # a damaged or foreign file is the user's input, not a bug
            raise ValueError(f"path: {path!r} is not a valid adapter: {e}") from None
        ad.check_base(base_fingerprint)
        if device is not None or dtype is not None:
            ad = ad.to(device=device, dtype=dtype)
        return ad

    # ------------------------------------------------------------------ composition

    @classmethod
    def compose(cls, adapters: Sequence["VideoAdapter"], weights: Sequence[float] | None = None, *,
                share_bias: bool = True, bias_scaler: float | None = None) -> "VideoAdapter":
        """Rank-space concatenation: the composed delta is ``Σ_i w_i · delta_i``.

        Part i's context ranks are concatenated in order with its A multiplied by
        ``w_i * scale_i / scale`` (``scale`` = the first part's, so parts with different scales
        compose exactly). Bias-LoRA ranks are context-free and identical across adapters of one
        hypernetwork: with ``share_bias`` they are kept once, unweighted, at the end (the
        official chunk composition); parts whose bias ranks differ are an error then. With
        ``share_bias=False`` every part's full ranks (bias included) are concatenated and weighted.

        ``bias_scaler`` (default ``None`` = 1) is the authors' ``combine_lora(...,
        bias_scaler=s)``: the bias ranks' A *and* B are both multiplied by ``s``, so the
        context-free part of the delta scales by ``s**2`` (``s = 0`` drops it, ``s = -1``
        keeps it). It applies to every part's bias ranks with ``share_bias=False``, works on a
        single adapter (``compose([a], bias_scaler=s)``), has no effect on adapters without
        bias ranks, and is recorded in the metadata.
        """
        if isinstance(adapters, VideoAdapter) or not isinstance(adapters, (list, tuple)) or not adapters:
            raise TypeError(f"adapters: expected a non-empty list of VideoAdapter, got {type(adapters).__name__}")
        for i, a in enumerate(adapters):
            if not isinstance(a, VideoAdapter):
                raise TypeError(f"adapters[{i}]: expected a VideoAdapter, got {type(a).__name__}")
        n = len(adapters)
        if weights is None:
            weights = [1.0] * n
        if not isinstance(weights, (list, tuple)) or len(weights) != n:
            raise ValueError(f"weights: expected {n} floats (one per adapter), got {weights!r}")
        for i, w in enumerate(weights):
            if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w):
                raise ValueError(f"weights[{i}]: expected a finite float, got {w!r}")
        if bias_scaler is None:
            bias_scaler = 1.0
        if not isinstance(bias_scaler, (int, float)) or isinstance(bias_scaler, bool) or not math.isfinite(bias_scaler):
            raise ValueError(f"bias_scaler: expected None or a finite float, got {bias_scaler!r}")
        bias_scaler = float(bias_scaler)
        ref = adapters[0]
        fps = {a.base_fingerprint for a in adapters if a.base_fingerprint}
        if len(fps) > 1:
            raise ValueError(f"adapters: made for different base models {sorted(fps)}; cannot compose")
        for i, a in enumerate(adapters[1:], 1):
            if a.module_shapes != ref.module_shapes or a.num_layers != ref.num_layers:
                raise ValueError(
                    f"adapters[{i}]: expected {ref.num_layers} layers with modules {ref.module_shapes}, "
                    f"got {a.num_layers} layers with {a.module_shapes}"
                )
        parts = [a if (a.dtype, a.device) == (ref.dtype, ref.device) else a.to(ref.device, ref.dtype)
                 for a in adapters]
        dedupe = share_bias and any(a.bias_rank for a in parts)
        if dedupe:
            for i, a in enumerate(parts[1:], 1):
                same = a.bias_rank == ref.bias_rank and a.scale == ref.scale and all(
                    torch.equal(a.lora_a[m][:, -a.bias_rank:], parts[0].lora_a[m][:, -ref.bias_rank:])
                    and torch.equal(a.lora_b[m][:, :, -a.bias_rank:], parts[0].lora_b[m][:, :, -ref.bias_rank:])
                    for m in ref.lora_a
                )
                if not same:
                    raise ValueError(
                        f"adapters[{i}]: its bias-LoRA ranks (or scale) differ from adapters[0]'s, so they cannot "
                        f"be shared; pass share_bias=False to concatenate every part's ranks"
                    )
        scale = ref.scale
        lora_a, lora_b = {}, {}
        segments: list[int] = []
        s = bias_scaler
        for m in ref.lora_a:
            a_parts, b_parts = [], []
            for a, w in zip(parts, weights):
                keep = a.rank - a.bias_rank if dedupe else a.rank
                f = float(w) * a.scale / scale
                pa, pb = a.lora_a[m][:, :keep], a.lora_b[m][:, :, :keep]
                if not dedupe and a.bias_rank and s != 1.0:
                    rc = a.rank - a.bias_rank  # this part's own bias ranks, scaled on both factors
                    pa = torch.cat([pa[:, :rc], pa[:, rc:] * s], dim=1)
                    pb = torch.cat([pb[:, :, :rc], pb[:, :, rc:] * s], dim=2)
                a_parts.append(pa * f if f != 1.0 else pa)
                b_parts.append(pb)
            if dedupe:
                ba, bb = parts[0].lora_a[m][:, -ref.bias_rank:], parts[0].lora_b[m][:, :, -ref.bias_rank:]
                a_parts.append(ba * s if s != 1.0 else ba)
                b_parts.append(bb * s if s != 1.0 else bb)
            lora_a[m] = torch.cat(a_parts, dim=1)
            lora_b[m] = torch.cat(b_parts, dim=2)
        for a in parts:
            segments += a.segments if dedupe or not a.bias_rank else a.segments[:-1] + [a.segments[-1] + a.bias_rank]
        out = cls(
            lora_a=lora_a, lora_b=lora_b, scale=scale, base_fingerprint=next(iter(fps), ""),
            num_frames=sum(a.num_frames for a in parts),
            source=" + ".join(a.source or "?" for a in parts),
            metadata={**_shared_metadata(parts), "composed_from": [a.source for a in parts],
                      "weights": [float(w) for w in weights], "share_bias": bool(dedupe),
                      "bias_scaler": bias_scaler},
            segments=segments, bias_rank=ref.bias_rank if dedupe else 0,
        )
        out.check_finite()  # finite parts can still overflow (fp16 and large weights)
        return out

    # ------------------------------------------------------------------ PEFT export

    def to_peft(self, directory: str | os.PathLike, *, base_model_name_or_path: str | None = None,
                layers_path: str | None = None, module_paths: Mapping[str, str] | None = None,
                layer_ids: Sequence[int] | None = None, task_type: str | None = None) -> None:
        """Write a PEFT LoRA directory (``adapter_model.safetensors`` + ``adapter_config.json``).

        Module names are ``{layers_path}.{layer}.{module_paths[m]}`` of the base model:
        ``layers_path`` defaults to ``metadata["layers_path"]`` or SmolVLM2's
        ``model.text_model.layers`` (a plain Llama: ``model.layers``; ``F2LPatch.layers_path``
        gives it for any patched model); ``module_paths`` defaults to ``mlp.<m>`` /
        ``self_attn.<m>``; ``layer_ids[i]`` is the decoder layer that the adapter's layer ``i``
        drives (default ``0..L-1``; ``F2LPatch.layer_ids`` when only some layers were
        patched). ``lora_alpha`` is chosen so that PEFT's ``lora_alpha / r`` equals
        ``scale`` exactly (otherwise ``scale`` is folded into B and ``lora_alpha = r``).
        ``target_modules`` is a full-match pattern, so same-named modules of a vision tower
        are never touched. The directory appears atomically (built beside it, then renamed);
        it may replace an earlier PEFT export, never a directory holding anything else.
        """
        directory = os.fspath(directory)
        _check_replaceable(directory)
        kw = dict(base_model_name_or_path=base_model_name_or_path, layers_path=layers_path,
                  module_paths=module_paths, layer_ids=layer_ids, task_type=task_type)
        files = self._peft_files(**kw)  # validates everything before anything is written
        atomic_dir(directory, lambda d: self._write_peft(d, files))

    def _peft_files(self, *, base_model_name_or_path, layers_path, module_paths, layer_ids, task_type):
        """(tensors, config, metadata) of the PEFT directory :meth:`to_peft` writes."""
        self.check_finite()
        if layers_path is None:
            layers_path = self.metadata.get("layers_path", DEFAULT_LAYERS_PATH)
        if not isinstance(layers_path, str) or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_]\w*)*", layers_path):
            raise ValueError(f"layers_path: expected a dotted module path such as 'model.layers', got {layers_path!r}")
        if module_paths is None:
            module_paths = self.metadata.get("module_paths") or {}
        if not isinstance(module_paths, Mapping):
            raise TypeError(f"module_paths: expected a dict module -> path inside a layer, "
                            f"got {type(module_paths).__name__}")
        rel = {m: module_paths.get(m) or default_module_path(m) for m in self.target_modules}
        for m, p in rel.items():
            if not isinstance(p, str) or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", p) \
                    or p.split(".")[-1] != m:
                raise ValueError(f"module_paths[{m!r}]: expected a dotted path ending in {m!r}, got {p!r}")
        if layer_ids is None:
            layer_ids = list(range(self.num_layers))
        if (not isinstance(layer_ids, (list, tuple, range)) or len(layer_ids) != self.num_layers
                or not all(_is_int(i) and i >= 0 for i in layer_ids) or len(set(layer_ids)) != len(layer_ids)):
            raise ValueError(f"layer_ids: expected {self.num_layers} distinct non-negative ints (one per adapter "
                             f"layer), got {layer_ids!r}")
        if base_model_name_or_path is not None and not isinstance(base_model_name_or_path, str):
            raise TypeError(f"base_model_name_or_path: expected a str, got {type(base_model_name_or_path).__name__}")
        r = self.rank
        alpha = self.scale * r
        fold = (alpha / r) != self.scale
        if fold:
            alpha = float(r)
        tensors = {}
        for m in self.target_modules:
            a, b = self.lora_a[m].detach().cpu(), self.lora_b[m].detach().cpu()
            if fold:
                b = b * self.scale
            for layer, li in enumerate(layer_ids):
                key = f"base_model.model.{layers_path}.{li}.{rel[m]}"
                tensors[f"{key}.lora_A.weight"] = a[layer].contiguous()
                tensors[f"{key}.lora_B.weight"] = b[layer].contiguous()
        pattern = (re.escape(layers_path) + r"\.(" + "|".join(str(i) for i in layer_ids) + r")\.("
                   + "|".join(re.escape(rel[m]) for m in self.target_modules) + ")")
        config = {
            "peft_type": "LORA",
            "task_type": task_type,
            "base_model_name_or_path": base_model_name_or_path,
            "r": r,
            "lora_alpha": alpha,
            "target_modules": pattern,
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": False,
            "use_rslora": False,
            "use_dora": False,
            "init_lora_weights": True,
            "inference_mode": True,
            "modules_to_save": None,
        }
        meta = {"format": "pt", "f2l_source": self.source, "f2l_base_fingerprint": self.base_fingerprint}
        return tensors, config, meta

    @staticmethod
    def _write_peft(directory: str, files) -> None:
        """Write :meth:`_peft_files` into an existing (temporary) directory."""
        tensors, config, meta = files
        atomic_save_safetensors(tensors, os.path.join(directory, "adapter_model.safetensors"), metadata=meta)
        atomic_write_text(os.path.join(directory, "adapter_config.json"), json.dumps(config, indent=2))


_COMPOSED_KEYS = ("composed_from", "weights", "share_bias", "bias_scaler")


def _shared_metadata(parts) -> dict:
    """Metadata every part agrees on (the base, the instruction, module paths, ...): what
    using the composed adapter needs, so that it works wherever its parts did."""
    first = {k: v for k, v in parts[0].metadata.items() if k not in _COMPOSED_KEYS}
    return {k: v for k, v in first.items() if all(k in p.metadata and p.metadata[k] == v for p in parts[1:])}


def _check_replaceable(directory: str) -> None:
    """A PEFT export may replace a previous export, never a directory holding other things."""
    if os.path.isfile(directory):
        raise ValueError(f"directory: expected a directory path, got the file {directory!r}")
    if os.path.isdir(directory):
        entries = set(os.listdir(directory))
        if entries and "adapter_config.json" not in entries:
            raise ValueError(f"directory: {directory!r} exists and holds files that are not a PEFT adapter "
                             f"({sorted(entries)[:3]}); choose a new or empty directory")
