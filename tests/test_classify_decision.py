"""The decision rule: prior shift fitted on validation, and how metrics and the study's comparisons use decisions."""
from __future__ import annotations


import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score, roc_auc_score

from dermsynth.classify.decision import (DEFAULT_TAUS, class_prior, decide, fit_decision, fit_prior_shift,
                                        prior_offsets)
from dermsynth.data.labels import CLASSES
from dermsynth.experiments.stats import lesion_bootstrap_diff
from dermsynth.metrics.classification import classification_metrics

K = len(CLASSES)
DF = CLASSES.index("df")
NV = CLASSES.index("nv")


def _under_calling(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(probs, labels, prior) of a model that ranks df well but never calls it: df images get df 0.35 and nv 0.45."""
    rng = np.random.default_rng(seed)
    y = np.where(rng.random(n) < 0.1, DF, NV)
    p = np.full((n, K), 0.001)  # the other classes: never likely, whatever the shift
    p[:, DF] = np.where(y == DF, 0.35, 0.05) + rng.uniform(0, 0.02, n)
    p[:, NV] = 1 - p.sum(1) + p[:, NV]
    counts = np.bincount(y, minlength=K) * 10 + 50
    return p, y, class_prior(counts)


def test_argmax_and_neutral_shifts_change_nothing():
    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.ones(K), size=200)
    assert np.array_equal(decide(p), p.argmax(1))
    assert np.array_equal(decide(p, prior_offsets(class_prior(np.arange(K) * 3 + 1), 0.0)), p.argmax(1))
    # a uniform prior shifts every class alike, whatever tau
    assert np.array_equal(decide(p, prior_offsets(class_prior(np.full(K, 50)), 1.7)), p.argmax(1))


def test_class_prior_smooths_and_refuses_bad_counts():
    prior = class_prior([0, 1, 2, 3, 4, 5, 6])
    assert prior.min() > 0 and prior.sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="7 non-negative counts"):
        class_prior([1, 2, 3])
    with pytest.raises(ValueError, match="non-negative"):
        class_prior([1, 2, 3, 4, 5, 6, -1])


def test_fit_recovers_a_rare_class_that_argmax_never_calls():
    p, y, prior = _under_calling()
    assert (p.argmax(1) == DF).sum() == 0
    tau, table = fit_prior_shift(p, y, prior)
    assert set(table) == {float(t) for t in DEFAULT_TAUS}
    # the table's tau = 0 entry is plain argmax macro-F1, by scikit-learn's definition
    assert table[0.0] == pytest.approx(f1_score(y, p.argmax(1), average="macro", labels=np.unique(y), zero_division=0))
    assert tau > 0 and table[tau] > table[0.0] + 0.3
    pred = decide(p, prior_offsets(prior, tau))
    assert table[tau] == pytest.approx(f1_score(y, pred, average="macro", zero_division=0))


def test_ties_go_to_the_tau_closest_to_zero():
    y = np.repeat(np.arange(K), 10)
    p = np.full((len(y), K), 0.01)
    p[np.arange(len(y)), y] = 0.94  # every tau in a wide range scores macro-F1 1
    tau, table = fit_prior_shift(p, y, class_prior(np.arange(1, K + 1) * 100), taus=[-0.5, 0.5, 0.25, -0.25])
    assert table[-0.25] == table[0.25] == 1.0 and abs(tau) == 0.25
    assert fit_prior_shift(p, y, class_prior(np.ones(K)), taus=[1.0, 0.0, -1.0])[0] == 0.0
    with pytest.raises(ValueError, match="at least one tau"):
        fit_prior_shift(p, y, class_prior(np.ones(K)), taus=[])


def test_metrics_score_decisions_and_keep_auc():
    p, y, prior = _under_calling(seed=3)
    offsets = prior_offsets(prior, 1.0)
    groups = np.arange(len(y)) // 2
    plain = classification_metrics(y, p, groups, rare=["df"], n_boot=100, seed=4)
    shifted = classification_metrics(y, p, groups, rare=["df"], n_boot=100, seed=4, offsets=offsets)
    pred = decide(p, offsets)
    present = np.unique(np.r_[y, pred])
    assert shifted["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro", labels=present, zero_division=0))
    assert shifted["minority_f1"] > plain["minority_f1"]
    assert shifted["auc_macro_ovr"] == plain["auc_macro_ovr"]
    assert shifted["per_class"]["df"]["auc"] == pytest.approx(roc_auc_score(y == DF, p[:, DF]))
    assert shifted["ci"]["minority_auc"] == plain["ci"]["minority_auc"]  # same draws, AUC ignores the rule
    # the F1 intervals are those of the decisions: scoring one-hot decisions gives the same intervals
    hard = np.eye(K)[pred]
    assert shifted["ci"]["macro_f1"] == classification_metrics(y, hard, groups, rare=["df"], n_boot=100,
                                                               seed=4)["ci"]["macro_f1"]


def _table(y: np.ndarray, p: np.ndarray, pred: np.ndarray) -> pd.DataFrame:
    d = pd.DataFrame({"image_id": [f"i{i}" for i in range(len(y))], "group_id": [f"g{i // 2}" for i in range(len(y))],
                      "label": [CLASSES[i] for i in y], "source": "real"})
    for i, c in enumerate(CLASSES):
        d[f"prob_{c}"] = p[:, i]
    d["pred"] = [CLASSES[i] for i in pred]
    return d


def test_paired_bootstrap_compares_the_runs_decisions():
    p, y, prior = _under_calling(seed=5)
    pred = decide(p, prior_offsets(prior, 1.0))
    a, b = _table(y, p, pred), _table(y, p, p.argmax(1))
    d = lesion_bootstrap_diff([a], [b], rare=["df"], n_boot=200)
    want = f1_score(y, pred, average="macro", zero_division=0) - f1_score(y, p.argmax(1), average="macro",
                                                                           labels=np.unique(y), zero_division=0)
    assert d["macro_f1"]["diff"] == pytest.approx(want) and d["macro_f1"]["lo"] > 0
    assert d["minority_auc"]["diff"] == 0.0
    # a table without a pred column is scored by its argmax
    assert lesion_bootstrap_diff([b.drop(columns="pred")], [b], rare=["df"], n_boot=50)["macro_f1"]["diff"] == 0.0
    with pytest.raises(ValueError, match="unknown predicted class 'blue'"):
        lesion_bootstrap_diff([a.assign(pred="blue")], [b], rare=["df"], n_boot=10)


def test_fit_decision_wraps_the_rule_for_every_caller():
    p, y, _ = _under_calling(seed=7)
    counts = {c: {"real": (10 * i + 50), "synthetic": 99} for i, c in enumerate(CLASSES)}  # synthetic ones ignored
    plain = fit_decision("argmax", counts, p, y)
    assert plain.offsets is None and plain.record() == {"rule": "argmax"}
    fitted = fit_decision("prior_shift", counts, p, y, taus=[0.0, 1.0, 2.0])
    prior = class_prior([10 * i + 50 for i in range(K)])
    assert fitted.tau == fit_prior_shift(p, y, prior, [0.0, 1.0, 2.0])[0]
    assert np.allclose(fitted.offsets, prior_offsets(prior, fitted.tau))
    rec = fitted.record()
    assert rec["tau"] == fitted.tau and set(rec["val_macro_f1_by_tau"]) == {"0.0", "1.0", "2.0"}
    with pytest.raises(ValueError, match="unknown decision rule 'median'"):
        fit_decision("median", counts, p, y)
