"""Shipped JSON architectures of the real SmolVLM2 presets (see f2l.presets)."""
