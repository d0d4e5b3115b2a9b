"""Official checkpoint import: a synthetic state dict with the official key names and
shapes (small sizes) converts, and the converted hypernetwork produces the same LoRA
factors as a forward written here directly over the raw official tensors."""
import enum
import math
import os
import sys
import types
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from f2l.convert import (
    ForeignObject,
    convert_checkpoint,
    convert_state_dict,
    infer_config,
    load_official,
    official_key_shapes,
    read_official,
)
from f2l.hypernet import Frames2LoRAHypernet, HypernetConfig

P = "aggregator.perceiver."
L, H = 3, 12


def small_config(modules, **kw):
    base = dict(num_layers=L, hidden_size=H, target_modules=modules, rank=3, latent_dim=16, num_latents=4,
                num_blocks=2, num_heads=4, head_dim=4, num_kv_heads=2, ff_mult=4, proj_mult=4, bias_rank=3,
                num_pre_head_layers=1, pre_head_mult=4)
    base.update(kw)
    return HypernetConfig(**base)


ONE = {"down_proj": (20, 12)}
TWO = {"down_proj": (20, 12), "up_proj": (12, 20)}


def official_state_dict(cfg, seed=0):
    """Random tensors under the official names (norm weights and scalers too: no trivial ones/zeros)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in official_key_shapes(cfg).items():
        t = torch.randn(shape, generator=g)
        if k.endswith(("layernorm.weight", "mlp.0.weight", "mlp.6.weight")):
            t = 1.0 + 0.2 * t
        elif ".weight" in k or k.endswith("latents_q"):
            t = t / math.sqrt(shape[-1]) if len(shape) > 1 else t
        sd[k] = t
    return sd


# ---------------------------------------------------------------- independent forward


def _rms(x, w, eps=1e-6):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _swiglu(sd, pre, x):
    return F.linear(F.silu(F.linear(x, sd[pre + "gate_proj.weight"])) * F.linear(x, sd[pre + "up_proj.weight"]),
                    sd[pre + "down_proj.weight"])


def _perceiver_layer(sd, lp, lat, ctx, nh, nkv, hd):
    """Idefics2 cross-attention layer: queries from the latents, keys/values from
    concat(context, latents), both RMS-normed; sandwich norms; residuals."""
    ln = _rms(lat, sd[lp + "input_latents_layernorm.weight"])
    cn = _rms(ctx, sd[lp + "input_context_layernorm.weight"])
    kv_in = torch.cat([cn, ln], dim=0)
    q = F.linear(ln, sd[lp + "self_attn.q_proj.weight"]).view(-1, nh, hd).transpose(0, 1)
    k = F.linear(kv_in, sd[lp + "self_attn.k_proj.weight"]).view(-1, nkv, hd).transpose(0, 1)
    v = F.linear(kv_in, sd[lp + "self_attn.v_proj.weight"]).view(-1, nkv, hd).transpose(0, 1)
    k, v = k.repeat_interleave(nh // nkv, 0), v.repeat_interleave(nh // nkv, 0)
    att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(hd), dim=-1) @ v  # [nh, M, hd]
    o = F.linear(att.transpose(0, 1).reshape(lat.shape[0], nh * hd), sd[lp + "self_attn.o_proj.weight"])
    lat = lat + _rms(o, sd[lp + "post_attention_layernorm.weight"])
    ff = _swiglu(sd, lp + "mlp.", _rms(lat, sd[lp + "pre_ff_layernorm.weight"]))
    return lat + _rms(ff, sd[lp + "post_ff_layernorm.weight"])


def _resampler(sd, pre, ctx, nh, nkv, hd):
    lat = sd[pre + "latents_q"]
    i = 0
    while f"{pre}layers.{i}.self_attn.q_proj.weight" in sd:
        lat = _perceiver_layer(sd, f"{pre}layers.{i}.", lat, ctx, nh, nkv, hd)
        i += 1
    return _rms(lat, sd[pre + "layernorm.weight"])


def official_forward(sd, feats, modules, *, r, nh, nkv, hd, use_bias=True):
    """One video's features [L, T, H] -> {module: (A [L, r', d_in], B [L, r', d_out])}."""
    names = sorted(modules)
    d_lora = max(a + b for a, b in modules.values())
    out = {m: ([], []) for m in names}
    for layer in range(feats.shape[0]):
        ctx = _swiglu(sd, P + "modality_projection.", feats[layer])
        enc = _resampler(sd, P + "encoder.", ctx, nh, nkv, hd)
        x = _resampler(sd, P + "decoder.", enc, nh, nkv, hd).view(len(names), r, -1)
        j = 0
        while f"layers.{j}.mlp.0.weight" in sd:
            p = f"layers.{j}.mlp."
            h = F.layer_norm(x, x.shape[-1:], sd[p + "0.weight"], sd[p + "0.bias"])
            h = F.silu(F.linear(h, sd[p + "2.weight"], sd[p + "2.bias"]))
            h = F.linear(h, sd[p + "5.weight"], sd[p + "5.bias"])
            x = x + F.layer_norm(h, h.shape[-1:], sd[p + "6.weight"], sd[p + "6.bias"])
            j += 1
        x = x / x.norm(dim=-1, keepdim=True)
        w = sd["head.weight"][layer]
        flat = torch.einsum("mrd,de->mre", x, w) if w.dim() == 2 else torch.einsum("mrd,mde->mre", x, w)
        assert flat.shape[-1] == d_lora
        for i, m in enumerate(names):
            di, do = modules[m]
            a = flat[i, :, :di] * sd[f"scaler_A.{m}"][0, layer]
            b = flat[i, :, di:di + do] * sd[f"scaler_B.{m}"][0, layer]
            if use_bias:
                a = torch.cat([a, sd[f"bias_A.{m}"][layer]])
                b = torch.cat([b, sd[f"bias_B.{m}"][layer]])
            out[m][0].append(a)
            out[m][1].append(b)
    return {m: (torch.stack(a), torch.stack(b)) for m, (a, b) in out.items()}


# ---------------------------------------------------------------- official-looking pickles


class _PeftType(str, enum.Enum):
    LORA = "LORA"


@dataclass
class _LoraConfig:
    r: int
    lora_alpha: float
    target_modules: set
    peft_type: _PeftType


@dataclass
class _OfficialHypernetConfig:
    latent_size: int
    use_bias: bool
    per_rank_gen: bool
    lora_config: _LoraConfig


def _save_official(path, sd, cfg, *, use_bias=True, lora_alpha=None, prefix=""):
    """torch.save the way the official trainer does: tensors + pickled config objects whose
    classes live in modules that are not importable when loading."""
    fake = {"ctx_to_lora.modeling.hypernet": [_OfficialHypernetConfig], "peft.tuners.lora.config": [_LoraConfig],
            "peft.utils.peft_types": [_PeftType]}
    saved = {}
    for modname, classes in fake.items():
        mod = types.ModuleType(modname)
        for c in classes:
            saved[c] = (c.__module__, c.__qualname__)
            c.__module__ = modname
            c.__qualname__ = c.__name__ = c.__name__.lstrip("_").replace("OfficialHypernetConfig", "HypernetConfig")
            setattr(mod, c.__qualname__, c)
        sys.modules[modname] = mod
    parents = {".".join(m.split(".")[:i]) for m in fake for i in range(1, m.count(".") + 1)} - set(sys.modules)
    for name in parents:  # pickle imports the module by name: its parent packages must exist
        sys.modules[name] = types.ModuleType(name)
    try:
        alpha = 2 * cfg.rank ** 1.5 if lora_alpha is None else lora_alpha
        hc = _OfficialHypernetConfig(latent_size=cfg.latent_dim, use_bias=use_bias, per_rank_gen=True,
                                     lora_config=_LoraConfig(cfg.rank, alpha, set(cfg.target_modules), _PeftType.LORA))
        full = {prefix + k: v for k, v in sd.items()}
        full.update(base_model_name_or_path="HuggingFaceTB/SmolVLM2-500M-Video-Instruct", hypernet_config=hc,
                    ctx_encoder_args={"ctx_encoder_type": "per_layer_activations"})
        torch.save(full, path)
    finally:
        for modname in list(fake) + sorted(parents):
            del sys.modules[modname]
        for c, (m, q) in saved.items():
            c.__module__, c.__qualname__, c.__name__ = m, q, q


# ---------------------------------------------------------------- tests


def _features(lens, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(L, n, H, generator=g) * 2.0 for n in lens]


@pytest.mark.parametrize("modules,use_bias", [(ONE, True), (TWO, True), (ONE, False)],
                         ids=["one-module", "two-modules-4d-head", "no-bias-lora"])
def test_converted_matches_official_forward(tmp_path, modules, use_bias):
    cfg = small_config(modules, bias_rank=3 if use_bias else 0)
    sd = official_state_dict(cfg)
    path = tmp_path / "frames2lora-smolvlm2-500m-best-ce.pt"
    _save_official(path, sd, cfg, use_bias=use_bias)
    net = load_official(path, cfg)
    assert isinstance(net, Frames2LoRAHypernet) and net.config.bias_rank == (3 if use_bias else 0)
    feats = _features([5, 1, 9])  # three videos, one of a single row
    states = torch.cat(feats, dim=1)
    cu = torch.tensor([0, 5, 6, 15], dtype=torch.int32)
    with torch.no_grad():
        out = net(states, cu, backend="reference")
    for b, f in enumerate(feats):
        ref = official_forward(sd, f, modules, r=3, nh=4, nkv=2, hd=4, use_bias=use_bias)
        for m, (a, bb) in ref.items():
            torch.testing.assert_close(out.lora_a[m][:, b], a, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(out.lora_b[m][:, b], bb.transpose(-1, -2), rtol=1e-4, atol=1e-5)
    assert out.scale == pytest.approx(2 * 3 ** 1.5)


def test_metadata_is_read_without_unpickling_classes(tmp_path):
    cfg = small_config(ONE)
    path = tmp_path / "ck.pt"
    _save_official(path, official_state_dict(cfg), cfg, prefix="module._orig_mod.")
    ck = read_official(path)
    assert ck.base_model_name_or_path == "HuggingFaceTB/SmolVLM2-500M-Video-Instruct"
    assert isinstance(ck.hypernet_config, ForeignObject) and ck.hypernet_config.use_bias is True
    assert ck.hypernet_config.lora_config.r == 3
    assert set(ck.tensors) == set(official_key_shapes(cfg))  # prefixes removed
    assert infer_config(ck, head_dim=4) == cfg


def test_checkpoint_alpha_and_bias_override_preset(tmp_path):
    cfg = small_config(ONE)
    path = tmp_path / "ck.pt"
    _save_official(path, official_state_dict(cfg), cfg, use_bias=False, lora_alpha=7.0)
    with pytest.warns(UserWarning, match="bias_rank"):
        net = load_official(path, cfg)
    assert net.config.bias_rank == 0 and net.config.scale == 7.0


def test_convert_checkpoint_writes_loadable_directory(tmp_path):
    cfg = small_config(TWO)
    sd = official_state_dict(cfg)
    path = tmp_path / "ck.pt"
    _save_official(path, sd, cfg)
    summary = convert_checkpoint(path, tmp_path / "out", cfg)
    assert summary["base"] == "HuggingFaceTB/SmolVLM2-500M-Video-Instruct" and summary["rank"] == 3
    assert summary["preset"] == "smolvlm2-500m"
    net = Frames2LoRAHypernet.from_pretrained(tmp_path / "out")
    ref = load_official(path, cfg)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(net.state_dict()[k], v, rtol=0, atol=0)
    assert (tmp_path / "out" / "f2l_config.json").is_file()


def test_unknown_and_missing_keys_are_listed():
    cfg = small_config(ONE)
    sd = official_state_dict(cfg)
    sd.pop("scaler_B.down_proj")
    sd.pop(P + "encoder.layers.1.mlp.up_proj.weight")
    sd["head.extra_bias"] = torch.zeros(3)
    sd[P + "encoder.layers.0.self_attn.rotary.weight"] = torch.zeros(3)
    with pytest.raises(ValueError) as e:
        convert_state_dict(sd, cfg)
    msg = str(e.value)
    for k in ("scaler_B.down_proj", "encoder.layers.1.mlp.up_proj.weight", "head.extra_bias",
              "self_attn.rotary.weight"):
        assert k in msg
    assert "unknown keys (2)" in msg and "missing keys (2)" in msg


def test_wrong_shapes_are_listed():
    cfg = small_config(ONE)
    sd = official_state_dict(cfg)
    sd["head.weight"] = torch.randn(L, 16, 31)
    with pytest.raises(ValueError, match=r"wrong shapes \(1\): head.weight \[3, 16, 31\] \(expected \[3, 16, 32\]\)"):
        convert_state_dict(sd, cfg)


def test_non_tensor_entries_are_rejected():
    cfg = small_config(ONE)
    sd = official_state_dict(cfg)
    sd["optimizer"] = [1, 2, 3]
    with pytest.raises(ValueError, match="non-tensor entries.*optimizer"):
        convert_state_dict(sd, cfg)


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.remove, (self.path,))


@pytest.mark.parametrize("kind", ["text", "random-bytes", "truncated", "list", "empty-dict", "directory",
                                  "missing", "code-in-pickle"])
def test_bad_files_give_clear_errors(tmp_path, kind):
    cfg = small_config(ONE)
    path = tmp_path / "ck.pt"
    if kind == "text":
        path.write_text("not a checkpoint\n")
    elif kind == "random-bytes":
        path.write_bytes(os.urandom(4096))
    elif kind == "truncated":
        _save_official(path, official_state_dict(cfg), cfg)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "list":
        torch.save([torch.zeros(2)], path)
    elif kind == "empty-dict":
        torch.save({}, path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "code-in-pickle":
        victim = tmp_path / "victim.txt"
        victim.write_text("still here")
        torch.save({"head.weight": torch.zeros(2), "x": _Evil(str(victim))}, path)
    err = FileNotFoundError if kind == "missing" else ValueError
    with pytest.raises(err) as e:
        load_official(path, cfg)
    assert str(path) in str(e.value) or kind in ("code-in-pickle",)
    if kind == "code-in-pickle":
        assert (tmp_path / "victim.txt").read_text() == "still here"  # nothing was executed
        assert "will not unpickle" in str(e.value) and "weights_only" not in str(e.value)
    if kind in ("text", "random-bytes", "truncated"):
        assert "not a readable PyTorch checkpoint" in str(e.value)


def test_config_type_is_checked(tmp_path):
    with pytest.raises(TypeError, match="config: expected a HypernetConfig"):
        convert_state_dict({}, config={"rank": 3})
    with pytest.raises(ValueError, match="bias_rank"):
        convert_state_dict({}, small_config(ONE, bias_rank=2))


def test_from_pretrained_converts_on_the_fly(tmp_path):
    from f2l.model import Frames2LoRA
    from f2l.presets import load_base

    base = load_base("tiny")
    cfg = HypernetConfig.tiny(base, bias_rank=4)  # official checkpoints: bias ranks == rank
    sd = official_state_dict(cfg, seed=3)
    _save_official(tmp_path / "official.pt", sd, cfg)
    with pytest.warns(UserWarning, match="bias_rank"):  # the tiny preset has 2 bias ranks, the checkpoint 4
        m = Frames2LoRA.from_pretrained(base, hypernet=tmp_path / "official.pt", preset="tiny")
    ref = load_official(tmp_path / "official.pt", cfg)
    assert m.hypernet.config == ref.config
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(m.hypernet.state_dict()[k], v, rtol=0, atol=0)
