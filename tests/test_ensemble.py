"""Seed ensembles: the seeds' probabilities averaged per image, scored with the runs' own decision rule."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score

from dermsynth.classify.config import ClfConfig
from dermsynth.classify.decision import class_prior, fit_prior_shift
from dermsynth.config import save_config
from dermsynth.data.labels import CLASSES
from dermsynth.experiments.ensemble import seed_ensemble, seed_ensembles
from dermsynth.io import DataError

K = len(CLASSES)


def _table(rng: np.random.Generator, y: np.ndarray, skill: float) -> pd.DataFrame:
    logits = rng.normal(size=(len(y), K)) + skill * np.eye(K)[y]
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    d = pd.DataFrame({"image_id": [f"i{i:03d}" for i in range(len(y))], "group_id": [f"g{i // 2}" for i in range(len(y))],
                      "label": [CLASSES[i] for i in y], "source": "real"})
    d[[f"prob_{c}" for c in CLASSES]] = p
    d["pred"] = [CLASSES[i] for i in p.argmax(1)]
    return d


def _runs(root: Path, n_seeds: int, skill: float, decision: str = "argmax", seed: int = 0) -> dict[int, Path]:
    rng = np.random.default_rng(seed)
    y_test, y_val = rng.integers(0, K, 140), rng.integers(0, K, 120)
    counts = {c: {"real": 10 * (i + 1) ** 2, "synthetic": 0} for i, c in enumerate(CLASSES)}
    runs = {}
    for s in range(n_seeds):
        run = root / f"seed{s}"
        run.mkdir(parents=True)
        cfg = ClfConfig()
        cfg.eval.decision = decision
        save_config(cfg, run / "config.yaml")
        (run / "metrics.json").write_text(json.dumps({"train_counts": counts}))
        test = _table(rng, y_test, skill)
        test.sample(frac=1.0, random_state=s).to_csv(run / "predictions.csv", index=False)  # any row order
        _table(rng, y_val, skill).to_csv(run / "val_predictions.csv", index=False)
        runs[s] = run
    return runs


def _mean(runs: dict[int, Path], name: str) -> pd.DataFrame:
    tabs = [pd.read_csv(r / name).set_index("image_id").sort_index() for r in runs.values()]
    out = tabs[0][["label"]].copy()
    out[[f"prob_{c}" for c in CLASSES]] = np.mean([t[[f"prob_{c}" for c in CLASSES]].to_numpy() for t in tabs], 0)
    return out


def test_ensemble_averages_the_seeds_per_image(tmp_path):
    runs = _runs(tmp_path, 3, skill=1.0)
    scores, table = seed_ensemble(runs, rare=["df", "vasc", "mel"], n_boot=50)
    want = _mean(runs, "predictions.csv")
    got = table.set_index("image_id").sort_index()
    assert np.allclose(got[[f"prob_{c}" for c in CLASSES]].to_numpy(), want[[f"prob_{c}" for c in CLASSES]].to_numpy())
    pred = want[[f"prob_{c}" for c in CLASSES]].to_numpy().argmax(1)
    y = want["label"].map(CLASSES.index).to_numpy()
    assert scores["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro", labels=np.unique(np.r_[y, pred])))
    assert scores["n_seeds"] == 3 and np.isnan(scores["tau"]) and scores["ci"]["macro_f1"][0] <= scores["macro_f1"]
    # averaging seeds of a noisy classifier beats the typical single seed
    singles = [f1_score(y, pd.read_csv(r / "predictions.csv").set_index("image_id").sort_index()
                        [[f"prob_{c}" for c in CLASSES]].to_numpy().argmax(1), average="macro") for r in runs.values()]
    assert scores["macro_f1"] > np.mean(singles)


def test_ensemble_refits_the_prior_shift_on_its_validation_probabilities(tmp_path):
    runs = _runs(tmp_path, 2, skill=1.5, decision="prior_shift")
    scores, table = seed_ensemble(runs, rare=["df"], n_boot=0)
    val = _mean(runs, "val_predictions.csv")
    prior = class_prior([10 * (i + 1) ** 2 for i in range(K)])
    tau, _ = fit_prior_shift(val[[f"prob_{c}" for c in CLASSES]].to_numpy(), val["label"].map(CLASSES.index).to_numpy(),
                             prior)
    assert scores["decision"] == "prior_shift" and scores["tau"] == tau
    y, pred = table["label"].map(CLASSES.index), table["pred"].map(CLASSES.index)
    assert scores["accuracy"] == pytest.approx((y == pred).mean())


def test_ensembles_need_two_seeds_and_one_test_part(tmp_path):
    assert seed_ensemble(_runs(tmp_path / "one", 1, skill=1.0), rare=["df"]) is None
    runs = _runs(tmp_path / "two", 2, skill=1.0)
    t = pd.read_csv(runs[1] / "predictions.csv")
    t.iloc[1:].to_csv(runs[1] / "predictions.csv", index=False)
    with pytest.raises(DataError, match="not the same images"):
        seed_ensemble(runs, rare=["df"])


def test_ensemble_names_a_run_file_it_cannot_use(tmp_path):
    """A missing probability column or a metrics.json without train_counts: a DataError naming the file."""
    runs = _runs(tmp_path, 2, skill=1.0)
    val = pd.read_csv(runs[1] / "val_predictions.csv")
    val.drop(columns=["prob_vasc"]).to_csv(runs[1] / "val_predictions.csv", index=False)
    with pytest.raises(DataError, match=rf"{re.escape(str(runs[1] / 'val_predictions.csv'))}: missing column\(s\) \['prob_vasc'\]"):
        seed_ensemble(runs, rare=["df"])
    val.to_csv(runs[1] / "val_predictions.csv", index=False)
    (runs[0] / "metrics.json").write_text(json.dumps({"test": {}}))
    with pytest.raises(DataError, match=rf"{re.escape(str(runs[0] / 'metrics.json'))}: train_counts has no real-image count"):
        seed_ensemble(runs, rare=["df"])


def test_primary_minus_reference_ensemble(tmp_path):
    strong, weak = _runs(tmp_path / "a", 2, skill=3.0, seed=1), _runs(tmp_path / "b", 2, skill=0.5, seed=1)
    rows, comp = seed_ensembles({"hybrid": strong, "base": weak}, rare=["df", "vasc", "mel"], primary="hybrid",
                                reference="base", n_boot=100)
    assert set(rows["condition"]) == {"hybrid", "base"} and len(rows) == 12
    v = rows.set_index(["condition", "metric"])["value"]
    d = comp["metrics"]["macro_f1"]
    assert d["diff"] == pytest.approx(v[("hybrid", "macro_f1")] - v[("base", "macro_f1")]) and d["lo"] > 0
    assert seed_ensembles({"hybrid": strong}, rare=["df"], primary="hybrid", reference="base", n_boot=10)[1] == {}
