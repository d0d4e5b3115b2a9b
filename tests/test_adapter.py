"""VideoAdapter: save/load round trip, base-model checks, composition, PEFT export."""
import copy
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from f2l.adapter import VideoAdapter
from f2l.layers import LoRALinear, apply_f2l

from tiny_hf import HID, INTER, NL, VOCAB, tiny_llama, tiny_smolvlm  # noqa: E402
SHAPES = {"down_proj": (INTER, HID), "q_proj": (HID, HID)}


def make_adapter(r=3, scale=2.0, fp="fp0", bias_rank=0, modules=SHAPES, L=NL, dtype=torch.float32, **kw):
    return VideoAdapter(
        lora_a={m: torch.randn(L, r, di, dtype=dtype) for m, (di, _) in modules.items()},
        lora_b={m: torch.randn(L, do, r, dtype=dtype) * 0.5 for m, (_, do) in modules.items()},
        scale=scale, base_fingerprint=fp, bias_rank=bias_rank, **kw)


def delta_w(ad, m, layer):
    """Dense ``scale * B @ A`` of one (module, layer) in float64."""
    return ad.scale * ad.lora_b[m][layer].double() @ ad.lora_a[m][layer].double()


def rel_err(got, want):
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-12)).item()


# --------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_save_load_roundtrip(tmp_path, dtype):
    ad = make_adapter(r=5, scale=128.0, bias_rank=2, dtype=dtype, num_frames=12, source="clip.mp4",
                      metadata={"instruction": "Internalize.", "k": [1, 2]}, segments=[3])
    path = tmp_path / "sub" / "a.safetensors"
    ad.save(path)
    assert os.listdir(tmp_path / "sub") == ["a.safetensors"]  # no temp file left behind
    back = VideoAdapter.load(path, base_fingerprint="fp0")
    for f in ("scale", "base_fingerprint", "num_frames", "source", "metadata", "segments", "bias_rank"):
        assert getattr(back, f) == getattr(ad, f), f
    assert back.target_modules == ("down_proj", "q_proj") and back.dtype == dtype
    for m in SHAPES:
        assert torch.equal(back.lora_a[m], ad.lora_a[m]) and torch.equal(back.lora_b[m], ad.lora_b[m])
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["rank"] == "5" and json.loads(meta["lora_alpha"]) == 128.0 and meta["num_frames"] == "12"
    assert json.loads(meta["target_modules"]) == ["down_proj", "q_proj"] and meta["library_version"]
    moved = VideoAdapter.load(path, dtype=torch.float64)
    assert moved.dtype == torch.float64


def test_load_onto_another_base_is_an_error(tmp_path):
    make_adapter(fp="smolvlm2-500m:abc").save(tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="made for base model 'smolvlm2-500m:abc'"):
        VideoAdapter.load(tmp_path / "a.safetensors", base_fingerprint="smolvlm2-2.2b:def")
    VideoAdapter.load(tmp_path / "a.safetensors", base_fingerprint="smolvlm2-500m:abc")


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="path"):
        VideoAdapter.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a safetensors file"):
        VideoAdapter.load(tmp_path / "junk")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not an f2l VideoAdapter"):
        VideoAdapter.load(tmp_path / "other.safetensors")
    ad = make_adapter()
    ad.save(tmp_path / "a.safetensors")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "a.safetensors"), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "lora_b.q_proj"}
    save_file(tensors, str(tmp_path / "cut.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="holds tensors"):
        VideoAdapter.load(tmp_path / "cut.safetensors")
    with pytest.raises(ValueError, match="directory"):
        ad.save(tmp_path)
    with pytest.raises(ValueError, match="metadata"):
        make_adapter(metadata={"x": object()}).save(tmp_path / "b.safetensors")
    assert not (tmp_path / "b.safetensors").exists()


def _a(L=NL, r=3, d=INTER):
    return torch.randn(L, r, d)


BAD_ADAPTERS = [
    ("a-not-dict", dict(lora_a=[_a()]), TypeError),
    ("a-empty", dict(lora_a={}, lora_b={}), TypeError),
    ("modules-differ", dict(lora_b={"up_proj": torch.randn(NL, HID, 3)}), ValueError),
    ("a-2d", dict(lora_a={"down_proj": torch.randn(3, INTER)}), ValueError),
    ("b-wrong-rank", dict(lora_b={"down_proj": torch.randn(NL, HID, 2)}), ValueError),
    ("b-wrong-layers", dict(lora_b={"down_proj": torch.randn(NL + 1, HID, 3)}), ValueError),
    ("int-dtype", dict(lora_a={"down_proj": torch.ones(NL, 3, INTER, dtype=torch.int64)}), TypeError),
    ("mixed-dtype", dict(lora_b={"down_proj": torch.randn(NL, HID, 3, dtype=torch.float64)}), ValueError),
    ("rank-0", dict(lora_a={"down_proj": torch.randn(NL, 0, INTER)}, lora_b={"down_proj": torch.randn(NL, HID, 0)}),
     ValueError),
    ("nan-scale", dict(scale=float("nan")), ValueError),
    ("str-scale", dict(scale="2"), ValueError),
    ("bias-rank-too-big", dict(bias_rank=3), ValueError),
    ("segments-wrong-sum", dict(segments=[1, 1]), ValueError),
    ("segments-zero", dict(segments=[3, 0]), ValueError),
    ("negative-frames", dict(num_frames=-1), ValueError),
    ("fingerprint-not-str", dict(base_fingerprint=3), TypeError),
    ("metadata-not-dict", dict(metadata=[1]), TypeError),
]


@pytest.mark.parametrize("kw,exc", [c[1:] for c in BAD_ADAPTERS], ids=[c[0] for c in BAD_ADAPTERS])
def test_bad_adapter(kw, exc):
    args = dict(lora_a={"down_proj": _a()}, lora_b={"down_proj": torch.randn(NL, HID, 3)}, scale=1.0)
    args.update(kw)
    with pytest.raises(exc):
        VideoAdapter(**args)


# --------------------------------------------------------------------------- compose


def test_compose_equals_concatenation_and_sum_of_deltas():
    from f2l_kernels import concat_adapters

    parts = [make_adapter(r=3, scale=2.0, num_frames=4, source="a"),
             make_adapter(r=1, scale=0.5, num_frames=6, source="b"),
             make_adapter(r=2, scale=2.0, source="c")]
    w = [1.0, -0.5, 2.0]
    c = VideoAdapter.compose(parts, weights=w)
    assert c.rank == 6 and c.segments == [3, 1, 2] and c.scale == 2.0 and c.num_frames == 10
    assert c.base_fingerprint == "fp0" and c.source == "a + b + c"
    for m in SHAPES:
        for layer in range(NL):
            want = sum(wi * delta_w(p, m, layer) for wi, p in zip(w, parts))
            assert rel_err(delta_w(c, m, layer), want) < 1e-6
        # same scale parts: exactly the kernel library's materialised concatenation
        same = [parts[0], parts[2]]
        cs = VideoAdapter.compose(same, weights=[w[0], w[2]])
        ka, kb = concat_adapters([p.lora_a[m] for p in same], [p.lora_b[m] for p in same], weights=[w[0], w[2]])
        assert torch.allclose(cs.lora_a[m], ka) and torch.equal(cs.lora_b[m], kb)


def test_composed_adapter_equals_kernel_composition():
    """One sequence using pool entries [0, 1] with weights == the composed adapter alone."""
    lin = torch.nn.Linear(INTER, HID).requires_grad_(False)
    a, b = make_adapter(r=3, scale=1.5), make_adapter(r=3, scale=1.5)
    c = VideoAdapter.compose([a, b], weights=[0.25, 1.0])
    x = torch.randn(2, 4, INTER)
    ll = LoRALinear(lin, backend="reference")
    pool_a = torch.stack([a.lora_a["down_proj"][0], b.lora_a["down_proj"][0]])
    pool_b = torch.stack([a.lora_b["down_proj"][0], b.lora_b["down_proj"][0]])
    ll.set_adapters(pool_a, pool_b, [[0, 1], [0, 1]], scale=1.5, weights=[[0.25, 1.0], [0.25, 1.0]])
    y_list = ll(x)
    ll.set_adapters(c.lora_a["down_proj"][0][None], c.lora_b["down_proj"][0][None], [0, 0], scale=c.scale)
    y_comp = ll(x)
    assert rel_err(y_comp, y_list) < 1e-5


def test_compose_shares_bias_ranks_once():
    a = make_adapter(r=5, bias_rank=2)
    b = make_adapter(r=4, bias_rank=2)
    for m in SHAPES:  # same hypernet: identical context-free ranks
        b.lora_a[m][:, -2:] = a.lora_a[m][:, -2:]
        b.lora_b[m][:, :, -2:] = a.lora_b[m][:, :, -2:]
    c = VideoAdapter.compose([a, b], weights=[0.5, 2.0])
    assert c.rank == 3 + 2 + 2 and c.bias_rank == 2 and c.segments == [3, 2]
    for m in SHAPES:
        ctx = lambda ad, w, k: w * ad.scale * ad.lora_b[m][k, :, :-2].double() @ ad.lora_a[m][k, :-2].double()
        bias = a.scale * a.lora_b[m][0, :, -2:].double() @ a.lora_a[m][0, -2:].double()
        assert rel_err(delta_w(c, m, 0), ctx(a, 0.5, 0) + ctx(b, 2.0, 0) + bias) < 1e-6
    loose = VideoAdapter.compose([a, b], share_bias=False)
    assert loose.rank == 9 and loose.bias_rank == 0 and loose.segments == [5, 4]
    nested = VideoAdapter.compose([c, a])
    assert nested.segments == [3, 2, 3] and nested.bias_rank == 2
    other = make_adapter(r=4, bias_rank=2)
    with pytest.raises(ValueError, match="bias-LoRA ranks"):
        VideoAdapter.compose([a, other])


@pytest.mark.parametrize("s", [0.5, 0.0, -1.0, 3.0], ids=["half", "zero", "minus-one", "three"])
def test_compose_bias_scaler_scales_both_bias_factors(s):
    # The authors' combine_lora(..., bias_scaler=s) writes bias_A * s and bias_B * s into the bias
    # slot, so the context-free delta scales by s**2 and the context ranks are untouched.
    a, b = make_adapter(r=5, bias_rank=2), make_adapter(r=4, bias_rank=2)
    for m in SHAPES:
        b.lora_a[m][:, -2:] = a.lora_a[m][:, -2:]
        b.lora_b[m][:, :, -2:] = a.lora_b[m][:, :, -2:]
    plain = VideoAdapter.compose([a, b], weights=[0.5, 2.0])
    c = VideoAdapter.compose([a, b], weights=[0.5, 2.0], bias_scaler=s)
    assert c.segments == plain.segments and c.bias_rank == 2 and c.metadata["bias_scaler"] == s
    for m in SHAPES:
        assert torch.equal(c.lora_a[m][:, :-2], plain.lora_a[m][:, :-2])
        assert torch.equal(c.lora_b[m][:, :, :-2], plain.lora_b[m][:, :, :-2])
        assert torch.equal(c.lora_a[m][:, -2:], a.lora_a[m][:, -2:] * s)
        assert torch.equal(c.lora_b[m][:, :, -2:], a.lora_b[m][:, :, -2:] * s)
        bias = a.scale * a.lora_b[m][0, :, -2:].double() @ a.lora_a[m][0, -2:].double()
        want = delta_w(plain, m, 0) + (s * s - 1) * bias
        assert rel_err(delta_w(c, m, 0), want) < 1e-6
    one = VideoAdapter.compose([a], bias_scaler=s)  # one adapter: the authors apply it with one chunk too
    assert one.segments == a.segments and one.rank == a.rank
    for m in SHAPES:
        assert torch.equal(one.lora_a[m][:, -2:], a.lora_a[m][:, -2:] * s)
        assert torch.equal(one.lora_a[m][:, :-2], a.lora_a[m][:, :-2])
    loose = VideoAdapter.compose([a, b], share_bias=False, bias_scaler=s)  # every part's bias ranks
    for m in SHAPES:
        assert torch.equal(loose.lora_a[m][:, 3:5], a.lora_a[m][:, 3:] * s)
        assert torch.equal(loose.lora_b[m][:, :, 7:], b.lora_b[m][:, :, 2:] * s)
        assert torch.equal(loose.lora_a[m][:, :3], a.lora_a[m][:, :3])


def test_compose_bias_scaler_default_and_no_bias_ranks():
    a = make_adapter(r=3, bias_rank=1)
    for s in (None, 1.0, 1):
        c = VideoAdapter.compose([a, a], bias_scaler=s)
        assert c.metadata["bias_scaler"] == 1.0
        for m in SHAPES:
            assert torch.equal(c.lora_a[m], VideoAdapter.compose([a, a]).lora_a[m])
    plain = make_adapter(r=3)
    for m in SHAPES:  # nothing to scale without bias ranks
        assert torch.equal(VideoAdapter.compose([plain], bias_scaler=0.0).lora_a[m], plain.lora_a[m])


BAD_COMPOSE = [
    ("empty", lambda a: ([], None), TypeError),
    ("single-adapter", lambda a: (a, None), TypeError),
    ("not-adapter", lambda a: ([a, "b"], None), TypeError),
    ("weights-len", lambda a: ([a, a], [1.0]), ValueError),
    ("weights-nan", lambda a: ([a, a], [1.0, float("nan")]), ValueError),
    ("other-base", lambda a: ([a, make_adapter(fp="fp1")], None), ValueError),
    ("other-shapes", lambda a: ([a, make_adapter(modules={"down_proj": (INTER, HID)})], None), ValueError),
    ("other-layers", lambda a: ([a, make_adapter(L=NL + 1)], None), ValueError),
]
BAD_BIAS_SCALERS = [("nan", float("nan")), ("inf", float("inf")), ("str", "0.5"), ("bool", True)]


@pytest.mark.parametrize("value", [c[1] for c in BAD_BIAS_SCALERS], ids=[c[0] for c in BAD_BIAS_SCALERS])
def test_bad_bias_scaler(value):
    with pytest.raises(ValueError, match="bias_scaler"):
        VideoAdapter.compose([make_adapter(bias_rank=1)], bias_scaler=value)


@pytest.mark.parametrize("args,exc", [c[1:] for c in BAD_COMPOSE], ids=[c[0] for c in BAD_COMPOSE])
def test_bad_compose(args, exc):
    adapters, weights = args(make_adapter())
    with pytest.raises(exc):
        VideoAdapter.compose(adapters, weights)


# --------------------------------------------------------------------------- PEFT


def _f2l_logits(model, ad, ids):
    patch = apply_f2l(model, ad.target_modules, backend="reference")
    try:
        la = {m: t[:, None] for m, t in ad.lora_a.items()}
        lb = {m: t[:, None] for m, t in ad.lora_b.items()}
        with patch.use(la, lb, [0] * ids.shape[0], scale=ad.scale):
            return model(input_ids=ids).logits, patch
    finally:
        patch.remove()


PEFT_CASES = [("llama-exact-alpha", "llama", 2.0, 0), ("llama-folded-alpha", "llama", 0.1, 0),
              ("smolvlm-bias-ranks", "smolvlm", 3.0, 1)]


@pytest.mark.parametrize("kind,scale,bias_rank", [c[1:] for c in PEFT_CASES], ids=[c[0] for c in PEFT_CASES])
def test_to_peft_loads_in_peft_with_same_logits(tmp_path, kind, scale, bias_rank):
    peft = pytest.importorskip("peft")
    model = tiny_llama() if kind == "llama" else tiny_smolvlm()
    ad = make_adapter(r=3, scale=scale, bias_rank=bias_rank)
    ids = torch.randint(0, VOCAB, (2, 6))
    base = model(input_ids=ids).logits
    want, patch = _f2l_logits(model, ad, ids)
    assert rel_err(want, base) > 1e-3
    ad.to_peft(tmp_path / "peft", layers_path=patch.layers_path, module_paths=patch.module_paths,
               base_model_name_or_path="tiny")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 3
    if scale == 0.1:
        assert cfg["lora_alpha"] == 3.0  # 0.1 * 3 / 3 != 0.1 in floats: scale folded into B
    else:
        assert cfg["lora_alpha"] / cfg["r"] == scale
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "peft"))
    got = pm(input_ids=ids).logits
    assert rel_err(got, want) < 1e-5
    lora_names = [n for n, _ in pm.named_modules() if n.endswith("lora_A")]
    assert len(lora_names) == 2 * NL and all(".vision_model." not in n for n in lora_names)


def test_to_peft_default_paths_smolvlm(tmp_path):
    ad = make_adapter(modules={"down_proj": (INTER, HID)}, scale=128.0)
    ad.to_peft(tmp_path / "p")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "p" / "adapter_model.safetensors"), "pt") as f:
        keys = sorted(f.keys())
    assert keys[0] == "base_model.model.model.text_model.layers.0.mlp.down_proj.lora_A.weight"
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert cfg["lora_alpha"] / cfg["r"] == 128.0
    assert sorted(os.listdir(tmp_path / "p")) == ["adapter_config.json", "adapter_model.safetensors"]


def test_to_peft_layer_subset(tmp_path):
    peft = pytest.importorskip("peft")
    model = tiny_llama()
    ad = make_adapter(r=2, L=1, modules={"down_proj": (INTER, HID)})
    ids = torch.randint(0, VOCAB, (1, 5))
    patch = apply_f2l(model, layer_ids=[1], backend="reference")
    with patch.use({"down_proj": ad.lora_a["down_proj"][:, None]}, {"down_proj": ad.lora_b["down_proj"][:, None]},
                   [0], scale=ad.scale):
        want = model(input_ids=ids).logits
    patch.remove()
    ad.to_peft(tmp_path / "p", layers_path=patch.layers_path, layer_ids=patch.layer_ids)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "p"))
    assert [n for n, _ in pm.named_modules() if n.endswith("lora_A")] == \
        ["base_model.model.model.layers.1.mlp.down_proj.lora_A"]
    assert rel_err(pm(input_ids=ids).logits, want) < 1e-5


BAD_PEFT = [
    ("layer-ids-wrong-len", dict(layer_ids=[0]), ValueError),
    ("layer-ids-repeated", dict(layer_ids=[1, 1]), ValueError),
    ("bad-layers-path", dict(layers_path="model..layers"), ValueError),
    ("module-path-wrong-leaf", dict(module_paths={"down_proj": "mlp.up_proj"}), ValueError),
    ("module-paths-not-dict", dict(module_paths=["mlp.down_proj"]), TypeError),
    ("base-name-not-str", dict(base_model_name_or_path=3), TypeError),
]


@pytest.mark.parametrize("kw,exc", [c[1:] for c in BAD_PEFT], ids=[c[0] for c in BAD_PEFT])
def test_to_peft_bad_args(tmp_path, kw, exc):
    with pytest.raises(exc):
        make_adapter().to_peft(tmp_path / "p", **kw)


def test_to_peft_unknown_module_needs_path(tmp_path):
    ad = make_adapter(modules={"fc1": (HID, INTER)})
    with pytest.raises(ValueError, match="module_paths"):
        ad.to_peft(tmp_path / "p")
    ad.to_peft(tmp_path / "p", module_paths={"fc1": "mlp.fc1"})
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="directory"):
        ad.to_peft(tmp_path / "f", module_paths={"fc1": "mlp.fc1"})
