"""Tiny HF models built in code for the layer and adapter tests (no hub downloads)."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM, SmolVLMConfig, SmolVLMForConditionalGeneration

HID, INTER, NL, VOCAB = 32, 48, 2, 64


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HID, intermediate_size=INTER, num_hidden_layers=NL,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # HF's 0.02 init gives near-zero deltas; make them visible
        for p in m.parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else None
    return m.requires_grad_(False)


def tiny_smolvlm(seed=0):
    torch.manual_seed(seed)
    cfg = SmolVLMConfig(
        text_config=dict(model_type="llama", vocab_size=VOCAB, hidden_size=HID, intermediate_size=INTER,
                         num_hidden_layers=NL, num_attention_heads=4, num_key_value_heads=2),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        scale_factor=2,
    )
    return SmolVLMForConditionalGeneration(cfg).eval().requires_grad_(False)
