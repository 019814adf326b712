"""Classification metrics: one function that every stage scoring a classifier calls.

Point estimates follow scikit-learn's definitions (the tests check them against it). Confidence intervals come from a
bootstrap that resamples *lesions* (groups), not images: several photos of one lesion are not independent evidence,
and resampling them one by one makes intervals too narrow. Resampling groups with replacement is the same as giving every image a weight equal to how often
its group was drawn, so each replicate is a weighted confusion matrix (a matrix product) and a weighted rank AUC,
computed for all replicates at once instead of calling scikit-learn a thousand times.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from dermsynth.classify.decision import decide
from dermsynth.data.labels import CLASSES, canonical_label, parse_classes

K = len(CLASSES)
CI_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "minority_f1", "auc_macro_ovr", "minority_auc")


def _label_indices(y_true: Sequence) -> np.ndarray:
    """Label strings (aliases allowed) or indices into CLASSES -> int array."""
    y = np.asarray(y_true)
    if y.dtype.kind in "iu":
        if len(y) and (y.min() < 0 or y.max() >= K):
            raise ValueError(f"label indices must lie in [0, {K}), got range [{y.min()}, {y.max()}]")
        return y.astype(np.int64)
    return np.array([CLASSES.index(canonical_label(v, f"y_true[{i}]")) for i, v in enumerate(y)], dtype=np.int64)


# ----------------------------------------------------------------------------------------------------------------------
# Weighted metrics for many replicates at once (weights: (B, N); a row of ones reproduces the plain metric)
# ----------------------------------------------------------------------------------------------------------------------

def weighted_confusion(y: np.ndarray, pred: np.ndarray, w: np.ndarray) -> np.ndarray:
    """(B, K, K) confusion matrices, rows = true class, for weight rows ``w`` (B, N)."""
    onehot = np.zeros((len(y), K * K), dtype=w.dtype)
    onehot[np.arange(len(y)), y * K + pred] = 1
    return (w @ onehot).reshape(-1, K, K)


def scores_from_confusion(cm: np.ndarray, rare_idx: Sequence[int]) -> dict[str, np.ndarray]:
    """accuracy, balanced accuracy, macro-F1, minority F1 and per-class F1 from (B, K, K) confusion matrices.

    Conventions follow scikit-learn's defaults: macro-F1 averages the classes present in y_true or y_pred (a class
    predicted but absent scores F1 0); balanced accuracy averages recall over classes present in y_true; minority F1
    averages the rare classes present in y_true (NaN when none is).
    """
    tp = np.diagonal(cm, axis1=1, axis2=2)
    support, predicted = cm.sum(2), cm.sum(1)
    total = cm.sum((1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, tp / support, 0.0)
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
        present = support > 0
        seen = present | (predicted > 0)
        out = {
            "accuracy": tp.sum(1) / total,
            "balanced_accuracy": (recall * present).sum(1) / present.sum(1),
            "macro_f1": (f1 * seen).sum(1) / seen.sum(1),
            "f1": f1,
        }
        rare = np.zeros(K, dtype=bool)
        rare[list(rare_idx)] = True
        rp = present & rare
        out["minority_f1"] = np.where(rp.sum(1) > 0, (f1 * rp).sum(1) / np.maximum(rp.sum(1), 1), np.nan)
    return out


def weighted_auc_per_class(y: np.ndarray, probs: np.ndarray, w: np.ndarray) -> np.ndarray:
    """One-vs-rest ROC AUC of every class for each weight row: (B, K), NaN where a class lacks positives or negatives.

    AUC = P(score of a positive > score of a negative) + 0.5 P(tie), with pairs weighted by w_i * w_j (Mann-Whitney).
    Scores are sorted once per class; ties are pooled per distinct score value.
    """
    aucs = []
    for c in range(K):
        s = probs[:, c]
        order = np.argsort(s, kind="mergesort")
        s_sorted = s[order]
        starts = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])
        pos = (y[order] == c)
        wo = w[:, order]
        wp = np.add.reduceat(wo * pos, starts, axis=1)  # positive weight per distinct score
        wn = np.add.reduceat(wo * ~pos, starts, axis=1)
        below = np.cumsum(wn, axis=1) - wn
        num = (wp * (below + 0.5 * wn)).sum(1)
        den = wp.sum(1) * wn.sum(1)
        ok = den > 0
        aucs.append(np.where(ok, num / np.where(ok, den, 1), np.nan))
    return np.stack(aucs, 1)


def mean_auc(aucs: np.ndarray, idx: Sequence[int] | None = None) -> np.ndarray:
    """Mean of (B, K) per-class AUCs over the classes ``idx`` (default all) that have one; NaN where none has."""
    a = aucs if idx is None else aucs[:, list(idx)]
    valid = ~np.isnan(a)
    n = valid.sum(1)
    return np.where(n > 0, np.where(valid, a, 0.0).sum(1) / np.maximum(n, 1), np.nan)


# ----------------------------------------------------------------------------------------------------------------------
# The public function
# ----------------------------------------------------------------------------------------------------------------------

def bootstrap_ci(y: np.ndarray, probs: np.ndarray, groups: np.ndarray, rare_idx: Sequence[int], n_boot: int,
                 seed: int, level: float = 0.95, chunk: int = 200,
                 pred: np.ndarray | None = None) -> dict[str, list[float]]:
    """Percentile intervals of the headline metrics (and per-class F1) over ``n_boot`` group resamples.

    ``pred``: the decisions (class indices) scored by the F1/accuracy metrics; argmax of ``probs`` when None.
    """
    _, gidx = np.unique(groups, return_inverse=True)
    n_groups = int(gidx.max()) + 1
    pred = probs.argmax(1) if pred is None else pred
    rng = np.random.default_rng(seed)
    samples: dict[str, list[np.ndarray]] = {}
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        counts = rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=b).astype(np.float64)
        w = counts[:, gidx]  # each image weighted by how often its lesion was drawn
        sc = scores_from_confusion(weighted_confusion(y, pred, w), rare_idx)
        aucs = weighted_auc_per_class(y, probs, w)
        sc["auc_macro_ovr"], sc["minority_auc"] = mean_auc(aucs), mean_auc(aucs, rare_idx)
        for c, name in enumerate(CLASSES):
            sc[f"f1_{name}"] = sc["f1"][:, c]
        for key, val in sc.items():
            if key != "f1":
                samples.setdefault(key, []).append(val)
    lo_q, hi_q = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    out = {}
    for key, parts in samples.items():
        v = np.concatenate(parts)
        v = v[np.isfinite(v)]
        out[key] = [float(np.percentile(v, lo_q)), float(np.percentile(v, hi_q))] if len(v) else [float("nan")] * 2
    return out


def classification_metrics(y_true: Sequence, probs: np.ndarray, groups: Sequence | None = None,
                           rare: Sequence[str] | str = ("df", "vasc", "mel"), n_boot: int = 1000,
                           seed: int = 0, offsets: np.ndarray | None = None) -> dict:
    """All scores of one set of predictions.

    ``y_true``: label strings or indices into CLASSES; ``probs``: (N, 7) class probabilities in CLASSES order;
    ``groups``: lesion ids (bootstrap unit; each image its own group when None); ``rare``: the minority set.
    Returns accuracy, balanced_accuracy, macro_f1, minority_f1, per_class, confusion, confusion_norm, auc_macro_ovr,
    minority_auc, n, n_groups and ci {metric: [lo, hi]} (95 % percentile bootstrap over groups; empty when n_boot
    is 0). minority_auc (the rare classes' mean one-vs-rest AUC) judges how well rare lesions are *ranked*,
    whatever the decision threshold: F1 can move with the threshold alone, AUC cannot.
    ``offsets``: per-class log-probability offsets of the decision rule (dermsynth.classify.decision); they move the
    decisions (F1, accuracy, confusion) and leave the AUCs alone.
    """
    y = _label_indices(y_true)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape != (len(y), K):
        raise ValueError(f"probs must have shape ({len(y)}, {K}), got {probs.shape}")
    if len(y) == 0:
        raise ValueError("no predictions to score")
    groups_a = np.asarray(groups).astype(str) if groups is not None else np.arange(len(y)).astype(str)
    if len(groups_a) != len(y):
        raise ValueError(f"groups has {len(groups_a)} entries for {len(y)} labels")
    rare_names = parse_classes(rare)
    rare_idx = [CLASSES.index(c) for c in rare_names]
    # point estimates: the bootstrap's weighted formulas with unit weights (equal to scikit-learn's, see the tests,
    # without its per-call validation overhead, which dominated per-epoch evaluation of small models)
    pred = decide(probs, offsets)
    ones = np.ones((1, len(y)))
    cm = weighted_confusion(y, pred, ones)
    sc = scores_from_confusion(cm, rare_idx)
    cm = cm[0].astype(np.int64)
    tp, sup, predicted = np.diagonal(cm), cm.sum(1), cm.sum(0)
    prec = np.where(predicted > 0, tp / np.maximum(predicted, 1), 0.0)
    rec = np.where(sup > 0, tp / np.maximum(sup, 1), 0.0)
    f1 = sc["f1"][0]
    cm_norm = np.where(sup[:, None] > 0, cm / np.maximum(sup[:, None], 1), 0.0)
    aucs = weighted_auc_per_class(y, probs, ones)
    out = {
        "n": int(len(y)),
        "n_groups": int(len(np.unique(groups_a))),
        "accuracy": float(sc["accuracy"][0]),
        "balanced_accuracy": float(sc["balanced_accuracy"][0]),
        "macro_f1": float(sc["macro_f1"][0]),
        "minority_f1": float(sc["minority_f1"][0]),
        "rare_classes": rare_names,
        "auc_macro_ovr": float(mean_auc(aucs)[0]),
        "minority_auc": float(mean_auc(aucs, rare_idx)[0]),
        "per_class": {c: {"precision": float(prec[i]), "recall": float(rec[i]), "f1": float(f1[i]),
                          "auc": None if np.isnan(aucs[0, i]) else float(aucs[0, i]), "support": int(sup[i])}
                      for i, c in enumerate(CLASSES)},
        "confusion": cm.tolist(),
        "confusion_norm": cm_norm.tolist(),
        "classes": list(CLASSES),
        "ci": {},
    }
    if n_boot > 0:
        out["ci"] = bootstrap_ci(y, probs, groups_a, rare_idx, n_boot, seed, pred=pred)
        out["ci_level"] = 0.95
        out["n_boot"] = int(n_boot)
    return out
