"""Generators: class-conditional diffusion from scratch, Stable Diffusion 1.5 + LoRA + textual inversion, sampling."""
