"""Aggregation statistics against hand-computed values, on a fake finished study written here."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score, roc_auc_score

from dermsynth.data.labels import CLASSES
from dermsynth.experiments.aggregate import aggregate, criteria_table, find_fid, load_aggregate, summarise
from dermsynth.experiments.stats import (detectable_over_lesions, detectable_over_seeds, lesion_bootstrap_diff,
                                        mean_ci, paired_t)
from dermsynth.paths import StudyPaths

# ----------------------------------------------------------------------------------------------------------------------
# A fake finished study (also used by test_report.py)
# ----------------------------------------------------------------------------------------------------------------------

# condition -> per-seed (val macro-F1, test macro-F1, test minority F1, test accuracy)
FAKE = {
    "real_only": [(0.50, 0.55, 0.30, 0.80), (0.52, 0.57, 0.32, 0.81), (0.51, 0.56, 0.31, 0.79)],
    # best on TEST among baselines but not on validation: must not be picked
    "oversampling": [(0.49, 0.66, 0.40, 0.82), (0.50, 0.67, 0.41, 0.83), (0.48, 0.65, 0.39, 0.81)],
    "focal": [(0.60, 0.60, 0.40, 0.83), (0.61, 0.62, 0.43, 0.84), (0.62, 0.61, 0.40, 0.85)],
    "hybrid": [(0.63, 0.70, 0.50, 0.86), (0.64, 0.74, 0.56, 0.84), (0.65, 0.72, 0.53, 0.85)],
}


def _predictions(rng: np.random.Generator, n_lesions: int, skill: float) -> pd.DataFrame:
    """Test predictions over a fixed set of lesions (1-3 images each); ``skill`` = chance of a correct argmax."""
    rows = []
    for g in range(n_lesions):
        label = CLASSES[g % len(CLASSES)]
        for j in range(1 + g % 3):
            correct = rng.random() < skill
            pred = label if correct else CLASSES[(CLASSES.index(label) + 1) % len(CLASSES)]
            probs = np.full(len(CLASSES), 0.02)
            probs[CLASSES.index(pred)] = 1 - 0.02 * (len(CLASSES) - 1)
            rows.append({"image_id": f"img{g}_{j}", "group_id": f"les{g}", "label": label,
                         **{f"prob_{c}": p for c, p in zip(CLASSES, probs)}})
    return pd.DataFrame(rows)


def make_fake_study(root: Path, with_predictions: bool = True) -> dict[str, dict[int, Path]]:
    """Classifier runs with metrics.json, predictions.csv and summary.csv, as train_classifier writes them."""
    paths = StudyPaths(root)
    runs: dict[str, dict[int, Path]] = {}
    for k, (cond, seeds) in enumerate(FAKE.items()):
        for seed, (val_f1, f1, mino, acc) in enumerate(seeds):
            run = paths.classifier(cond, seed)
            run.mkdir(parents=True, exist_ok=True)
            per_class = {c: {"precision": 0.5, "recall": 0.5, "f1": f1 + 0.01 * i, "support": 10}
                         for i, c in enumerate(CLASSES)}
            conf = np.eye(len(CLASSES)) * acc + (1 - acc) / len(CLASSES)
            test = {"accuracy": acc, "balanced_accuracy": acc - 0.1, "macro_f1": f1, "minority_f1": mino,
                    "auc_macro_ovr": 0.9, "minority_auc": mino + 0.3, "per_class": per_class, "confusion_norm": conf.tolist(),
                    "confusion": (conf * 10).round().tolist()}
            val = {"accuracy": acc, "balanced_accuracy": acc - 0.1, "macro_f1": val_f1, "minority_f1": mino,
                   "per_class": per_class}
            counts = {c: {"real": 10, "synthetic": 10 if cond == "hybrid" else 0} for c in CLASSES}
            (run / "metrics.json").write_text(json.dumps({"test": test, "val": val, "best_epoch": 2, "wall_s": 1.0,
                                                          "train_counts": counts}))
            if with_predictions:
                rng = np.random.default_rng(100 * k + seed)
                _predictions(rng, 30, skill=0.4 + 0.1 * k).to_csv(run / "predictions.csv", index=False)
            pd.DataFrame({"epoch": [1, 2, 3], "train_loss": [1.5, 1.0, 0.8], "val_macro_f1": [0.3, val_f1, val_f1 - .01],
                          "lr": [1e-3, 5e-4, 1e-4]}).to_csv(run / "summary.csv", index=False)
            runs.setdefault(cond, {})[seed] = run
    return runs


# ----------------------------------------------------------------------------------------------------------------------
# Statistics against hand computations
# ----------------------------------------------------------------------------------------------------------------------

def test_mean_ci_matches_hand_computed_t_interval():
    r = mean_ci([0.6, 0.7, 0.8])
    # t_{0.975, 2} = 4.302652729911275; half-width = t * s / sqrt(n) with s = 0.1
    half = 4.302652729911275 * 0.1 / math.sqrt(3)
    assert r["n"] == 3 and r["mean"] == pytest.approx(0.7) and r["std"] == pytest.approx(0.1)
    assert r["ci_lo"] == pytest.approx(0.7 - half) and r["ci_hi"] == pytest.approx(0.7 + half)
    one = mean_ci([0.5])
    assert one["mean"] == 0.5 and math.isnan(one["std"]) and math.isnan(one["ci_lo"])


def test_paired_t_matches_closed_form_for_two_degrees_of_freedom():
    a, b = [0.70, 0.74, 0.72], [0.65, 0.66, 0.70]  # differences 0.05, 0.08, 0.02: mean 0.05, s 0.03
    r = paired_t(a, b)
    t = 0.05 / (0.03 / math.sqrt(3))
    cdf = 0.5 + t / (2 * math.sqrt(2 + t * t))  # Student t CDF with 2 degrees of freedom
    assert r["diff"] == pytest.approx(0.05) and r["diff_std"] == pytest.approx(0.03)
    assert r["t"] == pytest.approx(t) and r["p"] == pytest.approx(2 * (1 - cdf))
    assert r["diff_lo"] < 0 < r["diff_hi"]  # p ~ 0.10: the 95 % interval must straddle zero
    same = paired_t([0.5, 0.6], [0.4, 0.5])
    assert same["diff"] == pytest.approx(0.1) and math.isnan(same["p"])


def test_bootstrap_resamples_lesions_not_images():
    # lesion X: 9 images, A right and B wrong; lesion Y: 1 image, both right. Drawing 2 lesions with replacement
    # gives accuracy differences 1 (XX, p=1/4), 0.9 (XY, p=1/2) or 0 (YY, p=1/4); image resampling would not.
    def preds(correct_x: bool) -> pd.DataFrame:
        rows = []
        for i in range(10):
            label, right = ("mel", correct_x) if i < 9 else ("nv", True)
            pred = label if right else "bkl"
            rows.append({"image_id": f"i{i}", "group_id": "X" if i < 9 else "Y", "label": label,
                         **{f"prob_{c}": float(c == pred) for c in CLASSES}})
        return pd.DataFrame(rows)

    r = lesion_bootstrap_diff([preds(True)], [preds(False)], n_boot=4000, seed=1)["accuracy"]
    assert r["diff"] == pytest.approx(0.9) and r["n_lesions"] == 2
    assert r["lo"] == pytest.approx(0.0) and r["hi"] == pytest.approx(1.0)
    assert r["p"] == pytest.approx(0.5, abs=0.05)  # P(diff <= 0) = 1/4, two-sided -> 1/2


def test_bootstrap_of_identical_conditions_is_zero_and_pairs_by_image_id():
    rng = np.random.default_rng(3)
    a = _predictions(rng, 40, 0.6)
    shuffled = a.sample(frac=1.0, random_state=0)  # row order must not matter: rows are paired by image_id
    r = lesion_bootstrap_diff([a], [shuffled], n_boot=200)
    for m in ("accuracy", "macro_f1", "minority_f1", "balanced_accuracy"):
        assert r[m]["diff"] == 0 and r[m]["lo"] == 0 and r[m]["hi"] == 0
    with pytest.raises(ValueError, match="same test images"):
        lesion_bootstrap_diff([a], [a.iloc[:-1]], n_boot=10)


def test_bootstrap_of_a_metric_undefined_on_every_replicate_has_no_interval():
    """Without a rare class in the test part minority AUC is NaN on every replicate: NaN bounds, not an IndexError."""
    rng = np.random.default_rng(4)
    a, b = _predictions(rng, 40, 0.7), _predictions(rng, 40, 0.5)
    common = ~a["label"].isin(["df", "vasc", "mel"]).to_numpy()
    r = lesion_bootstrap_diff([a[common]], [b[common]], n_boot=50)
    assert r["minority_auc"]["n_boot"] == 0 and math.isnan(r["minority_auc"]["lo"]) and math.isnan(
        r["minority_auc"]["hi"]) and math.isnan(r["minority_auc"]["p"])
    assert r["accuracy"]["n_boot"] == 50 and r["accuracy"]["lo"] <= r["accuracy"]["hi"]


def test_bootstrap_observed_difference_equals_sklearn_difference_averaged_over_seeds():
    rng = np.random.default_rng(5)
    pa = [_predictions(rng, 50, 0.7) for _ in range(3)]
    pb = [_predictions(rng, 50, 0.5) for _ in range(3)]
    r = lesion_bootstrap_diff(pa, pb, n_boot=100)

    def f1(p):
        y = p["label"].map(CLASSES.index)
        yhat = p[[f"prob_{c}" for c in CLASSES]].to_numpy().argmax(1)
        return f1_score(y, yhat, labels=sorted(set(y)), average="macro")

    expected = np.mean([f1(a) - f1(b) for a, b in zip(pa, pb)])
    assert r["macro_f1"]["diff"] == pytest.approx(expected)
    assert r["macro_f1"]["lo"] <= expected <= r["macro_f1"]["hi"]

    def rare_auc(p):
        return np.mean([roc_auc_score(p["label"] == c, p[f"prob_{c}"]) for c in ("df", "vasc", "mel")])

    assert r["minority_auc"]["diff"] == pytest.approx(np.mean([rare_auc(a) - rare_auc(b) for a, b in zip(pa, pb)]))


# ----------------------------------------------------------------------------------------------------------------------
# The aggregate stage on a fake study
# ----------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [2, 3, 5])
def test_detectable_over_seeds_is_found_with_the_promised_power(n):
    # simulate paired t-tests over n seeds at a true difference of exactly the detectable one: ~80 % must reject
    sd, rng = 0.02, np.random.default_rng(n)
    mde = detectable_over_seeds(sd, n)
    crit = __import__("scipy").stats.t.ppf(0.975, n - 1)

    def reject_rate(true_diff: float) -> float:
        d = rng.normal(true_diff, sd, size=(40_000, n))
        t = d.mean(1) / (d.std(1, ddof=1) / math.sqrt(n))
        return float((np.abs(t) > crit).mean())

    assert reject_rate(mde) == pytest.approx(0.80, abs=0.01)
    assert reject_rate(0.0) == pytest.approx(0.05, abs=0.01)  # the simulated test is the real one
    assert detectable_over_seeds(2 * sd, n) == pytest.approx(2 * mde)  # linear in the spread


def test_detectable_over_seeds_limits_and_edge_cases():
    # many seeds: the textbook (t_0.975 + t_0.8) * sd / sqrt(n) becomes exact (t_0.975,399 1.96593, t_0.8,399 0.84252)
    assert detectable_over_seeds(0.01, 400) == pytest.approx((1.96593 + 0.84252) * 0.01 / 20, rel=1e-3)
    assert detectable_over_seeds(0.01, 3) > detectable_over_seeds(0.01, 5) > detectable_over_seeds(0.01, 10)
    assert math.isnan(detectable_over_seeds(0.01, 1)) and math.isnan(detectable_over_seeds(math.nan, 3))
    assert detectable_over_seeds(0.0, 3) == 0.0


def test_detectable_over_lesions_from_the_bootstrap_interval_width():
    # interval +-1.96 * 0.02 -> standard error 0.02 -> (1.96 + 0.8416) * 0.02
    assert detectable_over_lesions(0.01 - 1.959964 * 0.02, 0.01 + 1.959964 * 0.02) == pytest.approx(0.056032, abs=1e-5)
    assert math.isnan(detectable_over_lesions(math.nan, 0.1))


def test_aggregate_tables_best_baseline_by_validation_and_criteria(tmp_path):
    runs = make_fake_study(tmp_path)
    out = aggregate(tmp_path, runs, baselines=["real_only", "oversampling", "focal"], primary="hybrid", n_boot=300,
                    quality={"extractor": "lite0", "groups": {
                        "df": {"N": 5, "synthetic": {"FD_lite0": 55.0, "FD_lite0_std": 1.0}, "floor": {"FD_lite0": 20.0}}}})
    agg = load_aggregate(tmp_path)
    assert out == tmp_path / "aggregate"

    # oversampling has the best TEST macro-F1 of the baselines, focal the best VALIDATION one: focal is the reference
    assert agg["info"]["best_baseline"] == "focal"
    assert agg["info"]["baseline_val_macro_f1"]["focal"] == pytest.approx(0.61)

    t = agg["table"].set_index(["condition", "part", "metric"])
    row = t.loc[("hybrid", "test", "macro_f1")]
    half = 4.302652729911275 * 0.02 / math.sqrt(3)  # values 0.70, 0.74, 0.72: mean 0.72, s 0.02
    assert row["n"] == 3 and row["mean"] == pytest.approx(0.72) and row["std"] == pytest.approx(0.02)
    assert row["ci_lo"] == pytest.approx(0.72 - half) and row["ci_hi"] == pytest.approx(0.72 + half)
    assert t.loc[("hybrid", "test", "f1_vasc"), "mean"] == pytest.approx(0.72 + 0.06)

    c = agg["comparisons"].set_index(["condition", "metric"])
    assert "focal" not in c.index.get_level_values(0)
    hyb = c.loc[("hybrid", "macro_f1")]
    assert hyb["reference"] == "focal" and hyb["diff"] == pytest.approx(0.11)  # (0.70-0.60 + 0.74-0.62 + 0.72-0.61)/3
    assert hyb["p"] == pytest.approx(paired_t([0.70, 0.74, 0.72], [0.60, 0.62, 0.61])["p"])
    assert hyb["n_lesions"] == 30 and hyb["boot_lo"] <= hyb["boot_diff"] <= hyb["boot_hi"]
    assert hyb["detectable"] == pytest.approx(detectable_over_seeds(hyb["diff_std"], 3))
    assert hyb["boot_detectable"] == pytest.approx(detectable_over_lesions(hyb["boot_lo"], hyb["boot_hi"]))

    crit = agg["criteria"].set_index("metric")
    assert crit.loc["macro_f1", "status"] == "met" and crit.loc["macro_f1", "measured"] == pytest.approx(0.72)
    assert crit.loc["minority_f1", "status"] == "not met"  # 0.53 < 0.55
    assert crit.loc["accuracy", "status"] == "met (stretch)"  # 0.85 >= 0.85
    assert crit.loc["fid", "status"] == "not measurable here"
    assert "FD_lite0" in crit.loc["fid", "note"] and "not FID" in crit.loc["fid", "note"]

    conf = np.asarray(agg["info"]["confusion_norm"]["hybrid"])
    assert conf.shape == (7, 7) and conf[0, 0] == pytest.approx(0.85 + 0.15 / 7)


def test_primary_from_is_chosen_on_validation_and_the_criteria_follow_it(tmp_path):
    runs = make_fake_study(tmp_path, with_predictions=False)
    # oversampling has the better TEST macro-F1 (0.66 vs 0.56), real_only the better VALIDATION one (0.51 vs 0.49)
    aggregate(tmp_path, runs, baselines=["focal"], primary="hybrid", primary_from=["oversampling", "real_only"])
    agg = load_aggregate(tmp_path)
    assert agg["info"]["primary"] == "real_only" and "validation" in agg["info"]["primary_rule"]
    assert agg["info"]["primary_val_macro_f1"] == pytest.approx({"oversampling": 0.49, "real_only": 0.51})
    crit = agg["criteria"].set_index("metric")
    assert crit.loc["macro_f1", "condition"] == "real_only" and crit.loc["macro_f1", "measured"] == pytest.approx(0.56)


def test_filter_twins_pair_recipes_that_differ_only_in_the_filter():
    from dermsynth.experiments.config import Condition, filter_twins

    conds = [Condition(name="focal", loss="focal"),
             Condition(name="hybrid", loss="focal", synthetic="filtered", ratio=1.0),
             Condition(name="hybrid_r2", loss="focal", synthetic="filtered", ratio=2.0),
             Condition(name="hybrid_ra", randaugment=True, synthetic="filtered", ratio=1.0),
             Condition(name="hybrid_unfiltered", loss="focal", synthetic="unfiltered", ratio=1.0)]
    assert filter_twins(conds) == {"hybrid": "hybrid_unfiltered"}


def test_aggregate_without_predictions_still_gives_seed_statistics(tmp_path):
    runs = make_fake_study(tmp_path, with_predictions=False)
    aggregate(tmp_path, runs, baselines=["real_only", "focal"], primary="hybrid")
    c = load_aggregate(tmp_path)["comparisons"]
    row = c[(c["condition"] == "hybrid") & (c["metric"] == "minority_f1")].iloc[0]
    assert row["diff"] == pytest.approx((0.10 + 0.13 + 0.13) / 3) and math.isnan(row["boot_diff"])


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.assign(label=p["label"].where(p.index != 3, "melanoma")), "line 5: unknown label 'melanoma'"),
    (lambda p: p.drop(columns=["group_id"]), r"missing column\(s\) \['group_id'\]"),
    (lambda p: p.drop(columns=["prob_nv"]), r"missing column\(s\) \['prob_nv'\]"),
    (lambda p: p.iloc[:-1], "not the same test images as"),
], ids=["unknown label", "no group_id", "no prob column", "other images"])
def test_a_bad_predictions_file_is_named(tmp_path, damage, message):
    """A predictions.csv the bootstrap cannot use stops the aggregate with a DataError that names the file."""
    from dermsynth.io import DataError

    runs = make_fake_study(tmp_path)
    bad = runs["hybrid"][1] / "predictions.csv"
    damage(pd.read_csv(bad)).to_csv(bad, index=False)
    with pytest.raises(DataError, match=rf"{re.escape(str(bad))}: .*{message}"):
        aggregate(tmp_path, runs, baselines=["real_only", "focal"], primary="hybrid", n_boot=10)


def test_criteria_with_inception_fid_and_missing_condition():
    table = summarise(pd.DataFrame([{"condition": "hybrid", "seed": s, "part": "test", "metric": "accuracy",
                                     "value": v} for s, v in enumerate([0.80, 0.81])]))
    q = {"extractor": "inception", "groups": {"df": {"N": 9, "synthetic": {"FID": 40.0}, "floor": {"FID": 12.0}},
                                              "pooled": {"N": 30, "synthetic": {"FID": 25.0}, "floor": {"FID": 9.0}}}}
    crit = criteria_table(table, "hybrid", q).set_index("metric")
    assert crit.loc["fid", "status"] == "met" and crit.loc["fid", "measured"] == 25.0  # pooled: 25 < 30 but not < 20
    assert "floor 9" in crit.loc["fid", "note"]
    assert crit.loc["accuracy", "status"] == "not met"
    assert crit.loc["macro_f1", "status"] == "not measurable here"
    assert find_fid(None)[0] is None
