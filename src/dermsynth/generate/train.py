"""``dermsynth train-gen``: train the generator named by ``cfg.kind`` on the train part of ``cfg.data.split``."""
from __future__ import annotations

from pathlib import Path

from dermsynth.config import ConfigError
from dermsynth.generate.config import GenConfig


def train_generator(cfg: GenConfig, out: str | Path, resume: str | Path | None = None) -> Path:
    """Train (or with ``resume="latest"`` / a checkpoint path, continue) a generator run in ``out``; returns ``out``."""
    if cfg.kind == "scratch":
        from dermsynth.generate.scratch_train import train_scratch

        return train_scratch(cfg, out, resume)
    if cfg.kind == "sd15_lora":
        from dermsynth.generate.sd15.train import train_sd_lora

        return train_sd_lora(cfg, out, resume)
    raise ConfigError(f"kind: unknown generator {cfg.kind!r}; use 'scratch' or 'sd15_lora'")
