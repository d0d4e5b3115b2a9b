"""Import the official Frames2LoRA checkpoints (``frames2lora-smolvlm2-{500m,2.2b}-best-ce.pt``).

The released files are ``torch.save``-d state dicts of the official ``HyperLoRA`` module
plus three non-tensor entries (``base_model_name_or_path``, ``hypernet_config``,
``ctx_encoder_args``; the last two are pickled dataclasses). They are read with
``torch.load(weights_only=True)``: the dataclasses are rebuilt as inert record objects
(:class:`ForeignObject`, attributes only, no code of the original classes runs), so a
malicious file cannot execute anything.

Key mapping (official -> f2l, ``P = aggregator.perceiver.``, ``R`` = ``encoder`` or
``decoder``, ``i`` a perceiver layer, ``j`` a pre-head block, ``m`` a target module):

==================================================  ======================================
official key                                        f2l key
==================================================  ======================================
``P.modality_projection.{gate,up,down}_proj.weight``  ``proj.{gate,up,down}_proj.weight``
``P.R.latents_q``                                   ``R.latents``
``P.R.layers.i.input_latents_layernorm.weight``     ``R.blocks.i.latents_norm.weight``
``P.R.layers.i.input_context_layernorm.weight``     ``R.blocks.i.context_norm.weight``
``P.R.layers.i.self_attn.{q,k,v,o}_proj.weight``    ``R.blocks.i.attn.{q,k,v,o}_proj.weight``
``P.R.layers.i.post_attention_layernorm.weight``    ``R.blocks.i.post_attn_norm.weight``
``P.R.layers.i.pre_ff_layernorm.weight``            ``R.blocks.i.pre_ff_norm.weight``
``P.R.layers.i.mlp.{gate,up,down}_proj.weight``     ``R.blocks.i.mlp.{gate,up,down}_proj.weight``
``P.R.layers.i.post_ff_layernorm.weight``           ``R.blocks.i.post_ff_norm.weight``
``P.R.layernorm.weight``                            ``R.norm.weight``
``layers.j.mlp.0.{weight,bias}`` (LayerNorm)        ``pre_head.j.norm_in.{weight,bias}``
``layers.j.mlp.2.{weight,bias}`` (Linear)           ``pre_head.j.fc1.{weight,bias}``
``layers.j.mlp.5.{weight,bias}`` (Linear)           ``pre_head.j.fc2.{weight,bias}``
``layers.j.mlp.6.{weight,bias}`` (LayerNorm)        ``pre_head.j.norm_out.{weight,bias}``
``head.weight`` (one target module)                 ``head.weight`` (module axis inserted)
``head.weight`` (several target modules)            ``head.weight``
``scaler_A.m`` / ``scaler_B.m``                     ``scaler_a.m`` / ``scaler_b.m``
``bias_A.m`` / ``bias_B.m``                         ``bias_a.m`` / ``bias_b.m``
==================================================  ======================================

Official shapes (``H`` base hidden size, ``D`` latent size 512, ``L`` layers, ``r`` rank,
``d_lora = max(d_in + d_out)`` over modules): projection ``[4H, H]``, ``[4H, H]``,
``[D, 4H]``; ``q_proj [heads*head_dim, D]``, ``k/v_proj [kv_heads*head_dim, D]``,
``o_proj [D, heads*head_dim]``; perceiver MLP ``[4D, D]`` / ``[D, 4D]``; norms ``[D]``;
pre-head ``fc1 [4D, D]``, ``fc2 [D, 4D]``; ``head [L, D, d_lora]`` or
``[L, n_mod, D, d_lora]``; ``scaler_* [1, L, r, 1]``; ``bias_A [L, r, d_in]``,
``bias_B [L, r, d_out]`` (rank-major, as f2l stores ``bias_b``).

``M`` is 8 latents for the encoder and ``n_mod * r`` queries for the decoder (one block).
Leading ``module.`` (DDP), ``_orig_mod.`` (``torch.compile``) and ``hypernet.`` (the
wrapping model) prefixes are removed; ``base_model.*`` / ``ctx_encoder.*`` keys (frozen
models saved alongside) are ignored. The official model always stores ``bias_A``/``bias_B``;
they become f2l's context-free bias ranks when the checkpoint's ``use_bias`` is true (the
default) and are dropped otherwise. Unknown, missing or wrongly shaped keys raise
``ValueError`` listing them.

The forward that the mapping preserves (per layer l and video; the official model runs
the L layers as independent sequences): ``ctx = SwiGLU(h_l)``; 9 Idefics2 perceiver
blocks on 8 latents (keys/values ``concat(norm(ctx), norm(latents))``, GQA, output and
feed-forward sandwiched by RMSNorms, residuals), final RMSNorm; a one-block decoder whose
``n_mod * r`` queries attend to the 8 latents the same way; the residual MLP; L2
normalisation; ``head`` -> ``[A row | B row]`` per rank; ``A *= scaler_A``,
``B *= scaler_B``; bias ranks appended; delta ``= 2 r^1.5 (x A^T) B``.

Length: one foreign format end to end -- the safe reader, the key map, inferring and
reconciling the ``HypernetConfig``, and the verified atomic write all serve
:func:`convert_checkpoint` and change together when the authors' format does.
"""
from __future__ import annotations

import dataclasses
import io
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch

__all__ = [
    "ForeignObject",
    "OfficialCheckpoint",
    "read_official",
    "infer_config",
    "official_key_shapes",
    "convert_state_dict",
    "load_official",
    "convert_checkpoint",
    "suggested_base",
]

_P = "aggregator.perceiver."
_METADATA_KEYS = ("base_model_name_or_path", "hypernet_config", "ctx_encoder_args")
_STRIP_PREFIXES = ("module.", "_orig_mod.", "hypernet.")
_IGNORED_PREFIXES = ("base_model.", "ctx_encoder.")
_LAYER_NORMS = {
    "input_latents_layernorm": "latents_norm",
    "input_context_layernorm": "context_norm",
    "post_attention_layernorm": "post_attn_norm",
    "pre_ff_layernorm": "pre_ff_norm",
    "post_ff_layernorm": "post_ff_norm",
}
_PRE_HEAD_SLOTS = {"0": "norm_in", "2": "fc1", "5": "fc2", "6": "norm_out"}
# Official base checkpoints -> f2l presets of the same architecture.
_KNOWN_BASES = {
    "smolvlm2-256m": "smolvlm2-256m",
    "smolvlm2-500m": "smolvlm2-500m",
    "smolvlm2-2.2b": "smolvlm2-2.2b",
}


# --------------------------------------------------------------------------- safe loading


class ForeignObject:
    """An inert stand-in for an object pickled inside an official checkpoint.

    Records what the pickle carried (constructor arguments and attribute state) and
    nothing else; attribute access reads the recorded state.
    """

    _f2l_name = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.__dict__["_f2l_args"] = args
        obj.__dict__["_f2l_state"] = {}
        return obj

    def __init__(self, *args, **kwargs):  # REDUCE calls the class like a constructor (enums)
        self.__dict__["_f2l_args"] = args

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__["_f2l_state"].update(state)
        else:
            self.__dict__["_f2l_state"]["_state"] = state

    def __getattr__(self, name):
        state = self.__dict__.get("_f2l_state", {})
        if name in state:
            return state[name]
        raise AttributeError(f"{self._f2l_name} record has no field {name!r}")

    def get(self, name, default=None):
        return self.__dict__.get("_f2l_state", {}).get(name, default)

    @property
    def value(self):
        """The single constructor argument (enum members pickle as ``Enum(value)``)."""
        args = self.__dict__.get("_f2l_args", ())
        return args[0] if len(args) == 1 else args

    def __repr__(self) -> str:
        return f"<{self._f2l_name} {self.__dict__.get('_f2l_state') or self.__dict__.get('_f2l_args')}>"


def _stub(name: str) -> type:
    return type(name.rsplit(".", 1)[-1], (ForeignObject,), {"_f2l_name": name})


@dataclasses.dataclass
class OfficialCheckpoint:
    """Tensors and metadata of an official checkpoint (prefixes already removed)."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, Any]
    ignored: list[str]
    path: str = ""

    @property
    def base_model_name_or_path(self) -> str | None:
        v = self.metadata.get("base_model_name_or_path")
        return v if isinstance(v, str) else None

    @property
    def hypernet_config(self):
        return self.metadata.get("hypernet_config")


def _torch_load(source, what: str):
    """``torch.load(weights_only=True)`` with every foreign global replaced by a record."""
    try:
        if isinstance(source, (bytes, bytearray)):
            names = torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(source))
        else:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(source)
    except Exception:  # noqa: BLE001 - legacy (non-zip) files: load below reports the real problem
        names = []
    stubs = [(_stub(n), n) for n in names]
    try:
        with torch.serialization.safe_globals(stubs):
            f = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
            return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
        msg = str(e)
        found = sorted(set(re.findall(r"GLOBAL ([\w.]+)", msg)))
        if found or "Unsupported global" in msg:
            raise ValueError(f"{what}: contains Python objects that f2l will not unpickle (only tensors and plain "
                             f"containers are read, nothing is executed)"
                             + (f"; it references {', '.join(found[:4])}" if found else "")) from None
        if "WeightsUnpickler error:" in msg:  # keep the cause, not torch's advice to unpickle unsafely
            msg = msg.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
            msg = "refused by the safe loader: " + msg
        elif "weights_only" in msg:  # torch's advice to load unsafely is never repeated
            msg = "refused by the safe loader"
        msg = " ".join(msg.split())
        if len(msg) > 240:
            msg = msg[:240] + "..."
        raise ValueError(f"{what}: not a readable PyTorch checkpoint ({type(e).__name__}: {msg})") from None


def _unwrap(obj, what: str) -> Mapping:
    if not isinstance(obj, Mapping):
        raise ValueError(f"{what}: expected a state dict (a mapping of names to tensors), got "
                         f"{type(obj).__name__}")
    # Trainer-style wrappers: {"state_dict": {...}} / {"model": {...}} with no tensors at top level.
    if not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for k in ("state_dict", "model", "hypernet", "module"):
            if isinstance(obj.get(k), Mapping):
                return _unwrap(obj[k], what)
    return obj


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _STRIP_PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def _split_state_dict(sd: Mapping, what: str) -> OfficialCheckpoint:
    tensors, meta, ignored, bad = {}, {}, [], []
    for raw_key, v in sd.items():
        if not isinstance(raw_key, str):
            bad.append(repr(raw_key))
            continue
        key = _strip(raw_key)
        if key in _METADATA_KEYS:
            meta[key] = v
        elif key.startswith(_IGNORED_PREFIXES):
            ignored.append(raw_key)
        elif isinstance(v, torch.Tensor):
            if key in tensors:
                raise ValueError(f"{what}: key {key!r} appears twice after removing wrapper prefixes")
            tensors[key] = v
        else:
            bad.append(f"{raw_key} ({type(v).__name__})")
    if bad:
        raise ValueError(f"{what}: unexpected non-tensor entries {sorted(bad)}")
    if not tensors:
        raise ValueError(f"{what}: the checkpoint holds no tensors")
    return OfficialCheckpoint(tensors=tensors, metadata=meta, ignored=sorted(ignored))


def read_official(path: str | os.PathLike) -> OfficialCheckpoint:
    """Read an official checkpoint safely (``weights_only=True``) into tensors + metadata."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a str or os.PathLike, got {type(path).__name__}")
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"path: {str(p)!r} does not exist")
    if p.is_dir():
        raise ValueError(f"path: {str(p)!r} is a directory; expected an official .pt checkpoint file")
    what = f"path {str(p)!r}"
    obj = _torch_load(str(p), what)
    ck = _split_state_dict(_unwrap(obj, what), what)
    ck.path = str(p)
    return ck


# --------------------------------------------------------------------------- config


def _meta_field(obj, name, default=None):
    if obj is None:
        return default
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    if isinstance(obj, ForeignObject):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _shape(t: dict, key: str, what: str) -> tuple[int, ...]:
    if key not in t:
        raise ValueError(f"{what}: missing key {key!r}, needed to infer the architecture")
    return tuple(t[key].shape)


def infer_config(checkpoint: OfficialCheckpoint | Mapping, *, head_dim: int = 128):
    """The :class:`~f2l.config.HypernetConfig` an official state dict implies.

    Everything is read from tensor shapes except ``head_dim`` (the official perceiver uses
    128; ``num_heads``/``num_kv_heads`` follow from it), ``use_bias`` and ``lora_alpha``
    (from the pickled ``hypernet_config`` when present; defaults: bias LoRA on,
    ``2 r^1.5``).
    """
    from f2l.config import HypernetConfig

    ck = checkpoint if isinstance(checkpoint, OfficialCheckpoint) else \
        _split_state_dict(checkpoint, "state_dict")
    t, what = ck.tensors, "state_dict"
    modules = sorted(k[len("scaler_A."):] for k in t if k.startswith("scaler_A."))
    if not modules:
        raise ValueError(f"{what}: no 'scaler_A.<module>' keys; this is not an official Frames2LoRA hypernetwork "
                         f"(first keys: {sorted(t)[:6]})")
    s = _shape(t, f"scaler_A.{modules[0]}", what)
    if len(s) != 4:
        raise ValueError(f"{what}: 'scaler_A.{modules[0]}' has shape {list(s)}, expected [1, L, r, 1]")
    L, r = s[1], s[2]
    tm = {}
    for m in modules:
        a, b = _shape(t, f"bias_A.{m}", what), _shape(t, f"bias_B.{m}", what)
        if len(a) != 3 or len(b) != 3:
            raise ValueError(f"{what}: 'bias_A.{m}'/'bias_B.{m}' have shapes {list(a)}/{list(b)}, "
                             "expected [L, r, d_in]/[L, r, d_out]")
        tm[m] = (a[2], b[2])
    g = _shape(t, _P + "modality_projection.gate_proj.weight", what)
    dn = _shape(t, _P + "modality_projection.down_proj.weight", what)
    H, D = g[1], dn[0]
    lq = _shape(t, _P + "encoder.latents_q", what)
    pat = re.compile(re.escape(_P) + r"encoder\.layers\.(\d+)\.")
    blocks = sorted({int(m.group(1)) for k in t if (m := pat.match(k))})
    q = _shape(t, _P + "encoder.layers.0.self_attn.q_proj.weight", what)
    k = _shape(t, _P + "encoder.layers.0.self_attn.k_proj.weight", what)
    ff = _shape(t, _P + "encoder.layers.0.mlp.gate_proj.weight", what)
    if q[0] % head_dim or k[0] % head_dim:
        raise ValueError(f"{what}: attention widths q={q[0]}, kv={k[0]} are not multiples of head_dim={head_dim}; "
                         "pass an explicit HypernetConfig")
    pre = sorted({int(m.group(1)) for k2 in t if (m := re.match(r"layers\.(\d+)\.", k2))})
    pre_mult = (_shape(t, "layers.0.mlp.2.weight", what)[0] // D) if pre else 4
    rec = _recorded_settings(ck, r)
    return HypernetConfig(
        num_layers=L, hidden_size=H, target_modules=tm, rank=r, latent_dim=D, num_latents=lq[0],
        num_blocks=len(blocks) or 1, num_heads=q[0] // head_dim, head_dim=head_dim,
        num_kv_heads=k[0] // head_dim, ff_mult=max(1, ff[0] // D), proj_mult=max(1, g[0] // H),
        bias_rank=rec.get("bias_rank", r), lora_alpha=rec.get("lora_alpha"), num_pre_head_layers=len(pre),
        pre_head_mult=max(1, pre_mult),
    )


# --------------------------------------------------------------------------- mapping


def official_key_shapes(config) -> dict[str, tuple[int, ...]]:
    """Every key (and its shape) an official checkpoint of this architecture holds."""
    c = config
    H, D, L, r = c.hidden_size, c.latent_dim, c.num_layers, c.rank
    qd, kd = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    out: dict[str, tuple[int, ...]] = {
        _P + "modality_projection.gate_proj.weight": (c.proj_mult * H, H),
        _P + "modality_projection.up_proj.weight": (c.proj_mult * H, H),
        _P + "modality_projection.down_proj.weight": (D, c.proj_mult * H),
    }
    for res, n_lat, n_blocks in (("encoder", c.num_latents, c.num_blocks), ("decoder", c.num_modules * r, 1)):
        pre = f"{_P}{res}."
        out[pre + "latents_q"] = (n_lat, D)
        for i in range(n_blocks):
            lp = f"{pre}layers.{i}."
            for n in _LAYER_NORMS:
                out[lp + n + ".weight"] = (D,)
            out[lp + "self_attn.q_proj.weight"] = (qd, D)
            out[lp + "self_attn.k_proj.weight"] = (kd, D)
            out[lp + "self_attn.v_proj.weight"] = (kd, D)
            out[lp + "self_attn.o_proj.weight"] = (D, qd)
            out[lp + "mlp.gate_proj.weight"] = (c.ff_mult * D, D)
            out[lp + "mlp.up_proj.weight"] = (c.ff_mult * D, D)
            out[lp + "mlp.down_proj.weight"] = (D, c.ff_mult * D)
        out[pre + "layernorm.weight"] = (D,)
    hid = c.pre_head_mult * D
    for j in range(c.num_pre_head_layers):
        lp = f"layers.{j}.mlp."
        out.update({lp + "0.weight": (D,), lp + "0.bias": (D,), lp + "2.weight": (hid, D), lp + "2.bias": (hid,),
                    lp + "5.weight": (D, hid), lp + "5.bias": (D,), lp + "6.weight": (D,), lp + "6.bias": (D,)})
    out["head.weight"] = (L, D, c.d_lora) if c.num_modules == 1 else (L, c.num_modules, D, c.d_lora)
    for m, (di, do) in c.target_modules.items():
        out[f"scaler_A.{m}"] = (1, L, r, 1)
        out[f"scaler_B.{m}"] = (1, L, r, 1)
        out[f"bias_A.{m}"] = (L, r, di)
        out[f"bias_B.{m}"] = (L, r, do)
    return out


_PERCEIVER_RE = re.compile(r"(encoder|decoder)\.layers\.(\d+)\.(.+)$")


def _map_key(key: str) -> str | None:
    """f2l name of an official key (None: not a hypernetwork weight f2l knows)."""
    if key.startswith(_P):
        rest = key[len(_P):]
        if rest.startswith("modality_projection."):
            return "proj." + rest[len("modality_projection."):]
        m = _PERCEIVER_RE.match(rest)
        if m:
            res, i, tail = m.groups()
            name, _, param = tail.partition(".")
            if name in _LAYER_NORMS:
                return f"{res}.blocks.{i}.{_LAYER_NORMS[name]}.{param}"
            if name == "self_attn":
                return f"{res}.blocks.{i}.attn.{param}"
            if name == "mlp":
                return f"{res}.blocks.{i}.mlp.{param}"
            return None
        for res in ("encoder", "decoder"):
            if rest == f"{res}.latents_q":
                return f"{res}.latents"
            if rest == f"{res}.layernorm.weight":
                return f"{res}.norm.weight"
        return None
    m = re.match(r"layers\.(\d+)\.mlp\.(\d+)\.(weight|bias)$", key)
    if m:
        slot = _PRE_HEAD_SLOTS.get(m.group(2))
        return f"pre_head.{m.group(1)}.{slot}.{m.group(3)}" if slot else None
    if key == "head.weight":
        return "head.weight"
    for off, ours in (("scaler_A.", "scaler_a."), ("scaler_B.", "scaler_b."), ("bias_A.", "bias_a."),
                      ("bias_B.", "bias_b.")):
        if key.startswith(off):
            return ours + key[len(off):]
    return None


def _check_config(config):
    from f2l.config import HypernetConfig

    if not isinstance(config, HypernetConfig):
        raise TypeError(f"config: expected a HypernetConfig, got {type(config).__name__}")
    if config.bias_rank not in (0, config.rank):
        raise ValueError(f"config: official checkpoints carry bias LoRA of exactly rank r={config.rank} (or none); "
                         f"got bias_rank={config.bias_rank}")


def _listing(keys, limit: int = 12) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def convert_state_dict(sd: Mapping[str, torch.Tensor] | OfficialCheckpoint, config) -> dict[str, torch.Tensor]:
    """Map an official state dict onto :class:`~f2l.hypernet.Frames2LoRAHypernet` names.

    ``sd`` may still carry wrapper prefixes and the official metadata entries. Raises
    ``ValueError`` naming every unknown key, missing key and shape mismatch.
    """
    _check_config(config)
    if isinstance(sd, OfficialCheckpoint):
        t = sd.tensors
    elif isinstance(sd, Mapping):
        t = _split_state_dict(sd, "sd").tensors
    else:
        raise TypeError(f"sd: expected a state dict mapping, got {type(sd).__name__}")
    expected = official_key_shapes(config)
    unknown = set(t) - set(expected)
    missing = set(expected) - set(t)
    problems = []
    if unknown:
        problems.append(f"unknown keys ({len(unknown)}): {_listing(unknown)}")
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_listing(missing)}")
    wrong = [f"{k} {list(t[k].shape)} (expected {list(s)})" for k, s in expected.items()
             if k in t and tuple(t[k].shape) != s]
    if wrong:
        problems.append(f"wrong shapes ({len(wrong)}): {_listing(wrong)}")
    nonfloat = [k for k in set(t) & set(expected) if not t[k].is_floating_point()]
    if nonfloat:
        problems.append(f"non-floating tensors: {_listing(nonfloat)}")
    if problems:
        raise ValueError("sd: does not match the official hypernetwork for this config: " + "; ".join(problems))
    out = {}
    for k, v in t.items():
        if config.bias_rank == 0 and k.startswith(("bias_A.", "bias_B.")):
            continue  # the checkpoint was trained without bias LoRA: these were never used
        ours = _map_key(k)
        if ours is None:  # pragma: no cover - official_key_shapes and _map_key disagree
            raise RuntimeError(f"no f2l name for official key {k!r}")
        if k == "head.weight" and v.dim() == 3:
            v = v.unsqueeze(1)
        out[ours] = v.detach().clone()
    return out


# --------------------------------------------------------------------------- entry points


def _recorded_settings(ck: OfficialCheckpoint, rank: int) -> dict:
    """Non-shape settings the pickled official config records (empty when it has none)."""
    from f2l.config import default_lora_alpha

    hc = ck.hypernet_config
    if hc is None:
        return {}
    out = {}
    use_bias = _meta_field(hc, "use_bias", None)
    if isinstance(use_bias, bool):
        out["bias_rank"] = rank if use_bias else 0
    alpha = _meta_field(_meta_field(hc, "lora_config"), "lora_alpha", None)
    if isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
        out["lora_alpha"] = None if math.isclose(float(alpha), default_lora_alpha(rank), rel_tol=1e-6) \
            else float(alpha)
    return out


def _reconcile(config, ck: OfficialCheckpoint):
    """Settings recorded in the checkpoint (bias LoRA on/off, alpha) override the caller's preset."""
    rec = _recorded_settings(ck, config.rank)
    changes = {}
    if "bias_rank" in rec and rec["bias_rank"] != config.bias_rank:
        changes["bias_rank"] = rec["bias_rank"]
    if "lora_alpha" in rec:
        alpha = rec["lora_alpha"]
        recorded_scale = alpha if alpha is not None else dataclasses.replace(config, lora_alpha=None).scale
        if not math.isclose(recorded_scale, config.scale, rel_tol=1e-6):
            changes["lora_alpha"] = alpha
    if changes:
        warnings.warn(f"config: the checkpoint was trained with {changes}; using those values", stacklevel=3)
        config = dataclasses.replace(config, **changes)
    return config


def load_official(path: str | os.PathLike | Mapping, config=None, *, device=None, dtype=None):
    """An official checkpoint (a ``.pt`` path or an already loaded state dict) as a
    :class:`~f2l.hypernet.Frames2LoRAHypernet`.

    ``config``: the architecture to load into (e.g. ``HypernetConfig.frames2lora(base)``);
    None infers it from the checkpoint (:func:`infer_config`). Keys are checked strictly
    against it. ``dtype`` defaults to the checkpoint's (float32 for the released files).
    """
    from f2l.hypernet import Frames2LoRAHypernet

    if isinstance(path, Mapping):
        ck = _split_state_dict(_unwrap(path, "path"), "path")
    else:
        ck = read_official(path)
    if config is None:
        config = infer_config(ck)
    else:
        from f2l.config import HypernetConfig

        if not isinstance(config, HypernetConfig):
            raise TypeError(f"config: expected a HypernetConfig, got {type(config).__name__}")
        config = _reconcile(config, ck)
    _check_config(config)
    sd = convert_state_dict(ck, config)
    with torch.device("meta"):
        net = Frames2LoRAHypernet(config)
    ours = net.state_dict()
    if set(ours) != set(sd):  # pragma: no cover - guards against the two sides drifting apart
        raise RuntimeError(f"converted keys differ from the f2l hypernetwork's: missing "
                           f"{_listing(set(ours) - set(sd))}; extra {_listing(set(sd) - set(ours))}")
    for k, v in ours.items():
        if tuple(sd[k].shape) != tuple(v.shape):  # pragma: no cover - same guard, for shapes
            raise RuntimeError(f"converted {k!r} has shape {list(sd[k].shape)}, f2l expects {list(v.shape)}")
    net.load_state_dict(sd, assign=True)
    net = net.to(device=device or "cpu", dtype=dtype)
    net.official_metadata = {"base_model_name_or_path": ck.base_model_name_or_path, "source": ck.path}
    return net


def suggested_base(name: str | None) -> str | None:
    """The f2l preset matching an official ``base_model_name_or_path`` (None if unknown)."""
    if not isinstance(name, str):
        return None
    low = name.lower()
    for key, preset in _KNOWN_BASES.items():
        if key in low:
            return preset
    return None


def convert_checkpoint(path: str | os.PathLike, out_dir: str | os.PathLike, config=None, *,
                       base: str | None = None) -> dict:
    """Convert an official checkpoint into an f2l hypernetwork directory.

    Writes ``config.json`` + ``model.safetensors`` (loadable by
    ``Frames2LoRA.from_pretrained(base, hypernet=out_dir)``) and ``f2l_config.json``
    recording the base model (``base``, else the one the checkpoint names). Returns a
    summary dict (``preset``: the f2l preset of the same architecture, if any).
    """
    from f2l.config import F2LConfig

    if not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"out_dir: expected a str or os.PathLike, got {type(out_dir).__name__}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir: {str(out)!r} exists and is not a directory")
    net = load_official(path, config)
    official_base = net.official_metadata.get("base_model_name_or_path")
    # The recorded base is what the weights were trained on, never a guessed preset:
    # presets carry random weights.
    base_name = base or official_base or "unknown"
    hc = net.config
    cfg = F2LConfig(base=base_name, hypernet=hc, target_modules=tuple(hc.target_modules), max_frames=12,
                    metadata={"converted_from": os.path.basename(os.fspath(path)),
                              "official_base_model_name_or_path": official_base})
    if out.is_dir() and os.listdir(out) and not (out / "config.json").is_file():
        raise ValueError(f"out_dir: {str(out)!r} exists and holds files that are not an f2l hypernetwork; "
                         "choose a new or empty directory")

    def write(tmp: str) -> None:
        net.save_pretrained(tmp)
        cfg.save(Path(tmp) / "f2l_config.json")

    from f2l.files import atomic_dir

    atomic_dir(out, write)  # the directory appears complete or not at all
    return {"out_dir": str(out), "base": base_name, "official_base": official_base,
            "preset": suggested_base(official_base),
            "num_layers": hc.num_layers, "hidden_size": hc.hidden_size, "rank": hc.rank,
            "bias_rank": hc.bias_rank, "target_modules": dict(hc.target_modules),
            "parameters": sum(p.numel() for p in net.parameters())}
