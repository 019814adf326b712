"""The decision rule: which class a classifier's probabilities become.

A network trained on imbalanced data (or with a re-balancing loss or sampler) ranks lesions well but puts its
argmax thresholds wherever its training prior left them. ``prior_shift`` moves every class's log-probability by
``-tau * log(prior_c)`` (post-hoc logit adjustment, Menon et al. 2021), with the single number ``tau`` chosen on the
VALIDATION part by macro-F1. One parameter, not seven per-class thresholds: the rare classes have a few dozen
validation images, and seven free thresholds fit their noise.

tau > 0 favours rare classes (an argmax trained on the natural prior under-calls them); tau < 0 undoes a re-balancing
that over-calls them (oversampling, balanced focal loss); tau = 0 is plain argmax. The rule changes decisions only:
AUC, which ranks probabilities, is the same under any offsets.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from dermsynth.data.labels import CLASSES

DEFAULT_TAUS = tuple(np.round(np.arange(-1.0, 2.0001, 0.25), 2).tolist())


def class_prior(counts: Sequence[float], smoothing: float = 1.0) -> np.ndarray:
    """Class frequencies from per-class counts (CLASSES order), add-``smoothing`` so that no class has prior 0."""
    c = np.asarray(counts, dtype=np.float64)
    if c.shape != (len(CLASSES),) or (c < 0).any():
        raise ValueError(f"class_prior needs {len(CLASSES)} non-negative counts, got {c.tolist()}")
    c = c + smoothing
    return c / c.sum()


def prior_offsets(prior: np.ndarray, tau: float) -> np.ndarray:
    """Per-class log-probability offsets ``-tau * log(prior)``."""
    return -float(tau) * np.log(np.asarray(prior, dtype=np.float64))


def decide(probs: np.ndarray, offsets: np.ndarray | None = None) -> np.ndarray:
    """Predicted class indices: argmax of log(probs) + offsets (plain argmax when offsets is None)."""
    probs = np.asarray(probs, dtype=np.float64)
    if offsets is None:
        return probs.argmax(1)
    return (np.log(np.clip(probs, 1e-30, None)) + np.asarray(offsets, dtype=np.float64)[None, :]).argmax(1)


def fit_prior_shift(probs: np.ndarray, labels: np.ndarray, prior: np.ndarray,
                    taus: Sequence[float] = DEFAULT_TAUS) -> tuple[float, dict[float, float]]:
    """The tau of ``taus`` with the best macro-F1 of (probs, labels); ties go to the tau closest to 0.

    Returns (tau, {tau: macro-F1}). ``labels`` are indices into CLASSES.
    """
    from dermsynth.metrics.classification import scores_from_confusion, weighted_confusion

    if not len(taus):
        raise ValueError("fit_prior_shift needs at least one tau")
    y = np.asarray(labels, dtype=np.int64)
    ones = np.ones((1, len(y)))
    table = {}
    for tau in taus:
        pred = decide(probs, prior_offsets(prior, tau))
        table[float(tau)] = float(scores_from_confusion(weighted_confusion(y, pred, ones), [])["macro_f1"][0])
    best = max(table.values())
    tau = min((t for t, f in table.items() if f >= best - 1e-12), key=abs)
    return tau, table


@dataclass
class Decision:
    """A fitted decision rule: ``offsets`` for :func:`decide` (None = argmax) and what ``record`` puts in metrics."""

    rule: str = "argmax"
    tau: float = math.nan
    prior: np.ndarray | None = None
    val_macro_f1_by_tau: dict[float, float] = field(default_factory=dict)

    @property
    def offsets(self) -> np.ndarray | None:
        return None if self.prior is None else prior_offsets(self.prior, self.tau)

    def record(self) -> dict:
        if self.prior is None:
            return {"rule": self.rule}
        return {"rule": self.rule, "tau": self.tau,
                "val_macro_f1_by_tau": {str(k): v for k, v in self.val_macro_f1_by_tau.items()},
                "prior": dict(zip(CLASSES, self.prior.tolist())), "offsets": dict(zip(CLASSES, self.offsets.tolist()))}


def fit_decision(rule: str, train_counts: Mapping[str, Mapping[str, int]], val_probs: np.ndarray,
                 val_labels: np.ndarray, taus: Sequence[float] = DEFAULT_TAUS) -> Decision:
    """The rule fitted on validation probabilities. ``train_counts``: class -> {"real": n, ...}, as in metrics.json
    (the prior is that of the REAL training images: synthetic ones are an artefact of the recipe, not of the data)."""
    if rule == "argmax":
        return Decision()
    if rule != "prior_shift":
        raise ValueError(f"unknown decision rule {rule!r}; use argmax or prior_shift")
    prior = class_prior([train_counts[c]["real"] for c in CLASSES])
    tau, table = fit_prior_shift(val_probs, val_labels, prior, taus)
    return Decision(rule, tau, prior, table)


__all__ = ["DEFAULT_TAUS", "Decision", "class_prior", "prior_offsets", "decide", "fit_prior_shift", "fit_decision"]
