"""f2l_kernels.lora: input validation, LoraBatch metadata, backend dispatch, torch.library
registration (opcheck, torch.compile)."""
from __future__ import annotations

import pytest
import torch

from f2l_kernels.lora import LoraBatch, concat_adapters, lora_delta, lora_linear
from f2l_kernels.lora import triton as lora_triton

D_IN, D_OUT, P, R = 12, 10, 3, 4


def _inputs(n=5, dtype=torch.float32):
    return dict(
        x=torch.randn(n, D_IN, dtype=dtype),
        weight=torch.randn(D_OUT, D_IN, dtype=dtype),
        bias=torch.randn(D_OUT, dtype=dtype),
        lora_a=torch.randn(P, R, D_IN, dtype=dtype),
        lora_b=torch.randn(P, D_OUT, R, dtype=dtype),
        batch=LoraBatch.build([2, 3], [0, [1, 2]]),
    )


def _linear(**over):
    kw = _inputs()
    kw.update(over)
    return lora_linear(kw["x"], kw["weight"], kw["bias"], kw["lora_a"], kw["lora_b"], kw["batch"],
                       kw.get("scale", 1.0), backend=kw.get("backend"))


BAD_INPUTS = [
    ("x_feature_size", dict(x=torch.randn(5, D_IN + 1)), ValueError, "x:"),
    ("weight_shape", dict(weight=torch.randn(D_OUT, D_IN + 2)), ValueError, "weight:"),
    ("bias_shape", dict(bias=torch.randn(D_OUT + 1)), ValueError, "bias:"),
    ("lora_b_rank", dict(lora_b=torch.randn(P, D_OUT, R + 1)), ValueError, "lora_b:"),
    ("lora_b_pool", dict(lora_b=torch.randn(P + 1, D_OUT, R)), ValueError, "lora_b:"),
    ("lora_a_ndim", dict(lora_a=torch.randn(R, D_IN)), ValueError, "lora_a:"),
    ("mixed_dtype_a", dict(lora_a=torch.randn(P, R, D_IN, dtype=torch.bfloat16)), TypeError, "lora_a:"),
    ("mixed_dtype_weight", dict(weight=torch.randn(D_OUT, D_IN, dtype=torch.float16)), TypeError, "weight:"),
    ("mixed_device", dict(lora_b=torch.randn(P, D_OUT, R, device="meta")), ValueError, "lora_b:"),
    ("int_x", dict(x=torch.ones(5, D_IN, dtype=torch.int64)), TypeError, "x:"),
    ("id_out_of_range", dict(batch=LoraBatch.build([2, 3], [0, P])), ValueError, "batch:"),
    ("rows_mismatch", dict(batch=LoraBatch.build([2, 4], [0, 1])), ValueError, "batch: seq_lens sum to 6"),
    ("rank_above_r_max", dict(batch=LoraBatch.build([2, 3], [0, 1], ranks=[R, R + 1, 1])), ValueError,
     "exceeds r_max"),
    ("ranks_len_vs_pool", dict(batch=LoraBatch.build([2, 3], [0, 1], ranks=[1, 1])), ValueError, "batch:"),
    ("weight_requires_grad", dict(weight=torch.randn(D_OUT, D_IN, requires_grad=True)), ValueError,
     "weight: the base weight must be frozen"),
    ("scale_shape", dict(scale=torch.ones(P + 1)), ValueError, "scale:"),
    ("scale_type", dict(scale="2"), TypeError, "scale:"),
    ("batch_type", dict(batch=[2, 3]), TypeError, "batch:"),
    ("backend_name", dict(backend="fast"), ValueError, "backend"),
    ("cuda_on_cpu", dict(backend="cuda"), ValueError, "cuda"),
]


@pytest.mark.parametrize("over,exc,msg", [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs_raise_naming_the_argument(over, exc, msg):
    with pytest.raises(exc, match=msg.replace("[", r"\[")):
        _linear(**over)


BAD_BATCHES = [
    ("negative_length", dict(seq_lens=[2, -1], adapter_ids=[0, 1]), ValueError, r"seq_lens\[1\]"),
    ("float_length", dict(seq_lens=[2.0, 1], adapter_ids=[0, 1]), TypeError, r"seq_lens\[0\]"),
    ("ids_length", dict(seq_lens=[2, 1], adapter_ids=[0]), ValueError, "adapter_ids:"),
    ("id_below_minus_one", dict(seq_lens=[2, 1], adapter_ids=[0, -2]), ValueError, r"adapter_ids\[1\]"),
    ("id_type", dict(seq_lens=[2, 1], adapter_ids=[0, "a"]), TypeError, r"adapter_ids\[1\]"),
    ("list_id_type", dict(seq_lens=[2, 1], adapter_ids=[0, [1, 0.5]]), TypeError, r"adapter_ids\[1\]\[1\]"),
    ("weights_length", dict(seq_lens=[2, 1], adapter_ids=[0, [1, 2]], weights=[None, [1.0]]), ValueError,
     r"weights\[1\]"),
    ("weights_count", dict(seq_lens=[2, 1], adapter_ids=[0, 1], weights=[1.0]), ValueError, "weights:"),
    ("negative_rank", dict(seq_lens=[2], adapter_ids=[0], ranks=[-1]), ValueError, r"ranks\[0\]"),
    ("id_beyond_ranks", dict(seq_lens=[2], adapter_ids=[2], ranks=[1, 1]), ValueError, "adapter_ids:"),
]


@pytest.mark.parametrize("kw,exc,msg", [b[1:] for b in BAD_BATCHES], ids=[b[0] for b in BAD_BATCHES])
def test_bad_batch_raises_naming_the_argument(kw, exc, msg):
    with pytest.raises(exc, match=msg):
        LoraBatch.build(**kw)


def test_lora_delta_out_validation():
    kw = _inputs()
    with pytest.raises(ValueError, match="out:"):
        lora_delta(kw["x"], kw["lora_a"], kw["lora_b"], kw["batch"], out=torch.zeros(5, D_OUT + 1))
    with pytest.raises(TypeError, match="out:"):
        lora_delta(kw["x"], kw["lora_a"], kw["lora_b"], kw["batch"], out=torch.zeros(5, D_OUT, dtype=torch.float64))


def test_concat_adapters_validation():
    a, b = torch.randn(2, D_IN), torch.randn(D_OUT, 2)
    with pytest.raises(ValueError, match=r"lora_as\[1\]"):
        concat_adapters([a, torch.randn(2, D_IN + 1)], [b, b])
    with pytest.raises(ValueError, match=r"lora_bs\[1\]"):
        concat_adapters([a, a], [b, torch.randn(D_OUT, 3)])
    with pytest.raises(ValueError, match="lora_bs:"):
        concat_adapters([a, a], [b])
    with pytest.raises(ValueError, match="weights:"):
        concat_adapters([a, a], [b, b], weights=[1.0])
    with pytest.raises(TypeError, match=r"lora_as\[1\]"):
        concat_adapters([a, a.double()], [b, b])
    with pytest.raises(ValueError, match="lora_as:"):
        concat_adapters([], [])


def test_concat_adapters_leading_dims_and_grad():
    a0 = torch.randn(3, 2, D_IN, requires_grad=True)
    a1 = torch.randn(3, 4, D_IN)
    b0, b1 = torch.randn(3, D_OUT, 2), torch.randn(3, D_OUT, 4)
    a, b = concat_adapters([a0, a1], [b0, b1], weights=torch.tensor([2.0, -1.0]))
    assert a.shape == (3, 6, D_IN) and b.shape == (3, D_OUT, 6)
    torch.testing.assert_close(a[:, :2], 2 * a0.detach())
    torch.testing.assert_close(a[:, 2:], -a1)
    a.sum().backward()
    torch.testing.assert_close(a0.grad, torch.full_like(a0, 2.0))


def test_outputs_are_poisoned_in_tests():
    # the suite relies on NaN-filled kernel outputs to catch unwritten elements
    from f2l_kernels._alloc import empty, poison_enabled

    assert poison_enabled()
    assert empty((2, 3), dtype=torch.float32, device="cpu").isnan().all()


def test_batch_fields():
    b = LoraBatch.build([3, 0, 2, 1], [1, -1, [0, None, 2], None], weights=[None, None, [0.5, 9.0, 2.0], None],
                        ranks=[2, 4, 1])
    assert (b.num_seqs, b.num_rows, b.pool_size, b.max_rows_per_seq, b.max_adapters_per_seq) == (4, 6, 3, 3, 2)
    assert b.seq_starts.tolist() == [0, 3, 3, 5, 6]
    assert b.adapter_ptr.tolist() == [0, 1, 1, 3, 3]
    assert b.adapter_idx.tolist() == [1, 0, 2]
    assert b.adapter_weight.tolist() == [1.0, 0.5, 2.0]
    assert b.seq_starts.dtype == b.adapter_idx.dtype == torch.int32
    assert not b.is_decode and LoraBatch.build([1, 1], [0, 1]).is_decode
    # tiles never straddle sequences; empty sequences get none
    assert b.tiles(2).tolist() == [[0, 0], [0, 2], [2, 3], [3, 5]]
    plan = b.entry_plan(3, 4, 2)
    assert plan["block_e"] == 16 and plan["h_width"] == 32
    assert plan["ranks"].tolist() == [2, 4, 1] and plan["row_seq"].tolist() == [0, 0, 0, 2, 2, 3]
    # backward work items: (entry, chunk of <= 2 rows), ordered by pool entry, entry, chunk
    assert plan["item_entry"].tolist() == [1, 0, 0, 2]
    assert plan["item_slot"].tolist() == [0, 0, 0, 1]
    assert plan["item_row0"].tolist() == [3, 0, 2, 3] and plan["item_row1"].tolist() == [5, 2, 3, 5]
    assert plan["item_ptr"].tolist() == [0, 1, 3, 4]
    assert b.entry_plan(3, 20, 2)["block_e"] == 32
    # tensor inputs are accepted too
    b2 = LoraBatch.build(torch.tensor([2, 2]), torch.tensor([0, -1]))
    assert b2.adapter_idx.tolist() == [0] and b2.adapter_ptr.tolist() == [0, 1, 1]


def test_auto_backend_on_cpu_is_reference(monkeypatch):
    monkeypatch.delenv("F2L_BACKEND", raising=False)
    kw = _inputs()
    called = []
    real = lora_triton.lora_linear_triton
    monkeypatch.setattr(lora_triton, "lora_linear_triton", lambda *a, **k: called.append(1) or real(*a, **k))
    y_auto = _linear(**kw)
    assert not called
    y_tr = _linear(**kw, backend="triton")
    assert called
    torch.testing.assert_close(y_auto, y_tr, atol=1e-5, rtol=1e-5)


def test_gradients_reach_all_differentiable_inputs_reference():
    kw = _inputs()
    x, a, b = (kw[k].requires_grad_() for k in ("x", "lora_a", "lora_b"))
    lora_linear(x, kw["weight"], kw["bias"], a, b, kw["batch"], backend="reference").sum().backward()
    assert x.grad is not None and a.grad is not None and b.grad is not None


def _op_args(scale_vec: bool):
    kw = _inputs(n=9)
    batch = LoraBatch.build([4, 0, 5], [0, [1, 2], 2], ranks=[4, 2, 3], weights=[None, [0.5, -1.0], None])
    x = kw["x"].requires_grad_()
    a = kw["lora_a"].requires_grad_()
    b = kw["lora_b"].requires_grad_()
    scale = torch.rand(P) if scale_vec else 1.5
    meta, sv, sf, bm, hw, rows = lora_triton._prepare(x, a, batch, scale)
    return x, kw["weight"], kw["bias"], a, b, meta, sv, sf, bm, hw, rows


@pytest.mark.parametrize("scale_vec", [False, True], ids=["scale_float", "scale_vec"])
def test_opcheck_forward(scale_vec):
    x, w, bias, a, b, meta, sv, sf, bm, hw, rows = _op_args(scale_vec)
    for row_mode in (rows, not rows):
        torch.library.opcheck(torch.ops.f2l.lora_fwd.default,
                              (x, w, bias, a, b, meta, sv, sf, bm, hw, row_mode, True))


def test_opcheck_backward():
    x, w, bias, a, b, meta, sv, sf, bm, hw, rows = _op_args(False)
    for row_mode in (rows, not rows):
        with torch.no_grad():
            _, h = torch.ops.f2l.lora_fwd(x, w, bias, a, b, meta, sv, sf, bm, hw, row_mode, True)
        dy = torch.randn(x.shape[0], D_OUT)
        torch.library.opcheck(torch.ops.f2l.lora_bwd.default,
                              (dy, x.detach(), w, a.detach(), b.detach(), h, meta, sv, sf, bm, hw, row_mode),
                              test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_traces_the_op():
    kw = _inputs()
    batch = kw["batch"]
    w, bias = kw["weight"], kw["bias"]

    def f(x, a, b):
        return lora_linear(x, w, bias, a, b, batch, 0.75, backend="triton")

    ins = [kw[k].clone().requires_grad_() for k in ("x", "lora_a", "lora_b")]
    ins2 = [t.detach().clone().requires_grad_() for t in ins]
    y = torch.compile(f, backend="aot_eager", fullgraph=True)(*ins)
    y_eager = f(*ins2)
    torch.testing.assert_close(y, y_eager)
    y.sum().backward()
    y_eager.sum().backward()
    for t, u in zip(ins, ins2):
        torch.testing.assert_close(t.grad, u.grad)


def test_fp32_precision_follows_torch_settings(monkeypatch):
    # IEEE fp32 products by default; TF32 only where the caller allows it
    monkeypatch.setattr(lora_triton, "_INTERPRET", False)
    prec = torch.get_float32_matmul_precision()
    allow = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
        assert lora_triton._dot_prec(torch.float32) == "ieee"
        torch.set_float32_matmul_precision("high")
        assert lora_triton._dot_prec(torch.float32) == "tf32"
        torch.set_float32_matmul_precision("highest")
        torch.backends.cuda.matmul.allow_tf32 = True
        assert lora_triton._dot_prec(torch.float32) == "tf32"
        assert lora_triton._dot_prec(torch.bfloat16) == "tf32"  # ignored for 16-bit operands
    finally:
        torch.set_float32_matmul_precision(prec)
        torch.backends.cuda.matmul.allow_tf32 = allow


def test_row_and_tile_paths_agree():
    # the same rows through both forward paths (and both backward paths)
    torch.manual_seed(1)
    x = torch.randn(40, D_IN)
    w, bias = torch.randn(D_OUT, D_IN), torch.randn(D_OUT)
    a, b = torch.randn(P, R, D_IN), torch.randn(P, D_OUT, R)
    batch = LoraBatch.build([18, 22], [[0, 2], 1], ranks=[4, 3, 2], weights=[[0.5, -1.0], None])
    meta, sv, sf, bm, hw, rows = lora_triton._prepare(x, a, batch, 0.75)
    assert not rows
    outs = [torch.ops.f2l.lora_fwd(x, w, bias, a, b, meta, sv, sf, bm, hw, mode, True) for mode in (False, True)]
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[0][1], outs[1][1], atol=1e-5, rtol=1e-5)
    dy = torch.randn(40, D_OUT)
    grads = [torch.ops.f2l.lora_bwd(dy, x, w, a, b, outs[0][1], meta, sv, sf, bm, hw, mode) for mode in (False, True)]
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g0, g1, atol=1e-5, rtol=1e-5)
