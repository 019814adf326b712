"""Evaluation levers on a finished study: test-time flips (TTA) and the validation-fitted decision rule.

    python bench/eval_levers.py <study folder> [--device auto] [--out levers.json]

Neither lever retrains anything: each classifier's best checkpoint scores the study's val and test parts twice, as
they are and averaged over the 8 flips/rotations (``eval.tta``), and each set of probabilities is turned into
decisions twice, by argmax and by the prior shift fitted on that run's validation probabilities
(``eval.decision: prior_shift``). It prints, per run, test macro-F1 / minority F1 / minority AUC of the four
variants, then, per variant, the study's primary minus its best baseline (the study's own validation choices) as a
lesion-bootstrap difference averaged over seeds. Both levers are chosen on validation only; the test part is only
scored.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dermsynth.classify.config import ClfConfig
from dermsynth.classify.decision import decide, fit_decision
from dermsynth.classify.predict import load_classifier, predict_probs
from dermsynth.config import load_config
from dermsynth.data.cache import build_cache
from dermsynth.data.labels import CLASSES
from dermsynth.data.split import load_split
from dermsynth.experiments.stats import lesion_bootstrap_diff
from dermsynth.metrics.classification import classification_metrics
from dermsynth.paths import RunPaths, StudyPaths

VARIANTS = ("argmax", "rule", "tta+argmax", "tta+rule")
SHOWN = ("macro_f1", "minority_f1", "balanced_accuracy", "minority_auc")


def _table(part: pd.DataFrame, probs: np.ndarray, pred: np.ndarray) -> pd.DataFrame:
    """A predictions.csv-shaped table (what the study's paired bootstrap reads)."""
    out = part[["image_id", "group_id", "label"]].reset_index(drop=True).copy()
    for i, c in enumerate(CLASSES):
        out[f"prob_{c}"] = probs[:, i]
    out["pred"] = [CLASSES[i] for i in pred]
    return out


def run_levers(run: Path, parts: dict[str, pd.DataFrame], images: dict[str, np.ndarray], rare: list[str],
               device: torch.device) -> dict:
    """Test scores and prediction tables of the four variants for one classifier run."""
    model, norm, cfg, _ = load_classifier(run, device)
    metrics = json.loads(RunPaths(run).metrics.read_text())
    y_val = parts["val"]["label"].map(CLASSES.index).to_numpy()
    out: dict = {"run": str(run), "scores": {}, "tables": {}, "tau": {}}
    for tta in (False, True):
        probs = {p: predict_probs(model, torch.from_numpy(np.ascontiguousarray(images[p])), norm, device,
                                  batch_size=256, amp=cfg.train.amp, channels_last=cfg.train.channels_last,
                                  tta=tta).cpu().numpy().astype(np.float64) for p in ("val", "test")}
        fitted = fit_decision("prior_shift", metrics["train_counts"], probs["val"], y_val, cfg.eval.decision_taus)
        tau = fitted.tau
        for rule, offsets in (("argmax", None), ("rule", fitted.offsets)):
            name = f"tta+{rule}" if tta else rule
            test = parts["test"]
            sc = classification_metrics(test["label"], probs["test"], test["group_id"], rare=rare, n_boot=0,
                                        offsets=offsets)
            out["scores"][name] = {m: sc[m] for m in SHOWN}
            out["tables"][name] = _table(test, probs["test"], decide(probs["test"], offsets))
            out["tau"][name] = tau if rule == "rule" else None
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", type=Path)
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--out", type=Path, help="also write the scores and comparisons as JSON here")
    a = p.parse_args()
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))
    paths = StudyPaths(a.study)
    info = json.loads((paths.aggregate / "aggregate.json").read_text())
    rare = info["rare_classes"]
    split = load_split(paths.split)
    parts = {q: split.part(q) for q in ("val", "test")}
    runs = {c: {int(s): Path(r) for s, r in by_seed.items()} for c, by_seed in info["runs"].items()}
    cache: dict[int, dict[str, np.ndarray]] = {}
    results: dict[str, dict[int, dict]] = {}
    for cond, by_seed in runs.items():
        for seed, run in sorted(by_seed.items()):
            size = load_config(ClfConfig, RunPaths(run).config).data.image_size
            if size not in cache:
                c = build_cache(split.manifest, size)
                cache[size] = {q: c.take(parts[q]["image_id"]) for q in parts}
            results.setdefault(cond, {})[seed] = run_levers(run, parts, cache[size], rare, device)

    print(f"test part, {len(parts['test'])} images; variants: {', '.join(VARIANTS)} (tau of the rule, plain / tta)")
    for m in SHOWN:
        print(f"\n{m}")
        for cond, by_seed in results.items():
            for seed, r in sorted(by_seed.items()):
                vals = "  ".join(f"{r['scores'][v][m]:.3f}" for v in VARIANTS)
                print(f"  {cond:22s} seed {seed}  {vals}   tau {r['tau']['rule']:+.2f} / {r['tau']['tta+rule']:+.2f}")
    best, primary = info["best_baseline"], info["primary"]
    seeds = sorted(set(results.get(best, {})) & set(results.get(primary, {})))
    comparisons = {}
    if seeds and best != primary:
        print(f"\n{primary} minus {best} (seeds {seeds}), lesion bootstrap 95 % CI:")
        for v in VARIANTS:
            d = lesion_bootstrap_diff([results[primary][s]["tables"][v] for s in seeds],
                                      [results[best][s]["tables"][v] for s in seeds], rare=rare, n_boot=a.n_boot)
            comparisons[v] = {m: d[m] for m in SHOWN if m in d}
            print(f"  {v:11s} " + "  ".join(f"{m} {d[m]['diff']:+.3f} [{d[m]['lo']:+.3f}, {d[m]['hi']:+.3f}]"
                                             for m in SHOWN if m in d))
    if a.out:
        a.out.write_text(json.dumps({"scores": {c: {s: {"scores": r["scores"], "tau": r["tau"]} for s, r in bs.items()}
                                                for c, bs in results.items()}, "comparisons": comparisons}, indent=2))


if __name__ == "__main__":
    main()
