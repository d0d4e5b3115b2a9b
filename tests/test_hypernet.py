"""Frames2LoRA hypernetwork: against an independent per-sequence reference of the official
architecture, Triton vs reference attention, zero adapter at init, persistence, bad inputs."""
import copy
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from f2l.adapter import VideoAdapter
from f2l.hypernet import AdapterTensors, Frames2LoRAHypernet, HypernetConfig, default_lora_alpha

L, H = 3, 24
MODULES = {"down_proj": (40, 24), "up_proj": (24, 40)}


def tiny_config(**kw):
    return HypernetConfig.tiny(num_layers=L, hidden_size=H, target_modules=dict(MODULES), **kw)


def randomise_(net: Frames2LoRAHypernet) -> Frames2LoRAHypernet:
    """Non-trivial values everywhere (the init zeros B; tests need a non-zero adapter)."""
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.startswith(("scaler_", "bias_")):
                p.copy_(torch.randn_like(p) * 0.5)
    return net


def make_inputs(lens, dtype=torch.float32):
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    states = torch.randn(L, int(cu[-1]), H, dtype=dtype) * 2
    return states, cu


# --------------------------------------------------------------------------- reference


def _rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _swiglu(m, x):
    return F.linear(F.silu(F.linear(x, m.gate_proj.weight)) * F.linear(x, m.up_proj.weight), m.down_proj.weight)


def _ref_block(blk, lat, ctx, eps):
    """One sequence: latents [M, D] attend to concat(RMSNorm(ctx), RMSNorm(latents))."""
    a = blk.attn
    M = lat.shape[0]
    lat_n = _rms(lat, blk.latents_norm.weight, eps)
    kv = torch.cat([_rms(ctx, blk.context_norm.weight, eps), lat_n])
    q = F.linear(lat_n, a.q_proj.weight).view(M, a.num_heads, a.head_dim)
    k = F.linear(kv, a.k_proj.weight).view(-1, a.num_kv_heads, a.head_dim)
    v = F.linear(kv, a.v_proj.weight).view(-1, a.num_kv_heads, a.head_dim)
    rep = a.num_heads // a.num_kv_heads
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    att = torch.softmax(torch.einsum("mhd,nhd->hmn", q, k) / math.sqrt(a.head_dim), dim=-1)
    o = F.linear(torch.einsum("hmn,nhd->mhd", att, v).reshape(M, -1), a.o_proj.weight)
    h = lat + _rms(o, blk.post_attn_norm.weight, eps)
    return h + _rms(_swiglu(blk.mlp, _rms(h, blk.pre_ff_norm.weight, eps)), blk.post_ff_norm.weight, eps)


def reference_forward(net, states, cu):
    """Loop over (layer, video) in float64: the official data flow written out plainly."""
    net = copy.deepcopy(net).double()
    cfg = net.config
    eps = cfg.rms_norm_eps
    states = states.double()
    B, nl = len(cu) - 1, states.shape[0]
    la = {m: torch.zeros(nl, B, cfg.total_rank, di, dtype=torch.float64) for m, (di, _) in cfg.target_modules.items()}
    lb = {m: torch.zeros(nl, B, do, cfg.total_rank, dtype=torch.float64) for m, (_, do) in cfg.target_modules.items()}
    for layer in range(nl):
        for b in range(B):
            ctx = _swiglu(net.proj, states[layer, cu[b]:cu[b + 1]])
            lat = net.encoder.latents
            for blk in net.encoder.blocks:
                lat = _ref_block(blk, lat, ctx, eps)
            lat = _rms(lat, net.encoder.norm.weight, eps)
            x = _ref_block(net.decoder.blocks[0], net.decoder.latents, lat, eps)
            x = _rms(x, net.decoder.norm.weight, eps)  # [n_mod * r, D], module-major
            for blk in net.pre_head:
                y = F.layer_norm(x, x.shape[-1:], blk.norm_in.weight, blk.norm_in.bias, cfg.layer_norm_eps)
                y = F.linear(F.silu(F.linear(y, blk.fc1.weight, blk.fc1.bias)), blk.fc2.weight, blk.fc2.bias)
                x = x + F.layer_norm(y, y.shape[-1:], blk.norm_out.weight, blk.norm_out.bias, cfg.layer_norm_eps)
            x = x / x.norm(dim=-1, keepdim=True)
            for i, (m, (di, do)) in enumerate(cfg.target_modules.items()):
                flat = x[i * cfg.rank:(i + 1) * cfg.rank] @ net.head.weight[layer, i]  # [r, d_lora]
                a = flat[:, :di] * net.scaler_a[m][0, layer]
                bt = flat[:, di:di + do] * net.scaler_b[m][0, layer]
                if cfg.bias_rank:
                    a = torch.cat([a, net.bias_a[m][layer]])
                    bt = torch.cat([bt, net.bias_b[m][layer]])
                la[m][layer, b] = a
                lb[m][layer, b] = bt.T
    return la, lb


def assert_close(got, want, tol):
    err = (got.double() - want).abs().max().item()
    scale = want.abs().max().item() + 1e-12
    assert err <= tol * scale, f"max abs err {err:.3g} vs max |ref| {scale:.3g}"


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("lens", [[7], [5, 1, 9], [4, 0, 6], [0, 0]],
                         ids=["one-video", "three-videos", "empty-video", "all-empty"])
def test_matches_reference(lens):
    net = randomise_(Frames2LoRAHypernet(tiny_config()))
    states, cu = make_inputs(lens)
    out = net(states, cu, backend="reference")
    ref_a, ref_b = reference_forward(net, states, cu.tolist())
    assert out.scale == default_lora_alpha(net.config.rank) and out.rank == net.config.total_rank
    for m in MODULES:
        assert out.lora_a[m].shape == (L, len(lens), net.config.total_rank, MODULES[m][0])
        assert out.lora_b[m].shape == (L, len(lens), MODULES[m][1], net.config.total_rank)
        assert_close(out.lora_a[m], ref_a[m], 1e-4)
        assert_close(out.lora_b[m], ref_b[m], 1e-4)


def test_single_module_official_shapes_without_bias():
    cfg = HypernetConfig.tiny(num_layers=2, hidden_size=H, target_modules={"down_proj": (40, 24)}, bias_rank=0)
    net = randomise_(Frames2LoRAHypernet(cfg))
    assert net.bias_a is None and net.head.weight.shape == (2, 1, cfg.latent_dim, 64)
    states = torch.randn(2, 6, H)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    out = net(states, cu, backend="reference")
    ra, rb = reference_forward(net, states, cu.tolist())
    assert out.rank == cfg.rank
    assert_close(out.lora_a["down_proj"], ra["down_proj"], 1e-4)
    assert_close(out.lora_b["down_proj"], rb["down_proj"], 1e-4)


def test_triton_equals_reference():
    pytest.importorskip("triton")
    net = randomise_(Frames2LoRAHypernet(tiny_config()))
    states, cu = make_inputs([5, 0, 3])
    ref = net(states, cu, backend="reference")
    tri = net(states, cu, backend="triton")
    for m in MODULES:
        assert_close(tri.lora_a[m], ref.lora_a[m].double(), 1e-4)
        assert_close(tri.lora_b[m], ref.lora_b[m].double(), 1e-4)


def test_zero_perturbation_at_init_and_context_free_bias():
    net = Frames2LoRAHypernet(tiny_config())
    states, cu = make_inputs([3, 4])
    out = net(states, cu, backend="reference")
    r = net.config.rank
    for m in MODULES:
        assert torch.count_nonzero(out.lora_b[m]) == 0
        assert torch.count_nonzero(out.lora_a[m][:, :, :r]) > 0
        # bias ranks do not depend on the video
        assert torch.equal(out.lora_a[m][:, 0, r:], out.lora_a[m][:, 1, r:])
        assert torch.equal(out.lora_a[m][:, 0, r:], net.bias_a[m].detach())


def test_official_init_statistics():
    cfg = tiny_config()
    net = Frames2LoRAHypernet(cfg)
    di = MODULES["down_proj"][0]
    assert torch.equal(net.scaler_a["down_proj"], torch.ones(1, L, cfg.rank, 1))
    assert torch.equal(net.scaler_b["down_proj"], torch.zeros(1, L, cfg.rank, 1))
    std = net.bias_a["down_proj"].std().item()
    assert 0.5 < std / (0.2 / math.sqrt(di * cfg.bias_rank)) < 1.5


def test_gradients_reach_every_parameter():
    net = randomise_(Frames2LoRAHypernet(tiny_config()))
    states, cu = make_inputs([4, 3])
    out = net(states, cu, backend="reference")
    loss = sum((out.lora_a[m] * torch.randn_like(out.lora_a[m])).sum() + (out.lora_b[m] ** 2).sum()
               for m in MODULES)
    loss.backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing
    zero = [n for n, p in net.named_parameters() if torch.count_nonzero(p.grad) == 0]
    assert not zero, zero


def test_frames2lora_preset_structure():
    class Base:
        num_layers, hidden_size = 4, 96

        def module_shapes(self, names):
            return {n: (256, 96) for n in names}

    cfg = HypernetConfig.frames2lora(Base())
    assert (cfg.latent_dim, cfg.num_latents, cfg.num_blocks, cfg.num_heads, cfg.head_dim, cfg.num_kv_heads) == \
        (512, 8, 9, 16, 128, 4)
    assert cfg.rank == 16 and cfg.bias_rank == 16 and cfg.scale == 2 * 16 ** 1.5 == 128.0
    assert list(cfg.target_modules) == ["down_proj"]
    with torch.device("meta"):
        net = Frames2LoRAHypernet(cfg)
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert shapes["proj.gate_proj.weight"] == (4 * 96, 96) and shapes["proj.down_proj.weight"] == (512, 384)
    assert shapes["encoder.latents"] == (8, 512) and shapes["decoder.latents"] == (16, 512)
    assert len(net.encoder.blocks) == 9 and len(net.decoder.blocks) == 1
    assert shapes["encoder.blocks.8.attn.q_proj.weight"] == (2048, 512)
    assert shapes["encoder.blocks.0.attn.k_proj.weight"] == (512, 512)
    assert shapes["encoder.blocks.0.mlp.up_proj.weight"] == (2048, 512)
    assert shapes["pre_head.0.fc1.weight"] == (2048, 512) and "pre_head.1.fc1.weight" not in shapes
    assert shapes["head.weight"] == (4, 1, 512, 256 + 96)
    assert shapes["scaler_a.down_proj"] == (1, 4, 16, 1) and shapes["bias_b.down_proj"] == (4, 16, 96)
    assert HypernetConfig.from_preset("frames2lora", Base()).to_dict() == cfg.to_dict()


def test_config_roundtrip():
    cfg = tiny_config(lora_alpha=3.5)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert HypernetConfig.from_dict(d) == cfg
    assert cfg.scale == 3.5 and list(cfg.target_modules) == sorted(MODULES)


def test_save_load_roundtrip(tmp_path):
    net = randomise_(Frames2LoRAHypernet(tiny_config()))
    net.save_pretrained(tmp_path / "hn")
    assert sorted(os.listdir(tmp_path / "hn")) == ["config.json", "model.safetensors"]
    back = Frames2LoRAHypernet.from_pretrained(tmp_path / "hn")
    assert back.config == net.config
    states, cu = make_inputs([3, 2])
    a, b = net(states, cu, backend="reference"), back(states, cu, backend="reference")
    for m in MODULES:
        assert torch.equal(a.lora_a[m], b.lora_a[m]) and torch.equal(a.lora_b[m], b.lora_b[m])


def test_to_adapters():
    net = randomise_(Frames2LoRAHypernet(tiny_config()))
    states, cu = make_inputs([3, 2])
    out = net(states, cu, backend="reference")
    ads = net.to_adapters(out, base_fingerprint="fp", num_frames=[12, 8], source=["a.mp4", "b.mp4"])
    assert [type(a) for a in ads] == [VideoAdapter, VideoAdapter]
    a1 = ads[1]
    assert a1.rank == net.config.total_rank and a1.bias_rank == net.config.bias_rank
    assert a1.segments == [net.config.rank] and a1.scale == out.scale and a1.num_frames == 8
    assert a1.source == "b.mp4" and a1.base_fingerprint == "fp" and a1.num_layers == L
    assert torch.equal(a1.lora_a["up_proj"], out.lora_a["up_proj"][:, 1])
    assert not a1.lora_a["up_proj"].requires_grad


# --------------------------------------------------------------------------- bad inputs

BAD_CONFIGS = [
    ("no-modules", dict(target_modules={}), ValueError),
    ("dotted-module", dict(target_modules={"mlp.down_proj": (4, 4)}), ValueError),
    ("bad-shape", dict(target_modules={"down_proj": (4,)}), ValueError),
    ("zero-dim", dict(target_modules={"down_proj": (0, 4)}), ValueError),
    ("rank-0", dict(rank=0), ValueError),
    ("kv-not-divisor", dict(num_heads=4, num_kv_heads=3), ValueError),
    ("negative-bias-rank", dict(bias_rank=-1), ValueError),
    ("nan-alpha", dict(lora_alpha=float("nan")), ValueError),
    ("float-layers", dict(num_layers=2.0), ValueError),
    ("zero-eps", dict(rms_norm_eps=0.0), ValueError),
]


@pytest.mark.parametrize("kw,exc", [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config(kw, exc):
    base = dict(num_layers=2, hidden_size=8, target_modules={"down_proj": (8, 8)})
    base.update(kw)
    with pytest.raises(exc):
        HypernetConfig(**base)


def test_bad_config_sources():
    with pytest.raises(ValueError, match="unknown HypernetConfig fields"):
        HypernetConfig.from_dict({"num_layers": 1, "hidden_size": 2, "target_modules": {"a": (1, 1)}, "bogus": 1})
    with pytest.raises(ValueError, match="name"):
        HypernetConfig.from_preset("huge", num_layers=1, hidden_size=2, target_modules={"a": (1, 1)})
    with pytest.raises(ValueError, match="base"):
        HypernetConfig.frames2lora()
    with pytest.raises(TypeError, match="base"):
        HypernetConfig.tiny(object())
    with pytest.raises(TypeError, match="config"):
        Frames2LoRAHypernet({"num_layers": 1})


@pytest.fixture(scope="module")
def small_net():
    return Frames2LoRAHypernet(tiny_config())


BAD_FORWARD = [
    ("states-not-tensor", lambda s, c: (s.tolist(), c), TypeError),
    ("cu-not-tensor", lambda s, c: (s, c.tolist()), TypeError),
    ("wrong-layers", lambda s, c: (s[:2], c), ValueError),
    ("wrong-hidden", lambda s, c: (s[..., :-1], c), ValueError),
    ("2d-states", lambda s, c: (s[0], c), ValueError),
    ("int-states", lambda s, c: (s.long(), c), TypeError),
    ("float-cu", lambda s, c: (s, c.float()), TypeError),
    ("cu-too-short", lambda s, c: (s, c[:1]), ValueError),
    ("cu-not-from-0", lambda s, c: (s, c + 1), ValueError),
    ("cu-wrong-end", lambda s, c: (s, torch.tensor([0, 2, 4], dtype=torch.int32)), ValueError),
    ("cu-decreasing", lambda s, c: (s, torch.tensor([0, 4, 2, 5], dtype=torch.int32)), ValueError),
    ("cu-2d", lambda s, c: (s, c[None]), ValueError),
]


@pytest.mark.parametrize("mutate,exc", [c[1:] for c in BAD_FORWARD], ids=[c[0] for c in BAD_FORWARD])
def test_bad_forward_inputs(small_net, mutate, exc):
    states, cu = make_inputs([2, 3])
    s, c = mutate(states, cu)
    with pytest.raises(exc):
        small_net(s, c, backend="reference")


def test_bad_to_adapters_and_loading(small_net, tmp_path):
    states, cu = make_inputs([2, 3])
    out = small_net(states, cu, backend="reference")
    with pytest.raises(ValueError, match="num_frames"):
        small_net.to_adapters(out, num_frames=[1, 2, 3])
    with pytest.raises(ValueError, match="source"):
        small_net.to_adapters(out, source=["a"])
    with pytest.raises(TypeError, match="tensors"):
        small_net.to_adapters({"lora_a": {}})
    with pytest.raises(FileNotFoundError, match="config.json"):
        Frames2LoRAHypernet.from_pretrained(tmp_path)
    small_net.save_pretrained(tmp_path / "x")
    (tmp_path / "x" / "config.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not an f2l hypernetwork"):
        Frames2LoRAHypernet.from_pretrained(tmp_path / "x")
    other = Frames2LoRAHypernet(tiny_config(num_blocks=1))
    other.save_pretrained(tmp_path / "y")
    cfg = json.loads((tmp_path / "y" / "config.json").read_text())
    cfg["config"]["num_blocks"] = 2
    (tmp_path / "y" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="missing"):
        Frames2LoRAHypernet.from_pretrained(tmp_path / "y")
    assert isinstance(out, AdapterTensors) and out.num_videos == 2


def test_training_signal_reaches_the_hypernet_through_a_frozen_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    from f2l.layers import apply_f2l

    lcfg = LlamaConfig(vocab_size=64, hidden_size=24, intermediate_size=40, num_hidden_layers=L,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = LlamaForCausalLM(lcfg).eval().requires_grad_(False)
    cfg = HypernetConfig.tiny(num_layers=L, hidden_size=24, target_modules={"down_proj": (40, 24)})
    net = Frames2LoRAHypernet(cfg)
    states, cu = make_inputs([4, 6])
    ids = torch.randint(0, 64, (3, 5))
    patch = apply_f2l(model, backend="reference")
    out = net(states, cu, backend="reference")
    with patch.use(out.lora_a, out.lora_b, [1, 0, [0, 1]], scale=out.scale):
        logits = model(input_ids=ids).logits
    base = model(input_ids=ids).logits
    assert torch.equal(logits, base)  # zero adapter at init
    F.cross_entropy(logits.reshape(-1, 64), ids.reshape(-1)).backward()
    # B starts at zero: the first step moves the B side (scaler_b, bias_b), as in the official init
    assert torch.count_nonzero(net.scaler_b["down_proj"].grad) > 0
    assert torch.count_nonzero(net.bias_b["down_proj"].grad) > 0
    net.zero_grad()
    randomise_(net)
    out = net(states, cu, backend="reference")
    with patch.use(out.lora_a, out.lora_b, [1, 0, [0, 1]], scale=out.scale):
        loss = F.cross_entropy(model(input_ids=ids).logits.reshape(-1, 64), ids.reshape(-1))
    loss.backward()
    for name in ("proj.gate_proj.weight", "encoder.latents", "encoder.blocks.0.attn.k_proj.weight",
                 "encoder.blocks.1.context_norm.weight", "decoder.latents", "head.weight"):
        assert torch.count_nonzero(net.get_parameter(name).grad) > 0, name
    patch.remove()


def test_with_shared_bias_applies_bias_once_per_sequence():
    net = randomise_(Frames2LoRAHypernet(tiny_config()))
    states, cu = make_inputs([3, 4, 2])
    out = net(states, cu, backend="reference")
    ids = [[0, 2], 1, -1, [2, 1, 0]]
    la, lb, sids, ranks = out.with_shared_bias(ids)
    assert sids == [[0, 2, 3], [1, 3], -1, [2, 1, 0, 3]] and ranks == [4, 4, 4, 2]
    r, rb = net.config.rank, net.config.bias_rank
    for m in MODULES:
        # dense delta of sequence 0: both videos' context ranks + the bias ranks once
        a, b = out.lora_a[m], out.lora_b[m]
        want = sum(b[0, v, :, :r] @ a[0, v, :r] for v in (0, 2)) + b[0, 0, :, r:] @ a[0, 0, r:]
        got = sum(lb[m][0, p, :, :ranks[p]] @ la[m][0, p, :ranks[p]] for p in sids[0])
        assert torch.allclose(got, want, atol=1e-6)
    with pytest.raises(ValueError, match="adapter_ids"):
        out.with_shared_bias([3])
    plain = Frames2LoRAHypernet(tiny_config(bias_rank=0))(states, cu, backend="reference")
    assert plain.with_shared_bias([0, [1, 2]])[2:] == ([0, [1, 2]], None)


@pytest.mark.parametrize("s", [0.5, 0.0, -2.0], ids=["half", "zero", "minus-two"])
def test_with_shared_bias_bias_scaler(s):
    # In-kernel composition with the authors' bias_scaler: the bias entry's A and B are both
    # scaled (bias delta x s**2), the same factors VideoAdapter.compose(..., bias_scaler=s) makes.
    from f2l.adapter import VideoAdapter

    net = randomise_(Frames2LoRAHypernet(tiny_config()))
    states, cu = make_inputs([3, 4, 2])
    out = net(states, cu, backend="reference")
    ids = [[0, 2], 1]
    la0, lb0, sids, ranks = out.with_shared_bias(ids)
    la, lb, sids_s, ranks_s = out.with_shared_bias(ids, bias_scaler=s)
    assert (sids_s, ranks_s) == (sids, ranks)
    B, rb = out.num_videos, net.config.bias_rank
    ads = net.to_adapters(out)
    comp = VideoAdapter.compose([ads[0], ads[2]], bias_scaler=s)
    for m in MODULES:
        assert torch.equal(la[m][:, :B], la0[m][:, :B]) and torch.equal(lb[m][:, :B], lb0[m][:, :B])
        assert torch.equal(la[m][:, B], la0[m][:, B] * s) and torch.equal(lb[m][:, B], lb0[m][:, B] * s)
        got = sum(lb[m][0, p, :, :ranks[p]] @ la[m][0, p, :ranks[p]] for p in sids[0])
        want = comp.lora_b[m][0] @ comp.lora_a[m][0]
        assert torch.allclose(got, want, atol=1e-6)
        assert torch.equal(comp.lora_a[m][:, -rb:], la[m][:, B, :rb])
    with pytest.raises(ValueError, match="bias_scaler"):
        out.with_shared_bias(ids, bias_scaler=float("nan"))
