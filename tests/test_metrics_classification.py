"""classification_metrics against scikit-learn, and the lesion-level bootstrap."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score,
                             precision_recall_fscore_support, roc_auc_score)

from dermsynth.data.labels import CLASSES
from dermsynth.metrics.classification import (classification_metrics, mean_auc, scores_from_confusion,
                                              weighted_auc_per_class, weighted_confusion)

K = len(CLASSES)


def _fake(n: int, seed: int, absent: tuple[int, ...] = ()) -> tuple[np.ndarray, np.ndarray]:
    """Labels (skewed, some classes optionally absent) and probabilities that are informative but imperfect."""
    rng = np.random.default_rng(seed)
    p = np.array([3, 5, 10, 2, 11, 65, 2], dtype=float)
    p[list(absent)] = 0
    y = rng.choice(K, size=n, p=p / p.sum())
    logits = rng.normal(size=(n, K)) + 1.5 * np.eye(K)[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, probs


def test_point_metrics_match_sklearn():
    y, probs = _fake(600, 0)
    pred = probs.argmax(1)
    m = classification_metrics(y, probs, n_boot=0)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["auc_macro_ovr"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    prec, rec, f1, sup = precision_recall_fscore_support(y, pred, labels=range(K), zero_division=0)
    for i, c in enumerate(CLASSES):
        auc = roc_auc_score(y == i, probs[:, i])
        assert m["per_class"][c] == pytest.approx({"precision": prec[i], "recall": rec[i], "f1": f1[i], "auc": auc,
                                                   "support": sup[i]})
    rare = [CLASSES.index(c) for c in ("df", "vasc", "mel")]
    assert m["minority_f1"] == pytest.approx(np.mean(f1[rare]))
    assert m["minority_auc"] == pytest.approx(np.mean([roc_auc_score(y == i, probs[:, i]) for i in rare]))
    cm = confusion_matrix(y, pred, labels=range(K))
    assert m["confusion"] == cm.tolist()
    assert np.allclose(m["confusion_norm"], cm / cm.sum(1, keepdims=True))
    assert m["ci"] == {}


def test_label_strings_equal_indices_and_custom_rare_set():
    y, probs = _fake(200, 1)
    a = classification_metrics(y, probs, rare="df,vasc", n_boot=0)
    b = classification_metrics([CLASSES[i] for i in y], probs, rare=["dermatofibroma", "vasc"], n_boot=0)
    assert a == b
    f1 = f1_score(y, probs.argmax(1), labels=range(K), average=None, zero_division=0)
    assert a["minority_f1"] == pytest.approx((f1[3] + f1[6]) / 2)


def test_absent_classes():
    """df and vasc missing from y_true: AUC averages present classes, minority F1 uses mel alone."""
    df_i, vasc_i, mel_i = (CLASSES.index(c) for c in ("df", "vasc", "mel"))
    y, probs = _fake(300, 2, absent=(df_i, vasc_i))
    pred = probs.argmax(1)
    m = classification_metrics(y, probs, n_boot=0)
    present = sorted(set(y))
    assert m["auc_macro_ovr"] == pytest.approx(np.mean([roc_auc_score(y == c, probs[:, c]) for c in present]))
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro", zero_division=0))
    assert m["minority_f1"] == pytest.approx(f1_score(y == mel_i, pred == mel_i))
    assert m["minority_auc"] == pytest.approx(roc_auc_score(y == mel_i, probs[:, mel_i]))  # df, vasc have no AUC
    assert m["per_class"]["df"]["support"] == 0 and m["per_class"]["df"]["auc"] is None
    assert np.allclose(np.array(m["confusion_norm"])[df_i], 0)


def test_weighted_internals_match_sklearn_sample_weight():
    """The bootstrap's vectorised weighted metrics equal scikit-learn with sample_weight."""
    y, probs = _fake(400, 3)
    pred = probs.argmax(1)
    rng = np.random.default_rng(0)
    w = rng.integers(0, 4, size=(3, len(y))).astype(float)
    probs[:50, 0] = probs[50:100, 0]  # ties in scores
    sc = scores_from_confusion(weighted_confusion(y, pred, w), rare_idx=[3, 4, 6])
    per_class = weighted_auc_per_class(y, probs, w)
    auc = mean_auc(per_class)
    for b in range(3):
        sw = w[b]
        assert sc["accuracy"][b] == pytest.approx(accuracy_score(y, pred, sample_weight=sw))
        assert sc["balanced_accuracy"][b] == pytest.approx(balanced_accuracy_score(y, pred, sample_weight=sw))
        keep = sw > 0
        assert sc["macro_f1"][b] == pytest.approx(
            f1_score(y[keep], pred[keep], average="macro", sample_weight=sw[keep], zero_division=0))
        refs = [roc_auc_score(y == c, probs[:, c], sample_weight=sw) for c in range(K)]
        assert per_class[b] == pytest.approx(refs) and auc[b] == pytest.approx(np.mean(refs))


def test_bootstrap_resamples_groups_not_images():
    """Each lesion photographed 4 times identically: the group bootstrap equals the image bootstrap of one photo per
    lesion (same seed), and is wider than a bootstrap that wrongly treats the 4 photos as independent."""
    y, probs = _fake(120, 4)
    names = np.arange(len(y)).astype(str)
    y4, p4, g4 = np.repeat(y, 4), np.repeat(probs, 4, axis=0), np.repeat(names, 4)
    single = classification_metrics(y, probs, groups=None, n_boot=300, seed=7)
    grouped = classification_metrics(y4, p4, groups=g4, n_boot=300, seed=7)
    naive = classification_metrics(y4, p4, groups=None, n_boot=300, seed=7)
    assert grouped["n_groups"] == 120 and grouped["n"] == 480
    for k in ("accuracy", "macro_f1", "balanced_accuracy", "auc_macro_ovr", "minority_auc"):
        assert grouped["ci"][k] == pytest.approx(single["ci"][k])
        lo, hi = grouped["ci"][k]
        assert lo <= grouped[k] <= hi
    width = lambda m: m["ci"]["accuracy"][1] - m["ci"]["accuracy"][0]  # noqa: E731
    assert width(grouped) > 1.4 * width(naive)
    assert set(grouped["ci"]) >= {"minority_f1", "f1_mel", "f1_nv"}


def test_bootstrap_is_seeded():
    y, probs = _fake(150, 5)
    a = classification_metrics(y, probs, n_boot=100, seed=1)
    b = classification_metrics(y, probs, n_boot=100, seed=1)
    c = classification_metrics(y, probs, n_boot=100, seed=2)
    assert a["ci"] == b["ci"] and a["ci"] != c["ci"]


def test_bad_input():
    y, probs = _fake(10, 6)
    with pytest.raises(ValueError, match="shape"):
        classification_metrics(y, probs[:, :6])
    with pytest.raises(ValueError, match="groups"):
        classification_metrics(y, probs, groups=["a"] * 9)
    with pytest.raises(Exception, match="unknown label"):
        classification_metrics(["cat"] * 10, probs)
