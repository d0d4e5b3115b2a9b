"""``Frames2LoRA``: frozen SmolVLM2 + hypernetwork + per-example LoRA, wired together.

    m = Frames2LoRA.from_pretrained("tiny", preset="tiny")
    adapters = m.internalize(["clip.mp4"])                 # one VideoAdapter per video
    m.answer(adapters, ["What colour is the circle?"])     # zero visual tokens in context
    m.answer_in_context(["clip.mp4"], ["What colour is the circle?"])   # the baseline

Training code uses the differentiable pieces: ``encode`` (frozen, no grad) ->
``adapter_tensors`` (the hypernetwork) -> ``lm_forward`` (the base with the predicted
LoRA active) on ``question_ids``.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from f2l.config import DEFAULT_INSTRUCTION, HYPERNET_PRESETS, F2LConfig, HypernetConfig
from f2l.encode import EncodedVideos, encode_videos, image_features, multimodal_embeds, prompt_ids
from f2l.generate import SamplingConfig, generate, left_pad, left_pad_embeds, position_ids_from_mask, trim_stop_strings
from f2l.presets import BaseVLM, load_base
from f2l.prompt import answer_text, question_prompt

F2L_CONFIG_NAME = "f2l_config.json"
_OFFICIAL_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def _check_str_list(name: str, xs) -> list[str]:
    if isinstance(xs, str) or not isinstance(xs, (list, tuple)):
        raise TypeError(f"{name}: expected a list of str, got {type(xs).__name__}")
    if not xs:
        raise ValueError(f"{name}: expected at least one entry, got an empty list")
    for i, x in enumerate(xs):
        if not isinstance(x, str):
            raise TypeError(f"{name}[{i}]: expected a str, got {type(x).__name__}")
    return list(xs)


def _check_video_list(videos) -> list:
    if isinstance(videos, (str, os.PathLike)) or not isinstance(videos, (list, tuple)):
        raise TypeError(f"videos: expected a list of videos (paths, frame tensors or PIL lists), "
                        f"got {type(videos).__name__}")
    if not videos:
        raise ValueError("videos: expected at least one video, got an empty list")
    return list(videos)


def _token_ids(owner, text: str) -> list[int]:
    """``text``'s token ids under ``owner.base.tokenizer``, remembered on ``owner``: training
    asks the same questions every epoch and tokenizing them again cost a tenth of a CPU step.
    Bounded; per tokenizer."""
    tok = owner.base.tokenizer
    held = owner.__dict__.get("_token_cache")
    if held is None or held[0] is not tok:
        held = owner.__dict__["_token_cache"] = (tok, {})
    cache = held[1]
    ids = cache.get(text)
    if ids is None:
        if len(cache) >= 1 << 16:
            cache.clear()
        ids = cache[text] = tuple(tok(text, add_special_tokens=False)["input_ids"])
    return list(ids)


class Frames2LoRA(nn.Module):
    """A frozen SmolVLM2 (``base``), the Frames2LoRA hypernetwork (``hypernet``, the only
    trainable part) and the per-example LoRA patch on the base's decoder (``patch``)."""

    def __init__(self, base: BaseVLM, hypernet: nn.Module, config: F2LConfig):
        super().__init__()
        from f2l.layers import apply_f2l

        if not isinstance(base, BaseVLM):
            raise TypeError(f"base: expected a BaseVLM, got {type(base).__name__}")
        if not isinstance(config, F2LConfig):
            raise TypeError(f"config: expected an F2LConfig, got {type(config).__name__}")
        if not isinstance(hypernet, nn.Module) or not hasattr(hypernet, "config"):
            raise TypeError(f"hypernet: expected a Frames2LoRAHypernet, got {type(hypernet).__name__}")
        hc = hypernet.config
        if hc.num_layers != base.num_layers or hc.hidden_size != base.hidden_size:
            raise ValueError(f"hypernet: built for {hc.num_layers} layers of width {hc.hidden_size}, but the base has "
                             f"{base.num_layers} layers of width {base.hidden_size}")
        shapes = base.module_shapes(tuple(hc.target_modules))
        for m, s in hc.target_modules.items():
            if tuple(s) != shapes[m]:
                raise ValueError(f"hypernet: module {m!r} has shape {tuple(s)} in the hypernet config, "
                                 f"{shapes[m]} in the base")
        self.base = base  # plain attribute: the frozen base is not part of this module's state
        self.hypernet = hypernet
        self.config = config
        config.hypernet = hc
        config.target_modules = tuple(hc.target_modules)
        if not config.base_fingerprint:
            config.base_fingerprint = base.fingerprint
        self.patch = apply_f2l(base.model, target_modules=tuple(hc.target_modules))

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(cls, base="tiny", hypernet=None, *, preset: str | None = None, device=None, dtype=None,
                        config: F2LConfig | None = None) -> "Frames2LoRA":
        """Build from a base (preset name or SmolVLM2 checkpoint dir) and a hypernetwork.

        hypernet: None (a fresh one, ``HypernetConfig`` preset ``preset`` -- default
        ``"frames2lora"``), a directory written by :meth:`save_hypernet`, an official
        ``.pt`` checkpoint (converted by :mod:`f2l.convert`), or a module.
        dtype: the base's dtype; the hypernetwork uses it too (default float32).
        """
        from f2l.hypernet import Frames2LoRAHypernet

        if preset is not None and not isinstance(preset, str):
            raise TypeError(f"preset: expected None or a str, got {type(preset).__name__}")
        if preset is not None and preset not in HYPERNET_PRESETS:
            raise ValueError(f"preset: expected one of {HYPERNET_PRESETS}, got {preset!r}")
        if config is not None and not isinstance(config, F2LConfig):
            raise TypeError(f"config: expected None or an F2LConfig, got {type(config).__name__}")
        b = load_base(base, device=device, dtype=dtype)
        hdtype = dtype or torch.float32
        saved_cfg = None
        if hypernet is None:
            hc = HypernetConfig.from_preset(preset or "frames2lora", b)
            net = Frames2LoRAHypernet(hc)
        elif isinstance(hypernet, Frames2LoRAHypernet):
            net = hypernet
        elif isinstance(hypernet, (str, os.PathLike)):
            path = Path(hypernet)
            if path.is_dir():
                if preset is not None:
                    raise ValueError("preset: a saved hypernetwork carries its own config; do not pass preset")
                net = Frames2LoRAHypernet.from_pretrained(path)
                if (path / F2L_CONFIG_NAME).is_file():
                    saved_cfg = F2LConfig.load(path / F2L_CONFIG_NAME)
            elif path.is_file() and path.suffix in _OFFICIAL_SUFFIXES:
                net = cls._load_official(path, b, preset)
            elif path.exists():
                raise ValueError(f"hypernet: {str(path)!r} is neither a saved f2l hypernetwork directory nor an "
                                 f"official checkpoint ({', '.join(_OFFICIAL_SUFFIXES)})")
            else:
                raise FileNotFoundError(f"hypernet: {str(path)!r} does not exist")
        else:
            raise TypeError(f"hypernet: expected None, a directory, a checkpoint path or a Frames2LoRAHypernet, "
                            f"got {type(hypernet).__name__}")
        net = net.to(device=b.device, dtype=hdtype)
        if saved_cfg is not None and saved_cfg.base_fingerprint and saved_cfg.base_fingerprint != b.fingerprint:
            warnings.warn(f"the hypernetwork was trained on base {saved_cfg.base!r} (fingerprint "
                          f"{saved_cfg.base_fingerprint}), but {b.name!r} has fingerprint {b.fingerprint}",
                          stacklevel=2)
        cfg = config or saved_cfg or F2LConfig(base=b.name, max_frames=min(12, b.max_frames))
        cfg.base = b.name  # the base actually in use (the fingerprint guards compatibility)
        model = cls(b, net, cfg)
        model.config.base_fingerprint = b.fingerprint
        return model

    @staticmethod
    def _load_official(path: Path, base: BaseVLM, preset):
        from f2l.hypernet import Frames2LoRAHypernet

        try:
            from f2l import convert
        except ImportError:
            raise RuntimeError(f"hypernet: {str(path)!r} looks like an official checkpoint, but f2l.convert is not "
                               "available to import it") from None
        if not hasattr(convert, "load_official"):
            raise RuntimeError("hypernet: f2l.convert has no load_official(path, config)")
        hc = HypernetConfig.from_preset(preset or "frames2lora", base)
        out = convert.load_official(path, hc)
        if isinstance(out, Frames2LoRAHypernet):
            return out
        if isinstance(out, dict):
            net = Frames2LoRAHypernet(hc)
            net.load_state_dict(out)
            return net
        raise RuntimeError(f"f2l.convert.load_official returned {type(out).__name__}, expected a Frames2LoRAHypernet")

    def save_hypernet(self, directory) -> None:
        """Write the hypernetwork (``config.json`` + ``model.safetensors``) and this model's
        :class:`F2LConfig` (``f2l_config.json``) into ``directory``, each file atomically."""
        if not isinstance(directory, (str, os.PathLike)):
            raise TypeError(f"directory: expected a str or os.PathLike, got {type(directory).__name__}")
        path = Path(directory)
        if path.exists() and not path.is_dir():
            raise ValueError(f"directory: {str(path)!r} exists and is not a directory")
        self.hypernet.save_pretrained(path)
        self.config.save(path / F2L_CONFIG_NAME)

    def to(self, *args, **kwargs):  # noqa: D102 - the base follows the hypernet's device
        super().to(*args, **kwargs)
        device = next(self.hypernet.parameters()).device
        self.base.model.to(device=device)
        return self

    @property
    def device(self) -> torch.device:
        return self.base.device

    # ------------------------------------------------------------------ encoding

    def _load(self, videos):
        from f2l.video import load_video

        b = self.base
        return [load_video(v, image_size=b.image_size, max_frames=self.config.max_frames, fps=self.config.fps,
                           mean=b.image_mean, std=b.image_std, longest_edge=self.config.longest_edge) for v in videos]

    def encode(self, videos, instruction: str | None = None) -> EncodedVideos:
        """Frozen, no-grad encoding of videos into packed stacked layer states."""
        videos = _check_video_list(videos)
        if instruction is not None and not isinstance(instruction, str):
            raise TypeError(f"instruction: expected None or a str, got {type(instruction).__name__}")
        return encode_videos(self.base, self._load(videos), instruction or self.config.instruction or
                             DEFAULT_INSTRUCTION, chunk_videos=self.config.chunk_videos,
                             chunk_frames=self.config.chunk_frames)

    def adapter_tensors(self, encoded: EncodedVideos, *, backend: str | None = None, module=None):
        """The hypernetwork on encoded videos: differentiable :class:`AdapterTensors`.

        module: what to call instead of ``self.hypernet`` -- a wrapper of it, such as the
        ``DistributedDataParallel`` module the trainer runs under ``torchrun``.
        """
        if not isinstance(encoded, EncodedVideos):
            raise TypeError(f"encoded: expected EncodedVideos, got {type(encoded).__name__}")
        p = next(self.hypernet.parameters())
        states = encoded.states.to(device=p.device, dtype=p.dtype)
        net = self.hypernet if module is None else module
        return net(states, encoded.cu_seqlens.to(p.device), backend=backend)

    @torch.no_grad()
    def internalize(self, videos, instruction: str | None = None, *, batch_size: int = 8) -> list:
        """One :class:`f2l.adapter.VideoAdapter` per video (batched through the frozen base
        and the hypernetwork ``batch_size`` videos at a time)."""
        videos = _check_video_list(videos)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
        out = []
        starts = range(0, len(videos), batch_size)
        for s in tqdm(starts, desc="internalize", disable=len(starts) < 3, leave=False):
            enc = self.encode(videos[s:s + batch_size], instruction)
            tensors = self.adapter_tensors(enc)
            out += self.hypernet.to_adapters(
                tensors, base_fingerprint=self.base.fingerprint, num_frames=list(enc.num_frames),
                source=[str(x) for x in enc.sources],
                metadata={"instruction": instruction or self.config.instruction, "base": self.base.name,
                          "longest_edge": min(self.config.longest_edge, self.base.image_size),
                          "image_size": self.base.image_size})
        return out

    @torch.no_grad()
    def internalize_long(self, video, instruction: str | None = None, *, segment_frames: int | None = None,
                         max_segments: int = 16):
        """One adapter for a long video: its frames (sampled by SmolVLM2's rule, up to
        ``segment_frames · max_segments``) are cut into consecutive segments of
        ``segment_frames`` (default ``config.max_frames``), each segment is internalized on its
        own (one batch), and the segment adapters are composed in rank space.
        """
        from f2l.adapter import VideoAdapter
        from f2l.video import Video, load_video

        seg = self.config.max_frames if segment_frames is None else segment_frames
        for name, v in (("segment_frames", seg), ("max_segments", max_segments)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
        b = self.base
        full = load_video(video, image_size=b.image_size, max_frames=seg * max_segments, fps=self.config.fps,
                          mean=b.image_mean, std=b.image_std, longest_edge=self.config.longest_edge)
        parts = [Video(pixel_values=full.pixel_values[i:i + seg], timestamps=full.timestamps[i:i + seg],
                       duration=full.duration, source=f"{full.source}[{i}:{i + seg}]",
                       indices=full.indices[i:i + seg])
                 for i in range(0, full.num_frames, seg)]
        adapters = self.internalize(parts, instruction, batch_size=len(parts))
        if len(adapters) == 1:
            return adapters[0]
        out = VideoAdapter.compose(adapters)
        out.source = full.source
        return out

    # ------------------------------------------------------------------ language model

    def question_ids(self, prompts: Sequence[str], answers: Sequence[str] | None = None, *,
                     padding_side: str = "right"):
        """Chat-format token ids of questions (and answers, for training).

        Returns ``(input_ids [B, T], attention_mask [B, T], labels [B, T])``; labels are -100
        on the prompt and the padding (all -100 without answers).
        """
        prompts = _check_str_list("prompts", prompts)
        if answers is not None:
            answers = _check_str_list("answers", answers)
            if len(answers) != len(prompts):
                raise ValueError(f"answers: expected {len(prompts)} answers (one per prompt), got {len(answers)}")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side: expected 'left' or 'right', got {padding_side!r}")
        tok = self.base.tokenizer
        rows, labels = [], []
        for i, p in enumerate(prompts):
            q = _token_ids(self, question_prompt(p))
            a = _token_ids(self, answer_text(answers[i])) if answers is not None else []
            rows.append(q + a)
            labels.append([-100] * len(q) + a)
        from f2l.generate import pad_labelled

        ids, mask, lab = pad_labelled(rows, labels, tok.pad_token_id, side=padding_side)
        dev = self.device
        return ids.to(dev), mask.to(dev), lab.to(dev)

    def _adapter_context(self, adapters, adapter_ids):
        if adapters is None:
            return contextlib.nullcontext()
        # The patch casts the factors to the base dtype (differentiably) once per block.
        if getattr(adapters, "bias_rank", 0) and any(isinstance(i, (list, tuple)) for i in adapter_ids):
            # A composition list shares the context-free bias ranks once, as VideoAdapter.compose does.
            la, lb, ids, ranks = adapters.with_shared_bias(adapter_ids)
            return self.patch.use(la, lb, ids, scale=adapters.scale, ranks=ranks)
        return self.patch.use(adapters.lora_a, adapters.lora_b, adapter_ids, scale=adapters.scale)

    def lm_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, adapters=None,
                   adapter_ids=None) -> torch.Tensor:
        """Logits ``[B, T, V]`` of the frozen base with the predicted LoRA active.

        adapters: :class:`AdapterTensors` (``lora_a[m] [L, P, r, d_in]``) or None (the base);
        adapter_ids: pool index per row (default ``range(B)``), ``-1``/None, or a list.
        Differentiable w.r.t. the adapters. ``adapters`` may also be a list with one entry per
        row, as :meth:`answer` takes them (a :class:`VideoAdapter`, a list of them, or None;
        not differentiated, ``adapter_ids`` must be None then).
        """
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected a tensor [B, T], got "
                             f"{tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask: expected shape {tuple(input_ids.shape)} (that of input_ids), "
                             f"got {tuple(attention_mask.shape)}")
        if isinstance(adapters, (list, tuple)):
            if adapter_ids is not None:
                raise ValueError("adapter_ids: expected None when adapters is a list (one entry per row)")
            if len(adapters) != input_ids.shape[0]:
                raise ValueError(f"adapters: expected {input_ids.shape[0]} entries (one per row of input_ids), "
                                 f"got {len(adapters)}")
            pool, ids = self._pool(list(adapters))
            ctx = self.patch.use_pool(pool, ids) if pool is not None else contextlib.nullcontext()
            with ctx:
                return self.lm_forward(input_ids, attention_mask)
        if adapters is not None and not hasattr(adapters, "num_videos"):
            raise TypeError(f"adapters: expected AdapterTensors, a list of VideoAdapter (one per row) or None, "
                            f"got {type(adapters).__name__}")
        if adapters is not None and adapter_ids is None:
            if adapters.num_videos != input_ids.shape[0]:
                raise ValueError(f"adapter_ids: needed when the batch ({input_ids.shape[0]} rows) and the adapters "
                                 f"({adapters.num_videos} videos) differ in size")
            adapter_ids = list(range(input_ids.shape[0]))
        dev = self.device
        input_ids, attention_mask = input_ids.to(dev), attention_mask.to(dev)
        with self._adapter_context(adapters, adapter_ids):
            out = self.base.text_model(input_ids=input_ids, attention_mask=attention_mask,
                                       position_ids=position_ids_from_mask(attention_mask), use_cache=False)
            return self.base.lm_head(out.last_hidden_state)

    # ------------------------------------------------------------------ answering

    def _step(self, input_ids, inputs_embeds, mask, pos, cache):
        from f2l.generate import cache_kwargs

        tm = self.base.text_model
        out = tm(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=pos,
                 use_cache=True, **cache_kwargs(tm, cache))
        return self.base.lm_head(out.last_hidden_state[:, -1])

    def _pool(self, adapters):
        """Resident pool of the distinct adapters of a batch; ``(pool, adapter_ids)``."""
        from f2l.adapter import VideoAdapter
        from f2l.layers import AdapterPool

        if isinstance(adapters, (VideoAdapter, str)) or not isinstance(adapters, (list, tuple)):
            raise TypeError(f"adapters: expected a list (one entry per prompt), got {type(adapters).__name__}")
        unique: dict[int, VideoAdapter] = {}
        composed: dict[tuple, VideoAdapter] = {}
        ids: list[int] = []
        for i, a in enumerate(adapters):
            if a is None:
                ids.append(-1)
                continue
            if isinstance(a, (list, tuple)):
                if not a or not all(isinstance(x, VideoAdapter) for x in a):
                    raise TypeError(f"adapters[{i}]: a composition must be a non-empty list of VideoAdapter")
                # One materialised rank-space concatenation per distinct list (its bias ranks
                # are shared once, as VideoAdapter.compose defines), reused across prompts.
                key = tuple(id(x) for x in a)
                if key not in composed:
                    composed[key] = a[0] if len(a) == 1 else VideoAdapter.compose(list(a))
                a = composed[key]
            if not isinstance(a, VideoAdapter):
                raise TypeError(f"adapters[{i}]: expected a VideoAdapter, a list of them or None, "
                                f"got {type(a).__name__}")
            a.check_base(self.base.fingerprint, what=f"adapters[{i}].base_fingerprint")
            if a.num_layers != self.base.num_layers:
                raise ValueError(f"adapters[{i}]: has {a.num_layers} layers, the base has {self.base.num_layers}")
            shapes = self.base.module_shapes(a.target_modules)
            if dict(a.module_shapes) != shapes:
                raise ValueError(f"adapters[{i}]: module shapes {a.module_shapes} do not match the base's {shapes}")
            if id(a) not in unique:
                unique[id(a)] = a
            ids.append(list(unique).index(id(a)))
        if not unique:
            return None, ids
        items = list(unique.values())
        modules = tuple(items[0].target_modules)
        for a in items[1:]:
            if tuple(a.target_modules) != modules:
                raise ValueError(f"adapters: every adapter of one batch must target the same modules; got "
                                 f"{modules} and {tuple(a.target_modules)}")
        pool = AdapterPool(self.base.num_layers, self.base.module_shapes(modules), max(a.rank for a in items),
                           len(items), device=self.base.device, dtype=self.base.dtype)
        for k, a in enumerate(items):
            pool.add(k, a)
        return pool, [None if j == -1 else j for j in ids]

    @torch.no_grad()
    def answer(self, adapters, prompts, *, max_new_tokens: int = 32, do_sample: bool = False,
               temperature: float = 1.0, top_p: float = 1.0, stop_strings: Sequence[str] | None = None,
               seed: int | None = None) -> list[str]:
        """Answer ``prompts[i]`` with ``adapters[i]`` active, all in one KV-cached batch.

        adapters[i]: a VideoAdapter, a list of them (composed in rank space), or None (the
        base model). Returns the decoded answers (special tokens dropped, stripped).
        """
        prompts = _check_str_list("prompts", prompts)
        if not isinstance(adapters, (list, tuple)) or len(adapters) != len(prompts):
            n = len(adapters) if isinstance(adapters, (list, tuple)) else type(adapters).__name__
            raise ValueError(f"adapters: expected {len(prompts)} entries (one per prompt), got {n}")
        if stop_strings is not None:
            stop_strings = _check_str_list("stop_strings", stop_strings)
        cfg = SamplingConfig(max_new_tokens, do_sample, temperature, top_p, seed)
        pool, ids = self._pool(adapters)
        ctx = self.patch.use_pool(pool, ids) if pool is not None else contextlib.nullcontext()
        tok = self.base.tokenizer
        seqs = [torch.tensor(tok(question_prompt(p), add_special_tokens=False)["input_ids"]) for p in prompts]
        input_ids, mask = left_pad(seqs, tok.pad_token_id, device=self.device)
        with ctx:
            out = generate(self._step, input_ids=input_ids, attention_mask=mask, cfg=cfg,
                           stop_ids=self.base.stop_token_ids(), pad_id=tok.pad_token_id,
                           cache_config=self.base.model.config.text_config, stop_strings=stop_strings,
                           decode=lambda t: tok.decode(t, skip_special_tokens=True))
        return [trim_stop_strings(tok.decode(o, skip_special_tokens=True), stop_strings).strip() for o in out]

    @torch.no_grad()
    def answer_in_context(self, videos, prompts, *, max_new_tokens: int = 32, do_sample: bool = False,
                          temperature: float = 1.0, top_p: float = 1.0, stop_strings: Sequence[str] | None = None,
                          seed: int | None = None) -> list[str]:
        """The baseline: video ``i``'s frames in the prompt of question ``i``, no adapter."""
        videos = _check_video_list(videos)
        prompts = _check_str_list("prompts", prompts)
        if len(videos) != len(prompts):
            raise ValueError(f"prompts: expected {len(videos)} prompts (one per video), got {len(prompts)}")
        if stop_strings is not None:
            stop_strings = _check_str_list("stop_strings", stop_strings)
        cfg = SamplingConfig(max_new_tokens, do_sample, temperature, top_p, seed)
        tok = self.base.tokenizer
        # Several questions about one video (the same object or path) load it and run the
        # vision tower once; the distinct videos' frames go through the tower together.
        slot, index, distinct = [], {}, []
        for v in videos:
            key = ("path", os.fspath(v)) if isinstance(v, (str, os.PathLike)) else ("obj", id(v))
            if key not in index:
                index[key] = len(distinct)
                distinct.append(v)
            slot.append(index[key])
        loaded = self._load(distinct)
        feats = image_features(self.base, torch.cat([v.pixel_values for v in loaded]),
                               chunk_frames=self.config.chunk_frames)
        feats = feats.split([v.num_frames * self.base.tokens_per_frame for v in loaded])
        embeds = [multimodal_embeds(self.base, prompt_ids(self.base, loaded[j], p), None, features=feats[j])
                  for j, p in zip(slot, prompts)]
        x, mask = left_pad_embeds(embeds)
        out = generate(self._step, inputs_embeds=x, attention_mask=mask, cfg=cfg,
                       stop_ids=self.base.stop_token_ids(), pad_id=tok.pad_token_id,
                       cache_config=self.base.model.config.text_config, stop_strings=stop_strings,
                       decode=lambda t: tok.decode(t, skip_special_tokens=True))
        return [trim_stop_strings(tok.decode(o, skip_special_tokens=True), stop_strings).strip() for o in out]

