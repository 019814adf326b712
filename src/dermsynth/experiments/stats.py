"""Statistics over seeds and over test lesions: means with t-intervals, paired t-tests, a lesion-level paired bootstrap.

Two sources of noise decide whether one condition beats another. Training noise (initialisation, data order) is
measured by repeating runs over seeds: a paired t-test on per-seed differences. Test-set noise (which lesions happen
to be in the test part) is measured by resampling test *lesions* with replacement, the same resample for both
conditions, so that the shared difficulty of a resample cancels out of the difference. Images of one lesion are never
treated as independent: HAM10000 has up to six photos of a lesion.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import optimize, special
from scipy import stats as sps

from dermsynth.data.labels import CLASSES
from dermsynth.io import DataError
from dermsynth.metrics.classification import (mean_auc, scores_from_confusion, weighted_auc_per_class,
                                              weighted_confusion)

# Metrics the bootstrap can recompute from a confusion matrix (the headline metrics of the report).
BOOT_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "minority_f1", "auc_macro_ovr", "minority_auc")


# ----------------------------------------------------------------------------------------------------------------------
# Over seeds
# ----------------------------------------------------------------------------------------------------------------------

def mean_ci(values: Sequence[float], level: float = 0.95) -> dict[str, float]:
    """Mean, sample std (ddof=1) and the t-distribution confidence interval of the mean; NaN where n < 2."""
    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    n = len(x)
    if n == 0:
        return {"n": 0, "mean": math.nan, "std": math.nan, "ci_lo": math.nan, "ci_hi": math.nan}
    mean = float(x.mean())
    if n < 2:
        return {"n": 1, "mean": mean, "std": math.nan, "ci_lo": math.nan, "ci_hi": math.nan}
    std = float(x.std(ddof=1))
    half = float(sps.t.ppf(0.5 + level / 2, df=n - 1)) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci_lo": mean - half, "ci_hi": mean + half}


def paired_t(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> dict[str, float]:
    """Paired t-test of a - b over seeds (same seed = same pair): mean difference, its t-interval, t and p."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired samples need equal length, got {len(a)} and {len(b)}")
    d = a - b
    out = mean_ci(d, level)
    out = {"n": out["n"], "diff": out["mean"], "diff_std": out["std"], "diff_lo": out["ci_lo"], "diff_hi": out["ci_hi"]}
    if len(d) < 2 or np.allclose(d, d[0]):
        # scipy returns NaN (or warns) for zero variance; an identical difference on every seed has no t statistic
        out.update(t=math.nan, p=math.nan)
    else:
        res = sps.ttest_rel(a, b)
        out.update(t=float(res.statistic), p=float(res.pvalue))
    return out


def _noncentrality(n: int, level: float, power: float) -> float:
    """The noncentrality at which a two-sided paired t-test over n seeds reaches ``power`` (about a millisecond)."""
    df = n - 1
    crit = float(sps.t.ppf(0.5 + level / 2, df))
    # P(|T| > crit) averaged over the variance estimate, as an integral over its chi-square quantiles u in (0, 1):
    # bounded and smooth for any n, so a fixed Gauss-Legendre rule does (scipy's nct returns NaN in parts of this range)
    nodes, weights = np.polynomial.legendre.leggauss(256)
    u = (nodes + 1) / 2
    s = crit * np.sqrt(sps.chi2.ppf(u, df) / df)

    def shortfall(ncp: float) -> float:  # the power at noncentrality ncp, minus the power asked for
        tails = 0.5 * special.erfc((s - ncp) / math.sqrt(2)) + 0.5 * special.erfc((s + ncp) / math.sqrt(2))
        return float(weights @ tails) / 2 - power

    hi = 1.0
    while shortfall(hi) < 0:  # bracket the root by doubling; power -> 1 as ncp grows, so this ends
        hi *= 2
        if hi > 1e6:
            raise ArithmeticError(f"no noncentrality reaches power {power} with n={n}")
    return float(optimize.brentq(shortfall, hi / 2 if hi > 1 else 0.0, hi))


def detectable_over_seeds(diff_std: float, n: int, level: float = 0.95, power: float = 0.8) -> float:
    """The smallest true mean difference that a two-sided paired t-test over ``n`` seeds (at ``1 - level``) finds
    with probability ``power``, when per-seed differences scatter with std ``diff_std``; NaN where n < 2.

    Exact for normal differences (the t statistic's power integrated over its variance estimate); the textbook
    (t_a + t_b) * sd / sqrt(n) shortcut is 14 % optimistic at n = 2 and 5 % at n = 3. Why report it: "not
    distinguishable" means little unless the reader sees which gains this many seeds could have shown, e.g. whether
    a goal of +0.08 was within reach.
    """
    if n < 2 or not math.isfinite(diff_std):
        return math.nan
    return _noncentrality(int(n), float(level), float(power)) * diff_std / math.sqrt(n)


def detectable_over_lesions(lo: float, hi: float, level: float = 0.95, power: float = 0.8) -> float:
    """The same for the lesion bootstrap: the difference a two-sided test at ``1 - level`` finds with probability
    ``power``, from the width of the bootstrap's ``level`` interval [lo, hi] (normal approximation: its standard
    error is the width over 2 z). More seeds shrink it, down to a floor that the test part's lesions set."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return math.nan
    z = float(sps.norm.ppf(0.5 + level / 2))
    return (z + float(sps.norm.ppf(power))) * (hi - lo) / (2 * z)


PRED_COLUMNS = ("image_id", "group_id", "label", *(f"prob_{c}" for c in CLASSES))


def read_predictions(path: Path) -> pd.DataFrame:
    """A run's predictions.csv (or val_predictions.csv), checked for what the bootstrap and the seed ensembles read:
    the columns, and labels (and decisions) that are classes. A bad file raises DataError naming it, not a KeyError
    deep inside the statistics."""
    try:
        pred = pd.read_csv(path, dtype={"image_id": str, "group_id": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: unreadable predictions table: {e}") from e
    missing = [c for c in PRED_COLUMNS if c not in pred.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; a classifier run writes image_id, group_id, label and "
                        f"prob_<class> for every class (rerun the run to rewrite it)")
    for col in ("label", "pred"):
        bad = pred.loc[~pred[col].isin(CLASSES), col] if col in pred.columns else pd.Series(dtype=object)
        if len(bad):
            raise DataError(f"{path}: line {bad.index[0] + 2}: unknown {col} {bad.iloc[0]!r}; expected one of "
                            f"{list(CLASSES)}")
    return pred


def _pred_table(pred: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(true class index, class probabilities, decision) of every row of a predictions.csv table.

    The decision is the run's own ``pred`` column (its decision rule, e.g. a validation-fitted prior shift), or the
    argmax of the probabilities for a table without one.
    """
    lookup = {c: i for i, c in enumerate(CLASSES)}
    idx = pred["label"].map(lookup)
    if idx.isna().any():
        raise ValueError(f"predictions hold an unknown label {pred.loc[idx.isna(), 'label'].iloc[0]!r}; "
                         f"expected one of {CLASSES}")
    probs = pred[[f"prob_{c}" for c in CLASSES]].to_numpy(dtype=np.float64)
    if "pred" not in pred.columns:
        return idx.to_numpy(dtype=np.int64), probs, probs.argmax(1)
    decision = pred["pred"].map(lookup)
    if decision.isna().any():
        raise ValueError(f"predictions hold an unknown predicted class {pred.loc[decision.isna(), 'pred'].iloc[0]!r}; "
                         f"expected one of {CLASSES}")
    return idx.to_numpy(dtype=np.int64), probs, decision.to_numpy(dtype=np.int64)


def _scores(pred: pd.DataFrame, weights: np.ndarray, rare_idx: Sequence[int]) -> dict[str, np.ndarray]:
    """Headline metrics for every weight row, with the classifier stage's own metric code (same conventions)."""
    y, probs, decision = _pred_table(pred)
    out = scores_from_confusion(weighted_confusion(y, decision, weights), rare_idx)
    aucs = weighted_auc_per_class(y, probs, weights)
    out["auc_macro_ovr"], out["minority_auc"] = mean_auc(aucs), mean_auc(aucs, rare_idx)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Lesion-level paired bootstrap
# ----------------------------------------------------------------------------------------------------------------------

def lesion_bootstrap_diff(preds_a: Sequence[pd.DataFrame], preds_b: Sequence[pd.DataFrame],
                          rare: Sequence[str] = ("df", "vasc", "mel"), n_boot: int = 1000, seed: int = 0,
                          level: float = 0.95) -> dict[str, dict[str, float]]:
    """Paired bootstrap of metric(A) - metric(B) over test lesions, averaged over seeds.

    ``preds_a[i]`` and ``preds_b[i]`` are the predictions.csv tables of the two conditions for the same seed. Each
    replicate draws test lesions with replacement once and scores every seed of both conditions on that same draw;
    its statistic is the mean over seeds of the per-seed difference. Returns, per metric, the observed difference,
    the percentile interval and a two-sided bootstrap p-value (twice the smaller tail around zero).
    """
    if len(preds_a) != len(preds_b) or not preds_a:
        raise ValueError(f"need the same positive number of seeds on both sides, got {len(preds_a)} and {len(preds_b)}")
    ref = preds_a[0].sort_values("image_id").reset_index(drop=True)
    ids = ref["image_id"].to_numpy()
    for p in list(preds_a) + list(preds_b):
        if len(p) != len(ref) or set(p["image_id"]) != set(ids):
            raise ValueError("paired bootstrap needs predictions on the same test images for every run")
    groups, g_index = np.unique(ref["group_id"].astype(str).to_numpy(), return_inverse=True)
    rare_idx = [CLASSES.index(c) for c in rare]

    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(groups), size=(n_boot, len(groups)))
    counts = np.zeros((n_boot, len(groups)))
    np.add.at(counts, (np.arange(n_boot)[:, None], draws), 1.0)
    weights = np.vstack([np.ones(len(ids)), counts[:, g_index]])  # row 0: the observed test part

    diff = {m: np.zeros(n_boot + 1) for m in BOOT_METRICS}
    for pa, pb in zip(preds_a, preds_b):
        ma, mb = (_scores(p.set_index("image_id").loc[ids], weights, rare_idx) for p in (pa, pb))
        for m in BOOT_METRICS:
            diff[m] += (ma[m] - mb[m]) / len(preds_a)

    out = {}
    alpha = (1 - level) / 2
    for m, d in diff.items():
        boot = d[1:][~np.isnan(d[1:])]
        # a metric undefined on every replicate (e.g. minority AUC without a rare class in test) has no interval
        p = min(1.0, 2 * min((boot <= 0).mean(), (boot >= 0).mean())) if len(boot) else math.nan
        lo, hi = ((float(np.quantile(boot, alpha)), float(np.quantile(boot, 1 - alpha))) if len(boot)
                  else (math.nan, math.nan))
        out[m] = {"diff": float(d[0]), "lo": lo, "hi": hi, "p": float(p), "n_boot": int(len(boot)),
                  "n_lesions": int(len(groups))}
    return out


__all__ = ["mean_ci", "paired_t", "lesion_bootstrap_diff", "read_predictions", "BOOT_METRICS"]
