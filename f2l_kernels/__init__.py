"""f2l_kernels: fused ops for Frames2LoRA (torch + triton, optional CUDA extension).

Imports neither ``f2l`` nor ``transformers``.
"""
from f2l_kernels.lora import LoraBatch, concat_adapters, lora_delta, lora_linear
from f2l_kernels.perceiver import perceiver_attention

__all__ = ["LoraBatch", "lora_linear", "lora_delta", "concat_adapters", "perceiver_attention"]
__version__ = "0.1.0"
