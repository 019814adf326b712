"""Multi-process training through accelerate: two CPU processes (gloo) train a few steps in lock-step."""
from __future__ import annotations

import json
import sys

import pandas as pd
import pytest

from gloo import run_gloo
from test_generate_run import REPO, make_random_split


@pytest.mark.slow
def test_two_cpu_processes_train_in_sync(tmp_path):
    split = make_random_split(tmp_path / "data")
    run = tmp_path / "gen"
    cmd = [sys.executable, "-m", "dermsynth.cli", "train-gen", "-c", str(REPO / "configs" / "gen_tiny.yaml"),
           "--out", str(run), "--set", f"data.split={split}", "--set", "data.image_size=16",
           "--set", "model.size=test", "--set", "train.steps=3", "--set", "train.batch_size=8",
           "--set", "train.log_every=1", "--set", "train.checkpoint_every=3", "--set", "train.validation_steps=2",
           "--set", "train.validation_per_class=1", "--set", "train.device=cpu"]
    run_gloo(cmd, tmp_path / "cache", timeout=600)
    info = json.loads((run / "generator.json").read_text())
    assert info["world_size"] == 2 and info["ranks_in_sync"] is True
    ckpt = run / "checkpoints" / "step_00000003"
    # one checkpoint, written once, with the RNG streams of both processes
    assert sorted(p.name for p in ckpt.glob("rng_rank*.pt")) == ["rng_rank0.pt", "rng_rank1.pt"]
    assert json.loads((ckpt / "state.json").read_text())["world_size"] == 2
    summary = pd.read_csv(run / "summary.csv")
    assert summary["step"].tolist() == [1, 2, 3]  # logged by the main process only
    assert "2 process(es) x batch 4" in (run / "log.txt").read_text()
