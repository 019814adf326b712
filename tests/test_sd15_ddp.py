"""SD LoRA training in two CPU processes (gloo) through accelerate: gradients averaged, one checkpoint with both
processes' random streams, logs and validation from the main process only."""
from __future__ import annotations

import json
import sys

import pandas as pd
import pytest
import torch

from gloo import run_gloo
from test_sd15_pipeline import make_toy


@pytest.mark.slow
def test_two_cpu_processes_train_in_sync(tmp_path):
    from dermsynth.config import ConfigError, load_config
    from dermsynth.generate.config import GenConfig
    from dermsynth.generate.sd15.train import train_sd_lora

    toy = make_toy(tmp_path / "toy")
    run = tmp_path / "run"
    sets = {"kind": "sd15_lora", "data.split": toy["split"], "sd.base": toy["base"], "sd.resolution": 32,
            "sd.steps": 2, "sd.batch_size": 1, "sd.warmup_steps": 0, "sd.mixed_precision": "'no'", "sd.device": "cpu",
            "sd.validate_every": 0, "sd.validation_per_class": 1, "sd.heldout_images": 3,
            "sd.heldout_timesteps": "[500]",
            "sd.sample_steps": 2, "sd.checkpoint_every": 1, "sd.checkpoint_minutes": 0, "sd.keep_checkpoints": 1,
            "sd.log_every": 1, "sd.gradient_checkpointing": False, "sd.lr_unet": 0.01, "sd.lr_tokens": 0.01}
    cmd = [sys.executable, "-m", "dermsynth.cli", "train-gen", "--out", str(run)]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    run_gloo(cmd, tmp_path / "cache", timeout=900)

    ckpt = run / "checkpoints" / "step_00000002"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002"]
    assert sorted(p.name for p in ckpt.glob("rng_rank*.pt")) == ["rng_rank0.pt", "rng_rank1.pt"]
    r0, r1 = (torch.load(ckpt / f"rng_rank{r}.pt", weights_only=True)["gen"] for r in (0, 1))
    assert not torch.equal(r0, r1)  # each process drew its own batches
    assert torch.load(ckpt / "training_state.pt", weights_only=True)["world_size"] == 2
    assert json.loads((run / "generator.json").read_text())["world_size"] == 2
    assert pd.read_csv(run / "summary.csv")["step"].tolist() == [2]  # written once, by the main process
    assert "2 process(es) x batch 1" in (run / "log.txt").read_text()
    # a single process cannot continue the two streams exactly, so it is refused
    cfg = load_config(GenConfig, run / "config.yaml", ["sd.steps=3"])
    with pytest.raises(ConfigError, match="2 process"):
        train_sd_lora(cfg, run, resume="latest")
