"""PEFT export: the exported directory loads in peft.PeftModel and gives the same logits as
f2l's own per-example LoRA path; scaling, module names and every check of the directory."""
import json

import pytest
import torch

from f2l.adapter import VideoAdapter
from f2l.export import export_peft, verify_peft_dir, vllm_max_lora_rank
from f2l.layers import apply_f2l
from f2l.presets import load_base

peft = pytest.importorskip("peft")

MODULES = ("down_proj", "q_proj")


@pytest.fixture(scope="module")
def base():
    return load_base("tiny")


def random_adapter(base, *, rank=6, bias_rank=2, scale=2 * 4 ** 1.5, seed=0, modules=MODULES, fingerprint=None):
    g = torch.Generator().manual_seed(seed)
    shapes = base.module_shapes(modules)
    L = base.num_layers
    return VideoAdapter(
        lora_a={m: torch.randn(L, rank, di, generator=g) / di ** 0.5 for m, (di, do) in shapes.items()},
        lora_b={m: torch.randn(L, do, rank, generator=g) * 0.05 for m, (di, do) in shapes.items()},
        scale=scale, base_fingerprint=base.fingerprint if fingerprint is None else fingerprint,
        bias_rank=bias_rank, source=f"clip{seed}.mp4", metadata={"base": "tiny"})


def f2l_logits(base, ad, ids):
    patch = apply_f2l(base.model, target_modules=ad.target_modules)
    try:
        la = {m: t[:, None] for m, t in ad.lora_a.items()}
        lb = {m: t[:, None] for m, t in ad.lora_b.items()}
        with torch.no_grad(), patch.use(la, lb, [0] * ids.shape[0], scale=ad.scale):
            return base.model(input_ids=ids).logits
    finally:
        patch.remove()


@pytest.mark.parametrize("case", ["exact-alpha", "folded-scale", "composed"])
def test_peft_logits_equal_f2l(base, tmp_path, case):
    if case == "exact-alpha":
        ad = random_adapter(base)
    elif case == "folded-scale":
        ad = random_adapter(base, rank=3, bias_rank=0, scale=0.1 * 37)  # scale*r/r != scale in floating point
    else:
        ad = VideoAdapter.compose([random_adapter(base, seed=1), random_adapter(base, seed=2)], weights=[1.0, -0.5],
                                  share_bias=False)
    info = export_peft(ad, tmp_path / "peft", base=base)
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["r"] == ad.rank and info["rank"] == ad.rank
    if case == "folded-scale":
        assert cfg["lora_alpha"] == cfg["r"]
    else:
        assert cfg["lora_alpha"] / cfg["r"] == ad.scale
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, base.model.config.text_config.vocab_size, (2, 9), generator=g)
    want = f2l_logits(base, ad, ids)
    fresh = load_base("tiny")
    with torch.no_grad():
        plain = fresh.model(input_ids=ids).logits
        pm = peft.PeftModel.from_pretrained(fresh.model, str(tmp_path / "peft"))
        got = pm(input_ids=ids).logits
    assert (want - plain).abs().max() > 1e-3  # the adapter does change the output
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert sorted(n for n, _ in pm.named_modules() if n.endswith("lora_A")) != []


def test_module_names_are_the_base_models(base, tmp_path):
    ad = random_adapter(base)
    export_peft(ad, tmp_path / "p", base=base)
    summary = verify_peft_dir(tmp_path / "p", model=base.model, adapter=ad)
    assert summary["num_modules"] == base.num_layers * len(MODULES)
    names = summary["modules"]
    assert "model.text_model.layers.0.mlp.down_proj" in names
    assert "model.text_model.layers.3.self_attn.q_proj" in names
    for n in names:
        assert isinstance(base.model.get_submodule(n), torch.nn.Linear)
    info = json.loads((tmp_path / "p" / "f2l_export.json").read_text())
    assert info["vllm"]["max_lora_rank"] == 8 and info["base_fingerprint"] == base.fingerprint


def test_adapter_file_path_and_base_name(base, tmp_path):
    ad = random_adapter(base)
    ad.save(tmp_path / "a.safetensors")
    info = export_peft(tmp_path / "a.safetensors", tmp_path / "p", base_model_name_or_path="my/base")
    assert json.loads((tmp_path / "p" / "adapter_config.json").read_text())["base_model_name_or_path"] == "my/base"
    assert info["scale"] == ad.scale


def test_wrong_base_is_refused(base, tmp_path):
    ad = random_adapter(base, fingerprint="0123456789abcdef")
    with pytest.raises(ValueError, match="made for base model"):
        export_peft(ad, tmp_path / "p", base=base)


@pytest.mark.parametrize("damage", ["tensor-changed", "missing-B", "bad-config-json", "rslora", "wrong-r",
                                    "foreign-key", "no-weights", "regex-mismatch"])
def test_verify_detects_damage(base, tmp_path, damage):
    from safetensors.torch import load_file, save_file

    ad = random_adapter(base)
    d = tmp_path / "p"
    export_peft(ad, d)
    wpath, cpath = d / "adapter_model.safetensors", d / "adapter_config.json"
    t, cfg = load_file(str(wpath)), json.loads(cpath.read_text())
    first = sorted(t)[0]
    if damage == "tensor-changed":
        t[first] = t[first] + 1e-3
    elif damage == "missing-B":
        t.pop(first.replace("lora_A", "lora_B"))
    elif damage == "foreign-key":
        t["model.layers.0.weight"] = torch.zeros(2)
    elif damage == "bad-config-json":
        cpath.write_text("{not json")
    elif damage == "rslora":
        cfg["use_rslora"] = True
    elif damage == "wrong-r":
        cfg["r"] = 5
    elif damage == "no-weights":
        wpath.unlink()
    elif damage == "regex-mismatch":
        cfg["target_modules"] = r"model\.layers\.\d+\.mlp\.down_proj"
    if damage not in ("bad-config-json", "no-weights"):
        save_file(t, str(wpath))
        cpath.write_text(json.dumps(cfg))
    err = FileNotFoundError if damage == "no-weights" else ValueError
    with pytest.raises(err):
        verify_peft_dir(d, model=base.model, adapter=ad)


def test_verify_against_wrong_model(base, tmp_path):
    ad = random_adapter(base)
    export_peft(ad, tmp_path / "p", layers_path="model.layers")  # a plain-Llama layout
    with pytest.raises(ValueError, match="has no module 'model.layers.0"):
        verify_peft_dir(tmp_path / "p", model=base.model)


@pytest.mark.parametrize("rank,want", [(1, 1), (2, 8), (8, 8), (9, 16), (32, 32), (33, 64), (300, 320), (512, 512)])
def test_vllm_max_lora_rank(rank, want):
    assert vllm_max_lora_rank(rank) == want


@pytest.mark.parametrize("rank", [0, -1, 513, 1.5, True])
def test_vllm_max_lora_rank_errors(rank):
    with pytest.raises(ValueError):
        vllm_max_lora_rank(rank)


def test_argument_errors(base, tmp_path):
    ad = random_adapter(base)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="out_dir"):
        export_peft(ad, tmp_path / "file")
    with pytest.raises(TypeError, match="adapter"):
        export_peft(123, tmp_path / "p")
    with pytest.raises(TypeError, match="out_dir"):
        export_peft(ad, 3)
    with pytest.raises(FileNotFoundError):
        export_peft(tmp_path / "missing.safetensors", tmp_path / "p")
    with pytest.raises(FileNotFoundError):
        verify_peft_dir(tmp_path / "nothing")
