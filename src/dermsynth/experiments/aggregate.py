"""Aggregate a finished grid of classifier runs: tidy tables over seeds, comparisons with the best baseline, criteria.

Reads each run's ``metrics.json`` (and ``predictions.csv`` for the lesion bootstrap) and writes under
``<study>/aggregate/``:

    runs.csv         one row per condition x seed x part x metric (the raw numbers)
    table.csv        condition x part x metric: n, mean, std, 95 % t-interval over seeds
    comparisons.csv  each condition minus the best baseline: paired t-test over seeds and lesion-level bootstrap, and
                     the smallest difference each could detect (80 % power)
    criteria.csv     the seed's success criteria, filled with what was measured (met / not met / not measurable)
    ensembles.csv    each condition's seeds averaged into one classifier (dermsynth.experiments.ensemble), with
                     lesion-bootstrap intervals; the primary's minus the best baseline's goes into aggregate.json
    aggregate.json   the choices made (best baseline and why), mean confusion matrices, sweep ratios

The best baseline is chosen on the VALIDATION part; the test part is only ever reported.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from dermsynth.data.labels import CLASSES
from dermsynth.experiments.ensemble import seed_ensembles
from dermsynth.experiments.stats import (BOOT_METRICS, detectable_over_lesions, detectable_over_seeds,
                                        lesion_bootstrap_diff, mean_ci, paired_t, read_predictions)
from dermsynth.io import DataError, atomic_write_csv, atomic_write_json, read_json
from dermsynth.paths import RunPaths, StudyPaths

HEADLINE = ("macro_f1", "minority_f1", "balanced_accuracy", "accuracy", "auc_macro_ovr", "minority_auc")


@dataclass(frozen=True)
class Criterion:
    """One row of the seed's success criteria: ``metric`` must reach ``target`` (and ideally ``stretch``)."""

    name: str
    metric: str
    baseline: float | None  # the seed's starting point, for reference only
    target: float
    stretch: float
    higher_is_better: bool = True


SEED_CRITERIA: tuple[Criterion, ...] = (
    Criterion("macro-F1", "macro_f1", 0.62, 0.70, 0.75),
    Criterion("minority F1 (rare classes)", "minority_f1", 0.45, 0.55, 0.62),
    Criterion("accuracy", "accuracy", None, 0.82, 0.85),
    Criterion("FID (synthetic vs real test)", "fid", None, 30.0, 20.0, higher_is_better=False),
)


# ----------------------------------------------------------------------------------------------------------------------
# Reading runs
# ----------------------------------------------------------------------------------------------------------------------

def _read_metrics(run: Path) -> dict:
    path = RunPaths(run).metrics
    return read_json(path, "metrics file",
                     f"{path}: missing; the classifier run did not finish (rerun the study to resume it)")


def _flatten(part: Mapping[str, Any]) -> dict[str, float]:
    """Scalar metrics of one part plus per-class scores as ``f1_<class>``, ``recall_<class>``, ``auc_<class>``..."""
    out = {k: float(v) for k, v in part.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for c, pc in (part.get("per_class") or {}).items():
        for m in ("f1", "recall", "precision", "auc"):
            if m in pc and pc[m] is not None:
                out[f"{m}_{c}"] = float(pc[m])
    return out


def read_runs(runs: Mapping[str, Mapping[int, Path]]) -> dict[str, dict[int, dict]]:
    """condition -> seed -> the run's metrics.json, each file read once for every table of the stage."""
    return {cond: {int(seed): _read_metrics(Path(run)) for seed, run in sorted(by_seed.items())}
            for cond, by_seed in runs.items()}


def collect_runs(metrics: Mapping[str, Mapping[int, dict]]) -> pd.DataFrame:
    """Long table (condition, seed, part, metric, value) from every run's metrics (:func:`read_runs`)."""
    rows = []
    for cond, by_seed in metrics.items():
        for seed, m in sorted(by_seed.items()):
            for part in ("test", "val"):
                for metric, value in _flatten(m.get(part) or {}).items():
                    rows.append({"condition": cond, "seed": int(seed), "part": part, "metric": metric, "value": value})
            # a decision rule fitted on val (dermsynth.classify.decision): its tau, and the plain-argmax scores
            # as parts "test_argmax" / "val_argmax", so the table shows what the rule changed
            decision = m.get("decision") or {}
            if "tau" in decision:
                rows.append({"condition": cond, "seed": int(seed), "part": "val", "metric": "decision_tau",
                             "value": float(decision["tau"])})
            for part, scores in (decision.get("argmax") or {}).items():
                for metric, value in scores.items():
                    rows.append({"condition": cond, "seed": int(seed), "part": f"{part}_argmax", "metric": metric,
                                 "value": float(value)})
    return pd.DataFrame(rows, columns=["condition", "seed", "part", "metric", "value"])


def summarise(long: pd.DataFrame, level: float = 0.95) -> pd.DataFrame:
    """condition x part x metric -> n, mean, std, ci_lo, ci_hi (t-interval over seeds); condition order kept."""
    rows = []
    for (cond, part, metric), g in long.groupby(["condition", "part", "metric"], sort=False):
        rows.append({"condition": cond, "part": part, "metric": metric, **mean_ci(g["value"].tolist(), level)})
    return pd.DataFrame(rows, columns=["condition", "part", "metric", "n", "mean", "std", "ci_lo", "ci_hi"])


def pick_on_validation(table: pd.DataFrame, candidates: Sequence[str], role: str = "baseline"
                       ) -> tuple[str, dict[str, float]]:
    """The candidate with the highest mean VALIDATION macro-F1 (never test); ties go to the first listed.

    Used for the best baseline and, when ``primary_from`` is set, for the primary condition: whatever the study
    chooses, it chooses on the validation part, so the test part can still judge the choice.
    """
    val = table[(table["part"] == "val") & (table["metric"] == "macro_f1")].set_index("condition")["mean"]
    scores = {b: float(val[b]) for b in candidates if b in val.index and not math.isnan(val[b])}
    if not scores:
        raise DataError(f"no {role} among {list(candidates)} has a validation macro-F1; cannot pick the {role}")
    best = max(scores, key=lambda b: (scores[b], -list(candidates).index(b)))
    return best, scores


def _read_predictions(run: Path) -> pd.DataFrame | None:
    path = RunPaths(run).predictions
    return read_predictions(path) if path.is_file() else None


def _check_same_images(tables: Sequence[pd.DataFrame], files: Sequence[Path]) -> None:
    """The paired bootstrap resamples one test part for every run: a run scored on other images names its file."""
    ids = set(tables[0]["image_id"])
    for t, f in zip(tables[1:], files[1:]):
        if len(t) != len(tables[0]) or set(t["image_id"]) != ids:
            raise DataError(f"{f}: not the same test images as {files[0]} ({len(t)} rows against {len(tables[0])}); "
                            f"the paired bootstrap needs every run scored on one test part (rerun runs made on another "
                            f"split)")


def compare(long: pd.DataFrame, runs: Mapping[str, Mapping[int, Path]], reference: str, rare: Sequence[str],
            n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> pd.DataFrame:
    """Each condition minus ``reference`` on the test part: paired t-test over shared seeds and lesion bootstrap."""
    test = long[long["part"] == "test"]
    rows = []
    for cond in runs:
        if cond == reference:
            continue
        seeds = sorted(set(runs[cond]) & set(runs[reference]))
        boot: dict[str, dict[str, float]] = {}
        preds_a = [_read_predictions(Path(runs[cond][s])) for s in seeds]
        preds_b = [_read_predictions(Path(runs[reference][s])) for s in seeds]
        if seeds and all(p is not None for p in preds_a + preds_b):
            _check_same_images(preds_a + preds_b, [RunPaths(Path(runs[c][s])).predictions for c in (cond, reference)
                                                   for s in seeds])
            boot = lesion_bootstrap_diff(preds_a, preds_b, rare=rare, n_boot=n_boot, seed=seed, level=level)
        for metric in HEADLINE:
            a = test[(test["condition"] == cond) & (test["metric"] == metric)].set_index("seed")["value"]
            b = test[(test["condition"] == reference) & (test["metric"] == metric)].set_index("seed")["value"]
            common = [s for s in seeds if s in a.index and s in b.index]
            if not common:
                continue
            row = {"condition": cond, "reference": reference, "metric": metric,
                   **paired_t(a.loc[common].to_numpy(), b.loc[common].to_numpy(), level)}
            bm = boot.get(metric)
            row.update(boot_diff=bm["diff"] if bm else math.nan, boot_lo=bm["lo"] if bm else math.nan,
                       boot_hi=bm["hi"] if bm else math.nan, boot_p=bm["p"] if bm else math.nan,
                       n_lesions=bm["n_lesions"] if bm else 0)
            # the gains these seeds / these test lesions could have shown (80 % power): what "no difference" rules out
            row.update(detectable=detectable_over_seeds(row["diff_std"], row["n"], level),
                       boot_detectable=detectable_over_lesions(row["boot_lo"], row["boot_hi"], level))
            rows.append(row)
    cols = ["condition", "reference", "metric", "n", "diff", "diff_std", "diff_lo", "diff_hi", "t", "p",
            "boot_diff", "boot_lo", "boot_hi", "boot_p", "n_lesions", "detectable", "boot_detectable"]
    return pd.DataFrame(rows, columns=cols)


# ----------------------------------------------------------------------------------------------------------------------
# The seed's success criteria
# ----------------------------------------------------------------------------------------------------------------------

def find_fid(quality: Mapping[str, Any] | None) -> tuple[float | None, str]:
    """The standard (Inception-feature) FID from a quality.json, or None and why it is not measurable here.

    quality.json names every number by its extractor: ``FID`` only with Inception features, ``FD_<name>`` otherwise
    (see :func:`dermsynth.metrics.features.metric_name`). Pooled over the synthetic classes when available.
    """
    if not quality:
        return None, ("no quality.json of the generated samples in this study (FID is the generator's, measured on "
                      "all its samples: quality_on must list samples)")
    groups = {g: v for g, v in (quality.get("groups") or {}).items() if isinstance(v, dict) and "synthetic" in v}
    fid = {g: v["synthetic"]["FID"] for g, v in groups.items() if "FID" in v["synthetic"]}
    if fid:
        g = "pooled" if "pooled" in fid else max(fid, key=fid.get)
        floor = groups[g].get("floor", {}).get("FID")
        note = f"Inception FID, {g} (N={groups[g].get('N')}; real-vs-real floor {_num(floor)}); FID is biased upward at small N"
        return float(fid[g]), note
    extractor = quality.get("extractor", "unknown")
    why = f"no Inception weights here (features: {extractor}), so no standard FID"
    fd = {g: (k, v["synthetic"][k], v.get("floor", {}).get(k)) for g, v in groups.items()
          for k in v["synthetic"] if k.startswith("FD_") and not k.endswith("_std")}
    if fd:
        g = "pooled" if "pooled" in fd else next(iter(fd))
        k, val, floor = fd[g]
        why += f"; {k} ({g}) = {_num(val)} against a real-vs-real floor of {_num(floor)} is not FID and not comparable to 30 / 20"
    return None, why


def _num(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)) else "n/a"


def criteria_table(table: pd.DataFrame, primary: str, quality: Mapping[str, Any] | None,
                   criteria: Sequence[Criterion] = SEED_CRITERIA) -> pd.DataFrame:
    """Fill the seed's criteria with the primary condition's test means (and the standard FID, when measurable)."""
    test = table[(table["part"] == "test") & (table["condition"] == primary)].set_index("metric")
    rows = []
    for c in criteria:
        row = {"criterion": c.name, "metric": c.metric, "seed_baseline": c.baseline, "target": c.target,
               "stretch": c.stretch, "direction": ">=" if c.higher_is_better else "<", "condition": primary,
               "measured": math.nan, "ci_lo": math.nan, "ci_hi": math.nan}
        if c.metric == "fid":
            value, why = find_fid(quality)
            row["condition"] = "generator"
            if value is None:
                rows.append({**row, "status": "not measurable here", "note": why})
                continue
            row["measured"] = value
            note = why
        else:
            if c.metric not in test.index or math.isnan(test.loc[c.metric, "mean"]):
                rows.append({**row, "status": "not measurable here",
                             "note": f"condition {primary!r} has no test {c.metric} (not run?)"})
                continue
            r = test.loc[c.metric]
            row.update(measured=float(r["mean"]), ci_lo=float(r["ci_lo"]), ci_hi=float(r["ci_hi"]))
            note = f"mean over {int(r['n'])} seed(s) of {primary}"
        v = row["measured"]
        ok = (lambda t: v >= t) if c.higher_is_better else (lambda t: v < t)
        status = "met (stretch)" if ok(c.stretch) else "met" if ok(c.target) else "not met"
        if c.higher_is_better and status != "not met" and not math.isnan(row["ci_lo"]) and row["ci_lo"] < c.target:
            note += "; the CI's lower end is below the target"
        rows.append({**row, "status": status, "note": note})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------------------------------

def mean_confusions(metrics: Mapping[str, Mapping[int, dict]]) -> dict[str, list[list[float]]]:
    """Row-normalised test confusion matrix per condition, averaged over seeds (for the report)."""
    out = {}
    for cond, by_seed in metrics.items():
        mats = [np.asarray(m["test"]["confusion_norm"], dtype=np.float64)
                for m in by_seed.values() if "confusion_norm" in m.get("test", {})]
        if mats:
            out[cond] = np.nan_to_num(np.mean(mats, axis=0)).tolist()
    return out


def aggregate(study: str | Path, runs: Mapping[str, Mapping[int, Path]], baselines: Sequence[str], primary: str,
              rare: Sequence[str] = ("df", "vasc", "mel"), ratios: Mapping[str, float] | None = None,
              quality: Mapping[str, Any] | None = None, n_boot: int = 1000, seed: int = 0,
              synthetic: Mapping[str, str] | None = None, primary_from: Sequence[str] = (),
              twins: Mapping[str, str] | None = None, units: Mapping[str, str] | None = None,
              sweep_copies: Sequence[str] = ()) -> Path:
    """Write the aggregate tables of a study (see module docstring); returns ``<study>/aggregate``.

    ``runs``: condition -> seed -> classifier run folder; ``baselines``: the real-only conditions the best baseline is
    chosen from (by validation macro-F1); ``primary``: the condition the criteria are measured on, unless
    ``primary_from`` lists candidates, in which case the primary is the one of them with the best validation
    macro-F1 (e.g. synthetic images added to each cheap baseline's recipe); ``ratios``: the
    sweep's condition -> synthetic:real ratio; ``quality``: the raw samples' quality.json (for the FID criterion);
    ``synthetic``: condition -> the synthetic set it used, ``twins``: filtered condition -> the same recipe on
    unfiltered images, ``units``: every planned unit -> its hash, and ``sweep_copies``: the conditions the ratio sweep
    added to the config's own, all recorded for the report (which shows a stage's folder only when its unit is among
    ``units``).
    """
    out = StudyPaths(study).aggregate
    metrics = read_runs(runs)
    long = collect_runs(metrics)
    if long.empty:
        raise DataError(f"{study}: no finished classifier runs to aggregate")
    table = summarise(long)
    best, val_scores = pick_on_validation(table, baselines)
    primary_scores: dict[str, float] = {}
    if primary_from:
        primary, primary_scores = pick_on_validation(table, primary_from, role="primary")
    comparisons = compare(long, runs, best, rare, n_boot=n_boot, seed=seed)
    criteria = criteria_table(table, primary, quality)
    ensembles, ensemble_comparison = seed_ensembles(runs, rare, primary, best, n_boot=n_boot, seed=seed)
    atomic_write_csv(out / "ensembles.csv", ensembles)
    atomic_write_csv(out / "runs.csv", long)
    atomic_write_csv(out / "table.csv", table)
    atomic_write_csv(out / "comparisons.csv", comparisons)
    atomic_write_csv(out / "criteria.csv", criteria)
    atomic_write_json(out / "aggregate.json", {
        "conditions": list(runs),
        "seeds": {c: sorted(int(s) for s in by_seed) for c, by_seed in runs.items()},
        "runs": {c: {str(s): str(p) for s, p in by_seed.items()} for c, by_seed in runs.items()},
        "primary": primary,
        "primary_from": list(primary_from),
        "primary_rule": ("highest mean validation macro-F1 among primary_from (test never used to choose)"
                         if primary_from else "fixed by the study config"),
        "primary_val_macro_f1": primary_scores,
        "baselines": list(baselines),
        "best_baseline": best,
        "best_baseline_rule": "highest mean validation macro-F1 among the baselines (test never used to choose)",
        "baseline_val_macro_f1": val_scores,
        "rare_classes": list(rare),
        "ratios": dict(ratios or {}),
        "synthetic": dict(synthetic or {}),  # condition -> which synthetic set it trained on (none/filtered/unfiltered)
        "filter_twins": dict(twins or {}),  # filtered condition -> its unfiltered twin (what the filter buys)
        # the study's planned units and their hashes: a folder of a unit not listed here (or since redone with another
        # hash) is left over from another configuration. None: not recorded (aggregate called outside a study)
        "units": dict(units) if units is not None else None,
        "sweep_copies": list(sweep_copies),  # conditions expand_conditions added for the ratio sweep
        "n_boot": n_boot,
        "ensemble_comparison": ensemble_comparison,  # primary's seed ensemble minus the best baseline's
        "confusion_norm": mean_confusions(metrics),
        "train_counts": {c: by_seed[min(by_seed)].get("train_counts", {}) for c, by_seed in metrics.items() if by_seed},
        "classes": list(CLASSES),
    })
    return out


def load_aggregate(study: str | Path) -> dict[str, Any]:
    """The aggregate outputs of a study as DataFrames / dict (for the report)."""
    agg = StudyPaths(study).aggregate
    info = read_json(agg / "aggregate.json", "aggregate record",
                     f"{agg}: no aggregate.json; run the study (or its aggregate step) first")
    read = lambda name: pd.read_csv(agg / name) if (agg / name).is_file() else pd.DataFrame()  # noqa: E731
    return {"info": info, "runs": read("runs.csv"),
            "table": read("table.csv"), "comparisons": read("comparisons.csv"), "criteria": read("criteria.csv"),
            "ensembles": read("ensembles.csv")}


__all__ = ["aggregate", "load_aggregate", "read_runs", "collect_runs", "summarise", "pick_on_validation", "compare",
           "criteria_table", "find_fid", "SEED_CRITERIA", "Criterion", "BOOT_METRICS"]
