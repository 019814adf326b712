"""Stable Diffusion 1.5 + LoRA + textual-inversion generator behind the same train-gen / generate interface."""
