"""Export video adapters to the PEFT LoRA format (PEFT, vLLM and other LoRA servers).

A :class:`~f2l.adapter.VideoAdapter` becomes a PEFT directory
(``adapter_config.json`` + ``adapter_model.safetensors``) whose module names are the base
model's own (``base_model.model.model.text_model.layers.{i}.mlp.down_proj.lora_A.weight``
for SmolVLM2, the names vLLM's SmolVLM/Idefics3 model uses for its language model too)
and whose scaling reproduces f2l's convention exactly: f2l multiplies the delta by
``scale`` directly (``2 r^1.5`` for the official hypernetwork), PEFT and vLLM by
``lora_alpha / r``, so ``lora_alpha = scale * r`` (or, when that is not exact in floating
point, ``scale`` folded into B and ``lora_alpha = r``). All ranks are exported:
the context ranks of every composed segment and the context-free bias ranks.

:func:`export_peft` writes and then re-reads the directory (:func:`verify_peft_dir`): the
reloaded factors must reproduce the adapter's delta, and with a base model every module
name must resolve to a linear layer of matching shape.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch

__all__ = ["export_peft", "verify_peft_dir", "vllm_max_lora_rank", "VLLM_MAX_LORA_RANKS", "HUB_IDS",
           "EXPORT_INFO_NAME"]

# Values vLLM accepts for --max-lora-rank; an adapter's rank must not exceed the value chosen.
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# The released checkpoints of the f2l presets (what a PEFT directory should name as its base).
HUB_IDS = {
    "smolvlm2-256m": "HuggingFaceTB/SmolVLM2-256M-Video-Instruct",
    "smolvlm2-500m": "HuggingFaceTB/SmolVLM2-500M-Video-Instruct",
    "smolvlm2-2.2b": "HuggingFaceTB/SmolVLM2-2.2B-Instruct",
}
EXPORT_INFO_NAME = "f2l_export.json"
_KEY_RE = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$")


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest ``--max-lora-rank`` value vLLM accepts that fits an adapter of ``rank``."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank: expected an int >= 1, got {rank!r}")
    for r in VLLM_MAX_LORA_RANKS:
        if r >= rank:
            return r
    raise ValueError(f"rank: {rank} exceeds vLLM's largest --max-lora-rank ({VLLM_MAX_LORA_RANKS[-1]}); "
                     "compose fewer segments per adapter")


def _load_adapter(adapter, base_fingerprint, base_name=None):
    from f2l.adapter import VideoAdapter

    if isinstance(adapter, (str, os.PathLike)):
        adapter = VideoAdapter.load(adapter)  # refuses non-finite factors
    if isinstance(adapter, VideoAdapter):
        adapter.check_base(base_fingerprint, what="base", base_name=base_name)
        adapter.check_finite()
        return adapter
    raise TypeError(f"adapter: expected a VideoAdapter or the path of a saved one, got {type(adapter).__name__}")


def export_peft(adapter, out_dir: str | os.PathLike, *, base=None, base_model_name_or_path: str | None = None,
                layers_path: str | None = None, module_paths: Mapping[str, str] | None = None,
                layer_ids=None, task_type: str | None = "CAUSAL_LM") -> dict[str, Any]:
    """Write ``adapter`` (a VideoAdapter or its file) as a PEFT LoRA directory ``out_dir``.

    base: optional base model (preset name, checkpoint dir or ``BaseVLM``): the adapter must
    have been made for it (fingerprint), module names are taken from its decoder stack and
    checked against its linears. base_model_name_or_path: what ``adapter_config.json``
    records (default: the base's hub id or directory). Returns a summary, also written to
    ``out_dir/f2l_export.json`` (with the vLLM flags that fit the adapter).

    The directory appears atomically: it is written and verified under a temporary name
    beside ``out_dir`` and renamed into place only when complete, so a failed export leaves
    no output (and a previous export at ``out_dir`` untouched). Adapters holding NaN/Inf are
    refused.
    """
    if not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"out_dir: expected a str or os.PathLike, got {type(out_dir).__name__}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir: {str(out)!r} exists and is not a directory")
    from f2l.adapter import _check_replaceable

    _check_replaceable(str(out))
    if base_model_name_or_path is not None and not isinstance(base_model_name_or_path, str):
        raise TypeError(f"base_model_name_or_path: expected a str, got {type(base_model_name_or_path).__name__}")
    b = None
    if base is not None:
        from f2l.presets import load_base

        b = load_base(base)
    ad = _load_adapter(adapter, b.fingerprint if b is not None else None, b.name if b is not None else None)
    model = None
    if b is not None:
        from f2l.layers import find_decoder_layers

        model = b.model
        found_path, _ = find_decoder_layers(model)
        layers_path = layers_path or found_path
    if base_model_name_or_path is None:
        name = b.name if b is not None else ad.metadata.get("base")
        if isinstance(name, str) and name:
            base_model_name_or_path = HUB_IDS.get(name) or (str(Path(name).resolve()) if Path(name).is_dir() else name)
    rank = ad.rank
    max_rank = vllm_max_lora_rank(rank) if rank <= VLLM_MAX_LORA_RANKS[-1] else None
    files = ad._peft_files(base_model_name_or_path=base_model_name_or_path, layers_path=layers_path,
                           module_paths=module_paths, layer_ids=layer_ids, task_type=task_type)
    info: dict[str, Any] = {}

    def write(tmp: str) -> None:
        ad._write_peft(tmp, files)
        check = verify_peft_dir(tmp, model=model, adapter=ad)
        info.update(_info(ad, base_model_name_or_path, rank, max_rank, check))
        from f2l.files import atomic_write_text

        atomic_write_text(Path(tmp) / EXPORT_INFO_NAME, json.dumps(info, indent=2) + "\n")

    from f2l.files import atomic_dir

    atomic_dir(out, write)
    if max_rank is None:
        import warnings

        warnings.warn(f"adapter: rank {rank} exceeds vLLM's largest --max-lora-rank ({VLLM_MAX_LORA_RANKS[-1]}); "
                      "PEFT loads it, vLLM will not", stacklevel=2)
    info["out_dir"] = str(out)
    return info


def _info(ad, base_model_name_or_path, rank, max_rank, check) -> dict[str, Any]:
    return {
        "format": "f2l.peft_export",
        "source": ad.source,
        "base_fingerprint": ad.base_fingerprint,
        "base_model_name_or_path": base_model_name_or_path,
        "rank": rank,
        "segments": list(ad.segments),
        "bias_rank": ad.bias_rank,
        "scale": ad.scale,
        "lora_alpha": check["lora_alpha"],
        "modules": check["num_modules"],
        "vllm": {"max_lora_rank": max_rank,
                 "note": "serve with --enable-lora --max-lora-rank >= rank; see docs/serving.md"},
    }


def _read_config(directory: Path) -> dict:
    p = directory / "adapter_config.json"
    if not p.is_file():
        raise FileNotFoundError(f"directory: no adapter_config.json in {str(directory)!r}")
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"directory: {str(p)!r} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        raise ValueError(f"directory: {str(p)!r} is not a PEFT LoRA config (peft_type "
                         f"{cfg.get('peft_type') if isinstance(cfg, dict) else None!r})")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"directory: adapter_config.json has r={r!r}, expected an int >= 1")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"directory: adapter_config.json has lora_alpha={alpha!r}, expected a finite number")
    if cfg.get("use_rslora") or cfg.get("use_dora"):
        raise ValueError("directory: rsLoRA/DoRA scaling is not the f2l convention (expected plain LoRA)")
    return cfg


def verify_peft_dir(directory: str | os.PathLike, model: torch.nn.Module | None = None, *,
                    adapter=None, atol: float = 0.0) -> dict[str, Any]:
    """Check a PEFT LoRA directory: config and tensors agree; with ``model``, every module
    name resolves to an ``nn.Linear`` of matching ``(in, out)`` features and is matched by
    ``target_modules``; with ``adapter``, the directory reproduces its delta
    (``lora_alpha / r * B_peft == scale * B``, ``A_peft == A``). Returns a summary."""
    from safetensors import safe_open

    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory: expected a str or os.PathLike, got {type(directory).__name__}")
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"directory: {str(d)!r} is not a directory")
    cfg = _read_config(d)
    r, alpha = cfg["r"], float(cfg["lora_alpha"])
    wpath = d / "adapter_model.safetensors"
    if not wpath.is_file():
        raise FileNotFoundError(f"directory: no adapter_model.safetensors in {str(d)!r}")
    try:
        with safe_open(str(wpath), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a damaged file
        raise ValueError(f"directory: {str(wpath)!r} is not a readable safetensors file ({e})") from None
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for k, t in tensors.items():
        m = _KEY_RE.match(k)
        if not m:
            raise ValueError(f"directory: tensor {k!r} is not named base_model.model.<module>.lora_{{A,B}}.weight")
        pairs.setdefault(m.group(1), {})[m.group(2)] = t
    if not pairs:
        raise ValueError(f"directory: {str(wpath)!r} holds no LoRA tensors")
    for name, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"directory: module {name!r} lacks lora_{'B' if 'A' in ab else 'A'}")
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
            raise ValueError(f"directory: module {name!r} has lora_A {list(a.shape)} and lora_B {list(b.shape)}, "
                             f"expected [r={r}, d_in] and [d_out, r={r}]")
    tm = cfg.get("target_modules")
    if isinstance(tm, str):
        unmatched = [n for n in pairs if not re.fullmatch(tm, n)]
    elif isinstance(tm, list):
        unmatched = [n for n in pairs if not any(n == t or n.endswith("." + t) for t in tm)]
    else:
        raise ValueError(f"directory: adapter_config.json target_modules={tm!r}, expected a regex or a list")
    if unmatched:
        raise ValueError(f"directory: target_modules {tm!r} does not match {sorted(unmatched)[:4]}")
    if model is not None:
        for name, ab in pairs.items():
            try:
                mod = model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"model: has no module {name!r} (named by the exported adapter); the adapter was "
                                 "made for another architecture") from None
            if not isinstance(mod, torch.nn.Linear):
                raise ValueError(f"model: {name!r} is a {type(mod).__name__}, expected nn.Linear")
            want = (ab["A"].shape[1], ab["B"].shape[0])
            if (mod.in_features, mod.out_features) != want:
                raise ValueError(f"model: {name!r} maps {mod.in_features} -> {mod.out_features} features, the "
                                 f"adapter {want[0]} -> {want[1]}")
    if adapter is not None:
        _check_against_adapter(pairs, adapter, alpha / r, atol)
    return {"num_modules": len(pairs), "rank": r, "lora_alpha": alpha, "scaling": alpha / r,
            "modules": sorted(pairs)}


def _check_against_adapter(pairs, ad, scaling: float, atol: float) -> None:
    if ad.rank != next(iter(pairs.values()))["A"].shape[0]:
        raise ValueError(f"adapter: rank {ad.rank} differs from the directory's")
    n_expected = ad.num_layers * len(ad.target_modules)
    if len(pairs) != n_expected:
        raise ValueError(f"adapter: expected {n_expected} exported modules, found {len(pairs)}")
    by_module: dict[str, list[tuple[int, str]]] = {m: [] for m in ad.target_modules}
    for name in pairs:
        short = name.rsplit(".", 1)[-1]
        idx = re.search(r"\.(\d+)\.", name)
        if short not in by_module or idx is None:
            raise ValueError(f"adapter: exported module {name!r} is not one of {list(ad.target_modules)}")
        by_module[short].append((int(idx.group(1)), name))
    for m, items in by_module.items():
        items.sort()
        a_all, b_all = ad.lora_a[m].detach().cpu().float(), ad.lora_b[m].detach().cpu().float()
        for layer, (_, name) in enumerate(items):
            pa, pb = pairs[name]["A"].float(), pairs[name]["B"].float()
            ok_a = torch.allclose(pa, a_all[layer], rtol=0, atol=atol)
            ok_b = torch.allclose(pb * scaling, b_all[layer] * ad.scale, rtol=1e-6, atol=atol)
            if not (ok_a and ok_b):
                raise ValueError(f"adapter: the exported factors of {name!r} do not reproduce the adapter's delta")
