"""Frozen encoding: videos -> stacked layer states for the hypernetwork.

One no-grad pass of the frozen VLM over each video's SmolVLM2 prompt. The kept states
are ``hidden_states[:-1]`` of the text model -- the embedding output and the residual
stream entering every decoder layer, before the final norm -- at *all* prompt
positions: ``[L, T, H]`` per video, packed over videos without padding into
``[L, N, H]`` with ``cu_seqlens`` (the layout ``perceiver_attention`` reads).

Memory stays bounded for long videos and large batches: the vision tower runs over
``chunk_frames`` frames at a time, and the text pass over groups of videos whose padded
size is at most ``max_batch_tokens`` (or ``chunk_videos`` videos); the packed result is
written group by group into one preallocated buffer, never stacked twice.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from tqdm.auto import tqdm

from f2l.prompt import video_prompt
from f2l.video import Video

DEFAULT_MAX_BATCH_TOKENS = 16384


@dataclass
class EncodedVideos:
    """Stacked layer states of B videos, packed without padding.

    states: ``[L, N, H]``; video b owns rows ``cu_seqlens[b]:cu_seqlens[b+1]``.
    cu_seqlens: int32 ``[B+1]``. num_frames / visual_tokens: per video.
    """

    states: torch.Tensor
    cu_seqlens: torch.Tensor
    num_frames: list[int]
    visual_tokens: list[int]
    sources: list[str] = field(default_factory=list)

    @property
    def num_videos(self) -> int:
        return len(self.num_frames)

    @property
    def seq_lens(self) -> list[int]:
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).tolist()

    def video(self, b: int) -> torch.Tensor:
        """``[L, T_b, H]`` states of video ``b``."""
        if not 0 <= b < self.num_videos:
            raise IndexError(f"b: expected 0 <= b < {self.num_videos}, got {b}")
        s, e = int(self.cu_seqlens[b]), int(self.cu_seqlens[b + 1])
        return self.states[:, s:e]

    def to(self, device=None, dtype=None) -> "EncodedVideos":
        return EncodedVideos(self.states.to(device=device, dtype=dtype), self.cu_seqlens.to(device=device),
                             list(self.num_frames), list(self.visual_tokens), list(self.sources))

    @staticmethod
    def cat(parts: Sequence["EncodedVideos"]) -> "EncodedVideos":
        """Concatenate encodings along the video axis."""
        if not parts:
            raise ValueError("parts: expected at least one EncodedVideos, got none")
        states = torch.cat([p.states for p in parts], dim=1)
        lens = [n for p in parts for n in p.seq_lens]
        cu = torch.zeros(len(lens) + 1, dtype=torch.int32, device=states.device)
        cu[1:] = torch.tensor(lens, dtype=torch.int32).cumsum(0)
        return EncodedVideos(states, cu, [n for p in parts for n in p.num_frames],
                             [n for p in parts for n in p.visual_tokens], [s for p in parts for s in p.sources])


@torch.no_grad()
def image_features(base, pixel_values: torch.Tensor, *, chunk_frames: int = 64) -> torch.Tensor:
    """``[F, 3, S, S]`` frames -> ``[F · tokens_per_frame, H]`` connector outputs."""
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
        raise ValueError(f"pixel_values: expected a tensor [F, 3, S, S], got "
                         f"{tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__}")
    if pixel_values.shape[-1] != base.image_size or pixel_values.shape[-2] != base.image_size:
        raise ValueError(f"pixel_values: expected frames of {base.image_size}x{base.image_size} (the base's image "
                         f"size), got {tuple(pixel_values.shape[-2:])}")
    vision, connector = base.vision_model, base.connector
    dev, dt = base.device, base.vision_model.embeddings.patch_embedding.weight.dtype
    patch = int(base.model.config.vision_config.patch_size)
    grid = base.image_size // patch
    out = []
    for i in range(0, pixel_values.shape[0], chunk_frames):
        px = pixel_values[i:i + chunk_frames].to(device=dev, dtype=dt)
        # Every patch is real (frames are resized, never padded).
        mask = torch.ones(px.shape[0], grid, grid, dtype=torch.bool, device=dev)
        hs = vision(pixel_values=px, patch_attention_mask=mask).last_hidden_state
        out.append(connector(hs).reshape(-1, base.hidden_size))
    return torch.cat(out)


def prompt_ids(base, video: Video, text: str, *, add_generation_prompt: bool = True) -> torch.Tensor:
    """Token ids ``[T]`` of the SmolVLM2 prompt of ``video`` followed by ``text``.

    ``add_generation_prompt=True`` (a question the model answers in context) ends the turn
    with ``<end_of_utterance>\\nAssistant:``; the encoding prompt the hypernetwork reads is
    ``add_generation_prompt=False`` (``<end_of_utterance>\\n``), as the authors encode."""
    prompt = video_prompt(video.timestamps, video.duration, base.tokens_per_frame, text,
                          add_generation_prompt=add_generation_prompt)
    ids = base.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    n_img = int((ids == base.image_token_id).sum())
    want = video.num_frames * base.tokens_per_frame
    if n_img != want:
        raise RuntimeError(f"the video prompt holds {n_img} image tokens, expected {want} "
                           f"({video.num_frames} frames x {base.tokens_per_frame}); the tokenizer splits <image>")
    return ids


@torch.no_grad()
def multimodal_embeds(base, ids: torch.Tensor, video: Video | None, *, chunk_frames: int = 64,
                      features: torch.Tensor | None = None) -> torch.Tensor:
    """Token embeddings ``[T, H]`` with the frame features (``features``, or computed from
    ``video``) written at the ``<image>`` positions."""
    embed = base.text_model.embed_tokens
    x = embed(ids.to(base.device))
    if video is not None or features is not None:
        if features is None:
            features = image_features(base, video.pixel_values, chunk_frames=chunk_frames)
        feats = features.to(x.dtype)
        pos = (ids.to(base.device) == base.image_token_id).nonzero(as_tuple=True)[0]
        if pos.numel() != feats.shape[0]:
            raise RuntimeError(f"{pos.numel()} <image> tokens but {feats.shape[0]} image features")
        x[pos] = feats
    return x


def _groups(lengths: list[int], chunk_videos: int | None, max_batch_tokens: int) -> list[list[int]]:
    """Consecutive groups of videos whose padded size (count × longest) fits the budget."""
    groups, cur, longest = [], [], 0
    for i, n in enumerate(lengths):
        new_longest = max(longest, n)
        full = chunk_videos is not None and len(cur) >= chunk_videos
        if cur and (full or (len(cur) + 1) * new_longest > max_batch_tokens):
            groups.append(cur)
            cur, new_longest = [], n
        cur.append(i)
        longest = new_longest
    if cur:
        groups.append(cur)
    return groups


@torch.no_grad()
def encode_videos(base, videos: Sequence, instruction: str | Sequence[str] | None = None, *,
                  chunk_videos: int | None = None, chunk_frames: int = 64,
                  max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS, max_frames: int | None = None,
                  fps: float | None = None, progress: bool | None = None,
                  longest_edge: int | None = None) -> EncodedVideos:
    """Encode videos with the frozen base into packed stacked layer states.

    videos: :class:`f2l.video.Video` objects or anything :func:`f2l.video.load_video`
      takes (loaded at the base's image size, ``max_frames``/``fps`` defaulting to the
      base's processor settings; ``longest_edge`` defaults to the authors' 384).
    instruction: text after the frames (one for all, or one per video); default
      :data:`f2l.config.DEFAULT_INSTRUCTION`. The prompt closes the user turn with
      ``<end_of_utterance>\\n`` and has no ``Assistant:`` (``add_generation_prompt=False``).
    """
    from f2l.config import DEFAULT_INSTRUCTION
    from f2l.video import DEFAULT_LONGEST_EDGE, load_video

    if isinstance(videos, (str, Video)) or not isinstance(videos, Sequence):
        raise TypeError(f"videos: expected a list of videos, got {type(videos).__name__}")
    if len(videos) == 0:
        raise ValueError("videos: expected at least one video, got an empty list")
    if chunk_videos is not None and (isinstance(chunk_videos, bool) or not isinstance(chunk_videos, int)
                                     or chunk_videos < 1):
        raise ValueError(f"chunk_videos: expected None or an int >= 1, got {chunk_videos!r}")
    if not isinstance(chunk_frames, int) or chunk_frames < 1:
        raise ValueError(f"chunk_frames: expected an int >= 1, got {chunk_frames!r}")
    if not isinstance(max_batch_tokens, int) or max_batch_tokens < 1:
        raise ValueError(f"max_batch_tokens: expected an int >= 1, got {max_batch_tokens!r}")
    if instruction is None:
        instruction = DEFAULT_INSTRUCTION
    if isinstance(instruction, str):
        texts = [instruction] * len(videos)
    else:
        texts = list(instruction)
        if len(texts) != len(videos) or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"instruction: expected a str or {len(videos)} strs (one per video), got {instruction!r}")

    loaded = [
        load_video(v, image_size=base.image_size, max_frames=max_frames or base.max_frames, fps=fps or base.fps,
                   mean=base.image_mean, std=base.image_std,
                   longest_edge=DEFAULT_LONGEST_EDGE if longest_edge is None else longest_edge)
        for v in videos
    ]
    ids = [prompt_ids(base, v, t, add_generation_prompt=False) for v, t in zip(loaded, texts)]
    lengths = [int(x.numel()) for x in ids]
    L, H = base.num_layers, base.hidden_size
    dev, dt = base.device, base.text_model.embed_tokens.weight.dtype
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    states = torch.empty(L, int(cu[-1]), H, device=dev, dtype=dt)
    groups = _groups(lengths, chunk_videos, max_batch_tokens)
    show = progress if progress is not None else len(groups) > 4
    for group in tqdm(groups, desc="encode", disable=not show, leave=False):
        T = max(lengths[i] for i in group)
        x = torch.zeros(len(group), T, H, device=dev, dtype=dt)
        mask = torch.zeros(len(group), T, dtype=torch.long, device=dev)
        # One vision pass (in frame chunks) for the whole group, split back per video.
        feats = image_features(base, torch.cat([loaded[i].pixel_values for i in group]), chunk_frames=chunk_frames)
        feats = feats.split([loaded[i].num_frames * base.tokens_per_frame for i in group])
        for j, i in enumerate(group):
            x[j, :lengths[i]] = multimodal_embeds(base, ids[i], None, features=feats[j])
            mask[j, :lengths[i]] = 1
        # Right padding: causal attention keeps every real position independent of the pad.
        out = base.text_model(inputs_embeds=x, attention_mask=None if bool(mask.all()) else mask,
                              output_hidden_states=True, use_cache=False)
        hs = out.hidden_states
        if len(hs) != L + 1:
            raise RuntimeError(f"the text model returned {len(hs)} hidden states, expected {L + 1}")
        for layer in range(L):
            for j, i in enumerate(group):
                states[layer, int(cu[i]):int(cu[i + 1])] = hs[layer][j, :lengths[i]]
        del out, hs, x
    return EncodedVideos(
        states=states,
        cu_seqlens=cu.to(device=dev, dtype=torch.int32),
        num_frames=[v.num_frames for v in loaded],
        visual_tokens=[v.num_frames * base.tokens_per_frame for v in loaded],
        sources=[v.source for v in loaded],
    )
