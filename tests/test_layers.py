"""Per-example LoRA inside HF models: apply_f2l / F2LPatch, AdapterPool, LoRALinear.

The reference is an *unpatched* model whose target modules get the per-sequence delta
added by forward hooks in float64, written out plainly."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import f2l.layers as layers_mod
from f2l.adapter import VideoAdapter
from f2l.layers import AdapterPool, F2LPatch, LoRALinear, apply_f2l, find_decoder_layers

from tiny_hf import HID, INTER, NL, VOCAB, tiny_llama, tiny_smolvlm  # noqa: E402


def random_pool(P, r, d_in=INTER, d_out=HID, L=NL, requires_grad=False):
    a = torch.randn(L, P, r, d_in) * 0.3
    b = torch.randn(L, P, d_out, r) * 0.3
    return a.requires_grad_(requires_grad), b.requires_grad_(requires_grad)


def _entries(e):
    if e is None or e == -1:
        return []
    return list(e) if isinstance(e, (list, tuple)) else [e]


def reference_logits(model, mods, ids, la, lb, adapter_ids, scale, ranks=None, weights=None):
    """Logits of the unpatched ``model`` with hooks adding the per-sequence delta.

    mods: module name -> list of the target nn.Linear per layer."""
    hooks = []
    for name, per_layer in mods.items():
        for pos, mod in enumerate(per_layer):
            def hook(mod, inp, out, name=name, pos=pos):
                x = inp[0].double()
                rows = []
                for i, e in enumerate(adapter_ids):
                    acc = torch.zeros(x.shape[1], out.shape[-1], dtype=torch.float64)
                    for k, p in enumerate(_entries(e)):
                        r = la[name].shape[2] if ranks is None else int(ranks[p])
                        w = 1.0 if weights is None else weights[i][k]
                        s = float(scale[p]) if torch.is_tensor(scale) else scale
                        a = la[name][pos, p, :r].double()
                        b = lb[name][pos, p, :, :r].double()
                        acc = acc + s * w * (x[i] @ a.T) @ b.T
                    rows.append(acc)
                return out + torch.stack(rows).to(out.dtype)
            hooks.append(mod.register_forward_hook(hook))
    try:
        return model(input_ids=ids).logits
    finally:
        for h in hooks:
            h.remove()


def llama_mods(model, names=("down_proj",)):
    return {n: [getattr(layer.mlp if n.endswith(("down_proj", "up_proj", "gate_proj")) else layer.self_attn, n)
                for layer in model.model.layers] for n in names}


def rel_err(got, want):
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-12)).item()


IDS_CASES = [
    ("one-each", [0, 1, 2]),
    ("none-and-compose", [-1, 2, [0, 2]]),
    ("repeated-and-None", [1, 1, None]),
    ("last-slot-compose-all", [[2, 1, 0], 2, 0]),
]


@pytest.mark.parametrize("adapter_ids", [c[1] for c in IDS_CASES], ids=[c[0] for c in IDS_CASES])
def test_llama_matches_reference(adapter_ids):
    model = tiny_llama()
    ids = torch.randint(0, VOCAB, (3, 6))
    la, lb = random_pool(3, 4)
    want = reference_logits(model, llama_mods(model), ids, {"down_proj": la}, {"down_proj": lb}, adapter_ids, 1.5)
    patch = apply_f2l(model, ("down_proj",), backend="reference")
    with patch.use({"down_proj": la}, {"down_proj": lb}, adapter_ids, scale=1.5):
        got = model(input_ids=ids).logits
    assert rel_err(got, want) < 1e-5


def test_ragged_ranks_and_per_entry_scale():
    model = tiny_llama()
    ids = torch.randint(0, VOCAB, (3, 5))
    la, lb = random_pool(3, 4)
    ranks = torch.tensor([4, 1, 3], dtype=torch.int32)
    scale = torch.tensor([0.5, 2.0, -1.0])
    adapter_ids = [0, [1, 2], 2]
    want = reference_logits(model, llama_mods(model), ids, {"down_proj": la}, {"down_proj": lb}, adapter_ids,
                            scale, ranks=ranks.tolist())
    patch = apply_f2l(model, backend="reference")
    with patch.use({"down_proj": la}, {"down_proj": lb}, adapter_ids, scale=scale, ranks=ranks):
        got = model(input_ids=ids).logits
    assert rel_err(got, want) < 1e-5


def test_zero_adapter_is_exactly_the_base_and_unpatched_is_identical():
    model = tiny_llama()
    ids = torch.randint(0, VOCAB, (2, 7))
    base = model(input_ids=ids).logits
    keys = list(model.state_dict())
    patch = apply_f2l(model, ("down_proj", "q_proj"))
    assert list(model.state_dict()) == keys
    assert torch.equal(model(input_ids=ids).logits, base)
    la, _ = random_pool(2, 3)
    lb = torch.zeros(NL, 2, HID, 3)
    with patch.use({"down_proj": la}, {"down_proj": lb}, [0, 1], scale=128.0):
        assert torch.equal(model(input_ids=ids).logits, base)
    patch.remove()
    for layer in model.model.layers:
        assert "forward" not in layer.mlp.down_proj.__dict__ and "forward" not in layer.self_attn.q_proj.__dict__
        assert not hasattr(layer.mlp.down_proj, "_f2l_patched")
    assert torch.equal(model(input_ids=ids).logits, base)
    patch.remove()  # idempotent


def test_triton_equals_reference():
    pytest.importorskip("triton")
    model = tiny_llama()
    ids = torch.randint(0, VOCAB, (3, 4))
    la, lb = random_pool(3, 4, requires_grad=True)
    patch = apply_f2l(model, backend="reference")
    adapter_ids = [2, -1, [0, 1]]
    g = torch.randn(3, 4, VOCAB)
    results = {}
    for backend in ("reference", "triton"):
        patch.backend = backend
        with patch.use({"down_proj": la}, {"down_proj": lb}, adapter_ids, scale=2.0):
            out = model(input_ids=ids).logits
        results[backend] = (out, *torch.autograd.grad((out * g).sum(), [la, lb]))
    for got, want in zip(results["triton"], results["reference"]):
        assert rel_err(got, want) < 1e-4


def test_gradients_flow_to_factors():
    model = tiny_llama()
    ids = torch.randint(0, VOCAB, (3, 5))
    la, lb = random_pool(3, 4, requires_grad=True)
    adapter_ids = [0, [1, 2], -1]
    ref = reference_logits(model, llama_mods(model), ids, {"down_proj": la}, {"down_proj": lb}, adapter_ids, 0.7)
    g = torch.randn_like(ref)
    ga_ref, gb_ref = torch.autograd.grad((ref * g).sum(), [la, lb])
    patch = apply_f2l(model, backend="reference")
    with patch.use({"down_proj": la}, {"down_proj": lb}, adapter_ids, scale=0.7):
        out = model(input_ids=ids).logits
    ga, gb = torch.autograd.grad((out * g).sum(), [la, lb])
    assert rel_err(ga, ga_ref) < 1e-4 and rel_err(gb, gb_ref) < 1e-4
    assert torch.count_nonzero(ga[:, 0]) > 0 and torch.count_nonzero(gb[:, 2]) > 0


def test_lora_batch_built_once_per_shape_and_kv_cached_decode(monkeypatch):
    model = tiny_llama()
    ids = torch.randint(0, VOCAB, (2, 6))
    la, lb = random_pool(2, 3)
    calls = []
    real = layers_mod.LoraBatch

    class Counting:
        @staticmethod
        def build(*args, **kwargs):
            calls.append(args[0])
            return real.build(*args, **kwargs)

    monkeypatch.setattr(layers_mod, "LoraBatch", Counting)
    patch = apply_f2l(model, backend="reference")
    with patch.use({"down_proj": la}, {"down_proj": lb}, [1, 0], scale=1.0):
        calls.clear()  # entering the block validates ids/ranks/weights with a row-less probe
        full = model(input_ids=ids).logits
        assert len(calls) == 1 and list(calls[0]) == [6, 6]
        model(input_ids=ids)
        assert len(calls) == 1
        out = model(input_ids=ids[:, :5], use_cache=True)
        step = model(input_ids=ids[:, 5:], past_key_values=out.past_key_values, use_cache=True).logits
        assert len(calls) == 3 and list(calls[-1]) == [1, 1]
    assert rel_err(step[:, -1], full[:, -1]) < 1e-5


def test_packed_rows_with_seq_lens():
    lin = nn.Linear(INTER, HID)
    x = torch.randn(9, INTER)
    la, lb = random_pool(2, 3, L=1)
    seq_lens, adapter_ids = [4, 0, 5], [1, 0, [0, 1]]
    want = F.linear(x, lin.weight, lin.bias).double()
    starts = [0, 4, 4, 9]
    for i, e in enumerate(adapter_ids):
        for p in _entries(e):
            xi = x[starts[i]:starts[i + 1]].double()
            want[starts[i]:starts[i + 1]] += 2.0 * (xi @ la[0, p].double().T) @ lb[0, p].double().T
    lin.requires_grad_(False)
    ll = LoRALinear(lin, backend="reference")
    ll.set_adapters(la[0], lb[0], adapter_ids, scale=2.0, seq_lens=seq_lens)
    assert rel_err(ll(x), want) < 1e-5


def test_trainable_base_weight_takes_the_unfused_path():
    lin = nn.Linear(INTER, HID)  # requires grad
    x = torch.randn(2, 3, INTER)
    la, lb = random_pool(2, 3, L=1)
    ll = LoRALinear(lin, backend="reference")
    ll.set_adapters(la[0], lb[0], [0, 1], scale=1.0)
    y = ll(x)
    y.sum().backward()
    assert lin.weight.grad is not None
    want = F.linear(x, lin.weight, lin.bias) + torch.stack(
        [(x[i] @ la[0, i].T) @ lb[0, i].T for i in range(2)])
    assert rel_err(y, want) < 1e-5


def test_smolvlm_patches_text_layers_only():
    model = tiny_smolvlm()
    ids = torch.randint(0, VOCAB, (2, 5))
    base = model(input_ids=ids).logits
    patch = apply_f2l(model, ("q_proj", "down_proj"), backend="reference")
    assert patch.layers_path == "model.text_model.layers"
    assert patch.module_paths == {"q_proj": "self_attn.q_proj", "down_proj": "mlp.down_proj"}
    patched = [n for n, m in model.named_modules() if getattr(m, "_f2l_patched", False)]
    assert len(patched) == 2 * NL and all(n.startswith("model.text_model.layers.") for n in patched)
    assert patch.module_shapes == {"q_proj": (HID, HID), "down_proj": (INTER, HID)}
    qa, qb = random_pool(2, 2, d_in=HID, d_out=HID)
    da, db = random_pool(2, 2)
    la, lb = {"q_proj": qa, "down_proj": da}, {"q_proj": qb, "down_proj": db}
    tl = model.model.text_model.layers
    mods = {"q_proj": [x.self_attn.q_proj for x in tl], "down_proj": [x.mlp.down_proj for x in tl]}
    with patch.use(la, lb, [1, [0, 1]], scale=3.0):
        got = model(input_ids=ids).logits
    patch.remove()
    want = reference_logits(model, mods, ids, la, lb, [1, [0, 1]], 3.0)
    assert not torch.allclose(got, base)
    assert rel_err(got, want) < 1e-5


def test_find_decoder_layers():
    assert find_decoder_layers(tiny_llama())[0] == "model.layers"
    assert find_decoder_layers(tiny_smolvlm())[0] == "model.text_model.layers"

    def block():
        return nn.ModuleDict({"proj": nn.Linear(4, 4)})

    class Custom(nn.Module):
        def __init__(self, two=False):
            super().__init__()
            self.vision_tower = nn.Module()
            self.vision_tower.layers = nn.ModuleList([block()])
            self.decoder = nn.Module()
            self.decoder.layers = nn.ModuleList([block(), block()])
            if two:
                self.other = nn.Module()
                self.other.layers = nn.ModuleList([block()])

    path, lst = find_decoder_layers(Custom())
    assert path == "decoder.layers" and len(lst) == 2
    with pytest.raises(ValueError, match="several candidate"):
        find_decoder_layers(Custom(two=True))
    with pytest.raises(ValueError, match="no decoder layer list"):
        find_decoder_layers(nn.Linear(2, 2))
    patch = apply_f2l(Custom(two=True), "proj", layers="other.layers")
    assert patch.layers_path == "other.layers" and patch.num_layers == 1


def test_layer_ids_subset():
    model = tiny_llama()
    ids = torch.randint(0, VOCAB, (1, 4))
    patch = apply_f2l(model, layer_ids=[1], backend="reference")
    la, lb = random_pool(1, 2, L=1)
    with patch.use({"down_proj": la}, {"down_proj": lb}, [0], scale=1.0):
        got = model(input_ids=ids).logits
    patch.remove()
    mods = {"down_proj": [model.model.layers[1].mlp.down_proj]}
    assert rel_err(got, reference_logits(model, mods, ids, {"down_proj": la}, {"down_proj": lb}, [0], 1.0)) < 1e-5


# --------------------------------------------------------------------------- pool


def make_adapter(r, scale=2.0, fp="fp", L=NL):
    return VideoAdapter(lora_a={"down_proj": torch.randn(L, r, INTER)},
                        lora_b={"down_proj": torch.randn(L, HID, r) * 0.3}, scale=scale, base_fingerprint=fp)


def test_pool_add_remove_grow_and_serve():
    pool = AdapterPool(NL, {"down_proj": (INTER, HID)}, r_max=4, capacity=2, base_fingerprint="fp")
    ads = {"a": make_adapter(4, 1.0), "b": make_adapter(2, 0.5), "c": make_adapter(3, 2.0)}
    slots = {k: pool.add(k, v) for k, v in ads.items()}
    assert slots == {"a": 0, "b": 1, "c": 2} and pool.capacity == 4 and len(pool) == 3
    assert pool.ranks.tolist() == [4, 2, 3, 0] and pool.scales.tolist() == [1.0, 0.5, 2.0, 0.0]
    assert torch.equal(pool.lora_a["down_proj"][:, 1, :2], ads["b"].lora_a["down_proj"])
    assert torch.count_nonzero(pool.lora_a["down_proj"][:, 1, 2:]) == 0
    pool.remove("a")
    assert "a" not in pool and torch.count_nonzero(pool.lora_b["down_proj"][:, 0]) == 0
    assert pool.add("d", ads["a"]) == 0 and pool.slot("d") == 0
    assert pool.slots(["c", None, ["d", "b"]]) == [2, -1, [0, 1]]

    model = tiny_llama()
    ids = torch.randint(0, VOCAB, (3, 5))
    adapter_ids = pool.slots(["c", None, ["d", "b"]])
    patch = apply_f2l(model, backend="reference")
    with patch.use_pool(pool, adapter_ids):
        got = model(input_ids=ids).logits
    patch.remove()
    want = reference_logits(model, llama_mods(model), ids, pool.lora_a, pool.lora_b, adapter_ids, pool.scales,
                            ranks=pool.ranks.tolist())
    assert rel_err(got, want) < 1e-5


POOL_ERRORS = [
    ("wrong-modules", lambda p: p.add("x", VideoAdapter({"up_proj": torch.randn(NL, 2, HID)},
                                                        {"up_proj": torch.randn(NL, INTER, 2)}, 1.0)), ValueError),
    ("wrong-layers", lambda p: p.add("x", make_adapter(2, L=NL + 1)), ValueError),
    ("rank-too-big", lambda p: p.add("x", make_adapter(5)), ValueError),
    ("other-base", lambda p: p.add("x", make_adapter(2, fp="other")), ValueError),
    ("duplicate-key", lambda p: p.add("a", make_adapter(2)), ValueError),
    ("none-key", lambda p: p.add(None, make_adapter(2)), TypeError),
    ("not-adapter", lambda p: p.add("x", {"down_proj": 1}), TypeError),
    ("full-no-grow", lambda p: p.add("x", make_adapter(2)), ValueError),
    ("unknown-key", lambda p: p.slot("zzz"), KeyError),
    ("remove-unknown", lambda p: p.remove("zzz"), KeyError),
]


@pytest.mark.parametrize("op,exc", [c[1:] for c in POOL_ERRORS], ids=[c[0] for c in POOL_ERRORS])
def test_pool_errors(op, exc):
    pool = AdapterPool(NL, {"down_proj": (INTER, HID)}, r_max=4, capacity=1, grow=False, base_fingerprint="fp")
    pool.add("a", make_adapter(2))
    with pytest.raises(exc):
        op(pool)


BAD_POOL_ARGS = [
    ("zero-layers", dict(num_layers=0)),
    ("no-modules", dict(module_shapes={})),
    ("bad-shape", dict(module_shapes={"down_proj": (4,)})),
    ("zero-rank", dict(r_max=0)),
    ("zero-capacity", dict(capacity=0)),
]


@pytest.mark.parametrize("kw", [c[1] for c in BAD_POOL_ARGS], ids=[c[0] for c in BAD_POOL_ARGS])
def test_pool_bad_args(kw):
    args = dict(num_layers=NL, module_shapes={"down_proj": (INTER, HID)}, r_max=4, capacity=2)
    args.update(kw)
    with pytest.raises(ValueError):
        AdapterPool(**args)
    with pytest.raises(TypeError, match="dtype"):
        AdapterPool(NL, {"down_proj": (INTER, HID)}, 4, 2, dtype=torch.int32)


def test_use_pool_rejects_empty_slot():
    pool = AdapterPool(NL, {"down_proj": (INTER, HID)}, r_max=4, capacity=2)
    pool.add("a", make_adapter(2))
    patch = apply_f2l(tiny_llama())
    with pytest.raises(ValueError, match="slot 1 of the pool is empty"):
        with patch.use_pool(pool, [0, 1]):
            pass
    with pytest.raises(TypeError, match="pool"):
        patch.use_pool({"down_proj": 1}, [0])


# --------------------------------------------------------------------------- drop-in


def test_lora_linear_drop_in():
    lin = nn.Linear(INTER, HID).requires_grad_(False)
    ll = LoRALinear(lin, backend="reference")
    assert isinstance(ll, nn.Linear) and ll.weight is lin.weight and ll.bias is lin.bias
    assert list(ll.state_dict()) == list(lin.state_dict())
    x = torch.randn(3, 4, INTER)
    assert torch.equal(ll(x), lin(x))
    la, lb = random_pool(3, 2, L=1)
    ll.set_adapters(la[0], lb[0], [2, -1, [0, 1]], scale=0.5)
    want = lin(x).double()
    for i, e in enumerate([2, -1, [0, 1]]):
        for p in _entries(e):
            want[i] += 0.5 * (x[i].double() @ la[0, p].double().T) @ lb[0, p].double().T
    assert rel_err(ll(x), want) < 1e-5
    assert rel_err(ll(x[:, 0]), want[:, 0]) < 1e-5  # decode rows [S, d]
    ll.clear_adapters()
    assert torch.equal(ll(x), lin(x))


BAD_DROP_IN = [
    ("a-not-tensor", lambda la, lb: (la.tolist(), lb, [0]), TypeError),
    ("a-int", lambda la, lb: (la.long(), lb, [0]), TypeError),
    ("a-wrong-din", lambda la, lb: (la[..., :-1], lb, [0]), ValueError),
    ("b-wrong-rank", lambda la, lb: (la, lb[..., :-1], [0]), ValueError),
    ("id-out-of-range", lambda la, lb: (la, lb, [2]), ValueError),
    ("id-negative", lambda la, lb: (la, lb, [-2]), ValueError),
    ("ids-empty", lambda la, lb: (la, lb, []), ValueError),
    ("id-float", lambda la, lb: (la, lb, [0.0]), ValueError),
]


@pytest.mark.parametrize("mutate,exc", [c[1:] for c in BAD_DROP_IN], ids=[c[0] for c in BAD_DROP_IN])
def test_lora_linear_bad_inputs(mutate, exc):
    ll = LoRALinear(nn.Linear(INTER, HID).requires_grad_(False))
    la, lb = random_pool(2, 3, L=1)
    a, b, ids = mutate(la[0], lb[0])
    with pytest.raises(exc):
        ll.set_adapters(a, b, ids)
    with pytest.raises(TypeError, match="linear"):
        LoRALinear(nn.Conv1d(2, 2, 1))


# --------------------------------------------------------------------------- bad inputs


@pytest.fixture(scope="module")
def patched():
    model = tiny_llama()
    return model, apply_f2l(model, backend="reference")


def _good():
    la, lb = random_pool(2, 3)
    return {"down_proj": la}, {"down_proj": lb}


BAD_USE = [
    ("a-not-dict", lambda a, b: ((a["down_proj"], b), dict(scale=1.0)), TypeError),
    ("modules-differ", lambda a, b: ((a, {"up_proj": b["down_proj"]}), dict(scale=1.0)), ValueError),
    ("unpatched-module", lambda a, b: (({"up_proj": a["down_proj"]}, {"up_proj": b["down_proj"]}), dict(scale=1.0)),
     ValueError),
    ("wrong-layers", lambda a, b: (({"down_proj": a["down_proj"][:1]}, b), dict(scale=1.0)), ValueError),
    ("wrong-din", lambda a, b: (({"down_proj": a["down_proj"][..., :-1]}, b), dict(scale=1.0)), ValueError),
    ("wrong-dout", lambda a, b: ((a, {"down_proj": b["down_proj"][:, :, :-1]}), dict(scale=1.0)), ValueError),
    ("pool-size-differs", lambda a, b: ((a, {"down_proj": b["down_proj"][:, :1]}), dict(scale=1.0)), ValueError),
    ("int-factors", lambda a, b: (({"down_proj": a["down_proj"].long()}, b), dict(scale=1.0)), TypeError),
    ("nan-scale", lambda a, b: ((a, b), dict(scale=float("nan"))), ValueError),
    ("scale-wrong-len", lambda a, b: ((a, b), dict(scale=torch.ones(3))), ValueError),
    ("ranks-wrong-len", lambda a, b: ((a, b), dict(scale=1.0, ranks=[1, 2, 3])), ValueError),
    ("seq-lens-wrong-len", lambda a, b: ((a, b), dict(scale=1.0, seq_lens=[3])), ValueError),
    ("rank-above-r-max", lambda a, b: ((a, b), dict(scale=1.0, ranks=[3, 4])), ValueError),
    ("weights-wrong-len", lambda a, b: ((a, b), dict(scale=1.0, weights=[1.0])), ValueError),
]


@pytest.mark.parametrize("mutate,exc", [c[1:] for c in BAD_USE], ids=[c[0] for c in BAD_USE])
def test_use_bad_inputs(patched, mutate, exc):
    _, patch = patched
    (a, b), kw = mutate(*_good())
    with pytest.raises(exc):
        with patch.use(a, b, [0, 1], **kw):
            pass
    assert not patch.active


def test_use_runtime_errors(patched):
    model, patch = patched
    a, b = _good()
    with patch.use(a, b, [0, 1], scale=1.0):
        with pytest.raises(ValueError, match="batch of 2 sequences"):
            model(input_ids=torch.randint(0, VOCAB, (3, 4)))
    with pytest.raises(ValueError, match="adapter_ids"):
        with patch.use(a, b, [0, 5], scale=1.0):
            pass


def test_apply_errors():
    model = tiny_llama()
    with pytest.raises(ValueError, match="exactly one module"):
        apply_f2l(model, ("nope",))
    with pytest.raises(TypeError, match="expected an nn.Linear"):
        apply_f2l(model, ("mlp",))
    with pytest.raises(ValueError, match="target_modules"):
        apply_f2l(model, ())
    with pytest.raises(ValueError, match="layer_ids"):
        apply_f2l(model, layer_ids=[0, NL])
    with pytest.raises(ValueError, match="layers"):
        apply_f2l(model, layers="model.nothing")
    with pytest.raises(TypeError, match="model"):
        apply_f2l("llama")
    patch = apply_f2l(model)
    with pytest.raises(ValueError, match="already patched"):
        apply_f2l(model)
    patch.remove()
    with pytest.raises(RuntimeError, match="removed"):
        with patch.use(*_good(), [0, 1], scale=1.0):
            pass
    again = apply_f2l(model)  # patching works again after remove()
    assert isinstance(again, F2LPatch)


def test_bf16_model_with_fp32_factors():
    model = tiny_llama().to(torch.bfloat16)
    ids = torch.randint(0, VOCAB, (2, 5))
    la, lb = random_pool(2, 3)
    want = reference_logits(model, llama_mods(model), ids, {"down_proj": la}, {"down_proj": lb}, [1, [0, 1]], 0.5)
    base = model(input_ids=ids).logits
    patch = apply_f2l(model, backend="reference")
    with patch.use({"down_proj": la}, {"down_proj": lb}, [1, [0, 1]], scale=0.5):
        got = model(input_ids=ids).logits
    assert got.dtype == torch.bfloat16
    assert rel_err(got, want) < 3e-2 and rel_err(got, base) > 1e-1


def test_linear_subclass_keeps_its_own_forward():
    class Scaled(nn.Linear):  # stands in for a quantised / custom linear
        def forward(self, x):
            return 2 * super().forward(x)

    model = tiny_llama()
    for layer in model.model.layers:
        old = layer.mlp.down_proj
        new = Scaled(INTER, HID, bias=False).requires_grad_(False)
        new.weight = old.weight
        layer.mlp.down_proj = new
    ids = torch.randint(0, VOCAB, (2, 4))
    la, lb = random_pool(2, 2)
    want = reference_logits(model, llama_mods(model), ids, {"down_proj": la}, {"down_proj": lb}, [0, 1], 1.0)
    with apply_f2l(model, backend="reference") as patch:
        with patch.use({"down_proj": la}, {"down_proj": lb}, [0, 1], scale=1.0):
            got = model(input_ids=ids).logits
    assert patch.removed and rel_err(got, want) < 1e-5
