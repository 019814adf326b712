"""Seed ensembles: each condition's seeds averaged into one classifier and scored once on the test part.

Why: the study's main numbers are means over seeds (how good one training run of a recipe is). A user who deploys a
recipe can also average its seeds' probabilities, which removes most of the seed noise and is the strongest model a
condition yields for 3x the inference. Scored from the runs' own ``val_predictions.csv`` / ``predictions.csv``: no
model is loaded. The decision rule is the runs' own (``eval.decision``), refitted on the ensemble's VALIDATION
probabilities; the test part is only scored.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from dermsynth.classify.config import ClfConfig
from dermsynth.classify.decision import decide, fit_decision
from dermsynth.config import load_config
from dermsynth.data.labels import CLASSES
from dermsynth.experiments.stats import BOOT_METRICS, lesion_bootstrap_diff, read_predictions
from dermsynth.io import DataError, read_json
from dermsynth.metrics.classification import classification_metrics
from dermsynth.paths import RunPaths

PROBS = [f"prob_{c}" for c in CLASSES]
SCORED = BOOT_METRICS  # the metrics the study's comparisons bootstrap


def _mean_probs(files: Sequence[Path]) -> pd.DataFrame:
    """The rows of several prediction tables of the same images (any order), probabilities averaged."""
    tables = [read_predictions(f).set_index("image_id") for f in files]
    ref = tables[0]
    for f, t in zip(files[1:], tables[1:]):
        if set(t.index) != set(ref.index):
            raise DataError(f"{f}: not the same images as {files[0]}; a seed ensemble needs one test part")
    out = ref[["group_id", "label"]].copy()
    out[PROBS] = np.mean([t.loc[ref.index, PROBS].to_numpy(np.float64) for t in tables], axis=0)
    return out.reset_index()


def _train_counts(metrics: Path) -> dict:
    """The run's training images per class (metrics.json ``train_counts``): the decision rule's prior needs each
    class's real ones. A missing or incomplete file raises DataError naming it."""
    m = read_json(metrics, "metrics file",
                  f"{metrics}: missing; the classifier run did not finish (rerun the study to resume it)")
    counts = m.get("train_counts") if isinstance(m, dict) else None
    missing = [c for c in CLASSES if not isinstance(counts, dict) or "real" not in (counts.get(c) or {})]
    if missing:
        raise DataError(f"{metrics}: train_counts has no real-image count for {missing}; the seed ensemble's decision "
                        f"rule needs every class's (rerun the run to rewrite its metrics.json)")
    return counts


def seed_ensemble(by_seed: Mapping[int, Path], rare: Sequence[str], n_boot: int = 1000,
                  seed: int = 0) -> tuple[dict, pd.DataFrame] | None:
    """(scores, predictions table) of one condition's seed ensemble; None without >= 2 seeds with predictions."""
    runs = [RunPaths(Path(r)) for _, r in sorted(by_seed.items())]
    if len(runs) < 2 or not all(p.predictions.is_file() and p.val_predictions.is_file() for p in runs):
        return None
    test, val = _mean_probs([p.predictions for p in runs]), _mean_probs([p.val_predictions for p in runs])
    cfg = load_config(ClfConfig, runs[0].config)
    counts = _train_counts(runs[0].metrics)
    rule = fit_decision(cfg.eval.decision, counts, val[PROBS].to_numpy(), val["label"].map(CLASSES.index).to_numpy(),
                        cfg.eval.decision_taus)
    offsets, tau = rule.offsets, rule.tau
    probs = test[PROBS].to_numpy()
    m = classification_metrics(test["label"], probs, test["group_id"], rare=rare, n_boot=n_boot, seed=seed,
                               offsets=offsets)
    scores = {"n_seeds": len(runs), "decision": cfg.eval.decision, "tau": tau,
              **{k: m[k] for k in SCORED}, "ci": {k: m["ci"].get(k, [math.nan, math.nan]) for k in SCORED}}
    table = test.assign(pred=[CLASSES[i] for i in decide(probs, offsets)])
    return scores, table


def seed_ensembles(runs: Mapping[str, Mapping[int, Path]], rare: Sequence[str], primary: str, reference: str,
                   n_boot: int = 1000, seed: int = 0) -> tuple[pd.DataFrame, dict]:
    """Every condition's seed ensemble as long rows, and the primary's ensemble minus the reference's (lesion
    bootstrap; {} when either has no ensemble)."""
    rows, tables = [], {}
    for cond, by_seed in runs.items():
        res = seed_ensemble(by_seed, rare, n_boot, seed)
        if res is None:
            continue
        scores, tables[cond] = res
        for k in SCORED:
            lo, hi = scores["ci"][k]
            rows.append({"condition": cond, "n_seeds": scores["n_seeds"], "tau": scores["tau"], "metric": k,
                         "value": scores[k], "ci_lo": lo, "ci_hi": hi})
    comparison: dict = {}
    if primary in tables and reference in tables and primary != reference:
        d = lesion_bootstrap_diff([tables[primary]], [tables[reference]], rare=rare, n_boot=n_boot, seed=seed)
        comparison = {"condition": primary, "reference": reference, "metrics": d}
    cols = ["condition", "n_seeds", "tau", "metric", "value", "ci_lo", "ci_hi"]
    return pd.DataFrame(rows, columns=cols), comparison


__all__ = ["seed_ensemble", "seed_ensembles"]
