"""The Frames2LoRA hypernetwork: per-layer hidden states of a frozen VLM -> LoRA factors.

Architecture (preset ``frames2lora`` reproduces the official one block for block):

1. ``proj``: SwiGLU MLP ``hidden_size -> proj_mult*hidden_size -> latent_dim`` applied to
   every context row of every layer.
2. ``encoder``: a Perceiver resampler. ``num_latents`` learned latents, ``num_blocks``
   unshared cross-attention blocks (no latent self-attention). Each (layer, video) pair is
   an independent sequence. Keys/values are ``concat(context, latents)``; RMSNorm on both
   before attention, sandwich RMSNorms around attention and the SwiGLU feed-forward,
   residuals, final RMSNorm. The context side runs through the fused
   :func:`f2l_kernels.perceiver_attention` (the context RMSNorm and the K/V projections
   happen inside it, so K/V of the long context are never materialised).
3. ``decoder``: one more resampler block whose ``n_modules * rank`` learned queries
   attend to ``concat(encoder latents, queries)`` -> one latent per (module, rank index).
4. ``pre_head``: residual MLP blocks (LayerNorm, Linear, SiLU, Linear, LayerNorm).
5. L2-normalise each latent, then ``head``: per-(layer, module) weight
   ``[latent_dim, d_in + d_out]`` shared across rank indices, no bias. The first ``d_in``
   columns are a row of A, the next ``d_out`` a column of B.
6. Learned per-(layer, rank) scalers ``scaler_a`` (ones) and ``scaler_b`` (zeros: the
   adapter is exactly zero at initialisation) and optional context-free "bias LoRA" ranks
   ``bias_a ~ N(0, 0.2/sqrt(d_in*r))``, ``bias_b = 0`` appended after the context ranks.

The delta is ``lora_alpha * (x A^T) B^T`` with ``lora_alpha = 2 * rank**1.5`` by default
(applied directly, not divided by the rank).

Parameter names (stable; ``f2l.convert`` maps the official checkpoint onto them)::

    proj.{gate_proj,up_proj,down_proj}.weight
    {encoder,decoder}.latents                                   [M, D]
    {encoder,decoder}.blocks.{i}.latents_norm.weight            [D]
    {encoder,decoder}.blocks.{i}.context_norm.weight            [D]
    {encoder,decoder}.blocks.{i}.attn.{q,k,v,o}_proj.weight
    {encoder,decoder}.blocks.{i}.post_attn_norm.weight
    {encoder,decoder}.blocks.{i}.pre_ff_norm.weight
    {encoder,decoder}.blocks.{i}.mlp.{gate_proj,up_proj,down_proj}.weight
    {encoder,decoder}.blocks.{i}.post_ff_norm.weight
    {encoder,decoder}.norm.weight
    pre_head.{j}.{norm_in,fc1,fc2,norm_out}.{weight,bias}
    head.weight                                                 [L, n_modules, D, d_lora]
    scaler_a.{module}, scaler_b.{module}                        [1, L, r, 1]
    bias_a.{module}                                             [L, bias_rank, d_in]
    bias_b.{module}                                             [L, bias_rank, d_out]

Correspondence with the official ``HyperLoRA`` state dict (for ``f2l.convert``)::

    aggregator.perceiver.modality_projection.*           -> proj.*
    aggregator.perceiver.{encoder,decoder}.latents_q     -> {encoder,decoder}.latents
    ...layers.{i}.input_latents_layernorm                -> ...blocks.{i}.latents_norm
    ...layers.{i}.input_context_layernorm                -> ...blocks.{i}.context_norm
    ...layers.{i}.self_attn.{q,k,v,o}_proj               -> ...blocks.{i}.attn.{q,k,v,o}_proj
    ...layers.{i}.post_attention_layernorm               -> ...blocks.{i}.post_attn_norm
    ...layers.{i}.{pre_ff_layernorm,mlp,post_ff_layernorm} -> ...blocks.{i}.{pre_ff_norm,mlp,post_ff_norm}
    aggregator.perceiver.{encoder,decoder}.layernorm     -> {encoder,decoder}.norm
    layers.{j}.mlp.{0,2,5,6}                             -> pre_head.{j}.{norm_in,fc1,fc2,norm_out}
    head.weight [L, D, d_lora] (one module)              -> head.weight[:, 0]
    head.weight [L, n_modules, D, d_lora]                -> head.weight
    {scaler_A,scaler_B,bias_A,bias_B}.{m}                -> {scaler_a,scaler_b,bias_a,bias_b}.{m}

Modules are ordered by sorted name everywhere (``head.weight``'s module axis, decoder
queries); ``d_lora = max(d_in + d_out)`` over modules. ``bias_b`` is stored rank-major (as
the official checkpoints do) and transposed to the PEFT ``[d_out, r]`` layout on output.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from f2l.adapter import VideoAdapter
from f2l.config import HYPERNET_PRESETS, HypernetConfig, default_lora_alpha  # this module's names too (their old home)
from f2l.files import atomic_save_safetensors, atomic_write_text
from f2l_kernels import perceiver_attention

__all__ = [
    "HypernetConfig",
    "Frames2LoRAHypernet",
    "AdapterTensors",
    "HYPERNET_PRESETS",
    "default_lora_alpha",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_FORMAT = "f2l.hypernet"


# --------------------------------------------------------------------------- output


@dataclass
class AdapterTensors:
    """Differentiable hypernetwork output for B videos (layer-major: ``lora_a[m][l]`` is a
    contiguous ``[B, r_total, d_in]`` pool for layer l)."""

    lora_a: dict[str, Tensor]  # module -> [L, B, r_total, d_in]
    lora_b: dict[str, Tensor]  # module -> [L, B, d_out, r_total]
    scale: float
    rank: int
    bias_rank: int = 0

    @property
    def num_videos(self) -> int:
        return next(iter(self.lora_a.values())).shape[1]

    @property
    def num_layers(self) -> int:
        return next(iter(self.lora_a.values())).shape[0]

    def with_shared_bias(self, adapter_ids: Sequence, *, bias_scaler: float | None = None
                         ) -> tuple[dict, dict, list, list[int] | None]:
        """Pool layout in which the context-free bias ranks are one extra pool entry.

        Composing videos through ``LoraBatch`` lists (``adapter_ids[i] = [b1, b2]``) with the
        plain layout would apply the bias ranks once per listed video; the official chunk
        composition applies them once. Returns ``(lora_a, lora_b, adapter_ids, ranks)`` for
        ``F2LPatch.use``: entry ``b < B`` holds video b's context ranks, entry ``B`` the bias
        ranks, and every sequence that uses any video also lists entry ``B`` (weight 1).
        ``bias_scaler`` (``None`` = 1) multiplies that entry's A and B, as the authors'
        ``combine_lora(..., bias_scaler=s)`` does (the bias delta scales by ``s**2``; the same
        factors as :meth:`VideoAdapter.compose` with ``bias_scaler``). Without bias ranks the
        inputs come back unchanged (``ranks=None``). Differentiable.
        """
        if isinstance(adapter_ids, (str, bytes)) or not isinstance(adapter_ids, (list, tuple)):
            raise TypeError(f"adapter_ids: expected a list (one entry per sequence), got {type(adapter_ids).__name__}")
        if bias_scaler is None:
            bias_scaler = 1.0
        if isinstance(bias_scaler, bool) or not isinstance(bias_scaler, (int, float)) or not math.isfinite(bias_scaler):
            raise ValueError(f"bias_scaler: expected None or a finite float, got {bias_scaler!r}")
        if not self.bias_rank:
            return self.lora_a, self.lora_b, list(adapter_ids), None
        B, rb = self.num_videos, self.bias_rank
        rc = self.rank - rb
        r_max = max(rc, rb)
        la, lb = {}, {}
        for m, a in self.lora_a.items():
            b = self.lora_b[m]
            ctx_a = F.pad(a[:, :, :rc], (0, 0, 0, r_max - rc))
            ctx_b = F.pad(b[:, :, :, :rc], (0, r_max - rc))
            bias_a = F.pad(a[:, :1, rc:], (0, 0, 0, r_max - rb))
            bias_b = F.pad(b[:, :1, :, rc:], (0, r_max - rb))
            if bias_scaler != 1.0:
                bias_a, bias_b = bias_a * bias_scaler, bias_b * bias_scaler
            la[m] = torch.cat([ctx_a, bias_a], dim=1)
            lb[m] = torch.cat([ctx_b, bias_b], dim=1)
        ids = []
        for i, e in enumerate(adapter_ids):
            items = [] if e is None or e == -1 else list(e) if isinstance(e, (list, tuple)) else [e]
            for j in items:
                if isinstance(j, bool) or not isinstance(j, int) or not 0 <= j < B:
                    raise ValueError(f"adapter_ids[{i}]: expected video indices in [0, {B}), -1/None or a list, "
                                     f"got {e!r}")
            ids.append(items + [B] if items else -1)
        return la, lb, ids, [rc] * B + [rb]


# --------------------------------------------------------------------------- blocks


class RMSNorm(nn.Module):
    """``weight * (x * rsqrt(mean(x^2) + eps))``, normalised in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class SwiGLU(nn.Module):
    def __init__(self, d_in: int, d_hidden: int, d_out: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_in, d_hidden, bias=False)
        self.up_proj = nn.Linear(d_in, d_hidden, bias=False)
        self.down_proj = nn.Linear(d_hidden, d_out, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class PerceiverAttention(nn.Module):
    """Projections of one cross-attention (GQA); the attention itself runs in the block."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, num_kv_heads: int):
        super().__init__()
        self.num_heads, self.head_dim, self.num_kv_heads = num_heads, head_dim, num_kv_heads
        self.q_proj = nn.Linear(dim, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(dim, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(dim, num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, dim, bias=False)


class PerceiverBlock(nn.Module):
    """One Idefics2-style cross-attention block: latents attend to concat(context, latents)."""

    def __init__(self, cfg: HypernetConfig):
        super().__init__()
        D, eps = cfg.latent_dim, cfg.rms_norm_eps
        self.latents_norm = RMSNorm(D, eps)
        self.context_norm = RMSNorm(D, eps)
        self.attn = PerceiverAttention(D, cfg.num_heads, cfg.head_dim, cfg.num_kv_heads)
        self.post_attn_norm = RMSNorm(D, eps)
        self.pre_ff_norm = RMSNorm(D, eps)
        self.mlp = SwiGLU(D, cfg.ff_mult * D, D)
        self.post_ff_norm = RMSNorm(D, eps)

    def _latent_qkv(self, lat_n: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        a = self.attn
        S, M, _ = lat_n.shape
        q = a.q_proj(lat_n).view(S, M, a.num_heads, a.head_dim)
        k = a.k_proj(lat_n).view(S, M, a.num_kv_heads, a.head_dim)
        v = a.v_proj(lat_n).view(S, M, a.num_kv_heads, a.head_dim)
        return q, k, v

    def _finish(self, latents: Tensor, attn: Tensor) -> Tensor:
        S, M = attn.shape[:2]
        h = latents + self.post_attn_norm(self.attn.o_proj(attn.reshape(S, M, -1)))
        return h + self.post_ff_norm(self.mlp(self.pre_ff_norm(h)))

    def forward_packed(self, latents: Tensor, ctx: Tensor, cu_seqlens: Tensor, *,
                       backend: str | None = None) -> Tensor:
        """latents ``[S, M, D]``, packed raw (un-normed) context ``[N, D]`` -> ``[S, M, D]``.

        The context RMSNorm and K/V projections are fused into ``perceiver_attention``.
        """
        q, lk, lv = self._latent_qkv(self.latents_norm(latents))
        out = perceiver_attention(
            q, ctx, cu_seqlens, self.attn.k_proj.weight, self.attn.v_proj.weight,
            norm_weight=self.context_norm.weight, eps=self.context_norm.eps,
            latent_k=lk, latent_v=lv, backend=backend,
        )
        return self._finish(latents, out)

    def forward_dense(self, latents: Tensor, ctx: Tensor) -> Tensor:
        """latents ``[S, Q, D]`` attend to a dense context ``[S, M, D]`` (the decoder: tiny)."""
        a = self.attn
        q, lk, lv = self._latent_qkv(self.latents_norm(latents))
        S, M, _ = ctx.shape
        ctx_n = self.context_norm(ctx)
        k = torch.cat([a.k_proj(ctx_n).view(S, M, a.num_kv_heads, a.head_dim), lk], dim=1)
        v = torch.cat([a.v_proj(ctx_n).view(S, M, a.num_kv_heads, a.head_dim), lv], dim=1)
        rep = a.num_heads // a.num_kv_heads
        # [S, H, len, Dh]; query head h reads KV head h // rep (HF repeat_kv order)
        qh = q.transpose(1, 2)
        kh = k.repeat_interleave(rep, dim=2).transpose(1, 2)
        vh = v.repeat_interleave(rep, dim=2).transpose(1, 2)
        out = F.scaled_dot_product_attention(qh, kh, vh, scale=a.head_dim ** -0.5)
        return self._finish(latents, out.transpose(1, 2))


class PerceiverResampler(nn.Module):
    def __init__(self, cfg: HypernetConfig, num_latents: int, num_blocks: int):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, cfg.latent_dim))
        self.blocks = nn.ModuleList([PerceiverBlock(cfg) for _ in range(num_blocks)])
        self.norm = RMSNorm(cfg.latent_dim, cfg.rms_norm_eps)


class ResMLPBlock(nn.Module):
    """``x + LayerNorm(W2 silu(W1 LayerNorm(x)))``."""

    def __init__(self, dim: int, hidden: int, eps: float):
        super().__init__()
        self.norm_in = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.norm_out = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.norm_out(self.fc2(F.silu(self.fc1(self.norm_in(x)))))


class LoRAHead(nn.Module):
    """Per-(layer, module) linear map latent -> [A row | B column], shared across ranks."""

    def __init__(self, num_layers: int, num_modules: int, dim: int, d_lora: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_layers, num_modules, dim, d_lora))

    def forward(self, x: Tensor) -> Tensor:
        # x [L, B, n_mod, r, D] -> [L, B, n_mod, r, d_lora]
        return torch.einsum("lbmrd,lmde->lbmre", x, self.weight)


# --------------------------------------------------------------------------- hypernet


class Frames2LoRAHypernet(nn.Module):
    """Perceiver hypernetwork mapping stacked layer states of B videos to LoRA factors.

    Example::

        cfg = HypernetConfig.tiny(num_layers=4, hidden_size=64, target_modules={"down_proj": (128, 64)})
        net = Frames2LoRAHypernet(cfg)
        out = net(states, cu_seqlens)          # states [4, N, 64], cu_seqlens int32 [B+1]
        out.lora_a["down_proj"].shape          # [4, B, r + bias_rank, 128]
        adapters = net.to_adapters(out, base_fingerprint=base.fingerprint)
    """

    def __init__(self, config: HypernetConfig):
        super().__init__()
        if not isinstance(config, HypernetConfig):
            raise TypeError(f"config: expected a HypernetConfig, got {type(config).__name__}")
        self.config = cfg = config
        L, D, r = cfg.num_layers, cfg.latent_dim, cfg.rank
        self.proj = SwiGLU(cfg.hidden_size, cfg.proj_mult * cfg.hidden_size, D)
        self.encoder = PerceiverResampler(cfg, cfg.num_latents, cfg.num_blocks)
        self.decoder = PerceiverResampler(cfg, cfg.num_modules * r, 1)
        self.pre_head = nn.ModuleList(
            [ResMLPBlock(D, cfg.pre_head_mult * D, cfg.layer_norm_eps) for _ in range(cfg.num_pre_head_layers)]
        )
        self.head = LoRAHead(L, cfg.num_modules, D, cfg.d_lora)
        self.scaler_a = nn.ParameterDict({m: nn.Parameter(torch.ones(1, L, r, 1)) for m in cfg.module_names})
        self.scaler_b = nn.ParameterDict({m: nn.Parameter(torch.zeros(1, L, r, 1)) for m in cfg.module_names})
        if cfg.bias_rank:
            self.bias_a = nn.ParameterDict({
                m: nn.Parameter(torch.empty(L, cfg.bias_rank, di)) for m, (di, _) in cfg.target_modules.items()
            })
            self.bias_b = nn.ParameterDict({
                m: nn.Parameter(torch.zeros(L, cfg.bias_rank, do)) for m, (_, do) in cfg.target_modules.items()
            })
        else:
            self.bias_a = self.bias_b = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Latents N(0, 1), perceiver linears N(0, ``init_std``) (transformers style), RMSNorm
        weights 1, torch defaults for the pre-head MLP, head N(0, 0.5/sqrt(D + d_lora*r)),
        ``scaler_a = 1``, ``scaler_b = bias_b = 0`` (the adapter is exactly zero at init),
        ``bias_a ~ N(0, 0.2/sqrt(d_in*bias_rank))``."""
        cfg = self.config
        for res in (self.encoder, self.decoder):
            nn.init.normal_(res.latents)
        for mod in list(self.proj.modules()) + list(self.encoder.modules()) + list(self.decoder.modules()):
            if isinstance(mod, nn.Linear):
                nn.init.normal_(mod.weight, std=cfg.init_std)
            elif isinstance(mod, RMSNorm):
                nn.init.ones_(mod.weight)
        for blk in self.pre_head:
            for mod in (blk.norm_in, blk.fc1, blk.fc2, blk.norm_out):
                mod.reset_parameters()
        nn.init.normal_(self.head.weight, std=0.5 / math.sqrt(cfg.latent_dim + cfg.d_lora * cfg.rank))
        for m in cfg.module_names:
            nn.init.ones_(self.scaler_a[m])
            nn.init.zeros_(self.scaler_b[m])
        if self.bias_a is not None:
            for m, (di, _) in cfg.target_modules.items():
                nn.init.normal_(self.bias_a[m], std=0.2 / math.sqrt(di * cfg.bias_rank))
                nn.init.zeros_(self.bias_b[m])

    # ------------------------------------------------------------------ forward

    def _check_inputs(self, states: Tensor, cu_seqlens: Tensor) -> list[int]:
        cfg = self.config
        if not isinstance(states, Tensor):
            raise TypeError(f"states: expected a torch.Tensor, got {type(states).__name__}")
        if not isinstance(cu_seqlens, Tensor):
            raise TypeError(f"cu_seqlens: expected a torch.Tensor, got {type(cu_seqlens).__name__}")
        if states.dim() != 3 or states.shape[0] != cfg.num_layers or states.shape[2] != cfg.hidden_size:
            raise ValueError(
                f"states: expected shape [L={cfg.num_layers}, N, H={cfg.hidden_size}], got {list(states.shape)}"
            )
        if not states.is_floating_point():
            raise TypeError(f"states: expected a floating dtype, got {states.dtype}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(f"cu_seqlens: expected shape [B+1] with B >= 1, got {list(cu_seqlens.shape)}")
        if cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"cu_seqlens: expected dtype torch.int32 or torch.int64, got {cu_seqlens.dtype}")
        if cu_seqlens.device != states.device:
            raise ValueError(
                f"cu_seqlens: expected device {states.device} (the device of states), got {cu_seqlens.device}"
            )
        cu = cu_seqlens.tolist()
        if cu[0] != 0 or cu[-1] != states.shape[1] or any(b < a for a, b in zip(cu, cu[1:])):
            raise ValueError(
                f"cu_seqlens: expected non-decreasing offsets from 0 to N={states.shape[1]}, got {cu}"
            )
        return cu

    def encode(self, states: Tensor, cu_seqlens: Tensor, *, backend: str | None = None) -> Tensor:
        """Per-(layer, video) latents after the decoder: ``[L, B, n_modules, r, D]``."""
        cfg = self.config
        self._check_inputs(states, cu_seqlens)
        L, N, _ = states.shape
        B = cu_seqlens.numel() - 1
        dtype = self.proj.gate_proj.weight.dtype
        # layer by layer: the 4H-wide SwiGLU intermediate of all L*N rows at once would
        # dominate peak memory (gigabytes for the 2.2B base) for no speed gain
        ctx = torch.cat([self.proj(s.to(dtype)) for s in states.unbind(0)]) if N else \
            states.new_zeros(0, cfg.latent_dim, dtype=dtype)
        # sequence s = l*B + b owns rows l*N + cu[b] : l*N + cu[b+1] of the flattened context
        offs = torch.arange(L, device=states.device, dtype=torch.int64)[:, None] * N + cu_seqlens[None, :-1].long()
        cu_s = torch.cat([offs.reshape(-1), offs.new_tensor([L * N])]).to(torch.int32)
        S = L * B
        enc = self.encoder
        lat = enc.latents[None].expand(S, -1, -1)
        for blk in enc.blocks:
            lat = blk.forward_packed(lat, ctx, cu_s, backend=backend)
        lat = enc.norm(lat)
        dec = self.decoder
        out = dec.latents[None].expand(S, -1, -1)
        for blk in dec.blocks:
            out = blk.forward_dense(out, lat)
        out = dec.norm(out)
        return out.view(L, B, cfg.num_modules, cfg.rank, cfg.latent_dim)

    def forward(self, states: Tensor, cu_seqlens: Tensor, *, backend: str | None = None) -> AdapterTensors:
        """``states [L, N, H]`` (packed over videos), ``cu_seqlens [B+1]`` -> :class:`AdapterTensors`.

        ``backend`` selects the ``perceiver_attention`` backend (default: automatic).
        """
        cfg = self.config
        x = self.encode(states, cu_seqlens, backend=backend)
        for blk in self.pre_head:
            x = blk(x)
        x = x / x.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
        flat = self.head(x)  # [L, B, n_mod, r, d_lora]
        L, B = flat.shape[:2]
        lora_a, lora_b = {}, {}
        for i, (m, (di, do)) in enumerate(cfg.target_modules.items()):
            sa = self.scaler_a[m][0][:, None]  # [L, 1, r, 1]
            sb = self.scaler_b[m][0][:, None]
            a = flat[:, :, i, :, :di] * sa  # [L, B, r, d_in]
            b = (flat[:, :, i, :, di:di + do] * sb).transpose(-1, -2)  # [L, B, d_out, r]
            if self.bias_a is not None:
                ba = self.bias_a[m].to(a.dtype)[:, None].expand(L, B, -1, -1)
                bb = self.bias_b[m].to(b.dtype).transpose(-1, -2)[:, None].expand(L, B, -1, -1)
                a = torch.cat([a, ba], dim=2)
                b = torch.cat([b, bb], dim=3)
            lora_a[m] = a.contiguous()
            lora_b[m] = b.contiguous()
        return AdapterTensors(lora_a=lora_a, lora_b=lora_b, scale=cfg.scale, rank=cfg.total_rank,
                              bias_rank=cfg.bias_rank)

    # ------------------------------------------------------------------ adapters

    def to_adapters(self, tensors: AdapterTensors, *, base_fingerprint: str = "",
                    num_frames: list[int] | int | None = None, source: list[str] | str = "",
                    metadata: Mapping[str, Any] | None = None) -> list:
        """Split a batch of :class:`AdapterTensors` into one detached ``VideoAdapter`` per video."""
        if not isinstance(tensors, AdapterTensors):
            raise TypeError(f"tensors: expected AdapterTensors, got {type(tensors).__name__}")
        B = tensors.num_videos
        frames = self._per_video("num_frames", num_frames if num_frames is not None else 0, B, int)
        sources = self._per_video("source", source, B, str)
        meta = dict(metadata or {})
        meta.setdefault("hypernet", {"rank": self.config.rank, "bias_rank": self.config.bias_rank})
        out = []
        for b in range(B):
            out.append(VideoAdapter(
                lora_a={m: t[:, b].detach().clone() for m, t in tensors.lora_a.items()},
                lora_b={m: t[:, b].detach().clone() for m, t in tensors.lora_b.items()},
                scale=float(tensors.scale),
                base_fingerprint=base_fingerprint,
                num_frames=frames[b],
                source=sources[b],
                metadata=dict(meta),
                segments=[tensors.rank - tensors.bias_rank],
                bias_rank=tensors.bias_rank,
            ))
        return out

    @staticmethod
    def _per_video(name, value, B, typ):
        if isinstance(value, typ) and not isinstance(value, bool):
            return [value] * B
        if isinstance(value, (list, tuple)) and len(value) == B and all(isinstance(v, typ) for v in value):
            return list(value)
        raise ValueError(f"{name}: expected one {typ.__name__} or a list of {B}, got {value!r}")

    # ------------------------------------------------------------------ persistence

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``config.json`` and ``model.safetensors`` into ``directory`` (atomically per file)."""
        from f2l_kernels import __version__

        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        cfg = {"format": _FORMAT, "version": __version__, "config": self.config.to_dict()}
        sd = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        atomic_save_safetensors(sd, os.path.join(directory, WEIGHTS_NAME),
                                metadata={"format": _FORMAT, "version": __version__})
        atomic_write_text(os.path.join(directory, CONFIG_NAME), json.dumps(cfg, indent=2))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, device=None, dtype=None) -> "Frames2LoRAHypernet":
        """Load a directory written by :meth:`save_pretrained` (safetensors only)."""
        directory = os.fspath(directory)
        cpath, wpath = os.path.join(directory, CONFIG_NAME), os.path.join(directory, WEIGHTS_NAME)
        for p in (cpath, wpath):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"directory: expected {os.path.basename(p)} in {directory!r}; not found")
        with open(cpath) as f:
            meta = json.load(f)
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT or "config" not in meta:
            raise ValueError(f"directory: {cpath!r} is not an f2l hypernetwork config (format {_FORMAT!r})")
        net = cls(HypernetConfig.from_dict(meta["config"]))
        sd = load_file(wpath)
        missing, unexpected = set(net.state_dict()) - set(sd), set(sd) - set(net.state_dict())
        if missing or unexpected:
            raise ValueError(
                f"directory: weights do not match the config: missing {sorted(missing)[:8]}, "
                f"unexpected {sorted(unexpected)[:8]}"
            )
        for k, v in net.state_dict().items():
            if sd[k].shape != v.shape:
                raise ValueError(f"directory: weight {k!r} has shape {list(sd[k].shape)}, expected {list(v.shape)}")
        net.load_state_dict(sd)
        return net.to(device=device, dtype=dtype)


