"""Base-model presets and loading: the frozen SmolVLM2 every other module works against.

``load_base(name)`` returns a :class:`BaseVLM`: the frozen model, its tokenizer and the
frame geometry the video pipeline needs. ``name`` is

* ``"tiny"`` -- a SmolVLM2-architecture model small enough for CPU tests and the demo
  (seeded random weights, the in-code tokenizer of :mod:`f2l.tokenizer`);
* ``"tiny-serve"`` -- the same, with attention heads of width 32 in the text model and
  the vision tower: serving engines' CPU attention kernels (vLLM's among them) need
  ``head_dim >= 32``, which ``tiny``'s 16 is not; use it for serving tests and examples;
* ``"smolvlm2-256m"``, ``"smolvlm2-500m"``, ``"smolvlm2-2.2b"`` -- the real
  architectures (JSON configs shipped in ``f2l/configs/``) with seeded random weights;
  pass ``device="meta"`` to inspect one without allocating it;
* a local checkpoint directory: ``config.json`` + ``*.safetensors`` + tokenizer files +
  an optional processor config (``processor_config.json`` / ``preprocessor_config.json``
  / ``video_preprocessor_config.json``) for the image size, mean/std and frame sampling.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

PRESETS = ("tiny", "tiny-serve", "smolvlm2-256m", "smolvlm2-500m", "smolvlm2-2.2b")
_CONFIG_DIR = Path(__file__).resolve().parent / "configs"
_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json")

# The tiny preset: 48 px frames, 8 px patches and pixel shuffle 2 give 9 tokens a frame;
# the text model is a 4-layer Llama of width 64 -- the demo trains on it on two CPU cores.
TINY_TEXT = dict(
    model_type="llama",
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    hidden_act="silu",
    tie_word_embeddings=False,
    attention_bias=False,
    mlp_bias=False,
)
TINY_VISION = dict(
    model_type="smolvlm_vision",
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=48,
    patch_size=8,
    num_channels=3,
)
TINY_SCALE_FACTOR = 2
# tiny-serve: the same sizes with 32-wide heads (2 query heads / 1 KV head of the text
# model, 2 heads over a 64-wide vision tower)
TINY_SERVE_TEXT = dict(TINY_TEXT, num_attention_heads=2, num_key_value_heads=1)
TINY_SERVE_VISION = dict(TINY_VISION, hidden_size=64, intermediate_size=128, num_attention_heads=2)
_TINY = {"tiny": (TINY_TEXT, TINY_VISION), "tiny-serve": (TINY_SERVE_TEXT, TINY_SERVE_VISION)}
TINY_PROCESSOR = dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], max_frames=8, fps=1.0)
TINY_SEED = 20240611


@dataclass
class BaseVLM:
    """A frozen SmolVLM2 with what the video pipeline needs to feed it."""

    model: Any  # SmolVLMForConditionalGeneration, eval, requires_grad False
    tokenizer: Any  # PreTrainedTokenizerFast with SmolVLM2's special tokens
    name: str
    image_size: int
    tokens_per_frame: int
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    fingerprint: str = ""
    max_frames: int = 64
    fps: float = 1.0
    extra: dict = field(default_factory=dict)

    @property
    def text_model(self):
        return self.model.model.text_model

    @property
    def vision_model(self):
        return self.model.model.vision_model

    @property
    def connector(self):
        return self.model.model.connector

    @property
    def lm_head(self):
        return self.model.lm_head

    @property
    def num_layers(self) -> int:
        return int(self.model.config.text_config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.text_config.hidden_size)

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def module_shapes(self, names=("down_proj",)) -> dict[str, tuple[int, int]]:
        """``{module: (d_in, d_out)}`` of decoder-layer linears, e.g. ``down_proj: (inter, hidden)``."""
        if isinstance(names, str):
            names = (names,)
        layer = self.text_model.layers[0]
        linears = {n.rsplit(".", 1)[-1]: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
        out = {}
        for name in names:
            if name not in linears:
                raise ValueError(
                    f"names: {name!r} is not a linear module of the decoder layers; expected one of {sorted(linears)}"
                )
            out[name] = (int(linears[name].in_features), int(linears[name].out_features))
        return out

    def stop_token_ids(self) -> list[int]:
        from f2l.tokenizer import EOS_TOKEN

        ids = {int(self.tokenizer.convert_tokens_to_ids(EOS_TOKEN))}
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        ids.discard(self.tokenizer.unk_token_id)
        return sorted(ids)


def _frozen(model):
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cpu")
    if isinstance(device, str):
        return torch.device(device)
    if isinstance(device, torch.device):
        return device
    raise TypeError(f"device: expected a str or torch.device, got {type(device).__name__}")


def _check_dtype(dtype):
    if dtype is not None and dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"dtype: expected torch.float32, torch.bfloat16 or torch.float16, got {dtype!r}")


def tokens_per_frame(config) -> int:
    """Image tokens one frame puts in the prompt: (image/patch)² / scale²."""
    v = config.vision_config
    grid = int(v.image_size) // int(v.patch_size)
    s = int(config.scale_factor)
    if grid % s:
        raise ValueError(f"config: the patch grid {grid} is not divisible by scale_factor {s}")
    return (grid // s) ** 2


def fingerprint(model) -> str:
    """A stable hash of the text config and a sample of the text weights.

    The sample is rounded to bf16 first, so one checkpoint loaded in fp32 or bf16 gives
    the same fingerprint, while any retrained or different base does not. fp16 rounds
    differently (double rounding through fp16 changes some bf16 values), so
    :func:`load_base` takes the fingerprint of the weights as stored, before casting them to
    the requested dtype: the fingerprint identifies the weights, never the dtype.
    """
    tc = model.config.text_config.to_dict()
    # Only plain sizes: their serialisation is the same across transformers versions.
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "vocab_size")
    h = hashlib.sha256(json.dumps({k: tc.get(k) for k in keys}, sort_keys=True, default=str).encode())
    # Every text-model tensor (and the head) contributes a strided sample: any retrained
    # layer changes the fingerprint, at a cost independent of the model size.
    named = sorted(model.model.text_model.named_parameters()) + [("lm_head", model.lm_head.weight)]
    if any(t.device.type == "meta" for _, t in named):
        return "meta-" + h.hexdigest()[:16]
    for name, t in named:
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // 512)
        sample = flat[::step][:512].to(torch.bfloat16).float().cpu().contiguous()
        h.update(name.encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def _tiny_config(tokenizer, name: str = "tiny"):
    from transformers import SmolVLMConfig

    from f2l.tokenizer import IMAGE_TOKEN

    text_spec, vision_spec = _TINY[name]
    text = dict(text_spec, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return SmolVLMConfig(text_config=text, vision_config=dict(vision_spec), scale_factor=TINY_SCALE_FACTOR,
                         image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), tie_word_embeddings=False)


def preset_config(name: str):
    """``(SmolVLMConfig, processor dict)`` of a preset, without building the model."""
    from transformers import SmolVLMConfig

    from f2l.tokenizer import build_tokenizer

    if name in _TINY:
        tok = build_tokenizer()
        cfg = _tiny_config(tok, name)
        proc = dict(TINY_PROCESSOR, image_size=TINY_VISION["image_size"], tokens_per_frame=tokens_per_frame(cfg))
        return cfg, proc
    if name not in PRESETS:
        raise ValueError(f"name: expected one of {PRESETS}, got {name!r}")
    with open(_CONFIG_DIR / f"{name}.json") as f:
        spec = json.load(f)
    cfg = SmolVLMConfig(**spec["model"])
    proc = dict(spec["processor"])
    if proc["tokens_per_frame"] != tokens_per_frame(cfg):
        raise RuntimeError(f"f2l/configs/{name}.json: tokens_per_frame disagrees with the vision geometry")
    return cfg, proc


def _build_random(name: str, device: torch.device, dtype) -> BaseVLM:
    from transformers import SmolVLMForConditionalGeneration

    from f2l.tokenizer import IMAGE_TOKEN, build_tokenizer

    cfg, proc = preset_config(name)
    # real architectures: the stand-in covers the whole embedding, so every id decodes
    tok = build_tokenizer(None if name in _TINY else int(cfg.text_config.vocab_size))
    if name not in _TINY:
        # Random weights come without the real tokenizer: the in-code one stands in, so the
        # image placeholder is its <image> id (ids stay inside the real 49280 vocabulary).
        cfg.image_token_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
        cfg.text_config.pad_token_id = tok.pad_token_id
        cfg.text_config.bos_token_id = tok.bos_token_id
        cfg.text_config.eos_token_id = tok.eos_token_id
    if device.type == "meta":
        with torch.device("meta"):
            model = SmolVLMForConditionalGeneration(cfg)
    else:
        # Seeded in a forked RNG: the preset is deterministic and the caller's RNG untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_SEED)
            model = SmolVLMForConditionalGeneration(cfg)
        model.to(device=device)
    fp = fingerprint(model)  # of the weights as built (fp32), whatever dtype they run in
    if dtype is not None:
        model.to(dtype=dtype)
    model = _frozen(model)
    return BaseVLM(
        model=model, tokenizer=tok, name=name, image_size=int(proc["image_size"]),
        tokens_per_frame=int(proc["tokens_per_frame"]), image_mean=tuple(proc["image_mean"]),
        image_std=tuple(proc["image_std"]), fingerprint=fp, max_frames=int(proc["max_frames"]),
        fps=float(proc["fps"]),
    )


def _read_processor(path: Path, config) -> dict:
    """Frame geometry of a checkpoint directory (processor files win over the vision config)."""
    proc = {
        "image_size": int(config.vision_config.image_size),
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "max_frames": 64,
        "fps": 1.0,
    }
    for fname in _PROCESSOR_FILES:
        p = path / fname
        if not p.is_file():
            continue
        with open(p) as f:
            data = json.load(f)
        # processor_config.json nests the image/video processors; the others are flat.
        for d in (data, data.get("image_processor", {}), data.get("video_processor", {})):
            if not isinstance(d, dict):
                continue
            mis = d.get("max_image_size")
            if isinstance(mis, dict) and "longest_edge" in mis:
                proc["image_size"] = int(mis["longest_edge"])
            if "image_mean" in d:
                proc["image_mean"] = [float(x) for x in d["image_mean"]]
            if "image_std" in d:
                proc["image_std"] = [float(x) for x in d["image_std"]]
            vs = d.get("video_sampling")
            if isinstance(vs, dict):
                proc["max_frames"] = int(vs.get("max_frames", proc["max_frames"]))
                proc["fps"] = float(vs.get("fps", proc["fps"]))
    return proc


def _load_dir(path: Path, device: torch.device, dtype) -> BaseVLM:
    from transformers import AutoTokenizer, SmolVLMForConditionalGeneration

    from f2l.tokenizer import special_token_ids

    if not (path / "config.json").is_file():
        raise ValueError(f"base: {str(path)!r} is a directory without config.json; expected a SmolVLM2 checkpoint")
    if not any(path.glob("*.safetensors")):
        raise ValueError(f"base: {str(path)!r} has no *.safetensors weights")
    # Loaded as stored and fingerprinted before the cast to ``dtype``: the fingerprint
    # identifies the weights, not the dtype they run in.
    model = SmolVLMForConditionalGeneration.from_pretrained(str(path))
    fp = fingerprint(model)
    if dtype is not None:
        model.to(dtype=dtype)
    model.to(device=device)
    if dtype is None:
        # A checkpoint saved in bf16 stays bf16 on GPUs but runs in fp32 on CPUs.
        if device.type == "cpu" and model.dtype != torch.float32:
            model.to(dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(path))
    special_token_ids(tok)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    proc = _read_processor(path, model.config)
    model = _frozen(model)
    return BaseVLM(
        model=model, tokenizer=tok, name=str(path), image_size=int(proc["image_size"]),
        tokens_per_frame=tokens_per_frame(model.config), image_mean=tuple(proc["image_mean"]),
        image_std=tuple(proc["image_std"]), fingerprint=fp, max_frames=int(proc["max_frames"]),
        fps=float(proc["fps"]),
    )


def load_base(base, *, device=None, dtype=None) -> BaseVLM:
    """Load a frozen base VLM: a preset name (see :data:`PRESETS`) or a local checkpoint dir.

    >>> base = load_base("tiny")
    >>> base.tokens_per_frame, base.num_layers
    (9, 4)
    """
    if isinstance(base, BaseVLM):
        return base
    if not isinstance(base, (str, os.PathLike)):
        raise TypeError(f"base: expected a preset name or a checkpoint directory, got {type(base).__name__}")
    dev = _resolve_device(device)
    _check_dtype(dtype)
    name = os.fspath(base)
    if name in PRESETS:
        return _build_random(name, dev, dtype)
    path = Path(name).expanduser()
    if path.is_dir():
        return _load_dir(path, dev, dtype)
    if path.exists():
        raise ValueError(f"base: {name!r} is a file; expected a preset name or a checkpoint directory")
    raise ValueError(
        f"base: {name!r} is neither a preset ({', '.join(PRESETS)}) nor an existing checkpoint directory "
        "(hub downloads are not done here: download the checkpoint and pass its directory)"
    )


def save_base(base: BaseVLM, path) -> None:
    """Write ``base`` as a checkpoint directory that :func:`load_base` reads back."""
    from f2l.files import atomic_write_text

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    base.model.save_pretrained(str(path))
    base.tokenizer.save_pretrained(str(path))
    proc = {
        "max_image_size": {"longest_edge": base.image_size},
        "image_mean": list(base.image_mean),
        "image_std": list(base.image_std),
        "video_sampling": {"max_frames": base.max_frames, "fps": base.fps},
    }
    atomic_write_text(path / "preprocessor_config.json", json.dumps(proc, indent=2) + "\n")
